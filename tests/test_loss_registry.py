"""A loss term registered in one place, here, reaches everything that names loss terms: the
configs, MultiLoss, a real training and its curves, the ablation, the configs table, the
preflight's memory estimate and the ladder's folders. The registration is undone afterwards."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_training import one_torch_thread, write_signal_images
from torch import nn

from dfd_lib.evaluation.ablation import AblationResult, ablation_config, ablation_table, ablation_variants, all_losses_variant
from dfd_lib.evaluation.ladder import Training
from dfd_lib.pipeline.memory import training_memory
from dfd_lib.training.curves import plot_training_curves
from dfd_lib.training.loss_terms import (
    LossOption,
    TermInputs,
    add_noise,
    cross_entropy_loss,
    get_loss_term,
    loss_names,
    noise_consistency_kl,
    register_loss_term,
    restored_loss_terms,
    supervised_contrastive_loss,
    unregister_loss_term,
)
from dfd_lib.training.losses import LossConfig, MultiLoss
from dfd_lib.training.train_config import TrainConfig
from dfd_lib.training.trainer import CURVES_FILE, HISTORY_FILE, train_expert
from dfd_lib.training.training_data import configs_table

BUILT_INS = ("ce", "nce", "kl", "mask")  # mask: off by default (localisation heads, issue 28)


# --------------------------------------------------------------------------- the toy term: its one registration


def _mirrored_first_rows(images: torch.Tensor, toy_share: float) -> torch.Tensor:
    """The first ``ceil(toy_share * B)`` images mirrored left-right (no random draw)."""
    return images[: max(1, math.ceil(toy_share * images.shape[0]))].flip(-1)


def _mirror_consistency(batch: TermInputs, toy_share: float) -> torch.Tensor:
    """L2 distance between the fake probability of an image and of its mirror image."""
    clean = batch.logits[: batch.noisy_logits.shape[0]].float().softmax(dim=1)[:, 1]
    return (clean - batch.noisy_logits.float().softmax(dim=1)[:, 1]).pow(2).mean()


def _register_toy():
    return register_loss_term(
        "toy", _mirror_consistency, label="Toy", default_weight=0.0, learns_labels=False,
        noisy_copy=_mirrored_first_rows, memory_factor=lambda toy_share: toy_share,
        options=[LossOption("toy_share", 0.5, lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "in (0, 1]",
                            "share of each batch given a mirrored copy", in_summary=True)])


@pytest.fixture(scope="module", autouse=True)
def toy_term():
    with restored_loss_terms():
        yield _register_toy()
    assert loss_names() == BUILT_INS  # undone: the other test files see the built-ins only


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> pd.DataFrame:
    """24 noisy 40x48 images; fakes carry a learnable signal (a saturated red channel)."""
    return write_signal_images(tmp_path_factory.mktemp("images"), clusters=3)


def _config(**loss) -> TrainConfig:
    return TrainConfig(backbone="test_efficientnet", pretrained=False, image_size=32, epochs=2, batch_size=8, lr=3e-3,
                       warmup_epochs=0.5, seed=3, progress=False, log_with="", threads=1,
                       loss=LossConfig(**{"nce_weight": 0.5, "kl_fraction": 0.5, **loss}))


@pytest.fixture(scope="module")
def toy_training(images, tmp_path_factory):
    with one_torch_thread():  # a shared CPU: one thread avoids OpenMP oversubscription stalls
        out = tmp_path_factory.mktemp("training") / "expert_0"
        return train_expert(images.iloc[:16], images.iloc[16:], _config(toy_weight=0.5, toy_share=0.25), out)


# --------------------------------------------------------------------------- the configs


def test_toy_parameters_are_config_parameters():
    assert loss_names() == (*BUILT_INS, "toy")
    assert LossConfig.parameter_names() == ("ce_weight", "nce_weight", "kl_weight", "mask_weight", "toy_weight", "temperature",
                                            "noise_kind", "noise_strength", "kl_fraction", "mask_head", "toy_share")
    assert LossConfig.parameter_defaults()["toy_weight"] == 0.0 and TrainConfig.parameter_defaults()["toy_share"] == 0.5
    config = TrainConfig.from_params({"toy_weight": 0.5, "toy_share": 0.25, "lr": 0.01, "families": ["x"]})
    assert config.lr == 0.01 and config.loss.toy_weight == 0.5 and config.loss.toy_share == 0.25
    assert config.loss.weights == {"ce": 1.0, "nce": 0.1, "kl": 1.0, "mask": 0.0, "toy": 0.5}
    assert config.loss.options("toy") == {"toy_share": 0.25}
    # a YAML file for dfd train: the nested loss mapping, and the saved config read back
    assert TrainConfig.from_dict({"lr": 0.01, "loss": {"toy_weight": 0.5, "toy_share": 0.25}}) == config
    assert TrainConfig.from_dict(config.to_dict()) == config and config.same_run_as(config.to_dict())
    with pytest.raises(ValueError, match=r"LossConfig.toy_share must be in \(0, 1\], got 0"):
        LossConfig(toy_share=0)
    with pytest.raises(ValueError, match="toy_weight must be a number >= 0"):
        TrainConfig.from_params({"toy_weight": -1})
    with pytest.raises(ValueError, match="kl_weight and toy_weight alone do not learn the labels; set ce_weight or nce_weight > 0"):
        LossConfig(ce_weight=0, nce_weight=0, toy_weight=1)


def test_a_term_off_by_default_leaves_saved_configs_as_they_were():
    with restored_loss_terms():
        unregister_loss_term("toy")
        before = TrainConfig(loss=LossConfig(nce_weight=0)).to_dict()
    # the toy term registered but off at its defaults: the same config.json, so earlier trainings are reused
    now = TrainConfig(loss=LossConfig(nce_weight=0))
    assert now.to_dict() == before and list(now.to_dict()["loss"]) == list(before["loss"])
    assert now.same_run_as(before) and TrainConfig.from_dict(before) == now
    # switched on (or changed) it is written, after the built-ins' weights and options in their order
    on = now.loss.with_weights({"toy": 0.5}).to_dict()
    assert list(on) == ["ce_weight", "nce_weight", "kl_weight", "toy_weight", "temperature", "noise_kind", "noise_strength",
                        "kl_fraction", "toy_share"]
    assert not TrainConfig(loss=now.loss.with_weights({"toy": 0.5})).same_run_as(before)


def test_registration_is_checked_and_undone():
    with restored_loss_terms():
        with pytest.raises(ValueError, match="already registered"):
            _register_toy()
        with pytest.raises(ValueError, match=r"\['temperature'\] already used"):
            register_loss_term("other", _mirror_consistency, label="O", default_weight=0,
                               options=[LossOption("temperature", 1.0, lambda v: v > 0, "> 0")])
        with pytest.raises(ValueError, match="other than"):
            register_loss_term("overall", _mirror_consistency, label="O", default_weight=0)
        with pytest.raises(ValueError, match="must be > 0, got 0"):  # a default that fails its own check
            register_loss_term("other", _mirror_consistency, label="O", default_weight=0,
                               options=[LossOption("other_scale", 0, lambda v: v > 0, "> 0")])
        register_loss_term("lr", _mirror_consistency, label="LR", default_weight=0, options=[
            LossOption("epochs", 1, lambda v: v > 0, "> 0")])
        with pytest.raises(ValueError, match=r"\['epochs'\] clash with TrainConfig"):
            TrainConfig.from_params({})
        assert loss_names() == (*BUILT_INS, "toy", "lr")
    assert loss_names() == (*BUILT_INS, "toy")


# --------------------------------------------------------------------------- MultiLoss


class _CountingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Linear(6, 4)
        self.head = nn.Linear(4, 2)
        self.batch_sizes: list[int] = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        f = self.features(x)
        return {"logits": self.head(f), "features": f}


def test_multiloss_adds_the_toy_term_after_the_built_ins():
    torch.manual_seed(0)
    model = _CountingModel()
    x, y = torch.randn(8, 6), torch.tensor([0, 1] * 4)
    config = LossConfig(nce_weight=0.5, kl_fraction=0.5, toy_weight=0.25, toy_share=0.25)
    torch.manual_seed(1)
    losses = MultiLoss(config)(model, x, y)
    assert list(losses) == ["overall", "ce", "nce", "kl", "mask", "toy"]
    assert model.batch_sizes == [8 + 4 + 2]  # the batch, KL's noisy half and the toy's mirrored quarter in one forward
    torch.manual_seed(1)  # KL's noise drawn again: the toy's copy draws nothing
    noisy = add_noise(x[:4], "gaussian", 0.1)
    with torch.no_grad():
        out = model(torch.cat([x, noisy, x[:2].flip(-1)]))
        logits, features = out["logits"][:8], out["features"][:8]
        parts = {"ce": cross_entropy_loss(logits, y), "nce": supervised_contrastive_loss(features, y, 0.07),
                 "kl": noise_consistency_kl(logits[:4], out["logits"][8:12]),
                 "toy": _mirror_consistency(TermInputs(logits, features, y, out["logits"][12:]), 0.25)}
    for name, value in parts.items():
        assert torch.equal(losses[name].detach(), value), name
    assert torch.equal(losses["overall"].detach(), 1.0 * parts["ce"] + 0.5 * parts["nce"] + 1.0 * parts["kl"] + 0.25 * parts["toy"])
    assert losses["toy"].item() > 0
    # switched off, it costs nothing: no mirrored copy, a 0 part
    model.batch_sizes.clear()
    off = MultiLoss(LossConfig(kl_weight=0))(model, x, y)
    assert model.batch_sizes == [8] and off["toy"].item() == 0.0


# --------------------------------------------------------------------------- a real training, its curves and tables


def test_the_toy_term_is_trained_and_logged(toy_training):
    out = toy_training.out_dir
    curves = pd.read_csv(out / CURVES_FILE)
    assert {"loss_overall", "loss_ce", "loss_nce", "loss_kl", "loss_toy"} <= set(curves.columns)
    assert (curves["loss_toy"] > 0).all()
    weighted = curves["loss_ce"] + 0.5 * curves["loss_nce"] + curves["loss_kl"] + 0.5 * curves["loss_toy"]
    np.testing.assert_allclose(curves["loss_overall"], weighted, rtol=1e-5)
    history = pd.read_csv(out / HISTORY_FILE)
    assert (history["train_toy"] > 0).all()
    saved = TrainConfig.from_dict(json.loads((out / "train_config.json").read_text()))
    assert saved.loss.toy_weight == 0.5 and saved.loss.toy_share == 0.25 and saved == toy_training.config
    fig = plot_training_curves(out.parent)
    titles = [ax.get_title() for ax in fig.axes]
    assert any(title.startswith("toy loss") for title in titles) and "validation AUC (EMA weights) per epoch" in titles


def test_the_ablation_and_the_tables_show_the_toy_term(toy_training, images):
    config = toy_training.config
    assert list(ablation_variants()) == ["CE only", "CE + NCE", "CE + KL", "CE + NCE + KL"]  # off by default: no part
    assert ablation_variants(config.loss) == {"CE only": ("ce",), "CE + NCE": ("ce", "nce"), "CE + KL": ("ce", "kl"),
                                              "CE + Toy": ("ce", "toy"), "CE + NCE + KL + Toy": ("ce", "nce", "kl", "toy")}
    assert all_losses_variant(config.loss) == "CE + NCE + KL + Toy"
    assert ablation_config(config, ("ce", "nce", "kl", "toy")) == config  # the experts' run is the all-terms variant
    assert ablation_config(config, ("ce", "toy")).loss.weights == {"ce": 1.0, "nce": 0.0, "kl": 0.0, "mask": 0.0, "toy": 0.5}
    with pytest.raises(ValueError, match="off in the config and by default"):
        ablation_config(_config(), ("ce", "toy"))
    ablated = AblationResult(resplit=0, results={"CE + NCE + KL + Toy": toy_training}, reused="CE + NCE + KL + Toy", seconds=0.0)
    table = ablation_table(ablated, images.iloc[16:], batch_size=8, progress=False)
    assert list(table.columns[:5]) == ["ce_weight", "nce_weight", "kl_weight", "mask_weight", "toy_weight"]
    assert table.loc["CE + NCE + KL + Toy", "toy_weight"] == 0.5
    assert "toy_weight" in ablation_table(AblationResult(0, {}, None, 0.0), images).columns  # the empty table too
    settings = configs_table({"expert_0": config, "official": _config()})
    assert settings.loc["expert_0", "toy_weight"] == 0.5 and settings.loc["official", "toy_weight"] == 0.0
    assert settings.loc["expert_0", "toy_share"] == 0.25  # marked in_summary, like kl_fraction
    assert Training("resplit_0", True, config).folder == "resplit_0_ce_nce_kl_toy"


def test_preflight_counts_the_toy_terms_copies():
    assert get_loss_term("toy").needs_noisy_copy
    assert LossConfig(toy_weight=1, toy_share=0.25).memory_factor == 1.25  # KL's full copy + the toy's quarter
    params = {"image_size": 64, "batch_size": 8}
    alone = training_memory("test_efficientnet", {**params, "kl_weight": 0})  # weights + 8 images
    with_kl = training_memory("test_efficientnet", params)  # + 8 noisy images
    with_toy = training_memory("test_efficientnet", {**params, "toy_weight": 0.5, "toy_share": 0.25})  # + 2 mirrored
    assert (with_toy - with_kl) / (with_kl - alone) == pytest.approx(2 / 8)
