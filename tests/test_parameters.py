"""Pipeline parameters: the precedence of every pair of sources, values read by their declared
type, and the checks that keep a resumed run from mixing two settings."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from dfd_lib.pipeline.parameters import ParameterError, merge_parameters, parse_overrides, typed_value

STEPS = [SimpleNamespace(name="01_make"), SimpleNamespace(name="04_train")]


def _declared(**types: str) -> dict:
    return {name: {"inferred_type_name": kind, "default": "0"} for name, kind in types.items()}


DECLARED = {"01_make": _declared(run_dir="str", size="int", dataset="str"),
            "04_train": _declared(run_dir="str", size="int", lr="float", mixed_precision="str", amp="bool",
                                  backbones="list", levels="dict")}
LEVELS = ["default", "profile params", "profile steps", "-p name", "-p STEP.name"]


def _sources(levels: dict[str, int]) -> tuple[dict, dict]:
    """A profile and overrides that set ``size`` for 04 at each given level to the given value."""
    profile, overrides = {"params": {}, "steps": {}}, {}
    for level, value in levels.items():
        if level == "profile params":
            profile["params"]["size"] = value
        elif level == "profile steps":
            profile["steps"]["04_train"] = {"size": value}
        elif level == "-p name":
            overrides["size"] = str(value)
        elif level == "-p STEP.name":
            overrides["04.size"] = str(value)
    return profile, overrides


@pytest.mark.parametrize(("lower", "higher"), list(itertools.combinations(LEVELS, 2)))
def test_every_pair_of_sources_has_the_documented_precedence(lower, higher):
    profile, overrides = _sources({level: value for level, value in ((lower, 1), (higher, 2)) if level != "default"})
    merged = merge_parameters(STEPS, profile, overrides, DECLARED)
    assert merged["04_train"]["size"] == 2, f"{higher} must beat {lower}"


def test_a_step_section_of_the_profile_does_not_beat_the_command_line():
    # the full profile's 04 section sets image_size 512; -p image_size=64 must still reach 04
    profile = {"params": {"size": 224}, "steps": {"04_train": {"size": 512}}}
    merged = merge_parameters(STEPS, profile, parse_overrides(["size=64"]), DECLARED)
    assert merged == {"01_make": {"size": 64}, "04_train": {"size": 64}}


def test_command_line_values_are_read_by_the_declared_type():
    overrides = parse_overrides(["04.mixed_precision=no", "lr=1e-3", "size=8", "amp=off", "backbones=[a, b]",
                                 "levels={jpeg: [50]}", "dataset=1e-3"])
    merged = merge_parameters(STEPS, {}, overrides, DECLARED)
    assert merged["04_train"] == {"mixed_precision": "no", "lr": 0.001, "size": 8, "amp": False,
                                  "backbones": ["a", "b"], "levels": {"jpeg": [50]}}
    assert merged["01_make"] == {"size": 8, "dataset": "1e-3"}  # text stays text, even when it looks like a number
    assert typed_value("x", "off", "str") == "off" and typed_value("x", "yes", "bool") is True


@pytest.mark.parametrize(("value", "kind"), [("abc", "int"), ("1.5", "int"), ("maybe", "bool"), ("fast", "float"),
                                             ("a", "list"), ("[1]", "dict")])
def test_a_value_that_does_not_fit_names_parameter_type_and_value(value, kind):
    with pytest.raises(ParameterError) as caught:
        typed_value("epochs", value, kind)
    assert "'epochs'" in str(caught.value) and kind in str(caught.value) and value in str(caught.value)


def test_profile_values_are_checked_too():
    # YAML reads an unquoted `no` as False: the error says to quote it
    with pytest.raises(ParameterError, match="mixed_precision.*str.*False.*quote"):
        merge_parameters(STEPS, {"steps": {"04": {"mixed_precision": False}}}, {}, DECLARED)


def test_unselected_steps_accept_only_the_value_they_ran_with():
    resumed = STEPS[1:]  # --from 04
    recorded = {"01_make": {"size": 3, "dataset": "demo"}, "04_train": {"size": 3}}
    merged = merge_parameters(resumed, {}, parse_overrides(["dataset=demo", "size=3"]), DECLARED, recorded)
    assert merged == {"04_train": {"size": 3}}
    with pytest.raises(ParameterError, match="differs from the value step 01_make ran with.*--from 01"):
        merge_parameters(resumed, {}, parse_overrides(["size=64"]), DECLARED, recorded)
    with pytest.raises(ParameterError, match="differs"):
        merge_parameters(resumed, {}, parse_overrides(["dataset=other"]), DECLARED, recorded)
    assert merge_parameters(resumed, {}, parse_overrides(["04.size=64"]), DECLARED, recorded) == {"04_train": {"size": 64}}
    with pytest.raises(ParameterError, match="declared by none of the selected steps"):
        merge_parameters(resumed, {}, parse_overrides(["dataset=demo"]), DECLARED)  # no record: it would reach nothing


def test_malformed_or_unknown_overrides_are_refused():
    with pytest.raises(ParameterError, match="name=value"):
        parse_overrides(["epochs"])
    with pytest.raises(ParameterError, match="declared by none"):
        merge_parameters(STEPS, {}, {"epochs": "3"}, DECLARED)
    with pytest.raises(ParameterError, match="declares no parameter"):
        merge_parameters(STEPS, {}, {"01.lr": "3"}, DECLARED)
    with pytest.raises(ParameterError, match="does not exist"):
        merge_parameters(STEPS, {}, {"09.lr": "3"}, DECLARED)
