"""What a measure reads of a model's layers from the warehouse: the stored k-NN sets with
their distances, or every layer's activations (binary COPY)."""

from __future__ import annotations

import numpy as np
import sqlalchemy as sa
from psycopg import sql

from layerbase.analysis.similarity.all_pairs import Side, preprocess
from layerbase.analysis.similarity.neighbourhoods import from_stored
from layerbase.analysis.vectors import layer_vectors
from layerbase.warehouse.copy import read_keyed_arrays
from layerbase.warehouse.engine import raw_connection
from layerbase.warehouse.errors import InputError
from layerbase.warehouse.storage import model_storage

# The stored sets of several runs (layers) in one binary COPY, one row per run: its index in
# the list, the prompts' positions, their first k neighbours as one [n, k] array and (with
# distances) their cosine distances. One statement per side rather than one per layer (each
# costs a few milliseconds), and a row per layer rather than per prompt (each COPY row costs
# Python a few microseconds).
NEIGHBOUR_SETS = """
SELECT array_position({runs}, run_id) - 1, array_agg(position), array_agg(neighbors[1:{k}]){distances}
FROM knn_neighbor WHERE run_id = ANY({runs}) GROUP BY run_id
"""


def stored_sets(
    conn: sa.Connection, runs: list[int], k: int, *, distances: bool = False
) -> list[tuple[int, list[np.ndarray]]]:
    """(index of the run in ``runs``, [positions, neighbours [n, k], distances [n, k]?]) per run."""
    run_ids = sql.SQL("{}::int[]").format(sql.Literal(runs))
    query = sql.SQL(NEIGHBOUR_SETS).format(
        runs=run_ids,
        k=sql.Literal(k),
        distances=sql.SQL(", array_agg(distances[1:{}])").format(sql.Literal(k)) if distances else sql.SQL(""),
    )
    return read_keyed_arrays(raw_connection(conn).cursor(), query)


def neighbourhood_side(conn: sa.Connection, runs: list[int], k: int, n: int) -> Side:
    """A side's layers (in the order of ``runs``) as neighbourhoods from their stored sets."""
    layers: list = [None] * len(runs)
    for index, (positions, sets, dist) in stored_sets(conn, runs, k, distances=True):
        if len(positions) != n or (sets < 0).any():
            raise InputError(
                "a stored k-NN set is incomplete (an approximate index missed neighbours); recompute the "
                "layer's sets with an exact engine (`layerbase knn --engine blas --force`)"
            )
        order = np.argsort(positions)
        layers[index] = from_stored(sets[order], dist[order], k)
    return Side(neighbourhoods=layers)


def activation_side(conn: sa.Connection, model_id: int, dataset_id: int, layers: list[int], n: int, how: str) -> Side:
    """A side's layers as [n, d] activations in position order, preprocessed ``how``."""
    storage = model_storage(conn, model_id)
    out = []
    for layer in layers:
        positions, vectors = layer_vectors(conn, model_id, layer, dataset_id, storage)
        if len(positions) != n:
            raise InputError(
                f"layer {layer} has {len(positions)} of {n} activations stored; finish the ingest "
                "(re-run `layerbase ingest`) first"
            )
        out.append(preprocess(vectors, how))
    return Side(activations=out)
