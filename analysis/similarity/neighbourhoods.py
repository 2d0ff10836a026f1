"""The k-NN measures for all layer pairs: mutual k-NN, Jaccard k-NN and CKNNA.

Every term of these measures is a sum over prompts (rows), so each layer pair gives a few
per-prompt vectors; a bootstrap over prompts then only re-weights rows. A layer's state is
its k nearest neighbours (self excluded) with their cosine similarities, from the stored
sets or computed in memory.

CKNNA (Huh et al. 2024): cosine kernels K (rows L2-normalized) restricted to the mutual
neighbourhoods, K~_ij = K_ij [j in N_A(i)] [j in N_B(i)], compared with the unbiased HSIC
estimator (Song et al. 2012)

    HSIC_u(K~, L~) = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))

and normalized by the two self-similarities HSIC_u(K_A masked by N_A, itself) and that of B.
The masked matrices have at most k entries a row, so each term is computed from the n x k
neighbour arrays (hand-written: no library computes HSIC on sparse masked kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Neighbourhoods:
    """One layer's k nearest neighbours of every prompt: ``idx`` [n, k] positions, nearest
    first, self excluded; ``sim`` [n, k] their cosine similarities (float64)."""

    idx: np.ndarray
    sim: np.ndarray

    @property
    def n(self) -> int:
        return len(self.idx)

    @property
    def k(self) -> int:
        return int(self.idx.shape[1])

    def permuted(self, perm: np.ndarray) -> Neighbourhoods:
        """The neighbourhoods when prompt ``perm[i]`` takes position i."""
        inverse = np.argsort(perm)
        return Neighbourhoods(inverse[self.idx[perm]], self.sim[perm])

    def keys(self) -> np.ndarray:
        """Each (prompt, neighbour) edge as prompt * n + neighbour, [n, k]."""
        return np.arange(self.n, dtype=np.int64)[:, None] * self.n + self.idx.astype(np.int64)


def from_activations(x: np.ndarray, k: int) -> Neighbourhoods:
    """Exact cosine neighbourhoods of the rows of ``x`` (the warehouse's exact engine), with
    float64 similarities."""
    from layerbase.analysis.knn.topk import exact_topk

    idx, _ = exact_topk(np.ascontiguousarray(x, dtype=np.float32), k)
    unit = np.asarray(x, dtype=np.float64)
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
    sim = np.einsum("id,ikd->ik", unit, unit[idx])
    return Neighbourhoods(idx, sim)


def from_stored(idx: np.ndarray, distances: np.ndarray, k: int) -> Neighbourhoods:
    """The first k of stored neighbour lists and their cosine distances."""
    return Neighbourhoods(idx[:, :k].astype(np.int64), 1.0 - distances[:, :k].astype(np.float64))


@dataclass(frozen=True)
class _Edges:
    """A layer's edges sorted by key, with their similarities, for lookups."""

    keys: np.ndarray
    sim: np.ndarray

    @classmethod
    def of(cls, h: Neighbourhoods) -> _Edges:
        keys = h.keys().ravel()
        order = np.argsort(keys, kind="stable")
        return cls(keys[order], h.sim.ravel()[order])

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, similarity or 0) for each key."""
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = self.keys[at] == keys
        return found, np.where(found, self.sim[at], 0.0)


def row_terms(a: Neighbourhoods, b: Neighbourhoods, edges_b: _Edges | None = None) -> np.ndarray:
    """Per-prompt terms of a layer pair, [5, n]: shared neighbours |N_A(i) ∩ N_B(i)|, and for
    CKNNA's HSIC the rows' parts of tr(K~L~), 1'K~1, 1'L~1 and 1'K~L~1."""
    n, k = a.n, a.k
    edges_b = edges_b or _Edges.of(b)
    keys_a = a.keys()
    matched, sim_b = edges_b.lookup(keys_a.ravel())
    matched, sim_b = matched.reshape(n, k), sim_b.reshape(n, k)
    shared = matched.sum(1)
    ka = np.where(matched, a.sim, 0.0)  # K~_ij at j = a.idx[i, p]
    lb = sim_b  # L~_ij at the same j (0 where unmatched)
    # tr(K~ L~) = sum_ij K~_ij L~_ji: edge (j, i) is in the mask when it is matched too;
    # L~_ji = L_ij (a cosine kernel is symmetric).
    mask_keys = np.sort(keys_a[matched])
    reverse = a.idx.astype(np.int64) * n + np.arange(n, dtype=np.int64)[:, None]
    if len(mask_keys):
        at = np.minimum(np.searchsorted(mask_keys, reverse), len(mask_keys) - 1)
        both = matched & (mask_keys[at] == reverse)
    else:
        both = np.zeros_like(matched)
    trace = np.where(both, ka * lb, 0.0).sum(1)
    sum_k, sum_l = ka.sum(1), lb.sum(1)
    cross = (ka * sum_l[a.idx]).sum(1)  # sum_j K~_ij (L~ 1)_j
    return np.stack([shared.astype(np.float64), trace, sum_k, sum_l, cross])


def hsic_unbiased(terms: np.ndarray, n: int) -> np.ndarray:
    """The unbiased HSIC from summed terms [..., 4] = (trace, 1'K1, 1'L1, 1'KL1)."""
    trace, sum_k, sum_l, cross = np.moveaxis(terms, -1, 0)
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)) / (n * (n - 3))


def pair_terms(
    side_a: list[Neighbourhoods], side_b: list[Neighbourhoods], perm: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(terms [L_A, L_B, 5, n], self terms of A [L_A, 5, n], of B [L_B, 5, n]) with B's prompts
    permuted by ``perm``."""
    if perm is not None:
        side_b = [h.permuted(perm) for h in side_b]
    edges_b = [_Edges.of(h) for h in side_b]
    pairs = np.stack([np.stack([row_terms(a, b, e) for b, e in zip(side_b, edges_b)]) for a in side_a])
    self_a = np.stack([row_terms(a, a) for a in side_a])
    self_b = np.stack([row_terms(b, b, e) for b, e in zip(side_b, edges_b)])
    return pairs, self_a, self_b


def scores(measure: str, terms: tuple[np.ndarray, np.ndarray, np.ndarray], k: int, weights: np.ndarray) -> np.ndarray:
    """The [L_A, L_B] matrix of a k-NN measure from ``pair_terms``, prompts weighted by
    ``weights`` (all ones for the sample itself; counts of a bootstrap resample)."""
    pairs, self_a, self_b = terms
    n = pairs.shape[-1]
    total = weights.sum()
    if measure == "mutual_knn":
        return pairs[:, :, 0] @ weights / (k * total)
    if measure == "jaccard_knn":
        shared = pairs[:, :, 0]
        return (shared / (2 * k - shared)) @ weights / total
    if measure != "cknna":
        raise ValueError(f"{measure} is not a k-NN measure")
    # The weights scale each row's sums; n stays the sample's size in the estimator.
    summed = pairs[:, :, 1:] @ weights
    kl = hsic_unbiased(summed, n)
    kk = hsic_unbiased(self_a[:, 1:] @ weights, n)
    ll = hsic_unbiased(self_b[:, 1:] @ weights, n)
    denominator = np.sqrt(np.clip(np.outer(kk, ll), 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, kl / np.where(denominator > 0, denominator, 1.0), 0.0)


def jaccard_null(k: int, n: int) -> tuple[float, float]:
    """Mean and standard deviation of the Jaccard k-NN score when each prompt's two neighbour
    sets are drawn uniformly at random (|N_A ∩ N_B| hypergeometric, the same model as
    mutual k-NN's closed form): mean E[X/(2k-X)], sd sqrt(Var[X/(2k-X)] / |D|)."""
    shared = np.arange(k + 1)
    p = stats.hypergeom.pmf(shared, n - 1, k, k)
    jaccard = shared / (2 * k - shared)
    mean = float(p @ jaccard)
    return mean, float(np.sqrt(max(p @ jaccard**2 - mean**2, 0.0) / n))
