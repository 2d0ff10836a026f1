"""Alembic from Python: upgrade, the current and head revisions, and the schema check.

The CLI, the Python API and the ``alembic`` command use the same migrations and ``env.py``.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from alembic import command
from layerbase.warehouse.errors import ConfigError, SchemaError

# The migrations install as `layerbase/migrations/` beside this package; in a source
# checkout (an editable install) they are the repository's top-level `alembic/` folder.
# They are found as files, not imported: `alembic/` has no `__init__.py`, so that it never
# shadows the alembic library for code run from the repository root.
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
MIGRATION_DIRS = (_PACKAGE_ROOT / "migrations", _PACKAGE_ROOT / "alembic")


def migrations_dir() -> Path:
    """The folder holding env.py and versions/."""
    for candidate in MIGRATION_DIRS:
        if (candidate / "env.py").is_file():
            return candidate
    raise ConfigError(
        f"the Layerbase migrations are missing (looked in {', '.join(map(str, MIGRATION_DIRS))}); "
        "reinstall Layerbase (`pip install --force-reinstall layerbase`, or `pip install -e .` in a checkout)"
    )


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """An Alembic config for the project's migrations, optionally bound to a connection."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest migration the code knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(conn: sa.Connection) -> str | None:
    """The revision the database is at, or None when the schema was never created."""
    return MigrationContext.configure(conn).get_current_revision()


def require_current_schema(conn: sa.Connection) -> None:
    """Fail with 'run layerbase db upgrade' unless the schema is at the code's head."""
    current = current_revision(conn)
    head = head_revision()
    if current == head:
        return
    if current is None:
        raise SchemaError("the database has no Layerbase schema yet; run `layerbase db upgrade`")
    known = {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if current not in known:
        raise SchemaError(
            f"the database schema is at revision {current}, which this version of Layerbase "
            "does not know (it is newer than the code); upgrade Layerbase"
        )
    raise SchemaError(
        f"the database schema is at revision {current}, behind the code's {head}; run `layerbase db upgrade`"
    )


def upgrade(conn: sa.Connection, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` on this connection (committed by the caller)."""
    command.upgrade(alembic_config(conn), revision)


def downgrade(conn: sa.Connection, revision: str) -> None:
    """Revert migrations down to ``revision``."""
    command.downgrade(alembic_config(conn), revision)
