"""Look up models, datasets and their stored layers, with errors that say what to run."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from layerbase.warehouse.errors import InputError
from layerbase.warehouse.lookup import get_dataset, get_model
from layerbase.warehouse.models import Dataset, IngestJob, Model

__all__ = ["get_dataset", "get_model", "ingested_layers", "parse_layers"]


def ingested_layers(session: Session, model: Model, dataset: Dataset) -> list[int]:
    """Layers stored for (model, dataset) by a finished ingest job, 0 first when present."""
    job = session.scalar(sa.select(IngestJob).where(IngestJob.model_id == model.id, IngestJob.dataset_id == dataset.id))
    if job is None or job.state != "done":
        state = "has not been ingested" if job is None else f"is only partly ingested (job {job.state})"
        raise InputError(
            f"model {model.name!r} {state} on dataset {dataset.name!r}; run "
            f"`layerbase ingest --model {model.source} --name {model.name} --dataset {dataset.name}` first"
        )
    return ([0] if job.include_layer0 else []) + list(range(1, model.n_layers + 1))


def parse_layers(spec: str | None, available: list[int], include_layer0: bool = False) -> list[int]:
    """'1-5,7' -> [1, 2, 3, 4, 5, 7], checked against the stored layers; None -> all (no 0 unless asked)."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return [layer for layer in available if layer > 0 or include_layer0]
    layers: list[int] = []
    try:
        for part in spec.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                if int(lo) > int(hi):
                    raise InputError(f"--layers {part.strip()!r} is an empty range; write it low to high ({hi}-{lo})")
                layers.extend(range(int(lo), int(hi) + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise InputError(f"--layers {spec!r} is not a layer list; use e.g. '1-5,7' or 'all'") from None
    bad = [layer for layer in layers if layer not in available]
    if bad:
        raise InputError(
            f"--layers asks for layer {bad[0]}, but the stored layers are {available[0]}..{available[-1]}; "
            "pick layers in that range" + (" (layer 0 needs an ingest with --layer0)" if 0 in bad else "")
        )
    return sorted(set(layers))
