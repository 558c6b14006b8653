"""``dfd status RUN [-p K=V ...]``: which steps of a run are up to date, which are stale and why, which
never ran (:mod:`dfd_lib.pipeline.status`); with ``-p``, what would be stale if those values were applied
(nothing is changed). It also says whether the code differs from the code the run was made with. Exit 0
when every step is up to date, 1 otherwise, 2 when the run cannot be read."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dfd_lib.core import runs
from dfd_lib.pipeline.chain import run_state
from dfd_lib.pipeline.environment import git_state
from dfd_lib.pipeline.parameters import ParameterError, parse_overrides
from dfd_lib.pipeline.status import format_status
from dfd_lib.pipeline.steps import PipelineError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="the run: its name under reports/, or its folder")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="show what would be stale with this value (as dfd pipeline -p; nothing is changed)")


def run(args: argparse.Namespace) -> int:
    try:
        run_dir, statuses = run_state(args.run, parse_overrides(args.param))
    except (PipelineError, ParameterError) as exc:
        log.error("dfd status: %s", exc)
        return 2
    print(format_status(statuses))
    print(code_note(run_dir))
    stale = [s.step for s in statuses if not s.current]
    if stale:
        print(f"{len(stale)} step(s) to run: dfd pipeline --run {args.run}" + "".join(f" -p {p}" for p in args.param))
    else:
        print("every step is up to date")
    return 1 if stale else 0


def code_note(run_dir: Path) -> str:
    """Whether the code now is the code the run was made with (its commit and uncommitted changes)."""
    path = Path(run_dir) / runs.ENVIRONMENT
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    then, then_dirty = recorded.get("git_commit"), recorded.get("git_dirty")
    now, now_dirty = git_state()
    if not then or not now:
        return "code: no commit to compare (not a git checkout, or the run recorded none)"
    if then == now and not then_dirty and not now_dirty:
        return f"code: the same commit as the run ({now[:10]})"
    dirty = {True: " with uncommitted changes", False: "", None: ""}
    return (f"code differs: the run was made at {then[:10]}{dirty[then_dirty]}, the code now is {now[:10]}{dirty[now_dirty]}; "
            "steps whose notebook or modules changed are stale above")
