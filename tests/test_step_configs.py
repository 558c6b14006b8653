"""One typed config per step, and defaults in one place: each notebook builds exactly its step's config
(:data:`dfd_lib.steps.step_configs.STEP_CONFIGS`) in one call from its parameters cell, declares every
parameter that config reads with the config's own default and type (and nothing else but ``run_dir``),
uses no parameter loose after that, and every profile's values build a valid config. The checks return
their findings, so they are also shown failing on a notebook copy given a loose parameter, a second
config or another default. Composite configs (parts read from one flat mapping) are tested at the end."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import shutil
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import papermill
import pytest
from tuning_modes import NEEDS_TUNING_MODES

from dfd_lib.core import config as configs
from dfd_lib.core.config import StepConfig
from dfd_lib.core.paths import NOTEBOOKS_DIR
from dfd_lib.pipeline.parameters import merge_parameters
from dfd_lib.pipeline.profiles import load_profile, notebook_defaults
from dfd_lib.pipeline.steps import discover_steps
from dfd_lib.steps.step_configs import STEP_CONFIGS

PROFILES = ("smoke", "demo", "full", "full-mini", pytest.param("full-foundation", marks=NEEDS_TUNING_MODES))
STEPS = discover_steps(NOTEBOOKS_DIR)
# where a step reads and writes, not how it computes: the pipeline injects it, a config never holds it
NOTEBOOK_ONLY = {"run_dir"}
# Config fields a notebook does not declare, and why. Every other field is a notebook parameter.
LIBRARY_ONLY = {
    "FeaturesConfig": {
        "pretrained": "the map needs real features: notebook 01 always embeds with pretrained weights",
        "crop_pct": "1.0 embeds the whole image, so an edit near the border still counts",
        "device": "auto: CUDA when present, else the CPU",
    },
    "TrainMoeConfig": {
        "backbone": "set per expert from the notebook's `backbones` list (training_data.expert_configs)",
        "weights_path": "set per expert from the notebook's `backbone_weights` list",
        "tuning": "set per expert from the notebook's `tunings` list",
        "min_lr_ratio": "the method's schedule, fixed in TrainConfig",
        "ema_warmup": "the method's EMA, fixed in TrainConfig",
        "drop_rate": "the method's regularisation, fixed in TrainConfig",
        "grad_clip": "the method trains without clipping",
        "channels_last": "a speed setting with the same results",
        "device": "auto: accelerate's device",
        "progress": "the notebook always shows its progress bars",
    },
}


def _step(name: str):
    return next(step for step in STEPS if step.name == name)


def _plain(value):
    return json.loads(json.dumps(value, default=list))


def _type_name(annotation) -> str:
    """The parameters cell's type word (papermill's inferred_type_name) for a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        origin = typing.get_origin(annotation)
    kind = origin or annotation
    if kind in (list, tuple) or (isinstance(kind, type) and issubclass(kind, (list, tuple))):
        return "list"
    if kind is dict or (isinstance(kind, type) and issubclass(kind, dict)):
        return "dict"
    return getattr(kind, "__name__", str(kind))


# --------------------------------------------------------------------------- the checks, as findings


def parameter_problems(notebook: Path, cls: type[StepConfig]) -> list[str]:
    """How the notebook's parameters cell and ``cls`` disagree: a parameter that is no field, a field the
    notebook does not declare (beyond :data:`LIBRARY_ONLY`), another default or another type."""
    declared = papermill.inspect_notebook(str(notebook))
    defaults = {name: ast.literal_eval(info["default"]) for name, info in declared.items()}
    names = set(cls.parameter_names())
    library_only = LIBRARY_ONLY.get(cls.__name__, {})
    config_defaults, types = cls.parameter_defaults(), cls.parameter_types()
    problems = [f"parameter {name!r} is not a field of {cls.__name__}" for name in sorted(set(declared) - names - NOTEBOOK_ONLY)]
    problems += [f"{cls.__name__} field {name!r} is not declared by the notebook"
                 for name in sorted(names - set(declared) - set(library_only))]
    problems += [f"{name!r} is listed library-only for {cls.__name__} but is no field of it, or the notebook declares it"
                 for name in sorted(set(library_only) - (names - set(declared)))]
    for name in sorted(set(declared) & names):
        if _plain(defaults[name]) != _plain(config_defaults[name]):
            problems.append(f"{name!r} defaults to {defaults[name]!r} in the notebook but to {config_defaults[name]!r} in {cls.__name__}")
        expected = _type_name(types[name]) if name in types else type(config_defaults[name]).__name__
        if declared[name]["inferred_type_name"] != expected:
            problems.append(f"{name!r} is declared {declared[name]['inferred_type_name']} in the notebook, {expected} in {cls.__name__}")
    if not problems:  # and the notebook's own defaults build the config's defaults
        built = cls.from_params({name: value for name, value in defaults.items() if name in names})
        if built.to_dict() != cls().to_dict():
            problems.append(f"the notebook's defaults build {built.to_dict()}, not {cls().to_dict()}")
    return problems


def _code_cells(notebook: Path) -> list:
    return [cell for cell in nbformat.read(notebook, as_version=4).cells if cell.cell_type == "code"]


def _imported_names(trees: list[ast.AST]) -> dict[str, object]:
    names: dict[str, object] = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dfd_lib"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    names[alias.asname or alias.name] = (getattr(module, alias.name, None)
                                                         or importlib.import_module(f"{node.module}.{alias.name}"))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("dfd_lib"):
                        names[alias.asname or alias.name] = importlib.import_module(alias.name)
    return names


def _resolve(node: ast.AST, names: dict[str, object]):
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _resolve(node.value, names)
        return None if owner is None else getattr(owner, node.attr, None)
    return None


def _builds_a_config(call: ast.Call, names: dict[str, object]) -> bool:
    target = _resolve(call.func, names)
    if isinstance(target, type) and issubclass(target, StepConfig):
        return True  # a constructor
    owner = getattr(target, "__self__", None)  # a classmethod: from_params, from_dict
    return isinstance(owner, type) and issubclass(owner, StepConfig) and isinstance(call.func, ast.Attribute) \
        and call.func.attr.startswith("from_")


def config_cell_problems(notebook: Path, cls: type[StepConfig]) -> list[str]:
    """How the notebook's code departs from ``config = <cls>.from_params(globals())`` built once and shown,
    then ``config.<part>.<field>``: other configs built, another way of building it, parameters used loose."""
    cells = _code_cells(notebook)
    parameters = set(papermill.inspect_notebook(str(notebook))) - NOTEBOOK_ONLY
    body = [cell for cell in cells if "parameters" not in cell.metadata.get("tags", [])]
    trees = [ast.parse(cell.source) for cell in body]
    names = _imported_names(trees)
    calls = [node for tree in trees for node in ast.walk(tree) if isinstance(node, ast.Call) and _builds_a_config(node, names)]
    problems = []
    if len(calls) != 1:
        problems.append(f"builds {len(calls)} configs ({', '.join(ast.unparse(c) for c in calls) or 'none'}), not one")
    one_call = [node for tree in trees for node in tree.body
                if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "config"
                and isinstance(node.value, ast.Call) and _resolve(node.value.func, names) == cls.from_params
                and ast.unparse(node.value).endswith(".from_params(globals())")]
    if len(one_call) != 1:
        problems.append(f"does not build its config in one call: config = {cls.__name__}.from_params(globals())")
    if not any(tree.body and ast.unparse(tree.body[-1]) == "config" for tree in trees):
        problems.append("does not display its config (a cell ending in `config`)")
    loose = sorted({node.id for tree in trees for node in ast.walk(tree)
                    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in parameters})
    if loose:
        problems.append(f"uses parameters loose instead of config.<part>.<field>: {', '.join(loose)}")
    return problems


def _value_in(config: StepConfig, name: str):
    """The value a built config holds for the parameter ``name``, in its own field or a nested config's."""
    if not dataclasses.is_dataclass(config):  # a registry-built config (LossConfig) holds its parameters by name
        return config.parameters()[name]
    if name in {f.name for f in dataclasses.fields(config)}:
        return getattr(config, name)
    for f in dataclasses.fields(config):
        nested = getattr(config, f.name)
        if isinstance(nested, StepConfig) and name in type(nested).parameter_names():
            return _value_in(nested, name)
    raise KeyError(name)


def profile_problems(profile: dict) -> list[str]:
    """Where a profile's values (:func:`load_profile`'s) do not build a valid config, or do not reach every
    part that reads them."""
    declared = {step.name: papermill.inspect_notebook(str(step.path)) for step in STEPS}
    merged = merge_parameters(STEPS, profile, {}, declared)
    name = Path(profile["path"]).stem
    problems = []
    for step in STEPS:
        cls = STEP_CONFIGS[step.name]
        try:
            config = cls.from_params({**notebook_defaults(step), **merged[step.name]})
        except (ValueError, TypeError, FileNotFoundError) as exc:
            problems.append(f"{name}: {step.name}'s values do not build {cls.__name__}: {exc}")
            continue
        holders = [getattr(config, name) for name in cls.parts()] or [config]
        for parameter, value in merged[step.name].items():
            for holder in holders:
                if parameter in type(holder).parameter_names() and _plain(_value_in(holder, parameter)) != _plain(value):
                    problems.append(f"{name}: {step.name}.{parameter} = {value!r} reaches {type(holder).__name__} "
                                    f"as {_value_in(holder, parameter)!r}")
    return problems


# --------------------------------------------------------------------------- the real notebooks and profiles


def test_every_step_has_a_config():
    assert sorted(STEP_CONFIGS) == [step.name for step in STEPS]


@pytest.mark.parametrize("step", STEPS, ids=lambda step: step.name)
def test_the_parameters_cell_is_the_config(step):
    assert parameter_problems(step.path, STEP_CONFIGS[step.name]) == []


@pytest.mark.parametrize("step", STEPS, ids=lambda step: step.name)
def test_the_notebook_builds_one_config_in_one_call_and_uses_it(step):
    assert config_cell_problems(step.path, STEP_CONFIGS[step.name]) == []


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_builds_valid_configs(profile):
    assert profile_problems(load_profile(profile)) == []


# --------------------------------------------------------------------------- the checks fail when they should


def _copy_with(tmp_path: Path, step_name: str, parameters_line: str = "", replace: tuple[str, str] | None = None,
               extra_cell: str = "") -> Path:
    copy = tmp_path / f"{step_name}.ipynb"
    shutil.copy(_step(step_name).path, copy)
    nb = nbformat.read(copy, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    if parameters_line:
        cell.source += "\n" + parameters_line
    if replace:
        assert replace[0] in cell.source
        cell.source = cell.source.replace(*replace)
    if extra_cell:
        nb.cells.append(nbformat.v4.new_code_cell(extra_cell))
    nbformat.write(nb, copy)
    return copy


def test_a_loose_parameter_is_found(tmp_path):
    copy = _copy_with(tmp_path, "02_cluster_split", "silhouette_sample: int = 5000  # rows scored by the silhouette",
                      extra_cell="print(silhouette_sample)")
    assert parameter_problems(copy, STEP_CONFIGS["02_cluster_split"]) == [
        "parameter 'silhouette_sample' is not a field of ClusterSplitConfig"]
    assert config_cell_problems(copy, STEP_CONFIGS["02_cluster_split"]) == [
        "uses parameters loose instead of config.<part>.<field>: silhouette_sample"]


def test_another_default_another_type_or_a_missing_field_is_found(tmp_path):
    cls = STEP_CONFIGS["02_cluster_split"]
    other_default = _copy_with(tmp_path, "02_cluster_split", replace=("k_max: int = 10", "k_max: int = 12"))
    assert parameter_problems(other_default, cls) == ["'k_max' defaults to 12 in the notebook but to 10 in ClusterSplitConfig"]
    other_type = _copy_with(tmp_path, "02_cluster_split", replace=("panels: int = 4", "panels: float = 4"))
    assert parameter_problems(other_type, cls) == ["'panels' is declared float in the notebook, int in ClusterSplitConfig"]
    missing = _copy_with(tmp_path, "02_cluster_split", replace=("panels: int = 4  # re-splits drawn as train/val panels", ""))
    assert parameter_problems(missing, cls) == ["ClusterSplitConfig field 'panels' is not declared by the notebook"]


def test_a_second_config_or_a_config_built_piecemeal_is_found(tmp_path):
    cls = STEP_CONFIGS["02_cluster_split"]
    second = _copy_with(tmp_path, "02_cluster_split", extra_cell="from dfd_lib.embed.clusters import ClusterConfig\n"
                                                                 "again = ClusterConfig.from_params(globals())")
    assert config_cell_problems(second, cls) == ["builds 2 configs (ClusterSplitConfig.from_params(globals()), "
                                                 "ClusterConfig.from_params(globals())), not one"]
    copy = tmp_path / "piecemeal.ipynb"
    shutil.copy(_step("02_cluster_split").path, copy)
    nb = nbformat.read(copy, as_version=4)
    setup = next(c for c in nb.cells if "ClusterSplitConfig.from_params(globals())" in c.source)
    setup.source = setup.source.replace("ClusterSplitConfig.from_params(globals())",
                                        "ClusterSplitConfig(clusters=ClusterConfig(seed=seed))")
    setup.source = "from dfd_lib.embed.clusters import ClusterConfig\n" + setup.source
    nbformat.write(nb, copy)
    assert config_cell_problems(copy, cls) == [
        "builds 2 configs (ClusterSplitConfig(clusters=ClusterConfig(seed=seed)), ClusterConfig(seed=seed)), not one",
        "does not build its config in one call: config = ClusterSplitConfig.from_params(globals())",
        "uses parameters loose instead of config.<part>.<field>: seed",
    ]


def test_a_profile_value_that_no_config_accepts_is_found(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("params: {seed: 0}\nsteps:\n  02_cluster_split: {k_min: 5, k_max: 3}\n")
    assert profile_problems(load_profile(str(bad))) == ["bad: 02_cluster_split's values do not build ClusterSplitConfig: "
                                       "ClusterConfig.k_max must be an int >= k_min (5), got 3"]


# --------------------------------------------------------------------------- composite configs


@dataclass
class _Sizes(StepConfig):
    width: int = 4  # columns of the grid
    seed: int = 0

    def __post_init__(self):
        configs.check_fields(self, [("width", configs.is_int(self.width) and self.width >= 1, "an int >= 1")])


@dataclass
class _Colours(StepConfig):
    palette: tuple[str, ...] = ("red", "blue")  # colours, in order
    seed: int = 0  # fixes every random choice
    dark: bool = False  # dark background


@dataclass
class _Drawing(StepConfig):
    sizes: _Sizes = field(default_factory=_Sizes)
    colours: _Colours = field(default_factory=_Colours)


@dataclass
class _OtherSeed(StepConfig):
    seed: int = 1


@dataclass
class _SeedsDisagree(StepConfig):
    sizes: _Sizes = field(default_factory=_Sizes)
    other: _OtherSeed = field(default_factory=_OtherSeed)


def test_a_composite_reads_its_parts_from_one_flat_mapping():
    assert _Drawing.parts() == {"sizes": _Sizes, "colours": _Colours} and _Sizes.parts() == {}
    assert _Drawing.parameter_names() == ("width", "seed", "palette", "dark")
    assert _Drawing.parameter_defaults() == {"width": 4, "seed": 0, "palette": ["red", "blue"], "dark": False}
    drawing = _Drawing.from_params({"width": 8, "seed": 3, "dark": True, "run_dir": "elsewhere"})
    assert drawing == _Drawing(_Sizes(width=8, seed=3), _Colours(seed=3, dark=True))  # one seed feeds both parts
    assert drawing.to_dict() == {"sizes": {"width": 8, "seed": 3}, "colours": {"palette": ("red", "blue"), "seed": 3, "dark": True}}
    assert _Drawing.from_dict({"sizes": {"width": 2}, "colours": {"dark": True}}) == _Drawing(_Sizes(width=2), _Colours(dark=True))
    assert _Drawing.from_dict(_Drawing().to_dict()) == _Drawing()
    assert _Drawing(sizes={"width": 5}).sizes == _Sizes(width=5)  # a part given as a file's mapping


def test_a_composite_refuses_what_its_parts_refuse():
    with pytest.raises(ValueError, match=r"_Sizes.width must be an int >= 1, got 0"):
        _Drawing.from_params({"width": 0})
    with pytest.raises(ValueError, match="unknown _Drawing keys: width"):
        _Drawing.from_dict({"width": 2})  # files nest: {"sizes": {"width": 2}}
    with pytest.raises(ValueError, match="unknown _Sizes keys: dark"):
        _Drawing.from_dict({"sizes": {"dark": True}})
    with pytest.raises(ValueError, match=r"_Drawing.sizes must be a mapping of _Sizes fields"):
        _Drawing.from_dict({"sizes": 3})
    with pytest.raises(ValueError, match=r"_Drawing.colours must be a _Colours"):
        _Drawing(colours=_Sizes())


def test_parts_that_disagree_on_a_shared_default_are_an_error_at_use():
    for use in (_SeedsDisagree.parameter_names, _SeedsDisagree.parameter_defaults, lambda: _SeedsDisagree.from_params({}),
                _SeedsDisagree, lambda: configs.add_arguments(argparse.ArgumentParser(), _SeedsDisagree)):
        with pytest.raises(TypeError, match="parameter 'seed' defaults to 0 in part 'sizes' but to 1 in part 'other'"):
            use()


def test_a_composite_gives_one_option_per_flattened_name():
    parser = argparse.ArgumentParser()
    configs.add_arguments(parser, _Drawing)
    options = {action.dest: action for action in parser._actions if action.dest != "help"}
    assert list(options) == ["width", "seed", "palette", "dark"]
    assert options["seed"].help == "fixes every random choice (default: 0)"  # the first part that comments it
    assert configs.field_comments(_Drawing) == {"width": "columns of the grid", "palette": "colours, in order",
                                                "seed": "fixes every random choice", "dark": "dark background"}
    args = parser.parse_args(["--width", "6", "--seed", "2", "--palette", "green", "--dark"])
    assert _Drawing.from_params(vars(args)) == _Drawing(_Sizes(width=6, seed=2), _Colours(palette=["green"], seed=2, dark=True))


def test_the_step_configs_name_what_they_refuse():
    from dfd_lib.steps.features import FeaturesConfig
    from dfd_lib.steps.train_moe import TrainMoeConfig

    with pytest.raises(ValueError, match=r"UmapConfig.umap_min_dist must be a number in \[0, 1\], got 2.0"):
        FeaturesConfig.from_params({"umap_min_dist": 2.0})
    with pytest.raises(ValueError, match=r"EvaluationConfig.robustness_levels must be a mapping of \['blur', 'jpeg', 'resize'\]"):
        TrainMoeConfig.from_params({"robustness_levels": {"sharpen": [1.0]}})
    with pytest.raises(ValueError, match=r"ExpertsConfig.backbones must be a non-empty list of timm names, got \[\]"):
        TrainMoeConfig.from_params({"backbones": []})
    with pytest.raises(ValueError, match=r"InferenceConfig.backend must be one of \('torch', 'openvino', 'onnxruntime'\)"):
        STEP_CONFIGS["05_inference"].from_params({"backend": "tensorrt"})
    with pytest.raises(ValueError, match=r"AugmentationOutputConfig.grid_examples must be an int >= 1, got 0"):
        STEP_CONFIGS["03_sd_augment"].from_params({"grid_examples": 0})
    # TrainConfig keeps its own flattening inside the composite: its loss fields are read by name
    config = TrainMoeConfig.from_params({"kl_fraction": 0.5, "seed": 4, "ladder_seeds": 2})
    assert config.training.loss.kl_fraction == 0.5 and config.training.seed == config.evaluation.seed == config.bootstrap.seed == 4


def test_unknown_keys_in_a_config_file_are_refused():
    from dfd_lib.synth.config import EnrichmentConfig
    from dfd_lib.training.train_config import TrainConfig

    with pytest.raises(ValueError, match="unknown TrainConfig keys: learning_rate"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="unknown EnrichmentConfig keys: batch_size"):
        EnrichmentConfig.from_dict({"batch_size": 8})
    # from_params takes only the names a config declares: one notebook namespace holds every setting of a step
    config = TrainConfig.from_params({"lr": 0.01, "kl_fraction": 0.5, "families": ["splice"], "run_dir": "x"})
    assert config.lr == 0.01 and config.loss.kl_fraction == 0.5
