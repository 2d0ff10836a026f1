"""Materialized k-NN sets: every prompt's K_max nearest prompts (cosine, self excluded,
ties broken by position) for a (model, layer, dataset), by one of four engines:

* ``blas``: exact. Vectors stream out with binary COPY, blocked top-k runs in numpy (or
  torch on a GPU), and the sets stream back with binary COPY. The default: 20-110x
  faster than an exact scan in SQL at n = 10000 (README, figures 1 and 2).
* ``sql``: exact, inside Postgres with pgvector's ``<=>``. The reference for correctness.
* ``hnsw`` and ``ivfflat``: approximate, inside Postgres through a partial index per
  (model, layer, dataset). Before the full pass the search is widened (ef_search or probes,
  and for a prefix index the candidates re-ranked exactly) until the recall on a seeded
  sample of prompts reaches ``min_recall`` with 95 % confidence; every setting tried and
  its recall are stored.

The in-database engines spread their queries over several connections (``workers``), each
a backend of its own, so that the server uses more than one core; the sets come back to
this process and are written with one binary COPY.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from layerbase.analysis.knn.in_database import by_locality, dataset_prompt_ids, neighbors_in_db
from layerbase.analysis.knn.index import (
    BUILD_DEFAULTS,
    BUILD_FLAGS,
    EF_SEARCH_LIMIT,
    METHODS,
    IndexPlan,
    build_options,
    built_with,
    ef_search_for,
    ensure_index,
    plan_index,
)
from layerbase.analysis.knn.search import RECALL_K, SampleRecall, Search, calibrate_lookups, initial_search
from layerbase.analysis.knn.stored import MAX_PACKED_SETS, RunArrays
from layerbase.analysis.knn.topk import (
    EXTRA_CANDIDATES,
    default_device,
    exact_topk,
    rerank_candidates,
    topk_blocks,
)
from layerbase.analysis.resolve import get_dataset, get_model, ingested_layers, parse_layers
from layerbase.analysis.vectors import layer_vectors
from layerbase.warehouse.copy import copy_column_blocks
from layerbase.warehouse.engine import Warehouse, analyze, pgvector_version, raw_connection
from layerbase.warehouse.errors import InputError
from layerbase.warehouse.models import KnnRun
from layerbase.warehouse.parallel import default_workers
from layerbase.warehouse.storage import STORAGES, Storage

ENGINES = ("blas", "sql", *METHODS)
EXACT_ENGINES = ("blas", "sql")
K_MAX_DEFAULT = 100
MIN_RECALL_DEFAULT = 0.99
log = logging.getLogger(__name__)


# Whether activation or prompt has not been analyzed since the newest ingest job changed.
STATISTICS_STALE = """
SELECT count(*) < 2 OR bool_or(coalesce(greatest(s.last_analyze, s.last_autoanalyze), '-infinity') < j.latest)
FROM pg_stat_user_tables s, (SELECT coalesce(max(updated_at), '-infinity') AS latest FROM ingest_job) j
WHERE s.relname IN ('activation', 'prompt') AND s.schemaname = current_schema()
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
    search: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


# k-NN sets and affinity matrices are derived data: a commit need not wait for its WAL to
# reach the disk (15 ms of a 125 ms k-NN layer at n = 2048). An OS crash can lose the last
# such commits, never half of one; re-running the command recomputes what was lost.
DERIVED_DATA_COMMIT = "SET LOCAL synchronous_commit = off"


def lock_key(*parts: object) -> int:
    """A stable 63-bit advisory-lock key for a target."""
    return zlib.crc32("|".join(map(str, parts)).encode()) | (1 << 40)


def materialize(
    wh: Warehouse,
    model_name: str,
    dataset_name: str,
    *,
    layers: str | list[int] | None = None,
    k_max: int | None = None,
    engine: str = "blas",
    ef_search: int | None = None,
    probes: int | None = None,
    m: int | None = None,
    ef_construction: int | None = None,
    lists: int | None = None,
    min_recall: float = MIN_RECALL_DEFAULT,
    workers: int | None = None,
    force: bool = False,
    recall_queries: int = 200,
    device: str | None = None,
    progress: bool = True,
) -> list[KnnResult]:
    """Compute and store k-NN sets for each layer (reusing stored ones with k_max >= asked).
    ``k_max`` defaults to K_MAX_DEFAULT, or to n - 1 on a dataset of fewer prompts (logged).

    ``m`` and ``ef_construction`` (hnsw) or ``lists`` (ivfflat) build the layer's index; an
    existing index with other parameters is rebuilt, and a stored run reused only if its
    index was built with them. Without them an existing index is used as it is."""
    from tqdm.auto import tqdm

    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if not 0 <= min_recall <= 1:
        raise InputError(f"--min-recall {min_recall} must be between 0 and 1")
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers} must be at least 1")
    with Session(wh.engine) as session:
        model = get_model(session, model_name)
        dataset = get_dataset(session, dataset_name)
        available = ingested_layers(session, model, dataset)
        chosen = layers if isinstance(layers, list) else parse_layers(layers, available)
        model_id, width, dataset_id, n = model.id, model.width, dataset.id, dataset.n_prompts
        storage = STORAGES[model.storage]
    if k_max is None:
        k_max = min(K_MAX_DEFAULT, n - 1)
        if k_max < K_MAX_DEFAULT:
            log.warning(
                "%r has %d prompts, so each keeps its %d nearest (the default --k-max is %d)",
                dataset_name,
                n,
                k_max,
                K_MAX_DEFAULT,
            )
    if not 0 < k_max < n:
        raise InputError(f"k = {k_max} needs 0 < k < the number of prompts ({n}) in {dataset_name!r}; lower --k-max")
    if n * k_max > MAX_PACKED_SETS:
        raise InputError(
            f"{n} prompts x {k_max} neighbours is more than one run's packed sets can hold ({MAX_PACKED_SETS:,} "
            f"entries, a PostgreSQL value's 1 GB); lower --k-max to {MAX_PACKED_SETS // n} or less"
        )
    needed = ef_search_for(k_max, ef_search)
    if engine == "hnsw" and needed > EF_SEARCH_LIMIT:
        raise InputError(
            f"HNSW ef_search is at most {EF_SEARCH_LIMIT} in pgvector; k_max {k_max} needs {needed}: lower --k-max"
        )
    build = {
        key: value
        for key, value in (("m", m), ("ef_construction", ef_construction), ("lists", lists))
        if value is not None
    }
    if engine in METHODS:
        build_options(engine, n, build)  # refuse bad parameters before any layer is built
    elif build:
        raise InputError(
            f"{', '.join(BUILD_FLAGS[key] for key in build)} {'sets' if len(build) == 1 else 'set'} "
            f"how an index is built, and the {engine} engine uses none; use --engine hnsw (--hnsw-m, "
            "--ef-construction) or ivfflat (--lists)"
        )
    if engine == "blas" and device is None:
        device = default_device()
    if engine != "blas":
        # Fresh rows have no planner statistics; without them the planner may pass the
        # index by, or nest its joins badly (measured: 4x slower at n = 2000). ANALYZE reads
        # a sample of the whole table (0.37 s at 20000 rows), so it runs only when an ingest
        # finished after the last one.
        with wh.engine.connect() as conn:
            stale = conn.execute(sa.text(STATISTICS_STALE)).scalar()
        if stale:
            # In a transaction of its own: on Citus, ANALYZE of a distributed table cannot
            # follow a query that the coordinator executed locally.
            analyze(wh, "activation", "prompt")
    job = _Job(
        wh,
        model_name,
        dataset_name,
        model_id,
        dataset_id,
        width,
        storage,
        n,
        k_max,
        engine,
        ef_search if engine == "hnsw" else probes,
        build,
        min_recall,
        workers or default_workers(),
        recall_queries,
        device,
        progress,
        None if engine == "blas" else dataset_prompt_ids(wh, dataset_id),
    )
    bar = tqdm(
        chosen,
        desc=f"k-NN {model_name} × {dataset_name} ({engine})",
        unit="layer",
        disable=not progress,
        dynamic_ncols=True,
    )
    results = [_materialize_layer(job, layer, force) for layer in bar]
    if not all(r.reused for r in results):
        # The next query over the new sets (an affinity, a lookup) plans with fresh statistics.
        analyze(wh, "knn_run", "knn_neighbor")
    return results


@dataclass(frozen=True)
class _Job:
    """What every layer of one ``materialize`` call shares."""

    wh: Warehouse
    model_name: str
    dataset_name: str
    model_id: int
    dataset_id: int
    width: int
    storage: Storage
    n: int
    k_max: int
    engine: str
    breadth: int | None  # ef_search or probes as asked
    build: dict[str, int]  # index build parameters as asked
    min_recall: float
    workers: int
    recall_queries: int
    device: str | None
    progress: bool
    prompt_ids: np.ndarray | None  # in-database engines: ``dataset_prompt_ids``, read once for all layers


def _materialize_layer(job: _Job, layer: int, force: bool) -> KnnResult:
    wh, engine, n, k_max = job.wh, job.engine, job.n, job.k_max
    plan, index = None, None
    if engine in METHODS:
        with wh.engine.connect() as conn:
            plan = plan_index(
                engine, job.model_id, layer, job.dataset_id, job.width, pgvector_version(conn), job.storage
            )
        index = ensure_index(wh, plan, job.model_id, layer, job.dataset_id, n, job.build)
    with wh.engine.begin() as conn:
        conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(:key)"),
            {"key": lock_key("knn", job.model_id, job.dataset_id, layer, engine)},
        )
        conn.execute(sa.text(DERIVED_DATA_COMMIT))
        existing = conn.execute(
            sa.select(KnnRun).where(
                KnnRun.model_id == job.model_id,
                KnnRun.dataset_id == job.dataset_id,
                KnnRun.layer == layer,
                KnnRun.engine == engine,
            )
        ).first()
        if existing is not None and existing.k_max >= k_max and not force and _built_as_asked(existing, job.build):
            return KnnResult(
                job.model_name,
                job.dataset_name,
                layer,
                engine,
                existing.strategy,
                existing.k_max,
                existing.n_prompts,
                existing.seconds,
                existing.recall,
                reused=True,
                search=existing.search,
            )
        if existing is not None:
            conn.execute(sa.delete(KnnRun).where(KnnRun.id == existing.id))
        started = time.perf_counter()
        strategy = (
            plan.strategy
            if plan
            else {"blas": f"exact, blocked top-k on {job.device or 'cpu'}", "sql": "exact scan in SQL"}[engine]
        )
        recall, search = None, None
        positions, vectors = layer_vectors(conn, job.model_id, layer, job.dataset_id, job.storage)
        _check_complete(positions, n, job.model_name, job.dataset_name, layer)
        blocks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]
        if engine == "blas":
            # Blocks of query rows go to the server as they are computed, so that storing
            # one overlaps computing the next (the write was a third of the time at n = 2048).
            blocks = (
                (positions[start : start + len(idx)], positions[idx], dist)
                for start, idx, dist in topk_blocks(vectors, k_max, device=job.device)
            )
        else:
            found, recall, search = _search_in_db(job, layer, plan, index.options if index else {}, positions, vectors)
            blocks = iter([(positions, found[0], found[1])])
        run_id = conn.execute(
            sa.insert(KnnRun)
            .values(
                model_id=job.model_id,
                dataset_id=job.dataset_id,
                layer=layer,
                k_max=k_max,
                engine=engine,
                strategy=strategy,
                n_prompts=n,
                seconds=0.0,
                ef_search=search.get("ef_search") if search else None,
                search=search,
                device=job.device if engine == "blas" else "database",
            )
            .returning(KnnRun.id)
        ).scalar_one()
        arrays = RunArrays.empty(n, k_max)  # the same sets, packed for reading whole layers
        copy_column_blocks(
            raw_connection(conn).cursor(),
            "knn_neighbor",
            NEIGHBOR_COLUMNS,
            (_neighbor_columns(run_id, *arrays.add(*block)) for block in blocks),
        )
        arrays.store(conn, run_id)
        seconds = time.perf_counter() - started
        conn.execute(
            sa.update(KnnRun)
            .where(KnnRun.id == run_id)
            .values(
                seconds=seconds,
                recall=recall,
                recall_queries=min(job.recall_queries, n) if recall is not None else None,
            )
        )
    return KnnResult(
        job.model_name,
        job.dataset_name,
        layer,
        engine,
        strategy,
        k_max,
        n,
        seconds,
        recall,
        reused=False,
        search=search,
    )


def _built_as_asked(run: sa.Row, asked: dict[str, int]) -> bool:
    """Whether a stored run's index had the build parameters asked (runs stored before they
    were recorded used pgvector's defaults)."""
    return built_with({**BUILD_DEFAULTS.get(run.engine, {}), **(run.search or {})}, asked)


def _search_in_db(
    job: _Job, layer: int, plan: IndexPlan | None, index: dict[str, int], positions: np.ndarray, vectors: np.ndarray
) -> tuple[tuple[np.ndarray, np.ndarray], float | None, dict | None]:
    """((neighbour positions, distances) for every prompt, recall, search record) of the sql or
    an indexed engine. An indexed engine first widens its search on a seeded sample until the
    sample's recall@10 against exact (computed here in memory) reaches ``min_recall``
    (``SampleRecall.reaches``)."""
    n, k = job.n, job.k_max
    prompt_ids = job.prompt_ids
    assert prompt_ids is not None  # read for every in-database engine

    def query(
        rows: np.ndarray, search: Search | None = None, k: int = k, **options: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        return neighbors_in_db(
            job.wh,
            job.model_id,
            layer,
            job.dataset_id,
            job.width,
            prompt_ids,
            positions[rows],
            k,
            plan=plan if search else None,
            search=search,
            workers=job.workers,
            storage=job.storage,
            **options,
        )

    def sample_recall(found: np.ndarray) -> SampleRecall:
        return SampleRecall.of([len(np.intersect1d(f[:rk], e)) / rk for f, e in zip(found, exact)])

    if plan is None:
        # pgvector's float32 ranking finds candidates; float64 orders them (``topk.rerank_exact``),
        # so that the sql and blas engines give identical sets, near ties included.
        wide = min(n - 1, k + EXTRA_CANDIDATES)
        candidates, distances = query(np.arange(n), k=wide, progress=job.progress)
        return rerank_candidates(vectors, candidates, distances, k), None, None
    rk = min(RECALL_K, k)
    sample = np.sort(np.random.default_rng(0).choice(n, size=min(job.recall_queries, n), replace=False))
    exact = positions[exact_topk(vectors, rk, queries=sample)[0]]
    search: Search | None = initial_search(plan, k, n, job.breadth, index.get("lists"))
    tried = []
    while search is not None:
        sample_found = query(sample, search, fill_exactly=False)
        recall = sample_recall(sample_found[0])
        tried.append({**search.as_dict(), **recall.as_dict()})
        if recall.reaches(job.min_recall) or (wider := search.wider(plan.rough_order, n)) is None:
            break
        search = wider
    assert search is not None
    # The sample's prompts are spread over the data, so they serve as anchors of the regions.
    rest = by_locality(vectors, sample, np.setdiff1d(np.arange(n), sample))
    idx = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float32)
    idx[rest], dist[rest] = query(rest, search, progress=job.progress)
    # The sample's rows were computed with the final setting: keep them, filling short ones exactly.
    short = np.nonzero((sample_found[0] < 0).any(axis=1))[0]
    if len(short):
        sample_found[0][short], sample_found[1][short] = query(sample[short])
    idx[sample], dist[sample] = sample_found
    record = {
        "method": plan.method,
        **index,
        **search.as_dict(),
        "min_recall": job.min_recall,
        "workers": job.workers,
        "recall_k": rk,
        "tried": tried,
    }
    if plan.method == "hnsw" and k == rk and plan.lookup_candidates(rk) == tried[0]["candidates"]:
        # The run's own tuning searched as a lookup of k would, from the same ef_search.
        record["lookup"] = {**tried[-1], "queries": len(sample), "k": rk, "tried": tried}
    elif plan.method == "hnsw":
        record["lookup"] = calibrate_lookups(
            plan,
            search,
            rk,
            n,
            len(sample),
            job.min_recall,
            lambda s: sample_recall(query(sample, s, k=rk, fill_exactly=False)[0]),
        )
    return (idx, dist), tried[-1]["recall"], record


def _check_complete(positions: np.ndarray, n: int, model: str, dataset: str, layer: int) -> None:
    if len(positions) != n:
        raise InputError(
            f"{model} × {dataset} layer {layer} has {len(positions)} of {n} activations stored; "
            "finish the ingest (re-run `layerbase ingest`) first"
        )


NEIGHBOR_COLUMNS = ("run_id", "position", "neighbors", "distances")


def _neighbor_columns(
    run_id: int, positions: np.ndarray, neighbor_positions: np.ndarray, distances: np.ndarray
) -> list[tuple[str, np.ndarray]]:
    return [
        ("int4", np.full(len(positions), run_id, dtype=np.int32)),
        ("int4", positions.astype(np.int32)),
        ("int4[]", neighbor_positions.astype(np.int32)),
        ("float4[]", distances.astype(np.float32)),
    ]


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
