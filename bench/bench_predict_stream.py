"""``dfd predict``'s streaming engine: does decoding still limit throughput, and does memory
stay flat as the folder grows?

Side by side in one run, each measurement in its own subprocess (so its peak RSS is its own):
- decode img/s: the DataLoader alone (decode, preprocess; no model), in the main process
  and with ``--workers`` spawned worker processes;
- model img/s: the Predictor's forward on ready tensors (the ceiling);
- end-to-end img/s: :func:`dfd_lib.scoring.stream.score_stream` writing the CSV, with no
  worker (decoding on the model's thread, as before streaming) and with ``--workers``;
- peak RSS of the main process and of the largest worker, at 1k, 5k and 20k files.

Mixtures (random weights; speed does not depend on them): the demo's (8 x tf_efficientnet_lite0
at 128 px), the same at 32 px for the memory sweep (so 20k files take a minute or two), and the released architecture (7 experts,
512 px) on a few dozen photos. Files are small generated JPEGs (crops of scikit-image photos).

    python bench/bench_predict_stream.py                 # everything, a few minutes on 2 cores
    python bench/bench_predict_stream.py --sizes 1000 5000 --skip-original
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))  # run as a script from a checkout, installed or not

DEMO = {"backbones": ["tf_efficientnet_lite0"] * 8, "image_size": 128}
SMALL = {"backbones": ["tf_efficientnet_lite0"] * 8, "image_size": 32}
PART = 1000  # files per subfolder of the generated tree


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class ChildPeakRss:
    """Samples the peak RSS (VmHWM) of this process's children (the DataLoader workers) while
    they live. (RUSAGE_CHILDREN will not do: a spawned child inherits its parent's peak.)"""

    def __init__(self, every: float = 0.25):
        import threading

        self.peak_mb, self.every = 0.0, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _children(self) -> list[str]:
        pids = []
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError):
                pids += (task / "children").read_text().split()
        return pids

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for pid in self._children():
                with contextlib.suppress(OSError, ValueError):
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- setup (parent)


def make_files(root: Path, count: int, side: int, seed: int = 0) -> None:
    """``count`` JPEGs of ``side`` px (random crops of scikit-image photos), PART per subfolder."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    for i in range(count):
        folder = root / f"part_{i // PART:03d}"
        if i % PART == 0:
            folder.mkdir(parents=True, exist_ok=True)
        photo = photos[i % len(photos)]
        shortest = min(photo.shape[:2])
        crop_side = int(rng.integers(min(side, shortest), shortest + 1))
        y, x = (int(rng.integers(0, photo.shape[d] - crop_side + 1)) for d in (0, 1))
        Image.fromarray(photo[y : y + crop_side, x : x + crop_side]).resize((side, side)).save(folder / f"{i:06d}.jpg", quality=85)


def make_photos(root: Path, count: int) -> None:
    """``count`` whole photos (512x512 to 640x427 JPEGs), half with a small face pasted in:
    where finding faces costs more than the model at the demo's size."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    root.mkdir(parents=True, exist_ok=True)
    astronaut, scene = skdata.astronaut(), skdata.rocket().copy()
    face = np.asarray(Image.fromarray(astronaut).resize((180, 180)))
    scene[150:330, 400:580] = face
    photos = [scene, skdata.coffee(), astronaut, skdata.chelsea()]
    for i in range(count):
        Image.fromarray(photos[i % len(photos)]).save(root / f"{i:05d}.jpg", quality=80 + i % 15)


def make_mixture(directory: Path, spec: dict, seed: int = 0) -> Path:
    import torch

    from dfd_lib.models.checkpoints import MixtureConfig, save_mixture
    from dfd_lib.models.experts import build_mixture

    torch.manual_seed(seed)
    model = build_mixture(spec["backbones"])
    return save_mixture(model, directory, MixtureConfig(backbones=spec["backbones"], image_size=spec["image_size"],
                                                         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))


def child(task: dict) -> dict:
    """Run one measurement in a fresh interpreter; its JSON answer is the last stdout line."""
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(task)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{task['kind']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- measurements (child)


def _predictor(task: dict):
    import torch

    from dfd_lib.scoring.predictor import Predictor

    torch.set_num_threads(task["threads"])
    if task.get("original"):  # the released architecture, random weights, built here (no 0.8 GB file)
        from dfd_lib.models.checkpoints import MixtureConfig
        from dfd_lib.models.experts import ORIGINAL_BACKBONES, build_mixture

        torch.manual_seed(0)
        return Predictor(build_mixture(ORIGINAL_BACKBONES), MixtureConfig(backbones=list(ORIGINAL_BACKBONES),
                         image_size=512), batch_size=task["batch_size"])
    return Predictor.load(task["weights"], batch_size=task["batch_size"])


def measure_decode(task: dict) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from dfd_lib.data.preprocess import InputTransform
    from dfd_lib.scoring.file_crops import ScoringFiles, as_is, worker_init

    torch.set_num_threads(task["threads"])  # as in the model's process
    from dfd_lib.scoring.faces import FaceOptions

    workers = task["workers"]
    dataset = ScoringFiles(task["inputs"], InputTransform(task["image_size"], (0.5,) * 3, (0.5,) * 3),
                           faces=FaceOptions() if task.get("faces") else None)
    loader = DataLoader(dataset, batch_size=None, collate_fn=as_is, num_workers=workers,
                        worker_init_fn=worker_init if workers else None, prefetch_factor=4 if workers else None,
                        multiprocessing_context="spawn" if workers else None)
    iterator = iter(loader)
    next(iterator)  # workers started: not counted
    start, count = time.perf_counter(), 0
    for _item in iterator:
        count += 1
    return {"img_s": count / (time.perf_counter() - start), "files": count + 1}


def measure_model(task: dict) -> dict:
    import torch

    predictor = _predictor(task)
    size = predictor.config.image_size
    batch = torch.rand(predictor.batch_size, 3, size, size)
    predictor.predict_tensor(batch)  # warm-up
    start, count = time.perf_counter(), 0
    while count < task["images"]:
        predictor.predict_tensor(batch)
        count += len(batch)
    return {"img_s": count / (time.perf_counter() - start)}


def measure_stream(task: dict) -> dict:
    from dfd_lib.scoring.faces import FaceOptions
    from dfd_lib.scoring.stream import StreamOptions, score_stream

    predictor = _predictor(task)
    rss_loaded = peak_rss_mb()
    options = StreamOptions(faces=FaceOptions() if task.get("faces") else None, workers=task["workers"])
    start = time.perf_counter()
    with ChildPeakRss() as workers:
        summary = score_stream(predictor, task["inputs"], Path(task["out"]), options, progress=False)
    seconds = time.perf_counter() - start
    return {"img_s": summary.scored / seconds, "seconds": seconds, "scored": summary.scored,
            "rss_loaded_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(), "worker_peak_rss_mb": workers.peak_mb}


# --------------------------------------------------------------------------- the run (parent)


def rates(name: str, spec_task: dict, inputs: list[str], model_images: int, workers: int, out_dir: Path) -> list[dict]:
    base = {**spec_task, "inputs": inputs}
    rows = []
    for w in (0, workers):
        rows.append({"mixture": name, "what": f"decode, {w} workers", **child({**base, "kind": "decode", "workers": w})})
        print(rows[-1], flush=True)
    rows.append({"mixture": name, "what": "model forward", **child({**base, "kind": "model", "images": model_images})})
    print(rows[-1], flush=True)
    for w in (0, workers):
        out = str(out_dir / f"{name.split()[0]}_{name.count('faces')}_{w}.csv")
        rows.append({"mixture": name, "what": f"end to end, {w} workers",
                     **child({**base, "kind": "stream", "workers": w, "out": out})})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000], help="file counts of the memory sweep")
    parser.add_argument("--rate-files", type=int, default=600, help="files for the demo mixture's rates")
    parser.add_argument("--face-photos", type=int, default=120, help="whole photos for the demo mixture with --faces")
    parser.add_argument("--original-images", type=int, default=16, help="photos for the released architecture's rates")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers in the streamed runs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the model process (default 1: with one worker, the 2 cores are used)")
    parser.add_argument("--skip-original", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task = json.loads(args.child)
        print(json.dumps({"decode": measure_decode, "model": measure_model, "stream": measure_stream}[task["kind"]](task)))
        return

    results: dict = {"rates": [], "memory": []}
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        make_files(tmp / "small", max(args.sizes), 96)
        make_files(tmp / "demo", args.rate_files, 160, seed=1)
        print(f"files written in {time.perf_counter() - started:.0f} s", flush=True)
        demo, small = make_mixture(tmp / "w_demo", DEMO), make_mixture(tmp / "w_small", SMALL)
        common = {"threads": args.threads, "batch_size": 16}
        demo_task = {**common, "weights": str(demo), "image_size": DEMO["image_size"]}
        results["rates"] += rates("demo (8 x lite0, 128 px)", demo_task, [str(tmp / "demo")], 512, args.workers, tmp)
        make_photos(tmp / "photos", args.face_photos)
        results["rates"] += rates("demo, --faces on whole photos", {**demo_task, "faces": True}, [str(tmp / "photos")],
                                  256, args.workers, tmp)
        if not args.skip_original:
            make_files(tmp / "original", args.original_images, 512, seed=2)
            original_task = {"threads": args.threads, "batch_size": 4, "original": True, "image_size": 512}
            results["rates"] += rates("released (7 experts, 512 px)", original_task, [str(tmp / "original")],
                                      8, args.workers, tmp)
        for size in sorted(args.sizes):
            parts = [str(tmp / "small" / f"part_{i:03d}") for i in range(size // PART)]
            task = {**common, "weights": str(small), "image_size": SMALL["image_size"], "kind": "stream",
                    "workers": args.workers, "inputs": parts, "out": str(tmp / f"memory_{size}.csv")}
            results["memory"].append({"files": size, **child(task)})
            print(results["memory"][-1], flush=True)

    print("\n| mixture | measurement | img/s |\n|---|---|---:|")
    for row in results["rates"]:
        print(f"| {row['mixture']} | {row['what']} | {row['img_s']:.1f} |")
    print("\n| files | end-to-end img/s | RSS after load (MB) | peak RSS main (MB) | peak RSS worker (MB) |\n|---:|---:|---:|---:|---:|")
    for row in results["memory"]:
        print(f"| {row['files']} | {row['img_s']:.1f} | {row['rss_loaded_mb']:.0f} | {row['peak_rss_mb']:.0f} | "
              f"{row['worker_peak_rss_mb']:.0f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
