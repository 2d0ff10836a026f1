"""Ad-hoc neighbour lookups: the k nearest prompts of a stored prompt or of a new text at
(model, layer, dataset), and the overlap of two such sets (the paper's Venn figures).

A stored prompt is answered from a stored exact k-NN set of that (model, layer, dataset)
when one holds at least k neighbours: a primary-key read, exact and sub-millisecond. Other
lookups (a new text, or no such set) use the partial HNSW index when one exists, and an
exact scan otherwise. The answer says which path it took.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.orm import Session

from analysis.vector_index import EF_SEARCH_LIMIT, USE_INDEX, ef_search_for, index_exists, plan_index
from analysis.knn import EXACT_ENGINES
from analysis.resolve import get_dataset, get_model, ingested_layers
from warehouse.engine import Warehouse, raw_connection
from warehouse.errors import InputError

LOOKUP_SQL = """
SELECT p.position, p.text, round((c.vec <=> {query})::numeric, 6)::real AS distance
FROM (
    SELECT a.prompt_id, a.vec FROM activation a
    WHERE a.model_id = {model} AND a.layer = {layer} AND a.dataset_id = {dataset}
    ORDER BY {order}
    LIMIT {limit}
) c
JOIN prompt p ON p.id = c.prompt_id
WHERE {exclude}
ORDER BY distance, p.position
LIMIT {k}
"""
# The stored exact set with the most neighbours (k_max >= k) of the layer, read by the
# query prompt's primary key and unnested in rank order: no distance is computed.
STORED_SET_SQL = """
SELECT r.id, r.engine, s.neighbor_position, p.text, s.distance
FROM (
    SELECT id, engine FROM knn_run
    WHERE model_id = {model} AND dataset_id = {dataset} AND layer = {layer} AND k_max >= {k}
      AND engine IN ({exact_engines})
    ORDER BY k_max DESC, id DESC
    LIMIT 1
) r
JOIN knn_neighbor n ON n.run_id = r.id AND n.position = {position}
CROSS JOIN LATERAL unnest(n.neighbors[1:{k}], n.distances[1:{k}]) WITH ORDINALITY
    AS s(neighbor_position, distance, rank)
JOIN prompt p ON p.dataset_id = {dataset} AND p.position = s.neighbor_position
ORDER BY s.rank
"""
# ef_search for lookups: on 100000 clustered synthetic vectors of width 576, 100 gave
# recall@10 0.958 and 200 gave 0.967-0.983 (bench/lookup.py).
LOOKUP_EF_SEARCH = 200
# Candidates per wanted neighbour from a prefix index (measured with IVFFlat at width 2048
# indexed on its first 2000 dimensions: 40 candidates gave recall@10 0.999, 11 gave 0.85),
# and from a half-precision index of every dimension, whose order differs at near ties only.
LOOKUP_PREFIX_CANDIDATES = 4
LOOKUP_HALFVEC_CANDIDATES = 2


@dataclass
class Neighbors:
    """The answer to one lookup."""

    model: str
    layer: int
    dataset: str
    query: str  # "prompt 12: <text>" or "text: <text>"
    path: str  # which path answered
    rows: list[dict]  # position, text, distance

    @property
    def positions(self) -> list[int]:
        return [r["position"] for r in self.rows]

    def as_dict(self) -> dict:
        return {"model": self.model, "layer": self.layer, "dataset": self.dataset, "query": self.query,
                "path": self.path, "neighbors": self.rows}


# Everything a lookup needs to know, in one round trip (a lookup is a few milliseconds, so
# each extra statement shows); None when any piece is missing, and the slow path below
# then finds which one and says what to run.
LOOKUP_META = """
SELECT m.id, m.width, d.id, d.n_prompts, j.include_layer0, m.n_layers, e.extversion
FROM model m
JOIN dataset d ON d.name = :dataset
JOIN ingest_job j ON j.model_id = m.id AND j.dataset_id = d.id AND j.state = 'done'
CROSS JOIN pg_extension e
WHERE m.name = :model AND e.extname = 'vector'
"""
# The query prompt's own vector is read inside the lookup statement, so that a stored
# prompt costs one statement: an InitPlan the index scan takes as its ordering key.
STORED_QUERY = """(
    SELECT a.vec FROM activation a JOIN prompt p ON p.id = a.prompt_id
    WHERE a.model_id = {model} AND a.layer = {layer} AND a.dataset_id = {dataset}
      AND p.dataset_id = {dataset} AND p.position = {position}
)"""


def _checked_ids(conn: sa.Connection, model_name: str, dataset_name: str, layer: int,
                 k: int) -> tuple[int, int, int, int, str | None]:
    """(model id, width, dataset id, prompts, pgvector version), or the error that explains what is missing."""
    row = conn.execute(sa.text(LOOKUP_META), {"model": model_name, "dataset": dataset_name}).first()
    if row is None:
        with Session(bind=conn) as session:
            model = get_model(session, model_name)
            dataset = get_dataset(session, dataset_name)
            ingested_layers(session, model, dataset)  # raises: not (fully) ingested
        raise InputError(f"model {model_name!r} cannot be looked up on {dataset_name!r}")  # pragma: no cover
    model_id, width, dataset_id, n_prompts, layer0, n_layers, version = row
    layers = ([0] if layer0 else []) + list(range(1, n_layers + 1))
    if layer not in layers:
        raise InputError(f"layer {layer} is not stored for {model_name}; stored layers are {layers[0]}..{layers[-1]}")
    if not 0 < k < n_prompts:
        raise InputError(f"k = {k} needs 0 < k < the number of prompts ({n_prompts})")
    return model_id, width, dataset_id, n_prompts, version


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
) -> Neighbors:
    """The k nearest prompts (self excluded for a stored prompt) of a prompt or a new text."""
    if (position is None) == (text is None):
        raise InputError("give exactly one of --prompt POSITION or --text TEXT")
    # A stored prompt is answered in one connection and one transaction: a lookup takes
    # milliseconds, so round trips show. A new text is embedded between two transactions,
    # so that no transaction stays open while a model loads.
    with wh.engine.begin() as conn:
        ids = _checked_ids(conn, model_name, dataset_name, layer, k)
        model_id, _, dataset_id, n_prompts, _ = ids
        if position is not None:
            if not 0 <= position < n_prompts:
                raise InputError(f"--prompt {position} is outside {dataset_name!r} (positions 0..{n_prompts - 1})")
            query = sql.SQL(STORED_QUERY).format(model=sql.Literal(model_id), layer=sql.Literal(layer),
                                                 dataset=sql.Literal(dataset_id), position=sql.Literal(position))
            prompt_text = conn.execute(sa.text("SELECT text FROM prompt WHERE dataset_id = :d AND position = :p"),
                                       {"d": dataset_id, "p": position}).scalar()
            stored = _stored_set(conn, model_id, layer, dataset_id, position, k)
            path, rows = stored or _lookup(conn, ids, layer, query, position, k, ef_search, exact)
            return Neighbors(model_name, layer, dataset_name, f"prompt {position}: {prompt_text}", path, rows)
        with Session(bind=conn) as session:
            model = get_model(session, model_name)
            session.expunge(model)
    query = sql.SQL("{}::vector").format(sql.Literal(_embed_text(model, layer, text)))  # type: ignore[arg-type]
    with wh.engine.begin() as conn:
        path, rows = _lookup(conn, ids, layer, query, None, k, ef_search, exact)
    return Neighbors(model_name, layer, dataset_name, f"text: {text}", path, rows)


def _stored_set(conn: sa.Connection, model_id: int, layer: int, dataset_id: int, position: int,
                k: int) -> tuple[str, list[dict]] | None:
    """(path, rows) from a stored exact k-NN set of the layer with at least k neighbours, or None."""
    statement = sql.SQL(STORED_SET_SQL).format(
        model=sql.Literal(model_id), layer=sql.Literal(layer), dataset=sql.Literal(dataset_id),
        position=sql.Literal(position), k=sql.Literal(k),
        exact_engines=sql.SQL(", ").join(sql.Literal(e) for e in EXACT_ENGINES))
    cur = raw_connection(conn).cursor()
    cur.execute(statement)
    found = cur.fetchall()
    if len(found) < k:
        return None
    run_id, engine = found[0][0], found[0][1]
    return (f"stored k-NN set (run {run_id}, {engine} engine, exact)",
            [{"position": r[2], "text": r[3], "distance": float(r[4])} for r in found])


def _lookup(conn: sa.Connection, ids: tuple[int, int, int, int, str | None], layer: int, query: sql.Composable,
            position: int | None, k: int, ef_search: int | None, exact: bool) -> tuple[str, list[dict]]:
    """(the path that answered, neighbour rows) for a query vector expression."""
    model_id, width, dataset_id, _, version = ids
    plan = plan_index("hnsw", model_id, layer, dataset_id, width, version)
    cur = raw_connection(conn).cursor()
    limit = k + 1
    if not exact and index_exists(conn, plan.name):
        # A reduced index (a wide layer's prefix, or half precision) orders candidates only
        # roughly: take more, and let the outer query re-rank them by exact distance.
        per_neighbor = LOOKUP_PREFIX_CANDIDATES if plan.rough_order else LOOKUP_HALFVEC_CANDIDATES
        limit = (k + 1) * (per_neighbor if plan.reduced else 1)
        ef = min(max(ef_search_for(k, ef_search, LOOKUP_EF_SEARCH), limit), EF_SEARCH_LIMIT)
        cur.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(ef)))
        for statement in USE_INDEX:
            cur.execute(statement)
        order = plan.distance(sql.SQL("a.vec"), query)
        path = f"HNSW index {plan.name} ({plan.strategy}, ef_search {ef})"
    else:
        order = sql.SQL("a.vec <=> {}, a.prompt_id").format(query)
        path = "exact scan" + ("" if exact else "; no HNSW index yet (`layerbase knn --engine hnsw` builds one)")
    exclude = sql.SQL("p.position <> {}").format(sql.Literal(position)) if position is not None else sql.SQL("true")
    statement = sql.SQL(LOOKUP_SQL).format(query=query, model=sql.Literal(model_id), layer=sql.Literal(layer),
                                           dataset=sql.Literal(dataset_id), order=order,
                                           limit=sql.Literal(limit), exclude=exclude, k=sql.Literal(k))
    cur.execute(statement)
    return path, [{"position": r[0], "text": r[1], "distance": float(r[2])} for r in cur.fetchall()]


def _embed_text(model, layer: int, text: str) -> str:  # type: ignore[no-untyped-def]
    """A new text's activation at a layer, extracted with the model's stored settings."""
    from ingest.extract import Extractor
    from ingest.runner import open_stored_model, stored_settings

    lm = open_stored_model(model)
    batch = Extractor(lm, stored_settings(model), include_layer0=layer == 0)([text])
    vector = batch.vectors[0, batch.layers.index(layer)]
    return "[" + ",".join(repr(float(v)) for v in np.asarray(vector, dtype=np.float32)) + "]"


@dataclass
class Overlap:
    """Two neighbour sets of the same prompt and what they share."""

    first: Neighbors
    second: Neighbors

    @property
    def shared(self) -> list[int]:
        return sorted(set(self.first.positions) & set(self.second.positions))

    def as_dict(self) -> dict:
        return {"first": self.first.as_dict(), "second": self.second.as_dict(), "shared": self.shared,
                "overlap": len(self.shared) / max(1, len(self.first.rows))}


def overlap(wh: Warehouse, position: int, first: tuple[str, int, str], second: tuple[str, int, str], k: int = 10) -> Overlap:
    """N_k(prompt, model A layer i) vs N_k(prompt, model B layer j); datasets may be parallel."""
    a = nearest(wh, first[0], first[1], first[2], position=position, k=k)
    b = nearest(wh, second[0], second[1], second[2], position=position, k=k)
    return Overlap(a, b)
