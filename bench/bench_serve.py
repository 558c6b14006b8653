"""Load test of the HTTP API on loopback: N concurrent clients send the same images.

Starts the real ``dfd serve`` (uvicorn) in a subprocess on a free 127.0.0.1 port with a
demo-size mixture (default: 3 ``tf_efficientnet_lite0`` experts at 128 px, random weights —
speed does not depend on the weight values), then for each client count sends ``POST /predict``
requests (the original JSON-base64 contract) until ``--requests`` are done or ``--seconds``
have passed, whichever comes first. Reports requests/s, p50/p95/max latency, errors, and the
mean batch the server formed from concurrent requests. The clients run on the same machine
as the server and take CPU from it: on a 2-core machine the figures are a floor.

    python bench/bench_serve.py                                  # 1, 4 and 8 clients
    python bench/bench_serve.py --clients 8 --server-batch 1     # no batching, for comparison
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))  # run as a script from a checkout, installed or not


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_weights(directory: Path, backbones: list[str], image_size: int) -> Path:
    import torch

    from dfd_lib.models.checkpoints import MixtureConfig, save_mixture
    from dfd_lib.models.experts import build_mixture

    torch.manual_seed(0)
    return save_mixture(build_mixture(backbones), directory, MixtureConfig(backbones=backbones, image_size=image_size,
                                                                           preprocess="default"))


def payloads() -> list[tuple[str, bytes]]:
    """The same three photos every time, as JSON bodies of the original contract."""
    from PIL import Image
    from skimage import data

    out = []
    for name, array, fmt in (("astronaut 512x512 JPEG", data.astronaut(), "JPEG"),
                             ("chelsea 451x300 PNG", data.chelsea(), "PNG"),
                             ("coffee 600x400 JPEG", data.coffee(), "JPEG")):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append((name, json.dumps({"image": base64.b64encode(buffer.getvalue()).decode()}).encode()))
    return out


def start_server(weights: Path, port: int, threads: int, batch: int, log: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """``dfd serve`` in a subprocess; ``extra``: more of its options (bench_soak.py's limits)."""
    import requests

    command = [sys.executable, "-m", "dfd_lib.cli", "serve", "--weights", str(weights), "--host", "127.0.0.1",
               "--port", str(port), "--threads", str(threads), "--batch-size", str(batch), "--log-level", "warning", *extra]
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dfd serve exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
            return process
        except requests.ConnectionError:
            time.sleep(0.3)
    process.terminate()
    raise RuntimeError("dfd serve did not start within 120 s")


def load(url: str, bodies: list[bytes], clients: int, total: int, seconds: float) -> dict:
    """``clients`` threads, each with its own keep-alive session, share a budget of ``total``
    requests and stop at ``seconds``."""
    import requests

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    issued = 0
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        nonlocal issued
        session = requests.Session()
        while True:
            with lock:
                if issued >= total or time.monotonic() >= deadline:
                    return
                body = bodies[issued % len(bodies)]
                issued += 1
            started = time.perf_counter()
            try:
                response = session.post(url, data=body, headers={"content-type": "application/json"}, timeout=120)
                ok = response.status_code == 200 and "result" in response.json()
                problem = "" if ok else f"HTTP {response.status_code}"
            except Exception as exc:  # a failed request is a result of the test, not a crash of it
                problem = type(exc).__name__
            elapsed = time.perf_counter() - started
            with lock:
                (errors.append(problem) if problem else latencies.append(elapsed))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000 if ordered else float("nan")

    return {"clients": clients, "requests": len(latencies) + len(errors), "ok": len(latencies), "errors": len(errors),
            "seconds": round(wall, 2), "req_per_s": round(len(latencies) / wall, 2),
            "p50_ms": round(pct(0.50), 1), "p95_ms": round(pct(0.95), 1), "max_ms": round(pct(1.0), 1),
            "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="tf_efficientnet_lite0,tf_efficientnet_lite0,tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=120, help="requests per client count (bound)")
    parser.add_argument("--seconds", type=float, default=60.0, help="time per client count (bound)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the server")
    parser.add_argument("--server-batch", type=int, default=8, help="most images the server scores per forward")
    parser.add_argument("--warmup", type=int, default=6, help="untimed requests before each client count")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import requests

    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    bodies = [body for _, body in payloads()]
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        weights = make_weights(Path(tmp) / "moe", backbones, args.image_size)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(weights, port, args.threads, args.server_batch, Path(tmp) / "serve.log")
        rows = []
        try:
            for clients in args.clients:
                load(f"{url}/predict", bodies, clients, args.warmup, args.seconds)
                before = requests.get(f"{url}/health", timeout=10).json()["served"]
                row = load(f"{url}/predict", bodies, clients, args.requests, args.seconds)
                after = requests.get(f"{url}/health", timeout=10).json()["served"]
                batches = after["batches"] - before["batches"]
                row["mean_batch"] = round((after["images"] - before["images"]) / batches, 2) if batches else float("nan")
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.terminate()
            server.wait(15)
    load_avg = os.getloadavg()[0]
    print(f"\n{len(backbones)} x {backbones[0]} at {args.image_size} px, server: --threads {args.threads} "
          f"--batch-size {args.server_batch}; 1-min load average at the end: {load_avg:.1f}\n")
    print("| clients | requests | errors | req/s | p50 ms | p95 ms | max ms | mean batch |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['req_per_s']:.1f} | {r['p50_ms']:.0f} | "
              f"{r['p95_ms']:.0f} | {r['max_ms']:.0f} | {r['mean_batch']} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
