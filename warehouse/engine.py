"""The one place that creates engines and checks what the database offers.

``connect()`` resolves the URL (explicit > env > embedded), creates the engine, and
turns the failures users meet (server down, wrong password, no pgvector, old schema)
into ``DatabaseError``s that say what to do.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import TracebackType
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from layerbase.warehouse.config import EXPLICIT, URL_ENV_VARS, configured_url, safe_url
from layerbase.warehouse.errors import DatabaseError

PGVECTOR_INSTALLED = "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
PGVECTOR_AVAILABLE = "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"


@dataclass(frozen=True)
class Warehouse:
    """A connected warehouse: the engine plus how it was reached."""

    engine: Engine
    url: URL
    embedded: bool
    source: str = EXPLICIT  # where the URL came from: an option, a variable, the embedded server

    @property
    def display_url(self) -> str:
        return safe_url(self.url)


EMBEDDED = "the embedded server"


def resolve_url(explicit: str | None = None) -> tuple[URL, str]:
    """The URL to use and where it came from: ``--database-url`` (or ``connect(url)``), an
    environment variable's name, or ``EMBEDDED``."""
    configured = configured_url(explicit)
    if configured is not None:
        return configured
    from layerbase.warehouse.embedded import embedded_url

    return embedded_url(), EMBEDDED


@lru_cache(maxsize=8)
def _engine(url_text: str) -> Engine:
    return sa.create_engine(url_text, pool_pre_ping=True)


def connect(explicit_url: str | None = None, *, check_schema: bool = True) -> Warehouse:
    """Connect, verify pgvector and (optionally) that the schema is current."""
    url, source = resolve_url(explicit_url)
    engine = _engine(url.render_as_string(hide_password=False))
    wh = Warehouse(engine, url, source == EMBEDDED, source)
    with translate_errors(wh), engine.connect() as conn:
        require_pgvector(conn, wh)
        if check_schema:
            from layerbase.warehouse.schema import require_current_schema

            require_current_schema(conn)
    return wh


class translate_errors:
    """Context manager: driver errors about connectivity become a clear DatabaseError."""

    def __init__(self, wh: Warehouse | URL, source: str = EXPLICIT) -> None:
        self.url_text = wh.display_url if isinstance(wh, Warehouse) else safe_url(wh)
        self.source = wh.source if isinstance(wh, Warehouse) else source

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        if exc is None or not isinstance(exc, (OperationalError, InterfaceError)):
            return False
        if self.source == EMBEDDED:
            fix = "the embedded server stopped answering: run `layerbase db stop`, then retry"
        elif self.source in URL_ENV_VARS:
            fix = f"check that the server runs and ${self.source} is right, or unset it to use the embedded server"
        else:
            fix = f"check that the server runs and {self.source} is right, or leave it out to use the embedded server"
        reason = first_line(exc.orig or exc)
        raise DatabaseError(f"cannot reach the database at {self.url_text}: {reason}; {fix}") from None


def read_only(wh: Warehouse, pool_size: int = 8) -> Warehouse:
    """The same warehouse through an engine whose every transaction is read-only
    (``default_transaction_read_only``): what ``layerbase serve`` reads through. Its pool keeps
    ``pool_size`` connections for the server's threads, and as many again at peaks."""
    engine = sa.create_engine(
        wh.url.render_as_string(hide_password=False),
        connect_args={"options": "-c default_transaction_read_only=on"},
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
    )
    return Warehouse(engine, wh.url, wh.embedded, wh.source)


def analyze(wh: Warehouse, *tables: str) -> None:
    """Refresh the planner's statistics of tables after a bulk write. Autovacuum gets there
    eventually; until it does, the planner sees the tables as they were (measured: an affinity
    right after `knn --force` took 49.6 s instead of 0.18 s, until ANALYZE)."""
    from psycopg import sql

    # engine.begin(), not connect() + commit(): a statement sent through the driver's own
    # cursor starts no SQLAlchemy transaction, so a commit() of the Connection did nothing
    # and the pool's rollback on return undid the statistics. Only reltuples (updated in
    # place) and pg_stat's last_analyze survived, so the tables looked analyzed while the
    # planner still guessed (a stored prompt's lookup at n = 100000 read the whole layer
    # twice: 349 ms instead of 4 ms).
    with wh.engine.begin() as conn:
        raw_connection(conn).cursor().execute(
            sql.SQL("ANALYZE {}").format(sql.SQL(", ").join(map(sql.Identifier, tables)))
        )


# Autovacuum analyzes a table once 10 % of its rows changed (autovacuum_analyze_scale_factor).
ANALYZE_SCALE_FACTOR = 0.1


def analyze_if_grown(wh: Warehouse, written: Mapping[str, int]) -> None:
    """``analyze`` the tables that a write of ``written`` rows changed by more than autovacuum's
    share (10 % of the rows they had when last analyzed; any rows if never analyzed), so that
    a new or fast-growing table is planned right away; autovacuum gets to the others soon, and
    their statistics hold meanwhile. For small writes of derived rows (an affinity run's
    cells), where ANALYZE cost more than the write (measured: 60-75 ms of a 0.25 s affinity
    call)."""
    with wh.engine.connect() as conn:
        analyzed: dict[str, float] = dict(
            conn.execute(
                sa.text("SELECT relname, reltuples FROM pg_class WHERE oid = ANY(CAST(:t AS regclass[]))"),
                {"t": list(written)},
            ).all()
        )
    # reltuples is -1 for a table never analyzed (PostgreSQL >= 14), 0 before.
    stale = [t for t, rows in written.items() if rows > ANALYZE_SCALE_FACTOR * max(0.0, analyzed.get(t, 0.0))]
    if stale:
        analyze(wh, *stale)


def first_line(exc: BaseException) -> str:
    """The first meaningful line of a driver error, without its SQL echo."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"\s+", " ", text)


def pgvector_version(conn: sa.Connection) -> str | None:
    """The installed pgvector version, or None."""
    return conn.execute(sa.text(PGVECTOR_INSTALLED)).scalar()


def require_pgvector(conn: sa.Connection, wh: Warehouse | None = None) -> str | None:
    """Fail clearly when the server cannot provide pgvector at all.

    Returns the installed version (None when it is available but not yet created,
    which ``layerbase db upgrade`` does).
    """
    installed = pgvector_version(conn)
    if installed:
        return installed
    if conn.execute(sa.text(PGVECTOR_AVAILABLE)).scalar() is None:
        where = wh.display_url if wh else "this server"
        raise DatabaseError(
            f"the PostgreSQL server at {where} does not have the pgvector extension; "
            "install pgvector on it (or run `docker compose up -d db`, which ships it), "
            "or unset DATABASE_URL to use the embedded server"
        )
    return None


def version_tuple(version: str | None) -> tuple[int, ...]:
    """'0.6.2' -> (0, 6, 2); None -> ()."""
    if not version:
        return ()
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def raw_connection(conn: sa.Connection) -> Any:
    """The psycopg connection under a SQLAlchemy connection, for COPY."""
    return conn.connection.dbapi_connection
