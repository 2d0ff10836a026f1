"""Read activations out of the warehouse with binary COPY."""

from __future__ import annotations

import numpy as np
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.orm import Session

from layerbase.analysis.resolve import get_dataset, get_model, ingested_layers
from layerbase.warehouse.copy import read_positions_and_vectors
from layerbase.warehouse.engine import Warehouse, raw_connection
from layerbase.warehouse.errors import InputError
from layerbase.warehouse.storage import Storage, model_storage

# Rows come in storage order and are put in position order here: sorting 2.3 kB rows in
# the server spilled to disk at the default work_mem (15 ms of a 0.12 s k-NN layer at
# n = 2048, against 9 ms without the sort); storage order is usually position order already.
LAYER_VECTORS = """
SELECT p.position, a.{column} FROM activation a JOIN prompt p ON p.id = a.prompt_id
WHERE a.model_id = {model} AND a.layer = {layer} AND a.dataset_id = {dataset}
"""


def layer_vectors(
    conn: sa.Connection, model_id: int, layer: int, dataset_id: int, storage: Storage | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(positions, vectors [n, d] float32) of one (model, layer, dataset), in position order
    (from half precision where the model stores it so); ``storage`` is the model's, looked
    up when not given."""
    storage = storage or model_storage(conn, model_id)
    query = sql.SQL(LAYER_VECTORS).format(
        column=sql.Identifier(storage.column),
        model=sql.Literal(int(model_id)),
        layer=sql.Literal(int(layer)),
        dataset=sql.Literal(int(dataset_id)),
    )
    positions, vectors = read_positions_and_vectors(raw_connection(conn).cursor(), query, storage.type)
    if len(positions) > 1 and not (np.diff(positions) > 0).all():
        order = np.argsort(positions, kind="stable")
        positions, vectors = positions[order], vectors[order]
    return positions, vectors


def stored_layer(wh: Warehouse, model_name: str, dataset_name: str, layer: int) -> np.ndarray:
    """[n_prompts, width] float32 activations of a finished ingest at one layer, row i the
    prompt at position i; names and the layer are checked with errors that say what to run."""
    with Session(wh.engine) as session:
        model = get_model(session, model_name)
        dataset = get_dataset(session, dataset_name)
        available = ingested_layers(session, model, dataset)
        if layer not in available:
            raise InputError(
                f"layer {layer} of {model_name} is not stored; its stored layers are "
                f"{available[0]}..{available[-1]}" + (" (layer 0 needs an ingest with --layer0)" if layer == 0 else "")
            )
        ids = (model.id, dataset.id, dataset.n_prompts)
    with wh.engine.connect() as conn:
        positions, vectors = layer_vectors(conn, ids[0], layer, ids[1])
    if not np.array_equal(positions, np.arange(ids[2])):
        raise InputError(
            f"{model_name} × {dataset_name} layer {layer} has {len(positions)} of {ids[2]} activations "
            "stored; finish the ingest (re-run `layerbase ingest`) first"
        )
    return vectors
