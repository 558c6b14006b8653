"""The stratified bootstrap: its vectorised metrics equal binary_metrics, its resamples keep the
class counts, its 95 % interval covers a known AUC about 95 % of the time, and the paired bootstrap
tells a better model from an equal one."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from dfd_lib.stats.bootstrap import (
    BETTER,
    INTERVAL_METRICS,
    UNCLEAR,
    WORSE,
    BootstrapConfig,
    curve_metrics,
    intervals,
    paired_bootstrap,
    resample_counts,
    roc_band,
)
from dfd_lib.stats.group_metrics import per_group_metrics
from dfd_lib.stats.metrics import binary_metrics, tpr_at_fpr


def _scores(rng, n_real, n_fake, separation):
    """Binormal scores: reals N(0, 1), fakes N(separation, 1); their AUC is Phi(separation / sqrt 2)."""
    y = np.r_[np.zeros(n_real, int), np.ones(n_fake, int)]
    return y, np.r_[rng.normal(0, 1, n_real), rng.normal(separation, 1, n_fake)]


def test_curve_metrics_equal_binary_metrics_for_unit_and_integer_weights():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(4, 80))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = np.round(rng.random(n), 1)  # many ties
        weights = rng.integers(0, 3, n)
        weights[:2] = 1  # both classes stay present
        repeated = np.repeat(np.arange(n), weights)
        for counts, expected in ((np.ones(n), binary_metrics(y, s)), (weights, binary_metrics(y[repeated], s[repeated]))):
            values = curve_metrics(y, s, counts[None, :])
            for metric in INTERVAL_METRICS:
                assert values[metric][0] == pytest.approx(expected[metric], abs=1e-12), metric


def test_resamples_are_stratified_and_seeded():
    y = np.r_[np.zeros(30, int), np.ones(12, int)]
    counts = resample_counts(y, 200, seed=3)
    assert counts.shape == (200, 42)
    assert (counts[:, y == 0].sum(axis=1) == 30).all() and (counts[:, y == 1].sum(axis=1) == 12).all()
    assert np.array_equal(counts, resample_counts(y, 200, seed=3)) and not np.array_equal(counts, resample_counts(y, 200, seed=4))


def test_interval_covers_a_known_auc_about_95_percent_of_the_time():
    separation = 1.0
    true_auc = norm.cdf(separation / math.sqrt(2))  # 0.760
    rng = np.random.default_rng(7)
    config = BootstrapConfig(bootstrap_resamples=400)
    covered, widths = [], []
    for trial in range(200):
        y, s = _scores(rng, 60, 40, separation)
        found = intervals(y, s, BootstrapConfig(bootstrap_resamples=400, seed=trial))
        covered.append(found["auc_lo"] <= true_auc <= found["auc_hi"])
        widths.append(found["auc_hi"] - found["auc_lo"])
    assert 0.89 <= np.mean(covered) <= 0.99  # 200 trials: about +-0.03 around 0.95
    assert 0.12 < np.mean(widths) < 0.25  # about 2 x 1.96 x the AUC's standard error at 60 + 40 images
    assert config.quantiles == pytest.approx((0.025, 0.975))


def test_paired_bootstrap_tells_better_from_equal():
    rng = np.random.default_rng(1)
    y, strong = _scores(rng, 150, 150, 2.0)
    weak = strong + rng.normal(0, 2.5, strong.size)  # the same ranking blurred
    config = BootstrapConfig(bootstrap_resamples=500)
    ahead = paired_bootstrap(y, strong, weak, config)
    assert ahead["verdict"] == BETTER and ahead["delta_lo"] > 0 and ahead["share_not_better"] < 0.025
    assert ahead["delta"] == pytest.approx(binary_metrics(y, strong)["auc"] - binary_metrics(y, weak)["auc"])
    assert paired_bootstrap(y, weak, strong, config)["verdict"] == WORSE
    same = paired_bootstrap(y, strong, strong, config)
    assert same["verdict"] == UNCLEAR and same["delta"] == 0 and same["delta_lo"] == same["delta_hi"] == 0
    assert paired_bootstrap(y, strong, weak, config, metric="eer")["verdict"] == BETTER  # a lower EER is better
    assert paired_bootstrap(y, strong, weak, BootstrapConfig(bootstrap_resamples=0))["verdict"] == ""
    with pytest.raises(ValueError, match="unknown metric"):
        paired_bootstrap(y, strong, weak, config, metric="accuracy")


def test_intervals_off_or_one_class_give_nan_and_roc_band_holds_the_curve():
    rng = np.random.default_rng(2)
    y, s = _scores(rng, 80, 80, 1.5)
    assert all(math.isnan(v) for v in intervals(y, s, BootstrapConfig(bootstrap_resamples=0)).values())
    assert all(math.isnan(v) for v in intervals(np.ones(5), rng.random(5), BootstrapConfig()).values())
    found = intervals(y, s, BootstrapConfig())
    point = binary_metrics(y, s)
    for metric in INTERVAL_METRICS:
        assert found[f"{metric}_lo"] <= point[metric] <= found[f"{metric}_hi"], metric
    grid, low, high = roc_band(y, s, BootstrapConfig(bootstrap_resamples=300), grid=np.array([0.0, 0.1, 0.5, 1.0]))
    assert (low <= high).all() and high[-1] == 1.0 and (np.diff(low) >= 0).all()
    assert low[1] <= tpr_at_fpr(y, s, 0.1)[0] <= high[1]  # the curve's own TPR at an FPR of 0.1 lies in its band


def test_per_group_metrics_with_intervals():
    rng = np.random.default_rng(3)
    y, s = _scores(rng, 60, 60, 1.0)
    table = pd.DataFrame({"label": y, "family": ["real"] * 60 + ["a"] * 30 + ["b"] * 30})
    rows = per_group_metrics(table, s, by="family", bootstrap=BootstrapConfig(bootstrap_resamples=200)).set_index("family")
    assert rows.loc["a", "auc_lo"] <= rows.loc["a", "auc"] <= rows.loc["a", "auc_hi"]
    assert math.isnan(rows.loc["real", "auc_lo"])  # reals alone: no AUC, no interval
    assert "auc_lo" not in per_group_metrics(table, s, by="family").columns


def test_config_is_validated():
    with pytest.raises(ValueError, match="bootstrap_resamples"):
        BootstrapConfig(bootstrap_resamples=-1)
    with pytest.raises(ValueError, match="confidence"):
        BootstrapConfig(confidence=1.0)
    assert BootstrapConfig.from_params({"bootstrap_resamples": 50, "seed": 4, "lr": 0.1}) == BootstrapConfig(50, 0.95, 4)
