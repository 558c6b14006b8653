"""The pipeline's steps: the notebooks of the step graph (:data:`dfd_lib.core.runs.STEPS`), and how a
command selects some of them (``--only``, ``--from``) or finds what follows a step.

A notebooks folder holds one ``NN_name.ipynb`` per step of the graph. Another folder (tests, a user's
own chain) may hold notebooks the graph does not declare: each such step is taken to read what every
earlier step wrote, so a change upstream always reaches it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dfd_lib.core import runs
from dfd_lib.core.paths import NOTEBOOKS_DIR


class PipelineError(RuntimeError):
    """A pipeline that cannot start (bad profile, unknown step or parameter) or a failed step."""


@dataclass(frozen=True)
class Step:
    """A step of the graph and the notebook that runs it."""

    spec: runs.StepSpec
    path: Path
    declared: bool = True  # False: a notebook the graph does not know (it depends on every earlier step)

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def name(self) -> str:
        return self.spec.name

    def matches(self, token: str) -> bool:
        return self.spec.matches(token)


def discover_steps(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Step]:
    """The steps of ``notebooks_dir``, in chain order; every step of the graph must have its notebook there
    unless the folder holds none of them (a chain of its own)."""
    found = {p.stem: p for p in sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))}
    if not found:
        raise PipelineError(f"no numbered notebooks (NN_name.ipynb) in {notebooks_dir}")
    known = {spec.name: spec for spec in runs.STEPS}
    if set(found) & set(known):
        missing = [name for name in known if name not in found]
        if missing:
            raise PipelineError(f"{notebooks_dir} lacks the notebooks of step(s) {', '.join(missing)}")
    return [Step(known.get(name, runs.StepSpec(name)), path, declared=name in known) for name, path in found.items()]


def select_steps(steps: list[Step], only: str | list[str] | None = None, start: str | None = None) -> list[Step]:
    """``only``: comma-separated steps ("01,02" or names); ``start``: this step and all after."""
    chosen = steps
    if start:
        chosen = steps[_find(steps, start):]
    if only:
        tokens = only.split(",") if isinstance(only, str) else list(only)
        wanted = {steps[_find(steps, t)].name for t in tokens if t.strip()}
        chosen = [s for s in chosen if s.name in wanted]
    if not chosen:
        raise PipelineError("no step selected (check --only and --from)")
    return chosen


def find_step(steps: list[Step], token: str) -> Step:
    return steps[_find(steps, token)]


def _find(steps: list[Step], token: str) -> int:
    for i, step in enumerate(steps):
        if step.matches(token):
            return i
    raise PipelineError(f"unknown step {token!r}; steps are {', '.join(s.name for s in steps)}")


def upstream_of(steps: list[Step], step: Step) -> list[Step]:
    """The steps whose files ``step`` reads (every earlier step for a step the graph does not declare)."""
    earlier = steps[:steps.index(step)]
    if not step.declared:
        return earlier
    return [s for s in earlier if not s.declared or set(step.spec.reads) & set(s.spec.writes)]
