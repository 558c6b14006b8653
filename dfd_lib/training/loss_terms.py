"""The registry of an expert's training loss terms, and the three built-in terms.

A loss term is declared in one place, by one :func:`loss_term` decorator (or one
:func:`register_loss_term` call) on the function computing it; everything else is derived from
the registry: :class:`~dfd_lib.training.losses.LossConfig`'s parameters (``<name>_weight`` and the
term's options, with their defaults and validation, so also ``TrainConfig.from_params`` and the
saved ``config.json``), :class:`~dfd_lib.training.losses.MultiLoss`'s forward pass and output
dict, the trainer's per-term sums (``train_<name>`` in ``history.csv``, ``loss_<name>`` in
``curves.csv``), the curves figure's panels, the loss ablation's variants and columns, the
configs table and the preflight's memory estimate.

Built-in terms (in this order, which is also the order of the weighted sum; ``mask`` is off by default):

- ``ce``: cross-entropy on real (0) / fake (1);
- ``nce``: a supervised contrastive loss (Khosla et al., 2020) on the L2-normalised pooled
  features: same-class pairs are pulled together, real-fake pairs pushed apart;
- ``kl``: the KL divergence between the prediction on an image and on the same image with
  random noise added (a consistency term that makes the expert ignore small perturbations);
- ``mask``: per-pixel binary cross-entropy between the expert's localisation map (its head's logits,
  upsampled to the input's size) and the row's manipulation mask, averaged over the rows that have a
  mask. Rows without one (reals, a user's rows with an empty ``mask``) contribute nothing: a real is not
  taught "nothing changed" (the issue's rule; a real's map is left to what the fakes taught). On, it gives
  each expert a localisation head of kind ``mask_head`` (:mod:`dfd_lib.models.localisation`).

How to add a term (one file: this one for a term of the library, or your own module, notebook
or test, imported before the config is built)::

    @loss_term("margin", label="Margin", default_weight=0.0, options=[
        LossOption("margin", 0.25, lambda v: 0 < v < 0.5, "in (0, 0.5)", "how far past 0.5 the fake probability must be")])
    def margin_term(batch: TermInputs, margin: float) -> torch.Tensor:
        # a hinge on the fake probability: a prediction closer than `margin` to 0.5, or wrong, costs
        p_fake = batch.logits.float().softmax(dim=1)[:, 1]
        return F.relu(margin - (2 * batch.labels.float() - 1) * (p_fake - 0.5)).mean()

That gives ``margin_weight`` and ``margin`` to ``LossConfig`` and ``TrainConfig`` (``from_params``
reads them from notebook 04's parameters, ``from_dict`` from a ``dfd train`` YAML's ``loss:``),
``losses["margin"]`` from ``MultiLoss`` (added to the sum after the terms registered before it), a
``loss_margin`` curve and a "CE + Margin" ablation variant once the term has a weight. Give a new term ``default_weight=0`` (off unless
asked for): a config that leaves it off and at its defaults then saves exactly the same
``config.json`` as before the term existed, so earlier trainings are still found and reused. A
term that runs the model on a changed copy of the batch gives ``noisy_copy`` (see
:class:`LossTerm`) and its ``memory_factor``. A term of the library must also be declared, with
the same defaults, in notebook 04's parameters cell (``tests/test_step_configs.py`` checks it).
"""
from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dfd_lib.models.localisation import HEAD_KINDS

NOISE_KINDS = ("gaussian", "uniform")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_RESERVED = ("overall",)  # MultiLoss's sum sits beside the terms in one dict


@dataclass(frozen=True)
class TermInputs:
    """What a term is computed from: the model's outputs on one batch."""

    logits: torch.Tensor  # (B, 2) on the clean images
    features: torch.Tensor  # (B, D) pooled features of the clean images
    labels: torch.Tensor  # (B,) 0 real, 1 fake
    noisy_logits: torch.Tensor | None = None  # (k, 2) on this term's noisy copy of the first k images; None without one
    mask_logits: torch.Tensor | None = None  # (B, 1, h, w) of the clean images' localisation heads; None without heads
    masks: torch.Tensor | None = None  # (B, 1, S, S) in [0, 1], 1 = changed; None when the batch carries none
    has_mask: torch.Tensor | None = None  # (B,) bool: which rows have a mask (the others' masks are zeros, unused)


@dataclass(frozen=True)
class LossOption:
    """One option of a term: a flat ``LossConfig`` / ``TrainConfig`` parameter."""

    name: str
    default: Any
    check: Callable[[Any], bool]  # True when a value is valid
    requirement: str  # what a valid value is, for the error message: "> 0", "in (0, 1]"
    help: str = ""  # what it sets (notebook 04 says the same in its parameters cell)
    in_summary: bool = False  # shown in the run's table of training settings (a cost setting)

    def validate(self, value: Any) -> None:
        try:
            ok = bool(self.check(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"LossConfig.{self.name} must be {self.requirement}, got {value!r}")


@dataclass(frozen=True)
class LossTerm:
    """A registered loss term; build it with :func:`register_loss_term` or :func:`loss_term`."""

    name: str  # the key in MultiLoss's dict and in the curves; the weight is "<name>_weight"
    label: str  # in tables and ablation variant names: "CE", "NCE", "KL"
    compute: Callable[..., torch.Tensor]  # compute(TermInputs, **options) -> scalar tensor
    default_weight: float
    options: tuple[LossOption, ...] = ()
    # noisy_copy(images, **options) -> images for the first k <= B images of the batch, run in the
    # same forward pass as the batch (one larger batch is cheaper than two passes); its logits
    # reach compute as TermInputs.noisy_logits. None: the term needs no extra images.
    noisy_copy: Callable[..., torch.Tensor] | None = None
    # extra images per image of the batch that noisy_copy adds to the forward pass (preflight's
    # memory estimate): a number or memory_factor(**options); None: 1 with a noisy copy, 0 without
    memory_factor: Callable[..., float] | float | None = None
    learns_labels: bool = True  # False: the term alone cannot train a detector (a consistency term)
    doc: str = field(default="", compare=False)

    @property
    def weight_name(self) -> str:
        return f"{self.name}_weight"

    @property
    def needs_noisy_copy(self) -> bool:
        return self.noisy_copy is not None

    def option_values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """This term's options out of a mapping of parameters (absent ones at their default)."""
        return {option.name: values.get(option.name, option.default) for option in self.options}

    def extra_images(self, options: Mapping[str, Any]) -> float:
        """Extra images per image this term adds to a forward pass with ``options``."""
        factor = self.memory_factor
        if factor is None:
            return 1.0 if self.needs_noisy_copy else 0.0
        return float(factor(**options)) if callable(factor) else float(factor)


_TERMS: dict[str, LossTerm] = {}  # in registration order: the order of the sum, the dict, the columns


def loss_terms() -> tuple[LossTerm, ...]:
    """Every registered term, in registration order (the built-ins first: ce, nce, kl)."""
    return tuple(_TERMS.values())


def loss_names() -> tuple[str, ...]:
    """The registered terms' names, in registration order."""
    return tuple(_TERMS)


def get_loss_term(name: str) -> LossTerm:
    if name not in _TERMS:
        raise KeyError(f"no loss term {name!r} (registered: {', '.join(_TERMS)})")
    return _TERMS[name]


def loss_parameter_names() -> tuple[str, ...]:
    """``LossConfig``'s parameters: every term's weight, then every term's options (registration order)."""
    return (*(term.weight_name for term in _TERMS.values()),
            *(option.name for term in _TERMS.values() for option in term.options))


def loss_summary_names() -> tuple[str, ...]:
    """The loss parameters a table of training settings shows: every weight, then the options marked ``in_summary``."""
    return (*(term.weight_name for term in _TERMS.values()),
            *(option.name for term in _TERMS.values() for option in term.options if option.in_summary))


def register_loss_term(
    name: str,
    compute: Callable[..., torch.Tensor],
    *,
    label: str,
    default_weight: float,
    options: Sequence[LossOption] = (),
    noisy_copy: Callable[..., torch.Tensor] | None = None,
    memory_factor: Callable[..., float] | float | None = None,
    learns_labels: bool = True,
) -> LossTerm:
    """Register a loss term and return it. ``compute(TermInputs, **options)`` returns the term's
    scalar for the batch; its weight parameter is ``<name>_weight`` (default ``default_weight``;
    0 = off unless asked for); ``options`` are its own parameters. See :class:`LossTerm`."""
    term = LossTerm(name=name, label=label, compute=compute, default_weight=default_weight, options=tuple(options),
                    noisy_copy=noisy_copy, memory_factor=memory_factor, learns_labels=learns_labels,
                    doc=(compute.__doc__ or "").strip())
    _check_new_term(term)
    _TERMS[name] = term
    return term


def loss_term(name: str, **declaration: Any) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator form of :func:`register_loss_term` on the term's function (returned unchanged)."""

    def register(compute: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        register_loss_term(name, compute, **declaration)
        return compute

    return register


def unregister_loss_term(name: str) -> None:
    get_loss_term(name)
    del _TERMS[name]


@contextmanager
def restored_loss_terms() -> Iterator[None]:
    """The registry as it is now comes back on exit: terms registered inside are dropped (tests, experiments)."""
    saved = dict(_TERMS)
    try:
        yield
    finally:
        _TERMS.clear()
        _TERMS.update(saved)


def _check_new_term(term: LossTerm) -> None:
    if not _NAME.match(term.name) or term.name in _RESERVED:
        raise ValueError(f"a loss term's name must be a lowercase identifier other than {_RESERVED}, got {term.name!r}")
    if term.name in _TERMS:
        raise ValueError(f"loss term {term.name!r} is already registered (unregister_loss_term it first)")
    if not callable(term.compute):
        raise TypeError(f"loss term {term.name!r}: compute must be callable")
    if not (isinstance(term.default_weight, (int, float)) and term.default_weight >= 0):
        raise ValueError(f"loss term {term.name!r}: default_weight must be a number >= 0, got {term.default_weight!r}")
    names = [term.weight_name, *(option.name for option in term.options)]
    taken = sorted((set(names) & set(loss_parameter_names())) | {n for n in names if names.count(n) > 1})
    if taken:
        raise ValueError(f"loss term {term.name!r}: parameter name(s) {taken} already used by a loss term")
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise ValueError(f"loss term {term.name!r}: parameter names must be lowercase identifiers, got {bad}")
    for option in term.options:
        option.validate(option.default)  # a default that fails its own check would break LossConfig()


# --------------------------------------------------------------------------- the built-in terms


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


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value


@loss_term("ce", label="CE", default_weight=1.0)
def ce_term(batch: TermInputs) -> torch.Tensor:
    """Cross-entropy of the clean predictions."""
    return cross_entropy_loss(batch.logits, batch.labels)


@loss_term("nce", label="NCE", default_weight=0.1, options=[
    LossOption("temperature", 0.07, lambda v: _is_number(v) and v > 0, "> 0", "temperature of the contrastive loss"),
])
def nce_term(batch: TermInputs, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss of the pooled features."""
    return supervised_contrastive_loss(batch.features, batch.labels, temperature)


def _noisy_first_rows(images: torch.Tensor, noise_kind: str, noise_strength: float, kl_fraction: float) -> torch.Tensor:
    """The first ``ceil(kl_fraction * B)`` images (at least one; the batch is in random order) with noise added."""
    k = max(1, math.ceil(kl_fraction * images.shape[0] - 1e-9))
    return add_noise(images[:k], noise_kind, noise_strength)


@loss_term("kl", label="KL", default_weight=1.0, learns_labels=False, noisy_copy=_noisy_first_rows,
           memory_factor=lambda noise_kind, noise_strength, kl_fraction: kl_fraction, options=[
    LossOption("noise_kind", "gaussian", lambda v: v in NOISE_KINDS, f"one of {NOISE_KINDS}",
               "noise of the KL term, gaussian or uniform"),
    LossOption("noise_strength", 0.1, lambda v: _is_number(v) and v >= 0, ">= 0",
               "noise std (gaussian) or half-width (uniform), in normalised units"),
    LossOption("kl_fraction", 1.0, lambda v: _is_number(v) and 0 < v <= 1, "in (0, 1]",
               "share of each batch given a noisy copy for the KL term (less is cheaper on a CPU)", in_summary=True),
])
def kl_term(batch: TermInputs, noise_kind: str, noise_strength: float, kl_fraction: float) -> torch.Tensor:
    """KL consistency between the clean and the noisy predictions of the noised images."""
    return noise_consistency_kl(batch.logits[: batch.noisy_logits.shape[0]], batch.noisy_logits)


def masked_bce(mask_logits: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel BCE of ``mask_logits`` ``(B, 1, h, w)``, upsampled bilinearly to the masks' size, against
    ``masks`` ``(B, 1, S, S)``, over the rows where ``has_mask``; 0 (attached to the graph) when none has one."""
    if not bool(has_mask.any()):
        return mask_logits.sum() * 0.0
    logits = F.interpolate(mask_logits.float(), size=tuple(masks.shape[-2:]), mode="bilinear", align_corners=False)
    per_row = F.binary_cross_entropy_with_logits(logits, masks.float(), reduction="none").mean(dim=(1, 2, 3))
    return per_row[has_mask.bool()].mean()


@loss_term("mask", label="Mask", default_weight=0.0, learns_labels=False, options=[
    LossOption("mask_head", "light", lambda v: v in HEAD_KINDS, f"one of {HEAD_KINDS}",
               "the experts' localisation head when mask_weight > 0: light (conv-relu-conv) or linear (1x1 conv)"),
])
def mask_term(batch: TermInputs, mask_head: str) -> torch.Tensor:
    """Per-pixel BCE of the localisation map against the masks, over the rows that have one."""
    if batch.mask_logits is None:
        raise ValueError(f"mask_weight > 0 needs experts with a localisation head (mask_head {mask_head!r})")
    if batch.masks is None or batch.has_mask is None:
        return batch.mask_logits.sum() * 0.0
    return masked_bce(batch.mask_logits[: batch.masks.shape[0]], batch.masks, batch.has_mask)
