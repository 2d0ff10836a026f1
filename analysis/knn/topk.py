"""Exact blocked top-k cosine neighbours in memory (numpy, or torch on a GPU).

Memory stays bounded: similarities are computed for a block of query rows at a time,
never as an n x n matrix. Ties are broken by row index, as the SQL engine breaks them
by dataset position.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from layerbase.warehouse.errors import InputError

BLOCK_BYTES = 64 << 20  # similarities held at once
BLOCK_ROWS = 256  # query rows per block at most
# Distances are rounded to this many decimals before ranking, in every engine: BLAS
# kernels give duplicate vectors distances that differ in the last bits depending on the
# block shape, and rounding makes them tie, so that ties break by position everywhere.
DISTANCE_DECIMALS = 6
EXTRA_CANDIDATES = 16  # partition slack so that ties at the k-th place resolve by index


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

    Queries are all rows, or the row indices given. Self is excluded; distances are
    rounded to 1e-6 and ties broken by the smaller index.
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
    xn = normalize(np.asarray(x, dtype=np.float32))
    block = block_rows or max(1, min(n, BLOCK_BYTES // (4 * n), BLOCK_ROWS))
    cand = min(n - 1, k + EXTRA_CANDIDATES)
    for start in range(0, len(query_rows), block):
        stop = min(len(query_rows), start + block)
        rows_here = query_rows[start:stop]
        dist = np.round(1.0 - _similarities(xn[rows_here], xn, device), DISTANCE_DECIMALS)
        dist[np.arange(stop - start), rows_here] = np.inf  # self
        part = np.argpartition(dist, cand - 1, axis=1)[:, :cand]
        part_dist = np.take_along_axis(dist, part, axis=1)
        order = np.lexsort((part, part_dist), axis=1)
        idx = np.take_along_axis(part, order, axis=1)
        dd = np.take_along_axis(part_dist, order, axis=1)
        if cand < n - 1:
            # A tie at the k-th distance could continue past the candidates: redo those rows fully.
            for r in np.nonzero(dd[:, k - 1] >= dd[:, cand - 1])[0]:
                full = np.lexsort((np.arange(n), dist[r]))[:k]
                idx[r, :k], dd[r, :k] = full, dist[r, full]
        yield start, idx[:, :k], dd[:, :k]
