"""Any measure for all layer pairs of two models, in memory: preprocessing, the matrix,
its permutation null and its bootstrap over prompts.

Each family turns a layer into a state once (k-NN sets, a centered Gram matrix, top SVD
directions, normalized activations, ranked dissimilarities); every layer pair, every
permutation of model B's prompts and every bootstrap resample then reuses those states
where it can.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from layerbase.analysis.similarity import kernels, neighbourhoods, rsa, subspaces
from layerbase.analysis.similarity.measures import Measure, MeasureOptions
from layerbase.analysis.similarity.neighbourhoods import Neighbourhoods
from layerbase.analysis.similarity.stats import LN10, null_model
from layerbase.warehouse.errors import InputError


def preprocess(x: np.ndarray, how: str) -> np.ndarray:
    """One layer's [n, d] activations as a measure sees them (``PREPROCESSING``)."""
    if how == "none":
        return x
    if how == "center":
        return x - x.mean(0, dtype=np.float64).astype(x.dtype)
    if how == "clamp95":
        q = float(np.quantile(np.abs(x), 0.95, axis=1).mean())
        return np.clip(x, -q, q)
    raise InputError(f"unknown preprocessing {how!r}")


@dataclass
class Side:
    """One model's layers: activations (preprocessed) and/or k-NN neighbourhoods."""

    activations: list[np.ndarray] | None = None
    neighbourhoods: list[Neighbourhoods] | None = None


@dataclass
class AllPairs:
    """A measure over two sides' layers: ``matrix()``, ``null()`` and ``bootstrap()``."""

    measure: Measure
    options: MeasureOptions
    k: int | None
    a: Side
    b: Side
    _states: tuple[list[Any], list[Any]] | None = field(default=None, repr=False)
    _sigmas: tuple[list[float], list[float]] | None = field(default=None, repr=False)
    _terms: Any = field(default=None, repr=False)

    @property
    def n(self) -> int:
        side = self.a.activations if self.a.activations is not None else self.a.neighbourhoods
        assert side is not None
        return len(side[0].idx) if isinstance(side[0], Neighbourhoods) else len(side[0])

    # -- states -------------------------------------------------------------------------
    def _state(self, x: np.ndarray, sample: np.ndarray | None = None) -> Any:
        family = self.measure.family
        if sample is not None:
            x = x[sample]
        if family == "cca":
            return subspaces.reduce(x, self.options.cca_dims)
        if family == "procrustes":
            return subspaces.normalized(x)
        if family == "rsa":
            if sample is None:
                return rsa.rank_vector(x)
            i, j = rsa.upper(len(sample))
            distinct = sample[i] != sample[j]  # a prompt drawn twice is not compared with itself
            return rsa.rank_vector(x, (i[distinct], j[distinct]))
        return x  # kernels: the Gram matrices are made (and streamed) in kernels.all_pairs

    def _side_states(self, side: Side) -> list[Any]:
        if self.measure.family == "neighbours":
            if side.neighbourhoods is None:
                assert side.activations is not None and self.k is not None
                side.neighbourhoods = [neighbourhoods.from_activations(x, self.k) for x in side.activations]
            return side.neighbourhoods
        assert side.activations is not None
        return [self._state(x) for x in side.activations]

    def states(self) -> tuple[list[Any], list[Any]]:
        if self._states is None:
            self._states = (self._side_states(self.a), self._side_states(self.b))
        return self._states

    def sigmas(self) -> tuple[list[float], list[float]] | None:
        """RBF bandwidths, from the full sample (kept for permutations and resamples)."""
        if self.measure.name != "rbf_cka":
            return None
        if self._sigmas is None:
            assert self.a.activations is not None and self.b.activations is not None
            bw = self.options.rbf_bandwidth
            self._sigmas = (
                [kernels.rbf_sigma(x, bw) for x in self.a.activations],
                [kernels.rbf_sigma(x, bw) for x in self.b.activations],
            )
        return self._sigmas

    # -- matrices -----------------------------------------------------------------------
    def matrices(self, perms: Sequence[np.ndarray | None]) -> list[np.ndarray]:
        """The [L_A, L_B] matrix for each permutation of B's prompts (None: as they are)."""
        family = self.measure.family
        sa_, sb = self.states()
        if family == "neighbours":
            assert self.k is not None
            ones = np.ones(self.n)
            out = []
            for p in perms:
                terms = self._observed_terms() if p is None else neighbourhoods.pair_terms(sa_, sb, p)
                out.append(neighbourhoods.scores(self.measure.name, terms, self.k, ones))
            return out
        if family == "kernel":
            return kernels.all_pairs(self.measure.name, sa_, sb, perms, self.sigmas())
        if family == "cca":
            return [subspaces.cca_pairs(self.measure.name, sa_, sb, p) for p in perms]
        if family == "procrustes":
            return [subspaces.procrustes_pairs(sa_, sb, p) for p in perms]
        return [rsa.rsa_pairs(sa_, sb, p) for p in perms]

    def _observed_terms(self) -> Any:
        if self._terms is None:
            self._terms = neighbourhoods.pair_terms(*self.states())
        return self._terms

    def matrix(self) -> np.ndarray:
        return self.matrices([None])[0]

    def null(self, scores: np.ndarray) -> NullLevel | None:
        """The null level of every cell: closed form for the k-NN counts, else the mean and
        standard deviation over ``permutations`` shuffles of B's prompts (None with 0)."""
        n = self.n
        if self.measure.null == "closed_form":
            assert self.k is not None
            return closed_form_null(self.measure.name, scores, self.k, n)
        if not self.options.permutations:
            return None
        rng = np.random.default_rng(np.random.SeedSequence([self.options.seed, 0]))
        perms = [rng.permutation(n) for _ in range(self.options.permutations)]
        shuffled = np.stack(self.matrices(perms))
        sd = shuffled.std(0, ddof=1) if len(perms) > 1 else np.zeros(scores.shape)
        return NullLevel.of(scores, shuffled.mean(0), sd, "permutation")

    def bootstrap(self, replicates: int, seed: int) -> list[np.ndarray]:
        """The matrix on ``replicates`` resamples of the prompts (with replacement). The k-NN
        measures re-weight each prompt's terms (neighbour sets stay those of the sample);
        the others recompute their states on the resampled prompts."""
        n = self.n
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
        samples = [rng.integers(0, n, n) for _ in range(replicates)]
        if self.measure.family == "neighbours":
            assert self.k is not None
            terms = self._observed_terms()
            return [
                neighbourhoods.scores(self.measure.name, terms, self.k, np.bincount(s, minlength=n).astype(np.float64))
                for s in samples
            ]
        assert self.a.activations is not None and self.b.activations is not None
        out = []
        for s in samples:
            sa_ = [self._state(x, s) for x in self.a.activations]
            sb = [self._state(x, s) for x in self.b.activations]
            resampled = AllPairs(self.measure, self.options, self.k, self.a, self.b, (sa_, sb), self.sigmas())
            out.append(resampled.matrix())
        return out


def closed_form_null(measure: str, scores: np.ndarray, k: int, n: int) -> NullLevel:
    """The null level of a k-NN count measure under uniformly random neighbour sets."""
    mean, sd = null_model(k, n) if measure == "mutual_knn" else neighbourhoods.jaccard_null(k, n)
    return NullLevel.of(scores, np.full(scores.shape, mean), np.full(scores.shape, sd), "closed_form")


@dataclass(frozen=True)
class NullLevel:
    """Per-cell null mean and standard deviation, and the one-sided log10 p of each score
    (normal tail; None where the null has no spread)."""

    mean: np.ndarray
    sd: np.ndarray
    log10_p: np.ndarray
    method: str

    @property
    def chance(self) -> float:
        """The null mean over the cells, as a run stores it."""
        return float(self.mean.mean())

    @property
    def mean_sd(self) -> float:
        """The null standard deviation over the cells, as a run stores it."""
        return float(self.sd.mean())

    @classmethod
    def of(cls, scores: np.ndarray, mean: np.ndarray, sd: np.ndarray, method: str) -> NullLevel:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (scores - mean) / sd
        log10_p = np.where(sd > 0, stats.norm.logsf(np.where(sd > 0, z, 0.0)) / LN10, np.nan)
        return cls(mean, sd, log10_p, method)


@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval of one statistic."""

    statistic: str
    estimate: float
    low: float
    high: float
    std_error: float
    layer_a: int | None = None
    layer_b: int | None = None

    @classmethod
    def of(
        cls, statistic: str, estimate: float, values: np.ndarray, level: float, cell: tuple[int, int] | None = None
    ) -> Interval:
        values = values[np.isfinite(values)]
        if not len(values):
            raise InputError(f"no bootstrap replicate gave a finite {statistic}; the interval is undefined")
        low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
        spread = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        la, lb = cell if cell else (None, None)
        return cls(statistic, float(estimate), float(low), float(high), spread, la, lb)

    def as_dict(self) -> dict[str, Any]:
        return {
            "statistic": self.statistic,
            "layer_a": self.layer_a,
            "layer_b": self.layer_b,
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "std_error": self.std_error,
        }
