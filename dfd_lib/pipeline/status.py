"""Which steps of a run are up to date: each step's recorded fingerprint (:mod:`dfd_lib.pipeline.fingerprints`)
against what it would run on now.

A step is **stale** when any of these changed since it last finished: a resolved parameter value, the
content of a run file it reads, a file outside the run its parameters name (a dataset, weights), its
notebook's code or a ``dfd_lib`` module the notebook runs; or when a step it reads from is stale (it
will run again first), or a file it writes is gone. A step with no record is **not run**. The rule
for code is deliberately strict: any change of a module a notebook imports, directly or not, makes
the step stale (a comment too); the units inside a step (trainings, the embedding cache, augmented
images) are keyed by what they compute from, so a rerun reuses those whose key did not change.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dfd_lib.pipeline.fingerprints import (
    MISSING,
    code_fingerprint,
    external_paths,
    file_digests,
    plain,
    read_fingerprints,
    tree_signature,
)
from dfd_lib.pipeline.steps import Step, upstream_of

UP_TO_DATE, STALE, NOT_RUN = "up to date", "stale", "not run"
SHOWN_CHANGES = 4  # changed items named per reason; the rest are counted


@dataclass
class StepStatus:
    step: str
    state: str
    reasons: list[str] = field(default_factory=list)

    @property
    def current(self) -> bool:
        return self.state == UP_TO_DATE


def _named(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN_CHANGES])
    return shown + (f" and {len(items) - SHOWN_CHANGES} more" if len(items) > SHOWN_CHANGES else "")


def parameter_changes(recorded: Mapping, now: Mapping) -> list[str]:
    """``name: old -> new`` for every parameter whose value differs."""
    now = plain({k: v for k, v in now.items() if k != "run_dir"})
    names = sorted(set(recorded) | set(now))
    return [f"{name}: {recorded.get(name, '(unset)')!r} -> {now.get(name, '(unset)')!r}"
            for name in names if recorded.get(name) != now.get(name)]


def input_changes(step: Step, run_dir: Path, recorded: Mapping[str, str]) -> list[str]:
    """The run files ``step`` reads whose content differs from what it read."""
    now = file_digests(run_dir, step.spec.reads)
    changed = sorted(name for name in set(recorded) | set(now) if recorded.get(name) != now.get(name))
    return [f"{name} ({'missing' if now.get(name, MISSING) == MISSING else 'changed'})" for name in changed]


def external_changes(step: Step, values: Mapping, recorded: Mapping[str, str]) -> list[str]:
    now = {name: tree_signature(path) for name, path in external_paths(step, values).items()}
    return [f"{name} ({now.get(name, 'not used now') if now.get(name) in (MISSING, None) else 'changed'})"
            for name in sorted(set(recorded) | set(now)) if recorded.get(name) != now.get(name)]


def code_changes(step: Step, recorded: Mapping[str, str]) -> list[str]:
    now = code_fingerprint(step.path)
    return [name for name in sorted(set(recorded) | set(now)) if recorded.get(name) != now.get(name)]


def step_status(step: Step, run_dir: Path, values: Mapping, record: Mapping | None, ran: bool = False) -> StepStatus:
    """``step``'s status from its own record alone (upstream steps aside). ``ran``: the run's
    ``params.json`` says it ran (a run made before fingerprints were recorded)."""
    if record is None:
        return StepStatus(step.name, STALE, ["ran before fingerprints were recorded"]) if ran else StepStatus(step.name, NOT_RUN)
    reasons = []
    changes = {
        "parameters changed": parameter_changes(record.get("params", {}), values),
        "its input changed": input_changes(step, run_dir, record.get("inputs", {})),
        "outside input changed": external_changes(step, values, record.get("external", {})),
        "code changed": code_changes(step, record.get("code", {})),
    }
    reasons = [f"{what}: {_named(items)}" for what, items in changes.items() if items]
    gone = [name for name in step.spec.writes if not (run_dir / name).exists()]
    if gone:
        reasons.append(f"its output is missing: {_named(gone)}")
    return StepStatus(step.name, STALE if reasons else UP_TO_DATE, reasons)


def run_status(steps: list[Step], run_dir: Path, values: Mapping[str, Mapping], ran: Mapping[str, object] = ()) -> list[StepStatus]:
    """The status of every step of ``steps`` in ``run_dir`` if run with ``values`` (step -> resolved
    parameters); a step downstream of a stale or unrun step is stale too (it will run again after it)."""
    records = read_fingerprints(run_dir)
    statuses: dict[str, StepStatus] = {}
    for step in steps:
        status = step_status(step, run_dir, values[step.name], records.get(step.name), ran=step.name in ran)
        waiting = [s.name for s in upstream_of(steps, step) if not statuses[s.name].current]
        if waiting and status.state != NOT_RUN:
            status.state = STALE
            status.reasons.append(f"upstream step {_named(waiting)} will run first")
        statuses[step.name] = status
    return list(statuses.values())


def format_status(statuses: list[StepStatus]) -> str:
    lines = []
    for status in statuses:
        lines.append(f"{status.step:20s} {status.state}")
        lines.extend(f"{'':20s}   - {reason}" for reason in status.reasons)
    return "\n".join(lines)
