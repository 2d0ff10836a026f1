"""Exact blocked top-k cosine neighbours in memory (numpy, or torch on a GPU).

Memory stays bounded: similarities are computed for a block of query rows at a time,
never as an n x n matrix. The float32 product finds candidates; the final order comes from
float64 distances (``rerank_exact``), ties broken by row index, as in the SQL engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from layerbase.warehouse.errors import InputError

BLOCK_BYTES = 64 << 20  # similarities held at once
BLOCK_ROWS = 256  # query rows per block at most
EXTRA_CANDIDATES = 16  # float32 candidates beyond k, so that most rows re-rank among them

# Exactness (docs/reliability.md, "What exact means"). A k-NN set is exact when it holds the
# k prompts with the smallest cosine distance computed in float64 from the stored values,
# equal float64 distances broken by position. Fast float32 arithmetic (BLAS here, pgvector's
# float accumulators in SQL) only finds candidates. Its rounding error on a distance between
# unit vectors of width d grows like sqrt(d) * 2^-24 (independent roundings; the worst case,
# d * 2^-24, is never approached by blocked or vectorized sums); ROUNDING_MARGIN sets it 8
# times wider than that. Every prompt whose float32 distance is within twice this bound of
# the k-th float32 distance is re-ranked in float64, which then holds the float64 top k.
# Last-token activations are nearly collinear (neighbours 1e-5 apart): rounding decided 2-5 %
# of the sets of early layers before. A worst-case bound (d * 2^-24) cost 2.5x the blas
# engine's time at d = 2048, k = 100, because nearly every row then re-ranked all its prompts.
ROUNDING_MARGIN = 8.0


def rounding_bound(width: int) -> float:
    """The error a float32 cosine distance between vectors of this width stays within."""
    return ROUNDING_MARGIN * width**0.5 * 2.0**-24


def exact_distances(x: np.ndarray, norms: np.ndarray, query: int, rows: np.ndarray) -> np.ndarray:
    """float64 cosine distances of ``rows`` to row ``query``. einsum sums each row in the same
    order wherever the row sits (a BLAS product need not: with one, two copies of a vector
    came out in the wrong order), so a pair's distance never depends on the call, and
    identical vectors tie exactly."""
    q = x[query].astype(np.float64) / norms[query]
    return 1.0 - np.einsum("ij,j->i", x[rows].astype(np.float64), q) / norms[rows]


def rerank_exact(
    x: np.ndarray,
    norms: np.ndarray,
    queries: np.ndarray,
    cand: np.ndarray,
    cand_dist: np.ndarray,
    k: int,
    full_row: Callable[[int], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """The exact k-NN sets (indices, float64 distances as float32) of ``queries``, from
    float32 candidates (``cand`` ranked by ``cand_dist``, self excluded). A row whose
    candidates may not reach past the rounding bound of its k-th distance is re-ranked over
    every prompt within it, from ``full_row(i)`` (its float32 distances, self at inf)."""
    bound = 2 * rounding_bound(x.shape[1])
    out_idx = np.empty((len(queries), k), dtype=np.int64)
    out_dist = np.empty((len(queries), k), dtype=np.float32)
    for i, query in enumerate(queries):
        threshold = cand_dist[i, k - 1] + bound
        if cand_dist[i, -1] > threshold:  # never when there are only k candidates
            pool = cand[i][cand_dist[i] <= threshold]  # at least k: the first k are within it
        else:  # the pool may reach past the candidates: take it from the whole row
            row = full_row(i)
            pool = np.nonzero(row <= threshold)[0]
        d64 = exact_distances(x, norms, int(query), pool)
        order = np.lexsort((pool, d64))[:k]
        out_idx[i], out_dist[i] = pool[order], d64[order]
    return out_idx, out_dist


def rerank_candidates(x: np.ndarray, cand: np.ndarray, cand_dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``rerank_exact`` for candidates found elsewhere (the sql engine): query i is row i."""
    x, xn, norms = _prepared(x)

    def full_row(i: int) -> np.ndarray:
        row = 1.0 - xn @ xn[i]
        row[i] = np.inf
        return row

    return rerank_exact(x, norms, np.arange(len(x)), cand, cand_dist, k, full_row)


def _prepared(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x as float32, its rows at unit length for the float32 search, float64 row norms for
    the re-rank)."""
    x = np.asarray(x, dtype=np.float32)
    return x, normalize(x), np.linalg.norm(x.astype(np.float64), axis=1)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity = dot product)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        row = int(np.argmax(norms[:, 0] == 0))
        raise InputError(f"row {row} is a zero vector: cosine distance is undefined for it")
    return (x / norms).astype(np.float32, copy=False)


def default_device() -> str:
    """CUDA when torch sees a GPU, else the CPU (numpy with BLAS)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _similarities(queries: np.ndarray, data: np.ndarray, device: str | None) -> np.ndarray:
    if device and device != "cpu":
        import torch

        q = torch.from_numpy(queries).to(device)
        d = torch.from_numpy(data).to(device)
        return (q @ d.T).cpu().numpy()
    return queries @ data.T


def exact_topk(
    x: np.ndarray,
    k: int,
    *,
    device: str | None = None,
    block_rows: int | None = None,
    queries: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(indices [q, k], cosine distances [q, k]) of each query row's k nearest other rows.

    Queries are all rows, or the row indices given. Self is excluded; the order is by float64
    distance, ties broken by the smaller index (``rerank_exact``).
    """
    n_queries = len(x) if queries is None else len(queries)
    out_idx = np.empty((n_queries, k), dtype=np.int64)
    out_dist = np.empty((n_queries, k), dtype=np.float32)
    for start, idx, dist in topk_blocks(x, k, device=device, block_rows=block_rows, queries=queries):
        out_idx[start : start + len(idx)] = idx
        out_dist[start : start + len(idx)] = dist
    return out_idx, out_dist


def topk_blocks(
    x: np.ndarray,
    k: int,
    *,
    device: str | None = None,
    block_rows: int | None = None,
    queries: np.ndarray | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``exact_topk`` one block of query rows at a time: (first query row, indices, distances).

    Blocks hold at most BLOCK_ROWS rows, so that a consumer can store one block while the
    next is computed. The block shape is fixed by n alone: BLAS may round a row's
    similarities differently in another block shape, and the sets must not depend on who
    asked for them.
    """
    n = len(x)
    if not 0 < k < n:
        raise InputError(f"k must be between 1 and n - 1 = {n - 1} (got k = {k}); lower k or add prompts")
    query_rows = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    x, xn, norms = _prepared(x)
    block = block_rows or max(1, min(n, BLOCK_BYTES // (4 * n), BLOCK_ROWS))
    cand = min(n - 1, k + EXTRA_CANDIDATES)
    for start in range(0, len(query_rows), block):
        stop = min(len(query_rows), start + block)
        rows_here = query_rows[start:stop]
        dist = 1.0 - _similarities(xn[rows_here], xn, device)
        dist[np.arange(stop - start), rows_here] = np.inf  # self
        part = np.argpartition(dist, cand - 1, axis=1)[:, :cand]
        part_dist = np.take_along_axis(dist, part, axis=1)
        order = np.lexsort((part, part_dist), axis=1)
        idx = np.take_along_axis(part, order, axis=1)
        dd = np.take_along_axis(part_dist, order, axis=1)
        # The lambda runs inside this call, while ``dist`` is this block's.
        yield start, *rerank_exact(x, norms, rows_here, idx, dd, k, lambda i: dist[i])  # noqa: B023
