"""Statistics of affinity matrices (Wolfram & Schein 2025; docs/design.md §4).

Matrices are indexed [row layer, column layer], layers 1-based in order, the embedding
layer already removed.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

LN10 = math.log(10.0)


@dataclass(frozen=True)
class DiagonalTest:
    """Result of the generalized-diagonal test.

    ``transposed`` says whether the given matrix was transposed so that rows are the
    deeper model's layers. A test whose t statistic is not finite (cells without variance)
    has no statistics, only ``undefined_reason``: no NaN reaches a stored statistic.
    """

    n_on: int
    n_off: int
    mean_on: float
    mean_off: float
    t: float | None
    p: float | None
    p_bonferroni: float | None
    log10_p: float | None
    log10_p_bonferroni: float | None
    n_pairs: int
    transposed: bool
    undefined_reason: str | None = None

    @property
    def defined(self) -> bool:
        return self.t is not None

    def describe(self) -> str:
        """The test in one phrase: the means, and t with log10 p or why there is none."""
        means = f"on {self.n_on} cells mean {self.mean_on:.4f} vs off {self.n_off} mean {self.mean_off:.4f}"
        if self.t is None:
            return f"{means}; no test: {self.undefined_reason}"
        return (
            f"{means}; t = {self.t:.2f}, log10 p = {self.log10_p:.1f}, "
            f"Bonferroni ({self.n_pairs} pairs) log10 p = {self.log10_p_bonferroni:.1f}"
        )

    def as_dict(self) -> dict[str, float | int | bool | str | None]:
        return asdict(self)


def generalized_diagonal(n_rows: int, n_cols: int) -> np.ndarray:
    """Boolean mask of the generalized diagonal for rows = the deeper model (n >= m).

    Cell (i, j), 1-based, is on the diagonal when 0 <= i - j <= n - m.
    """
    if n_rows < n_cols:
        raise ValueError("rows must be the deeper model (n_rows >= n_cols); transpose the matrix")
    i = np.arange(1, n_rows + 1)[:, None]
    j = np.arange(1, n_cols + 1)[None, :]
    d = i - j
    return (d >= 0) & (d <= n_rows - n_cols)


def diagonal_test(matrix: np.ndarray, n_pairs: int = 1) -> DiagonalTest:
    """One-sided pooled-variance two-sample t-test: on-diagonal cells > off-diagonal cells.

    ``matrix`` is rows = model A's layers, columns = model B's (either orientation: it is
    transposed so that rows are the deeper model). ``n_pairs`` is the number of model
    pairs in the study, for the Bonferroni correction.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or min(m.shape) < 1:
        raise ValueError("the affinity matrix must be 2-D and non-empty")
    if n_pairs < 1:
        raise ValueError("n_pairs must be at least 1")
    transposed = m.shape[0] < m.shape[1]
    if transposed:
        m = m.T
    mask = generalized_diagonal(*m.shape)
    on, off = m[mask], m[~mask]
    if len(off) < 2 or len(on) < 1 or len(on) + len(off) < 3:
        raise ValueError(f"a {m.shape[0]}x{m.shape[1]} matrix has too few off-diagonal cells for a t-test")
    with warnings.catch_warnings():
        # near-constant matrices (e.g. degenerate activations) trigger scipy's precision-loss
        # warning; a statistic that is not finite is caught below
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(on, off, equal_var=True, alternative="greater")
    t = float(result.statistic)
    result_of = functools.partial(
        DiagonalTest,
        n_on=int(len(on)),
        n_off=int(len(off)),
        mean_on=float(on.mean()),
        mean_off=float(off.mean()),
        n_pairs=n_pairs,
        transposed=transposed,
    )
    # Both groups constant: the pooled variance is zero (or rounding error, which gives t of
    # 1e16 instead of inf), and t has no meaning.
    if not np.isfinite(t) or (np.ptp(on) == 0 and np.ptp(off) == 0):
        reason = (
            f"every cell has the same score ({float(m.flat[0]):.4g}), so there is nothing to compare"
            if np.ptp(m) == 0
            else "the on- and off-diagonal cells have no variance, so the t statistic is not finite"
        )
        return result_of(
            t=None, p=None, p_bonferroni=None, log10_p=None, log10_p_bonferroni=None, undefined_reason=reason
        )
    log10_p = float(stats.t.logsf(t, len(on) + len(off) - 2) / LN10)
    p = float(result.pvalue)
    return result_of(
        t=t,
        p=p,
        p_bonferroni=min(1.0, p * n_pairs),
        log10_p=log10_p,
        log10_p_bonferroni=min(0.0, log10_p + math.log10(n_pairs)),
    )


def null_model(k: int, n: int) -> tuple[float, float]:
    """Mean and standard deviation of M_k under uniformly random neighbour sets.

    mean = k / (|D| - 1); sd = sqrt((k - |D| + 1)^2 / (|D| (|D| - 2) (|D| - 1)^2)).
    """
    if n < 3 or not 0 < k < n:
        raise ValueError(f"the null model needs 0 < k < |D| and |D| >= 3 (k={k}, |D|={n})")
    mean = k / (n - 1)
    sd = math.sqrt((k - n + 1) ** 2 / (n * (n - 2) * (n - 1) ** 2))
    return mean, sd


def log10_p_null(score: np.ndarray | float, k: int, n: int) -> np.ndarray:
    """log10 of the one-sided p-value of observed M_k scores under the null model.

    The p-values underflow any float (about 1e-143449 for M = 0.4, k = 10, |D| = 2048),
    so they are computed in log space from the normal tail.
    """
    mean, sd = null_model(k, n)
    z = (np.asarray(score, dtype=np.float64) - mean) / sd
    return stats.norm.logsf(z) / LN10


def max_similarity_path(matrix: np.ndarray) -> np.ndarray:
    """For each row layer, the 0-based index of the most similar column layer (ties: the shallower)."""
    return np.argmax(np.asarray(matrix), axis=1)


def relative_depths(n_layers: int) -> np.ndarray:
    """Relative depth of layers 1..L: layer / L."""
    return np.arange(1, n_layers + 1) / n_layers


def resize_square(matrix: np.ndarray, size: int = 32) -> np.ndarray:
    """Resample a matrix onto a size x size grid of relative depths (bilinear).

    Grid point g (1..size) sits at relative depth g / size on both axes, so matrices of
    models with different layer counts become comparable cell by cell.
    """
    from scipy.interpolate import RegularGridInterpolator

    m = np.asarray(matrix, dtype=np.float64)
    rows, cols = relative_depths(m.shape[0]), relative_depths(m.shape[1])
    if m.shape[0] == 1 or m.shape[1] == 1:
        # interpolation needs two points per axis: repeat the single layer
        m = np.repeat(np.repeat(m, 2 if m.shape[0] == 1 else 1, axis=0), 2 if m.shape[1] == 1 else 1, axis=1)
        rows = rows if len(rows) > 1 else np.array([0.0, 1.0])
        cols = cols if len(cols) > 1 else np.array([0.0, 1.0])
    grid = np.arange(1, size + 1) / size
    gr = np.clip(grid, rows[0], rows[-1])
    gc = np.clip(grid, cols[0], cols[-1])
    interp = RegularGridInterpolator((rows, cols), m, method="linear")
    points = np.stack(np.meshgrid(gr, gc, indexing="ij"), axis=-1)
    return interp(points)


def mean_square(matrices: list[np.ndarray], size: int = 32) -> np.ndarray:
    """The mean of several matrices after resizing each to a common square grid."""
    if not matrices:
        raise ValueError("no matrices to average")
    return np.mean([resize_square(m, size) for m in matrices], axis=0)


def mutual_knn(neighbors_f: np.ndarray, neighbors_g: np.ndarray, k: int) -> float:
    """M_k(f, g) = 1/(k |D|) sum_x |N_k(x, f) ∩ N_k(x, g)| from [|D|, >=k] neighbour arrays.

    The in-memory reference; the warehouse computes the same counts in SQL.
    """
    total = 0
    for a, b in zip(neighbors_f[:, :k], neighbors_g[:, :k]):
        total += len(np.intersect1d(a, b, assume_unique=True))
    return total / (k * len(neighbors_f))
