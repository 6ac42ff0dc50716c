"""Statistics: metrics against scikit-learn, bootstrap coverage, control tasks, selectivity, plateau."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score
from sklearn.preprocessing import label_binarize
from threadpoolctl import threadpool_limits

from probes import stats
from probes.errors import BadInputError, ConfigError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are tiny: more threads only add synchronisation (and waiting, on a shared machine)."""
    with threadpool_limits(1):
        yield


def binary_scores(n: int, separation: float, rng: np.random.Generator):
    """Labels and probabilities whose true ROC-AUC is Phi(separation / sqrt 2)."""
    y = rng.permutation(np.arange(n) % 2)
    logits = rng.standard_normal(n) + separation * y - separation / 2
    return y, 1 / (1 + np.exp(-logits))


# --- metrics --------------------------------------------------------------------------------------


def test_binary_metrics_match_sklearn_with_ties_and_leading_axes():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random((2, 3, 300)), 1)  # many ties
    for i, j in [(0, 0), (1, 2)]:
        assert stats.roc_auc(y, s)[i, j] == pytest.approx(roc_auc_score(y, s[i, j]), abs=1e-12)
        assert stats.average_precision(y, s)[i, j] == pytest.approx(
            average_precision_score(y, s[i, j]), abs=1e-12
        )
        assert stats.accuracy(y, s)[i, j] == pytest.approx(accuracy_score(y, s[i, j] > 0.5))


def test_multiclass_metrics_are_macro_one_vs_rest():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    p = rng.dirichlet(np.ones(4), (2, 300))
    assert stats.roc_auc(y, p)[1] == pytest.approx(roc_auc_score(y, p[1], multi_class="ovr"), abs=1e-12)
    expected_ap = average_precision_score(label_binarize(y, classes=range(4)), p[1], average="macro")
    assert stats.average_precision(y, p)[1] == pytest.approx(expected_ap, abs=1e-12)
    assert stats.accuracy(y, p)[0] == pytest.approx(accuracy_score(y, p[0].argmax(1)))


def test_weighted_metrics_match_sklearn_sample_weight():
    """The bootstraps weight images by their multiplicity in a draw."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200), 2)
    w = rng.integers(0, 3, (3, 200)).astype(float)
    for b in range(3):
        assert stats._roc_auc(y, s, w)[b] == pytest.approx(roc_auc_score(y, s, sample_weight=w[b]), abs=1e-12)
        ap = average_precision_score(y, s, sample_weight=w[b])
        assert stats._average_precision(y, s, w)[b] == pytest.approx(ap, abs=1e-12)
        assert stats._accuracy(y, s, w)[b] == pytest.approx(accuracy_score(y, s > 0.5, sample_weight=w[b]))


@pytest.mark.parametrize(
    ("y", "scores", "match"),
    [
        (np.zeros(10, int), np.linspace(0, 1, 10), "^y: roc_auc is undefined: class 1 has no image"),
        (np.arange(10) % 2, np.linspace(0, 1, 9), r"^scores: shape \(9,\) ends neither"),
        (np.arange(10) % 2, np.full(10, np.nan), "^scores: contain NaN"),
        (np.arange(10) % 3, np.linspace(0, 1, 10), "^y: label codes must be integers in 0 .. 1"),
    ],
)
def test_degenerate_metric_inputs_are_refused(y, scores, match):
    with pytest.raises(BadInputError, match=match) as info:
        stats.roc_auc(y, scores)
    assert "\n" not in str(info.value)


# --- bootstrap ------------------------------------------------------------------------------------


def test_bootstrap_ci_covers_the_true_auc():
    """Over independent data sets with a known AUC, the 90% CI covers it about 90% of the time."""
    separation = 1.0
    truth = norm.cdf(separation / np.sqrt(2))
    rng = np.random.default_rng(3)
    covered = []
    for rep in range(60):
        y, p = binary_scores(300, separation, rng)
        ci = stats.bootstrap_ci(y, p[None, None], metric="roc_auc", n_boot=300, ci=0.9, seed=rep).iloc[0]
        assert ci.lo <= ci.estimate <= ci.hi
        covered.append(ci.lo <= truth <= ci.hi)
    assert 0.78 <= np.mean(covered) <= 0.98


def test_bootstrap_ci_per_layer_and_seed_averaged():
    rng = np.random.default_rng(4)
    y = rng.permutation(np.arange(400) % 2)
    layers = [1 / (1 + np.exp(-(rng.standard_normal((2, 400)) + sep * (y - 0.5)))) for sep in (0.0, 1.0, 3.0)]
    scores = np.stack(layers, axis=1)  # [S=2, L=3, N]
    out = stats.bootstrap_ci(y, scores, metric="accuracy", n_boot=200, layers=[4, 8, 12])
    assert list(out["layer"]) == [4, 8, 12]
    np.testing.assert_allclose(out["estimate"], stats.accuracy(y, scores).mean(0))
    assert out["estimate"].is_monotonic_increasing
    assert out["hi"][0] < out["lo"][2]  # clearly separated layers
    assert (out["n_boot"] == 200).all()
    again = stats.bootstrap_ci(y, scores, metric="accuracy", n_boot=200, layers=[4, 8, 12])
    assert out.equals(again)


def test_cluster_bootstrap_is_wider_when_groups_are_correlated():
    """Images of a group share their label and a score offset: 40 independent units, not 400, so
    resampling images understates the uncertainty."""
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(40), 10)
    y = (np.arange(40) % 2)[groups]
    logits = 1.0 * (y - 0.5) + 1.0 * rng.standard_normal(40)[groups] + 0.3 * rng.standard_normal(400)
    scores = (1 / (1 + np.exp(-logits)))[None, None]
    rows = stats.bootstrap_ci(y, scores, metric="roc_auc", n_boot=300).iloc[0]
    clusters = stats.bootstrap_ci(y, scores, metric="roc_auc", n_boot=300, groups=groups).iloc[0]
    assert clusters.hi - clusters.lo > 1.5 * (rows.hi - rows.lo)


def test_bootstrap_rejects_bad_input():
    y, p = binary_scores(50, 1.0, np.random.default_rng(6))
    with pytest.raises(BadInputError, match=r"^scores: expected \[S, L, N\]"):
        stats.bootstrap_ci(y, p)
    with pytest.raises(ConfigError, match="^metric 'f1': unknown"):
        stats.bootstrap_ci(y, p[None, None], metric="f1")
    with pytest.raises(ConfigError, match="^ci 1.5: "):
        stats.bootstrap_ci(y, p[None, None], ci=1.5)


# --- control tasks and selectivity ----------------------------------------------------------------


def test_control_labels_per_image_keep_class_balance():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    control = stats.control_labels(y, seed=0)
    np.testing.assert_array_equal(np.bincount(control), [50, 30, 20])
    assert (control != y).mean() > 0.3
    np.testing.assert_array_equal(control, stats.control_labels(y, seed=0))
    assert not np.array_equal(control, stats.control_labels(y, seed=1))


def test_control_labels_per_group_share_a_label_and_keep_balance():
    rng = np.random.default_rng(7)
    groups = rng.integers(0, 60, 300)
    y = rng.permutation(np.repeat([0, 1, 2], [150, 90, 60]))
    control = stats.control_labels(y, groups=groups, seed=0)
    assert all(len(np.unique(control[groups == g])) == 1 for g in np.unique(groups))
    largest = np.bincount(groups).max()
    assert (np.abs(np.bincount(control, minlength=3) - [150, 90, 60]) <= largest).all()


def test_selectivity_is_task_minus_control_with_paired_ci():
    rng = np.random.default_rng(8)
    y = rng.permutation(np.arange(400) % 2)
    control_y = stats.control_labels(y, seed=1)
    task = np.stack([1 / (1 + np.exp(-(rng.standard_normal(400) + sep * (y - 0.5)))) for sep in (0.0, 4.0)])[
        None
    ]
    control = rng.random((1, 2, 400))  # a control probe at chance
    out = stats.selectivity(y, task, control_y, control, n_boot=300)
    np.testing.assert_allclose(out["estimate"], out["task_value"] - out["control_value"])
    assert out["lo"][0] < 0 < out["hi"][0]  # no signal: selectivity indistinguishable from 0
    assert out["lo"][1] > 0.3  # strong signal, chance control
    assert (out["lo"] <= out["estimate"]).all() and (out["estimate"] <= out["hi"]).all()


# --- plateau --------------------------------------------------------------------------------------


def test_earliest_within_plateau():
    mean = np.array([0.50, 0.60, 0.75, 0.80, 0.81, 0.76])
    half = np.array([0.02, 0.02, 0.03, 0.02, 0.02, 0.02])
    assert (
        stats.earliest_within_plateau(mean, mean - half, mean + half) == 3
    )  # 0.80 + 0.02 reaches the max 0.81
    assert (
        stats.earliest_within_plateau(mean, mean - half / 10, mean + half / 10) == 4
    )  # tight CIs: the argmax
    assert (
        stats.earliest_within_plateau(mean, mean - half, mean + half, plateau="final") == 2
    )  # 0.75 + 0.03 >= 0.76
    assert (
        stats.earliest_within_plateau(mean, mean - half / 10, mean + half / 10, plateau="final") == 3
    )  # overshoot


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.ones(3), np.ones(2), np.ones(3)), "^mean, lo, hi: need three 1-D arrays"),
        ((np.ones(3), np.ones(3) + 0.1, np.ones(3) + 0.2), "^layer 0: needs lo <= mean <= hi"),
        ((np.array([1.0, np.nan]), np.ones(2), np.ones(2)), "^mean, lo, hi: contain NaN"),
    ],
)
def test_earliest_within_plateau_rejects_bad_curves(args, match):
    with pytest.raises(BadInputError, match=match):
        stats.earliest_within_plateau(*args)
