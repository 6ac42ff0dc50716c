"""Probe engine: LayerProbe against scikit-learn, the nested grouped sweep, and its input checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks
from threadpoolctl import threadpool_limits

from probes.errors import BadInputError, ConfigError
from probes.linear import LayerProbe, grouped_folds, sweep

CS = (1e-3, 1e-2, 1e-1, 1.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are tiny: more threads only add synchronisation (and waiting, on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


def layered_data(n: int = 240, dim: int = 12, n_classes: int = 2, group_size: int = 4, seed: int = 0):
    """``[N, 3, D]`` activations: layer 0 is noise, layer 1 a weak signal, layer 2 a strong one.

    Features get unequal scales and offsets, so standardisation matters.
    """
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    rng.shuffle(y)
    groups = np.arange(n) // group_size
    directions = rng.standard_normal((n_classes, dim))
    X = rng.standard_normal((n, 3, dim))
    X[:, 1] += 0.25 * directions[y]
    X[:, 2] += 1.5 * directions[y]
    X = X * rng.uniform(0.5, 20, dim) + rng.uniform(-5, 5, dim)
    return X.astype(np.float32), y, groups


def strict_sklearn(C: float = 1.0, tol: float = 1e-10):
    """Per-fit standardisation and an lbfgs logistic regression (the plain scikit-learn probe)."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, tol=tol, max_iter=10_000))


SKLEARN = dict(estimator=strict_sklearn(tol=1e-6), param="logisticregression__C")


# --- LayerProbe -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes", [2, 3])
# N > D; N < D; and D > 512, where the preconditioner uses the top eigenpairs only
@pytest.mark.parametrize(("n", "dim"), [(200, 10), (60, 100), (150, 600)])
@pytest.mark.parametrize("C", [0.01, 1.0])
def test_layer_probe_matches_sklearn(n_classes, n, dim, C):
    X, y, _ = layered_data(n=n, dim=dim, n_classes=n_classes)
    X = X[:, 1].astype(np.float64)
    ours = LayerProbe(C=C, tol=1e-7, dtype="float64").fit(X, y)
    ref = strict_sklearn(C).fit(X, y)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-5)
    np.testing.assert_array_equal(ours.predict(X), ref.predict(X))
    assert ours.coef_.shape == (1 if n_classes == 2 else n_classes, dim)


def test_layer_probe_float32_close_to_sklearn():
    X, y, _ = layered_data(n=300, dim=20)
    ours = LayerProbe(C=0.1).fit(X[:, 2], y)
    ref = strict_sklearn(0.1).fit(X[:, 2], y)
    assert np.abs(ours.predict_proba(X[:, 2]) - ref.predict_proba(X[:, 2])).max() < 2e-3
    assert abs(ours.score(X[:, 2], y) - ref.score(X[:, 2], y)) <= 1 / 300


@parametrize_with_checks([LayerProbe()])
def test_layer_probe_is_a_sklearn_estimator(estimator, check):
    check(estimator)


# --- folds ----------------------------------------------------------------------------------------


def test_grouped_folds_keep_groups_whole_and_are_seeded():
    _, y, groups = layered_data(n=400)
    folds = grouped_folds(y, groups, 5, seed=0)
    assert all(len(np.unique(folds[groups == g])) == 1 for g in np.unique(groups))
    assert np.bincount(folds).min() >= 60  # roughly balanced: 100 groups of 4 over 5 folds
    assert np.array_equal(folds, grouped_folds(y, groups, 5, seed=0))
    assert not np.array_equal(folds, grouped_folds(y, groups, 5, seed=1))


def test_sweep_keeps_groups_whole_in_every_split():
    X, y, groups = layered_data()
    result = sweep(X, y, groups, seeds=(0, 1), Cs=CS)
    for folds in result.folds:
        assert all(len(np.unique(folds[groups == g])) == 1 for g in np.unique(groups))
    assert (result.table["n_train"] + result.table["n_test"] == len(y)).all()
    assert len(result.table) == 3 * 2 * 5


# --- sweep ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def binary_result():
    X, y, groups = layered_data()
    return sweep(X, y, groups, Cs=CS)


def test_sweep_table_and_scores(binary_result):
    table = binary_result.table
    assert list(table.columns) == [
        "layer",
        "seed",
        "fold",
        "C",
        "inner_score",
        "accuracy",
        "roc_auc",
        "average_precision",
        "n_train",
        "n_test",
        "converged",
    ]
    assert binary_result.scores.shape == (3, 3, 240)
    assert ((binary_result.scores >= 0) & (binary_result.scores <= 1)).all()
    assert table["converged"].all()
    assert set(binary_result.path["C"]) == set(CS)


def test_accuracy_follows_signal_strength(binary_result):
    acc = binary_result.table.groupby("layer")["accuracy"].mean()
    assert acc[0] < 0.62  # noise
    assert acc[2] > 0.95  # strong signal
    assert acc[0] < acc[1] < acc[2]


def test_chooses_larger_C_for_stronger_signal(binary_result):
    c = binary_result.table.groupby("layer")["C"].median()
    assert c[0] == min(CS)  # pure noise: regularise as much as the grid allows
    assert c[2] > c[0]


@pytest.mark.parametrize("scoring", ["log_loss", "accuracy"])
@pytest.mark.parametrize("engine", ["torch", "sklearn"])
def test_chosen_C_is_the_best_on_the_inner_folds(scoring, engine):
    """The chosen C has the best mean inner score along the path (log-loss: lowest; accuracy:
    highest), the smallest C among ties."""
    X, y, groups = layered_data()
    kwargs = (
        dict(estimator=strict_sklearn(tol=1e-4), param="logisticregression__C") if engine == "sklearn" else {}
    )
    result = sweep(X, y, groups, seeds=(0,), Cs=CS, layers=[1], scoring=scoring, **kwargs)
    sign = 1 if scoring == "log_loss" else -1
    table = result.table.set_index(["layer", "fold"])
    for key, cell in result.path.groupby(["layer", "fold"]):
        target = (cell["inner_score"] * sign).min()
        assert table.loc[key, "C"] == cell.loc[cell["inner_score"] * sign == target, "C"].min()
        assert table.loc[key, "inner_score"] == pytest.approx(target * sign)
    if scoring == "accuracy":
        assert result.path["inner_score"].between(0, 1).all()


@pytest.mark.parametrize("C", [0.01, 1.0])
def test_sweep_matches_a_sklearn_loop_at_fixed_C(C):
    """Same folds and C: only the standardisation differs (all rows here, per fit in the pipeline)."""
    X, y, groups = layered_data(n=400)
    ours = sweep(X, y, groups, seeds=(0,), Cs=(C,))
    ref = sweep(X, y, groups, seeds=(0,), Cs=(C,), **SKLEARN)
    assert np.abs(ours.scores - ref.scores).mean() < 0.01
    acc = ours.table.groupby("layer")["accuracy"].mean() - ref.table.groupby("layer")["accuracy"].mean()
    assert acc.abs().max() <= 0.01


def test_sweep_with_fewer_images_than_features_matches_sklearn_loop():
    """N < D: the training sets are separable, so the L2 penalty alone sets the solution."""
    X, y, groups = layered_data(n=80, dim=120)
    ours = sweep(X, y, groups, seeds=(0,), n_folds=4, Cs=(0.01,))
    ref = sweep(X, y, groups, seeds=(0,), n_folds=4, Cs=(0.01,), **SKLEARN)
    assert np.abs(ours.scores - ref.scores).mean() < 0.02
    assert (ours.table["accuracy"] - ref.table["accuracy"]).abs().mean() <= 0.03


def test_multiclass_sweep():
    X, y, groups = layered_data(n=300, n_classes=3)
    result = sweep(X, y, groups, seeds=(0,), Cs=CS)
    assert result.scores.shape == (1, 3, 300, 3)
    np.testing.assert_allclose(result.scores.sum(-1), 1, atol=1e-5)
    acc = result.table.groupby("layer")["accuracy"].mean()
    assert acc[0] < 0.45 and acc[2] > 0.9
    assert (result.table.groupby("layer")["roc_auc"].mean().diff().dropna() > 0).all()
    batched = sweep(X, y, groups, seeds=(0,), Cs=CS, layer_batch=3)
    pd.testing.assert_frame_equal(result.table, batched.table, atol=1e-5)


@pytest.mark.parametrize("engine", ["torch", "sklearn"])
def test_nested_cv_never_sees_outer_test_labels(engine):
    """Scramble the labels of one outer test fold: that fold's C choice, inner-CV path and test
    scores must not move (the folds are passed in so that the split itself stays the same)."""
    X, y, groups = layered_data()
    kwargs = dict(seeds=(0,), Cs=CS, layers=[1, 2])
    if engine == "sklearn":
        kwargs.update(
            Cs=(0.01, 1.0), layers=[2], estimator=strict_sklearn(tol=1e-4), param="logisticregression__C"
        )
    first = sweep(X, y, groups, **kwargs)
    test = first.folds[0] == 0
    scrambled = y.copy()
    scrambled[test] = np.random.default_rng(0).permutation(1 - y[test])
    second = sweep(X, scrambled, groups, folds=first.folds, **kwargs)

    def fold0(result, frame):
        return (
            getattr(result, frame)
            .query("fold == 0")
            .drop(columns=["accuracy", "roc_auc", "average_precision"], errors="ignore")
        )

    pd.testing.assert_frame_equal(fold0(first, "table"), fold0(second, "table"), atol=1e-6)
    pd.testing.assert_frame_equal(fold0(first, "path"), fold0(second, "path"), atol=1e-6)
    np.testing.assert_allclose(first.scores[:, :, test], second.scores[:, :, test], atol=1e-5)
    assert not np.allclose(
        first.scores[:, :, ~test], second.scores[:, :, ~test], atol=1e-3
    )  # others did move


def test_sweep_is_deterministic():
    X, y, groups = layered_data()
    a, b = sweep(X, y, groups, seeds=(0, 1), Cs=CS), sweep(X, y, groups, seeds=(0, 1), Cs=CS)
    pd.testing.assert_frame_equal(a.table, b.table)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_input_kinds_and_layer_batches_agree(tmp_path):
    """A torch tensor, a memmap, and two layers in one batched solve (as on a GPU) give the numpy answer."""
    X, y, groups = layered_data()
    ref = sweep(X, y, groups, seeds=(0,), Cs=CS, layers=[2, 0])
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=X.shape)
    mm[:] = X
    for other in (
        sweep(torch.from_numpy(X), y, groups, seeds=(0,), Cs=CS, layers=[2, 0]),
        sweep(np.load(tmp_path / "x.npy", mmap_mode="r"), y, groups, seeds=(0,), Cs=CS, layers=[2, 0]),
        sweep(X, y, groups, seeds=(0,), Cs=CS, layers=[2, 0], layer_batch=2),
    ):
        assert list(other.table["layer"].unique()) == [2, 0]
        pd.testing.assert_frame_equal(ref.table, other.table, atol=1e-5)
        np.testing.assert_allclose(ref.scores, other.scores, atol=1e-5)


# --- bad input: one-line errors that name the item ------------------------------------------------


def raises_one_line(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_single_class_is_refused():
    X, y, groups = layered_data()
    raises_one_line(BadInputError, r"^y: only one class \(0\)", sweep, X, np.zeros_like(y), groups)
    raises_one_line(BadInputError, "^y: only one class", LayerProbe().fit, X[:, 0], np.zeros_like(y))


def test_class_confined_to_one_group_is_refused():
    X, y, groups = layered_data(n=120)
    groups = np.array([f"photo-{g}" for g in groups])
    y = np.where(groups == "photo-7", 7, y)  # class 7 lives in a single group
    raises_one_line(
        BadInputError,
        r"^seed 0 outer fold \d+: (test|train) side has no image of class 7; "
        r"it occurs only in group\(s\) 'photo-7'",
        sweep,
        X,
        y,
        groups,
        Cs=CS,
    )


def test_class_confined_to_one_group_inside_an_outer_training_set_is_refused():
    X, y, groups = layered_data(n=120)
    y = np.where(np.isin(groups, [3, 4]), 2, y)  # two groups: fine for some outer folds, not for inner ones
    raises_one_line(
        BadInputError,
        r"^seed 0 outer fold \d+, inner fold \d+: (test|train) side has no image of "
        "class 2",
        sweep,
        X,
        y,
        groups,
        n_folds=2,
        Cs=CS,
    )


def test_fewer_groups_than_folds_is_refused():
    X, y, _ = layered_data(n=60)
    raises_one_line(BadInputError, "^groups: 3 groups for 5 folds", sweep, X, y, np.arange(60) % 3)


def test_non_finite_activation_names_layer_and_row():
    X, y, groups = layered_data()
    X[17, 1, 4] = np.nan
    X[30, 1, 0] = np.inf
    X[50, 2, 0] = np.inf
    raises_one_line(BadInputError, r"^X layer 1, row 17: non-finite", sweep, X, y, groups)
    raises_one_line(BadInputError, r"^X layer 2, row 50: non-finite", sweep, X, y, groups, layers=[0, 2])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda X, y, g: (X[:, 0], y, g), r"^X: expected activations of shape \[N, L, D\]"),
        (lambda X, y, g: (X, y[:-1], g), r"^y: expected 240 labels"),
        (lambda X, y, g: (X, y, g[:-1]), r"^groups: expected 240 group ids"),
        (lambda X, y, g: (X, y.astype(float), g), r"^y: labels must be integers"),
    ],
)
def test_shape_and_type_mismatches_are_refused(change, match):
    raises_one_line(BadInputError, match, sweep, *change(*layered_data()))


def test_folds_that_split_a_group_are_refused():
    X, y, groups = layered_data()
    folds = np.stack([grouped_folds(y, groups, 5, seed=0)])
    folds[0, 0] = (folds[0, 1] + 1) % 5  # rows 0 and 1 share group 0
    raises_one_line(
        BadInputError,
        r"^group 0: split across folds for seed 0",
        sweep,
        X,
        y,
        groups,
        seeds=(0,),
        folds=folds,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(Cs=(0.1, -1.0)), "^Cs: "),
        (dict(n_folds=1), "^n_folds: 1"),
        (dict(scoring="f1"), "^scoring 'f1': unknown"),
        (dict(layers=[3]), "^layer 3: out of range"),
        (dict(seeds=(0, 0)), "^seeds: "),
        (dict(dtype="float16"), "^dtype float16: "),
        (dict(estimator=LogisticRegression(), param="alpha"), "^param 'alpha': not a parameter"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    raises_one_line(ConfigError, match, sweep, *layered_data(), **kwargs)


def test_constant_and_nearly_constant_layers_are_probed_at_chance_without_failing():
    """At the last token, layer 0 is one text embedding for every image: constant up to rounding. The
    standardisation must not blow rounding noise up into features, and the fit must not fail."""
    rng = np.random.default_rng(0)
    n, d = 96, 64
    y = np.arange(n) % 2
    groups = np.arange(n) // 2
    signal = rng.standard_normal((n, d)).astype(np.float32) + 2.0 * y[:, None]
    constant = np.full((n, d), 0.37, dtype=np.float32)
    rounding = constant + rng.standard_normal((n, d)).astype(np.float32) * 1e-9
    X = np.stack([constant, rounding, signal], axis=1)  # [n, 3 layers, d]
    result = sweep(X, y, groups, n_folds=3, seeds=(0,), Cs=(0.01, 1.0), inner_folds=2)
    acc = result.table.groupby("layer").accuracy.mean()
    assert np.isfinite(result.table.accuracy).all()
    assert acc[0] <= 0.6 and acc[1] <= 0.6 and acc[2] >= 0.9
