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


# Rows of the mirrored triangle copied at a time: a [block, n] strip and its transpose stay
# in the CPU caches (at n = 2048, 64 rows took 11 ms a matrix, 512 rows 27 ms).
MIRROR_BLOCK = 64


def gram(x: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` = x xᵀ for [n, d] rows x, into an [n, n] tensor.

    On the CPU in float64 through BLAS's ``dsyrk``, which computes one triangle of the
    symmetric product with half the multiply-adds of a general product; the other triangle
    is then mirrored (torch has no symmetric rank-k product). Measured at n = 2048, d = 576
    on 2 cores: 39 ms against 59 ms for ``torch.matmul``, equal to 1e-12 of values up to 700."""
    if x.device.type != "cpu" or x.dtype != torch.float64 or not out.is_contiguous():
        torch.matmul(x, x.T, out=out)
        return
    from scipy.linalg import blas

    n = x.shape[0]
    g = out.numpy()
    # Fortran views of C-ordered arrays: with trans=1, dsyrk computes (xᵀ)ᵀ xᵀ = x xᵀ into the
    # upper triangle of g in Fortran order, which is the lower triangle in C order.
    product = blas.dsyrk(1.0, x.contiguous().numpy().T, beta=0.0, c=g.T, trans=1, overwrite_c=1)
    if not np.shares_memory(product, g):  # the wrapper copied c instead of writing in place
        g[...] = product.T
    for start in range(0, n, MIRROR_BLOCK):
        stop = min(n, start + MIRROR_BLOCK)
        g[start:stop, stop:] = g[stop:, start:stop].T
        block = g[start:stop, start:stop]
        block[...] = np.tril(block) + np.tril(block, -1).T


def _squared_distances(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[n, n] squared distances between the rows of x, into ``out`` when given."""
    x = x - x.mean(0)  # distances do not change; the products lose less to rounding
    norms = (x * x).sum(1)
    n = x.shape[0]
    matrix = torch.empty((n, n), dtype=x.dtype, device=x.device) if out is None else out
    gram(x, matrix)
    return matrix.mul_(-2.0).add_(norms[:, None]).add_(norms[None, :]).clamp_(min=0.0)


def centered(x: torch.Tensor, kind: str, sigma: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's centered Gram matrix, flattened and scaled to unit norm: HKH for the
    biased HSIC, the U-centered K for the unbiased one. Written into ``out`` ([n^2]) when
    given: a chunk's matrices are made in place, without temporary n x n matrices, whose
    fresh pages cost time of their own (with them and torch's products, all 30 x 18 layer
    pairs at n = 2048 took 6.5 s on 2 cores; in place, with dsyrk and numpy's product, 4.0 s)."""
    n = x.shape[0]
    flat = torch.empty(n * n, dtype=x.dtype, device=x.device) if out is None else out
    matrix = flat.view(n, n)
    if kind == "rbf_cka":
        assert sigma is not None
        _squared_distances(x, out=matrix).div_(-2 * sigma**2).exp_()
        columns, rows, total = matrix.mean(0), matrix.mean(1), matrix.mean()
        matrix.sub_(columns[None, :]).sub_(rows[:, None]).add_(total)
    else:
        # HKH of a linear kernel is the Gram matrix of the centered activations; the
        # U-centered matrix of K equals that of HKH (it removes row and column effects).
        gram(x - x.mean(0), matrix)
        if kind == "unbiased_cka":
            matrix.fill_diagonal_(0.0)
            rows = matrix.sum(1)
            matrix.sub_(rows[:, None] / (n - 2)).sub_(rows[None, :] / (n - 2)).add_(rows.sum() / ((n - 1) * (n - 2)))
            matrix.fill_diagonal_(0.0)
    norm = torch.linalg.vector_norm(flat)
    if norm > 0:
        flat.div_(norm)
    return flat


def _inner_products(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """a bᵀ of [L_A, n^2] and [L_B, n^2] rows, as numpy. On the CPU through numpy's BLAS call,
    which spreads this long, thin product over the cores better than torch's (at n = 2048,
    30 x 18 layers on 2 cores: 0.18 s against 0.47 s)."""
    if a.device.type == "cpu":
        return a.numpy() @ b.numpy().T
    return (a @ b.T).cpu().numpy()


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
        block = torch.empty((len(layers), n * n), dtype=torch.float64, device=dev)
        for row, i in zip(block, layers):
            x = torch.as_tensor(xs[i], dtype=torch.float64, device=dev)
            centered(x, kind, None if sigmas is None else sigmas[which][i], out=row)
        return block

    for rows in _chunks(len(xs_a), size):
        block_a = chunk(xs_a, rows, 0)
        for cols in _chunks(len(xs_b), size):
            block_b = chunk(xs_b, cols, 1)
            for result, p in zip(out, index):
                b = block_b
                if p is not None:
                    b = block_b.view(len(cols), n, n)[:, p][:, :, p].reshape(len(cols), n * n)
                result[rows.start : rows.stop, cols.start : cols.stop] = _inner_products(block_a, b)
            del block_b
    return out
