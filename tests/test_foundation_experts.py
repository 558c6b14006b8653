"""Foundation-model experts (issue 27): a timm ViT as an expert, trained frozen (the head only) or with LoRA
(peft's adapters, merged into plain timm weights on save) or Effort's SVD residual, and a mixture of a CNN expert and a ViT expert
that take different inputs (the CNN at the training size, the ViT at its own size, mean, std and
interpolation), scored by the Predictor, ``dfd predict`` with torch and OpenVINO, the server, Grad-CAM and
the widget. The ViT is timm's ``test_vit`` (a 0.4M-parameter ViT at 160 px, random weights); the CNN is
``tf_efficientnet_lite0`` with the packaged ImageNet weights."""
from __future__ import annotations

import base64
import copy
import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save_file
from skimage import data as skdata

from dfd_lib.cli import main as dfd_main
from dfd_lib.data.preprocess import untile
from dfd_lib.models.checkpoints import (
    CONFIG_FILE,
    MixtureConfig,
    load_expert,
    load_mixture,
    mixture_from_experts,
    read_config,
    save_expert_weights,
    save_mixture,
)
from dfd_lib.models.experts import Expert
from dfd_lib.scoring import explain, widgets
from dfd_lib.scoring.expert_runners import openvino_installed
from dfd_lib.scoring.predictor import Predictor
from dfd_lib.serving.app import create_app
from dfd_lib.training.effort import SVDResidualLinear, attention_linears
from dfd_lib.training.train_config import TrainConfig
from dfd_lib.training.trainer import train_expert
from dfd_lib.training.training_data import expert_configs
from dfd_lib.training.training_key import training_key
from dfd_lib.training.tuning import add_lora, apply_tuning, lora_targets, merged_expert

VIT = "test_vit"  # timm/test_vit.r160_in1k: 160 px, mean/std 0.5, bicubic, class-token pooling
CNN = "tf_efficientnet_lite0"
CNN_SIZE = 64


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> pd.DataFrame:
    """16 noisy images; fakes carry a learnable signal (a saturated red channel)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        label = i % 2
        arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        if label:
            arr[..., 0] = 230
        path = root / f"{'fake' if label else 'real'}_{i}.png"
        Image.fromarray(arr).save(path)
        rows.append({"path": str(path), "label": label})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def vit_start(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The ViT's starting weights as a local file (a random-weight stand-in for a foundation model's)."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("start") / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in Expert(VIT).baseline_extractor.state_dict().items()}, str(path))
    return {"path": str(path), "state": load_file(str(path))}


def _train(images, out, **settings):
    config = TrainConfig(**{**dict(pretrained=False, image_size=CNN_SIZE, epochs=1, batch_size=4, max_steps_per_epoch=2,
                                   lr=1e-2, warmup_epochs=0.0, seed=1, progress=False, log_with=""), **settings})
    return train_expert(images.iloc[:12], images.iloc[12:], config, out, resume=False)


def _is_head(key: str) -> bool:
    return key.startswith("head.")


# --------------------------------------------------------------------------- the tuning modes


def test_frozen_trains_the_head_only(images, vit_start, tmp_path):
    result = _train(images, tmp_path / "frozen", backbone=VIT, weights_path=vit_start["path"], tuning="frozen")
    expert, meta = load_expert(result.best_weights)
    saved = {k.removeprefix("baseline_extractor."): v for k, v in expert.state_dict().items()}
    assert meta["image_size"] == 160 and meta["interpolation"] == "bicubic" and meta["mean"] == [0.5] * 3  # its own input
    backbone = [k for k in saved if not _is_head(k)]
    assert backbone and all(torch.equal(saved[k], vit_start["state"][k]) for k in backbone)
    assert result.history["train_overall"].notna().all()  # it trained (the next test: a step moves the head only)


def test_frozen_step_changes_nothing_but_the_head():
    torch.manual_seed(0)
    expert = Expert(VIT)
    frozen = apply_tuning(expert, "frozen")
    before = {k: v.clone() for k, v in expert.state_dict().items()}
    trainable = [n for n, p in expert.named_parameters() if p.requires_grad]
    assert trainable == ["baseline_extractor.head.weight", "baseline_extractor.head.bias"] and frozen
    optimizer = torch.optim.SGD([p for p in expert.parameters() if p.requires_grad], lr=1.0)
    expert(torch.randn(2, 3, 160, 160))["logits"].sum().backward()
    optimizer.step()
    changed = {k for k, v in expert.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"baseline_extractor.head.weight", "baseline_extractor.head.bias"}


def test_lora_changes_the_backbone_only_through_its_adapters(images, vit_start, tmp_path):
    result = _train(images, tmp_path / "lora", backbone=VIT, weights_path=vit_start["path"], tuning="lora", lora_rank=4)
    saved = load_file(str(result.best_weights))
    plain = Expert(VIT).state_dict()
    assert set(saved) == set(plain)  # a plain timm expert: the adapters merged, no peft keys
    saved = {k.removeprefix("baseline_extractor."): v for k, v in saved.items()}
    adapted = {f"{name}.weight" for name in lora_targets(Expert(VIT))}
    changed = {k for k in saved if not _is_head(k) and not torch.equal(saved[k], vit_start["state"][k])}
    assert changed and changed <= adapted  # biases, norms, embeddings untouched
    assert json.loads((result.out_dir / "train_config.json").read_text())["tuning"] == "lora"


@pytest.mark.parametrize("tuning", ["frozen", "lora", "effort"])
def test_every_mode_trains_the_new_head(tuning):
    # peft marks only its adapters trainable when it injects them: the head must be switched back on
    expert = Expert(VIT)
    apply_tuning(expert, tuning, lora_rank=4)
    trainable = {name for name, p in expert.named_parameters() if p.requires_grad}
    assert {"baseline_extractor.head.weight", "baseline_extractor.head.bias"} <= trainable


@pytest.mark.slow
def test_a_merged_lora_expert_loads_and_scores_without_peft(tmp_path):
    torch.manual_seed(0)
    expert = Expert(VIT)
    assert add_lora(expert, rank=4, alpha=8) == len(lora_targets(Expert(VIT)))
    with torch.no_grad():
        for name, param in expert.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapters something to add
                param.normal_(0, 0.5)
    expert.eval()
    x = torch.randn(3, 3, 160, 160)
    with torch.no_grad():
        peft_logits = expert(x)["logits"]
        merged = merged_expert(expert)
        assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
        assert torch.allclose(merged(x)["logits"], peft_logits, atol=1e-5)
    weights = save_expert_weights(tmp_path / "expert.safetensors", merged, {"image_size": 160, "mean": [0.5] * 3, "std": [0.5] * 3})
    torch.save({"x": x, "logits": peft_logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["peft"] = None  # an environment without the foundation extra
        import torch
        from dfd_lib.models.checkpoints import load_expert
        expert, _ = load_expert({str(weights)!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            diff = (expert.eval()(expected["x"])["logits"] - expected["logits"]).abs().max().item()
        assert "peft" not in sys.modules or sys.modules["peft"] is None
        print(diff)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


def test_effort_trains_the_residual_singular_subspace_of_the_attention_only(images, vit_start, tmp_path):
    torch.manual_seed(0)
    expert = Expert(VIT, weights_path=vit_start["path"])
    reference = copy.deepcopy(expert).eval()
    apply_tuning(expert, "effort", effort_rank=2)
    qkv = expert.baseline_extractor.blocks[0].attn.qkv
    dim = qkv.in_features
    assert isinstance(qkv, SVDResidualLinear) and qkv.blocks == 3  # q, k and v decomposed apart, as CLIP's projections
    assert qkv.U_residual.shape == (3, dim, 2) and qkv.S_residual.shape == (3, 2) and qkv.V_residual.shape == (3, 2, dim)
    for block in qkv.weight_main.detach().split(dim):
        assert torch.linalg.matrix_rank(block).item() == dim - 2  # the principal part: all but the last 2 directions
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():  # the decomposition starts as the pretrained layer
        assert torch.allclose(expert.eval()(x)["logits"], reference(x)["logits"], atol=1e-5)
    trainable = {n.rsplit(".", 1)[-1] for n, p in expert.named_parameters() if p.requires_grad}
    assert trainable == {"U_residual", "S_residual", "V_residual", "weight", "bias"}  # weight and bias: the head's
    assert all(".attn." in n or ".head." in n for n, p in expert.named_parameters() if p.requires_grad)
    result = _train(images, tmp_path / "effort", backbone=VIT, weights_path=vit_start["path"], tuning="effort")
    saved = {k.removeprefix("baseline_extractor."): v for k, v in load_file(str(result.best_weights)).items()}
    assert set(saved) == {k.removeprefix("baseline_extractor.") for k in Expert(VIT).state_dict()}  # plain timm keys
    attention = {f"{name}.weight" for name, _, _ in attention_linears(Expert(VIT).baseline_extractor)}
    changed = {k for k in saved if not _is_head(k) and not torch.equal(saved[k], vit_start["state"][k])}
    assert changed and changed <= attention


def test_lora_reaches_an_attention_that_reads_its_qkv_weight():
    """timm's EVA (EVA-02), BEiT and Swin V2 read ``qkv.weight`` with their separate q/v biases; adapted, they call ``qkv``."""
    torch.manual_seed(0)
    expert = Expert("eva02_tiny_patch14_224")
    attn = expert.baseline_extractor.blocks[0].attn
    assert attn.q_bias is not None and not attn.qkv_bias_separate
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        before = expert.eval()(x)["logits"]
    add_lora(expert, 4, 8)
    calls = []
    attn.qkv.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        assert torch.allclose(expert(x)["logits"], before, atol=1e-5)  # the same sum, B = 0 at the start
    assert calls == [1] and attn.qkv_bias_separate


def test_lora_without_peft_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"pip install dfd-kit\[foundation\]"):
        add_lora(Expert(VIT), 4, 8)


def test_tuning_settings_are_checked_and_keyed_only_when_set(images):
    for bad in (dict(tuning="partial"), dict(lora_rank=0), dict(lora_alpha=-1), dict(effort_rank=0)):
        with pytest.raises(ValueError, match="TrainConfig"):
            TrainConfig(**bad)
    base = TrainConfig(pretrained=False)
    older = {k: v for k, v in base.to_dict().items() if k not in ("tuning", "lora_rank", "lora_alpha", "effort_rank")}
    assert base.same_run_as(older)  # a training recorded before these fields existed is still the same run
    assert TrainConfig(pretrained=False, lora_rank=4).result_settings() != base.result_settings()
    keys = [training_key(images, images, TrainConfig(pretrained=False, **s), "random")["config"]
            for s in ({}, {"tuning": "full"}, {"tuning": "lora"}, {"tuning": "frozen"}, {"tuning": "effort"})]
    assert keys[0] == keys[1] and len(set(keys)) == 4


def test_tunings_follow_the_backbones_like_their_weights():
    base = TrainConfig(pretrained=False)
    configs = expert_configs(base, [CNN, VIT], [], 4, ["full", "lora"])
    assert [(c.backbone, c.tuning) for c in configs] == [(CNN, "full"), (VIT, "lora")] * 2
    assert {c.tuning for c in expert_configs(base, [CNN, VIT], [], 3, ["frozen"])} == {"frozen"}
    assert {c.tuning for c in expert_configs(base, [CNN], [], 2)} == {"full"}
    with pytest.raises(ValueError, match="3 tunings for 2 backbones"):
        expert_configs(base, [CNN, VIT], [], 4, ["full", "lora", "frozen"])


# --------------------------------------------------------------------------- a CNN and a ViT in one mixture


@pytest.fixture(scope="module")
def mixture(images, vit_start, tmp_path_factory):
    """lite0 (packaged weights, trained fully at 64 px) and the ViT (LoRA, at its own 160 px) as one mixture."""
    root = tmp_path_factory.mktemp("mixture")
    cnn = _train(images, root / "cnn", backbone=CNN, pretrained=True, freeze_stages=6)
    vit = _train(images, root / "vit", backbone=VIT, weights_path=vit_start["path"], tuning="lora", lora_rank=4)
    model, config = mixture_from_experts([cnn.best_weights, vit.best_weights])
    with torch.no_grad():  # heads scaled so that images score apart
        for expert in model.experts:
            expert.baseline_extractor.get_classifier().weight.mul_(20.0)
    return save_mixture(model, root / "moe", config)


def test_the_mixture_keeps_each_experts_preprocessing(mixture):
    config = read_config(mixture)
    assert config.expert_sizes == [CNN_SIZE, 160] and config.input_shape == (3, CNN_SIZE + 160, 160)
    assert [e["interpolation"] for e in config.expert_inputs] == ["bilinear", "bicubic"]
    assert [e["mean"] for e in config.expert_inputs] == [[0.5] * 3] * 2  # each backbone's own (tf-ported lite0's too)
    # a mixture with one preprocessing writes the config older readers know
    shared = MixtureConfig(backbones=[CNN], image_size=CNN_SIZE)
    assert "expert_inputs" not in json.loads(shared.to_json()) and shared.transform().image_size == CNN_SIZE
    with pytest.raises(ValueError, match="expert_inputs has 1 entries for 2 experts"):
        MixtureConfig(backbones=[CNN, VIT], expert_inputs=[config.expert_inputs[0]])
    with pytest.raises(ValueError, match="unknown field"):
        MixtureConfig(backbones=[CNN], expert_inputs=[{"size": 3}])


def test_each_expert_scores_its_own_input(mixture):
    predictor = Predictor.load(mixture, malloc_tuning=False, device="cpu")
    rgb = skdata.astronaut()
    tiled = predictor.to_tensor(rgb)
    model, config = load_mixture(mixture)
    own = [transform(rgb) for transform in config.expert_transforms()]
    for part, expected in zip(untile(tiled[None], config.expert_sizes), own):
        assert torch.equal(part[0], expected)
    with torch.no_grad():
        separate = [expert.eval()(x[None])["logits"].softmax(-1)[0, 1].item() for expert, x in zip(model.experts, own)]
    scored = predictor.predict_one(rgb)
    assert scored.expert_probs == pytest.approx(separate, abs=1e-5)
    assert scored.prob == pytest.approx(np.mean(separate), abs=1e-6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(skdata, name)()).save(root / f"{name}.png")
    return root


@pytest.mark.slow
@pytest.mark.skipif(not openvino_installed(), reason="the openvino extra is not installed")
def test_dfd_predict_with_torch_and_openvino_agree(mixture, folder, tmp_path):
    tables = {}
    for backend in ("torch", "openvino"):
        out = tmp_path / f"{backend}.csv"
        assert dfd_main(["predict", str(folder), "--weights", str(mixture), "--out", str(out), "--backend", backend]) == 0
        tables[backend] = pd.read_csv(out).sort_values("path").reset_index(drop=True)
    columns = ["prob_fake", "prob_expert_0", "prob_expert_1"]
    torch_scores, openvino_scores = (tables[b][columns].to_numpy(dtype=float) for b in ("torch", "openvino"))
    assert len(torch_scores) == 4 and np.isfinite(torch_scores).all()
    assert np.abs(torch_scores - openvino_scores).max() < 1e-5
    assert torch_scores[:, 0].std() > 1e-3  # the images score apart: the check compares something


def test_the_server_and_the_widget_score_it(mixture):
    predictor = Predictor.load(mixture, batch_size=2, malloc_tuning=False, device="cpu")
    client = TestClient(create_app(predictor), raise_server_exceptions=False)
    buffer = io.BytesIO()
    Image.fromarray(skdata.chelsea()).save(buffer, format="PNG")
    raw = buffer.getvalue()
    expected = predictor.predict_one(raw)
    details = client.post("/predict?details=true", json={"image": base64.b64encode(raw).decode()}).json()
    assert details["result"] == pytest.approx(expected.prob, abs=1e-6)
    assert details["experts"] == pytest.approx(expected.expert_probs, abs=1e-6)
    assert client.get("/health").json()["model"]["expert_image_sizes"] == [CNN_SIZE, 160]
    heatmap = client.post("/explain?expert=1", files={"image": ("c.png", raw, "image/png")})
    assert heatmap.status_code == 200, heatmap.content[:300]
    app = widgets.build_upload_app(predictor, with_heatmap=False)
    assert f"at {CNN_SIZE} / 160 px" in app.widget.children[0].value


def test_gradcam_maps_a_vit_over_its_patch_grid(mixture):
    predictor = Predictor.load(mixture, malloc_tuning=False, device="cpu")
    vit = predictor.model.experts[1].baseline_extractor
    assert explain.target_layer(vit, 160) is vit.blocks[-1].norm1
    tokens = torch.randn(2, 1 + 100, 8)
    assert explain.token_grid(vit)(tokens).shape == (2, 8, 10, 10)
    result = explain.explain(predictor, skdata.coffee())
    assert [m.shape for m in result.expert_cams] == [(160, 160), (160, 160)]  # the CNN's 64 px map stretched to 160
    vit_map = result.expert_cams[1]
    assert np.isfinite(vit_map).all() and 0 <= vit_map.min() and vit_map.max() <= 1 and vit_map.std() > 1e-3
    assert result.prob == pytest.approx(predictor.predict_one(skdata.coffee()).prob, abs=1e-6)
    assert (mixture / CONFIG_FILE).is_file()


# --------------------------------------------------------------------------- end to end through notebook 04


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.skipif(not openvino_installed(), reason="the openvino extra is not installed")
def test_notebook_04_trains_a_cnn_and_vit_mixture_that_predict_and_serve_score(tmp_path, monkeypatch, capsys):
    """The smoke profile with four experts: lite0 trained fully, the ViT frozen with a new head, with LoRA and
    with Effort (pretrained from a Hugging Face cache built here); the mixture scores alike in `dfd predict` with torch
    and OpenVINO, and in the server."""
    from hub_cache import cache_timm_weights, use_hub_cache

    from dfd_lib.core import runs
    from dfd_lib.pipeline.chain import run_pipeline

    hub = use_hub_cache(monkeypatch, tmp_path / "hf-home")
    cache_timm_weights(hub, "test_vit.r160_in1k")
    overrides = {"02.n_clusters": "4", "04.backbones": f"[{CNN}, {VIT}, {VIT}, {VIT}]", "04.tunings": "[full, frozen, lora, effort]",
                 "04.lora_rank": "4", "04.ladder_seeds": "0", "04.run_ablation": "false", "04.robustness_images": "20"}
    result = run_pipeline("smoke", run="foundation", overrides=overrides, reports_dir=tmp_path / "reports", progress=False,
                          write_report=False)
    assert result.ok, [step.error for step in result.steps]
    run = runs.RunDir(result.run_dir)
    weights = run.path(runs.MOE_WEIGHTS)
    config = read_config(weights)
    assert config.expert_sizes == [64, 160, 160, 160]
    trained = [json.loads((run.path(runs.EXPERTS_DIR) / f"expert_{i}" / "train_config.json").read_text())["tuning"]
               for i in range(4)]
    assert trained == ["full", "frozen", "lora", "effort"]
    test_rows = pd.read_csv(run.path(runs.MANIFEST)).query("split == 'test'")["path"].head(4)
    images = [p if p.startswith("/") else str(run.path(runs.MANIFEST).parent / p) for p in test_rows]
    tables = {}
    for backend in ("torch", "openvino"):
        out = tmp_path / f"{backend}.csv"
        assert dfd_main(["predict", *images, "--weights", str(weights), "--out", str(out), "--backend", backend]) == 0
        tables[backend] = pd.read_csv(out)
    columns = ["prob_fake", "prob_expert_0", "prob_expert_1", "prob_expert_2", "prob_expert_3"]
    assert np.abs(tables["torch"][columns].to_numpy(float) - tables["openvino"][columns].to_numpy(float)).max() < 1e-5
    with TestClient(create_app(weights)) as client:
        raw = open(images[0], "rb").read()
        served = client.post("/predict", json={"image": base64.b64encode(raw).decode()}).json()["result"]
    assert served == pytest.approx(float(tables["torch"]["prob_fake"][0]), abs=1e-6)
