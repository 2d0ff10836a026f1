"""SVCCA, PWCCA and orthogonal Procrustes for all layer pairs.

* ``svcca`` (Raghu et al. 2017): each layer's centered activations reduced to their top
  ``dims`` SVD directions; the canonical correlations of two reduced layers are the singular
  values of U_A' U_B (U: the orthonormal left singular vectors kept), and SVCCA is their mean.
* ``pwcca`` (Morcos et al. 2018): the same canonical correlations rho_i, averaged with
  weights alpha_i = sum_j |<h_i, x_j>| over model A's reduced neurons x_j (h_i: A's canonical
  variates), normalized to sum to one. As in the authors' code, the weights come from the
  first layer of the pair (with equal reduced widths): PWCCA is not symmetric, and rows are
  model A.
* ``procrustes`` (Williams et al. 2021): X and Y centered and scaled to unit Frobenius norm;
  min over orthogonal Q of |X - YQ|_F^2 = 2 - 2 |X'Y|_* , and the similarity is the nuclear
  norm |X'Y|_* in [0, 1] (widths may differ: X'Y is d_A x d_B).

Everything is a product of a layer's small factors, so each layer is factored once and
every pair (and every permutation of B's prompts) reuses the factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from layerbase.analysis.similarity.kernels import device


@dataclass(frozen=True)
class Reduced:
    """A layer's top SVD directions: ``u`` [n, r] orthonormal, ``s`` [r] singular values."""

    u: np.ndarray
    s: np.ndarray


def reduce(x: np.ndarray, dims: int) -> Reduced:
    """The top ``dims`` left singular vectors of the centered activations (fewer where the
    rank is lower: directions with a singular value under 1e-6 of the largest are dropped)."""
    xc = np.asarray(x, dtype=np.float64)
    xc = xc - xc.mean(0)
    if xc.shape[0] > xc.shape[1]:
        # More prompts than width: the width x width eigenproblem is the cheaper one.
        eigenvalues, v = np.linalg.eigh(xc.T @ xc)
        order = np.argsort(eigenvalues)[::-1][:dims]
        s = np.sqrt(np.clip(eigenvalues[order], 0.0, None))
        keep = int((s > s[0] * 1e-6).sum()) if s[0] > 0 else 0
        return Reduced(xc @ v[:, order[:keep]] / s[:keep], s[:keep])
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    keep = min(dims, int((s > s[0] * 1e-6).sum()) if s[0] > 0 else 0)
    return Reduced(u[:, :keep], s[:keep])


def cca_pairs(
    measure: str, side_a: Sequence[Reduced], side_b: Sequence[Reduced], perm: np.ndarray | None = None
) -> np.ndarray:
    """The [L_A, L_B] SVCCA or PWCCA matrix, B's prompts permuted by ``perm``."""
    out = np.zeros((len(side_a), len(side_b)))
    us_b = [b.u if perm is None else b.u[perm] for b in side_b]
    for i, a in enumerate(side_a):
        for j, u_b in enumerate(us_b):
            if not a.s.size or not u_b.shape[1]:
                continue  # a layer without variance shares nothing
            left, rho, _ = np.linalg.svd(a.u.T @ u_b, full_matrices=False)
            rho = np.clip(rho, 0.0, 1.0)
            if measure == "svcca":
                out[i, j] = rho.mean()
            else:
                # h_i = U_A left_i, and x_j = s_j U_A[:, j]: <h_i, x_j> = s_j left[j, i].
                alpha = (a.s[:, None] * np.abs(left)).sum(0)
                out[i, j] = float(alpha @ rho / alpha.sum())
    return out


def normalized(x: np.ndarray) -> np.ndarray:
    """Centered, unit Frobenius norm (a layer without variance stays zero)."""
    xc = np.asarray(x, dtype=np.float64)
    xc = xc - xc.mean(0)
    norm = np.linalg.norm(xc)
    return xc / norm if norm > 0 else xc


def procrustes_pairs(
    side_a: Sequence[np.ndarray], side_b: Sequence[np.ndarray], perm: np.ndarray | None = None
) -> np.ndarray:
    """The [L_A, L_B] matrix of |X_A' X_B|_* from ``normalized`` layers, B permuted by
    ``perm``: the nuclear norm as the sum of square roots of the eigenvalues of the smaller
    of M'M and MM' (symmetric eigenvalues are several times faster than an SVD)."""
    dev = device()
    bs = [torch.as_tensor(b if perm is None else b[perm], device=dev) for b in side_b]
    out = np.zeros((len(side_a), len(side_b)))
    for i, a in enumerate(side_a):
        ta = torch.as_tensor(a, device=dev)
        for j, tb in enumerate(bs):
            m = ta.T @ tb
            gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
            out[i, j] = float(torch.sqrt(torch.clamp(torch.linalg.eigvalsh(gram), min=0.0)).sum())
    return out
