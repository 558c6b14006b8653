"""Each loss against an answer worked out by hand on small tensors; MultiLoss against the term
functions called directly; LossConfig as the loss-term registry builds it."""
import copy
import dataclasses
import math
import pickle

import pytest
import torch
from torch import nn

from dfd_lib.training.loss_terms import loss_names, loss_terms
from dfd_lib.training.losses import (
    LossConfig,
    MultiLoss,
    add_noise,
    cross_entropy_loss,
    noise_consistency_kl,
    supervised_contrastive_loss,
)
from dfd_lib.training.train_config import TrainConfig


def test_cross_entropy_known_values():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    # softmax = (1/4, 3/4): label 1 costs ln(4/3), label 0 costs ln 4
    assert cross_entropy_loss(logits, torch.tensor([1, 1])).item() == pytest.approx(math.log(4 / 3), abs=1e-6)
    assert cross_entropy_loss(logits, torch.tensor([1, 0])).item() == pytest.approx((math.log(4 / 3) + math.log(4)) / 2, abs=1e-6)


def test_supcon_two_pairs_of_unit_vectors():
    # two identical vectors per class, classes orthogonal, t = 1: for every anchor the positive
    # has similarity 1 and the two negatives 0 -> loss = -log(e / (e + 2)) = ln(e + 2) - 1
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    expected = math.log(math.e + 2) - 1
    assert supervised_contrastive_loss(z, labels, temperature=1.0).item() == pytest.approx(expected, abs=1e-6)
    # features are normalised inside: scaling them changes nothing
    assert supervised_contrastive_loss(5 * z, labels, temperature=1.0).item() == pytest.approx(expected, abs=1e-6)


def test_supcon_anchor_without_positive_is_left_out():
    # t = 0.5; anchor 0: positive z1 (cos 0), negative z2 (cos -1 -> -2): ln(1 + e^-2)
    # anchor 1: positive z0 (cos 0), negative z2 (cos 0): ln 2; anchor 2 has no positive.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    expected = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    loss = supervised_contrastive_loss(z, torch.tensor([0, 0, 1]), temperature=0.5)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_supcon_pulls_same_class_together():
    labels = torch.tensor([0, 0, 1, 1])
    together = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    assert supervised_contrastive_loss(together, labels, 0.1) < supervised_contrastive_loss(mixed, labels, 0.1)


@pytest.mark.parametrize("labels", [[0, 1], [1], [0, 1, 2]])
def test_supcon_without_any_pair_is_zero_with_grad(labels):
    features = torch.randn(len(labels), 4, requires_grad=True)
    loss = supervised_contrastive_loss(features, torch.tensor(labels), 0.07)
    assert loss.item() == 0.0
    loss.backward()
    assert features.grad is not None and torch.all(features.grad == 0)


def test_supcon_single_class_batch_is_finite():
    # every pair is positive and there are no negatives: log-prob of each positive is -ln(n-1)
    features = torch.randn(3, 4, requires_grad=True)
    loss = supervised_contrastive_loss(features, torch.tensor([1, 1, 1]), 1.0)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(features.grad).all()


def test_supcon_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        supervised_contrastive_loss(torch.randn(2, 3), torch.tensor([0, 1]), 0.0)
    with pytest.raises(ValueError, match="expected features"):
        supervised_contrastive_loss(torch.randn(3, 3), torch.tensor([0, 1]), 0.1)


def test_kl_identical_is_zero_and_known_pair():
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    assert noise_consistency_kl(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-7)
    # p = (1/2, 1/2), q = (1/4, 3/4): KL(p||q) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    clean = torch.tensor([[0.0, 0.0]])
    noisy = torch.tensor([[0.0, math.log(3.0)]])
    assert noise_consistency_kl(clean, noisy).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    # batch mean: a second, identical row halves nothing (mean of equal values)
    assert noise_consistency_kl(clean.repeat(2, 1), noisy.repeat(2, 1)).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)


def test_add_noise_kinds_and_strength():
    torch.manual_seed(0)
    x = torch.zeros(200_000)
    gaussian = add_noise(x, "gaussian", 0.2)
    assert gaussian.std().item() == pytest.approx(0.2, rel=0.02)
    uniform = add_noise(x, "uniform", 0.3)
    assert uniform.abs().max().item() <= 0.3
    assert uniform.std().item() == pytest.approx(0.3 / math.sqrt(3), rel=0.02)
    assert torch.equal(add_noise(x, "gaussian", 0.0), x)
    with pytest.raises(ValueError, match="noise kind"):
        add_noise(x, "salt", 0.1)
    with pytest.raises(ValueError, match="strength"):
        add_noise(x, "gaussian", -1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ce_weight=-1.0), "ce_weight"),
        (dict(ce_weight=0, nce_weight=0, kl_weight=0), "at least one"),
        (dict(ce_weight=0, nce_weight=0, kl_weight=1.0), "kl_weight alone"),
        (dict(temperature=0), "temperature"),
        (dict(noise_kind="poisson"), "noise_kind"),
        (dict(noise_strength=-0.1), "noise_strength"),
        (dict(kl_fraction=0.0), "kl_fraction"),
        (dict(kl_fraction=1.5), "kl_fraction"),
    ],
)
def test_loss_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)


class _CountingModel(nn.Module):
    """A linear 'expert' that records the batch sizes it sees."""

    def __init__(self):
        super().__init__()
        self.features = nn.Linear(6, 4)
        self.head = nn.Linear(4, 2)
        self.batch_sizes: list[int] = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        f = self.features(x)
        return {"logits": self.head(f), "features": f}


def test_multiloss_weighted_sum_and_parts():
    torch.manual_seed(0)
    model = _CountingModel()
    x, y = torch.randn(8, 6), torch.tensor([0, 1] * 4)
    config = LossConfig(ce_weight=1.0, nce_weight=0.5, kl_weight=2.0, noise_strength=0.5)
    losses = MultiLoss(config)(model, x, y)
    assert set(losses) == {"overall", "ce", "nce", "kl", "mask"}  # mask: off by default, 0
    assert model.batch_sizes == [16]  # clean and noisy copies in one forward
    expected = losses["ce"] + 0.5 * losses["nce"] + 2.0 * losses["kl"]
    assert losses["overall"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses["kl"].item() > 0 and losses["nce"].item() > 0
    losses["overall"].backward()
    assert model.features.weight.grad is not None


def test_multiloss_switched_off_parts_cost_nothing():
    model = _CountingModel()
    x, y = torch.randn(8, 6), torch.tensor([0, 1] * 4)
    losses = MultiLoss(LossConfig(ce_weight=1.0, nce_weight=0.0, kl_weight=0.0))(model, x, y)
    assert model.batch_sizes == [8]  # no noisy forward when kl is off
    assert losses["nce"].item() == 0.0 and losses["kl"].item() == 0.0
    assert losses["overall"].item() == pytest.approx(cross_entropy_loss(model(x)["logits"], y).item(), rel=1e-6)


def test_multiloss_kl_fraction_noises_the_first_part_of_the_batch():
    # kl_fraction 0.25 of 8 -> the first 2 images get a noisy copy: one forward of 8 + 2, and
    # the KL term equals the KL of those 2 clean rows against their noisy rows
    torch.manual_seed(0)
    model = _CountingModel()
    x, y = torch.randn(8, 6), torch.tensor([0, 1] * 4)
    torch.manual_seed(1)
    losses = MultiLoss(LossConfig(kl_fraction=0.25, noise_strength=0.5))(model, x, y)
    assert model.batch_sizes == [10]
    torch.manual_seed(1)  # the same noise again, drawn for the 2 rows
    noisy = add_noise(x[:2], "gaussian", 0.5)
    with torch.no_grad():
        expected = noise_consistency_kl(model(x[:2])["logits"], model(noisy)["logits"])
    assert losses["kl"].item() == pytest.approx(expected.item(), rel=1e-5)
    # the CE term still covers the whole batch
    with torch.no_grad():
        assert losses["ce"].item() == pytest.approx(cross_entropy_loss(model(x)["logits"], y).item(), rel=1e-6)
    # at least one image is noised however small the fraction
    model.batch_sizes.clear()
    MultiLoss(LossConfig(kl_fraction=0.01))(model, x, y)
    assert model.batch_sizes == [9]


# --------------------------------------------------------------------------- the registry's MultiLoss is today's


def _reference_losses(model, x, y, ce_weight, nce_weight, kl_weight, temperature, noise_kind, noise_strength, kl_fraction):
    """The loss dict as MultiLoss computed it before the terms were registered (the term functions
    called directly, the noisy copy drawn the same way, the sum in the order ce, nce, kl)."""
    n = x.shape[0]
    if kl_weight > 0:
        k = max(1, math.ceil(kl_fraction * n - 1e-9))
        noisy = add_noise(x[:k], noise_kind, noise_strength)
        outputs = model(torch.cat([x, noisy], dim=0))
        logits, logits_noisy, features = outputs["logits"][:n], outputs["logits"][n:], outputs["features"][:n]
    else:
        outputs = model(x)
        logits, logits_noisy, features = outputs["logits"], None, outputs["features"]
    zero = logits.new_zeros((), dtype=torch.float32)
    parts = {"ce": cross_entropy_loss(logits, y) if ce_weight > 0 else zero,
             "nce": supervised_contrastive_loss(features, y, temperature) if nce_weight > 0 else zero,
             "kl": noise_consistency_kl(logits[: logits_noisy.shape[0]], logits_noisy) if kl_weight > 0 else zero}
    weights = {"ce": float(ce_weight), "nce": float(nce_weight), "kl": float(kl_weight)}
    overall = sum(weights[name] * parts[name] for name in ("ce", "nce", "kl") if weights[name] > 0)
    return {"overall": overall, **parts}


@pytest.mark.parametrize("settings", [
    dict(ce_weight=1.0, nce_weight=0.5, kl_weight=2.0, temperature=0.1, noise_kind="gaussian", noise_strength=0.5, kl_fraction=1.0),
    dict(ce_weight=1.0, nce_weight=0.1, kl_weight=1.0, temperature=0.07, noise_kind="uniform", noise_strength=0.3, kl_fraction=0.5),
    dict(ce_weight=1, nce_weight=0, kl_weight=3, temperature=0.07, noise_kind="gaussian", noise_strength=0.1, kl_fraction=0.3),
    dict(ce_weight=0, nce_weight=0.7, kl_weight=0, temperature=0.2, noise_kind="gaussian", noise_strength=0.1, kl_fraction=1.0),
    dict(ce_weight=1.0, nce_weight=0.0, kl_weight=0.0, temperature=0.07, noise_kind="gaussian", noise_strength=0.1, kl_fraction=1.0),
], ids=["all", "uniform-half", "ce-kl", "nce", "ce"])
def test_multiloss_equals_the_term_functions_bit_for_bit(settings):
    torch.manual_seed(0)
    model = _CountingModel()
    reference_model = _CountingModel()
    reference_model.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 6), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    torch.manual_seed(5)
    losses = MultiLoss(LossConfig(**settings))(model, x, y)
    torch.manual_seed(5)  # the same noise: the same RNG calls in the same order
    expected = _reference_losses(reference_model, x, y, **settings)
    assert list(losses) == ["overall", "ce", "nce", "kl", "mask"]
    for name in expected:
        assert torch.equal(losses[name], expected[name]), name
    losses["overall"].backward()
    expected["overall"].backward()
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), name  # NCE alone leaves the head untouched
    assert model.batch_sizes == reference_model.batch_sizes


# --------------------------------------------------------------------------- LossConfig from the registry

BUILT_IN_DICT = {"ce_weight": 1.0, "nce_weight": 0.1, "kl_weight": 1.0, "temperature": 0.07, "noise_kind": "gaussian",
                 "noise_strength": 0.1, "kl_fraction": 1.0}  # LossConfig's fields before the registry, in their order


def test_built_in_terms_make_the_same_loss_config():
    from dfd_lib.training import losses

    assert loss_names() == ("ce", "nce", "kl", "mask") == losses.LOSS_NAMES
    assert [t.label for t in loss_terms()] == ["CE", "NCE", "KL", "Mask"]
    # the mask term (localisation heads) is off by default: its parameters exist, a saved config does not show them
    assert LossConfig.parameter_names() == ("ce_weight", "nce_weight", "kl_weight", "mask_weight", "temperature", "noise_kind",
                                            "noise_strength", "kl_fraction", "mask_head")
    assert LossConfig.parameter_defaults() == {**BUILT_IN_DICT, "mask_weight": 0.0, "mask_head": "light"}
    assert list(LossConfig().to_dict().items()) == list(BUILT_IN_DICT.items())  # same keys, same order: same config.json
    config = LossConfig(nce_weight=0, kl_fraction=0.5)
    assert config.to_dict() == {**BUILT_IN_DICT, "nce_weight": 0, "kl_fraction": 0.5}
    assert isinstance(config.to_dict()["nce_weight"], int)  # values kept as given, as the dataclass did
    assert config.nce_weight == 0 and config.temperature == 0.07 and config.noise_kind == "gaussian"
    assert config.weights == {"ce": 1.0, "nce": 0.0, "kl": 1.0, "mask": 0.0}
    assert [t.name for t in config.enabled] == ["ce", "kl"]
    assert config.options("kl") == {"noise_kind": "gaussian", "noise_strength": 0.1, "kl_fraction": 0.5}
    assert config.memory_factor == 0.5 and LossConfig(kl_weight=0).memory_factor == 0


def test_loss_config_equality_copies_and_files():
    config = LossConfig(nce_weight=0.5, noise_kind="uniform")
    assert config == LossConfig(nce_weight=0.5, noise_kind="uniform") and config != LossConfig()
    assert LossConfig(ce_weight=1) == LossConfig(ce_weight=1.0)  # as the dataclass compared
    assert LossConfig.from_dict(config.to_dict()) == config == LossConfig.from_params({**config.to_dict(), "lr": 1})
    assert pickle.loads(pickle.dumps(config)) == config and copy.deepcopy(config) == config
    assert config.with_weights({"kl": 0}) == LossConfig(nce_weight=0.5, noise_kind="uniform", kl_weight=0)
    assert config.replace(temperature=0.2).temperature == 0.2 and config.temperature == 0.07
    with pytest.raises(AttributeError, match="immutable"):
        config.kl_weight = 0
    with pytest.raises(ValueError, match="unknown LossConfig keys: kl_weigth"):
        LossConfig.from_dict({"kl_weigth": 0})
    with pytest.raises(ValueError, match="unknown LossConfig keys: tempreature"):
        TrainConfig(loss={"tempreature": 0.1})  # a YAML file's nested loss mapping
    with pytest.raises(TypeError, match="unknown parameter"):
        LossConfig(kl_weigth=0)
    with pytest.raises(ValueError, match="kl_fraction"):
        config.replace(kl_fraction=2)
    # TrainConfig saves the loss as before: a nested mapping of the flat fields, in the field's place
    saved = TrainConfig(loss=config).to_dict()
    assert saved["loss"] == {**BUILT_IN_DICT, "nce_weight": 0.5, "noise_kind": "uniform"}
    assert list(saved).index("loss") == [f.name for f in dataclasses.fields(TrainConfig)].index("loss")
    assert TrainConfig.from_dict(saved) == TrainConfig(loss=config) and TrainConfig(loss=config).same_run_as(saved)
