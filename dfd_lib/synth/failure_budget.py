"""The enrichment's failure budget: an image that fails is listed and skipped, but a family that
loses more than a stated share of its planned images stops the step.

One unreadable source or one bad mask is bad input, and the run goes on without that image. When
most of a family fails (a bug, a checkpoint that does not load its weights, CUDA out of memory),
notebook 03 and ``dfd augment`` would otherwise succeed with that family thin or absent, and
training would go on without it; :func:`check_failure_budget` makes that an error whose message
says, per family, what was planned, made and failed, and the first reasons.
"""
from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

DEFAULT_MAX_FAILED_SHARE = 0.1  # a family may lose up to 10 % of its planned images
SUMMARY_COLUMNS = ["planned", "made", "failed", "first_reasons"]
REASONS_SHOWN = 3


class FailureBudgetExceeded(RuntimeError):
    """More images of some family failed than the budget allows; ``summary`` has every family."""

    def __init__(self, summary: pd.DataFrame, max_share: float):
        self.summary = summary
        self.max_share = max_share
        over = summary[summary["failed"] > max_share * summary["planned"]]
        lines = [f"  {family}: {row.planned} planned, {row.made} made, {row.failed} failed; first reasons: {row.first_reasons}"
                 for family, row in over.iterrows()]
        super().__init__(
            f"image generation failed for more than {max_share:.0%} of the planned images of "
            f"{len(over)} famil{'y' if len(over) == 1 else 'ies'}:\n" + "\n".join(lines)
            + "\nThe images made are kept (a rerun resumes from them). Fix the cause, or raise max_failed_share "
              "(1 = never stop) to accept the losses.")


def generation_summary(planned: Mapping[str, int], rows: pd.DataFrame, failures: pd.DataFrame) -> pd.DataFrame:
    """Per output family: images ``planned``, ``made`` (now or by an earlier run), ``failed``, and the
    first distinct reasons of its failures."""
    families = list(dict.fromkeys([*planned, *rows.get("family", []), *failures.get("family", [])]))
    made = rows["family"].value_counts() if len(rows) else pd.Series(dtype=int)
    failed = failures["family"].value_counts() if len(failures) else pd.Series(dtype=int)
    reasons = {family: "; ".join(list(dict.fromkeys(group["reason"].astype(str)))[:REASONS_SHOWN])
               for family, group in failures.groupby("family", sort=False)} if len(failures) else {}
    summary = pd.DataFrame({
        "planned": [int(planned.get(family, 0)) for family in families],
        "made": [int(made.get(family, 0)) for family in families],
        "failed": [int(failed.get(family, 0)) for family in families],
        "first_reasons": [reasons.get(family, "") for family in families],
    }, index=pd.Index(families, name="family"), columns=SUMMARY_COLUMNS)
    return summary


def check_failure_budget(planned: Mapping[str, int], rows: pd.DataFrame, failures: pd.DataFrame,
                         max_share: float = DEFAULT_MAX_FAILED_SHARE) -> pd.DataFrame:
    """:func:`generation_summary`, or :class:`FailureBudgetExceeded` when some family's failed images
    are more than ``max_share`` of its planned ones (nothing failed: never)."""
    summary = generation_summary(planned, rows, failures)
    if (summary["failed"] > max_share * summary["planned"]).any():
        raise FailureBudgetExceeded(summary, max_share)
    return summary
