"""Ad-hoc neighbour lookups: the k nearest prompts of a stored prompt or of a new text at
(model, layer, dataset), and the overlap of two such sets (the paper's Venn figures).

A stored prompt is answered from a stored exact k-NN set of that (model, layer, dataset)
when one holds at least k neighbours: a primary-key read, exact (1.3 ms at n = 100000).
Other lookups (a new text, or no such set) use the partial HNSW index when one exists, and
an exact scan otherwise. The answer says which path it took.

A lookup may be limited to some prompts of the dataset (``PromptFilter``: a substring of the
text, a LIKE pattern on the source). The stored sets then cannot answer, and an HNSW scan
returns at most ef_search rows before the filter drops most of them; on pgvector >= 0.8
the scan is iterative (``hnsw.iterative_scan``), so it walks on until enough rows pass. When
it still finds fewer than k (a very selective filter, or an older pgvector), an exact scan
answers instead, and the path says so.

Distances are ordered in double precision; equal distances go by position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.orm import Session

from layerbase.analysis.knn.index import EF_SEARCH_LIMIT, ef_search_for, index_name, plan_index
from layerbase.analysis.knn.materialize import EXACT_ENGINES, RECALL_K
from layerbase.analysis.knn.search import Search
from layerbase.analysis.resolve import get_dataset, get_model, ingested_layers
from layerbase.warehouse.engine import Warehouse, raw_connection, version_tuple
from layerbase.warehouse.errors import InputError
from layerbase.warehouse.storage import HALF_MAX, STORAGES, Storage

if TYPE_CHECKING:
    import psycopg

    from layerbase.ingest.model_cache import ModelCache
    from layerbase.warehouse.models import Model

LOOKUP_SQL = """
SELECT p.position, p.text, c.vec <=> {query} AS distance
FROM (
    SELECT a.prompt_id, a.{column} AS vec FROM activation a {only}
    WHERE a.model_id = {model} AND a.layer = {layer} AND a.dataset_id = {dataset}
    ORDER BY {order}
    LIMIT {limit}
) c
JOIN prompt p ON p.id = c.prompt_id
WHERE {exclude}
ORDER BY distance, p.position
LIMIT {k}
"""
# A stored exact set's neighbours of the query prompt, read by primary key and unnested in
# rank order: no distance is computed.
STORED_SET_SQL = """
SELECT s.neighbor_position, p.text, s.distance
FROM knn_neighbor n
CROSS JOIN LATERAL unnest(n.neighbors[1:{k}], n.distances[1:{k}]) WITH ORDINALITY
    AS s(neighbor_position, distance, rank)
JOIN prompt p ON p.dataset_id = {dataset} AND p.position = s.neighbor_position
WHERE n.run_id = {run} AND n.position = {position}
ORDER BY s.rank
"""
# ef_search for lookups on a layer whose HNSW run stored no tuned value: on 100000
# clustered synthetic vectors of width 576 (isotropic noise, the hard case), 100 gave
# recall@10 0.958 and 200 gave 0.967-0.983 (bench/lookup.py).
LOOKUP_EF_SEARCH = 200
# pgvector >= 0.8 continues a filtered HNSW scan past ef_search (iterative index scans). The
# relaxed order may return candidates slightly out of order; LOOKUP_SQL re-ranks them by
# exact distance, as pgvector's documentation advises. The scan stops after
# hnsw.max_scan_tuples (20000 by default) visited rows.
ITERATIVE_SCAN = (0, 8, 0)


@dataclass(frozen=True)
class PromptFilter:
    """Which prompts of the dataset a lookup may answer with: those whose text contains
    ``text`` (case-insensitive) and whose source matches the LIKE pattern ``source``
    (e.g. ``sports/%`` for one folder of the BBC news corpus)."""

    text: str | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if self.text == "" or self.source == "":
            raise InputError("an empty filter matches every prompt; leave it out, or give a text or pattern")

    def __bool__(self) -> bool:
        return self.text is not None or self.source is not None

    def join(self) -> sql.Composable:
        """The join that keeps the prompts that pass, on the inner scan of ``activation a``."""
        if not self:
            return sql.SQL("")
        tests: list[sql.Composable] = [sql.SQL("f.id = a.prompt_id")]
        if self.text is not None:
            tests.append(sql.SQL("strpos(lower(f.text), lower({})) > 0").format(sql.Literal(self.text)))
        if self.source is not None:
            tests.append(sql.SQL("f.source_ref LIKE {}").format(sql.Literal(self.source)))
        return sql.SQL("JOIN prompt f ON ") + sql.SQL(" AND ").join(tests)

    def describe(self) -> str:
        parts = ([f"text contains {self.text!r}"] if self.text is not None else []) + (
            [f"source LIKE {self.source!r}"] if self.source is not None else []
        )
        return " and ".join(parts)


@dataclass
class Neighbors:
    """The answer to one lookup."""

    model: str
    layer: int
    dataset: str
    query: str  # "prompt 12: <text>" or "text: <text>"
    path: str  # which path answered
    rows: list[dict]  # position, text, distance
    only: PromptFilter = PromptFilter()

    @property
    def positions(self) -> list[int]:
        return [r["position"] for r in self.rows]


# Everything a lookup needs to know, in one round trip (a lookup takes milliseconds, and
# each extra statement cost about 0.2 ms): the ids and sizes, the query prompt's text, the
# stored exact k-NN set with the most neighbours (k_max >= k), whether the layer's HNSW
# index exists, and the ef_search that `layerbase knn --engine hnsw` tuned for lookups of
# 10 (``knn.calibrate_lookups``) with its recall. No row when a piece is missing: the
# slow path below then finds which one and says what to run.
LOOKUP_META = """
SELECT m.id, m.width, m.storage, d.id, d.n_prompts, j.include_layer0, m.n_layers, e.extversion,
       (SELECT p.text FROM prompt p WHERE p.dataset_id = d.id AND p.position = :position),
       s.id, s.engine, to_regclass(format(:index_name, m.id, d.id)) IS NOT NULL, t.ef_search, t.recall, t.queries
FROM model m
JOIN dataset d ON d.name = :dataset
JOIN ingest_job j ON j.model_id = m.id AND j.dataset_id = d.id AND j.state = 'done'
CROSS JOIN pg_extension e
LEFT JOIN LATERAL (
    SELECT r.id, r.engine FROM knn_run r
    WHERE r.model_id = m.id AND r.dataset_id = d.id AND r.layer = :layer AND r.k_max >= :k
      AND r.engine = ANY(:exact_engines)
    ORDER BY r.k_max DESC, r.id DESC
    LIMIT 1
) s ON true
LEFT JOIN LATERAL (
    SELECT (r.search->'lookup'->>'ef_search')::int AS ef_search, (r.search->'lookup'->>'recall')::real AS recall,
           (r.search->'lookup'->>'queries')::int AS queries
    FROM knn_run r
    WHERE r.model_id = m.id AND r.dataset_id = d.id AND r.layer = :layer AND r.engine = 'hnsw'
      AND r.search ? 'lookup'
    ORDER BY r.id DESC
    LIMIT 1
) t ON true
WHERE m.name = :model AND e.extname = 'vector'
"""
# The query prompt's own vector is read inside the lookup statement, so that a stored
# prompt costs one statement: an InitPlan the index scan takes as its ordering key. The
# prompt's id comes first, so that the vector is one read of the primary key whatever the
# planner's statistics say (as a join, with statistics that had not caught up with an
# ingest, it read all 100000 rows of the layer: 349 ms a lookup instead of 4 ms).
STORED_QUERY = """(
    SELECT a.{column} FROM activation a
    WHERE a.model_id = {model} AND a.layer = {layer} AND a.dataset_id = {dataset}
      AND a.prompt_id = (SELECT p.id FROM prompt p WHERE p.dataset_id = {dataset} AND p.position = {position})
)"""


@dataclass(frozen=True)
class _Target:
    """What LOOKUP_META found for one lookup."""

    model_id: int
    width: int
    storage: Storage
    dataset_id: int
    dataset_name: str
    n_prompts: int
    pgvector: str | None
    prompt_text: str | None
    exact_run: tuple[int, str] | None  # (run id, engine) of a stored exact set with >= k neighbours
    indexed: bool  # the layer has its HNSW index
    tuned: tuple[int, float, int] | None  # (ef_search, recall@10, sample size) tuned for lookups


def _target(
    conn: sa.Connection, model_name: str, dataset_name: str, layer: int, k: int, position: int | None
) -> _Target:
    """The lookup's target, or the error that explains what is missing."""
    row = conn.execute(
        sa.text(LOOKUP_META),
        {
            "model": model_name,
            "dataset": dataset_name,
            "layer": layer,
            "k": k,
            "position": position,
            "exact_engines": list(EXACT_ENGINES),
            # A format() template for the SQL: the two ids are filled in there.
            "index_name": index_name("hnsw", "%s", layer, "%s"),  # type: ignore[arg-type]
        },
    ).first()
    if row is None:
        with Session(bind=conn) as session:
            model = get_model(session, model_name)
            dataset = get_dataset(session, dataset_name)
            ingested_layers(session, model, dataset)  # raises: not (fully) ingested
        raise InputError(f"model {model_name!r} cannot be looked up on {dataset_name!r}")  # pragma: no cover
    (
        model_id,
        width,
        storage,
        dataset_id,
        n_prompts,
        layer0,
        n_layers,
        version,
        text,
        run_id,
        engine,
        indexed,
        *tuned,
    ) = row
    layers = ([0] if layer0 else []) + list(range(1, n_layers + 1))
    if layer not in layers:
        raise InputError(f"layer {layer} is not stored for {model_name}; stored layers are {layers[0]}..{layers[-1]}")
    if not 0 < k < n_prompts:
        raise InputError(f"k = {k} needs 0 < k < the number of prompts ({n_prompts})")
    if position is not None and not 0 <= position < n_prompts:
        raise InputError(f"--prompt {position} is outside {dataset_name!r} (positions 0..{n_prompts - 1})")
    return _Target(
        model_id,
        width,
        STORAGES[storage],
        dataset_id,
        dataset_name,
        n_prompts,
        version,
        text,
        (run_id, engine) if run_id is not None else None,
        bool(indexed),
        (int(tuned[0]), float(tuned[1]), int(tuned[2])) if tuned[0] is not None else None,
    )


def nearest(
    wh: Warehouse,
    model_name: str,
    layer: int,
    dataset_name: str,
    *,
    position: int | None = None,
    text: str | None = None,
    k: int = 10,
    ef_search: int | None = None,
    exact: bool = False,
    only: PromptFilter = PromptFilter(),
    models: ModelCache | None = None,
) -> Neighbors:
    """The k nearest prompts (self excluded for a stored prompt) of a prompt or a new text,
    among the prompts that pass ``only`` (all by default)."""
    if (position is None) == (text is None):
        raise InputError("give exactly one of --prompt POSITION or --text TEXT")
    if text is not None and not text.strip():
        raise InputError("the text to look up is empty; give a text")
    # A stored prompt is answered in one connection and one transaction: a lookup takes
    # milliseconds, so round trips show. A new text is embedded between two transactions,
    # so that no transaction stays open while a model loads.
    with wh.engine.begin() as conn:
        target = _target(conn, model_name, dataset_name, layer, k, position)
        if position is not None:
            query = sql.SQL(STORED_QUERY).format(
                column=sql.Identifier(target.storage.column),
                model=sql.Literal(target.model_id),
                layer=sql.Literal(layer),
                dataset=sql.Literal(target.dataset_id),
                position=sql.Literal(position),
            )
            path, rows = (
                _stored_set(conn, target, position, k)
                if target.exact_run and not only
                else _lookup(conn, target, layer, query, position, k, ef_search, exact, only)
            )
            query_text = f"prompt {position}: {target.prompt_text}"
            return Neighbors(model_name, layer, dataset_name, query_text, path, rows, only)
        with Session(bind=conn) as session:
            model = get_model(session, model_name)
            session.expunge(model)
    assert text is not None  # exactly one of position and text, checked above
    vector = _embed_text(model, layer, text, models)
    if target.storage.encode(vector[None])[1] is not None:
        raise InputError(
            f"the text's activation at layer {layer} exceeds float16's range ({HALF_MAX:.0f}), in which "
            f"{model_name} is stored; it has no neighbours there"
        )
    query = sql.SQL("{}::{}").format(
        sql.Literal("[" + ",".join(repr(float(v)) for v in vector) + "]"), sql.SQL(target.storage.type)
    )
    with wh.engine.begin() as conn:
        path, rows = _lookup(conn, target, layer, query, None, k, ef_search, exact, only)
    return Neighbors(model_name, layer, dataset_name, f"text: {text}", path, rows, only)


def _stored_set(conn: sa.Connection, target: _Target, position: int, k: int) -> tuple[str, list[dict]]:
    """(path, rows) from the stored exact k-NN set that LOOKUP_META found."""
    assert target.exact_run is not None
    run_id, engine = target.exact_run
    cur = raw_connection(conn).cursor()
    cur.execute(
        sql.SQL(STORED_SET_SQL).format(
            dataset=sql.Literal(target.dataset_id),
            run=sql.Literal(run_id),
            position=sql.Literal(position),
            k=sql.Literal(k),
        )
    )
    return f"stored k-NN set (run {run_id}, {engine} engine, exact)", _rows(cur)


def _rows(cur: psycopg.Cursor) -> list[dict]:
    """A lookup statement's (position, text, distance) rows as the answer holds them."""
    return [{"position": r[0], "text": r[1], "distance": float(r[2])} for r in cur.fetchall()]


def _lookup(
    conn: sa.Connection,
    target: _Target,
    layer: int,
    query: sql.Composable,
    position: int | None,
    k: int,
    ef_search: int | None,
    exact: bool,
    only: PromptFilter,
) -> tuple[str, list[dict]]:
    """(the path that answered, neighbour rows) for a query vector expression."""

    def scan(exact: bool) -> tuple[str, list[dict]]:
        return _scan(conn, target, layer, query, position, k, ef_search, exact, only)

    path, rows = scan(exact)
    if only and target.indexed and not exact and len(rows) < k:
        # Fewer than k passed the filter among the rows the index scan visited.
        path, rows = scan(True)
        path += f"; the HNSW index found fewer than {k} prompts that pass the filter"
    if only and not rows:
        raise InputError(
            f"no prompt of {target.dataset_name!r} other than the query passes the filter ({only.describe()}); "
            "widen it (`layerbase dataset show` lists the prompts, `prompt.source_ref` their sources)"
        )
    if only and len(rows) < k:
        raise InputError(
            f"only {len(rows)} prompts of {target.dataset_name!r} other than the query pass the filter "
            f"({only.describe()}); lower k to at most {len(rows)} or widen the filter"
        )
    return path, rows


def _scan(
    conn: sa.Connection,
    target: _Target,
    layer: int,
    query: sql.Composable,
    position: int | None,
    k: int,
    ef_search: int | None,
    exact: bool,
    only: PromptFilter,
) -> tuple[str, list[dict]]:
    """One lookup statement, through the HNSW index or as an exact scan."""
    plan = plan_index("hnsw", target.model_id, layer, target.dataset_id, target.width, target.pgvector, target.storage)
    cur = raw_connection(conn).cursor()
    limit = k + 1
    if target.indexed and not exact:
        # A reduced index (a wide layer's prefix, or half precision) orders candidates only
        # roughly: take more, and let the outer query re-rank them by exact distance.
        limit = plan.lookup_candidates(k)
        if target.tuned is not None and ef_search is None and k <= RECALL_K:
            ef, recall, queries = target.tuned
            how = f"tuned by `layerbase knn` to recall@{RECALL_K} {recall:.3f} on {queries} prompts"
        else:
            ef = ef_search_for(k, ef_search, LOOKUP_EF_SEARCH if ef_search is None else 0)
            how = "as asked" if ef_search else "the default; `layerbase knn --engine hnsw` tunes it"
        ef = min(max(ef, limit), EF_SEARCH_LIMIT)
        # The k-NN engine's settings for such a search, in one round trip.
        settings = Search("hnsw", ef, EF_SEARCH_LIMIT, limit).settings()
        iterative = bool(only) and version_tuple(target.pgvector) >= ITERATIVE_SCAN
        if iterative:
            settings.append(sql.SQL("SET LOCAL hnsw.iterative_scan = relaxed_order"))
        cur.execute(sql.SQL("; ").join(settings))
        order = plan.distance(sql.SQL("a.{}").format(plan.column), query)
        path = f"HNSW index {plan.name} ({plan.strategy}, ef_search {ef}, {how}"
        path += ", iterative scan)" if iterative else ")"
    else:
        order = sql.SQL("a.{} <=> {}, a.prompt_id").format(plan.column, query)
        path = "exact scan" + (
            "" if exact or target.indexed else "; no HNSW index yet (`layerbase knn --engine hnsw` builds one)"
        )
    exclude = sql.SQL("p.position <> {}").format(sql.Literal(position)) if position is not None else sql.SQL("true")
    statement = sql.SQL(LOOKUP_SQL).format(
        query=query,
        column=plan.column,
        model=sql.Literal(target.model_id),
        layer=sql.Literal(layer),
        dataset=sql.Literal(target.dataset_id),
        order=order,
        limit=sql.Literal(limit),
        only=only.join(),
        exclude=exclude,
        k=sql.Literal(k),
    )
    cur.execute(statement)
    return path, _rows(cur)


def _embed_text(model: Model, layer: int, text: str, models: ModelCache | None) -> np.ndarray:
    """A new text's activation at a layer, extracted with the model's stored settings."""
    from layerbase.ingest.extract import Extractor, stored_settings
    from layerbase.ingest.loading import open_stored_model

    lm = open_stored_model(model, models=models)
    batch = Extractor(lm, stored_settings(model), include_layer0=layer == 0)([text])
    return np.asarray(batch.vectors[0, batch.layers.index(layer)], dtype=np.float32)


@dataclass
class Overlap:
    """Two neighbour sets of the same prompt and what they share."""

    first: Neighbors
    second: Neighbors

    @property
    def shared(self) -> list[int]:
        return sorted(set(self.first.positions) & set(self.second.positions))


def overlap(
    wh: Warehouse, position: int, first: tuple[str, int, str], second: tuple[str, int, str], k: int = 10
) -> Overlap:
    """N_k(prompt, model A layer i) vs N_k(prompt, model B layer j); datasets may be parallel."""
    a = nearest(wh, first[0], first[1], first[2], position=position, k=k)
    b = nearest(wh, second[0], second[1], second[2], position=position, k=k)
    return Overlap(a, b)
