"""The pipeline's steps: the numbered notebooks (``notebooks/NN_name.ipynb``), and how a command
selects some of them (``--only``, ``--from``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dfd_lib.core.paths import NOTEBOOKS_DIR


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
