"""What ``layerbase db upgrade`` and ``db status`` do."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from layerbase.warehouse.engine import Warehouse, pgvector_version, raw_connection, translate_errors
from layerbase.warehouse.models import Base
from layerbase.warehouse.schema import current_revision, head_revision, upgrade
from layerbase.warehouse.storage import HALF_COLUMN_EXISTS, ensure_half_column


def upgrade_schema(wh: Warehouse) -> tuple[str | None, str, str]:
    """Migrate to head; return (revision before, revision after, display URL). ``wh`` comes
    from ``connect(check_schema=False)``, which checked reachability and pgvector."""
    with translate_errors(wh), wh.engine.begin() as conn:
        before = current_revision(conn)
        upgrade(conn)
        ensure_half_column(raw_connection(conn))  # where the server gained halfvec since 0005 ran
        after = current_revision(conn)
    assert after is not None
    return before, after, wh.display_url


def server_versions(wh: Warehouse) -> tuple[str, str | None]:
    """The server's version and pgvector's (None before `db upgrade` creates it)."""
    with translate_errors(wh), wh.engine.connect() as conn:
        return str(conn.execute(sa.text("SHOW server_version")).scalar()), pgvector_version(conn)


def database_status(wh: Warehouse) -> dict[str, Any]:
    """Server, pgvector version, schema revision and exact row counts."""
    with translate_errors(wh), wh.engine.connect() as conn:
        revision = current_revision(conn)
        counts: dict[str, Any] = {}
        if revision is not None:
            for table in Base.metadata.sorted_tables:
                # Table names come from our own metadata, never from input.
                counts[table.name] = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()
        return {
            "database": wh.display_url,
            "embedded": wh.embedded,
            "server": conn.execute(sa.text("SHOW server_version")).scalar(),
            "pgvector": pgvector_version(conn) or "available, not yet created (run `layerbase db upgrade`)",
            "schema_revision": revision or "none (run `layerbase db upgrade`)",
            "activation_storage": (
                "float32, float16 (`ingest --storage float16`)"
                if revision is not None and conn.execute(sa.text(HALF_COLUMN_EXISTS)).scalar()
                else "float32 only (no halfvec column: float16 needs pgvector 0.7 or later)"
            ),
            "code_revision": head_revision(),
            "row_counts": counts,
        }
