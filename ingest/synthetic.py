"""Synthetic activations of a stated shape, stored exactly as ingest stores real ones.

For tests and benchmarks that need n prompts x d width x L layers without running a
model: clustered Gaussian vectors (so that neighbourhoods mean something; isotropic, or
with a real model's spectrum), a model row marked ``synthetic``, a dataset of placeholder
prompts, and a finished ingest job.
"""

from __future__ import annotations

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from layerbase.ingest.datasets import add_datasets
from layerbase.ingest.sources import PromptSet
from layerbase.warehouse.copy import copy_columns
from layerbase.warehouse.engine import Warehouse, raw_connection
from layerbase.warehouse.lookup import get_dataset
from layerbase.warehouse.models import IngestChunk, IngestJob, Model
from layerbase.warehouse.storage import FLOAT32, require_storage


def clustered_vectors(n: int, d: int, *, clusters: int = 32, spread: float = 0.5, seed: int = 0) -> np.ndarray:
    """n vectors of width d around ``clusters`` random centres, with isotropic noise.

    Within a cluster every direction has the same variance, so a point's 1st and 10th
    nearest neighbours are almost equally far (0.92 of each other at n = 1024, d = 576):
    the hardest case for an approximate index, harder than real activations.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    labels = rng.integers(0, clusters, size=n)
    return centres[labels] + spread * rng.standard_normal((n, d)).astype(np.float32)


# Fitted to SmolLM2-135M's layer 15 (last token, 1024 BBC news leads), whose unit vectors
# have a power-law variance spectrum (slope 1.10 over components 2-100; 13 components hold
# half the variance, 122 hold 90 %) and whose 1st neighbour is 0.76 as far as the 10th.
# These parameters give 1.12-1.13, 10-11, 136-141 and 0.79-0.80 at n = 1024, d = 576
# (README, figure 5).
ACTIVATION_LIKE = {"alpha": 1.1, "clusters": 32, "spread": 1.5}


def activation_like_vectors(n: int, d: int, *, seed: int = 0) -> np.ndarray:
    """n vectors of width d whose spectrum and neighbour contrast resemble a real model's
    hidden states: ``clusters`` centres plus noise, both Gaussian with variance ``i^-alpha``
    along the i-th axis of one random rotation."""
    alpha, clusters, spread = ACTIVATION_LIKE["alpha"], int(ACTIVATION_LIKE["clusters"]), ACTIVATION_LIKE["spread"]
    rng = np.random.default_rng(seed)
    scale = np.arange(1, d + 1, dtype=np.float64) ** (-alpha / 2)
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    centres = rng.standard_normal((clusters, d)) * scale
    points = centres[rng.integers(0, clusters, size=n)] + spread * rng.standard_normal((n, d)) * scale
    return (points @ rotation.T).astype(np.float32)


def store_synthetic(
    wh: Warehouse,
    model_name: str,
    dataset_name: str,
    *,
    n: int,
    d: int,
    n_layers: int,
    seed: int = 0,
    layer_vectors: dict[int, np.ndarray] | None = None,
    storage: str = FLOAT32.name,
) -> int:
    """Store synthetic activations for layers 1..n_layers; return the model id.

    ``storage``: float32, or float16 (half precision, pgvector >= 0.7), as ``ingest --storage``.
    Layer l's vectors are ``layer_vectors[l]`` when given, else clustered noise. The
    dataset is created when missing (placeholder texts 'synthetic prompt i').
    """
    try:
        with Session(wh.engine) as session:
            get_dataset(session, dataset_name)
    except Exception:
        texts = [f"synthetic prompt {i}" for i in range(n)]
        add_datasets(wh, [(dataset_name, PromptSet("synthetic", f"synthetic:{n}", texts, list(map(str, range(n)))))])
    with Session(wh.engine) as session, session.begin():
        store = require_storage(session.connection(), storage)
        dataset = get_dataset(session, dataset_name)
        if dataset.n_prompts != n:
            raise ValueError(f"dataset {dataset_name!r} has {dataset.n_prompts} prompts, not {n}")
        model = Model(
            name=model_name,
            source="synthetic",
            architecture="synthetic",
            kind="causal",
            n_layers=n_layers,
            width=d,
            vocab_size=0,
            dtype="float32",
            hook_site="synthetic",
            pooling="last",
            padding_side="right",
            max_tokens=0,
            chat_template=False,
            tied_embeddings=False,
            config={"seed": seed},
            transformers_version="-",
            torch_version="-",
            storage=store.name,
        )
        session.add(model)
        session.flush()
        job = IngestJob(
            model_id=model.id,
            dataset_id=dataset.id,
            include_layer0=False,
            batch_size=n,
            n_prompts=n,
            n_chunks=1,
            state="done",
            settings={"synthetic": True},
        )
        session.add(job)
        session.flush()
        session.add(IngestChunk(job_id=job.id, chunk_no=0, first_position=0, last_position=n - 1, done=True))
        prompt_ids = np.array(
            session.execute(sa.text("SELECT id FROM prompt WHERE dataset_id = :d ORDER BY position"), {"d": dataset.id})
            .scalars()
            .all(),
            dtype=np.int64,
        )
        cur = raw_connection(session.connection()).cursor()
        for layer in range(1, n_layers + 1):
            vectors = (layer_vectors or {}).get(layer)
            if vectors is None:
                vectors = clustered_vectors(n, d, seed=seed * 1000 + layer)
            vectors, bad = store.encode(vectors)
            if bad is not None:
                raise ValueError(f"layer {layer} row {bad} is beyond {store.name}'s range")
            copy_columns(
                cur,
                "activation",
                ("model_id", "layer", "prompt_id", "dataset_id", store.column),
                [
                    ("int4", np.full(n, model.id, dtype=np.int32)),
                    ("int2", np.full(n, layer, dtype=np.int16)),
                    ("int8", prompt_ids),
                    ("int4", np.full(n, dataset.id, dtype=np.int32)),
                    (store.type, vectors),
                ],
            )
        return model.id
