"""``dfd pipeline``: run the numbered notebooks headless (:mod:`dfd_lib.pipeline.chain`)."""
from __future__ import annotations

import argparse
import logging

from dfd_lib.pipeline.chain import PipelineError, parse_overrides, run_pipeline

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="demo", help="pipelines/<profile>.yaml: smoke, demo or full (or a .yaml path)")
    parser.add_argument("--only", help="comma-separated steps to run, e.g. 01,02")
    parser.add_argument("--from", dest="start", help="run this step and all later ones (resume)")
    parser.add_argument("--run", help="run name: outputs go to reports/<run>/ (default: the profile's)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="override a parameter for every step that declares it; STEP.NAME=VALUE for one step")
    parser.add_argument("--prepare-only", action="store_true", help="inject parameters, do not execute (a dry run)")
    parser.add_argument("--log-output", action="store_true", help="stream the notebooks' output to the terminal")
    parser.add_argument("--no-report", action="store_true", help="do not write reports/<run>/index.html")
    parser.add_argument("--no-check", action="store_true", help="skip the preflight (dfd check) before the first step")


def run(args: argparse.Namespace) -> int:
    try:
        result = run_pipeline(args.profile, only=args.only, start=args.start, run=args.run,
                              overrides=parse_overrides(args.param), prepare_only=args.prepare_only,
                              log_output=args.log_output, write_report=not args.no_report, check=not args.no_check)
    except PipelineError as exc:
        log.error("dfd pipeline: %s", exc)
        return 2
    total = sum(s.seconds for s in result.steps)
    for s in result.steps:
        print(f"{s.step:24s} {s.status:9s} {s.seconds:8.1f} s")
    print(f"{'total':24s} {'':9s} {total:8.1f} s   -> {result.run_dir}")
    return 0 if result.ok else 1
