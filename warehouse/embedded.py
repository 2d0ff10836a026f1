"""The embedded PostgreSQL server (``pgserver``: PostgreSQL 16 with pgvector 0.6.2).

It is used when no database URL is configured. The server keeps running between
commands (so that each command does not pay the start-up), listens only on a Unix
socket in its data directory, and is stopped with ``layerbase db stop``.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL, make_url

from layerbase.warehouse.config import data_dir
from layerbase.warehouse.errors import DatabaseError

DATABASE_NAME = "layerbase"


def pgdata_dir() -> Path:
    """The embedded server's data directory."""
    return data_dir() / "pgdata"


def _pgserver() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns at import time when XDG_RUNTIME_DIR is unset (as in CI).
        warnings.simplefilter("ignore")
        import pgserver
        import pgserver.utils

    # pgserver logs every step at INFO; users need none of it.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    return pgserver


def _server(pgdata: Path) -> Any:
    pgserver = _pgserver()
    try:
        return pgserver.get_server(pgdata, cleanup_mode=None)
    except Exception as exc:  # pgserver raises bare subprocess/assert errors
        raise DatabaseError(
            f"could not start the embedded PostgreSQL server in {pgdata}: {exc}; "
            f"see {pgdata / 'log'}, or set DATABASE_URL to use another server"
        ) from None


# initdb's 128 MB of shared buffers hold a fraction of one 100k-prompt layer with its HNSW
# index (about 300 MB each at width 576); lookups then read pages through the OS cache
# (measured: p50 9.1 ms at 128 MB, 6.0 ms at 2 GB). A new data directory gets a quarter of
# the memory, at most 2 GB, once; a value the user set with ALTER SYSTEM is kept.
MAX_SHARED_BUFFERS_MB = 2048
TUNED = """
SELECT count(*) FROM pg_file_settings
WHERE name = 'shared_buffers' AND sourcefile LIKE '%postgresql.auto.conf'
"""


def _memory_mb() -> int:
    import psutil  # a dependency of pgserver

    return int(psutil.virtual_memory().total // (1 << 20))


def size_memory(conn: psycopg.Connection) -> bool:
    """Size the memory settings of a new data directory; return whether that needs a restart."""
    row = conn.execute(TUNED).fetchone()
    if row is not None and row[0]:
        return False
    memory = _memory_mb()
    shared = min(MAX_SHARED_BUFFERS_MB, memory // 4)
    conn.execute(sql.SQL("ALTER SYSTEM SET shared_buffers = {}").format(sql.Literal(f"{shared}MB")))
    conn.execute(sql.SQL("ALTER SYSTEM SET effective_cache_size = {}").format(sql.Literal(f"{memory // 2}MB")))
    return True


def embedded_url(pgdata: Path | None = None, database: str = DATABASE_NAME) -> URL:
    """Start the embedded server if needed, create the database, and return its URL."""
    pgdata = pgdata or pgdata_dir()
    server = _server(pgdata)
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        restart = size_memory(conn)
    if restart:
        # pg_ctl restart keeps the options pgserver started it with (socket only, no TCP).
        _pgserver().pg_ctl(["-w", "restart"], pgdata=pgdata, user=_system_user())
    url = make_url(server.get_uri(database))
    return url.set(drivername="postgresql+psycopg")


def _system_user() -> str | None:
    """pgserver runs the server as this system user when we are root."""
    return "pgserver" if os.geteuid() == 0 else None


def stop_embedded(pgdata: Path | None = None) -> bool:
    """Stop the embedded server if it runs; return whether one was running."""
    pgserver = _pgserver()
    pgdata = pgdata or pgdata_dir()
    info = pgserver.utils.PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    if info is None or not info.is_running():
        return False
    pgserver.pg_ctl(["-w", "stop"], pgdata=pgdata, user=_system_user())
    return True
