"""Ad-hoc neighbour lookups: the k nearest prompts of a stored prompt or of a new text at
(model, layer, dataset), and the overlap of two such sets (the paper's Venn figures).

A lookup uses the partial HNSW index of that (model, layer, dataset) when one exists,
and an exact scan otherwise; the answer says which path it took.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.orm import Session

from analysis.hnsw import index_exists, index_name, plan_index
from analysis.resolve import get_dataset, get_model, ingested_layers
from warehouse.engine import Warehouse, pgvector_version, raw_connection
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
QUERY_VECTOR = """
SELECT a.vec::text FROM activation a JOIN prompt p ON p.id = a.prompt_id
WHERE a.model_id = :model AND a.layer = :layer AND a.dataset_id = :dataset AND p.position = :position
"""


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
    with Session(wh.engine) as session:
        model = get_model(session, model_name)
        dataset = get_dataset(session, dataset_name)
        layers = ingested_layers(session, model, dataset)
        if layer not in layers:
            raise InputError(f"layer {layer} is not stored for {model_name}; stored layers are {layers[0]}..{layers[-1]}")
        if not 0 < k < dataset.n_prompts:
            raise InputError(f"k = {k} needs 0 < k < the number of prompts ({dataset.n_prompts})")
        ids = (model.id, dataset.id, model.width)
        query_label, vector_text = "", ""
        if position is not None:
            if not 0 <= position < dataset.n_prompts:
                raise InputError(f"--prompt {position} is outside {dataset_name!r} (positions 0..{dataset.n_prompts - 1})")
            vector_text = session.execute(sa.text(QUERY_VECTOR), {"model": model.id, "layer": layer,
                                                                   "dataset": dataset.id, "position": position}).scalar()
            prompt_text = session.execute(sa.text("SELECT text FROM prompt WHERE dataset_id = :d AND position = :p"),
                                          {"d": dataset.id, "p": position}).scalar()
            query_label = f"prompt {position}: {prompt_text}"
        else:
            vector_text = _embed_text(model, layer, text)  # type: ignore[arg-type]
            query_label = f"text: {text}"
    with wh.engine.begin() as conn:
        plan = plan_index(ids[0], layer, ids[1], ids[2], pgvector_version(conn))
        use_index = plan.indexable and not exact and index_exists(conn, index_name(ids[0], layer, ids[1]))
        query = sql.SQL("{}::vector").format(sql.Literal(vector_text))
        if use_index:
            ef = max(ef_search or 0, 2 * (k + 1), 100)
            conn.execute(sa.text(f"SET LOCAL hnsw.ef_search = {int(min(ef, 1000))}"))
            cast = plan.expression.split("::", 1)[1]  # type: ignore[union-attr]
            order = sql.SQL("a.{} <=> {}::{}").format(sql.SQL(plan.expression), query, sql.SQL(cast))  # type: ignore[arg-type]
            path = f"HNSW index {plan.name} ({plan.strategy}, ef_search {min(ef, 1000)})"
        else:
            order = sql.SQL("a.vec <=> {}, a.prompt_id").format(query)
            path = "exact scan" + ("" if plan.indexable else f" ({plan.strategy})") + (
                "" if exact or not plan.indexable else "; no HNSW index yet (`layerbase knn --engine hnsw` builds one)")
        exclude = sql.SQL("p.position <> {}").format(sql.Literal(position)) if position is not None else sql.SQL("true")
        statement = sql.SQL(LOOKUP_SQL).format(query=query, model=sql.Literal(ids[0]), layer=sql.Literal(layer),
                                               dataset=sql.Literal(ids[1]), order=order,
                                               limit=sql.Literal(k + 1), exclude=exclude, k=sql.Literal(k))
        cur = raw_connection(conn).cursor()
        cur.execute(statement)
        rows = [{"position": r[0], "text": r[1], "distance": float(r[2])} for r in cur.fetchall()]
    return Neighbors(model_name, layer, dataset_name, query_label, path, rows)


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
