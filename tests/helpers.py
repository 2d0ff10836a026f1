"""Helpers shared by the tests: CLI invocation and database fingerprints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
from click.testing import CliRunner, Result


def warehouse_tables() -> list[str]:
    from layerbase.warehouse.models import Base

    return [t.name for t in Base.metadata.sorted_tables] + ["alembic_version"]


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run the layerbase CLI in-process."""
    from layerbase.cli.main import root

    return CliRunner().invoke(root, list(args), env=env, catch_exceptions=False)


def cli_subprocess(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """Start the layerbase CLI as a real process (for kill -9 and concurrency tests)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", "from layerbase.cli.main import main; main()", *args],
        env=full_env,
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


CATALOG = {
    "indexes": "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
    "roles": "SELECT rolname FROM pg_roles ORDER BY 1",
    "relations": "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = 'public' ORDER BY 1",
}


def fingerprint(url: str) -> dict[str, object]:
    """Row count and an md5 over every row of every warehouse table, plus the indexes,
    relations and roles: what a failed command must leave exactly as it was."""
    out: dict[str, object] = {}
    with psycopg.connect(url) as conn:
        for table in warehouse_tables():
            if conn.execute("SELECT to_regclass(%s) IS NULL", (table,)).fetchone()[0]:
                out[table] = None  # not in this schema version
                continue
            count, digest = conn.execute(
                f"SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t"
            ).fetchone()
            out[table] = (count, digest)
        for name, query in CATALOG.items():
            out[name] = [r[0] for r in conn.execute(query)]
    return out


def assert_clean_error(result: Result, problem: str, *more: str) -> None:
    """A refusal as users should see it: a non-zero exit of Layerbase's own (2 for bad
    input, 3 for the database, 1 otherwise), no traceback, and one line, the last one
    printed, that starts with ``Error:`` and names the problem (each of ``problem`` and
    ``more``, case-insensitively)."""
    assert result.exit_code in (1, 2, 3), (result.exit_code, result.output)
    text = result.output
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("Error:")]
    assert len(error_lines) == 1 and lines[-1] == error_lines[0], text
    for needle in (problem, *more):
        assert needle and needle.lower() in error_lines[0].lower(), (needle, text)
