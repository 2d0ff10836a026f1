"""Known answers for the affinity statistics (docs/design.md §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from layerbase.analysis.similarity.stats import (
    diagonal_test,
    generalized_diagonal,
    log10_p_null,
    max_similarity_path,
    mean_square,
    mutual_knn,
    null_model,
    resize_square,
)


def test_mutual_knn_on_hand_built_sets() -> None:
    f = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    g = np.array([[1, 2, 0], [3, 2, 0], [3, 1, 0], [2, 1, 0]])
    # k = 2: |{1,2}∩{1,2}| + |{0,2}∩{3,2}| + |{0,1}∩{3,1}| + |{0,1}∩{2,1}| = 2 + 1 + 1 + 1 = 5
    assert mutual_knn(f, g, 2) == pytest.approx(5 / (2 * 4))
    assert mutual_knn(f, f, 3) == 1.0


def test_generalized_diagonal_square_and_rectangular() -> None:
    assert (generalized_diagonal(4, 4) == np.eye(4, dtype=bool)).all()
    mask = generalized_diagonal(42, 32)
    assert mask.sum() == 352 and (~mask).sum() == 992  # Gemma-2-9B x Llama-3.1-8B
    rect = generalized_diagonal(5, 3)
    expected = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 1, 1], [0, 0, 1]], dtype=bool)
    assert (rect == expected).all()
    with pytest.raises(ValueError):
        generalized_diagonal(3, 5)


def test_diagonal_test_matches_scipy_in_both_orientations() -> None:
    rng = np.random.default_rng(0)
    m = rng.uniform(0.1, 0.3, size=(42, 32))
    mask = generalized_diagonal(42, 32)
    m[mask] += 0.15
    result = diagonal_test(m, n_pairs=3)
    ref = sps.ttest_ind(m[mask], m[~mask], equal_var=True, alternative="greater")
    assert (result.n_on, result.n_off) == (352, 992)
    assert result.t == pytest.approx(ref.statistic)
    assert result.p == pytest.approx(ref.pvalue, abs=1e-300)
    assert result.p_bonferroni == pytest.approx(min(1.0, 3 * ref.pvalue), abs=1e-300)
    assert result.log10_p == pytest.approx(sps.t.logsf(ref.statistic, 1342) / math.log(10))
    assert result.log10_p_bonferroni == pytest.approx(result.log10_p + math.log10(3))
    flipped = diagonal_test(m.T, n_pairs=3)
    assert flipped.transposed and not result.transposed
    assert (flipped.n_on, flipped.t, flipped.mean_on) == (result.n_on, result.t, result.mean_on)


def test_diagonal_test_on_structureless_matrix_is_not_significant() -> None:
    m = np.random.default_rng(1).uniform(size=(18, 30))
    assert diagonal_test(m).p > 0.01


def test_null_model_formula() -> None:
    mean, sd = null_model(10, 2048)
    assert mean == pytest.approx(10 / 2047)
    assert sd == pytest.approx(4.86e-4, rel=1e-3)
    assert log10_p_null(0.4, 10, 2048) == pytest.approx(-143449.86, abs=0.5)  # underflows any float
    assert log10_p_null(mean, 10, 2048) == pytest.approx(math.log10(0.5))


def test_null_model_matches_simulated_random_neighbour_sets() -> None:
    rng = np.random.default_rng(2)
    n, k = 200, 10

    def random_sets() -> np.ndarray:
        return np.array([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])

    samples = [mutual_knn(random_sets(), random_sets(), k) for _ in range(60)]
    mean, sd = null_model(k, n)
    assert np.mean(samples) == pytest.approx(mean, rel=0.05)
    assert np.std(samples) == pytest.approx(sd, rel=0.35)


def test_path_and_square_resizing() -> None:
    m = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.1], [0.0, 0.3, 0.7], [0.1, 0.2, 0.6]])
    assert max_similarity_path(m).tolist() == [0, 1, 2, 2]
    sq = resize_square(m, 8)
    assert sq.shape == (8, 8)
    assert sq[-1, -1] == pytest.approx(0.6)  # relative depth 1 on both axes is the last layer of each
    const = np.full((30, 18), 0.25)
    assert np.allclose(resize_square(const, 16), 0.25)
    assert mean_square([const, np.full((5, 7), 0.75)], 4) == pytest.approx(np.full((4, 4), 0.5))
