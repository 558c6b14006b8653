"""An expert's training loss: :class:`LossConfig` (every registered term's weight and options) and
:class:`MultiLoss` (their weighted sum for one batch, each part logged on its own).

The terms themselves, and how to add one, are in :mod:`dfd_lib.training.loss_terms`: nothing here
names a term. With the built-in terms (``ce``, ``nce``, ``kl``) ``LossConfig`` takes
``ce_weight``, ``nce_weight``, ``kl_weight``, ``temperature``, ``noise_kind``, ``noise_strength``
and ``kl_fraction``, and :class:`MultiLoss` returns DeepfakeBench's dict shape:
``{"overall", "ce", "nce", "kl"}``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dfd_lib.core.config import StepConfig
from dfd_lib.training.loss_terms import (
    NOISE_KINDS,
    LossTerm,
    TermInputs,
    add_noise,
    cross_entropy_loss,
    get_loss_term,
    loss_names,
    loss_parameter_names,
    loss_terms,
    noise_consistency_kl,
    supervised_contrastive_loss,
)

__all__ = ["NOISE_KINDS", "LossConfig", "MultiLoss", "add_noise", "cross_entropy_loss", "loss_names",
           "noise_consistency_kl", "supervised_contrastive_loss"]


def __getattr__(name: str) -> Any:
    if name == "LOSS_NAMES":  # the registered terms' names, read when asked for (terms can be registered later)
        return loss_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _defaults() -> dict[str, Any]:
    return {**{term.weight_name: term.default_weight for term in loss_terms()},
            **{option.name: option.default for term in loss_terms() for option in term.options}}


class LossConfig(StepConfig):
    """Weights of the registered loss terms (0 switches a term off) and their options, as flat
    parameters: ``LossConfig(nce_weight=0, kl_fraction=0.5)``. Immutable: :meth:`replace` and
    :meth:`with_weights` give changed copies. A parameter of a term registered after the config
    was built reads as its default."""

    __hash__ = None  # mutable-looking equality like the dataclass it replaces: not a dict key

    def __init__(self, **params: Any):
        unknown = [name for name in params if name not in loss_parameter_names()]
        if unknown:
            raise TypeError(f"LossConfig got unknown parameter(s) {unknown} (known: {', '.join(loss_parameter_names())})")
        object.__setattr__(self, "_values", {name: params.get(name, default) for name, default in _defaults().items()})
        self._validate()

    def _validate(self) -> None:
        terms = loss_terms()
        for term in terms:
            value = self.parameters()[term.weight_name]
            if not isinstance(value, (int, float)) or value < 0 or value != value:
                raise ValueError(f"LossConfig.{term.weight_name} must be a number >= 0, got {value!r}")
        enabled = self.enabled
        if not enabled:
            raise ValueError(f"LossConfig: at least one of {', '.join(t.weight_name for t in terms)} must be > 0")
        if not any(term.learns_labels for term in enabled):
            alone = " and ".join(term.weight_name for term in enabled)
            learners = " or ".join(term.weight_name for term in terms if term.learns_labels)
            raise ValueError(f"LossConfig: {alone} alone {'does' if len(enabled) == 1 else 'do'} not learn the labels; "
                             f"set {learners} > 0")
        for term in terms:
            for option in term.options:
                option.validate(self.parameters()[option.name])

    # ----------------------------------------------------------------- parameters by name

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        names = loss_parameter_names()
        shadowed = [name for name in names if hasattr(cls, name)]
        if shadowed:  # a parameter named like a method would never be read
            raise ValueError(f"loss parameter name(s) {shadowed} clash with LossConfig's own attributes")
        return names

    @classmethod
    def parameter_defaults(cls) -> dict[str, Any]:
        return {name: _defaults()[name] for name in cls.parameter_names()}

    @classmethod
    def parameter_specs(cls) -> dict[str, tuple[Any, Any]]:
        """``name -> (type, default)``: a weight is a float, an option the type of its default."""
        return {name: (type(default), default) for name, default in cls.parameter_defaults().items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LossConfig:
        """The config from a file's mapping (``TrainConfig``'s nested ``loss``): every key must be a parameter."""
        unknown = sorted(set(data) - set(cls.parameter_names()))
        if unknown:
            raise ValueError(f"unknown LossConfig keys: {', '.join(unknown)} (known: {', '.join(sorted(cls.parameter_names()))})")
        return cls(**data)

    def parameters(self) -> dict[str, Any]:
        """Every parameter of every registered term, by name (weights first, then options; registration order)."""
        return {name: self._values.get(name, default) for name, default in _defaults().items()}

    def to_dict(self) -> dict[str, Any]:
        """The parameters as saved in a training's config. A term that is off by default and left
        off at its defaults is not written: a config saved before it was registered stays the same."""
        values = self.parameters()
        saved = {}
        for term in loss_terms():
            names = [term.weight_name, *(option.name for option in term.options)]
            if term.default_weight == 0 and all(values[name] == _defaults()[name] for name in names):
                continue
            saved.update((name, values[name]) for name in names)
        return {name: saved[name] for name in values if name in saved}  # weights first, as in parameters()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # copy / pickle look for hooks before _values exists
            raise AttributeError(name)
        values = self.parameters()
        if name not in values:
            raise AttributeError(f"LossConfig has no parameter {name!r} (known: {', '.join(values)})")
        return values[name]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"LossConfig is immutable: use config.replace({name}=...)")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self.parameters() == other.parameters()

    def __repr__(self) -> str:
        return f"LossConfig({', '.join(f'{name}={value!r}' for name, value in self.parameters().items())})"

    # ----------------------------------------------------------------- derived views

    @property
    def weights(self) -> dict[str, float]:
        """Term name -> weight, every registered term."""
        values = self.parameters()
        return {term.name: float(values[term.weight_name]) for term in loss_terms()}

    @property
    def enabled(self) -> tuple[LossTerm, ...]:
        """The terms with a weight > 0, in registration order."""
        weights = self.weights
        return tuple(term for term in loss_terms() if weights[term.name] > 0)

    def options(self, term: str) -> dict[str, Any]:
        """The options of the term named ``term``: ``{"temperature": 0.07}`` for ``nce``."""
        return get_loss_term(term).option_values(self.parameters())

    @property
    def memory_factor(self) -> float:
        """Extra images per image the enabled terms add to a forward pass (the KL term's noisy copies: ``kl_fraction``)."""
        return sum(term.extra_images(self.options(term.name)) for term in self.enabled)

    def replace(self, **params: Any) -> LossConfig:
        """A copy with ``params`` changed (validated again)."""
        return LossConfig(**{**self.parameters(), **params})

    def with_weights(self, weights: Mapping[str, float]) -> LossConfig:
        """A copy with the weights of the terms named in ``weights`` changed: ``with_weights({"kl": 0})``."""
        return self.replace(**{get_loss_term(name).weight_name: weight for name, weight in weights.items()})


class MultiLoss:
    """The weighted sum of the enabled loss terms for one batch.

    ``loss(model, images, labels)`` runs the model once: on the batch, plus the noisy copies of the
    enabled terms that ask for one (the KL term: the first ``ceil(kl_fraction * B)`` images of the
    batch, which is in random order, with noise added) in the same forward pass, since one larger
    batch is cheaper than two passes. It returns ``{"overall", <every registered term>}``; disabled
    terms are 0 and cost nothing. ``model(x)`` must return ``{"logits": (B, 2), "features": (B, D)}``, and
    ``"mask_logits"`` for the ``mask`` term, which also needs the batch's ``masks`` and ``has_mask``.
    """

    def __init__(self, config: LossConfig | None = None):
        self.config = config or LossConfig()

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 masks: torch.Tensor | None = None, has_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        cfg = self.config
        n = images.shape[0]
        # drawn in registration order: the RNG calls, hence a training, are the same every time
        copies = {term.name: term.noisy_copy(images, **cfg.options(term.name)) for term in cfg.enabled if term.needs_noisy_copy}
        if not copies:
            outputs = model(images)
            return self.from_outputs(outputs["logits"], outputs["features"], labels,
                                     mask_logits=outputs.get("mask_logits"), masks=masks, has_mask=has_mask)
        outputs = model(torch.cat([images, *copies.values()], dim=0))
        noisy, start = {}, n
        for name, copy in copies.items():
            noisy[name] = outputs["logits"][start:start + copy.shape[0]]
            start += copy.shape[0]
        mask_logits = outputs.get("mask_logits")  # the clean rows' maps only: the noisy copies' are not trained
        return self.from_outputs(outputs["logits"][:n], outputs["features"][:n], labels, noisy,
                                 mask_logits=None if mask_logits is None else mask_logits[:n], masks=masks, has_mask=has_mask)

    def from_outputs(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        logits_noisy: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
        *,
        mask_logits: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss dict from outputs already computed. ``logits_noisy``: the logits of the noisy
        copies, by term name (or one tensor for every term that needs one); a copy may cover the
        first rows of the batch only (see ``kl_fraction``). ``mask_logits``, ``masks`` and ``has_mask``:
        the localisation heads' logits, the rows' masks and which rows have one (the ``mask`` term)."""
        cfg = self.config
        weights = cfg.weights
        zero = logits.new_zeros((), dtype=torch.float32)
        parts = {}
        for term in loss_terms():
            if weights[term.name] <= 0:
                parts[term.name] = zero
                continue
            noisy = None
            if term.needs_noisy_copy:
                noisy = logits_noisy.get(term.name) if isinstance(logits_noisy, Mapping) else logits_noisy
                if noisy is None:
                    raise ValueError(f"{term.weight_name} > 0 needs the logits of the noisy images")
                if noisy.shape[0] > logits.shape[0]:
                    raise ValueError(f"{noisy.shape[0]} noisy logits for a batch of {logits.shape[0]}")
            inputs = TermInputs(logits, features, labels, noisy, mask_logits, masks, has_mask)
            parts[term.name] = term.compute(inputs, **cfg.options(term.name))
        # the same order as the terms' registration (ce, nce, kl, ...): the same float sum every time
        overall = sum(weights[name] * parts[name] for name in parts if weights[name] > 0)
        return {"overall": overall, **parts}
