"""The papermill chain: run the numbered notebooks headless, in order, into ``reports/<run>/``
(``dfd pipeline``, :mod:`dfd_lib.pipeline.cli`).

A profile (``pipelines/<name>.yaml``) gives parameters for every step (``params``) and per
step (``steps: {01_features_umap: {...}}``); the command line overrides both with
``-p name=value`` or ``-p 01.name=value``. Only parameters a notebook declares in its
``parameters`` cell are passed to it; a name no selected step declares is an error, never
a silent no-op. ``run_dir`` is always injected, so steps hand data to each other only
through files in the run folder.
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dfd_lib.paths import NOTEBOOKS_DIR, PIPELINES_DIR, PROJECT_ROOT, REPORTS_DIR, resolve
from dfd_lib.pipeline import runs

log = logging.getLogger(__name__)
SNAPSHOT_PACKAGES = ("torch", "torchvision", "timm", "diffusers", "transformers", "accelerate", "scikit-learn",
                     "umap-learn", "numpy", "pandas", "papermill", "dfd-kit")


class PipelineError(RuntimeError):
    """A pipeline that cannot start (bad profile, unknown step or parameter) or a failed step."""


@dataclass(frozen=True)
class Step:
    key: str  # "01"
    name: str  # "01_features_umap"
    path: Path

    def matches(self, token: str) -> bool:
        token = token.strip()
        return token in (self.key, self.name, self.name[3:], self.path.name)


@dataclass
class StepResult:
    step: str
    seconds: float
    output: Path
    status: str  # "ok", "failed", "prepared"
    error: str = ""


@dataclass
class PipelineResult:
    run_dir: Path
    steps: list[StepResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.status != "failed" for s in self.steps)


def discover_steps(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Step]:
    steps = [Step(p.name[:2], p.stem, p) for p in sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))]
    if not steps:
        raise PipelineError(f"no numbered notebooks (NN_name.ipynb) in {notebooks_dir}")
    return steps


def select_steps(steps: list[Step], only: str | list[str] | None = None, start: str | None = None) -> list[Step]:
    """``only``: comma-separated steps ("01,02" or names); ``start``: this step and all after."""
    def find(token: str) -> int:
        for i, step in enumerate(steps):
            if step.matches(token):
                return i
        raise PipelineError(f"unknown step {token!r}; steps are {', '.join(s.name for s in steps)}")

    chosen = steps
    if start:
        chosen = steps[find(start):]
    if only:
        tokens = only.split(",") if isinstance(only, str) else list(only)
        wanted = {steps[find(t)].name for t in tokens if t.strip()}
        chosen = [s for s in chosen if s.name in wanted]
    if not chosen:
        raise PipelineError("no step selected (check --only and --from)")
    return chosen


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


def parse_overrides(items: list[str] | None) -> dict[str, object]:
    """``["epochs=3", "04.lr=1e-3"]`` -> ``{"epochs": 3, "04.lr": 0.001}`` (values read as YAML)."""
    overrides = {}
    for item in items or []:
        if "=" not in item:
            raise PipelineError(f"parameter {item!r} must look like name=value or STEP.name=value")
        name, value = item.split("=", 1)
        overrides[name.strip()] = yaml.safe_load(value)
    return overrides


def declared_parameters(step: Step) -> dict:
    import papermill

    return papermill.inspect_notebook(str(step.path))


def notebook_defaults(step: Step) -> dict:
    """The values of ``step``'s parameters cell, as its notebook declares them."""
    import ast

    return {name: ast.literal_eval(info["default"]) for name, info in declared_parameters(step).items()}


def step_values(profile: str, overrides: dict | None = None, only: str | None = None, start: str | None = None,
                notebooks_dir: Path = NOTEBOOKS_DIR, pipelines_dir: Path = PIPELINES_DIR) -> dict[str, dict]:
    """Every parameter value each selected step of ``profile`` will run with: its notebook's default,
    unless the profile or an override sets it (what ``dfd check`` and ``dfd fetch-weights`` look at)."""
    steps = select_steps(discover_steps(notebooks_dir), only, start)
    declared = {s.name: declared_parameters(s) for s in discover_steps(notebooks_dir)}
    merged = merge_parameters(steps, load_profile(profile, pipelines_dir), overrides or {}, declared)
    return {step.name: {**notebook_defaults(step), **merged[step.name]} for step in steps}


def merge_parameters(steps: list[Step], profile: dict, overrides: dict, declared: dict[str, dict]) -> dict[str, dict]:
    """The parameters each selected step receives.

    Precedence: notebook default < profile ``params`` < profile ``steps.<step>`` <
    ``-p name=value`` < ``-p STEP.name=value``. ``declared`` maps every step of the chain
    (selected or not) to the names its parameters cell declares. Raises on any name that
    would reach no notebook.
    """
    every = {name for names in declared.values() for name in names}
    for name in profile.get("params", {}):
        if name not in every:
            raise PipelineError(f"profile parameter {name!r} is declared by no notebook")
    for section in profile.get("steps", {}) or {}:
        if not any(Step(n[:2], n, Path(n)).matches(section) for n in declared):
            raise PipelineError(f"profile names an unknown step {section!r}; steps are {', '.join(declared)}")
    selected_names = {name for s in steps for name in declared[s.name]}
    for key in overrides:
        if "." not in key and key not in selected_names:
            raise PipelineError(f"parameter {key!r} is declared by none of the selected steps "
                                f"({', '.join(s.name for s in steps)})")
    common = {**profile.get("params", {}), **{k: v for k, v in overrides.items() if "." not in k}}
    merged: dict[str, dict] = {}
    for step in steps:
        names = declared[step.name]
        specific = {}
        for section, values in (profile.get("steps", {}) or {}).items():
            if step.matches(section):
                specific.update(values or {})
        for key, value in overrides.items():
            if "." in key and step.matches(key.split(".", 1)[0]):
                specific[key.split(".", 1)[1]] = value
        unknown = sorted(k for k in specific if k not in names)
        if unknown:
            raise PipelineError(f"step {step.name} declares no parameter(s) {unknown}; it declares {sorted(names)}")
        merged[step.name] = {**{k: v for k, v in common.items() if k in names}, **specific}
    for key in overrides:
        if "." in key and not any(s.matches(key.split(".", 1)[0]) for s in steps):
            raise PipelineError(f"parameter {key!r} names a step that is not selected or does not exist")
    return merged


def environment_snapshot() -> dict:
    versions = {}
    for package in SNAPSHOT_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=PROJECT_ROOT, capture_output=True,
                                    text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
            "git_commit": commit, "git_dirty": dirty, "device": device, "torch_threads": torch.get_num_threads(),
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _describe_failure(exc: Exception) -> str:
    ename, evalue = getattr(exc, "ename", type(exc).__name__), getattr(exc, "evalue", str(exc))
    cell = getattr(exc, "exec_count", None)
    source = (getattr(exc, "source", "") or "").strip()
    where = f" in cell [{cell}]" if cell is not None else ""
    return f"{ename}{where}: {evalue}" + ("\n  cell source:\n    " + source.replace("\n", "\n    ") if source else "")


def _preflight(profile: str, overrides: dict, only: str | None, start: str | None, notebooks_dir: Path,
               pipelines_dir: Path) -> None:
    from dfd_lib.pipeline.preflight import check_profile

    report = check_profile(profile, overrides, only, start, notebooks_dir=notebooks_dir, pipelines_dir=pipelines_dir)
    for note in report.notes:
        log.info("check: %s", note)
    if report.problems:
        raise PipelineError("the preflight found problems (dfd check lists them; --no-check skips it):\n  "
                            + "\n  ".join(report.problems))


def run_pipeline(profile: str, only: str | None = None, start: str | None = None, run: str | None = None,
                 overrides: dict | None = None, prepare_only: bool = False,
                 notebooks_dir: Path = NOTEBOOKS_DIR, pipelines_dir: Path = PIPELINES_DIR,
                 reports_dir: Path = REPORTS_DIR, kernel_name: str = "python3", log_output: bool = False,
                 progress: bool = True, write_report: bool = True, check: bool = True) -> PipelineResult:
    """Run the selected steps of ``profile``; stops at the first failed step (earlier
    artefacts stay), so ``start=<failed step>`` resumes. Ends by writing the run's
    ``index.html`` (also after a failure, showing what ran). With ``check`` (not for a dry run) the
    preflight of ``dfd check`` runs first and any problem stops the run before its first step."""
    import papermill

    profile_data = load_profile(profile, pipelines_dir)
    steps = select_steps(discover_steps(notebooks_dir), only, start)
    overrides = overrides or {}
    declared = {s.name: declared_parameters(s) for s in discover_steps(notebooks_dir)}
    for step in steps:
        if "run_dir" not in declared[step.name]:
            raise PipelineError(f"{step.path.name} must declare run_dir in its parameters cell")
    params = merge_parameters(steps, profile_data, overrides, declared)
    if check and not prepare_only:
        _preflight(profile, overrides, only, start, notebooks_dir, pipelines_dir)

    run_name = run or profile_data.get("run") or Path(profile_data["path"]).stem
    run_dir = (Path(reports_dir) / run_name).resolve()
    (run_dir / runs.NOTEBOOKS_DIR).mkdir(parents=True, exist_ok=True)
    record_path = run_dir / runs.PARAMS
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record.update({"profile": profile_data["path"], "run": run_name, "overrides": overrides})
    record.setdefault("steps", {})
    environment_path = run_dir / runs.ENVIRONMENT
    earlier = json.loads(environment_path.read_text()) if environment_path.is_file() else {}
    # the weights the steps recorded (RunDir.record_weights) outlive a resumed run's new snapshot
    environment_path.write_text(json.dumps({**environment_snapshot(), "weights": earlier.get("weights", {})}, indent=2))

    result = PipelineResult(run_dir)
    for step in steps:
        step_params = {**params[step.name], "run_dir": str(run_dir)}
        record["steps"][step.name] = step_params
        record_path.write_text(json.dumps(record, indent=2, default=str))
        output = run_dir / runs.NOTEBOOKS_DIR / step.path.name
        log.info("[%s] %s -> %s", step.name, "preparing" if prepare_only else "running", output)
        started = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(step.path), str(output), parameters=step_params, kernel_name=kernel_name,
                prepare_only=prepare_only, cwd=str(run_dir), progress_bar=progress and not prepare_only,
                log_output=log_output,
            )
        except Exception as exc:  # papermill's PapermillExecutionError, a dead kernel, ...
            seconds = time.perf_counter() - started
            message = _describe_failure(exc)
            result.steps.append(StepResult(step.name, seconds, output, "failed", message))
            log.error("[%s] FAILED after %.1f s: %s\n  executed notebook: %s\n  resume with: dfd pipeline --profile %s "
                      "--run %s --from %s", step.name, seconds, message, output, profile, run_name, step.key)
            break
        seconds = time.perf_counter() - started
        result.steps.append(StepResult(step.name, seconds, output, "prepared" if prepare_only else "ok"))
        log.info("[%s] done in %.1f s", step.name, seconds)
    timings_path = run_dir / runs.TIMINGS
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    timings.update({s.step: {"seconds": round(s.seconds, 2), "status": s.status} for s in result.steps})
    timings_path.write_text(json.dumps(timings, indent=2))
    if write_report and not prepare_only:
        from dfd_lib.pipeline.report import write_report as write_index

        log.info("report: %s", write_index(run_dir))
    return result
