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

import math
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.orm import Session

from analysis.vector_index import (
    BUILD_DEFAULTS, BUILD_FLAGS, EF_SEARCH_LIMIT, METHODS, USE_INDEX, IndexPlan, build_options, built_with,
    ef_search_for, ensure_index, ivfflat_lists, plan_index,
)
from analysis.resolve import get_dataset, get_model, ingested_layers, parse_layers
from analysis.topk import DISTANCE_DECIMALS, default_device, exact_topk, topk_blocks
from analysis.vectors import layer_vectors
from warehouse.copy import copy_column_blocks
from warehouse.engine import Warehouse, pgvector_version, raw_connection
from warehouse.errors import InputError
from warehouse.parallel import default_workers, run_in_parallel
from warehouse.models import KnnRun
from warehouse.storage import STORAGES, Storage

ENGINES = ("blas", "sql", *METHODS)
EXACT_ENGINES = ("blas", "sql")
K_MAX_DEFAULT = 100
RECALL_K = 10
MIN_RECALL_DEFAULT = 0.99
QUERY_BLOCK = 128  # prompts per in-database statement

# One statement ranks the neighbours of a block of query prompts. The inner scan takes
# {candidates} candidates (self is among them) ordered by {order}: the exact ``vec <=> q``
# for the sql engine, or the indexed expression (so that the planner uses the partial
# index). Candidates are then ranked by exact distance, ties by prompt id, and the first k
# returned as arrays. Prompt ids grow with position within a dataset, so ties break by
# position as in the blas engine; ids are mapped to positions by the caller, which keeps
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
    SELECT cand.prompt_id AS neighbor_id, round((cand.vec <=> q.vec)::numeric, {decimals})::real AS distance
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


# Whether activation or prompt has not been analyzed since the newest ingest job changed.
STATISTICS_STALE = """
SELECT count(*) < 2 OR bool_or(coalesce(greatest(s.last_analyze, s.last_autoanalyze), '-infinity') < j.latest)
FROM pg_stat_user_tables s, (SELECT coalesce(max(updated_at), '-infinity') AS latest FROM ingest_job) j
WHERE s.relname IN ('activation', 'prompt') AND s.schemaname = current_schema()
"""


# A tuning step costs 200 sample queries, 2 % of a 10000-prompt run, while a setting wider
# than needed costs every query of the run and every later lookup: ef_search grows by
# half a step rather than doubling (from 22, doubling tuned lookups at n = 100000 to 88
# where 44 fell just short, 5.0 ms a lookup). IVFFlat's probes still double: from lists/20
# the steps are few and coarse either way.
EF_SEARCH_GROWTH = 1.5


@dataclass(frozen=True)
class Search:
    """How widely an indexed engine searches: ``breadth`` is hnsw.ef_search or ivfflat.probes
    (at most ``limit``), and each query takes ``candidates`` rows from the index (self
    included) before the exact re-rank."""

    method: str
    breadth: int
    limit: int
    candidates: int

    def settings(self) -> list[sql.Composable]:
        """The statements that make a transaction search this way, through the index."""
        name = "hnsw.ef_search" if self.method == "hnsw" else "ivfflat.probes"
        return [sql.SQL("SET LOCAL {} = {}").format(sql.SQL(name), sql.Literal(self.breadth)), *USE_INDEX]

    def wider(self, rough_order: bool, n: int) -> Search | None:
        """The next setting to try: the next breadth (``next_breadth``), and for an index
        that orders only roughly (a prefix) twice the candidates; None when nothing can grow."""
        # An HNSW scan returns at most ef_search rows, so more candidates than that are moot.
        # Each candidate costs a row fetch and its distances (9 us at width 2048, pgvector
        # 0.8.5), so they grow only where the index order is the cause of missed neighbours.
        cap = min(n, self.limit) if self.method == "hnsw" else n
        candidates = min(cap, self.candidates * 2) if rough_order else self.candidates
        breadth = min(self.limit, max(self.next_breadth(), candidates if self.method == "hnsw" else 0))
        if (breadth, candidates) == (self.breadth, self.candidates):
            return None
        return replace(self, breadth=breadth, candidates=candidates)

    def next_breadth(self) -> int:
        """ef_search grows by half (``EF_SEARCH_GROWTH``), probes double."""
        return math.ceil(self.breadth * EF_SEARCH_GROWTH) if self.method == "hnsw" else self.breadth * 2

    def as_dict(self) -> dict:
        key = "ef_search" if self.method == "hnsw" else "probes"
        return {key: self.breadth, "candidates": self.candidates}


def initial_search(plan: IndexPlan, k: int, n: int, asked: int | None, lists: int | None = None) -> Search:
    """The narrowest search worth trying: k + 1 candidates (twice that for a reduced index),
    ef_search as ``ef_search_for`` gives it (2(k + 1) unless asked), or probes = lists / 20
    (``lists``: the IVFFlat index's, by default ``ivfflat_lists(n)``).

    HNSW starts below pgvector's default ef_search of 40: the recall tuning widens it where
    needed, and where 22 reaches the recall asked for k = 10 it saves a third of the
    search (measured on 10000 activation-like vectors of width 576: 22 gave a sample recall
    bound of 0.993-0.996, and the whole run took 4.2 s instead of 5.0 s on pgvector 0.6.2,
    3.2-3.3 s instead of 3.8-3.9 s on 0.8.5)."""
    candidates = min(n, (k + 1) * (2 if plan.reduced else 1))
    if plan.method == "hnsw":
        breadth = min(EF_SEARCH_LIMIT, max(candidates, ef_search_for(k, asked)))
        return Search(plan.method, breadth, EF_SEARCH_LIMIT, candidates)
    lists = lists or ivfflat_lists(n)
    return Search(plan.method, min(lists, asked or max(1, lists // 20)), lists, candidates)


def describe_search(search: dict | None) -> str:
    """A stored search record in a few words: the index's build parameters and the search,
    e.g. 'm 16, ef_construction 64, ef_search 22, candidates 11'."""
    keys = ("m", "ef_construction", "lists", "probes", "ef_search", "candidates")
    return ", ".join(f"{key} {search[key]}" for key in keys if key in (search or {}))


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
    k_max: int = K_MAX_DEFAULT,
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

    ``m`` and ``ef_construction`` (hnsw) or ``lists`` (ivfflat) build the layer's index; an
    existing index with other parameters is rebuilt, and a stored run reused only if its
    index was built with them. Without them an existing index is used as it is."""
    from tqdm import tqdm

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
    if not 0 < k_max < n:
        raise InputError(
            f"k = {k_max} needs 0 < k < the number of prompts ({n}) in {dataset_name!r}; lower --k-max"
        )
    needed = ef_search_for(k_max, ef_search)
    if engine == "hnsw" and needed > EF_SEARCH_LIMIT:
        raise InputError(f"HNSW ef_search is at most {EF_SEARCH_LIMIT} in pgvector; k_max {k_max} needs {needed}: "
                         "lower --k-max")
    build = {key: value for key, value in (("m", m), ("ef_construction", ef_construction), ("lists", lists))
             if value is not None}
    if engine in METHODS:
        build_options(engine, n, build)  # refuse bad parameters before any layer is built
    elif build:
        raise InputError(f"{', '.join(BUILD_FLAGS[key] for key in build)} {'sets' if len(build) == 1 else 'set'} "
                         f"how an index is built, and the {engine} engine uses none; use --engine hnsw (--hnsw-m, "
                         "--ef-construction) or ivfflat (--lists)")
    if engine == "blas" and device is None:
        device = default_device()
    if engine != "blas":
        # Fresh rows have no planner statistics; without them the planner may pass the
        # index by, or nest its joins badly (measured: 4x slower at n = 2000). ANALYZE reads
        # a sample of the whole table (0.37 s at 20000 rows), so it runs only when an ingest
        # finished after the last one.
        with wh.engine.begin() as conn:
            if conn.execute(sa.text(STATISTICS_STALE)).scalar():
                conn.execute(sa.text("ANALYZE activation, prompt"))
    job = _Job(wh, model_name, dataset_name, model_id, dataset_id, width, storage, n, k_max, engine,
               ef_search if engine == "hnsw" else probes, build, min_recall, workers or default_workers(),
               recall_queries, device, progress, None if engine == "blas" else dataset_prompt_ids(wh, dataset_id))
    bar = tqdm(chosen, desc=f"k-NN {model_name} × {dataset_name} ({engine})", unit="layer", disable=not progress,
               dynamic_ncols=True)
    return [_materialize_layer(job, layer, force) for layer in bar]


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
            plan = plan_index(engine, job.model_id, layer, job.dataset_id, job.width, pgvector_version(conn),
                              job.storage)
        index = ensure_index(wh, plan, job.model_id, layer, job.dataset_id, n, job.build)
    with wh.engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"),
                     {"key": lock_key("knn", job.model_id, job.dataset_id, layer, engine)})
        conn.execute(sa.text(DERIVED_DATA_COMMIT))
        existing = conn.execute(
            sa.select(KnnRun).where(KnnRun.model_id == job.model_id, KnnRun.dataset_id == job.dataset_id,
                                    KnnRun.layer == layer, KnnRun.engine == engine)
        ).first()
        if existing is not None and existing.k_max >= k_max and not force and _built_as_asked(existing, job.build):
            return KnnResult(job.model_name, job.dataset_name, layer, engine, existing.strategy, existing.k_max,
                             existing.n_prompts, existing.seconds, existing.recall, reused=True,
                             search=existing.search)
        if existing is not None:
            conn.execute(sa.delete(KnnRun).where(KnnRun.id == existing.id))
        started = time.perf_counter()
        strategy = plan.strategy if plan else {"blas": f"exact, blocked top-k on {job.device or 'cpu'}",
                                               "sql": "exact scan in SQL"}[engine]
        recall, search = None, None
        positions, vectors = layer_vectors(conn, job.model_id, layer, job.dataset_id, job.storage)
        _check_complete(positions, n, job.model_name, job.dataset_name, layer)
        if engine == "blas":
            # Blocks of query rows go to the server as they are computed, so that storing
            # one overlaps computing the next (the write was a third of the time at n = 2048).
            blocks = ((positions[start:start + len(idx)], positions[idx], dist)
                      for start, idx, dist in topk_blocks(vectors, k_max, device=job.device))
        else:
            found, recall, search = _search_in_db(job, layer, plan, index.options if index else {}, positions,
                                                  vectors)
            blocks = iter([(positions, found[0], found[1])])
        run_id = conn.execute(
            sa.insert(KnnRun).values(model_id=job.model_id, dataset_id=job.dataset_id, layer=layer, k_max=k_max,
                                     engine=engine, strategy=strategy, n_prompts=n, seconds=0.0,
                                     ef_search=search.get("ef_search") if search else None, search=search,
                                     device=job.device if engine == "blas" else "database")
            .returning(KnnRun.id)
        ).scalar_one()
        copy_column_blocks(raw_connection(conn).cursor(), "knn_neighbor", NEIGHBOR_COLUMNS,
                           (_neighbor_columns(run_id, *block) for block in blocks))
        seconds = time.perf_counter() - started
        conn.execute(sa.update(KnnRun).where(KnnRun.id == run_id).values(
            seconds=seconds, recall=recall,
            recall_queries=min(job.recall_queries, n) if recall is not None else None))
    return KnnResult(job.model_name, job.dataset_name, layer, engine, strategy, k_max, n, seconds, recall,
                     reused=False, search=search)


def _built_as_asked(run: sa.Row, asked: dict[str, int]) -> bool:
    """Whether a stored run's index had the build parameters asked (runs stored before they
    were recorded used pgvector's defaults)."""
    return built_with({**BUILD_DEFAULTS.get(run.engine, {}), **(run.search or {})}, asked)


def _search_in_db(job: _Job, layer: int, plan: IndexPlan | None, index: dict[str, int], positions: np.ndarray,
                  vectors: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], float | None, dict | None]:
    """((neighbour positions, distances) for every prompt, recall, search record) of the sql or
    an indexed engine. An indexed engine first widens its search on a seeded sample until the
    sample's recall@10 against exact (computed here in memory) reaches ``min_recall``
    (``SampleRecall.reaches``)."""
    n, k = job.n, job.k_max

    def query(rows: np.ndarray, search: Search | None = None, k: int = k,
              **options: bool) -> tuple[np.ndarray, np.ndarray]:
        return neighbors_in_db(job.wh, job.model_id, layer, job.dataset_id, job.width, job.prompt_ids,
                               positions[rows], k, plan=plan if search else None, search=search, workers=job.workers,
                               storage=job.storage, **options)

    def sample_recall(found: np.ndarray) -> SampleRecall:
        return SampleRecall.of([len(np.intersect1d(f[:rk], e)) / rk for f, e in zip(found, exact)])

    if plan is None:
        return query(np.arange(n), progress=job.progress), None, None
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
    rest = np.setdiff1d(np.arange(n), sample)
    idx = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float32)
    idx[rest], dist[rest] = query(rest, search, progress=job.progress)
    # The sample's rows were computed with the final setting: keep them, filling short ones exactly.
    short = np.nonzero((sample_found[0] < 0).any(axis=1))[0]
    if len(short):
        sample_found[0][short], sample_found[1][short] = query(sample[short])
    idx[sample], dist[sample] = sample_found
    record = {"method": plan.method, **index, **search.as_dict(), "min_recall": job.min_recall,
              "workers": job.workers, "recall_k": rk, "tried": tried}
    if plan.method == "hnsw" and k == rk and plan.lookup_candidates(rk) == tried[0]["candidates"]:
        # The run's own tuning searched as a lookup of k would, from the same ef_search.
        record["lookup"] = {**tried[-1], "queries": len(sample), "k": rk, "tried": tried}
    elif plan.method == "hnsw":
        record["lookup"] = _calibrate_lookups(plan, search, rk, n, len(sample), job.min_recall,
                                              lambda s: sample_recall(query(sample, s, k=rk, fill_exactly=False)[0]))
    return (idx, dist), tried[-1]["recall"], record


# A setting is accepted when the sample's recall is at least the target with 95 %
# confidence (one-sided normal bound), not just on average: the smallest setting whose
# sample mean passes tends to fall short on the other prompts (measured on activation-like
# data: IVFFlat at 10 probes, 0.990 on the sample and 0.985 on all 10000 prompts).
RECALL_CONFIDENCE_Z = 1.645


@dataclass(frozen=True)
class SampleRecall:
    """recall@k on the tuning sample: the mean over its prompts and a lower confidence bound."""

    mean: float
    low: float

    @classmethod
    def of(cls, per_prompt: list[float]) -> SampleRecall:
        values = np.asarray(per_prompt, dtype=np.float64)
        se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
        return cls(float(values.mean()), float(values.mean() - RECALL_CONFIDENCE_Z * se))

    def reaches(self, target: float) -> bool:
        return self.low >= target

    def as_dict(self) -> dict:
        return {"recall": round(self.mean, 4), "recall_low": round(self.low, 4)}


def _calibrate_lookups(plan: IndexPlan, tuned: Search, k: int, n: int, queries: int, min_recall: float,
                       recall_of: Callable[[Search], SampleRecall]) -> dict:
    """The smallest ef_search (from ``ef_search_for(k)``, widening as ``Search.wider``) whose
    lookups of k neighbours reach ``min_recall`` on the sample; ``layerbase neighbors`` uses
    it for this layer. The k-NN run's own setting is tuned for its K_max, which needs a
    wider search than a lookup of 10 (measured at n = 100000: 5.5 ms a lookup at ef_search
    200, 4.7 ms at 75 with recall@10 0.998). At most the k-NN run's ef_search, whose recall
    is known, or the lookup's own candidates where those are more."""
    candidates = plan.lookup_candidates(k)
    start = max(min(ef_search_for(k), tuned.breadth), candidates)
    search: Search | None = Search("hnsw", start, max(tuned.breadth, candidates), candidates)
    tried = []
    while search is not None:
        recall = recall_of(search)
        tried.append({"ef_search": search.breadth, **recall.as_dict()})
        if recall.reaches(min_recall):
            break
        search = search.wider(rough_order=False, n=n)  # a lookup's candidates stay as they are
    return {**tried[-1], "queries": queries, "k": k, "tried": tried}


def dataset_prompt_ids(wh: Warehouse, dataset_id: int) -> np.ndarray:
    """The dataset's prompt ids in position order (index i holds position i's id; ids grow
    with position, so the array is sorted)."""
    with wh.engine.connect() as conn:
        return np.array(conn.execute(sa.text(PROMPT_IDS), {"dataset": dataset_id}).scalars().all(), dtype=np.int64)


def neighbors_in_db(wh: Warehouse, model_id: int, layer: int, dataset_id: int, width: int,
                    prompt_ids: np.ndarray, query_positions: np.ndarray, k: int, *, storage: Storage,
                    plan: IndexPlan | None = None, search: Search | None = None, workers: int = 1,
                    progress: bool = False, fill_exactly: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(neighbour positions [q, k], distances [q, k]) of the query prompts, ranked in SQL.

    Without a plan each query scans exactly; with one, it takes ``search.candidates`` rows in
    index order and re-ranks them exactly. Blocks of queries run on ``workers`` connections at
    once. ``storage`` is the model's (``warehouse.storage``). An index can return fewer than k
    other rows (a narrow IVFFlat probe of a small dataset); those rows are -1 and, with
    ``fill_exactly``, answered again by an exact scan.
    """
    from tqdm import tqdm

    query_positions = np.asarray(query_positions)
    assert plan is None or plan.storage == storage
    column = sql.Identifier(storage.column)
    if plan is None:
        order = sql.SQL("a2.{} <=> q.vec, a2.prompt_id").format(column)  # ties by prompt id, that is by position
        candidates = k + 1
    else:
        assert search is not None
        order = plan.distance(sql.SQL("a2.{}").format(column), sql.SQL("q.vec"))
        candidates = search.candidates
    blocks = [query_positions[i:i + QUERY_BLOCK] for i in range(0, len(query_positions), QUERY_BLOCK)]
    bar = tqdm(total=len(query_positions), desc=f"layer {layer}", unit="prompt", leave=False, disable=not progress,
               dynamic_ncols=True)

    def run(cur: psycopg.Cursor, block: np.ndarray) -> list[tuple]:
        cur.execute(sql.SQL(NEIGHBOURS_SQL).format(
            model=sql.Literal(model_id), layer=sql.Literal(layer), dataset=sql.Literal(dataset_id),
            column=column, cast=sql.SQL(storage.cast(int(width))),
            ids=sql.SQL("{}::bigint[]").format(sql.Literal([int(i) for i in prompt_ids[block]])),
            order=order, candidates=sql.Literal(candidates), k=sql.Literal(k), decimals=sql.Literal(DISTANCE_DECIMALS),
        ))
        rows = cur.fetchall()
        bar.update(len(block))
        return rows

    settings = search.settings() if search is not None else []
    results = {prompt_id: (neighbors, distances)
               for rows in run_in_parallel(wh, blocks, run, workers=workers, settings=settings)
               for prompt_id, neighbors, distances in rows}
    bar.close()
    idx = np.full((len(query_positions), k), -1, dtype=np.int64)
    dist = np.full((len(query_positions), k), np.inf, dtype=np.float32)
    for row, position in enumerate(query_positions):
        neighbors, distances = results.get(int(prompt_ids[position]), ([], []))
        idx[row, :len(neighbors)] = np.searchsorted(prompt_ids, neighbors)
        dist[row, :len(distances)] = distances
    short = np.nonzero((idx < 0).any(axis=1))[0]
    if fill_exactly and plan is not None and len(short):
        idx[short], dist[short] = neighbors_in_db(wh, model_id, layer, dataset_id, width, prompt_ids,
                                                  query_positions[short], k, workers=workers, storage=storage)
    return idx, dist


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
