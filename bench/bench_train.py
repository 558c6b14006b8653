"""Training throughput of one expert at the demo size, and the data-loading share of a step.

Runs :func:`dfd_lib.training.trainer.train_expert` (the real loop: decode, augment, forward, the three
losses, backward, AdamW, EMA update) on the demo dataset's training images (or, when the
demo dataset is not built, on 128 px crops of scikit-image's bundled photos) with the
pretrained ``tf_efficientnet_lite0``. Each variant trains 2 short epochs of ``--steps``
steps; the first pays one-off costs (allocations, first-call dispatch), the second is
reported: images/s and the share of the step time spent waiting for the next batch. The
validation set is kept small so it does not dominate. The machine is shared and noisy: the
1-minute load average is printed beside the figures; each variant runs ``--repeats`` times
and the fastest run counts. Prints a Markdown table for bench/RESULTS.md.

``--step-only`` times the optimiser step alone (``MultiLoss`` forward, backward, AdamW on a
random batch; no loader, no EMA) for 1 and 2 threads, both memory layouts and with or
without the KL term's noisy forward: the cost of each choice without the loader's noise.

    .venv/bin/python bench/bench_train.py --steps 8 --repeats 1
    .venv/bin/python bench/bench_train.py --step-only
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from dfd_lib.core.paths import DEMO_DATA_DIR  # noqa: E402
from dfd_lib.training.losses import LossConfig  # noqa: E402
from dfd_lib.training.train_config import TrainConfig  # noqa: E402
from dfd_lib.training.trainer import train_expert  # noqa: E402

VARIANTS = {
    "all 3 losses, channels_last, workers 0": dict(),
    "CE + NCE (no noisy forward)": dict(loss=LossConfig(kl_weight=0.0)),
    "CE only": dict(loss=LossConfig(nce_weight=0.0, kl_weight=0.0)),
    "all 3 losses, contiguous (NCHW)": dict(channels_last=False),
    "all 3 losses, 1 loader worker": dict(num_workers=1),
    "all 3 losses, 1 torch thread": dict(threads=1),
}


def demo_or_synthetic_table(folder: Path, count: int, size: int) -> tuple[pd.DataFrame, str]:
    manifest = DEMO_DATA_DIR / "manifest.csv"
    if manifest.is_file():
        from dfd_lib.data.manifest import Manifest

        table = Manifest.load(manifest).table
        table = table[table["split"] == "train"].sample(frac=1.0, random_state=0).reset_index(drop=True)
        return table, f"demo dataset ({manifest.relative_to(DEMO_DATA_DIR.parents[1])}, train split)"
    from dfd_lib.sources.photos import write_photo_crops

    rows = [{"path": str(path), "label": i % 2} for i, (path, _) in enumerate(write_photo_crops(folder, count, size))]
    return pd.DataFrame(rows), "synthetic 128 px crops of scikit-image photos"


def step_only(backbone: str, image_size: int, batch_size: int, steps: int = 4) -> pd.DataFrame:
    """img/s of forward + losses + backward + AdamW on a random batch (fastest of ``steps``)."""
    from dfd_lib.models.experts import Expert
    from dfd_lib.training.losses import MultiLoss

    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.arange(batch_size) % 2
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for layout in (torch.contiguous_format, torch.channels_last):
            for kl in (1.0, 0.0):
                torch.manual_seed(0)
                model = Expert(backbone, pretrained=True).to(memory_format=layout).train()
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                loss_fn = MultiLoss(LossConfig(kl_weight=kl))
                times = []
                for _ in range(steps + 1):  # the first step pays one-off costs
                    started = time.perf_counter()
                    losses = loss_fn(model, x.contiguous(memory_format=layout), y)
                    optimizer.zero_grad(set_to_none=True)
                    losses["overall"].backward()
                    optimizer.step()
                    times.append(time.perf_counter() - started)
                rows.append({"threads": threads, "layout": "channels_last" if layout is torch.channels_last else "NCHW",
                             "losses": "all 3" if kl else "CE + NCE", "images_per_s": batch_size / min(times[1:]),
                             "load_1min": os.getloadavg()[0]})
                print(f"  {rows[-1]}", flush=True)
    torch.set_num_threads(2)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="steps per epoch (2 epochs per variant; the 2nd counts)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names from VARIANTS")
    parser.add_argument("--step-only", action="store_true", help="time the optimiser step alone (no loader)")
    args = parser.parse_args()
    if args.step_only:
        frame = step_only(args.backbone, args.image_size, args.batch_size)
        print(frame.to_markdown(index=False, floatfmt=".3g") if _has_tabulate() else frame.to_string(index=False))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        needed = args.batch_size * args.steps + 64
        table, described = demo_or_synthetic_table(tmp, needed, args.image_size)
        train, val = table.iloc[: args.batch_size * args.steps], table.iloc[-64:]
        print(f"data: {described}; {len(train)} training images, {len(val)} validation images")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads by default")
        rows = []
        for name in args.variants:
            best = None
            for repeat in range(args.repeats):
                settings = dict(backbone=args.backbone, pretrained=True, image_size=args.image_size, epochs=2,
                                batch_size=args.batch_size, max_steps_per_epoch=args.steps, progress=False, threads=2)
                config = TrainConfig(**{**settings, **VARIANTS[name]})
                started = time.perf_counter()
                result = train_expert(train, val, config, tmp / f"run_{len(rows)}_{repeat}", resume=False)
                wall = time.perf_counter() - started
                steady = result.history.iloc[-1]
                if best is None or steady["images_per_s"] > best["images_per_s"]:
                    best = {"variant": name, "images_per_s": steady["images_per_s"],
                            "step_s": args.batch_size / steady["images_per_s"], "data_share": steady["data_share"],
                            "first_epoch_images_per_s": result.history.iloc[0]["images_per_s"],
                            "wall_s (2 epochs + 2 validations)": wall, "load_1min": os.getloadavg()[0]}
            torch.set_num_threads(2)
            rows.append(best)
            print(f"  {name}: {best['images_per_s']:.1f} img/s, data {100 * best['data_share']:.1f}% of the step "
                  f"(load {best['load_1min']:.1f})", flush=True)
        frame = pd.DataFrame(rows)
        print()
        print(f"{args.backbone} at {args.image_size} px, batch {args.batch_size}, second epoch of {args.steps} steps:")
        print(frame.to_markdown(index=False, floatfmt=".3g") if _has_tabulate() else frame.to_string(index=False))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
