"""The values each step of a pipeline receives: profile and command-line parameters, merged by
a fixed precedence and read by the type each notebook declares in its ``parameters`` cell.

Precedence, lowest first: the notebook's default < profile ``params`` < profile
``steps.<step>`` < ``-p name=value`` < ``-p STEP.name=value``.

Command-line values arrive as text and are read by the declared type: a ``str`` parameter gets
the text as typed (``no``, ``off``, ``1e-3`` stay strings), ``int``/``float``/``bool`` are parsed
as such, ``list``/``dict`` as YAML (``[a, b]``, ``{jpeg: [50]}``). Profile values (already typed
by YAML) are checked against the same types. A value that does not fit is an error naming the
parameter, its type and the value.

When a run folder is resumed (``--from``/``--only``), ``recorded`` holds the values each step
ran with: a value for a step that is not selected is accepted only when it equals what that
step ran with, so one run never mixes two settings of one parameter.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from dfd_lib.core import runs

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


class ParameterError(ValueError):
    """A parameter that reaches no step, names an unknown step, or does not fit its declared type."""


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``["epochs=3", "04.lr=1e-3"]`` -> ``{"epochs": "3", "04.lr": "1e-3"}``: the text as typed; each
    step reads it by the type it declares (:func:`typed_value`)."""
    overrides = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ParameterError(f"parameter {item!r} must look like name=value or STEP.name=value")
        overrides[name.strip()] = value
    return overrides


def typed_value(name: str, value: object, type_name: str | None) -> object:
    """``value`` as the declared ``type_name`` (papermill's ``inferred_type_name``: str, int, float,
    bool, list, dict; anything else is read as YAML). Text is parsed; other values are checked."""
    reader = _READERS.get(type_name or "")
    if reader is None:
        return yaml.safe_load(value) if isinstance(value, str) else value
    try:
        return reader(value)
    except (TypeError, ValueError, yaml.YAMLError) as exc:
        shown = repr(value) if isinstance(value, str) else f"{value!r} ({type(value).__name__})"
        raise ParameterError(f"parameter {name!r} is declared {type_name}, got {shown}: {exc}") from None


def _read_str(value: object) -> str:
    if isinstance(value, str):
        return value
    raise TypeError("quote it in YAML ('no', '1e-3') so it stays text")


def _read_int(value: object) -> int:
    if isinstance(value, bool):
        raise TypeError("a bool is not an int")
    if isinstance(value, str):
        return int(value.strip())
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("not a whole number")
    if isinstance(value, (int, float)):
        return int(value)
    raise TypeError("not a number")


def _read_float(value: object) -> float:
    if isinstance(value, bool):
        raise TypeError("a bool is not a number")
    if isinstance(value, str):
        return float(value.strip())
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError("not a number")


def _read_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise ValueError(f"use one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")


def _read_yaml_of(kind: type, example: str):
    def read(value: object):
        parsed = yaml.safe_load(value) if isinstance(value, str) else value
        if not isinstance(parsed, kind):
            raise TypeError(f"write it as YAML, e.g. {example}")
        return parsed

    return read


_READERS = {"str": _read_str, "int": _read_int, "float": _read_float, "bool": _read_bool,
            "list": _read_yaml_of(list, "[a, b]"), "dict": _read_yaml_of(dict, "{jpeg: [50]}")}


def step_matches(step_name: str, token: str) -> bool:
    """``token`` ("04", "04_train_moe", "train_moe", "04_train_moe.ipynb") names ``step_name``."""
    return runs.StepSpec(step_name).matches(token)


def _type_of(declared: dict, step: str, name: str) -> str | None:
    info = declared[step].get(name)
    return info.get("inferred_type_name") if isinstance(info, dict) else None


def merge_parameters(steps, profile: dict, overrides: dict, declared: dict[str, dict],
                     recorded: dict[str, dict] | None = None) -> dict[str, dict]:
    """The parameters each selected step receives (see the module's docstring for the precedence).

    ``steps``: the selected steps (objects with ``.name``); ``declared`` maps every step of the
    chain, selected or not, to its declared parameters (papermill's ``inspect_notebook``);
    ``recorded``: the values each step of an existing run ran with. Raises
    :class:`ParameterError` on any name that would reach no step, or a value that does not fit.
    """
    selected = [s.name for s in steps]
    _check_profile(profile, declared)
    _check_overrides(overrides, selected, declared, recorded or {})
    sections = profile.get("steps", {}) or {}
    plain = {k: v for k, v in overrides.items() if "." not in k}
    merged: dict[str, dict] = {}
    for step in selected:
        names = declared[step]
        layers = [profile.get("params", {}) or {}]
        layers += [values or {} for section, values in sections.items() if step_matches(step, section)]
        layers += [plain, {key.split(".", 1)[1]: value for key, value in overrides.items()
                           if "." in key and step_matches(step, key.split(".", 1)[0])}]
        specific = {name for layer in layers[1:-2] for name in layer} | set(layers[-1])
        unknown = sorted(name for name in specific if name not in names)
        if unknown:
            raise ParameterError(f"step {step} declares no parameter(s) {unknown}; it declares {sorted(names)}")
        values: dict = {}
        for layer in layers:
            values.update({name: typed_value(name, value, _type_of(declared, step, name))
                           for name, value in layer.items() if name in names})
        merged[step] = values
    return merged


def _check_profile(profile: dict, declared: dict[str, dict]) -> None:
    every = {name for names in declared.values() for name in names}
    for name in profile.get("params", {}) or {}:
        if name not in every:
            raise ParameterError(f"profile parameter {name!r} is declared by no notebook")
    for section in profile.get("steps", {}) or {}:
        if not any(step_matches(step, section) for step in declared):
            raise ParameterError(f"profile names an unknown step {section!r}; steps are {', '.join(declared)}")


def _check_overrides(overrides: dict, selected: list[str], declared: dict[str, dict], recorded: dict[str, dict]) -> None:
    """Every override reaches a selected step; one that also (or only) concerns an unselected step
    must equal what that step ran with."""
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        targets = [s for s in declared if (step_matches(s, section) if section else name in declared[s])]
        if section and not targets:
            raise ParameterError(f"parameter {key!r} names a step that does not exist; steps are {', '.join(declared)}")
        if section and name not in declared[targets[0]]:
            raise ParameterError(f"step {targets[0]} declares no parameter(s) {[name]}; it declares {sorted(declared[targets[0]])}")
        if not targets:
            raise ParameterError(f"parameter {key!r} is declared by none of the selected steps ({', '.join(selected)})")
        for step in (s for s in targets if s not in selected):
            _check_against_record(key, name, value, step, declared, recorded, reaches_selected=any(s in selected for s in targets))


def _check_against_record(key: str, name: str, value, step: str, declared: dict, recorded: dict, reaches_selected: bool) -> None:
    ran_with = recorded.get(step, {})
    if name not in ran_with:
        if reaches_selected:
            return  # the unselected step never ran in this folder: nothing to contradict
        raise ParameterError(f"parameter {key!r} is declared by none of the selected steps: only {step} declares it, "
                             "and it is not selected")
    wanted = typed_value(name, value, _type_of(declared, step, name))
    if wanted != ran_with[name]:
        raise ParameterError(
            f"-p {key}={value} differs from the value step {step} ran with in this run ({ran_with[name]!r}), and {step} "
            f"is not selected, so the change would not reach it and the run would mix two settings. Run from that step "
            f"(--from {step[:2]}), name the step the value is for (-p STEP.{name}=...), or start a new run (--run NEW)")


def relative_to_project(path: str | Path, root: Path) -> str:
    """``path`` relative to ``root`` when it lies inside (so a record reads the same on another clone)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
