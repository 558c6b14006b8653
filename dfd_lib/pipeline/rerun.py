"""``dfd rerun RUN_DIR --run NEW``: execute a run again from what it recorded.

The new run gets the recorded profile and overrides (and any new ``-p``, recorded as such) and
runs the steps the old one ran. Before the first step it warns about every difference that could
change results: the code's commit or uncommitted changes, python, torch/CUDA/cuDNN, the device,
threads, any installed package (:func:`dfd_lib.pipeline.environment.differences`). After the first
step it compares the digest of every input dataset with the recorded one and stops, leaving the new
run resumable, when the data changed (``force`` goes on anyway). ``dfd compare`` then says whether
the two runs agree.
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
from dfd_lib.pipeline.parameters import ParameterError, parse_overrides
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
    first = run_pipeline(record["profile"], only=steps[0], run=new_run,
                         overrides={**record.get("overrides", {}), **(overrides or {})},
                         **{**settings, "write_report": settings.get("write_report", True) and len(steps) == 1})
    if not first.ok or len(steps) == 1:
        if not first.ok and len(steps) > 1 and settings.get("write_report", True):
            write_report(first.run_dir)
        return first
    _check_inputs(recorded_environment.get("inputs", {}), first.run_dir, force)
    rest = run_pipeline(only=",".join(steps[1:]), run=new_run, **settings)
    rest.steps = first.steps + rest.steps
    return rest


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
