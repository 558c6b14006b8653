"""Peak training memory per original backbone at 512 px, with and without gradient checkpointing.

Each measurement runs in its own process (so peaks never mix): an Expert of the backbone (random
weights), AdamW, and one training step of the real three losses (CE, NCE, and KL with a noisy copy of
every image, as the full profile trains) on a batch of random 512 px images. It reports the peak RSS
(on the CPU here; `bench/gpu_check.py` measures GPU memory), the memory held before the step
(weights and optimiser), their difference per image, and `dfd check`'s estimate beside it.

    python bench/bench_train_memory.py [--size 512] [--batch 2] [--backbones ...]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS")) / 1024


def measure(backbone: str, size: int, batch: int, checkpointing: bool) -> dict:
    """One training step in this process; its memory figures."""
    import torch

    from dfd_lib.models.experts import Expert
    from dfd_lib.training.losses import MultiLoss

    torch.set_num_threads(2)
    expert = Expert(backbone, pretrained=False).train()
    if checkpointing:
        expert.baseline_extractor.set_grad_checkpointing(True)
    optimizer = torch.optim.AdamW(expert.parameters(), lr=1e-4)
    images, labels = torch.randn(batch, 3, size, size), torch.tensor([i % 2 for i in range(batch)])
    before = _rss_mib()
    started = time.perf_counter()
    losses = MultiLoss()(expert, images, labels)
    losses["overall"].backward()
    optimizer.step()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"backbone": backbone, "checkpointing": checkpointing, "size": size, "batch": batch, "before_mib": before,
            "peak_mib": peak, "step_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2, help="images per step (>= 2: the NCE loss needs pairs)")
    parser.add_argument("--backbones", nargs="*", default=["convnextv2_tiny.fcmae_ft_in1k", "tf_efficientnet_b4.ns_jft_in1k",
                                                           "tf_efficientnet_b5.ns_jft_in1k", "tf_efficientnet_b6.ns_jft_in1k"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.size, args.batch, bool(args.checkpointing))))
        return
    from dfd_lib.pipeline.memory import training_memory

    print(f"peak training memory, one step of CE + NCE + KL (noisy copy of every image) at {args.size} px, "
          f"batch {args.batch}, AdamW, fp32 on the CPU")
    print(f"{'backbone':34s} {'ckpt':>5s} {'before MiB':>11s} {'peak MiB':>9s} {'per image MiB':>14s} "
          f"{'dfd check est. MiB':>19s} {'step s':>7s}")
    params = {"image_size": args.size, "batch_size": args.batch, "kl_fraction": 1.0, "kl_weight": 1.0}
    for backbone in args.backbones:
        for checkpointing in (False, True):
            estimate = training_memory(backbone, params) / 2**20  # with checkpointing: dfd check's upper bound
            done = subprocess.run([sys.executable, __file__, "--one", backbone, "--checkpointing", str(int(checkpointing)),
                                   "--size", str(args.size), "--batch", str(args.batch)],
                                  capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            per_image = (row["peak_mib"] - row["before_mib"]) / args.batch
            print(f"{backbone:34s} {'yes' if checkpointing else 'no':>5s} {row['before_mib']:11.0f} {row['peak_mib']:9.0f} "
                  f"{per_image:14.0f} {estimate:19.0f} {row['step_seconds']:7.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
