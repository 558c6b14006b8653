"""Profiles (``pipelines/<name>.yaml``) and the parameter values each step runs with: its notebook's
default, unless the profile or an override sets it (precedence: :mod:`dfd_lib.pipeline.parameters`)."""
from __future__ import annotations

import ast
from pathlib import Path

import papermill
import yaml

from dfd_lib.core.paths import NOTEBOOKS_DIR, PIPELINES_DIR, resolve
from dfd_lib.pipeline.parameters import ParameterError, merge_parameters
from dfd_lib.pipeline.steps import PipelineError, Step, discover_steps, select_steps

DEFAULT_PROFILE = "demo"


def load_profile(profile: str, pipelines_dir: Path = PIPELINES_DIR) -> dict:
    path = Path(profile) if profile.endswith((".yaml", ".yml")) else Path(pipelines_dir) / f"{profile}.yaml"
    path = resolve(path)
    if not path.is_file():
        known = sorted(p.stem for p in Path(pipelines_dir).glob("*.yaml"))
        raise PipelineError(f"profile {profile!r} not found ({path}); known profiles: {', '.join(known)}")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"description", "run", "params", "steps"}
    if unknown:
        raise PipelineError(f"{path.name}: unknown top-level key(s) {sorted(unknown)}; use description, run, params, steps")
    data.setdefault("params", {})
    data.setdefault("steps", {})
    data["path"] = str(path)
    return data


def declared_parameters(step: Step) -> dict:
    return papermill.inspect_notebook(str(step.path))


def notebook_defaults(step: Step) -> dict:
    """The values of ``step``'s parameters cell, as its notebook declares them."""
    return {name: ast.literal_eval(info["default"]) for name, info in declared_parameters(step).items()}


def step_values(profile: str, overrides: dict | None = None, only: str | None = None, start: str | None = None,
                notebooks_dir: Path = NOTEBOOKS_DIR, pipelines_dir: Path = PIPELINES_DIR,
                recorded: dict | None = None) -> dict[str, dict]:
    """Every parameter value each selected step of ``profile`` will run with: its notebook's default,
    unless the profile or an override sets it (what ``dfd check`` and ``dfd fetch-weights`` look at).
    ``recorded``: what each step of a resumed run folder ran with (see :func:`merge_parameters`)."""
    steps = select_steps(discover_steps(notebooks_dir), only, start)
    declared = {s.name: declared_parameters(s) for s in discover_steps(notebooks_dir)}
    merged = merge_step_parameters(steps, load_profile(profile, pipelines_dir), overrides or {}, declared, recorded or {})
    return {step.name: {**notebook_defaults(step), **merged[step.name]} for step in steps}


def merge_step_parameters(steps, profile_data: dict, overrides: dict, declared: dict, recorded: dict) -> dict[str, dict]:
    try:
        return merge_parameters(steps, profile_data, overrides, declared, recorded)
    except ParameterError as exc:
        raise PipelineError(str(exc)) from None
