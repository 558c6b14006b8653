"""Metrics against hand-computed answers; tables, plots and robustness on real images."""
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from dfd_lib.evaluation.robustness import plot_robustness, robustness_table
from dfd_lib.scoring.calibration import threshold_at_fpr
from dfd_lib.stats.group_metrics import per_group_metrics
from dfd_lib.stats.metrics import binary_metrics, equal_error_rate, roc_curve_points, tpr_at_fpr
from dfd_lib.stats.roc_plot import plot_roc_curves

Y = [0, 0, 1, 1]
S = [0.1, 0.4, 0.35, 0.8]


def test_binary_metrics_known_example():
    m = binary_metrics(Y, S)
    # 3 of the 4 real/fake pairs are ordered correctly
    assert m["auc"] == pytest.approx(0.75)
    # ranking f(0.8) r(0.4) f(0.35) r(0.1): precision 1 at recall 1/2, 2/3 at recall 1
    assert m["ap"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # at threshold 0.4 one real of two passes and one fake of two is missed
    assert m["eer"] == pytest.approx(0.5)
    assert m["eer_threshold"] == pytest.approx(0.4)
    assert m["acc_at_0.5"] == pytest.approx(0.75)  # only 0.8 is called fake
    assert m["acc_at_eer"] == pytest.approx(0.5)
    assert (m["n"], m["n_real"], m["n_fake"], m["reason"]) == (4, 2, 2, "")


def _brute_force(y, s, max_fprs=(0.01, 0.001)):
    """The definitions, one threshold at a time, no library: AUC over all real/fake pairs (ties
    half), AP as the mean over fakes of the precision at their own score, the EER where FPR and FNR
    cross (linear between thresholds), the best TPR whose FPR stays within each max_fpr."""
    y, s = np.asarray(y), np.asarray(s)
    fakes, reals = s[y == 1], s[y == 0]
    auc = np.mean([(f > r) + 0.5 * (f == r) for f in fakes for r in reals])
    ap = np.mean([np.mean(y[s >= f]) for f in fakes])
    points = [(0.0, 0.0, np.inf)] + [(np.mean(reals >= t), np.mean(fakes >= t), t) for t in sorted(set(s), reverse=True)]
    eer = None
    for (f0, t0, _), (f1, t1, _) in zip(points, points[1:]):
        g0, g1 = f0 - (1 - t0), f1 - (1 - t1)
        if g0 < 0 <= g1:
            eer = f1 if g1 == 0 else f1 - g1 / (g1 - g0) * (f1 - f0)
            break
    tprs = {m: max(tpr for fpr, tpr, _ in points if fpr <= m + 1e-12) for m in max_fprs}
    return auc, ap, eer, tprs


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_scikit_learn_and_brute_force_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = np.round(rng.random(n) + 0.4 * y, 2 if seed % 2 else 6)  # odd seeds: many ties
    m = binary_metrics(y, s)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    auc, ap, eer, tprs = _brute_force(y, s)
    assert m["auc"] == pytest.approx(auc, abs=1e-12)
    assert m["ap"] == pytest.approx(ap, abs=1e-12)
    assert m["eer"] == pytest.approx(eer, abs=1e-12)
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    for max_fpr, key in ((0.01, "1%"), (0.001, "0.1%")):
        assert m[f"tpr_at_fpr_{key}"] == pytest.approx(tprs[max_fpr], abs=1e-12)
        assert m[f"tpr_at_fpr_{key}"] == pytest.approx(tpr[fpr <= max_fpr].max(), abs=1e-12)  # scikit-learn's curve
        # the threshold does what it says: an FPR within max_fpr at that TPR
        threshold = m[f"threshold_at_fpr_{key}"]
        assert np.mean(s[y == 0] >= threshold) <= max_fpr and np.mean(s[y == 1] >= threshold) == pytest.approx(tprs[max_fpr])
        assert threshold == pytest.approx(threshold_at_fpr(y, s, max_fpr))  # the one dfd calibrate would store


def test_tpr_at_low_fpr_known_examples():
    # 200 reals at 0.00 .. 0.199, 100 fakes at 0.15 .. 0.249: 1 % FPR allows 2 reals (0.198, 0.199)
    reals, fakes = np.arange(200) / 1000, 0.15 + np.arange(100) / 1000
    y, s = np.r_[np.zeros(200), np.ones(100)], np.r_[reals, fakes]
    # flagging down to 0.198 (52 fakes of 100, 2 reals): the threshold halfway to the next score, 0.197
    assert tpr_at_fpr(y, s, 0.01) == (pytest.approx(0.52), pytest.approx(0.1975))
    assert tpr_at_fpr(y, s, 0.001) == (pytest.approx(0.50), pytest.approx(0.1995))  # no false positive: above 0.199
    # the top score is a real: nothing can be flagged without a false positive
    assert tpr_at_fpr([0, 1, 1], [0.9, 0.5, 0.2], 0.001) == (0.0, pytest.approx(0.95))
    with pytest.raises(ValueError, match="both"):
        tpr_at_fpr([1, 1], [0.3, 0.4], 0.01)
    with pytest.raises(ValueError, match="max_fpr"):
        tpr_at_fpr([0, 1], [0.3, 0.4], 1.5)


def test_perfect_and_inverted_scores():
    perfect = binary_metrics([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert (perfect["auc"], perfect["ap"], perfect["eer"], perfect["acc_at_eer"]) == (1.0, 1.0, 0.0, 1.0)
    inverted = binary_metrics([0, 0, 1, 1], [0.9, 0.7, 0.2, 0.1])
    assert inverted["auc"] == 0.0 and inverted["eer"] == pytest.approx(1.0)


def test_eer_interpolates_between_roc_points():
    # 3 reals, 2 fakes, a real and a fake tied at 0.5: ROC points (fpr, fnr) go
    # (1/3, 1/2) -> (2/3, 0) in one step; fpr = fnr where 1/3 + w/3 = 1/2 - w/2 -> w = 1/5 -> 0.4
    eer, threshold = equal_error_rate([0, 0, 0, 1, 1], [0.1, 0.5, 0.8, 0.5, 0.9])
    assert eer == pytest.approx(0.4)
    assert threshold == pytest.approx(0.5)


def test_one_class_gives_nan_with_reason():
    m = binary_metrics([1, 1, 1], [0.2, 0.6, 0.9])
    assert math.isnan(m["auc"]) and math.isnan(m["ap"]) and math.isnan(m["eer"])
    assert "only one class" in m["reason"] and "all fake" in m["reason"]
    assert m["acc_at_0.5"] == pytest.approx(2 / 3)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="labels but"):
        binary_metrics([0, 1], [0.5])
    with pytest.raises(ValueError, match="0 \\(real\\) or 1"):
        binary_metrics([0, 2], [0.5, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        binary_metrics([0, 1], [0.5, float("nan")])


def test_roc_points_shape():
    points = roc_curve_points(Y, S)
    assert list(points.columns) == ["fpr", "tpr", "threshold"]
    assert points["fpr"].iloc[-1] == 1.0 and points["tpr"].iloc[-1] == 1.0


def test_per_group_metrics_pairs_fake_families_with_all_reals():
    table = pd.DataFrame({
        "label": [0, 0, 1, 1, 1, 1],
        "family": ["real", "real", "sd", "sd", "edit", "edit"],
        "cluster": [0, 1, 0, 1, 0, 1],
    })
    scores = [0.1, 0.6, 0.9, 0.8, 0.3, 0.5]
    by_family = per_group_metrics(table, scores, by="family").set_index("family")
    assert by_family.loc["sd", "auc"] == pytest.approx(1.0)  # both above both reals
    assert by_family.loc["edit", "auc"] == pytest.approx(0.5)  # (0.3, 0.5) vs (0.1, 0.6): 2 of 4 pairs
    assert by_family.loc["sd", "n"] == 4 and "all reals" in by_family.loc["sd", "reason"]
    assert by_family.loc["sd", "mean_score"] == pytest.approx(0.85)
    assert math.isnan(by_family.loc["real", "auc"])
    assert by_family.loc["(all)", "auc"] == pytest.approx(binary_metrics(table["label"], scores)["auc"])
    by_cluster = per_group_metrics(table, scores, by="cluster").set_index("cluster")
    assert by_cluster.loc[0, "auc"] == pytest.approx(1.0)  # 0.1 vs 0.9, 0.3
    assert by_cluster.loc[1, "auc"] == pytest.approx(0.5)  # 0.6 vs 0.8, 0.5
    with pytest.raises(ValueError, match="no column"):
        per_group_metrics(table, scores, by="source")


def test_plot_roc_curves_writes_figure(tmp_path):
    path = tmp_path / "figs" / "roc.png"
    fig = plot_roc_curves({"a": (Y, S), "b": ([0, 1], [0.2, 0.9]), "one class": ([1, 1], [0.3, 0.4])}, path)
    assert path.stat().st_size > 1000
    labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert labels == ["a (AUC 0.750)", "b (AUC 1.000)", "chance"]


def test_plot_roc_curves_emphasis_draws_named_curves_bold():
    fig = plot_roc_curves({"a": (Y, S), "b": ([0, 1], [0.2, 0.9]), "c": ([0, 1], [0.9, 0.2])}, emphasis=["b"])
    widths = {line.get_label().split(" (")[0]: line.get_linewidth() for line in fig.axes[0].lines}
    assert widths["b"] > widths["a"] and widths["a"] == widths["c"]


def _blur_sensitive_images(n=12, size=64):
    """Fakes carry a high-frequency checkerboard that blur and downscaling remove."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    checker = (np.indices((size, size)).sum(axis=0) % 2 * 60).astype(np.int16)[..., None]
    for i in range(n):
        base = rng.integers(60, 190, size=(1, 1, 3)) + np.zeros((size, size, 3))
        fake = i % 2
        arr = np.clip(base + (checker if fake else 0), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(arr))
        labels.append(fake)
    return images, labels


def _high_frequency_energy(images):
    out = []
    for image in images:
        grey = np.asarray(image.convert("L").resize((64, 64), Image.BILINEAR), dtype=np.float64)
        out.append(np.abs(np.diff(grey, axis=1)).mean())
    return np.array(out)


def test_robustness_table_and_plot(tmp_path):
    images, labels = _blur_sensitive_images()
    calls = []

    def predict(batch):
        calls.append(len(batch))
        # a thresholded detector: a faint leftover of the pattern does not count
        return np.where(_high_frequency_energy(batch) > 10.0, 0.9, 0.1)

    table = robustness_table(predict, images, labels, {"jpeg": [90], "resize": [0.25], "blur": [2]}, batch_size=5)
    assert list(table["perturbation"]) == ["none", "jpeg", "resize", "blur"]
    assert sum(calls) == 4 * len(images) and max(calls) <= 5
    auc = table.set_index("perturbation")["auc"]
    assert auc["none"] == 1.0 and auc["jpeg"] == 1.0
    assert auc["blur"] < 0.9  # the checkerboard is gone: the detector cannot tell the classes apart
    path = tmp_path / "robustness.png"
    plot_robustness(table, path)
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown perturbations"):
        robustness_table(predict, images, labels, {"rotate": [10]})
