"""``dfd pipeline``: run the numbered notebooks headless (:mod:`dfd_lib.pipeline.chain`)."""
from __future__ import annotations

import argparse
import logging

from dfd_lib.pipeline.chain import PipelineResult, run_pipeline
from dfd_lib.pipeline.parameters import ParameterError, parse_overrides
from dfd_lib.pipeline.profiles import DEFAULT_PROFILE
from dfd_lib.pipeline.steps import PipelineError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default=None,
                        help=f"pipelines/<profile>.yaml: smoke, demo or full (or a .yaml path); default: the run's "
                             f"recorded profile, else {DEFAULT_PROFILE}")
    parser.add_argument("--only", help="comma-separated steps to run, e.g. 01,02 (on an existing run: with its recorded settings)")
    parser.add_argument("--from", dest="start", help="run this step and all later ones (resume: the run's recorded profile and -p apply); "
                                                     "without --only/--from an existing run runs only its steps that are not up to date")
    parser.add_argument("--run", help="run name: outputs go to reports/<run>/ (default: the profile's); or a folder path")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="override a parameter for every step that declares it; STEP.NAME=VALUE for one step. "
                             "Values are read by the type the notebook declares (a str stays text: -p 04.mixed_precision=no)")
    parser.add_argument("--force", action="append", default=[], metavar="STEP",
                        help="run this step even when it is up to date (repeat for several)")
    parser.add_argument("--prepare-only", action="store_true", help="inject parameters, do not execute (a dry run)")
    parser.add_argument("--log-output", action="store_true", help="stream every output of the notebooks (tables too) to the terminal")
    parser.add_argument("--quiet", action="store_true", help="hide the steps' own progress lines")
    parser.add_argument("--no-report", action="store_true", help="do not write reports/<run>/index.html")
    parser.add_argument("--no-check", action="store_true", help="skip the preflight (dfd check) before the first step")


def run(args: argparse.Namespace) -> int:
    try:
        result = run_pipeline(args.profile, only=args.only, start=args.start, run=args.run,
                              overrides=parse_overrides(args.param), prepare_only=args.prepare_only,
                              log_output=args.log_output, progress=not args.quiet, write_report=not args.no_report,
                              check=not args.no_check, force=args.force)
    except (PipelineError, ParameterError) as exc:
        log.error("dfd pipeline: %s", exc)
        return 2
    print_steps(result)
    return 0 if result.ok else 1


def print_steps(result: PipelineResult) -> None:
    total = sum(s.seconds for s in result.steps)
    for s in result.steps:
        print(f"{s.step:24s} {s.status:9s} {s.seconds:8.1f} s")
    print(f"{'total':24s} {'':9s} {total:8.1f} s   -> {result.run_dir}")
    if result.resume:
        print(f"resume with: {result.resume}")
