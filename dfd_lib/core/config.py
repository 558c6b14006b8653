"""One way to build a step's config: typed dataclasses that read their parameters by name.

A step config (:class:`StepConfig` subclass, a dataclass) is built in one call from any mapping
of parameter names — a notebook's ``globals()``, a profile section, a parsed command line —
with :meth:`StepConfig.from_params`, which takes the names the config declares and leaves the
others alone. Files (YAML / JSON configs) go through :meth:`StepConfig.from_dict`, which refuses
unknown keys. Defaults live in the dataclass only: each notebook's parameters cell repeats them,
and ``tests/test_step_configs.py`` fails when a notebook, a profile and a config disagree.
:func:`add_arguments` turns a config into command-line options, so a command takes every option
its notebook has.

A *composite* config is a step config whose every field is itself a step config, each with a
default: its *parts*. It reads all of them from one flat mapping (a notebook builds one config
for the whole step): :meth:`~StepConfig.from_params` builds each part from the same names, and
one name (``seed``) may feed several parts, which must then declare it with the same default.
``parameter_names()`` / ``parameter_defaults()`` / :func:`add_arguments` give the flattened
union; files nest (``{"dataset": {...}, "embedding": {...}}``) in :meth:`~StepConfig.from_dict`
and :meth:`~StepConfig.to_dict`. Each part validates its own fields.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import json
import tokenize
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T", bound="StepConfig")


class StepConfig:
    """Mixin for config dataclasses: build from parameters or files, dump to a dict. A composite that
    adds its own ``__post_init__`` (a check across parts) calls ``super().__post_init__()`` first."""

    def __post_init__(self) -> None:
        # only composites have work here: a part given as a file's mapping is built, anything else refused
        parts = type(self).parts()
        if parts:
            type(self).parameter_defaults()  # a name shared by two parts with two defaults is an error at any use
        for name, part in parts.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, part.from_dict(value))
            elif not isinstance(value, part):
                raise ValueError(f"{type(self).__name__}.{name} must be a {part.__name__} (or a mapping of its fields), "
                                 f"got {value!r}")

    @classmethod
    def parts(cls) -> dict[str, type[StepConfig]]:
        """``field name -> config class`` of a composite config (every field a step config); ``{}`` otherwise."""
        return dict(_parts(cls))

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        """The names :meth:`from_params` reads (a notebook declares each with the same default)."""
        if cls.parts():
            return tuple(cls.parameter_defaults())
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def parameter_defaults(cls) -> dict[str, Any]:
        """``name -> default`` for :meth:`parameter_names`, as JSON-like values (tuples as lists)."""
        parts = cls.parts()
        if parts:
            return _flattened_defaults(cls, parts)
        defaults = {}
        for f in dataclasses.fields(cls):
            if f.name in cls.parameter_names():
                defaults[f.name] = json.loads(json.dumps(_field_default(f), default=_plain))
        return defaults

    @classmethod
    def parameter_types(cls) -> dict[str, Any]:
        """``name -> annotation`` (resolved) of each of :meth:`parameter_names`."""
        return {name: kind for name, (kind, _default) in cls.parameter_specs().items()}

    @classmethod
    def parameter_specs(cls) -> dict[str, tuple[Any, Any]]:
        """``name -> (annotation, default)`` of each of :meth:`parameter_names`: its own dataclass fields, then
        those of its parts (a composite) or of nested configs it flattens (TrainConfig's loss). A config that
        is not a dataclass (LossConfig, built from a registry) overrides this."""
        names = cls.parameter_names()
        hints = typing.get_type_hints(cls)
        found: dict[str, tuple[Any, Any]] = {}
        for f in dataclasses.fields(cls):
            kind = hints.get(f.name)
            if isinstance(kind, type) and issubclass(kind, StepConfig) and (f.name in cls.parts() or f.name not in names):
                for name, spec in kind.parameter_specs().items():
                    found.setdefault(name, spec)
            elif f.init:
                found.setdefault(f.name, (kind, _field_default(f)))
        return {name: found[name] for name in names if name in found}

    @classmethod
    def from_params(cls: type[T], params: Mapping[str, Any]) -> T:
        """The config from the names in ``params`` it declares; other names are ignored, absent ones keep their default.
        A composite builds each part from the same ``params``."""
        parts = cls.parts()
        if parts:
            return cls(**{name: part.from_params(params) for name, part in parts.items()})
        return cls(**{name: params[name] for name in cls.parameter_names() if name in params})

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        """The config from a file's mapping: every key must be a field (a composite's keys are its
        parts, each a mapping of that part's fields)."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        parts = cls.parts()
        for name in set(data) & set(parts):
            if not isinstance(data[name], Mapping):
                raise ValueError(f"{cls.__name__}.{name} must be a mapping of {parts[name].__name__} fields, got {data[name]!r}")
        return cls(**{name: parts[name].from_dict(value) if name in parts else value for name, value in data.items()})

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values; a composite's parts nest, as :meth:`from_dict` reads them."""
        return dataclasses.asdict(self)


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@functools.cache
def _parts(cls: type) -> tuple[tuple[str, type], ...]:
    if not dataclasses.is_dataclass(cls):
        return ()
    fields = [f for f in dataclasses.fields(cls) if f.init]
    hints = typing.get_type_hints(cls)
    kinds = [(f.name, hints.get(f.name)) for f in fields]
    if fields and all(isinstance(kind, type) and issubclass(kind, StepConfig) for _, kind in kinds):
        return tuple(kinds)
    return ()


def _flattened_defaults(cls: type, parts: Mapping[str, type[StepConfig]]) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    declared_by: dict[str, str] = {}
    for part_name, part in parts.items():
        for name, value in part.parameter_defaults().items():
            if name in defaults and defaults[name] != value:
                raise TypeError(f"{cls.__name__}: parameter {name!r} defaults to {defaults[name]!r} in part "
                                f"{declared_by[name]!r} but to {value!r} in part {part_name!r}; one name needs one default")
            defaults.setdefault(name, value)
            declared_by.setdefault(name, part_name)
    return defaults


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON-like: {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ValueError`` naming the field when ``value`` is not one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {choices}, got {value!r}")


def check_fields(config: object, checks: Iterable[tuple[str, bool, str]]) -> None:
    """Raise ``ValueError`` naming the first field whose check failed: ``checks`` are ``(field, ok, requirement)``."""
    for name, ok, requirement in checks:
        if not ok:
            raise ValueError(f"{type(config).__name__}.{name} must be {requirement}, got {getattr(config, name)!r}")


def is_int(value: Any) -> bool:
    """An int and not a bool (``True`` is an int to Python, never a count to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------- command lines


def field_comments(cls: type) -> dict[str, str]:
    """``name -> the comment after the field`` in the dataclass source: the same words the notebooks'
    parameters cells use, shown again as ``--help`` text. A composite's are its parts' (the first
    part that comments a shared name)."""
    if isinstance(cls, type) and issubclass(cls, StepConfig) and cls.parts():
        merged: dict[str, str] = {}
        for part in cls.parts().values():
            for name, text in field_comments(part).items():
                if text and not merged.get(name):
                    merged[name] = text
        return merged
    comments: dict[str, str] = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return comments
    line_comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                     for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    for number, line in enumerate(lines, start=1):
        name = line.strip().split(":", 1)[0]
        if not name.isidentifier() or line.lstrip().startswith("#"):
            continue
        if number in line_comments:
            comments.setdefault(name, line_comments[number])
            continue
        # a comment too long for the field's line stands on the lines just above it
        above = number - 1
        while above >= 1 and lines[above - 1].lstrip().startswith("#"):
            above -= 1
        if above < number - 1:
            comments.setdefault(name, " ".join(line_comments[n] for n in range(above + 1, number)))
    return comments


def _option_type(annotation: Any) -> tuple[Any, bool]:
    """``(element type, is a list)`` of a field annotation such as ``int``, ``tuple[str, ...]``, ``list``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        origin = typing.get_origin(annotation)
    if annotation in (list, tuple) or origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return (args[0] if args else str), True
    return annotation, False


def add_arguments(parser: argparse.ArgumentParser, cls: type, exclude: Iterable[str] = ()) -> None:
    """One ``--field-name`` option per parameter of the step config ``cls`` (booleans as ``--x/--no-x``,
    sequences as several values), defaulting to the field's default; a composite gives one option per
    flattened name. Read the parsed values back with ``cls.from_params(vars(args))``."""
    excluded = set(exclude)
    comments = field_comments(cls)
    for name, (annotation, default) in cls.parameter_specs().items():
        if name in excluded:
            continue
        kind, many = _option_type(annotation)
        option = "--" + name.replace("_", "-")
        text = f"{comments.get(name, '')} (default: {default!r})".strip()
        if kind is bool:
            parser.add_argument(option, dest=name, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif many:
            parser.add_argument(option, dest=name, nargs="*", type=kind, default=default, help=text)
        else:
            parser.add_argument(option, dest=name, type=kind, default=default, help=text)
