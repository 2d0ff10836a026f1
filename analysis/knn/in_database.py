"""Exact and indexed k-NN search inside Postgres: one statement ranks a block of query
prompts, blocks run on several connections at once."""

from __future__ import annotations

import numpy as np
import psycopg
import sqlalchemy as sa
from psycopg import sql

from layerbase.analysis.knn.index import IndexPlan
from layerbase.analysis.knn.search import Search
from layerbase.analysis.knn.topk import normalize
from layerbase.warehouse.engine import Warehouse
from layerbase.warehouse.parallel import run_in_parallel
from layerbase.warehouse.storage import Storage

QUERY_BLOCK = 128  # prompts per in-database statement

# One statement ranks the neighbours of a block of query prompts. The inner scan takes
# {candidates} candidates (self is among them) ordered by {order}: the exact ``vec <=> q``
# for the sql engine, or the indexed expression (so that the planner uses the partial
# index). Candidates are then ranked by pgvector's distance, ties by prompt id, and the first
# k returned as arrays; the sql engine asks for more than it keeps, and the caller re-ranks
# them in float64 (``topk.rerank_candidates``). Prompt ids grow with position within a
# dataset, so ties break by position as in the blas engine; ids are mapped to positions by the caller, which keeps
# the prompt table out of the statement (joining it cost a tenth of the time). A wide
# vector is stored out of line (TOAST); the cast to the layer's width in a subquery that
# is not flattened (OFFSET 0) reads each query vector once, not once per candidate. The
# candidate's distance is computed in a second unflattened subquery, so that the sort
# under the aggregate carries (prompt, neighbour, distance) and not both vectors: with
# the vectors it spilled 45 MB to disk for 1000 queries at width 576, and took 13-19 %
# of the time of an HNSW search.
NEIGHBOURS_SQL = """
SELECT q.prompt_id,
       (array_agg(c.neighbor_id ORDER BY c.distance, c.neighbor_id))[1:{k}],
       (array_agg(c.distance ORDER BY c.distance, c.neighbor_id))[1:{k}]
FROM (
    SELECT prompt_id, {column}::{cast} AS vec FROM activation
    WHERE model_id = {model} AND layer = {layer} AND dataset_id = {dataset} AND prompt_id = ANY({ids})
    OFFSET 0
) q
CROSS JOIN LATERAL (
    SELECT cand.prompt_id AS neighbor_id, cand.vec <=> q.vec AS distance
    FROM (
        SELECT a2.prompt_id, a2.{column} AS vec FROM activation a2
        WHERE a2.model_id = {model} AND a2.layer = {layer} AND a2.dataset_id = {dataset}
        ORDER BY {order}
        LIMIT {candidates}
    ) cand
    OFFSET 0
) c
WHERE c.neighbor_id <> q.prompt_id
GROUP BY q.prompt_id
"""
PROMPT_IDS = "SELECT id FROM prompt WHERE dataset_id = :dataset ORDER BY position"
LOCALITY_BLOCK = 1 << 16  # rows compared with the anchors at once


def by_locality(x: np.ndarray, anchors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``rows`` (of ``x``) grouped by their most similar anchor row (cosine), in anchor order.

    An index search is bound by memory latency: most of its time goes to reading the
    index pages of the elements it visits (profiled on pgvector 0.8.5: the page lookup,
    pin and line pointer of each element, and its vector), which another search left in
    the CPU caches only if it visited nearby elements. Queries grouped by region walk one
    part of the graph after another: at n = 10000, width 576, an HNSW pass over every
    prompt took 3.33 s in this order against 3.68 s in position order (mean of 6 each)."""
    if len(rows) == 0:
        return rows
    # A row's own norm does not change which anchor is most similar to it: only the anchors
    # are normalized.
    toward = normalize(np.asarray(x[anchors], dtype=np.float32)).T
    nearest = np.concatenate(
        [
            np.argmax(np.asarray(x[rows[start : start + LOCALITY_BLOCK]], dtype=np.float32) @ toward, axis=1)
            for start in range(0, len(rows), LOCALITY_BLOCK)
        ]
    )
    return rows[np.argsort(nearest, kind="stable")]


def dataset_prompt_ids(wh: Warehouse, dataset_id: int) -> np.ndarray:
    """The dataset's prompt ids in position order (index i holds position i's id; ids grow
    with position, so the array is sorted)."""
    with wh.engine.connect() as conn:
        return np.array(conn.execute(sa.text(PROMPT_IDS), {"dataset": dataset_id}).scalars().all(), dtype=np.int64)


def neighbors_in_db(
    wh: Warehouse,
    model_id: int,
    layer: int,
    dataset_id: int,
    width: int,
    prompt_ids: np.ndarray,
    query_positions: np.ndarray,
    k: int,
    *,
    storage: Storage,
    plan: IndexPlan | None = None,
    search: Search | None = None,
    workers: int = 1,
    progress: bool = False,
    fill_exactly: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(neighbour positions [q, k], distances [q, k]) of the query prompts, ranked in SQL.

    Without a plan each query scans exactly; with one, it takes ``search.candidates`` rows in
    index order and re-ranks them exactly. Blocks of queries run on ``workers`` connections at
    once. ``storage`` is the model's (``warehouse.storage``). An index can return fewer than k
    other rows (a narrow IVFFlat probe of a small dataset); those rows are -1 and, with
    ``fill_exactly``, answered again by an exact scan.
    """
    from tqdm.auto import tqdm

    query_positions = np.asarray(query_positions)
    assert plan is None or plan.storage == storage
    column = sql.Identifier(storage.column)
    order: sql.Composable
    if plan is None:
        order = sql.SQL("a2.{} <=> q.vec, a2.prompt_id").format(column)  # ties by prompt id, that is by position
        candidates = k + 1
    else:
        assert search is not None
        order = plan.distance(sql.SQL("a2.{}").format(column), sql.SQL("q.vec"))
        candidates = search.candidates
    blocks = [query_positions[i : i + QUERY_BLOCK] for i in range(0, len(query_positions), QUERY_BLOCK)]
    bar = tqdm(
        total=len(query_positions),
        desc=f"layer {layer}",
        unit="prompt",
        leave=False,
        disable=not progress,
        dynamic_ncols=True,
    )

    def run(cur: psycopg.Cursor, block: np.ndarray) -> list[tuple]:
        cur.execute(
            sql.SQL(NEIGHBOURS_SQL).format(
                model=sql.Literal(model_id),
                layer=sql.Literal(layer),
                dataset=sql.Literal(dataset_id),
                column=column,
                cast=sql.SQL(storage.cast(int(width))),
                ids=sql.SQL("{}::bigint[]").format(sql.Literal([int(i) for i in prompt_ids[block]])),
                order=order,
                candidates=sql.Literal(candidates),
                k=sql.Literal(k),
            )
        )
        rows = cur.fetchall()
        bar.update(len(block))
        return rows

    settings = search.settings() if search is not None else []
    results = {
        prompt_id: (neighbors, distances)
        for rows in run_in_parallel(wh, blocks, run, workers=workers, settings=settings)
        for prompt_id, neighbors, distances in rows
    }
    bar.close()
    idx = np.full((len(query_positions), k), -1, dtype=np.int64)
    dist = np.full((len(query_positions), k), np.inf, dtype=np.float32)
    for row, position in enumerate(query_positions):
        neighbors, distances = results.get(int(prompt_ids[position]), ([], []))
        idx[row, : len(neighbors)] = np.searchsorted(prompt_ids, neighbors)
        dist[row, : len(distances)] = distances
    short = np.nonzero((idx < 0).any(axis=1))[0]
    if fill_exactly and plan is not None and len(short):
        idx[short], dist[short] = neighbors_in_db(
            wh,
            model_id,
            layer,
            dataset_id,
            width,
            prompt_ids,
            query_positions[short],
            k,
            workers=workers,
            storage=storage,
        )
    return idx, dist
