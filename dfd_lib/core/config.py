"""One way to build a step's config: typed dataclasses that read their parameters by name.

A step config (:class:`StepConfig` subclass, a dataclass) is built in one call from any mapping
of parameter names — a notebook's ``globals()``, a profile section, a parsed command line —
with :meth:`StepConfig.from_params`, which takes the names the config declares and leaves the
others alone (one notebook namespace feeds several configs). Files (YAML / JSON configs) go
through :meth:`StepConfig.from_dict`, which refuses unknown keys. Defaults live in the
dataclass only: each notebook's parameters cell repeats them, and ``tests/test_step_configs.py``
fails when a notebook, a profile and a config disagree. :func:`add_arguments` turns a config
into command-line options, so a command takes every option its notebook has.
"""
from __future__ import annotations

import argparse
import dataclasses
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
    """Mixin for config dataclasses: build from parameters or files, dump to a dict."""

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        """The names :meth:`from_params` reads (a notebook declares each with the same default)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def parameter_defaults(cls) -> dict[str, Any]:
        """``name -> default`` for :meth:`parameter_names`, as JSON-like values (tuples as lists)."""
        defaults = {}
        for f in dataclasses.fields(cls):
            if f.name in cls.parameter_names():
                value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                defaults[f.name] = json.loads(json.dumps(value, default=_plain))
        return defaults

    @classmethod
    def from_params(cls: type[T], params: Mapping[str, Any]) -> T:
        """The config from the names in ``params`` it declares; other names are ignored, absent ones keep their default."""
        return cls(**{name: params[name] for name in cls.parameter_names() if name in params})

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        """The config from a file's mapping: every key must be a field."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON-like: {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ValueError`` naming the field when ``value`` is not one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {choices}, got {value!r}")


# --------------------------------------------------------------------------- command lines


def field_comments(cls: type) -> dict[str, str]:
    """``name -> the comment after the field`` in the dataclass source: the same words the notebooks'
    parameters cells use, shown again as ``--help`` text."""
    comments: dict[str, str] = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return comments
    line_comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                     for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    for number, line in enumerate(source.splitlines(), start=1):
        name = line.strip().split(":", 1)[0]
        if name.isidentifier() and number in line_comments:
            comments.setdefault(name, line_comments[number])
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
    """One ``--field-name`` option per field of the dataclass ``cls`` (booleans as ``--x/--no-x``,
    sequences as several values), defaulting to the field's default; read the parsed values back with
    ``cls.from_params(vars(args))``."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in set(exclude) or not f.init:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kind, many = _option_type(hints[f.name])
        option = "--" + f.name.replace("_", "-")
        text = f"{comments.get(f.name, '')} (default: {default!r})".strip()
        if kind is bool:
            parser.add_argument(option, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif many:
            parser.add_argument(option, dest=f.name, nargs="*", type=kind, default=default, help=text)
        else:
            parser.add_argument(option, dest=f.name, type=kind, default=default, help=text)
