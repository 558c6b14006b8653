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

import contextlib
import errno
import json
import logging
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import papermill
from traitlets.config import Config

from dfd_lib.core import runs
from dfd_lib.core.atomic import atomic_write
from dfd_lib.core.faults import RUNNER_ENV
from dfd_lib.core.logs import PIPELINE_STEP_ENV
from dfd_lib.core.paths import NOTEBOOKS_DIR, PIPELINES_DIR, PROJECT_ROOT, REPORTS_DIR
from dfd_lib.pipeline.environment import snapshot_keeping
from dfd_lib.pipeline.fingerprints import forget_fingerprint, read_fingerprints, record_fingerprint
from dfd_lib.pipeline.fingerprints import settled as settled_fingerprint
from dfd_lib.pipeline.fingerprints import take as take_fingerprint
from dfd_lib.pipeline.parameters import relative_to_project
from dfd_lib.pipeline.preflight import check_profile
from dfd_lib.pipeline.profiles import DEFAULT_PROFILE, declared_parameters, load_profile, merge_step_parameters, notebook_defaults
from dfd_lib.pipeline.report import write_report as write_index
from dfd_lib.pipeline.status import StepStatus, run_status, step_status
from dfd_lib.pipeline.steps import PipelineError, Step, discover_steps, find_step, select_steps, upstream_of

log = logging.getLogger(__name__)
SKIPPED = "skipped"
# the kernel's own log (not the notebook's output): jupyter_client interrupts every kernel it shuts down, and a
# kernel caught in a message handler then logs "KeyboardInterrupt caught in kernel" as an ERROR between steps;
# a failing cell is reported by papermill, with its source, whatever this level
QUIET_KERNEL = "--IPKernelApp.log_level=CRITICAL"
# the same interrupt, caught in the kernel's asyncio loop while it handles the shutdown request, leaves its
# control task pending, and asyncio logs "Task was destroyed but it is pending!" as the kernel exits
QUIET_ASYNCIO = '__import__("logging").getLogger("asyncio").setLevel(50)'
# the kernel skips the interpreter's finalisation at exit (about 2.5 s a notebook; dfd_lib/core/quick_exit.py)
QUICK_EXIT = '__import__("dfd_lib.core.quick_exit", fromlist=["install"]).install()'


def kernel_arguments(quiet: bool) -> list[str]:
    """The command-line arguments of a step's kernel: a quick exit, and a quiet log unless it is shown."""
    lines = [QUICK_EXIT, QUIET_ASYNCIO] if quiet else [QUICK_EXIT]
    return [f"--IPKernelApp.exec_lines={lines!r}", *([QUIET_KERNEL] if quiet else [])]


@dataclass
class StepResult:
    step: str
    seconds: float
    output: Path
    status: str  # "ok", "failed", "prepared", "skipped" (up to date)
    error: str = ""


@dataclass
class PipelineResult:
    run_dir: Path
    steps: list[StepResult] = field(default_factory=list)
    resume: str = ""  # after a failure: the command that resumes the run

    @property
    def ok(self) -> bool:
        return all(s.status != "failed" for s in self.steps)


def _describe_failure(exc: Exception) -> str:
    ename, evalue = getattr(exc, "ename", type(exc).__name__), getattr(exc, "evalue", str(exc))
    cell = getattr(exc, "exec_count", None)
    source = (getattr(exc, "source", "") or "").strip()
    where = f" in cell [{cell}]" if cell is not None else ""
    return f"{ename}{where}: {evalue}" + ("\n  cell source:\n    " + source.replace("\n", "\n    ") if source else "")


def _preflight(plan: RunPlan, only: str, notebooks_dir: Path, pipelines_dir: Path) -> None:
    report = check_profile(plan.profile, plan.overrides, only, None, notebooks_dir=notebooks_dir,
                           pipelines_dir=pipelines_dir, recorded=plan.recorded)
    for note in report.notes:
        log.info("check: %s", note)
    if report.problems:
        raise PipelineError("the preflight found problems (dfd check lists them; --no-check skips it):\n  "
                            + "\n  ".join(report.problems))


@dataclass
class RunPlan:
    """What a ``dfd pipeline`` command resolves to before anything runs."""

    profile: str  # a profile name, or a .yaml path, as load_profile takes it
    profile_data: dict
    run_dir: Path
    overrides: dict  # every -p in force: recorded ones of a resumed run, then this command's
    recorded: dict[str, dict]  # the values each step of this run folder ran with (resumed runs only)
    resumed: bool


def plan_run(profile: str | None, run: str | None, overrides: dict, reports_dir: Path = REPORTS_DIR,
             pipelines_dir: Path = PIPELINES_DIR) -> RunPlan:
    """Resolve the profile and the run folder. A run folder that already ran remembers itself: its
    recorded profile and overrides are used, with this command's ``overrides`` on top."""
    record = runs.read_params(Path(reports_dir) / run) if run else {}
    profile_data = load_profile(profile or record.get("profile") or DEFAULT_PROFILE, pipelines_dir)
    run_dir = (Path(reports_dir) / (run or profile_data.get("run") or Path(profile_data["path"]).stem)).resolve()
    record = record or runs.read_params(run_dir)
    name = profile or record.get("profile") or DEFAULT_PROFILE
    if not record:
        return RunPlan(name, profile_data, run_dir, dict(overrides), {}, False)
    if record.get("profile") and load_profile(record["profile"], pipelines_dir)["path"] != profile_data["path"]:
        raise PipelineError(f"run {run_dir.name} was made with profile {record['profile']!r}; running it with "
                            f"{profile!r} would mix two profiles (leave --profile out, or start a new run with --run NEW)")
    return RunPlan(name, profile_data, run_dir, {**record.get("overrides", {}), **overrides}, record.get("steps", {}), True)


def resume_command(run_dir: Path, step: Step, reports_dir: Path = REPORTS_DIR) -> str:
    """The command that resumes ``run_dir`` at ``step`` (the run remembers its profile and overrides)."""
    run = run_dir.name if run_dir.parent == Path(reports_dir).resolve() else str(run_dir)
    return f"dfd pipeline --run {shlex.quote(run)} --from {step.key}"


def run_pipeline(profile: str | None = None, only: str | None = None, start: str | None = None, run: str | None = None,
                 overrides: dict | None = None, prepare_only: bool = False,
                 notebooks_dir: Path = NOTEBOOKS_DIR, pipelines_dir: Path = PIPELINES_DIR,
                 reports_dir: Path = REPORTS_DIR, kernel_name: str = "python3", log_output: bool = False,
                 progress: bool = True, write_report: bool = True, check: bool = True,
                 force: Sequence[str] = ()) -> PipelineResult:
    """Run the steps of ``profile`` that need it; stops at the first failed step (earlier artefacts stay)
    and says how to resume (:func:`resume_command`). On a run folder that already ran, the run's recorded
    profile and overrides apply (:func:`plan_run`) and, without ``only``/``start``, only the steps that
    are not up to date run (:mod:`dfd_lib.pipeline.status`), plus the ``force``d ones; ``only``/``start``
    run exactly those steps. Ends by writing the run's ``index.html`` (also after a failure, showing what
    ran). With ``check`` (not for a dry run) the preflight of ``dfd check`` runs first and any problem
    stops the run before its first step. ``progress``: the steps' own progress lines on stderr."""
    plan = plan_run(profile, run, overrides or {}, reports_dir, pipelines_dir)
    every = discover_steps(notebooks_dir)
    chosen = select_steps(every, only, start) if (only or start) else every
    params, values = resolve_values(plan, every, chosen, resuming=bool(only or start))
    forced = {find_step(every, token).name for token in force}
    incremental = plan.resumed and not (only or start) and not prepare_only
    steps = _stale_steps(every, plan, values, forced) if incremental else chosen
    result = PipelineResult(plan.run_dir)
    result.steps = [StepResult(s.name, 0.0, plan.run_dir / runs.NOTEBOOKS_DIR / s.path.name, SKIPPED) for s in every
                    if incremental and s not in steps]
    if check and not prepare_only and steps:
        _preflight(plan, ",".join(s.key for s in steps), notebooks_dir, pipelines_dir)
    with _disk_errors(plan.run_dir, "starting the run"):
        record = _start_record(plan)
    ran: set[str] = set()
    for step in steps:
        if incremental and step.name not in forced and _current_now(step, every, ran, plan.run_dir, values[step.name]):
            log.info("[%s] up to date: the steps before it ran again and left its inputs unchanged", step.name)
            result.steps.append(StepResult(step.name, 0.0, plan.run_dir / runs.NOTEBOOKS_DIR / step.path.name, SKIPPED))
            continue
        outcome = _run_step(step, params[step.name], values[step.name], record, plan, prepare_only, kernel_name, log_output, progress)
        result.steps.append(outcome)
        ran.add(step.name)
        if outcome.status == "failed":
            result.resume = resume_command(plan.run_dir, step, reports_dir)
            log.error("[%s] FAILED after %.1f s: %s\n  executed notebook: %s\n  resume with: %s",
                      step.name, outcome.seconds, outcome.error, outcome.output, result.resume)
            break
        log.info("[%s] %s in %.1f s%s", step.name, outcome.status if prepare_only else "done", outcome.seconds,
                 "" if prepare_only else step_summary(plan.run_dir, step.name))
    result.steps.sort(key=lambda s: [step.name for step in every].index(s.step))
    with _disk_errors(plan.run_dir, "recording the timings"):
        _write_timings(plan.run_dir, result)
    if write_report and not prepare_only:
        log.info("report: %s", write_index(plan.run_dir))
    return result


def resolve_values(plan: RunPlan, every: list[Step], chosen: list[Step], resuming: bool) -> tuple[dict, dict]:
    """``(params, values)`` of the ``chosen`` steps: what the profile and overrides set (passed to the
    notebooks), and every value each runs with (its notebook's defaults included). ``resuming``
    (``--from``/``--only``): the run's other steps keep what they ran with."""
    declared = {s.name: declared_parameters(s) for s in every}
    for step in every:
        if "run_dir" not in declared[step.name]:
            raise PipelineError(f"{step.path.name} must declare run_dir in its parameters cell")
    params = merge_step_parameters(chosen, plan.profile_data, plan.overrides, declared, plan.recorded if resuming else {})
    return params, {step.name: {**notebook_defaults(step), **params[step.name]} for step in chosen}


def run_state(run: str, overrides: dict | None = None, notebooks_dir: Path = NOTEBOOKS_DIR,
              pipelines_dir: Path = PIPELINES_DIR, reports_dir: Path = REPORTS_DIR) -> tuple[Path, list[StepStatus]]:
    """The run folder ``run`` (a name under ``reports_dir`` or a path) and the status of each of its steps
    (``dfd status``), with ``overrides`` applied on top of what the run recorded."""
    plan = plan_run(None, run, overrides or {}, reports_dir, pipelines_dir)
    if not plan.resumed:
        raise PipelineError(f"{plan.run_dir} holds no run (no {runs.PARAMS})")
    every = discover_steps(notebooks_dir)
    _params, values = resolve_values(plan, every, every, resuming=False)
    return plan.run_dir, run_status(every, plan.run_dir, values, ran=plan.recorded)


def _stale_steps(every: list[Step], plan: RunPlan, values: dict[str, dict], forced: set[str]) -> list[Step]:
    """The steps of an existing run that may have to run: those not up to date or forced, and every step
    downstream of them (checked again once the steps before it ran); says why, and what it skips."""
    statuses = {s.step: s for s in run_status(every, plan.run_dir, values, ran=plan.recorded)}
    chosen: list[Step] = []
    for step in every:
        status = statuses[step.name]
        after = [s.name for s in upstream_of(every, step) if s in chosen]
        if status.current and step.name not in forced and not after:
            log.info("[%s] skipped: up to date", step.name)
            continue
        why = "; ".join(status.reasons) if status.reasons else status.state
        if status.current and step.name not in forced:
            why = f"up to date, checked again after {', '.join(after)}"
        log.info("[%s] will run: %s", step.name, f"forced (--force); {why}" if step.name in forced else why)
        chosen.append(step)
    return chosen


def _current_now(step: Step, every: list[Step], ran: set[str], run_dir: Path, values: dict) -> bool:
    """Whether ``step`` is up to date now that the steps before it ran (``ran``): by its own record, and,
    for a step the graph does not declare (its inputs unknown), only if none of the steps before it ran."""
    if not step.declared and any(s.name in ran for s in upstream_of(every, step)):
        return False
    return step_status(step, run_dir, values, read_fingerprints(run_dir).get(step.name)).current


def _run_step(step: Step, params: dict, values: dict, record: dict, plan: RunPlan, prepare_only: bool, kernel_name: str,
              log_output: bool, progress: bool) -> StepResult:
    """Execute one step; its fingerprint (what it runs on, taken before it starts) is recorded when it succeeds."""
    step_params = {**params, "run_dir": str(plan.run_dir)}
    record["steps"][step.name] = step_params
    with _disk_errors(plan.run_dir, f"starting step {step.name}"):
        runs.write_params(plan.run_dir, record)
        fingerprint = None if prepare_only else take_fingerprint(step, plan.run_dir, values)
        forget_fingerprint(plan.run_dir, step.name)
    outcome = _execute(step, step_params, plan.run_dir, prepare_only, kernel_name, log_output, progress)
    if fingerprint is not None and outcome.status == "ok":
        with _disk_errors(plan.run_dir, f"recording step {step.name}"):
            record_fingerprint(plan.run_dir, step.name, settled_fingerprint(fingerprint, step, values))
    return outcome


def _start_record(plan: RunPlan) -> dict:
    """``params.json`` as this command starts (steps that do not run keep what they ran with) and a
    fresh ``environment.json`` that keeps what earlier steps recorded in it (weights, inputs)."""
    (plan.run_dir / runs.NOTEBOOKS_DIR).mkdir(parents=True, exist_ok=True)
    stale = runs.remove_temporaries(plan.run_dir)
    if stale:
        log.info("removed %d temporary file(s) an interrupted run left in %s", len(stale), plan.run_dir)
    record = runs.read_params(plan.run_dir) if plan.resumed else {}
    label = plan.profile if not plan.profile.endswith((".yaml", ".yml")) else relative_to_project(plan.profile_data["path"], PROJECT_ROOT)
    record.update({"profile": label, "run": plan.run_dir.name, "overrides": plan.overrides})
    record.setdefault("steps", {})
    environment_path = plan.run_dir / runs.ENVIRONMENT
    earlier = json.loads(environment_path.read_text()) if environment_path.is_file() else {}
    environment = snapshot_keeping(earlier if plan.resumed else {})
    atomic_write(environment_path, lambda tmp: tmp.write_text(json.dumps(environment, indent=2)))
    return record


def _execute(step: Step, step_params: dict, run_dir: Path, prepare_only: bool, kernel_name: str, log_output: bool,
             progress: bool) -> StepResult:
    """Run one notebook with papermill: its library messages and progress lines reach this process's
    stderr (``progress``), over an IPC kernel connection (no TCP port, no TCP warning)."""
    output = run_dir / runs.NOTEBOOKS_DIR / step.path.name
    log.info("[%s] %s -> %s", step.name, "preparing" if prepare_only else "running", output)
    started = time.perf_counter()
    extra = {} if prepare_only else {"config": Config({"KernelManager": {"transport": "ipc"}}),
                                      "extra_arguments": kernel_arguments(quiet=not log_output)}
    try:
        with _step_environment(step.name):
            papermill.execute_notebook(
                str(step.path), str(output), parameters=step_params, kernel_name=kernel_name,
                prepare_only=prepare_only, cwd=str(run_dir), progress_bar=False, log_output=log_output,
                stderr_file=sys.stderr if progress and not log_output else None, **extra,
            )
    except Exception as exc:  # papermill's PapermillExecutionError, a dead kernel, ...
        message = _describe_failure(exc)
        if is_no_space(message):
            message = f"{no_space_note(run_dir, f'step {step.name}')}\n  the error: {message}"
        return StepResult(step.name, time.perf_counter() - started, output, "failed", message)
    return StepResult(step.name, time.perf_counter() - started, output, "prepared" if prepare_only else "ok")


@contextlib.contextmanager
def _step_environment(step_name: str):
    """Tell the kernel (it inherits this environment) that it runs headless as ``step_name``, so the
    library reports progress as log lines (:func:`dfd_lib.core.logs.progress_bar`)."""
    before = os.environ.get(PIPELINE_STEP_ENV)
    os.environ[PIPELINE_STEP_ENV] = step_name
    os.environ[RUNNER_ENV] = str(os.getpid())
    try:
        yield
    finally:
        os.environ.pop(RUNNER_ENV, None)
        if before is None:
            os.environ.pop(PIPELINE_STEP_ENV, None)
        else:
            os.environ[PIPELINE_STEP_ENV] = before


NO_SPACE_MARKERS = ("no space left on device", "errno 28]", "os error 28", "disk quota exceeded")


def is_no_space(message: str) -> bool:
    """Whether an error message (from any library: python's OSError, safetensors, torch, PIL) says the disk is full."""
    return any(marker in message.lower() for marker in NO_SPACE_MARKERS)


def no_space_note(run_dir: Path, what: str) -> str:
    free = shutil.disk_usage(run_dir).free if run_dir.exists() else 0
    return (f"no space left on device: {what} could not write into {run_dir} ({free / 2**20:.0f} MB free on its "
            "filesystem now). Earlier artefacts are intact: free space, then resume")


@contextlib.contextmanager
def _disk_errors(run_dir: Path, what: str):
    """A full disk while the pipeline itself writes its records becomes a clear :class:`PipelineError`."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PipelineError(f"{no_space_note(run_dir, what)}: {exc}") from None
        raise


def step_summary(run_dir: Path, step_name: str, limit: int = 6) -> str:
    """``": key value, ..."``: the first few scalar figures ``step_name`` recorded in ``metrics.json``."""
    figures = runs.RunDir(run_dir).metrics().get(step_name, {})
    scalars = [(k, v) for k, v in figures.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    shown = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scalars[:limit]]
    return (": " + ", ".join(shown)) if shown else ""


def _write_timings(run_dir: Path, result: PipelineResult) -> None:
    timings_path = run_dir / runs.TIMINGS
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    timings.update({s.step: {"seconds": round(s.seconds, 2), "status": s.status} for s in result.steps if s.status != SKIPPED})
    atomic_write(timings_path, lambda tmp: tmp.write_text(json.dumps(timings, indent=2)))
