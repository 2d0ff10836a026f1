"""RSA for all layer pairs: the Spearman correlation between two layers' representational
dissimilarity matrices (Kriegeskorte et al. 2008), the dissimilarity of two prompts being the
correlation distance 1 - pearson(x_i, x_j) over the layer's coordinates.

Each layer's n(n-1)/2 dissimilarities above the diagonal are ranked once (ties averaged, as
scipy's spearmanr does) and standardized, so that every pair's Spearman correlation is one
row of a [L_A, m] x [m, L_B] product.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from layerbase.warehouse.errors import InputError


def dissimilarities(x: np.ndarray, pairs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Correlation distances of the prompt pairs (i, j) given."""
    z = np.asarray(x, dtype=np.float64)
    z = z - z.mean(1, keepdims=True)
    norms = np.linalg.norm(z, axis=1)
    if (norms == 0).any():
        raise InputError(
            f"prompt at position {int(np.argmin(norms))} has a constant activation vector, whose correlation "
            "distance to the others is undefined; RSA cannot use this layer"
        )
    z = z / norms[:, None]
    i, j = pairs
    return 1.0 - np.einsum("pd,pd->p", z[i], z[j]) if len(i) < 4096 else 1.0 - (z @ z.T)[i, j]


def standardized_ranks(d: np.ndarray) -> np.ndarray:
    """Average ranks, centered and scaled to unit norm (a constant vector stays zero)."""
    r = stats.rankdata(d)
    r = r - r.mean()
    norm = np.linalg.norm(r)
    return r / norm if norm > 0 else r


def upper(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, 1)


def rank_vector(x: np.ndarray, pairs: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """One layer's state: the standardized ranks of its dissimilarities over ``pairs``
    (default: every pair above the diagonal)."""
    return standardized_ranks(dissimilarities(x, pairs or upper(len(x))))


def rsa_pairs(side_a: Sequence[np.ndarray], side_b: Sequence[np.ndarray], perm: np.ndarray | None = None) -> np.ndarray:
    """The [L_A, L_B] Spearman matrix from ``rank_vector`` states over all pairs; ``perm``
    permutes B's prompts, which only moves its ranks (pair (i, j) takes B's (perm_i, perm_j))."""
    b = np.stack(side_b)
    if perm is not None:
        n = len(perm)
        i, j = upper(n)
        pi, pj = np.minimum(perm[i], perm[j]), np.maximum(perm[i], perm[j])
        # index of (p, q), p < q, in triu order: p n - p(p+1)/2 + q - p - 1
        b = b[:, pi * n - pi * (pi + 1) // 2 + pj - pi - 1]
    return np.stack(side_a) @ b.T
