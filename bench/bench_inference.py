"""Inference speed and memory: the original procedure versus dfd-kit's Predictor.

Both score the same images with the same random weights of the full released architecture
(7 experts, 512x512), saved in the released format (weight.pth + ema.state, about 1.5 GB in
a temporary folder). Each measurement runs in its own subprocess so its peak RSS is its own.

The reference is the original procedure written faithfully: the models built and loaded the
way the release does, gradients left on, each expert's EMA parameters swapped in and out
around every forward (what torch-ema's ``average_parameters`` context does), one image at a
time, OpenCV decoding and the compat transform. The Predictor runs in each variant given.

    python bench/bench_inference.py                     # reference, the default Predictor, each backend, int8
    python bench/bench_inference.py --variants b1 b1-cl b4-cl-malloc b8-cl-malloc --no-int8

Backends (issue 16): each runtime is measured twice, each in a fresh process: first with no export
(the load converts the mixture: its time and peak RSS are conversion's), then from the cached
export. The same run measures this CPU's large-matmul rate (fp32 ``torch.mm``), so each variant's
effective GFLOP/s (the mixture's FLOPs counted by ``torch.utils.flop_counter`` / s per image) is
printed as a share of what the CPU does. int8 (NNCF, calibrated on the benchmark's photos) is
timed on the same images; its effect on the demo mixture's test AUC and TPR at 1 % FPR is
measured on ``reports/baseline/weights/moe`` (read only; exports go to the work folder),
calibrated on that run's val images (``--demo-run``). ``openvino-unrewritten`` runs the same
runtime on an export converted without :mod:`dfd_lib.scoring.export_rewrites`: what they gain.

Rounds (``--rounds``, default 3): the machine is shared and the reference's own speed moves with it
(2.3 to 4.6 s/img on the same code in different sessions), so the reference and every cached variant
are measured once per round, interleaved, each in a fresh process; the table gives each one's median
round and the ratio of the medians, and beside it the lowest and highest of the per-round ratios (each round's
variant against that round's reference). A backend's first load (conversion) is measured once.

The reference peaked at 12 GB here (22 GB in an earlier session): it waits until
``--min-free-gb`` of memory is available before each round.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))  # run as a script from a checkout, installed or not

UNREWRITTEN_EXPORTS = "unrewritten_exports"  # beside the weights folder: the openvino-unrewritten variant's export
# variant name -> Predictor options
VARIANTS: dict[str, dict] = {
    "b1": dict(batch_size=1, channels_last=False, malloc_tuning=False),
    "b1-cl": dict(batch_size=1, channels_last=True, malloc_tuning=False),
    "b1-cl-malloc": dict(batch_size=1, channels_last=True, malloc_tuning=True),
    "b4-cl": dict(batch_size=4, channels_last=True, malloc_tuning=False),
    "b4-cl-malloc": dict(batch_size=4, channels_last=True, malloc_tuning=True),
    "b8-cl-malloc": dict(batch_size=8, channels_last=True, malloc_tuning=True),
    "default": dict(),  # whatever Predictor.load does by default
    # issue 16: the converted mixture, fp32 (first load converts, later loads read the cache)
    "openvino": dict(backend="openvino", batch_size=1),
    "openvino-b4": dict(backend="openvino", batch_size=4),
    "onnxruntime": dict(backend="onnxruntime", batch_size=1),
    "openvino-int8": dict(backend="openvino", int8=True, batch_size=1),  # needs the int8 export (made first)
    # the export as converted before export_rewrites (same fp32 runtime and settings): what the rewrites gain
    "openvino-unrewritten": dict(backend="openvino", batch_size=1, export_dir=UNREWRITTEN_EXPORTS),
}
DEFAULT_VARIANTS = ("default", "openvino", "openvino-unrewritten", "onnxruntime")
BACKEND_FORMAT = {"openvino": "openvino", "onnxruntime": "onnx"}
MATMUL_SIDE = 4096


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


def cpu_seconds() -> float:
    """This process's CPU time (all threads): unlike wall time, hardly changed by other jobs
    sharing the cores, so ratios of it hold on a busy machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def current_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


# --------------------------------------------------------------------------- setup (child)


def make_weights(directory: Path, seed: int) -> None:
    import torch

    from dfd_lib.models.experts import ORIGINAL_BACKBONES, build_mixture
    from dfd_lib.models.released import save_released

    torch.manual_seed(seed)
    model = build_mixture(ORIGINAL_BACKBONES)
    with torch.no_grad():
        for name, buffer in model.named_buffers():  # trained-looking BatchNorm statistics
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buffer.normal_(0, 0.05)
        for expert in model.experts:  # small random logits: probabilities far from 0 and 1
            expert.baseline_extractor.get_classifier().weight.mul_(0.05)
        shadow = [[p * (1 + 0.01 * torch.randn_like(p)) for p in e.parameters()] for e in model.experts]
    save_released(model, directory, shadow, decay=0.995, num_updates=10_000)


def make_images(directory: Path) -> list[str]:
    """Eight demo-like photos from scikit-image, 128 to 640 px, JPEG and PNG."""
    from PIL import Image
    from skimage import data as skdata

    directory.mkdir(parents=True, exist_ok=True)
    photos = {"astronaut": skdata.astronaut(), "chelsea": skdata.chelsea(), "coffee": skdata.coffee(),
              "rocket": skdata.rocket()}
    paths = []
    for name, pixels in photos.items():
        image = Image.fromarray(pixels)
        paths.append(directory / f"{name}.jpg")
        image.save(paths[-1], quality=90)
        small = image.resize((max(128, image.width // 3), max(128, image.height // 3)))
        paths.append(directory / f"{name}_small.png")
        small.save(paths[-1])
    return [str(p) for p in paths]


# --------------------------------------------------------------------------- the original (child)


class _SwappedEMA:
    """torch-ema's ExponentialMovingAverage as the release used it at inference: shadow
    parameters held apart and swapped into the model around each forward."""

    def __init__(self, parameters, shadow_params):
        self.parameters = list(parameters)
        self.shadow_params = [s.clone() for s in shadow_params]
        self.collected_params = None

    @contextlib.contextmanager
    def average_parameters(self):
        self.collected_params = [p.clone() for p in self.parameters]  # store()
        for s, p in zip(self.shadow_params, self.parameters):  # copy_to()
            p.data.copy_(s.data)
        try:
            yield
        finally:
            for c, p in zip(self.collected_params, self.parameters):  # restore()
                p.data.copy_(c.data)
            self.collected_params = None


def run_reference(weights: Path, images: list[str], warmup: int) -> dict:
    import cv2
    import timm
    import torch
    from torch import nn
    from torchvision import transforms

    from dfd_lib.models.experts import ORIGINAL_BACKBONES

    class Expert(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.baseline_extractor = timm.create_model(name, pretrained=False, num_classes=2)

        def forward(self, x):
            return self.baseline_extractor(x)

    started = time.perf_counter()
    model = nn.ModuleList([Expert(name) for name in ORIGINAL_BACKBONES])
    model.load_state_dict(torch.load(weights / "weight.pth", map_location="cpu", weights_only=True))
    ema_state = torch.load(weights / "ema.state", map_location="cpu", weights_only=True)
    emas = [_SwappedEMA(expert.parameters(), ema_state[i]["shadow_params"]) for i, expert in enumerate(model)]
    model.eval()
    load_s = time.perf_counter() - started
    rss_after_load = current_rss_gb()
    transform = transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        transforms.Resize((512, 512), antialias=True),
    ])

    def score(path: str) -> float:
        image = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
        x = transform(image).unsqueeze(0)
        probs = []
        for expert, ema in zip(model, emas):
            with ema.average_parameters():
                probs.append(torch.softmax(expert(x), dim=1)[:, 1])
        # the per-expert outputs (and with them every expert's autograd graph) live until the mean
        return torch.stack(probs).mean().item()

    for path in images[:warmup]:
        score(path)
    started, cpu = time.perf_counter(), cpu_seconds()
    probs = [score(path) for path in images]
    elapsed = time.perf_counter() - started
    return dict(probs=probs, seconds=elapsed, cpu_s=cpu_seconds() - cpu, load_s=load_s, rss_after_load_gb=rss_after_load)


def run_predictor(weights: Path, images: list[str], warmup: int, options: dict) -> dict:
    import torch

    from dfd_lib.scoring.predictor import Predictor

    backend = options.get("backend", "torch")
    if options.get("export_dir"):
        options = {**options, "export_dir": weights.parent / options["export_dir"]}
    exported = backend != "torch" and any((weights / "exports").glob(f"{BACKEND_FORMAT[backend]}-fp32-*/export.json"))
    started = time.perf_counter()
    predictor = Predictor.load(weights, preprocess="compat", **options)
    load_s = time.perf_counter() - started
    rss_after_load = current_rss_gb()
    if warmup:
        predictor.predict(images[: max(warmup, predictor.batch_size)])
    started, cpu = time.perf_counter(), cpu_seconds()
    predictions = predictor.predict(images)
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds() - cpu
    errors = [p.error for p in predictions if not p.ok]
    if errors:
        raise RuntimeError(f"predictor could not score: {errors}")
    return dict(probs=[p.prob for p in predictions], seconds=elapsed, cpu_s=cpu, load_s=load_s, rss_after_load_gb=rss_after_load,
                batch_size=predictor.batch_size, channels_last=predictor.channels_last, threads=torch.get_num_threads(),
                converted=backend != "torch" and not exported and not options.get("int8"))


def run_matmul(side: int = MATMUL_SIDE, repeats: int = 5) -> dict:
    """This CPU's fp32 large-matmul rate (torch's threads), and the mixture's FLOPs per 512 px image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dfd_lib.models.checkpoints import build_on_meta
    from dfd_lib.models.experts import ORIGINAL_BACKBONES

    a, b = torch.randn(side, side), torch.randn(side, side)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # shapes only: on the meta device
        build_on_meta(ORIGINAL_BACKBONES).eval()(torch.zeros(1, 3, 512, 512, device="meta"))
    return dict(matmul_gflops=2 * side**3 / best / 1e9, mixture_gflop_per_image=counter.get_total_flops() / 1e9,
                threads=torch.get_num_threads(), probs=[], seconds=best, load_s=0.0, rss_after_load_gb=current_rss_gb())


def run_unrewritten_export(weights: Path) -> dict:
    """The fp32 OpenVINO export converted without :mod:`~dfd_lib.scoring.export_rewrites` (into
    ``UNREWRITTEN_EXPORTS`` beside the weights; one made earlier in ``--workdir`` is reused)."""
    from dfd_lib.scoring import export

    export.rewrite_verified = lambda *args, **kwargs: {}
    started = time.perf_counter()
    made = export.ensure_export(weights, "openvino", out=weights.parent / UNREWRITTEN_EXPORTS)
    return dict(probs=[], seconds=time.perf_counter() - started, load_s=0.0, rss_after_load_gb=current_rss_gb(),
                reused=not made.converted)


def run_int8_export(weights: Path, images: list[str]) -> dict:
    """The int8 OpenVINO export, calibrated on the benchmark's photos (the fp32 export exists by
    then); one a previous run left in ``--workdir`` for the same weights and photos is reused."""
    from dfd_lib.scoring.quantize import ensure_int8_export

    started = time.perf_counter()
    export = ensure_int8_export(weights, images, limit=len(images))
    return dict(probs=[], seconds=time.perf_counter() - started, load_s=0.0, rss_after_load_gb=current_rss_gb(),
                calibration_images=export.meta["calibration_images"], reused=not export.converted,
                quantize_s=export.meta["seconds"])


def run_int8_demo(demo_run: Path, out: Path) -> dict:
    """int8 on the demo mixture: test AUC / TPR@1 % of torch, OpenVINO fp32 and int8 (val-calibrated)."""
    import pandas as pd

    from dfd_lib.scoring.predictor import Predictor
    from dfd_lib.scoring.quantize import ensure_int8_export
    from dfd_lib.stats.metrics import binary_metrics, tpr_key

    weights = demo_run / "weights" / "moe"
    manifest = pd.read_csv(demo_run / "manifest.csv")
    test, val = manifest[manifest["split"] == "test"], manifest[manifest["split"] == "val"]
    quantize_s = ensure_int8_export(weights, list(val["path"]), out=out, limit=300).meta["seconds"]  # reused from --workdir
    scores, timing = {}, {}
    for name, options in {"torch": {}, "openvino": dict(backend="openvino", export_dir=out),
                          "openvino-int8": dict(backend="openvino", int8=True, export_dir=out)}.items():
        predictor = Predictor.load(weights, batch_size=1, malloc_tuning=False, **options)
        predictor.predict(list(test["path"][:2]))
        started = time.perf_counter()
        predictions = predictor.predict(list(test["path"]))
        timing[name] = (time.perf_counter() - started) / len(test)
        scores[name] = [p.prob for p in predictions]
    labels = list(test["label"])
    metrics = {name: binary_metrics(labels, s) for name, s in scores.items()}
    diff = {name: max(abs(a - b) for a, b in zip(s, scores["torch"])) for name, s in scores.items()}
    return dict(probs=[], seconds=0.0, load_s=0.0, rss_after_load_gb=current_rss_gb(), quantize_s=quantize_s,
                n_test=len(test), n_calibration=min(300, len(val)), s_per_img=timing, max_dp=diff,
                auc={k: m["auc"] for k, m in metrics.items()}, tpr_1pct={k: m[tpr_key(0.01)] for k, m in metrics.items()})


def child_main(args: argparse.Namespace) -> int:
    weights, images = Path(args.weights), json.loads(args.images)
    if args.child == "make-weights":
        make_weights(weights, args.seed)
        result = {}
    elif args.child == "reference":
        result = run_reference(weights, images, args.warmup)
    elif args.child == "matmul":
        result = run_matmul()
    elif args.child == "unrewritten-export":
        result = run_unrewritten_export(weights)
    elif args.child == "int8-export":
        result = run_int8_export(weights, images)
    elif args.child == "int8-demo":
        result = run_int8_demo(weights, Path(args.out_dir))
    else:
        result = run_predictor(weights, images, args.warmup, VARIANTS[args.child])
    result["peak_rss_gb"] = peak_rss_gb()
    result["load_avg"] = os.getloadavg()[0]  # other people's jobs on the same cores, at the end of this measurement
    print("RESULT " + json.dumps(result))
    return 0


# --------------------------------------------------------------------------- orchestration (parent)


def run_child(kind: str, weights: Path, images: list[str], args: argparse.Namespace, env: dict | None = None,
              out_dir: Path | None = None) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--weights", str(weights), "--images", json.dumps(images),
               "--warmup", str(args.warmup), "--seed", str(args.seed), "--out-dir", str(out_dir or "")]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def wait_for_memory(min_free_gb: float, retries: int, pause_s: float) -> None:
    for attempt in range(retries + 1):
        free = available_gb()
        if free >= min_free_gb:
            return
        print(f"only {free:.1f} GB available, the reference needs {min_free_gb} GB; waiting {pause_s:.0f} s "
              f"({attempt + 1}/{retries})", flush=True)
        time.sleep(pause_s)
    raise SystemExit(f"not enough free memory for the reference ({available_gb():.1f} GB < {min_free_gb} GB)")


def measure_first_loads(weights: Path, images: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """Each backend's first load, with no export (the load converts): once, before the rounds."""
    results: dict[str, dict] = {}
    for variant in args.variants:
        backend = VARIANTS[variant].get("backend")
        if VARIANTS[variant].get("export_dir"):  # reads an export made for it (openvino-unrewritten)
            continue
        if backend and not any(name.startswith(f"{backend} ") for name in results):  # first use of this backend
            for stale in (weights / "exports").glob(f"{BACKEND_FORMAT[backend]}-fp32-*"):
                shutil.rmtree(stale)
            name = f"{variant} (first load: converts)"
            results[name] = run_child(variant, weights, images, args)
            print(f"{name} done: {json.dumps(results[name])}", flush=True)
    return results


def measure_rounds(weights: Path, images: list[str], args: argparse.Namespace, variants: list[str]) -> dict[str, list[dict]]:
    """The reference (unless ``--no-reference``) and each of ``variants``, once per round, interleaved,
    each in a fresh process: ``{name: [round 1, round 2, ...]}``."""
    rounds: dict[str, list[dict]] = {}
    for number in range(1, args.rounds + 1):
        if not args.no_reference:  # it waits for memory other people's jobs may be holding
            wait_for_memory(args.min_free_gb, retries=20, pause_s=60)
            rounds.setdefault("reference", []).append(run_child("reference", weights, images, args))
        for variant in variants:
            rounds.setdefault(variant, []).append(run_child(variant, weights, images, args))
        summary = ", ".join(f"{name} {runs[-1]['seconds'] / len(runs[-1]['probs']):.2f}" for name, runs in rounds.items())
        print(f"round {number}/{args.rounds} (s/img): {summary}; load average {os.getloadavg()[0]:.1f}", flush=True)
    return rounds


def combine_rounds(rounds: dict[str, list[dict]]) -> dict[str, dict]:
    """One row per variant: the median round's figures (by s/img; the lower middle one for an even
    number of rounds), the median CPU time, peak RSS the highest of all rounds, the per-round s/img and, against the same
    round's reference, the per-round ratios."""
    reference = rounds.get("reference")
    combined = {}
    for name, runs in rounds.items():
        row = dict(sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2])
        row["cpu_s"] = statistics.median(r["cpu_s"] for r in runs)  # the CPU time's own median
        row["peak_rss_gb"] = max(r["peak_rss_gb"] for r in runs)
        row["round_s_per_img"] = [r["seconds"] / len(r["probs"]) for r in runs]
        if reference:
            row["round_ratios"] = [ref["seconds"] / r["seconds"] for ref, r in zip(reference, runs)]
        combined[name] = row
    return combined


def print_table(results: dict[str, dict], rates: dict) -> None:
    """s/img (wall) and CPU s/img (all threads: what matters on a shared machine), both as a ratio
    to the original procedure, largest probability change, load, memory, effective GFLOP/s."""
    reference, torch_default = results.get("reference"), results.get("default")
    nan = float("nan")
    header = (f"{'variant':<34}{'s/img':>7}{'x ref':>7}{'rounds x ref':>13}{'cpu s/img':>10}{'x ref':>6}{'max|dp| ref':>12}"
              f"{'vs torch':>10}{'load s':>8}{'RSS load':>9}{'peak RSS':>9}{'GFLOP/s':>8}{'% mm':>6}{'loadavg':>8}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        per_image, cpu_per_image = r["seconds"] / len(r["probs"]), r["cpu_s"] / len(r["probs"])
        ratio = reference["seconds"] / r["seconds"] if reference else nan
        cpu_ratio = reference["cpu_s"] / r["cpu_s"] if reference else nan
        diff = max(abs(a - b) for a, b in zip(r["probs"], reference["probs"])) if reference else nan
        vs_torch = max(abs(a - b) for a, b in zip(r["probs"], torch_default["probs"])) if torch_default else nan
        gflops = rates["mixture_gflop_per_image"] / per_image
        share = 100 * gflops / rates["matmul_gflops"]
        spread = f"{min(r['round_ratios']):.2f}-{max(r['round_ratios']):.2f}" if r.get("round_ratios") else "-"
        print(f"{name:<34}{per_image:>7.2f}{ratio:>7.2f}{spread:>13}{cpu_per_image:>10.2f}{cpu_ratio:>6.2f}{diff:>12.1e}{vs_torch:>10.1e}"
              f"{r['load_s']:>8.1f}{r['rss_after_load_gb']:>8.2f}G{r['peak_rss_gb']:>8.2f}G{gflops:>8.0f}{share:>6.0f}"
              f"{r.get('load_avg', nan):>8.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=[v for v in VARIANTS if "int8" not in v],
                        help=f"Predictor variants to measure (default: {' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--env-variant", action="store_true",
                        help="also measure the default Predictor with GLIBC_TUNABLES set at process start")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow, ~12 GB) original procedure")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure the reference and each variant this many times, interleaved; medians reported (default: 3)")
    parser.add_argument("--no-int8", action="store_true", help="skip int8 (its export, speed and the demo mixture's metrics)")
    parser.add_argument("--demo-run", type=Path, default=PROJECT_ROOT / "reports" / "baseline",
                        help="a finished run whose weights/moe and manifest the int8 accuracy check reads (read only)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed images scored first in each process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=8, help="how many of the 8 photos to score (default: 8)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep weights and images here (default: a temp dir)")
    parser.add_argument("--min-free-gb", type=float, default=14.0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--images", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)

    with tempfile.TemporaryDirectory(prefix="dfd_bench_") as tmp:
        work = args.workdir or Path(tmp)
        weights, images = work / "released", make_images(work / "images")[: args.num_images]
        if not (weights / "ema.state").is_file():
            started = time.perf_counter()
            run_child("make-weights", weights, images, args)
            print(f"wrote random weights in the released format to {weights} in {time.perf_counter() - started:.0f} s")
        size_gb = sum(f.stat().st_size for f in weights.iterdir() if f.is_file()) / 1024**3
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; weights {size_gb:.2f} GB; "
              f"{len(images)} images; 7 experts at 512x512; load average {os.getloadavg()[0]:.1f}", flush=True)

        rates = run_child("matmul", weights, images, args)
        print(f"fp32 matmul {MATMUL_SIDE}x{MATMUL_SIDE}: {rates['matmul_gflops']:.0f} GFLOP/s ({rates['threads']} threads); "
              f"mixture {rates['mixture_gflop_per_image']:.1f} GFLOP per image", flush=True)
        first_loads = measure_first_loads(weights, images, args)
        variants = list(args.variants)
        if "openvino-unrewritten" in variants:
            made = run_child("unrewritten-export", weights, images, args)
            print(f"openvino export without the rewrites {'reused' if made['reused'] else 'made'} in {made['seconds']:.0f} s", flush=True)
        demo = None
        if not args.no_int8:
            calibrated = run_child("int8-export", weights, images, args)
            reused = " (made by an earlier run in --workdir)" if calibrated["reused"] else ""
            print(f"int8 export calibrated on {calibrated['calibration_images']} images in {calibrated['quantize_s']:.0f} s{reused} "
                  f"(peak RSS {calibrated['peak_rss_gb']:.2f} GB)", flush=True)
            variants.append("openvino-int8")
        measured = combine_rounds(measure_rounds(weights, images, args, variants))
        results = {"reference": measured["reference"]} if "reference" in measured else {}
        for variant in variants:  # a backend's first load (converting) just above its cached rows
            results.update({name: row for name, row in first_loads.items() if name.startswith(f"{variant} (")})
            results[variant] = measured[variant]
        if args.env_variant:
            tunables = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000"
            results["b4-cl+GLIBC_TUNABLES"] = run_child("b4-cl", weights, images, args, {"GLIBC_TUNABLES": tunables})
            print("b4-cl+GLIBC_TUNABLES done", flush=True)
        if not args.no_int8:
            demo = run_child("int8-demo", args.demo_run, [], args, out_dir=work / "demo_exports")
            print(f"int8 on the demo mixture done: {json.dumps(demo)}", flush=True)
        again = run_child("matmul", weights, images, args)  # the machine is shared: the better of two measurements
        print(f"fp32 matmul at the end: {again['matmul_gflops']:.0f} GFLOP/s; load average {os.getloadavg()[0]:.1f}")
        rates["matmul_gflops_start"], rates["matmul_gflops_end"] = rates["matmul_gflops"], again["matmul_gflops"]
        rates["matmul_gflops"] = max(rates["matmul_gflops"], again["matmul_gflops"])

    print()
    print_table(results, rates)
    if demo:
        print(f"\nint8 on the demo mixture ({demo['n_test']} test images, calibrated on {demo['n_calibration']} val images "
              f"in {demo['quantize_s']:.0f} s):")
        for name in demo["auc"]:
            print(f"  {name:<14} AUC {demo['auc'][name]:.4f}  TPR@1% {demo['tpr_1pct'][name]:.4f}  "
                  f"max|dp| vs torch {demo['max_dp'][name]:.1e}  {demo['s_per_img'][name] * 1000:.1f} ms/img")
    if "reference" in results:
        print("\nprobabilities (reference):", " ".join(f"{p:.6f}" for p in results["reference"]["probs"]))
    print(json.dumps({"rates": rates, "results": results, "demo_int8": demo}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
