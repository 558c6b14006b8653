"""Notebook 04's evaluation scores each (expert, image) pair once per process (issue 24, item 1): a
reused score equals a freshly computed one, an image is forwarded once per model however many tables
ask for it, the mixture folder's experts are the experts' files, and the fast engines (batch norms
folded, OpenVINO) score like the plain torch path within 1e-5. Tiny experts at 32 px, seconds."""
from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dfd_lib.data.images import load_rgb
from dfd_lib.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from dfd_lib.evaluation import comparison
from dfd_lib.evaluation.robustness import mixture_predict_fn
from dfd_lib.models.checkpoints import mixture_from_experts, save_expert_weights, save_mixture
from dfd_lib.models.experts import Expert
from dfd_lib.scoring import expert_runners, expert_scores
from dfd_lib.scoring.expert_scores import ScoreCache, expert_from_file, experts_from_mixture, score_images
from dfd_lib.scoring.mixture_calibration import with_mixture_scores

TOLERANCE = 1e-5
BACKBONE = "test_efficientnet"


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv(expert_scores.BACKEND_ENV, "torch")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # OpenVINO exports stay in the test's folder
    monkeypatch.setattr(expert_scores, "SHARED", ScoreCache())
    expert_scores._RUNNERS.clear()
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _expert(seed: int) -> Expert:
    torch.manual_seed(seed)
    expert = Expert(BACKBONE).eval()
    with torch.no_grad():  # non-trivial norms, so that folding them has something to get wrong
        for module in expert.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1, 0.1)
                module.bias.normal_(0, 0.1)
        expert.baseline_extractor.get_classifier().weight.mul_(0.05)
    return expert


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    files = {}
    for seed in range(3):
        path = root / f"e{seed}" / "best_ema.safetensors"
        path.parent.mkdir()
        files[f"expert {seed}"] = save_expert_weights(path, _expert(seed), {"image_size": 32, "mean": list(IMAGENET_MEAN),
                                                                            "std": list(IMAGENET_STD)})
    model, config = mixture_from_experts(list(files.values()))
    save_mixture(model, root / "moe", config)
    return files, root / "moe"


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)).save(path)
        rows.append({"path": str(path), "label": i % 2})
    (root / "broken.png").write_bytes(b"not an image")
    rows.append({"path": str(root / "broken.png"), "label": 1})
    return pd.DataFrame(rows)


def _count_forwards(monkeypatch) -> list[int]:
    """Images through every Expert.forward from now on (the folded copies included)."""
    seen = []
    plain = Expert.forward

    def counted(self, x):
        seen.append(int(x.shape[0]))
        return plain(self, x)

    monkeypatch.setattr(Expert, "forward", counted)
    return seen


def test_the_fast_path_scores_like_the_plain_torch_predictor(models, table):
    files, _ = models
    reference = comparison.score_experts_predictor(files, table, batch_size=4, device="cpu", progress=False)
    fast = comparison.score_experts(files, table, batch_size=4, device="cpu", progress=False)
    assert reference.iloc[-1].isna().all() and fast.iloc[-1].isna().all()  # the unreadable image, in both
    assert np.allclose(fast.to_numpy()[:-1], reference.to_numpy()[:-1], atol=TOLERANCE, rtol=0)
    assert (fast.columns == reference.columns).all()


def test_experts_forwarded_at_once_score_exactly_as_one_at_a_time(models, table, monkeypatch):
    files, _ = models
    torch.set_num_threads(1)  # the demo's threads: 1, where the cores hold several experts at once
    monkeypatch.setenv("DFD_CPUS", "2")  # two cores, whatever the test worker's share
    assert expert_scores.experts_at_once(len(files)) == 2 and expert_scores.openvino_threads() == 2
    threads = []
    run = expert_runners.TorchRunner.__call__
    monkeypatch.setattr(expert_runners.TorchRunner, "__call__",
                        lambda self, batch: threads.append(threading.current_thread().name) or run(self, batch))
    together = comparison.score_experts(files, table, batch_size=4, progress=False)
    assert {name.startswith("dfd-expert") for name in threads} == {True}  # forwarded in the pool's threads
    monkeypatch.setenv(expert_scores.AT_ONCE_ENV, "1")
    monkeypatch.setattr(expert_scores, "SHARED", ScoreCache())
    threads.clear()
    alone = comparison.score_experts(files, table, batch_size=4, progress=False)
    assert threads and not any(name.startswith("dfd-expert") for name in threads)
    assert np.array_equal(together.to_numpy(), alone.to_numpy(), equal_nan=True)  # bit for bit: the same batches
    monkeypatch.setenv(expert_scores.AT_ONCE_ENV, "two")
    with pytest.raises(ValueError, match="DFD_EVAL_EXPERTS_AT_ONCE must be an int >= 1"):
        expert_scores.experts_at_once(3)


def test_folded_batchnorm_keeps_the_scores():
    expert = _expert(7)
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        plain = expert(x)["logits"].softmax(-1)[:, 1].numpy()
    folded = expert_runners.TorchRunner(expert)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules())
    assert np.allclose(folded(x), plain, atol=TOLERANCE, rtol=0)


def test_an_image_is_scored_once_per_model_and_reused_scores_equal_fresh_ones(models, table, monkeypatch):
    files, moe = models
    seen = _count_forwards(monkeypatch)
    first = comparison.score_experts(files, table, batch_size=4, progress=False)
    readable = len(table) - 1
    assert sum(seen) == readable * len(files)
    again = comparison.score_experts({"same as expert 1": files["expert 1"]}, table, progress=False)  # the ladder, the ablation
    calibration = with_mixture_scores(table, moe, progress=False)  # the mixture folder holds the same experts
    predict, experts = mixture_predict_fn(moe, device="cpu")
    robust = predict([load_rgb(p) for p in table["path"][:4]])  # robustness's unperturbed images, decoded by it
    assert sum(seen) == readable * len(files) and experts == len(files)  # nothing forwarded again
    assert np.array_equal(again["same as expert 1"].to_numpy(), first["expert 1"].to_numpy(), equal_nan=True)
    fresh = score_images(*_experts(files), list(table["path"]), cache=ScoreCache())  # recomputed from scratch
    assert sum(seen) == 2 * readable * len(files)
    assert np.allclose(first.to_numpy(), fresh, atol=TOLERANCE, rtol=0, equal_nan=True)
    mixture = first.mean(axis=1).to_numpy()
    assert np.allclose(calibration["prob_fake"].to_numpy(), mixture, atol=TOLERANCE, rtol=0, equal_nan=True)
    assert calibration["error"].iloc[-1] and not calibration["error"].iloc[0]
    assert np.allclose(robust, mixture[:4], atol=TOLERANCE, rtol=0)


def _experts(files):
    pairs = [expert_from_file(path) for path in files.values()]
    return [expert for expert, _ in pairs], pairs[0][1]


def test_other_weights_or_other_pixels_are_never_reused(models, table, tmp_path, monkeypatch):
    files, moe = models
    seen = _count_forwards(monkeypatch)
    comparison.score_experts({"a": files["expert 0"]}, table, progress=False)
    changed = _expert(0)
    with torch.no_grad():
        changed.baseline_extractor.get_classifier().bias.add_(1e-3)
    path = save_expert_weights(tmp_path / "changed.safetensors", changed, {"image_size": 32, "mean": list(IMAGENET_MEAN),
                                                                          "std": list(IMAGENET_STD)})
    assert expert_from_file(path)[0].digest != expert_from_file(files["expert 0"])[0].digest
    comparison.score_experts({"b": path}, table, progress=False)
    assert sum(seen) == 2 * (len(table) - 1)
    flipped = [np.asarray(Image.open(p))[:, ::-1] for p in table["path"][:3]]  # other pixels: other inputs
    score_images([expert_from_file(files["expert 0"])[0]], expert_from_file(files["expert 0"])[1], flipped)
    assert sum(seen) == 2 * (len(table) - 1) + 3
    assert [e.digest for e in experts_from_mixture(moe)[0]] == [expert_from_file(p)[0].digest for p in files.values()]


def test_openvino_scores_like_torch_and_its_export_is_reused(models, table, monkeypatch):
    pytest.importorskip("openvino")
    files, _ = models
    reference = comparison.score_experts(files, table, progress=False)
    monkeypatch.setenv(expert_scores.BACKEND_ENV, "openvino")
    monkeypatch.setattr(expert_scores, "SHARED", ScoreCache())
    converted = []
    convert = expert_runners.convert_expert
    monkeypatch.setattr(expert_runners, "convert_expert", lambda *a: converted.append(a) or convert(*a))
    through_openvino = comparison.score_experts(files, table, progress=False)
    assert len(converted) == len(files)
    assert np.allclose(through_openvino.to_numpy(), reference.to_numpy(), atol=TOLERANCE, rtol=0, equal_nan=True)
    expert_scores._RUNNERS.clear()
    monkeypatch.setattr(expert_scores, "SHARED", ScoreCache())
    comparison.score_experts(files, table, progress=False)
    assert len(converted) == len(files)  # the cached exports, keyed by the experts' tensors
    monkeypatch.setenv(expert_scores.BACKEND_ENV, "auto")
    expert, _ = expert_from_file(files["expert 0"])
    assert expert_scores.choose_engine(expert, 1, 32) == "openvino"  # its export is cached
    assert expert_scores.choose_engine(expert, 1, 64) == "torch"  # none at this size, too few images to convert


def test_an_export_another_process_wrote_meanwhile_is_kept(tmp_path):
    pytest.importorskip("openvino")
    folder = tmp_path / "exports" / "key"
    folder.mkdir(parents=True)
    (folder / "model.xml").write_text("theirs")  # written by another worker while this one converted
    assert expert_runners.convert_expert(_expert(0), 32, folder) == folder / "model.xml"
    assert (folder / "model.xml").read_text() == "theirs"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".export-")]  # nothing left behind
