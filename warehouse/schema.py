"""Alembic from Python: upgrade, the current and head revisions, and the schema check.

The migrations live in the repository's top-level ``alembic/`` folder; the CLI and
``alembic`` itself use the same ``env.py``.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from warehouse.errors import ConfigError, SchemaError

REPO_ROOT = Path(__file__).resolve().parent.parent


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """An Alembic config for the project's migrations, optionally bound to a connection."""
    ini = REPO_ROOT / "alembic.ini"
    scripts = REPO_ROOT / "alembic"
    if not scripts.is_dir():
        raise ConfigError(
            f"the migrations folder {scripts} is missing; install Layerbase from its "
            "repository with `pip install -e .`"
        )
    cfg = Config(str(ini)) if ini.exists() else Config()
    cfg.set_main_option("script_location", str(scripts))
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
        f"the database schema is at revision {current}, behind the code's {head}; "
        "run `layerbase db upgrade`"
    )


def upgrade(conn: sa.Connection, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` on this connection (committed by the caller)."""
    command.upgrade(alembic_config(conn), revision)


def downgrade(conn: sa.Connection, revision: str) -> None:
    """Revert migrations down to ``revision``."""
    command.downgrade(alembic_config(conn), revision)
