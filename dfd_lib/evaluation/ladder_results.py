"""The component ladder's table and figure (its trainings: :mod:`dfd_lib.evaluation.ladder`).

Every rung is scored on the headline's test rows: models the headline scored already (the
official-split model, the experts) are not scored again, and a rung of several trainings (the
mixture) scores the mean of their fake-probabilities, as :class:`~dfd_lib.models.experts.MixtureOfExperts`
does. When the headline has a linear probe (:mod:`dfd_lib.evaluation.linear_probe`), it stands below
them as rung 0, its scores the headline's (the same at every seed: it has no randomness). Each rung
gets its test metrics with their bootstrap intervals (the run's own seed), the mean and standard
deviation across seeds, and the paired bootstrap verdict against the rung below. The ladder draws
four such verdicts from one test split (five with the probe), so they carry Holm's correction
(:mod:`dfd_lib.stats.multiple_testing`): a verdict says *better* or *worse* only when its Holm-adjusted
p-value is below the family-wise level (1 - the intervals' confidence, 5 % by default), and says so.
"""
from __future__ import annotations

import dataclasses
import math
import os
import textwrap
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dfd_lib.core.figures import save_figure
from dfd_lib.evaluation.comparison import Headline, metrics_row, score_experts
from dfd_lib.evaluation.ladder import PROBE_RUNG, PROBE_SOURCE, RUNGS, LadderTrainings, Rung
from dfd_lib.stats.bootstrap import BETTER, INTERVAL_METRICS, UNCLEAR, WORSE, BootstrapConfig, paired_bootstrap
from dfd_lib.stats.metrics import LOW_FPRS, tpr_key
from dfd_lib.stats.multiple_testing import holm_adjusted

VERDICT_METRIC = "auc"
CORRECTION = "Holm"  # named in every verdict, the table's p_holm column and the figure


@dataclass
class Ladder:
    table: pd.DataFrame  # one row per rung (see ladder_table)
    per_seed: pd.DataFrame  # one row per (rung, seed): the test metrics of that seed's model(s)
    scores: pd.DataFrame  # per seed and rung ("<seed>/<rung>"): fake-probabilities on the headline's test rows
    seconds: float  # scoring and intervals
    training_seconds: float = 0.0  # the trainings made for the ladder (LadderTrainings.seconds)
    familywise_level: float = math.nan  # the verdicts' level after Holm's correction (NaN: no bootstrap, no verdicts)


def rung_scores(trainings: LadderTrainings, headline: Headline, batch_size: int = 64, device: str | None = None,
                progress: bool = True) -> pd.DataFrame:
    """Fake-probabilities of every rung at every seed (column ``"<seed>/<rung>"``) on the headline's
    test rows; only the trainings the headline did not score are scored here. The headline's probe, if
    any, is rung 0 at every seed."""
    known = {str(path): headline.scores[name] for name, path in headline.weights.items()}
    missing = {str(r.best_weights): r.best_weights for models in trainings.rungs for results in models.values()
               for r in results if str(r.best_weights) not in known}
    if missing:
        fresh = score_experts(missing, headline.rows, batch_size=batch_size, device=device, progress=progress)
        if fresh.isna().any().any():
            raise ValueError("an image the headline scored could not be read again while scoring the ladder")
        known.update({name: fresh[name] for name in fresh.columns})
    columns = {}
    probe = headline.probe_model
    for seed, models in zip(trainings.seeds, trainings.rungs):
        if probe is not None:
            columns[f"{seed}/{PROBE_RUNG.number}"] = headline.scores[probe].to_numpy()
        for number, results in models.items():
            columns[f"{seed}/{number}"] = np.mean([known[str(r.best_weights)].to_numpy() for r in results], axis=0)
    return pd.DataFrame(columns, index=headline.rows.index)


def ladder_table(trainings: LadderTrainings, headline: Headline, bootstrap: BootstrapConfig | None = None,
                 batch_size: int = 64, device: str | None = None, progress: bool = True) -> Ladder:
    """One row per rung: what it adds, where its training came from, its test metrics with their
    ``bootstrap`` intervals (the run's seed), their mean and standard deviation across seeds, and the
    paired bootstrap of its AUC against the rung below: ``delta_auc`` and its interval (this comparison
    alone), its ``p_value``, ``p_holm`` (Holm-adjusted over the ladder's comparisons) and the ``verdict``
    that ``p_holm`` gives (:func:`holm_verdicts`). Empty when the ladder did not run."""
    started = time.perf_counter()
    if not trainings.enabled:
        return Ladder(table=pd.DataFrame(columns=["rung", "model"]).set_index("rung"), per_seed=pd.DataFrame(),
                      scores=pd.DataFrame(), seconds=0.0)
    scores = rung_scores(trainings, headline, batch_size, device, progress)
    labels = headline.labels
    rungs = ladder_rungs(headline)
    per_seed = pd.DataFrame([{"rung": rung.number, "seed": seed, **metrics_row(labels, scores[f"{seed}/{rung.number}"].to_numpy())}
                             for seed in trainings.seeds for rung in rungs])
    first = trainings.seeds[0]
    rows = []
    for rung in rungs:
        own = scores[f"{first}/{rung.number}"].to_numpy()
        row = {"rung": rung.number, "model": rung.name, "adds": rung.adds,
               "from": trainings.sources[0].get(rung.number, PROBE_SOURCE), **metrics_row(labels, own, bootstrap)}
        seeded = per_seed[per_seed["rung"] == rung.number]
        for metric in INTERVAL_METRICS:
            values = seeded[f"test_{metric}"]
            row[f"test_{metric}_seed_mean"] = float(values.mean())
            row[f"test_{metric}_seed_sd"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        row.update(_against_below(labels, own, scores, first, rung.number, bootstrap))
        rows.append(row)
    level = 1 - bootstrap.confidence if bootstrap is not None and bootstrap.enabled else math.nan
    table = holm_verdicts(pd.DataFrame(rows).set_index("rung"), level)
    table["n_seeds"], table["n_test"] = len(trainings.seeds), len(labels)
    return Ladder(table=table, per_seed=per_seed, scores=scores, seconds=time.perf_counter() - started,
                  training_seconds=trainings.seconds, familywise_level=level)


def ladder_rungs(headline: Headline) -> list[Rung]:
    """The ladder's rungs: the trained ones, below them rung 0 (named as the headline names it) when the
    headline has a linear probe."""
    probe = headline.probe_model
    return ([dataclasses.replace(PROBE_RUNG, name=probe)] if probe is not None else []) + list(RUNGS)


def holm_verdicts(table: pd.DataFrame, level: float) -> pd.DataFrame:
    """``table`` (one row per rung, with ``delta_auc`` and ``p_value`` against the rung below) with
    ``p_holm``, the p-values adjusted by Holm's method over the comparisons made, and the ``verdict``
    at the family-wise ``level``: better or worse than the rung below when ``p_holm`` is below it, else
    no clear difference; each verdict names the correction. No p-value (no bootstrap): no verdict."""
    table = table.copy()
    p_holm = holm_adjusted(table["p_value"])
    verdicts = []
    for number, delta, adjusted in zip(table.index, table["delta_auc"], p_holm):
        if math.isnan(adjusted) or math.isnan(level):
            verdicts.append("")
        elif adjusted < level:
            verdicts.append(f"{BETTER if delta > 0 else WORSE} than rung {number - 1} ({CORRECTION})")
        else:
            verdicts.append(f"{UNCLEAR} ({CORRECTION})")
    at = table.columns.get_loc("p_value") + 1
    table.insert(at, "p_holm", p_holm)
    table["verdict"] = verdicts
    return table


def _against_below(labels: np.ndarray, own: np.ndarray, scores: pd.DataFrame, seed: int, number: int,
                   bootstrap: BootstrapConfig | None) -> dict:
    """The paired bootstrap of rung ``number`` against the rung below; the verdict comes after the
    correction over all rungs (:func:`holm_verdicts`)."""
    empty = {"delta_auc": math.nan, "delta_auc_lo": math.nan, "delta_auc_hi": math.nan, "p_value": math.nan, "verdict": ""}
    if f"{seed}/{number - 1}" not in scores.columns:  # the lowest rung
        return empty
    below = scores[f"{seed}/{number - 1}"].to_numpy()
    paired = paired_bootstrap(labels, own, below, bootstrap or BootstrapConfig(bootstrap_resamples=0), VERDICT_METRIC)
    return {"delta_auc": paired["delta"], "delta_auc_lo": paired["delta_lo"], "delta_auc_hi": paired["delta_hi"],
            "p_value": paired["p_value"], "verdict": ""}


def plot_ladder(ladder: Ladder, path: str | os.PathLike | None = None, title: str = "Component ladder on the test split",
                note: str = ""):
    """The ladder with its whiskers: test AUC and TPR at an FPR of 1 % per rung, the run's model as
    a dot with its bootstrap interval, other seeds as small grey dots, the paired verdict against the
    rung below (Holm-corrected) written above each whisker; ``note`` goes under the title. None when the
    ladder is empty."""
    import matplotlib.pyplot as plt  # deferred: pyplot is slow to import

    table = ladder.table
    if table.empty:
        return None
    panels = [("auc", "test AUC"), (tpr_key(LOW_FPRS[0]), f"TPR at FPR {LOW_FPRS[0]:.0%}")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    x = table.index.to_numpy()
    for ax, (metric, label) in zip(axes[0], panels):
        value, low, high = (table[f"test_{metric}{end}"].to_numpy(dtype=float) for end in ("", "_lo", "_hi"))
        whiskers = np.vstack([value - low, high - value]) if np.isfinite(low).all() else None
        ax.errorbar(x, value, yerr=whiskers, fmt="o", ms=7, capsize=5, lw=1.6, color="#1f4e79", zorder=3,
                    label="run's model, bootstrap interval")
        others = ladder.per_seed[ladder.per_seed["seed"] != ladder.per_seed["seed"].min()]
        if len(others):
            ax.scatter(others["rung"] + 0.12, others[f"test_{metric}"], s=14, color="grey", zorder=2, label="other seeds")
        if metric == "auc":
            tops = np.where(np.isfinite(high), high, value)
            for rung, verdict, delta, top in zip(x, table["verdict"], table["delta_auc"], tops):
                mark = {"better": "▲", "worse": "▼"}.get(str(verdict).split(" ")[0], "≈" if verdict else "")
                if mark:
                    ax.annotate(f"{mark} {delta:+.3f}", (rung, top), xytext=(0, 5), textcoords="offset points", ha="center",
                                fontsize="x-small")
        ax.margins(x=0.08, y=0.14)
        ax.set_xticks(x, [f"{n}\n" + "\n".join(textwrap.wrap(name, 16)) for n, name in zip(x, table["model"])],
                      fontsize="x-small")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="lower right", fontsize="x-small")
    axes[0][0].set_title(_verdict_legend(ladder), fontsize="small")
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize="medium")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return fig


def _verdict_legend(ladder: Ladder) -> str:
    """What the marks above the whiskers mean, the correction included."""
    compared = int(ladder.table["p_value"].notna().sum()) if "p_value" in ladder.table else 0
    if not compared or math.isnan(ladder.familywise_level):
        return "paired bootstrap of the AUC against the rung below: off (no verdicts)"
    return (f"▲ / ▼ / ≈: paired bootstrap of the AUC against the rung below,\n{CORRECTION}-corrected over its "
            f"{compared} comparisons (family-wise {ladder.familywise_level:.0%})")
