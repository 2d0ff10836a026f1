"""Materialized k-NN sets: every prompt's K_max nearest prompts (cosine, self excluded,
ties broken by position) for a (model, layer, dataset), by one of three engines:

* ``blas``: exact. Vectors stream out with binary COPY, blocked top-k runs in numpy (or
  torch on a GPU), and the sets stream back with binary COPY. The default: about 100x
  faster than an exact scan in SQL (DESIGN.md §5).
* ``sql``: exact, inside Postgres with pgvector's ``<=>``. The reference for correctness.
* ``hnsw``: approximate, inside Postgres through a partial HNSW index per (model, layer,
  dataset); its recall against exact is measured on a sample of prompts and stored.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.orm import Session

from analysis.hnsw import EF_SEARCH_LIMIT, ef_search_for, ensure_index, plan_index
from analysis.resolve import get_dataset, get_model, ingested_layers, parse_layers
from analysis.topk import DISTANCE_DECIMALS, default_device, exact_topk, topk_blocks
from analysis.vectors import layer_vectors
from warehouse.copy import copy_column_blocks
from warehouse.engine import Warehouse, pgvector_version, raw_connection
from warehouse.errors import InputError
from warehouse.models import KnnRun

ENGINES = ("blas", "sql", "hnsw")
EXACT_ENGINES = ("blas", "sql")
K_MAX_DEFAULT = 100
RECALL_K = 10
QUERY_BLOCK = 64  # prompts per in-database statement (progress granularity)

# One statement ranks the neighbours of a block of query prompts. The inner scan takes
# k + 1 candidates (self is among them) ordered by {order}: the exact ``vec <=> q`` for
# the sql engine, or the indexed expression for hnsw (so that the planner can use the
# partial index). Candidates are then ranked by exact distance, ties by position, and the
# first k stored as arrays.
NEIGHBOURS_SQL = """
INSERT INTO knn_neighbor (run_id, position, neighbors, distances)
SELECT {run}, position,
       (array_agg(neighbor_position ORDER BY distance, neighbor_position))[1:{k}],
       (array_agg(distance ORDER BY distance, neighbor_position))[1:{k}]
FROM (
    SELECT q.position, nb.position AS neighbor_position, nb.distance
    FROM (
        SELECT p.position, a.vec FROM activation a JOIN prompt p ON p.id = a.prompt_id
        WHERE a.model_id = {model} AND a.layer = {layer} AND a.dataset_id = {dataset}
          AND p.position BETWEEN {first} AND {last}
    ) q
    CROSS JOIN LATERAL (
        SELECT p2.position, round((c.vec <=> q.vec)::numeric, {decimals})::real AS distance
        FROM (
            SELECT a2.prompt_id, a2.vec FROM activation a2
            WHERE a2.model_id = {model} AND a2.layer = {layer} AND a2.dataset_id = {dataset}
            ORDER BY {order}
            LIMIT {k} + 1
        ) c
        JOIN prompt p2 ON p2.id = c.prompt_id
        WHERE p2.position <> q.position
    ) nb
) candidates
GROUP BY position
"""


@dataclass
class KnnResult:
    """What was materialized (or reused) for one layer."""

    model: str
    dataset: str
    layer: int
    engine: str
    strategy: str
    k_max: int
    n_prompts: int
    seconds: float
    recall: float | None
    reused: bool

    def as_dict(self) -> dict:
        return asdict(self)


def lock_key(*parts: object) -> int:
    """A stable 63-bit advisory-lock key for a target."""
    return zlib.crc32("|".join(map(str, parts)).encode()) | (1 << 40)


def materialize(
    wh: Warehouse,
    model_name: str,
    dataset_name: str,
    *,
    layers: str | list[int] | None = None,
    k_max: int = K_MAX_DEFAULT,
    engine: str = "blas",
    ef_search: int | None = None,
    force: bool = False,
    recall_queries: int = 200,
    device: str | None = None,
    progress: bool = True,
) -> list[KnnResult]:
    """Compute and store k-NN sets for each layer (reusing stored ones with k_max >= asked)."""
    from tqdm import tqdm

    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    with Session(wh.engine) as session:
        model = get_model(session, model_name)
        dataset = get_dataset(session, dataset_name)
        available = ingested_layers(session, model, dataset)
        chosen = layers if isinstance(layers, list) else parse_layers(layers, available)
        model_id, width, dataset_id, n = model.id, model.width, dataset.id, dataset.n_prompts
    if not 0 < k_max < n:
        raise InputError(
            f"k = {k_max} needs 0 < k < the number of prompts ({n}) in {dataset_name!r}; lower --k-max"
        )
    ef = ef_search_for(k_max, ef_search, 100)
    if engine == "hnsw" and ef > EF_SEARCH_LIMIT:
        raise InputError(f"HNSW ef_search is at most {EF_SEARCH_LIMIT} in pgvector; k_max {k_max} needs {ef}: "
                         "lower --k-max")
    if engine == "blas" and device is None:
        device = default_device()
    if engine != "blas":
        # Fresh rows have no planner statistics; without them the planner may pass the HNSW
        # index by, or nest its joins badly (measured: 4x slower at n = 2000).
        with wh.engine.begin() as conn:
            conn.execute(sa.text("ANALYZE activation, prompt"))
    results = []
    bar = tqdm(chosen, desc=f"k-NN {model_name} × {dataset_name} ({engine})", unit="layer", disable=not progress,
               dynamic_ncols=True)
    for layer in bar:
        results.append(
            _materialize_layer(wh, model_name, dataset_name, model_id, dataset_id, width, n, layer, k_max, engine,
                               ef, force, recall_queries, device, progress)
        )
    return results


def _materialize_layer(wh: Warehouse, model_name: str, dataset_name: str, model_id: int, dataset_id: int, width: int,
                       n: int, layer: int, k_max: int, engine: str, ef: int, force: bool, recall_queries: int,
                       device: str | None, progress: bool) -> KnnResult:
    plan = plan_index(model_id, layer, dataset_id, width, None)
    if engine == "hnsw":
        with wh.engine.begin() as conn:
            plan = plan_index(model_id, layer, dataset_id, width, pgvector_version(conn))
            ensure_index(conn, plan, model_id, layer, dataset_id)
    with wh.engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"),
                     {"key": lock_key("knn", model_id, dataset_id, layer, engine)})
        existing = conn.execute(
            sa.select(KnnRun).where(KnnRun.model_id == model_id, KnnRun.dataset_id == dataset_id,
                                    KnnRun.layer == layer, KnnRun.engine == engine)
        ).first()
        if existing is not None and existing.k_max >= k_max and not force:
            return KnnResult(model_name, dataset_name, layer, engine, existing.strategy, existing.k_max,
                             existing.n_prompts, existing.seconds, existing.recall, reused=True)
        if existing is not None:
            conn.execute(sa.delete(KnnRun).where(KnnRun.id == existing.id))
        started = time.perf_counter()
        strategy = {"blas": f"exact, blocked top-k on {device or 'cpu'}", "sql": "exact scan in SQL"}.get(engine, "")
        if engine == "hnsw":
            strategy = plan.strategy
        run_id = conn.execute(
            sa.insert(KnnRun).values(model_id=model_id, dataset_id=dataset_id, layer=layer, k_max=k_max,
                                     engine=engine, strategy=strategy, n_prompts=n, seconds=0.0,
                                     ef_search=ef if engine == "hnsw" and plan.indexable else None,
                                     device=device if engine == "blas" else "database")
            .returning(KnnRun.id)
        ).scalar_one()
        recall = None
        if engine == "blas":
            positions, vectors = layer_vectors(conn, model_id, layer, dataset_id)
            _check_complete(positions, n, model_name, dataset_name, layer)
            # Blocks of query rows go to the server as they are computed, so that storing
            # one overlaps computing the next (the write was a third of the time at n = 2048).
            blocks = topk_blocks(vectors, k_max, device=device)
            copy_column_blocks(raw_connection(conn).cursor(), "knn_neighbor", NEIGHBOR_COLUMNS,
                               (_neighbor_columns(run_id, positions[start:start + len(idx)], positions[idx], dist)
                                for start, idx, dist in blocks))
        else:
            exact = engine == "sql" or not plan.indexable
            if not exact:
                conn.execute(sa.text(f"SET LOCAL hnsw.ef_search = {int(ef)}"))
            _neighbors_in_sql(conn, run_id, model_id, layer, dataset_id, n, k_max,
                              None if exact else plan.expression, progress)
            if not exact:
                recall = _measure_recall(conn, run_id, model_id, layer, dataset_id, min(RECALL_K, k_max),
                                         recall_queries)
        seconds = time.perf_counter() - started
        conn.execute(sa.update(KnnRun).where(KnnRun.id == run_id).values(
            seconds=seconds, recall=recall, recall_queries=min(recall_queries, n) if recall is not None else None))
    return KnnResult(model_name, dataset_name, layer, engine, strategy, k_max, n, seconds, recall, reused=False)


def _check_complete(positions: np.ndarray, n: int, model: str, dataset: str, layer: int) -> None:
    if len(positions) != n:
        raise InputError(
            f"{model} × {dataset} layer {layer} has {len(positions)} of {n} activations stored; "
            "finish the ingest (re-run `layerbase ingest`) first"
        )


NEIGHBOR_COLUMNS = ("run_id", "position", "neighbors", "distances")


def _neighbor_columns(run_id: int, positions: np.ndarray, neighbor_positions: np.ndarray,
                      distances: np.ndarray) -> list[tuple[str, np.ndarray]]:
    return [
        ("int4", np.full(len(positions), run_id, dtype=np.int32)),
        ("int4", positions.astype(np.int32)),
        ("int4[]", neighbor_positions.astype(np.int32)),
        ("float4[]", distances.astype(np.float32)),
    ]


def _neighbors_in_sql(conn: sa.Connection, run_id: int, model_id: int, layer: int, dataset_id: int, n: int,
                      k: int, index_expression: str | None, progress: bool) -> None:
    from tqdm import tqdm

    if index_expression is None:
        # prompt ids grow with position within a dataset, so this breaks ties by position
        order = sql.SQL("a2.vec <=> q.vec, a2.prompt_id")
    else:
        cast = index_expression.split("::", 1)[1]  # e.g. vector(576): from plan_index, not input
        order = sql.SQL("a2.{expr} <=> q.vec::{cast}").format(expr=sql.SQL(index_expression), cast=sql.SQL(cast))
    cur = raw_connection(conn).cursor()
    for first in tqdm(range(0, n, QUERY_BLOCK), desc=f"layer {layer}", unit="block", leave=False,
                      disable=not progress):
        cur.execute(sql.SQL(NEIGHBOURS_SQL).format(
            run=sql.Literal(run_id), model=sql.Literal(model_id), layer=sql.Literal(layer),
            dataset=sql.Literal(dataset_id), first=sql.Literal(first), last=sql.Literal(first + QUERY_BLOCK - 1),
            order=order, k=sql.Literal(k), decimals=sql.Literal(DISTANCE_DECIMALS),
        ))


def _measure_recall(conn: sa.Connection, run_id: int, model_id: int, layer: int, dataset_id: int, k: int,
                    n_queries: int) -> float:
    """Recall@k of the stored (approximate) sets against exact sets, on a seeded sample of prompts."""
    positions, vectors = layer_vectors(conn, model_id, layer, dataset_id)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(positions), size=min(n_queries, len(positions)), replace=False))
    idx, _ = exact_topk(vectors, k, queries=sample)  # only the sampled rows: an exact pass costs as much as blas
    stored = neighbor_array(conn, run_id, k)
    hits = sum(len(np.intersect1d(stored[positions[i]], positions[idx[j]])) for j, i in enumerate(sample))
    return hits / (k * len(sample))


def neighbor_array(conn: sa.Connection, run_id: int, k: int) -> np.ndarray:
    """[n, k] neighbour positions of a stored run, rows in position order (-1 where missing)."""
    rows = conn.execute(
        sa.text("SELECT position, neighbors[1:CAST(:k AS int)] FROM knn_neighbor WHERE run_id = :r"),
        {"r": run_id, "k": k},
    ).all()
    if not rows:
        return np.zeros((0, k), dtype=np.int64)
    out = np.full((max(r[0] for r in rows) + 1, k), -1, dtype=np.int64)
    for position, neighbors in rows:
        out[position, : len(neighbors)] = neighbors
    return out
