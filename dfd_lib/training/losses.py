"""The three training losses of an expert, each switchable by its weight and logged on its own.

- ``ce``: cross-entropy on real (0) / fake (1);
- ``nce``: a supervised contrastive loss (Khosla et al., 2020) on the L2-normalised pooled
  features: same-class pairs are pulled together, real-fake pairs pushed apart;
- ``kl``: the KL divergence between the prediction on an image and on the same image with
  random noise added (a consistency term that makes the expert ignore small perturbations).

:class:`MultiLoss` returns DeepfakeBench's dict shape: ``{"overall", "ce", "nce", "kl"}``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dfd_lib.core.config import StepConfig

NOISE_KINDS = ("gaussian", "uniform")
LOSS_NAMES = ("ce", "nce", "kl")


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (B, C) against integer ``labels`` (B,)."""
    return F.cross_entropy(logits.float(), labels.long())


def supervised_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """SupCon loss on ``features`` (B, D), L2-normalised here.

    For each anchor ``i`` with at least one other sample of its class, the loss is the mean
    over those positives ``p`` of ``-log(exp(s_ip / t) / sum_{a != i} exp(s_ia / t))`` with
    ``s`` the cosine similarity; the result is the mean over such anchors. A batch in which
    no sample has a same-class partner gives 0 (still attached to the graph, so backward works).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"expected features (B, D) and labels (B,), got {tuple(features.shape)} and {tuple(labels.shape)}")
    z = F.normalize(features.float(), dim=1)
    n = z.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (z @ z.T) / temperature
    logits = logits.masked_fill(self_mask, float("-inf"))  # an anchor is not its own contrast
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_positives = positives.sum(dim=1)
    anchors = n_positives > 0
    if not bool(anchors.any()):
        return features.sum() * 0.0
    # where() rather than multiplying, so the -inf on the diagonal never meets a 0
    positive_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    return -(positive_log_prob[anchors] / n_positives[anchors]).mean()


def noise_consistency_kl(logits_clean: torch.Tensor, logits_noisy: torch.Tensor) -> torch.Tensor:
    """``KL(p_clean || p_noisy)`` of the softmax predictions, averaged over the batch.

    Gradients flow through both predictions: the term pulls them towards each other."""
    log_p_clean = F.log_softmax(logits_clean.float(), dim=1)
    log_p_noisy = F.log_softmax(logits_noisy.float(), dim=1)
    return F.kl_div(log_p_noisy, log_p_clean, reduction="batchmean", log_target=True)


def add_noise(x: torch.Tensor, kind: str = "gaussian", strength: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` plus random noise: ``gaussian`` has standard deviation ``strength``, ``uniform``
    is drawn from ``[-strength, strength]``. ``x`` is the normalised input tensor, so
    ``strength`` is in normalised units."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
    if strength < 0:
        raise ValueError(f"noise strength must be >= 0, got {strength}")
    if kind == "gaussian":
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    else:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2.0 - 1.0
    return x + strength * noise


@dataclass
class LossConfig(StepConfig):
    """Weights of the three losses (0 switches a loss off) and their parameters."""

    ce_weight: float = 1.0
    nce_weight: float = 0.1
    kl_weight: float = 1.0
    temperature: float = 0.07  # SupCon temperature
    noise_kind: str = "gaussian"  # "gaussian" | "uniform"
    noise_strength: float = 0.1  # std (gaussian) or half-width (uniform), in normalised units
    kl_fraction: float = 1.0  # share of each batch that gets a noisy copy for the KL term (CPU budgets: < 1)

    def __post_init__(self):
        for name in ("ce_weight", "nce_weight", "kl_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or value != value:
                raise ValueError(f"LossConfig.{name} must be a number >= 0, got {value!r}")
        if self.ce_weight == 0 and self.nce_weight == 0 and self.kl_weight == 0:
            raise ValueError("LossConfig: at least one of ce_weight, nce_weight, kl_weight must be > 0")
        if self.ce_weight == 0 and self.nce_weight == 0:
            raise ValueError("LossConfig: kl_weight alone does not learn the labels; set ce_weight or nce_weight > 0")
        if not self.temperature > 0:
            raise ValueError(f"LossConfig.temperature must be > 0, got {self.temperature}")
        if self.noise_kind not in NOISE_KINDS:
            raise ValueError(f"LossConfig.noise_kind must be one of {NOISE_KINDS}, got {self.noise_kind!r}")
        if not self.noise_strength >= 0:
            raise ValueError(f"LossConfig.noise_strength must be >= 0, got {self.noise_strength}")
        if not (isinstance(self.kl_fraction, (int, float)) and 0 < self.kl_fraction <= 1):
            raise ValueError(f"LossConfig.kl_fraction must be in (0, 1], got {self.kl_fraction!r}")

    @property
    def weights(self) -> dict[str, float]:
        return {"ce": float(self.ce_weight), "nce": float(self.nce_weight), "kl": float(self.kl_weight)}


class MultiLoss:
    """The weighted sum of the enabled losses for one batch.

    ``loss(model, images, labels)`` runs the model (and, only when ``kl_weight > 0``, the
    noisy copy of the batch in the same forward pass: one larger batch is cheaper than two
    passes; with ``kl_fraction < 1`` only the first ``ceil(kl_fraction * B)`` images of the
    batch, which is in random order, get a noisy copy) and returns ``{"overall", "ce", "nce",
    "kl"}``; disabled losses are 0 and cost nothing. ``model(x)`` must return ``{"logits": (B, 2), "features": (B, D)}``.
    """

    def __init__(self, config: LossConfig | None = None):
        self.config = config or LossConfig()

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        n = images.shape[0]
        if cfg.kl_weight > 0:
            k = max(1, math.ceil(cfg.kl_fraction * n - 1e-9))
            noisy = add_noise(images[:k], cfg.noise_kind, cfg.noise_strength)
            outputs = model(torch.cat([images, noisy], dim=0))
            logits, logits_noisy = outputs["logits"][:n], outputs["logits"][n:]
            features = outputs["features"][:n]
        else:
            outputs = model(images)
            logits, logits_noisy, features = outputs["logits"], None, outputs["features"]
        return self.from_outputs(logits, features, labels, logits_noisy)

    def from_outputs(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        logits_noisy: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss dict from outputs already computed (``logits_noisy`` needed when kl is on;
        it may cover the first rows of the batch only, see ``kl_fraction``)."""
        cfg = self.config
        zero = logits.new_zeros((), dtype=torch.float32)
        parts = {
            "ce": cross_entropy_loss(logits, labels) if cfg.ce_weight > 0 else zero,
            "nce": supervised_contrastive_loss(features, labels, cfg.temperature) if cfg.nce_weight > 0 else zero,
            "kl": zero,
        }
        if cfg.kl_weight > 0:
            if logits_noisy is None:
                raise ValueError("kl_weight > 0 needs the logits of the noisy images")
            if logits_noisy.shape[0] > logits.shape[0]:
                raise ValueError(f"{logits_noisy.shape[0]} noisy logits for a batch of {logits.shape[0]}")
            parts["kl"] = noise_consistency_kl(logits[: logits_noisy.shape[0]], logits_noisy)
        overall = sum(cfg.weights[name] * parts[name] for name in LOSS_NAMES if cfg.weights[name] > 0)
        return {"overall": overall, **parts}
