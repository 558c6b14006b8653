"""Soak test of the HTTP API: 16 clients send thousands of mixed requests to a real ``dfd serve``.

Starts ``dfd serve`` (uvicorn) in a subprocess on a free loopback port — by default with a tiny
2-expert mixture at 64 px (the tests' model: the server's own work, not the network's, dominates),
or ``--weights DIR`` (e.g. the demo mixture ``reports/baseline/weights/moe``, read only) — then
16 client threads share a fixed sequence of requests mixing valid images (JSON and multipart),
batches with a bad image in them, Grad-CAM explanations, malformed requests and oversized bodies
and images. Meanwhile a monitor samples the server's RSS (``/proc`` via psutil) and ``GET /health``
once a second. Reports requests/s, p50/p95/p99 latency, statuses by kind of request, the RSS over
time and its growth after the warm-up. Passes (exit 0) when no answer is a 5xx, every answer has
the status its kind expects, ``/health`` answered every probe, and RSS grew by less than
``--max-growth-mb`` after the warm-up.

    python bench/bench_soak.py                                   # 6000 requests, tiny mixture
    python bench/bench_soak.py --weights reports/baseline/weights/moe --requests 2000

The clients run on the same machine as the server and take CPU from it: on a small shared
machine the rates are a floor.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))  # run as a script from a checkout, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import free_port, make_weights, start_server  # noqa: E402

TINY = ["test_efficientnet", "test_efficientnet"]
MAX_BODY_MB = 1.0  # the server's body limit in this test: the oversized bodies are 1.5 MB
# kind of request -> (share of the requests, the status it must get)
MIX = {
    "predict JSON": (0.30, 200),
    "predict multipart": (0.10, 200),
    "batch of 4 (one bad)": (0.12, 200),
    "explain": (0.05, 200),
    "invalid JSON": (0.06, 400),
    "bad base64": (0.06, 400),
    "not an image": (0.06, 422),
    "truncated JPEG": (0.06, 422),
    "wrong content type": (0.05, 415),
    "oversized body": (0.04, 413),
    "decompression bomb": (0.05, 413),
    "huge garbage field": (0.05, 400),
}


def _encode(array, fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` pixels over one row of data."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 4097)) + chunk(b"IEND", b"")


def request_kinds() -> dict[str, list[dict]]:
    """kind -> the requests of that kind (``requests`` keyword arguments plus ``path``)."""
    from skimage import data

    photos = [_encode(data.astronaut()[::2, ::2], "JPEG"), _encode(data.chelsea()[::2, ::2], "PNG"),
              _encode(data.coffee()[::2, ::2], "JPEG")]
    b64 = [base64.b64encode(p).decode() for p in photos]
    as_json = {"content-type": "application/json"}

    def post(path: str, **kwargs) -> dict:
        return {"path": path, **kwargs}

    return {
        "predict JSON": [post("/predict", data=json.dumps({"image": s}), headers=as_json) for s in b64],
        "predict multipart": [post("/predict", files={"image": (f"p{i}", p, "image/jpeg")}) for i, p in enumerate(photos)],
        "batch of 4 (one bad)": [post("/predict/batch", data=json.dumps({"images": b64 + ["not base64!"]}), headers=as_json)],
        "explain": [post("/explain", data=json.dumps({"image": s}), headers=as_json) for s in b64],
        "invalid JSON": [post("/predict", data='{"image": "abc', headers=as_json)],
        "bad base64": [post("/predict", data=json.dumps({"image": "this is *not* base64"}), headers=as_json)],
        "not an image": [post("/predict", data=json.dumps({"image": base64.b64encode(b"plain text " * 50).decode()}),
                              headers=as_json)],
        "truncated JPEG": [post("/predict", data=json.dumps({"image": base64.b64encode(photos[0][: len(photos[0]) // 2]).decode()}),
                                headers=as_json)],
        "wrong content type": [post("/predict", data=b64[0], headers={"content-type": "text/plain"})],
        "oversized body": [post("/predict", data=b"x" * int(1.5 * 1024 * 1024), headers=as_json)],
        "decompression bomb": [post("/predict", data=json.dumps({"image": base64.b64encode(_png_claiming(30000, 30000)).decode()}),
                                    headers=as_json)],
        "huge garbage field": [post("/predict", data=json.dumps({"image": "!<garbage>" * 50_000}), headers=as_json)],
    }


def schedule(total: int, seed: int) -> list[str]:
    """The kinds of ``total`` requests in a seeded random order, in the shares of ``MIX``."""
    rng = random.Random(seed)
    kinds = list(MIX)
    return rng.choices(kinds, weights=[MIX[k][0] for k in kinds], k=total)


class Monitor(threading.Thread):
    """Samples the server's RSS and ``/health`` every ``every`` seconds until stopped."""

    def __init__(self, url: str, pid: int, every: float = 1.0):
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.url, self.every = url, every
        self.samples: list[tuple[float, int, float]] = []  # (seconds since start, RSS bytes, health latency or -1)
        self.done = threading.Event()
        self.progress = 0  # requests finished, written by the clients

    def run(self) -> None:
        import requests

        start = time.monotonic()
        session = requests.Session()
        while not self.done.is_set():
            rss = self.process.memory_info().rss
            began = time.perf_counter()
            try:
                ok = session.get(f"{self.url}/health", timeout=10).json()["status"] == "ok"
            except Exception:  # a missed probe is a result, not a crash of the monitor
                ok = False
            self.samples.append((time.monotonic() - start, rss, time.perf_counter() - began if ok else -1.0))
            self.done.wait(self.every)


def drive(url: str, kinds: dict[str, list[dict]], order: list[str], clients: int, seconds: float,
          monitor: Monitor, warmup: int) -> dict:
    """``clients`` threads, each with a keep-alive session, work through ``order`` (stop at ``seconds``)."""
    import requests

    lock = threading.Lock()
    next_index = 0
    results: list[tuple[str, int, float]] = []  # (kind, status or -1 for a failed connection, seconds)
    warm_at: list[float] = []
    deadline = time.monotonic() + seconds
    start = time.monotonic()

    def client() -> None:
        nonlocal next_index
        session = requests.Session()
        while True:
            with lock:
                if next_index >= len(order) or time.monotonic() >= deadline:
                    return
                kind = order[next_index]
                request = kinds[kind][next_index % len(kinds[kind])]
                next_index += 1
            kwargs = {k: v for k, v in request.items() if k != "path"}
            began = time.perf_counter()
            try:
                status = session.post(url + request["path"], timeout=120, **kwargs).status_code
            except requests.RequestException:
                status, session = -1, requests.Session()
            elapsed = time.perf_counter() - began
            with lock:
                results.append((kind, status, elapsed))
                monitor.progress = len(results)
                if len(results) == warmup:
                    warm_at.append(time.monotonic() - start)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"results": results, "wall": time.monotonic() - start, "warm_at": warm_at[0] if warm_at else 0.0}


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000 if ordered else float("nan")


def report(run: dict, samples: list, max_growth_mb: float) -> bool:
    results, wall, warm_at = run["results"], run["wall"], run["warm_at"]
    latencies = sorted(t for _, _, t in results)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for kind, status, _ in results:
        by_kind[kind][status] += 1
    unexpected = sum(n for kind, c in by_kind.items() for status, n in c.items() if status != MIX[kind][1])
    server_errors = sum(n for c in by_kind.values() for status, n in c.items() if status >= 500 or status < 0)
    print(f"\n{len(results)} requests in {wall:.1f} s: {len(results) / wall:.1f} requests/s; latency p50 "
          f"{percentile(latencies, 0.5):.0f} ms, p95 {percentile(latencies, 0.95):.0f} ms, p99 {percentile(latencies, 0.99):.0f} ms, "
          f"max {percentile(latencies, 1.0):.0f} ms")
    print("\n| kind | share | expected | statuses | p50 ms | p99 ms |\n|---|---:|---:|---|---:|---:|")
    for kind, (share, expected) in MIX.items():
        times = sorted(t for k, _, t in results if k == kind)
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(by_kind[kind].items()))
        print(f"| {kind} | {share:.0%} | {expected} | {statuses} | {percentile(times, 0.5):.0f} | {percentile(times, 0.99):.0f} |")
    health_ok = [lat for _, _, lat in samples if lat >= 0]
    print(f"\n/health: {len(health_ok)} of {len(samples)} probes answered (one a second), "
          f"slowest {max(health_ok, default=float('nan')) * 1000:.0f} ms")
    warm = [rss for t, rss, _ in samples if t >= warm_at]
    rss_warm = warm[0] if warm else samples[-1][1]
    growth_final = (samples[-1][1] - rss_warm) / 2**20
    growth_max = (max(warm, default=rss_warm) - rss_warm) / 2**20
    print(f"server RSS: {samples[0][1] / 2**20:.0f} MB at the start, {rss_warm / 2**20:.0f} MB after the warm-up "
          f"({warm_at:.0f} s), {samples[-1][1] / 2**20:.0f} MB at the end, at most {max(r for _, r, _ in samples) / 2**20:.0f} MB; "
          f"growth after the warm-up: {growth_final:+.1f} MB at the end, {growth_max:+.1f} MB at most (limit {max_growth_mb:.0f} MB)")
    half = [rss for t, rss, _ in samples if t >= samples[-1][0] / 2]
    if half:  # flat here while the first half grew: the allocator's pools filling up, not a leak
        print(f"growth over the second half of the run ({samples[-1][0] / 2:.0f} s on): {(half[-1] - half[0]) / 2**20:+.1f} MB")
    step = max(1, len(samples) // 12)
    print("RSS over time (s: MB): " + ", ".join(f"{t:.0f}: {rss / 2**20:.0f}" for t, rss, _ in samples[::step]))
    passed = (server_errors == 0 and unexpected == 0 and len(health_ok) == len(samples) and growth_max < max_growth_mb)
    print(f"\n5xx or failed connections: {server_errors}; answers with another status than their kind expects: {unexpected}; "
          f"{'PASS' if passed else 'FAIL'}; load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="mixture folder (default: a tiny 2-expert one at 64 px)")
    parser.add_argument("--requests", type=int, default=6000, help="requests in all (bound)")
    parser.add_argument("--seconds", type=float, default=300.0, help="longest run (bound)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=500, help="requests before the RSS baseline is taken")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the server")
    parser.add_argument("--max-growth-mb", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    kinds = request_kinds()
    order = schedule(args.requests, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_soak_") as tmp:
        weights = args.weights or make_weights(Path(tmp) / "moe", TINY, 64)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(weights, port, args.threads, 8, Path(tmp) / "serve.log", ("--max-body-mb", str(MAX_BODY_MB)))
        try:
            monitor = Monitor(url, server.pid)
            monitor.start()
            run = drive(url, kinds, order, args.clients, args.seconds, monitor, args.warmup)
            monitor.done.set()
            monitor.join(15)
            served = __import__("requests").get(f"{url}/health", timeout=10).json()["served"]
        finally:
            server.terminate()
            server.wait(15)
    print(f"model: {weights if args.weights else '2 x test_efficientnet at 64 px (tiny)'}; {args.clients} clients; "
          f"server --threads {args.threads} --batch-size 8 --max-body-mb {MAX_BODY_MB:g}; "
          f"the server scored {served['images']} images in {served['batches']} batches (mean {served['mean_batch']}), "
          f"{served['explanations']} explanations")
    return 0 if report(run, monitor.samples, args.max_growth_mb) else 1


if __name__ == "__main__":
    sys.exit(main())
