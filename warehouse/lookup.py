"""Find models and datasets by name, with errors that list what exists."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from warehouse.errors import NotFoundError
from warehouse.models import Dataset, Model


def get_dataset(session: Session, name: str) -> Dataset:
    """The dataset called ``name``, or a NotFoundError listing the known ones."""
    found = session.scalar(sa.select(Dataset).where(Dataset.name == name))
    if found is None:
        known = session.scalars(sa.select(Dataset.name).order_by(Dataset.name).limit(20)).all()
        hint = f"known datasets: {', '.join(known)}" if known else "no dataset is registered yet"
        raise NotFoundError(f"no dataset named {name!r} ({hint}); register it with `layerbase dataset add`")
    return found


def get_model(session: Session, name: str) -> Model:
    """The stored model called ``name``, or a NotFoundError listing the known ones."""
    model = session.scalar(sa.select(Model).where(Model.name == name))
    if model is None:
        known = session.scalars(sa.select(Model.name).order_by(Model.name).limit(20)).all()
        hint = f"stored models: {', '.join(known)}" if known else "no model is stored yet"
        raise NotFoundError(f"no model named {name!r} ({hint}); ingest it with `layerbase ingest`")
    return model
