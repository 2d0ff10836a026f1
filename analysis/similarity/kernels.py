"""CKA for all layer pairs at once: one centered Gram matrix per layer, and every pair's
HSIC as one matrix product of the flattened matrices ([L_A, n^2] x [n^2, L_B]).

* ``linear_cka`` (Kornblith et al. 2019): linear kernel of the activations as they are,
  the biased HSIC tr(HKH HLH); CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).
* ``unbiased_cka``: the same with the unbiased HSIC of Song et al. (2012), computed as the
  inner product of U-centered Gram matrices (Székely & Rizzo 2014), which equals it.
* ``rbf_cka``: a Gaussian kernel exp(-|x_i - x_j|^2 / (2 sigma^2)), sigma = bandwidth x the
  median pairwise distance (Kornblith et al.'s reference code: the median of all n^2
  squared distances, diagonal included), biased HSIC.

Each CKA is the cosine between two flattened centered matrices, so the rows are normalized
once and the product gives every CKA. The matrices are made in chunks of layers that fit
``memory_budget()`` (streaming when n^2 x L does not), in float64, with torch on a GPU when
one is present.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

KERNELS = ("linear_cka", "unbiased_cka", "rbf_cka")
DEFAULT_MEMORY_BUDGET = 4 << 30


def memory_budget() -> int:
    """Bytes the centered Gram matrices of one chunk may take (``LAYERBASE_MEASURE_MEMORY``)."""
    return int(os.environ.get("LAYERBASE_MEASURE_MEMORY", DEFAULT_MEMORY_BUDGET))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rbf_sigma(x: np.ndarray, bandwidth: float) -> float:
    """bandwidth x sqrt(median squared distance), the median over all n^2 pairs."""
    t = torch.as_tensor(x, dtype=torch.float64, device=device())
    sq = _squared_distances(t).flatten().cpu()
    # np.median's convention: the mean of the two middle values of an even count.
    lower = torch.kthvalue(sq, (sq.numel() + 1) // 2).values
    upper = torch.kthvalue(sq, sq.numel() // 2 + 1).values
    return float(bandwidth * torch.sqrt((lower + upper) / 2))


def _squared_distances(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(0)  # distances do not change; the products lose less to rounding
    norms = (x * x).sum(1)
    return torch.clamp(norms[:, None] + norms[None, :] - 2 * x @ x.T, min=0.0)


def centered(x: torch.Tensor, kind: str, sigma: float | None = None) -> torch.Tensor:
    """One layer's centered Gram matrix, flattened and scaled to unit norm: HKH for the
    biased HSIC, the U-centered K for the unbiased one."""
    n = x.shape[0]
    xc = x - x.mean(0)
    if kind == "rbf_cka":
        assert sigma is not None
        gram = torch.exp(-_squared_distances(x) / (2 * sigma**2))
        gram = gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()
    else:
        # HKH of a linear kernel is the Gram matrix of the centered activations; the
        # U-centered matrix of K equals that of HKH (it removes row and column effects).
        gram = xc @ xc.T
        if kind == "unbiased_cka":
            gram.fill_diagonal_(0.0)
            rows = gram.sum(1)
            gram = gram - rows[:, None] / (n - 2) - rows[None, :] / (n - 2) + rows.sum() / ((n - 1) * (n - 2))
            gram.fill_diagonal_(0.0)
    flat = gram.flatten()
    norm = torch.linalg.vector_norm(flat)
    return flat / norm if norm > 0 else flat


def _chunks(count: int, size: int) -> Iterator[range]:
    for start in range(0, count, size):
        yield range(start, min(count, start + size))


def all_pairs(
    kind: str,
    xs_a: Sequence[np.ndarray],
    xs_b: Sequence[np.ndarray],
    perms: Sequence[np.ndarray | None] = (None,),
    sigmas: tuple[Sequence[float], Sequence[float]] | None = None,
) -> list[np.ndarray]:
    """The [L_A, L_B] CKA matrix for each of ``perms`` (None: B as it is; else B's prompts
    permuted), from [n, d] activations per layer."""
    n = len(xs_a[0])
    if n < 4:
        raise ValueError("CKA needs at least 4 prompts")
    dev = device()
    per_layer = n * n * 8
    # Half the budget for each side's chunk; at least one layer each.
    size = max(1, memory_budget() // (2 * per_layer))
    out = [np.zeros((len(xs_a), len(xs_b))) for _ in perms]
    index = [None if p is None else torch.as_tensor(p, device=dev) for p in perms]

    def chunk(xs: Sequence[np.ndarray], layers: range, which: int) -> torch.Tensor:
        return torch.stack(
            [
                centered(
                    torch.as_tensor(xs[i], dtype=torch.float64, device=dev),
                    kind,
                    None if sigmas is None else sigmas[which][i],
                )
                for i in layers
            ]
        )

    for rows in _chunks(len(xs_a), size):
        block_a = chunk(xs_a, rows, 0)
        for cols in _chunks(len(xs_b), size):
            block_b = chunk(xs_b, cols, 1)
            for result, p in zip(out, index):
                b = block_b
                if p is not None:
                    b = block_b.view(len(cols), n, n)[:, p][:, :, p].reshape(len(cols), n * n)
                result[rows.start : rows.stop, cols.start : cols.stop] = (block_a @ b.T).cpu().numpy()
            del block_b
    return out
