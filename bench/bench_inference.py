"""Inference speed and memory: the original procedure versus dfd-kit's Predictor.

Both score the same images with the same random weights of the full released architecture
(7 experts, 512x512), saved in the released format (weight.pth + ema.state, about 1.5 GB in
a temporary folder). Each measurement runs in its own subprocess so its peak RSS is its own.

The reference is the original procedure written faithfully: the models built and loaded the
way the release does, gradients left on, each expert's EMA parameters swapped in and out
around every forward (what torch-ema's ``average_parameters`` context does), one image at a
time, OpenCV decoding and the compat transform. The Predictor runs in each variant given.

    python bench/bench_inference.py                     # reference + the default Predictor
    python bench/bench_inference.py --variants b1 b1-cl b4-cl-malloc b8-cl-malloc

The reference peaked at 12 GB here (22 GB in an earlier session): it waits until
``--min-free-gb`` of memory is available and runs last.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))  # run as a script from a checkout, installed or not

# variant name -> Predictor options
VARIANTS: dict[str, dict] = {
    "b1": dict(batch_size=1, channels_last=False, malloc_tuning=False),
    "b1-cl": dict(batch_size=1, channels_last=True, malloc_tuning=False),
    "b1-cl-malloc": dict(batch_size=1, channels_last=True, malloc_tuning=True),
    "b4-cl": dict(batch_size=4, channels_last=True, malloc_tuning=False),
    "b4-cl-malloc": dict(batch_size=4, channels_last=True, malloc_tuning=True),
    "b8-cl-malloc": dict(batch_size=8, channels_last=True, malloc_tuning=True),
    "default": dict(),  # whatever Predictor.load does by default
}
DEFAULT_VARIANTS = ("default",)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


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

    from dfd_lib.modeling.experts import ORIGINAL_BACKBONES, build_mixture
    from dfd_lib.modeling.released import save_released

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

    from dfd_lib.modeling.experts import ORIGINAL_BACKBONES

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
    started = time.perf_counter()
    probs = [score(path) for path in images]
    elapsed = time.perf_counter() - started
    return dict(probs=probs, seconds=elapsed, load_s=load_s, rss_after_load_gb=rss_after_load)


def run_predictor(weights: Path, images: list[str], warmup: int, options: dict) -> dict:
    import torch

    from dfd_lib.scoring.predictor import Predictor

    started = time.perf_counter()
    predictor = Predictor.load(weights, preprocess="compat", **options)
    load_s = time.perf_counter() - started
    rss_after_load = current_rss_gb()
    if warmup:
        predictor.predict(images[: max(warmup, predictor.batch_size)])
    started = time.perf_counter()
    predictions = predictor.predict(images)
    elapsed = time.perf_counter() - started
    errors = [p.error for p in predictions if not p.ok]
    if errors:
        raise RuntimeError(f"predictor could not score: {errors}")
    return dict(probs=[p.prob for p in predictions], seconds=elapsed, load_s=load_s, rss_after_load_gb=rss_after_load,
                batch_size=predictor.batch_size, channels_last=predictor.channels_last, threads=torch.get_num_threads())


def child_main(args: argparse.Namespace) -> int:
    weights, images = Path(args.weights), json.loads(args.images)
    if args.child == "make-weights":
        make_weights(weights, args.seed)
        result = {}
    elif args.child == "reference":
        result = run_reference(weights, images, args.warmup)
    else:
        result = run_predictor(weights, images, args.warmup, VARIANTS[args.child])
    result["peak_rss_gb"] = peak_rss_gb()
    print("RESULT " + json.dumps(result))
    return 0


# --------------------------------------------------------------------------- orchestration (parent)


def run_child(kind: str, weights: Path, images: list[str], args: argparse.Namespace, env: dict | None = None) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--weights", str(weights), "--images", json.dumps(images),
               "--warmup", str(args.warmup), "--seed", str(args.seed)]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                        help="Predictor variants to measure (default: default)")
    parser.add_argument("--env-variant", action="store_true",
                        help="also measure the default Predictor with GLIBC_TUNABLES set at process start")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow, ~22 GB) original procedure")
    parser.add_argument("--warmup", type=int, default=1, help="untimed images scored first in each process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=8, help="how many of the 8 photos to score (default: 8)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep weights and images here (default: a temp dir)")
    parser.add_argument("--min-free-gb", type=float, default=21.0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--images", default="[]", help=argparse.SUPPRESS)
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
        size_gb = sum(f.stat().st_size for f in weights.iterdir()) / 1024**3
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; weights {size_gb:.2f} GB; "
              f"{len(images)} images; 7 experts at 512x512", flush=True)

        results: dict[str, dict] = {}
        for variant in args.variants:
            results[variant] = run_child(variant, weights, images, args)
            print(f"{variant} done: {json.dumps(results[variant])}", flush=True)
        if args.env_variant:
            tunables = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000"
            results["b4-cl+GLIBC_TUNABLES"] = run_child("b4-cl", weights, images, args, {"GLIBC_TUNABLES": tunables})
            print("b4-cl+GLIBC_TUNABLES done", flush=True)
        if not args.no_reference:  # last: it waits for memory other people's jobs may be holding
            wait_for_memory(args.min_free_gb, retries=20, pause_s=60)
            results = {"reference": run_child("reference", weights, images, args), **results}

    print()
    reference = results.get("reference")
    header = f"{'variant':<26}{'s/img':>8}{'img/s':>8}{'x ref':>8}{'max|dp|':>10}{'load s':>8}{'RSS load':>9}{'peak RSS':>9}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        per_image = r["seconds"] / len(r["probs"])
        ratio = reference["seconds"] / r["seconds"] if reference else float("nan")
        diff = max(abs(a - b) for a, b in zip(r["probs"], reference["probs"])) if reference else float("nan")
        print(f"{name:<26}{per_image:>8.2f}{1 / per_image:>8.3f}{ratio:>8.2f}{diff:>10.1e}{r['load_s']:>8.1f}"
              f"{r['rss_after_load_gb']:>8.2f}G{r['peak_rss_gb']:>8.2f}G")
    if reference:
        print("\nprobabilities (reference):", " ".join(f"{p:.6f}" for p in reference["probs"]))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
