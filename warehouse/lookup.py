"""Find models and datasets by name, with errors that list what exists."""

from __future__ import annotations

from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

from layerbase.warehouse.errors import NotFoundError
from layerbase.warehouse.models import Dataset, Model, SteeringVector

Named = TypeVar("Named", Dataset, Model, SteeringVector)


def _by_name(session: Session, cls: type[Named], name: str, what: str, fix: str) -> Named:
    found = session.scalar(sa.select(cls).where(cls.name == name))
    if found is None:
        known = session.scalars(sa.select(cls.name).order_by(cls.name).limit(20)).all()
        hint = f"known {what}s: {', '.join(known)}" if known else f"no {what} is stored yet"
        raise NotFoundError(f"no {what} named {name!r} ({hint}); {fix}")
    return found


def get_dataset(session: Session, name: str) -> Dataset:
    """The dataset called ``name``, or a NotFoundError listing the known ones."""
    return _by_name(session, Dataset, name, "dataset", "register it with `layerbase dataset add`")


def get_model(session: Session, name: str) -> Model:
    """The stored model called ``name``, or a NotFoundError listing the known ones."""
    return _by_name(session, Model, name, "model", "ingest it with `layerbase ingest`")


def get_vector(session: Session, name: str) -> SteeringVector:
    """The steering vector called ``name``, or a NotFoundError listing the known ones."""
    return _by_name(session, SteeringVector, name, "steering vector", "make one with `layerbase steer make`")
