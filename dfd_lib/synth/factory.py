"""The one fake factory: the registry of kinds and families of made images, which notebook 03's
enrichment (:mod:`dfd_lib.synth.enrichment`), ``dfd augment``, the demo dataset
(:mod:`dfd_lib.sources.demo`) and ``dfd check`` all read.

Each family is declared once, as a :class:`~dfd_lib.synth.kinds.Family` given to
:func:`register_family`: its name, its kind, its label (fakes, or the source's label) and what runs
it. The library registers its own on import (end of this file): the edits of
:mod:`dfd_lib.synth.edits` (``splice``, ``colour_background``, ``resample``, ``self_blend``), the
Stable Diffusion regenerations (``sd_img2img``, ``sd_inpaint``) and ``degraded`` (label-preserving
degradations, whose images made from fakes are written as ``degraded_fake``). A new model-backed kind
(a GAN, another diffusion task) is a :class:`~dfd_lib.synth.kinds.ModelKind` given to
:func:`register_kind`, then its families.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from dfd_lib.synth import edits
from dfd_lib.synth.kinds import Family, ImageKind, ModelKind
from dfd_lib.synth.stable_diffusion import StableDiffusionKind

Kind = ImageKind | ModelKind
_KINDS: dict[str, Kind] = {}
_FAMILIES: dict[str, Family] = {}  # in registration order: the order of tables and of generation


def register_kind(kind: Kind) -> Kind:
    """Make ``kind`` available to families by its name."""
    if not isinstance(kind, (ImageKind, ModelKind)) or not kind.name:
        raise TypeError(f"a kind is a named ImageKind or ModelKind, got {kind!r}")
    if kind.name in _KINDS:
        raise ValueError(f"kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def register_family(family: Family) -> Family:
    """Make ``family`` available to the enrichment, ``dfd augment`` and the demo by its name."""
    taken = [name for name in (family.name, family.fake_variant) if name and _find(name) is not None]
    if taken:
        raise ValueError(f"family name {taken[0]!r} is already registered")
    get_kind(family.kind).check_family(family)
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    if name not in _FAMILIES:
        raise ValueError(f"family {name!r} is not registered")
    del _FAMILIES[name]


def unregister_kind(name: str) -> None:
    users = [family.name for family in _FAMILIES.values() if family.kind == name]
    if users:
        raise ValueError(f"kind {name!r} still serves families {users}")
    _KINDS.pop(get_kind(name).name)


@contextmanager
def registered(*items: Kind | Family) -> Iterator[None]:
    """Kinds and families registered for the block only (in order; removed again in reverse order)."""
    done: list[Kind | Family] = []
    try:
        for item in items:
            (register_family if isinstance(item, Family) else register_kind)(item)
            done.append(item)
        yield
    finally:
        for item in reversed(done):
            (unregister_family if isinstance(item, Family) else unregister_kind)(item.name)


def get_kind(name: str) -> Kind:
    if name not in _KINDS:
        raise ValueError(f"unknown kind {name!r}; expected one of {sorted(_KINDS)}")
    return _KINDS[name]


def get_family(name: str) -> Family:
    """The family ``name`` names: a registered family or the fake variant of a label-keeping one."""
    family = _find(name)
    if family is None:
        raise ValueError(f"unknown family {name!r}; expected one of {list(_FAMILIES)}")
    return family


def kind_of(family: Family | str) -> Kind:
    return get_kind((get_family(family) if isinstance(family, str) else family).kind)


def family_names(fakes_only: bool = False) -> tuple[str, ...]:
    """The registered families, in registration order (``fakes_only``: those whose images are all fakes)."""
    return tuple(name for name, family in _FAMILIES.items() if not (fakes_only and family.keeps_label))


def model_families(names: Iterable[str] | None = None) -> list[Family]:
    """The registered families of model-backed kinds, in registration order; only those in ``names`` if given."""
    wanted = None if names is None else set(names)
    return [family for family in _FAMILIES.values()
            if isinstance(_KINDS[family.kind], ModelKind) and (wanted is None or family.name in wanted)]


def check_families(families: Sequence[str], known: Sequence[str] | None = None) -> tuple[str, ...]:
    """``families`` as a tuple, or a ``ValueError`` naming the unknown (default: not registered) or repeated ones."""
    families, known = tuple(families), family_names() if known is None else tuple(known)
    unknown = [f for f in families if f not in known]
    if unknown:
        raise ValueError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; expected some of {list(known)}")
    if len(set(families)) != len(families):
        raise ValueError(f"families are listed twice: {list(families)}")
    return families


def _find(name: str) -> Family | None:
    if name in _FAMILIES:
        return _FAMILIES[name]
    return next((family for family in _FAMILIES.values() if family.fake_variant == name), None)


# --------------------------------------------------------------------------- built-ins
EDIT = register_kind(ImageKind("edit"))
DEGRADATION = register_kind(ImageKind("degradation"))
STABLE_DIFFUSION = register_kind(StableDiffusionKind())
register_family(Family("splice", EDIT.name, edits.splice, needs_donor=True))
register_family(Family("colour_background", EDIT.name, edits.colour_background))
register_family(Family("resample", EDIT.name, edits.resample_artifacts))
register_family(Family("self_blend", EDIT.name, edits.self_blend))
register_family(Family("sd_img2img", STABLE_DIFFUSION.name, task="img2img"))
register_family(Family("sd_inpaint", STABLE_DIFFUSION.name, task="inpaint"))
register_family(Family("degraded", DEGRADATION.name, edits.degrade, keeps_label=True))
BUILTIN_FAMILIES = family_names()  # what the library registers; EnrichmentConfig's default
