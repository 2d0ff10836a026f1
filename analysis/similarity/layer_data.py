"""What a measure reads of a model's layers from the warehouse: the stored k-NN sets with
their distances, or every layer's activations (binary COPY)."""

from __future__ import annotations

import sqlalchemy as sa

from layerbase.analysis.knn.stored import stored_sets
from layerbase.analysis.similarity.all_pairs import Side, preprocess
from layerbase.analysis.similarity.neighbourhoods import from_stored
from layerbase.analysis.vectors import layer_vectors
from layerbase.warehouse.errors import InputError
from layerbase.warehouse.storage import model_storage


def neighbourhood_side(conn: sa.Connection, runs: list[int], k: int, n: int) -> Side:
    """A side's layers (in the order of ``runs``) as neighbourhoods from their stored sets."""
    layers = []
    for sets, dist in stored_sets(conn, runs, k, distances=True):
        if len(sets) != n or (sets < 0).any():
            raise InputError(
                "a stored k-NN set is incomplete (an approximate index missed neighbours); recompute the "
                "layer's sets with an exact engine (`layerbase knn --engine blas --force`)"
            )
        layers.append(from_stored(sets, dist, k))
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
