"""Notebook 04's evaluation, the old way and the new way, side by side in one run (issue 24, item 1).

The case, built without downloads in a work folder: the demo dataset (``--images``, the kit's own
generators), 14 ``tf_efficientnet_lite0`` models at 128 px (the packaged ImageNet weights, each head
drawn with its own seed): 8 experts, the official-split model, 3 loss-ablation variants and 2 ladder
models, and the experts saved as the mixture ``weights/moe``. Half of the images are the test split,
the other half the selection rows (the calibration's). The evaluation is notebook 04's:

1. headline: the official-split model and the 8 experts on the test images (the mixture: their mean);
2. calibration: the saved mixture on the selection rows;
3. loss ablation: 4 variants on the test images, one of them expert 0 (reused from (b));
4. ladder: the models the headline did not score (2 official-split CE-only models, the ablation's CE only);
5. robustness: the saved mixture on ``--robust`` test images, unchanged and under 6 degradations.

**old**: the code as it was: each table through the torch Predictor (``Predictor`` / ``Predictor.load``,
batch ``--batch``), nothing reused, at ``--old-threads`` torch threads (1: the demo profile's ``threads``,
which the trainings leave set when the notebook reaches its evaluation). **new**: the library as it is
now (:mod:`dfd_lib.scoring.expert_scores`): each (expert, input) once per process, at ``--new-threads``
(default: the old way's), on each engine given: torch (batch norms folded, channels_last), and ``auto``,
the library's default: first with no OpenVINO export (it converts the experts that have at least
``--convert-min`` images to score in one call, its conversions counted in its time), then as a rerun of
the notebook finds them (the exports cached, every expert that has one on OpenVINO, the others on torch).
Each engine runs with one expert forwarded at a time on torch's threads (``:1``) and with the library's choice
(as many torch experts at once as the cores hold at torch's thread count, and OpenVINO on that many threads:
2 on this 2-core CPU at 1 thread).
Every new way starts with an empty score cache. Printed: seconds per stage, img/s (the tables' images over the wall time; "expert-img/s"
counts each model on each image the tables need), the ratio to the old way, the max |score difference|
against the old way over every score of every table, the forward passes actually computed, and the FLOP
rate (FLOPs of one lite0 at 128 px, counted once by ``torch.utils.flop_counter``, times expert-img/s).

    python bench/bench_eval04.py                       # 400 images, 50 robustness images
    python bench/bench_eval04.py --images 600 --robust 100 --workdir /tmp/eval04
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from timm.data import resolve_model_data_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from dfd_lib.evaluation import comparison  # noqa: E402
from dfd_lib.evaluation.robustness import mixture_predict_fn, robustness_table, stratified_sample  # noqa: E402
from dfd_lib.models.checkpoints import mixture_from_experts, save_expert_weights, save_mixture  # noqa: E402
from dfd_lib.models.experts import Expert  # noqa: E402
from dfd_lib.scoring import expert_scores  # noqa: E402
from dfd_lib.scoring.mixture_calibration import with_mixture_scores  # noqa: E402
from dfd_lib.scoring.predictor import Predictor  # noqa: E402
from dfd_lib.sources.demo import DemoConfig, build_demo_dataset  # noqa: E402

BACKBONE, SIZE = "tf_efficientnet_lite0", 128
LEVELS = {"jpeg": [80, 50], "resize": [0.5, 0.25], "blur": [1.0, 2.0]}  # the demo profile's
MODELS = ["official", *(f"expert{i}" for i in range(8)), "abl_ce", "abl_ce_nce", "abl_ce_kl", "ladder_r1", "ladder_r2"]


def expert_file(folder: Path, seed: int) -> Path:
    path = folder / "best_ema.safetensors"
    if not path.is_file():
        torch.manual_seed(seed)
        expert = Expert(BACKBONE, pretrained=True)
        with torch.no_grad():
            for param in expert.baseline_extractor.get_classifier().parameters():
                param.normal_(0, 0.05)
        data = resolve_model_data_config(expert.baseline_extractor)  # as the trainer records it
        save_expert_weights(path, expert, {"image_size": SIZE, "mean": list(data["mean"]), "std": list(data["std"])})
    return path


def build_case(workdir: Path, images: int, robust: int) -> dict:
    data = workdir / f"demo_{images}"
    if not (data / "manifest.csv").is_file():
        build_demo_dataset(DemoConfig(n_images=images), data, progress=False)
    table = pd.read_csv(data / "manifest.csv")
    table["path"] = [str(data / p) for p in table["path"]]
    table = table.sample(frac=1.0, random_state=0).reset_index(drop=True)
    test, selection = table.iloc[: len(table) // 2].reset_index(drop=True), table.iloc[len(table) // 2 :]
    files = {name: expert_file(workdir / "models" / name, seed) for seed, name in enumerate(MODELS)}
    moe = workdir / "moe"
    if not (moe / "model.safetensors").is_file():
        model, config = mixture_from_experts([files[f"expert{i}"] for i in range(8)])
        save_mixture(model, moe, config)
    experts = {f"expert {i}": files[f"expert{i}"] for i in range(8)}
    return {"test": test, "selection": selection.reset_index(drop=True), "moe": moe,
            "headline": {"official": files["official"], **experts},
            "ablation": {"CE only": files["abl_ce"], "CE + NCE": files["abl_ce_nce"], "CE + KL": files["abl_ce_kl"],
                         "CE + NCE + KL": files["expert0"]},
            "ladder": {"rung 1": files["ladder_r1"], "rung 2": files["ladder_r2"], "rung 3": files["abl_ce"]},
            "robust": stratified_sample(test, robust, 0)}


def stage_work(case: dict) -> dict[str, tuple[int, int]]:
    """Stage -> (images, expert-images) the tables need."""
    n, robust = len(case["test"]), len(case["robust"]) * (1 + sum(len(v) for v in LEVELS.values()))
    return {"headline": (n, n * 9), "calibration": (len(case["selection"]), len(case["selection"]) * 8),
            "ablation": (n, n * 4), "ladder": (n, n * 3), "robustness": (robust, robust * 8)}


def _robustness(predict, case: dict, batch: int) -> np.ndarray:
    seen: list[float] = []

    def recorded(images):
        scores = list(predict(images))
        seen.extend(scores)
        return scores

    robustness_table(recorded, list(case["robust"]["path"]), case["robust"]["label"].astype(int).tolist(), LEVELS,
                     batch_size=batch)
    return np.array(seen)


def old_way(case: dict, batch: int) -> tuple[dict, dict]:
    """The code path as it was: every table through the torch Predictor, nothing reused."""
    timed, out = {}, {}
    for stage in ("headline", "ablation", "ladder"):
        started = time.perf_counter()
        out[stage] = comparison.score_experts_predictor(case[stage], case["test"], batch, "cpu", False).to_numpy()
        timed[stage] = time.perf_counter() - started
    started = time.perf_counter()
    predictor = Predictor.load(case["moe"], device="cpu", batch_size=batch, malloc_tuning=False)
    out["calibration"] = np.array([p.prob for p in predictor.predict(list(case["selection"]["path"]))])
    timed["calibration"] = time.perf_counter() - started
    started = time.perf_counter()
    predictor = Predictor.load(case["moe"], device="cpu", batch_size=batch, malloc_tuning=False)
    out["robustness"] = _robustness(lambda images: [p.prob if p.ok else 0.5 for p in predictor.predict(images)], case, batch)
    timed["robustness"] = time.perf_counter() - started
    return timed, out


def new_way(case: dict, batch: int, engine: str) -> tuple[dict, dict, int]:
    """The library as it is now, from an empty score cache; returns the forward passes it computed too."""
    expert_scores.SHARED.clear()
    expert_scores._RUNNERS.clear()
    expert_scores._file_expert.cache_clear()
    os.environ[expert_scores.BACKEND_ENV] = engine
    timed, out = {}, {}
    for stage in ("headline", "calibration", "ablation", "ladder", "robustness"):
        started = time.perf_counter()
        if stage == "calibration":
            out[stage] = with_mixture_scores(case["selection"], case["moe"], batch, False)["prob_fake"].to_numpy()
        elif stage == "robustness":
            out[stage] = _robustness(mixture_predict_fn(case["moe"], "cpu", batch)[0], case, batch)
        else:
            out[stage] = comparison.score_experts(case[stage], case["test"], batch, "cpu", False).to_numpy()
        timed[stage] = time.perf_counter() - started
    return timed, out, sum(expert_scores.SHARED.computed.values())


def lite0_flops() -> int:
    from torch.utils.flop_counter import FlopCounterMode  # deferred: only the benchmark counts FLOPs

    expert = Expert(BACKBONE).eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        expert(torch.zeros(1, 3, SIZE, SIZE))
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="demo images: half test, half selection rows")
    parser.add_argument("--robust", type=int, default=50, help="test images of the robustness table")
    parser.add_argument("--batch", type=int, default=64, help="eval_batch_size (the notebook's default)")
    parser.add_argument("--old-threads", type=int, default=1, help="torch threads of the old way (the demo profile's)")
    parser.add_argument("--new-threads", type=int, default=0, help="torch (and OpenVINO) threads of the new ways, 0: the old way's")
    parser.add_argument("--engines", nargs="*", default=["torch:1", "torch", "auto:1", "auto:1", "auto"],
                        help="new ways, in order: torch, openvino or auto (the library's default), each optionally with "
                             ":N, N experts forwarded at once (default: the library's choice, the cores over torch's "
                             "threads); the first run with OpenVINO converts the exports, later ones find them cached "
                             "(a rerun of the notebook)")
    parser.add_argument("--convert-min", type=int, default=100,
                        help="auto converts an expert for OpenVINO from this many images in one call (the library's "
                             "is 1000: at this case's 200-image calls nothing would convert; at 100 all 14 models do, "
                             "the first run's worst case, where the demo profile converts only the mixture's 8 experts)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_eval04_"))
    os.environ["XDG_CACHE_HOME"] = str(workdir / "cache")  # the OpenVINO exports: converted in this run
    shutil.rmtree(workdir / "cache", ignore_errors=True)
    expert_scores.CONVERT_MIN_IMAGES = args.convert_min
    case = build_case(workdir, args.images, args.robust)
    work = stage_work(case)
    flops = lite0_flops()
    print(f"case: {len(case['test'])} test images, {len(case['selection'])} selection rows, {len(case['robust'])} robustness "
          f"images x 7 settings; 14 x {BACKBONE} at {SIZE} px ({flops / 1e9:.3f} GFLOP per image); {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.1f}")
    torch.set_num_threads(args.old_threads)
    old_times, old_scores = old_way(case, args.batch)
    rows = [(f"old (torch Predictor, {args.old_threads} thread(s))", old_times, 0.0, sum(e for _, e in work.values()))]
    torch.set_num_threads(args.new_threads or args.old_threads)
    seen_openvino = False
    for spec in args.engines:
        engine, _, at_once = spec.partition(":")
        os.environ.pop(expert_scores.AT_ONCE_ENV, None)
        if at_once:
            os.environ[expert_scores.AT_ONCE_ENV] = at_once
        label = (f"new ({torch.get_num_threads()} thread(s), {expert_scores.experts_at_once(8)} torch expert(s) at once, "
                 f"OpenVINO on {expert_scores.openvino_threads()}, {engine}") + (
            ")" if engine == "torch" else ", exports cached)" if seen_openvino else ", exports converted in the run)")
        seen_openvino |= engine != "torch"
        times, scores, computed = new_way(case, args.batch, engine)
        diffs = {s: float(np.nanmax(np.abs(scores[s] - old_scores[s]))) for s in scores}
        print(f"{label}: max |Δp| vs old per stage: " + ", ".join(f"{s} {d:.1e}" for s, d in diffs.items()))
        rows.append((label, times, max(diffs.values()), computed))
    report(rows, work, flops)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


def report(rows: list, work: dict, flops: int) -> None:
    images = sum(i for i, _ in work.values())
    expert_images = sum(e for _, e in work.values())
    stages = list(work)
    print(f"\nwork: {images} table images, {expert_images} expert-images ({', '.join(f'{s} {e}' for s, (_, e) in work.items())})")
    print("| way | " + " | ".join(f"{s} s" for s in stages) + " | total s | img/s | expert-img/s | x old | max |Δp| vs old "
          "| forwards computed | GFLOP/s |")
    print("|---|" + "---:|" * (len(stages) + 8))
    old_total = sum(rows[0][1].values())
    for label, times, diff, computed in rows:
        total = sum(times.values())
        rate = expert_images / total
        print(f"| {label} | " + " | ".join(f"{times[s]:.1f}" for s in stages) + f" | {total:.1f} | {images / total:.1f} | "
              f"{rate:.1f} | {old_total / total:.2f} | {diff:.1e} | {computed} | {rate * flops / 1e9:.1f} |")


if __name__ == "__main__":
    main()
