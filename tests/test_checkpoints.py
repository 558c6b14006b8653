"""The released checkpoint format (read, EMA folded, pickles vetted) and ours (round trip)."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from dfd_lib.cli import main as dfd_main
from dfd_lib.models.checkpoints import CheckpointError, MixtureConfig, load_mixture, save_mixture
from dfd_lib.models.experts import build_mixture
from dfd_lib.models.loading import load_weights
from dfd_lib.models.released import load_released, save_released

TINY = ["test_efficientnet", "tf_efficientnet_lite0"]


def make_released(directory: Path, backbones=TINY, seed: int = 0) -> list[list[torch.Tensor]]:
    """A released-format checkpoint whose EMA shadow values differ from the raw weights
    (so a loader that ignores ema.state gives different scores). Returns the shadow values."""
    torch.manual_seed(seed)
    model = build_mixture(backbones)
    with torch.no_grad():  # trained-looking BN statistics, also part of the checkpoint
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
        for expert in model.experts:  # keep random logits small so probabilities are not saturated
            expert.baseline_extractor.get_classifier().weight.mul_(0.05)
    shadow = [[p.detach() * (1 + 0.1 * torch.randn_like(p)) + 0.01 * torch.randn_like(p) for p in expert.parameters()]
              for expert in model.experts]
    save_released(model, directory, shadow, decay=0.995, num_updates=1234)
    return shadow


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[Path, list[list[torch.Tensor]]]:
    directory = tmp_path_factory.mktemp("released")
    return directory, make_released(directory)


def test_released_layout_is_what_design_describes(released):
    directory, _ = released
    weights = torch.load(directory / "weight.pth", weights_only=True)
    ema = torch.load(directory / "ema.state", weights_only=True)
    assert next(iter(weights)).startswith("0.baseline_extractor.")
    assert set(ema) == {0, 1}
    assert set(ema[0]) == {"decay", "num_updates", "shadow_params", "collected_params"}
    assert ema[0]["collected_params"] is None


def test_loading_folds_the_ema_shadow_params_not_the_raw_weights(released):
    directory, shadow = released
    model, config = load_released(directory, TINY)
    raw = torch.load(directory / "weight.pth", weights_only=True)
    for i, expert in enumerate(model.experts):
        names = [n for n, _ in expert.named_parameters()]
        for name, param, value in zip(names, expert.parameters(), shadow[i]):
            torch.testing.assert_close(param, value, rtol=0, atol=0)
            assert not torch.equal(param, raw[f"{i}.{name}"])
        for name, buffer in expert.named_buffers():  # buffers are not averaged: taken from weight.pth
            torch.testing.assert_close(buffer, raw[f"{i}.{name}"], rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.parameters())
    assert config.backbones == ["test_efficientnet", "tf_efficientnet_lite0"]
    assert config.preprocess == "compat" and config.image_size == 512
    assert "ema" in config.provenance["converted"]


class _Payload:
    """An arbitrary object: unpickling it with plain pickle would run os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_holding_an_arbitrary_object_is_refused(released, tmp_path):
    directory, _ = released
    marker = tmp_path / "code_ran"
    state = torch.load(directory / "weight.pth", weights_only=True)
    state["0.extra"] = _Payload(marker)
    evil = tmp_path / "weight.pth"
    torch.save(state, evil)
    with pytest.raises(CheckpointError, match="refused.*other than tensors"):
        load_released([evil, directory / "ema.state"], TINY)
    assert not marker.exists()
    torch.save({0: {"shadow_params": [], "hook": _Payload(marker)}}, tmp_path / "ema.state")
    with pytest.raises(CheckpointError, match="refused"):
        load_released([directory / "weight.pth", tmp_path / "ema.state"], TINY)
    assert not marker.exists()


def test_mismatches_are_reported_clearly(released, tmp_path):
    directory, shadow = released
    with pytest.raises(CheckpointError, match="parameters but .* EMA shadow values"):
        load_released(directory, ["tf_efficientnet_lite0", "tf_efficientnet_lite0"])
    ema = torch.load(directory / "ema.state", weights_only=True)
    ema[1]["shadow_params"][0] = torch.zeros(3)
    torch.save(ema, tmp_path / "ema.state")
    with pytest.raises(CheckpointError, match="expert 1 EMA value for .* has shape"):
        load_released([directory / "weight.pth", tmp_path / "ema.state"], TINY)
    torch.save({0: ema[0]}, tmp_path / "ema.state")
    with pytest.raises(CheckpointError, match=r"EMA states for experts \[0\]"):
        load_released([directory / "weight.pth", tmp_path / "ema.state"], TINY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="weight.pth: missing"):
        load_released(tmp_path / "empty", TINY)
    (tmp_path / "garbage" / "weight.pth").parent.mkdir()
    (tmp_path / "garbage" / "weight.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "garbage" / "ema.state").write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot read|refused"):
        load_released(tmp_path / "garbage", TINY)


def test_our_format_round_trips_atomically(released, tmp_path):
    directory, _ = released
    model, config = load_released(directory, TINY)
    out = tmp_path / "ours"
    save_mixture(model, out, config)
    save_mixture(model, out, config)  # overwriting (training saves every epoch) leaves no temp files
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded, loaded_config = load_mixture(out)
    assert loaded_config == config
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["prob"], model(x)["prob"], rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["backbones"] == TINY
    with pytest.raises(ValueError, match="config names backbones"):
        save_mixture(build_mixture(["resnet10t"]), tmp_path / "x", config)


def test_config_is_validated_on_construction(tmp_path):
    assert MixtureConfig(["tf_efficientnet_b4_ns"]).backbones == ["tf_efficientnet_b4.ns_jft_in1k"]
    for bad in (dict(backbones=[]), dict(backbones=["resnet10t"], image_size=0),
                dict(backbones=["resnet10t"], mean=(0.5, 0.5)), dict(backbones=["resnet10t"], std=(1, 0, 1)),
                dict(backbones=["resnet10t"], preprocess="fast"), dict(backbones=["nope"])):
        with pytest.raises(ValueError):
            MixtureConfig(**bad)
    (tmp_path / "config.json").write_text(json.dumps({"backbones": ["resnet10t"], "colour": "red"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown MixtureConfig keys: colour"):
        load_weights(tmp_path)
    with pytest.raises(CheckpointError, match="no weights found"):
        load_weights(tmp_path / "empty")


def test_convert_weights_command_round_trip(released, tmp_path, capsys):
    directory, _ = released
    out = tmp_path / "moe"
    assert dfd_main(["convert-weights", str(directory), str(out), "--backbones", ",".join(TINY)]) == 0
    converted, config = load_weights(out)
    reference, _ = load_released(directory, TINY)
    for v1, v2 in zip(converted.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(v1, v2)
    assert dataclasses.asdict(config)["provenance"]["source"].endswith("ema.state")
    # the two files named one by one work too
    out2 = tmp_path / "moe2"
    assert dfd_main(["convert-weights", str(directory / "weight.pth"), str(directory / "ema.state"), str(out2),
                     "--backbones", ",".join(TINY)]) == 0
    assert (out2 / "model.safetensors").is_file()
    assert dfd_main(["convert-weights", str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_the_same_weights_always_give_the_same_bytes(tmp_path):
    # safetensors writes its metadata in a hash map's order; the kit's files are canonical, so a file's digest
    # (a run's fingerprints, a calibration's weights) changes only when its content does
    torch.manual_seed(0)
    model = build_mixture(["test_efficientnet_gn"])
    config = MixtureConfig(backbones=["test_efficientnet_gn"], image_size=32, preprocess="default")
    files = {(save_mixture(model, tmp_path / f"m{i}", config) / "model.safetensors").read_bytes() for i in range(8)}
    assert len(files) == 1
    loaded, _ = load_mixture(tmp_path / "m0")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
