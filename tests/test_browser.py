"""End to end in a real headless browser (Debian's chromium driven by Playwright), loopback only:
`dfd serve`'s page scores an uploaded image and shows the score the API gives (and, for a mixture with
localisation heads, overlays the heads' map the API gives, Grad-CAM still selectable); notebook 05
renders as an app under Voilà with its upload widget.

Needs ``/usr/bin/chromium`` (``apt-get update && apt-get install -y chromium``); skipped
with that instruction when it is absent."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import papermill
import pytest
import requests
from PIL import Image
from skimage import data as skdata
from test_serve import b64, free_port, make_tiny_weights
from test_serve_maps import edited_photo

from dfd_lib.core.paths import PROJECT_ROOT
from dfd_lib.data.manifest import Manifest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent: apt-get update && apt-get install -y chromium"),
]


def start(command: list[str], url: str, log: Path, timeout: float = 90.0) -> subprocess.Popen:
    """Start ``command`` and wait until ``url`` answers (the process's output goes to ``log``).
    ``url`` must answer at once: a Voila page runs its notebook before it answers, and each probe
    that gives up would leave another kernel running it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop("MPLBACKEND", None)  # the tests' Agg backend would keep the kernel from showing figures
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:4]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=5).status_code < 500:
                return process
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    process.terminate()
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("moe"))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def serve(weights: Path, log: Path) -> Iterator[str]:
    """The real `dfd serve` command on a free loopback port: its URL while it runs."""
    port = free_port()
    command = [sys.executable, "-m", "dfd_lib.cli", "serve", "--weights", str(weights), "--host", "127.0.0.1",
               "--port", str(port), "--threads", "1", "--log-level", "warning"]
    process = start(command, f"http://127.0.0.1:{port}/health", log)
    yield f"http://127.0.0.1:{port}"
    stop(process)


@pytest.fixture(scope="module")
def served(weights, tmp_path_factory):
    yield from serve(weights, tmp_path_factory.mktemp("serve") / "serve.log")


@pytest.fixture(scope="module")
def served_with_heads(tmp_path_factory):
    """A mixture with (untrained) localisation heads, served."""
    weights = make_tiny_weights(tmp_path_factory.mktemp("moe_heads"), localisation_head="light")
    yield from serve(weights, tmp_path_factory.mktemp("serve_heads") / "serve.log")


def jpeg_file(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path, format="JPEG", quality=90)
    return path


def test_the_page_scores_an_uploaded_image_like_the_api(served, browser, tmp_path):
    image = jpeg_file(tmp_path / "astronaut.jpg", skdata.astronaut())
    api = requests.post(f"{served}/predict?details=true", json={"image": b64(image.read_bytes())}, timeout=60).json()
    page = browser.new_page()
    try:
        page.goto(served + "/")
        page.wait_for_function("document.querySelector('#model-info').textContent.includes('2 experts')", timeout=30_000)
        assert "not calibrated" in page.inner_text("#threshold-source")  # the server's threshold, and where it came from
        page.set_input_files("#file-input", str(image))
        card = page.wait_for_selector(".result.done", timeout=60_000)
        assert card.get_attribute("data-name") == "astronaut.jpg"
        assert float(card.get_attribute("data-prob")) == api["result"]  # the page shows what the API answers
        assert page.inner_text(".result .score") == f"{api['result']:.4f}"
        assert [float(t) for t in page.locator(".result .expert-prob").all_inner_texts()] == pytest.approx(api["experts"], abs=1e-3)
        assert page.get_attribute(".result .heatmap", "src").startswith("data:image/png;base64,")
        assert page.is_visible(".result .heatmap")
        # no localisation heads: Grad-CAM, and no choice of heatmap offered
        assert page.get_attribute(".result .heatmap", "data-kind") == "grad-cam" and not page.is_visible("#heatmap-row")
        assert "Grad-CAM" in page.inner_text(".result .heatmap-label")
        # the threshold only recolours: below the score -> fake, above -> real
        for value, verdict in ((api["result"] - 0.01, "fake"), (api["result"] + 0.01, "real")):
            page.eval_on_selector("#threshold", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(value))
            assert page.inner_text(".result .verdict").lower() == verdict
        # an unreadable file gets a card with the server's reason, and the page goes on working
        page.set_input_files("#file-input", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image at all"}])
        page.wait_for_selector(".result.failed", timeout=30_000)
        assert "not an image" in page.inner_text(".result.failed .error")
        assert page.locator(".result.done").count() == 2
    finally:
        page.close()


def test_the_page_overlays_the_heads_map_with_grad_cam_selectable(served_with_heads, browser, tmp_path):
    image = tmp_path / "edited.png"
    Image.fromarray(edited_photo()).save(image)
    body = {"image": b64(image.read_bytes())}
    heads = requests.post(f"{served_with_heads}/explain?map=localisation", json=body, timeout=60).json()
    gradcam = requests.post(f"{served_with_heads}/explain?map=grad-cam", json=body, timeout=60).json()
    assert heads["heatmap_kind"] == "localisation" and heads["heatmap"] != gradcam["heatmap"]  # two different overlays
    page = browser.new_page()
    try:
        page.goto(served_with_heads + "/")
        page.wait_for_function("!document.querySelector('#heatmap-row').hidden", timeout=30_000)
        assert page.input_value("#heatmap-kind") == "localisation"  # the heads' map by default
        page.set_input_files("#file-input", str(image))
        page.wait_for_selector(".result.done", timeout=60_000)
        # the overlay drawn is the one the API makes from the heads' map, and says so
        assert page.get_attribute(".result .heatmap", "src") == heads["heatmap"]
        assert page.get_attribute(".result .heatmap", "data-kind") == "localisation"
        assert page.inner_text(".result .heatmap-label") == "where it was edited (localisation head)"
        assert float(page.get_attribute(".result", "data-prob")) == heads["result"]
        # Grad-CAM is still one choice away
        page.select_option("#heatmap-kind", "grad-cam")
        page.set_input_files("#file-input", str(image))
        page.wait_for_function("document.querySelectorAll('.result.done').length === 2", timeout=60_000)
        newest = page.query_selector(".result .heatmap")  # the newest card comes first
        assert newest.get_attribute("data-kind") == "grad-cam" and newest.get_attribute("src") == gradcam["heatmap"]
        assert "Grad-CAM" in page.inner_text(".result .heatmap-label")
    finally:
        page.close()


def test_the_page_scores_faces_and_draws_their_boxes(served, browser, tmp_path):
    from test_predict_stream import small_face_photo

    image = jpeg_file(tmp_path / "small_face.jpg", small_face_photo(skdata.astronaut(), 0.35, (400, 150)))
    api = requests.post(f"{served}/predict?faces=true", json={"image": b64(image.read_bytes())}, timeout=60).json()
    [face] = api["faces"]
    page = browser.new_page()
    try:
        page.goto(served + "/")
        page.wait_for_function("document.querySelector('#model-info').textContent.includes('2 experts')", timeout=30_000)
        page.check("#faces")
        page.set_input_files("#file-input", str(image))
        page.wait_for_selector(".result.done", timeout=60_000)
        assert float(page.get_attribute(".result", "data-prob")) == api["result"] == face["result"]
        boxes = page.locator(".result .face-box")
        assert boxes.count() == 1 and page.is_visible(".result .face-box")
        assert " ".join(str(v) for v in face["box"]) in boxes.first.get_attribute("title")
        assert float(boxes.first.get_attribute("data-prob")) == face["result"]
        assert "rgb(" in boxes.first.evaluate("el => el.style.borderColor")  # coloured by its score
        # the box sits on the face in the displayed image: same fractions of the width and height
        frame = page.locator(".result .frame").bounding_box()
        drawn = boxes.first.bounding_box()
        assert (drawn["x"] - frame["x"]) / frame["width"] == pytest.approx(face["box"][0] / 640, abs=0.01)
        assert (drawn["y"] - frame["y"]) / frame["height"] == pytest.approx(face["box"][1] / 427, abs=0.01)
        assert "1 face(s) found" in page.inner_text(".result .faces-note")
        page.uncheck("#faces")  # off again: the whole photo, no box
        page.set_input_files("#file-input", str(image))
        page.wait_for_function("document.querySelectorAll('.result.done').length == 2", timeout=60_000)
        assert page.locator(".result").first.locator(".face-box").count() == 0
    finally:
        page.close()


def test_voila_renders_notebook_05_with_its_widget(weights, browser, tmp_path):
    run_dir = tmp_path / "run"
    weights_dir = run_dir / "weights" / "moe"
    weights_dir.mkdir(parents=True)
    for item in weights.iterdir():
        (weights_dir / item.name).write_bytes(item.read_bytes())
    paths, labels = [], []
    for i, (label, array) in enumerate([(0, skdata.astronaut()), (0, skdata.chelsea()), (1, skdata.coffee()), (1, skdata.rocket())]):
        paths.append(str(jpeg_file(tmp_path / f"img{i}.jpg", array)))
        labels.append(label)
    Manifest(pd.DataFrame({"path": paths, "label": labels, "split": "test"})).save(run_dir / "manifest.csv")
    notebook = tmp_path / "05_inference.ipynb"
    papermill.execute_notebook(str(PROJECT_ROOT / "notebooks" / "05_inference.ipynb"), str(notebook),
                               parameters={"run_dir": str(run_dir), "heatmaps": 2, "batch_size": 4},
                               prepare_only=True, progress_bar=False)
    port = free_port()
    command = [sys.executable, "-m", "voila", str(notebook), "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
               "--show_tracebacks=True"]
    # the server is up when its static files are served; "/" would start a kernel per probe
    process = start(command, f"http://127.0.0.1:{port}/voila/static/extension.js", tmp_path / "voila.log", timeout=120)
    page = browser.new_page(viewport={"width": 1280, "height": 2400})
    try:
        page.goto(f"http://127.0.0.1:{port}/", timeout=120_000)
        page.wait_for_selector("text=Upload images", timeout=120_000)  # the FileUpload button of the last cell
        page.screenshot(path=str(tmp_path / "voila_05.png"), full_page=True)
        text = page.inner_text("body")
        assert "2 experts" in text and "threshold" in text and "Traceback" not in text
        assert page.locator("img").count() >= 2, tmp_path  # the histogram and the heatmaps
        assert (run_dir / "figures" / "05_score_histogram.png").is_file()
    finally:
        page.close()
        stop(process)
