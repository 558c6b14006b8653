"""Defaults live in one place: each step config (a dataclass) is built in one call from its
notebook's parameters, every parameter it reads is declared by the notebook with the config's own
default, and every profile's values build a valid config."""
from __future__ import annotations

import ast
import importlib
import json
import re

import papermill
import pytest

from dfd_lib.core.paths import NOTEBOOKS_DIR
from dfd_lib.pipeline.parameters import merge_parameters
from dfd_lib.pipeline.profiles import load_profile, notebook_defaults
from dfd_lib.pipeline.steps import discover_steps

PROFILES = ("smoke", "demo", "full")
# Config fields a notebook does not expose (library settings, or given another way: notebook 04's
# per-expert `backbones` / `backbone_weights` lists set each config's backbone and weights_path).
NOT_NOTEBOOK_PARAMETERS = {
    "TrainConfig": {"backbone", "weights_path", "min_lr_ratio", "ema_warmup", "drop_rate", "grad_clip", "channels_last",
                    "device", "progress"},
    "EmbeddingConfig": {"pretrained", "crop_pct", "device"},
}


def _configs_built_by(notebook) -> list[type]:
    """The classes whose ``from_params`` the notebook calls, resolved through its own imports."""
    cells = [cell.source for cell in _read(notebook).cells if cell.cell_type == "code"]
    names: dict[str, object] = {}
    for source in cells:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dfd_lib"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    names[alias.asname or alias.name] = (getattr(module, alias.name, None)
                                                         or importlib.import_module(f"{node.module}.{alias.name}"))
    called = sorted({m for source in cells for m in re.findall(r"\b(\w+)\.from_params\(", source)})
    return [names[name] for name in called]


def _read(notebook):
    import nbformat

    return nbformat.read(notebook, as_version=4)


def _plain(value):
    return json.loads(json.dumps(value, default=list))


STEPS_WITH_CONFIGS = [(step, cls) for step in discover_steps(NOTEBOOKS_DIR) for cls in _configs_built_by(step.path)]


def test_the_notebooks_build_their_configs_in_one_call():
    built = {step.key: [cls.__name__ for cls in _configs_built_by(step.path)] for step in discover_steps(NOTEBOOKS_DIR)}
    assert built == {"01": ["DatasetSpec", "EmbeddingConfig"], "02": [], "03": ["EnrichmentConfig"],
                     "04": ["BootstrapConfig", "TrainConfig"], "05": []}


@pytest.mark.parametrize(("step", "cls"), STEPS_WITH_CONFIGS, ids=lambda v: getattr(v, "name", getattr(v, "__name__", v)))
def test_notebook_declares_every_parameter_with_the_config_default(step, cls):
    declared = notebook_defaults(step)
    expected = {k: v for k, v in cls.parameter_defaults().items() if k not in NOT_NOTEBOOK_PARAMETERS.get(cls.__name__, set())}
    missing = sorted(set(expected) - set(declared))
    assert not missing, f"{step.name} does not declare {missing}, which {cls.__name__} reads"
    differing = {k: (declared[k], v) for k, v in expected.items() if _plain(declared[k]) != _plain(v)}
    assert not differing, f"{step.name} and {cls.__name__} disagree on defaults (notebook, config): {differing}"
    # and the notebook's own defaults build the config
    assert cls.from_params(declared).to_dict() == cls().to_dict()


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_builds_valid_configs(profile, tmp_path, monkeypatch):
    steps = discover_steps(NOTEBOOKS_DIR)
    declared = {step.name: papermill.inspect_notebook(str(step.path)) for step in steps}
    merged = merge_parameters(steps, load_profile(profile), {}, declared)
    # local files a profile names (a Stable Diffusion checkpoint ...) exist on the user's machine, not here
    import dfd_lib.synth.config as synth_config

    def resolve_into_tmp(path):
        target = tmp_path / str(path)
        target.mkdir(parents=True, exist_ok=True)
        return target

    monkeypatch.setattr(synth_config, "resolve", resolve_into_tmp)
    for step, cls in STEPS_WITH_CONFIGS:
        params = {**notebook_defaults(step), **merged[step.name]}
        config = cls.from_params(params)
        for name in set(merged[step.name]) & set(cls.parameter_names()):
            value = getattr(config, name, None)
            if value is None and cls.__name__ == "TrainConfig":
                value = getattr(config.loss, name)
            if name.startswith("sd_") and isinstance(value, str):
                continue  # resolved into tmp_path above
            assert _plain(value) == _plain(merged[step.name][name]), (profile, step.name, name)


def test_unknown_keys_in_a_config_file_are_refused():
    from dfd_lib.synth.config import EnrichmentConfig
    from dfd_lib.training.train_config import TrainConfig

    with pytest.raises(ValueError, match="unknown TrainConfig keys: learning_rate"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="unknown EnrichmentConfig keys: batch_size"):
        EnrichmentConfig.from_dict({"batch_size": 8})
    # from_params takes only the names a config declares: one notebook namespace feeds several configs
    config = TrainConfig.from_params({"lr": 0.01, "kl_fraction": 0.5, "families": ["splice"], "run_dir": "x"})
    assert config.lr == 0.01 and config.loss.kl_fraction == 0.5
