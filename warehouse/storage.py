"""How a model's activations are stored: float32 in ``activation.vec`` (pgvector's
``vector``), or half precision in ``activation.vec_half`` (``halfvec``, pgvector 0.7 and
later) where the user asks for it (docs/design.md §3).

A model stores all its activations one way (``model.storage``), so every reader picks
one column for a model. ``vec_half`` exists only on a server that had ``halfvec`` when
migration 0005 ran; a row holds exactly one of the two columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import psycopg
import sqlalchemy as sa

from layerbase.warehouse.engine import pgvector_version, version_tuple
from layerbase.warehouse.errors import InputError

HALF_COLUMN_EXISTS = """
SELECT EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_schema = current_schema() AND table_name = 'activation' AND column_name = 'vec_half')
"""
# What migration 0005 does on a server with halfvec, for a warehouse migrated before its
# server had it (a moved embedded warehouse, an upgraded pgvector).
HALFVEC_TYPE_EXISTS = "SELECT to_regtype('halfvec') IS NOT NULL"
ADD_HALF_COLUMN = (
    "ALTER TABLE activation ADD COLUMN vec_half halfvec",
    "ALTER TABLE activation DROP CONSTRAINT ck_activation_one_vector",
    "ALTER TABLE activation ADD CONSTRAINT ck_activation_one_vector CHECK (num_nonnulls(vec, vec_half) = 1)",
)
# The largest finite float16: a larger activation cannot be stored in half precision.
HALF_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class Storage:
    """One way of storing activations."""

    name: str  # model.storage: float32 or float16
    column: str  # the activation column that holds them
    type: str  # its pgvector type

    def cast(self, width: int) -> str:
        """The column's type at a width, e.g. vector(576)."""
        return f"{self.type}({width})"

    def encode(self, vectors: np.ndarray) -> tuple[np.ndarray, int | None]:
        """(float32 vectors in this precision, the first row with a value it cannot hold
        (beyond float16's range), or None)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if self.type == "vector":
            return vectors, None
        with np.errstate(over="ignore"):
            half = vectors.astype(np.float16)
        bad = ~np.isfinite(half).reshape(len(half), -1).all(axis=1)
        return half, int(np.argmax(bad)) if bad.any() else None


FLOAT32 = Storage("float32", "vec", "vector")
FLOAT16 = Storage("float16", "vec_half", "halfvec")
STORAGES = {s.name: s for s in (FLOAT32, FLOAT16)}


def model_storage(conn: sa.Connection, model_id: int) -> Storage:
    """How the model's activations are stored."""
    return STORAGES[conn.execute(sa.text("SELECT storage FROM model WHERE id = :m"), {"m": model_id}).scalar_one()]


def require_storage(conn: sa.Connection, name: str) -> Storage:
    """The storage asked for, refused clearly where this warehouse cannot hold it."""
    if name not in STORAGES:
        raise InputError(f"unknown storage {name!r}; use one of {', '.join(STORAGES)}")
    storage = STORAGES[name]
    if storage is FLOAT16 and not conn.execute(sa.text(HALF_COLUMN_EXISTS)).scalar():
        version = pgvector_version(conn)
        if version_tuple(version) >= (0, 7):
            fix = (
                f"the server has pgvector {version} now, but had an older one when this warehouse was migrated; "
                "run `layerbase db upgrade` to add it"
            )
        else:
            fix = (
                f"this server has pgvector {version or 'not installed'}; use a server with pgvector 0.7 or later "
                "(DATABASE_URL, e.g. the docker-compose.yml one), or store float32"
            )
        raise InputError(
            f"float16 storage needs the halfvec column activation.vec_half, which this warehouse lacks: {fix}"
        )
    return storage


def ensure_half_column(conn: psycopg.Connection) -> bool:
    """Add ``activation.vec_half`` where the server has halfvec and the warehouse lacks the
    column (in the caller's transaction); return whether it was added."""
    has_type = conn.execute(HALFVEC_TYPE_EXISTS).fetchone()
    has_column = conn.execute(HALF_COLUMN_EXISTS).fetchone()
    if not (has_type and has_type[0]) or (has_column and has_column[0]):
        return False
    for statement in ADD_HALF_COLUMN:
        conn.execute(statement)
    return True
