"""The component ladder's four paired verdicts come from one test split: Holm's correction keeps the
chance of any false "better" or "worse" among them at 5 %, and the table and the figure say so. The
ladder here is made in the test: five rungs' scores on 120 test rows, each rung the one below plus a
step towards the labels and some noise (one step, rung 3's, too small to survive the correction)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dfd_lib.evaluation.comparison import Headline, metrics_row
from dfd_lib.evaluation.ladder import RUNGS, LadderTrainings
from dfd_lib.evaluation.ladder_results import ladder_table, plot_ladder
from dfd_lib.stats.bootstrap import BETTER, BootstrapConfig, paired_bootstrap
from dfd_lib.stats.multiple_testing import holm_adjusted

INTERVALS = BootstrapConfig(bootstrap_resamples=1000, seed=0)
STEPS = (0.0, 0.45, 0.25, 0.9, 0.05)  # what each rung adds towards the labels


def _ladder_scores(seed: int = 28, n: int = 120) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    current, scores = rng.normal(size=n), []
    for step in STEPS:
        current = current + step * labels + 0.35 * rng.normal(size=n)
        scores.append(1 / (1 + np.exp(-current)))  # fake-probabilities
    return labels, scores


def _ladder(tmp_path: Path):
    """A Headline that has scored every rung's model, and the trainings behind the rungs (none to score again)."""
    labels, scores = _ladder_scores()
    names = [f"rung {rung.number}" for rung in RUNGS]
    weights = {name: tmp_path / f"{name}.safetensors" for name in names}
    headline = Headline(table=pd.DataFrame(), scores=pd.DataFrame(dict(zip(names, scores))),
                        rows=pd.DataFrame({"label": labels}), unreadable=0, seconds=0.0, weights=weights)
    trained = {rung.number: [type("Trained", (), {"best_weights": weights[name]})()] for rung, name in zip(RUNGS, names)}
    trainings = LadderTrainings(resplit=0, seeds=[0], rungs=[trained], sources=[dict.fromkeys(trained, "made in the test")],
                                trained=[], seconds=0.0)
    return labels, scores, ladder_table(trainings, headline, bootstrap=INTERVALS, progress=False)


def test_holm_adjusts_step_down_and_keeps_the_order():
    assert holm_adjusted([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjusted([np.nan, 0.2, 0.01]).tolist()[1:] == pytest.approx([0.2, 0.02])  # NaN: not a comparison
    assert np.isnan(holm_adjusted([np.nan, 0.2])[0]) and holm_adjusted([0.6, 0.7]).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm_adjusted([1.5])


def test_the_ladders_verdicts_are_holm_corrected_and_say_so(tmp_path):
    labels, scores, ladder = _ladder(tmp_path)
    table = ladder.table
    # the headline figures are the rungs' own, untouched by the correction
    for rung, own in zip(table.index, scores):
        assert table.loc[rung, "test_auc"] == pytest.approx(metrics_row(labels, own)["test_auc"])
    unadjusted = [paired_bootstrap(labels, scores[k], scores[k - 1], INTERVALS) for k in range(1, 5)]
    assert table["p_value"].iloc[1:].tolist() == pytest.approx([paired["p_value"] for paired in unadjusted])
    assert table["p_holm"].iloc[1:].tolist() == pytest.approx(holm_adjusted(table["p_value"].iloc[1:]).tolist())
    assert np.isnan(table.loc[1, "p_holm"]) and table.loc[1, "verdict"] == ""
    # rung 3's step: better on its own (its interval clears zero), not once four verdicts are drawn
    assert unadjusted[1]["verdict"] == BETTER and table.loc[3, "p_value"] < 0.05 <= table.loc[3, "p_holm"]
    assert table["verdict"].tolist() == ["", "better than rung 1 (Holm)", "no clear difference (Holm)",
                                         "better than rung 3 (Holm)", "no clear difference (Holm)"]
    figure = plot_ladder(ladder, tmp_path / "ladder.png")
    assert "Holm-corrected over its 4 comparisons (family-wise 5%)" in figure.axes[0].get_title()
    assert (tmp_path / "ladder.png").is_file()
