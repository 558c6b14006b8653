"""``dfd rerun RUN_DIR --run NEW``: execute a run again from what it recorded.

The new run gets exactly the parameter values each step of the old one ran with (its fingerprints,
or ``params.json`` for runs made before them), not what the profile says today: when the profile
file was edited since, the rerun says which values it would change and replays the recorded ones.
Any new ``-p`` applies on top and is recorded as such. It runs the steps the old one ran. Before the
first step it warns about every difference that could change results: the code's commit or
uncommitted changes, python, torch/CUDA/cuDNN, the device, threads, any installed package
(:func:`dfd_lib.pipeline.environment.differences`). After the first step it compares the digest of
every input dataset with the recorded one and stops, leaving the new run resumable, when the data
changed (``force`` goes on anyway). ``dfd compare`` then says whether the two runs agree.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dfd_lib.core import runs
from dfd_lib.core.paths import NOTEBOOKS_DIR, PIPELINES_DIR, REPORTS_DIR, resolve
from dfd_lib.pipeline.chain import PipelineResult, run_pipeline
from dfd_lib.pipeline.cli import print_steps
from dfd_lib.pipeline.environment import differences, environment_snapshot
from dfd_lib.pipeline.fingerprints import plain, read_fingerprints
from dfd_lib.pipeline.parameters import ParameterError, parse_overrides, step_matches
from dfd_lib.pipeline.profiles import declared_parameters, step_values
from dfd_lib.pipeline.report import write_report
from dfd_lib.pipeline.steps import PipelineError, discover_steps

log = logging.getLogger(__name__)


def read_run(run_dir: Path) -> tuple[dict, dict]:
    """(params.json, environment.json) of a run folder; an error when it is not one."""
    record = runs.read_params(run_dir)
    if not record.get("profile") or not record.get("steps"):
        raise PipelineError(f"{run_dir} is not a run folder that ran (its {runs.PARAMS} names no profile or steps)")
    environment_path = run_dir / runs.ENVIRONMENT
    environment = json.loads(environment_path.read_text()) if environment_path.is_file() else {}
    return record, environment


def rerun(run_dir: str | Path, new_run: str, overrides: dict | None = None, force: bool = False,
          notebooks_dir: Path = NOTEBOOKS_DIR, pipelines_dir: Path = PIPELINES_DIR, reports_dir: Path = REPORTS_DIR,
          **options) -> PipelineResult:
    """Run ``run_dir`` again as ``new_run`` (``options``: as for :func:`run_pipeline`)."""
    run_dir = resolve(run_dir).resolve()
    record, recorded_environment = read_run(run_dir)
    target = (Path(reports_dir) / new_run).resolve()
    if target == run_dir or runs.read_params(target):
        raise PipelineError(f"{target} already holds a run; rerun into a new name (--run NEW)")
    for line in differences(recorded_environment, environment_snapshot()):
        log.warning("rerun: %s", line)
    known = [s.name for s in discover_steps(notebooks_dir)]
    steps = [name for name in known if name in record["steps"]]
    if not steps:
        raise PipelineError(f"none of the steps {run_dir} ran ({', '.join(record['steps'])}) exists in {notebooks_dir}")
    settings = dict(notebooks_dir=notebooks_dir, pipelines_dir=pipelines_dir, reports_dir=reports_dir, **options)
    recorded = recorded_values(run_dir, steps)
    for line in profile_changes(record, recorded, notebooks_dir, pipelines_dir):
        log.warning("rerun: %s", line)
    values = replayed(recorded, overrides or {})
    declared = {step.name: declared_parameters(step) for step in discover_steps(notebooks_dir)}
    now, later = split_overrides(values, steps[0], declared)
    first = run_pipeline(record["profile"], only=steps[0], run=new_run, overrides=now,
                         **{**settings, "write_report": settings.get("write_report", True) and len(steps) == 1})
    if not first.ok or len(steps) == 1:
        if not first.ok and len(steps) > 1 and settings.get("write_report", True):
            write_report(first.run_dir)
        return first
    _check_inputs(recorded_environment.get("inputs", {}), first.run_dir, force)
    rest = run_pipeline(only=",".join(steps[1:]), run=new_run, overrides=later, **settings)
    rest.steps = first.steps + rest.steps
    return rest


def recorded_values(run_dir: Path, steps: list[str]) -> dict[str, dict]:
    """Every parameter value each of ``steps`` ran with: its fingerprint's (all values, defaults
    included), else what ``params.json`` recorded (the values the profile and -p set)."""
    fingerprints = read_fingerprints(run_dir)
    steps_record = runs.read_params(run_dir).get("steps", {})
    return {step: {name: value for name, value in (fingerprints.get(step, {}).get("params") or steps_record.get(step, {})).items()
                   if name != "run_dir"} for step in steps}


def replayed(recorded: dict[str, dict], overrides: dict) -> dict:
    """``-p`` values that give each step exactly what it ran with (``STEP.name=value``), except where
    ``overrides`` (this command's ``-p``) names the parameter: those apply as given."""
    changed = {key.rpartition(".")[2]: key.rpartition(".")[0] for key in overrides}
    values = {f"{step}.{name}": value for step, names in recorded.items() for name, value in names.items()
              if not (name in changed and (not changed[name] or step_matches(step, changed[name])))}
    return {**values, **overrides}


def split_overrides(overrides: dict, first_step: str, declared: dict[str, dict]) -> tuple[dict, dict]:
    """``(for the first step, for the others)``: a value goes with the first call when it reaches the first
    step, which runs alone before the input data is checked (the others join once it passed)."""
    now, later = {}, {}
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        reaches_first = step_matches(first_step, section) if section else name in declared.get(first_step, {})
        (now if reaches_first else later)[key] = value
    return now, later


def profile_changes(record: dict, recorded: dict[str, dict], notebooks_dir: Path, pipelines_dir: Path) -> list[str]:
    """What the profile (and the run's -p) would give now that differs from what the steps ran with."""
    try:
        now = step_values(record["profile"], record.get("overrides", {}), only=",".join(recorded),
                          notebooks_dir=notebooks_dir, pipelines_dir=pipelines_dir)
    except (PipelineError, ParameterError) as exc:
        return [f"the profile {record['profile']!r} cannot be read as it was ({exc}); the recorded values are replayed"]
    lines = []
    for step, values in recorded.items():
        current = plain({name: value for name, value in now.get(step, {}).items() if name != "run_dir"})
        differs = [f"{name}={current.get(name, '(unset)')!r} (recorded {values.get(name, '(unset)')!r})"
                   for name in sorted(set(values) | set(current)) if values.get(name) != current.get(name)]
        if differs:
            lines.append(f"the profile {record['profile']!r} changed since the run: {step} would now run with "
                         f"{', '.join(differs)}; the rerun replays what the run recorded")
    return lines


def _check_inputs(recorded: dict, new_run_dir: Path, force: bool) -> None:
    now = json.loads((new_run_dir / runs.ENVIRONMENT).read_text()).get("inputs", {})
    if not recorded:
        log.warning("rerun: the original run recorded no input digests (made before they were kept): the data is not checked")
        return
    changed = [f"{name}: {digest[:12]} then, {now.get(name, 'absent')[:12]} now"
               for name, digest in recorded.items() if now.get(name) != digest]
    if not changed:
        log.info("rerun: the input data is the same (%s)", ", ".join(recorded))
        return
    message = "the input data changed since the run: " + "; ".join(changed)
    if not force:
        raise PipelineError(f"{message}. The new run stopped after its first step (--force goes on anyway)")
    log.warning("rerun: %s (going on: --force)", message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the run folder to execute again (reports/<run>)")
    parser.add_argument("--run", required=True, help="the new run's name (reports/<run>/) or folder")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="change a parameter in the rerun (as dfd pipeline -p; recorded in the new run)")
    parser.add_argument("--force", action="store_true", help="go on when the input data differs from the recorded digest")
    parser.add_argument("--quiet", action="store_true", help="hide the steps' own progress lines")
    parser.add_argument("--no-check", action="store_true", help="skip the preflight (dfd check) before the first step")


def run(args: argparse.Namespace) -> int:
    try:
        result = rerun(args.run_dir, args.run, parse_overrides(args.param), force=args.force,
                       progress=not args.quiet, check=not args.no_check)
    except (PipelineError, ParameterError) as exc:
        log.error("dfd rerun: %s", exc)
        return 2
    print_steps(result)
    if result.ok:
        print(f"compare with: dfd compare {args.run_dir} {result.run_dir}")
    return 0 if result.ok else 1
