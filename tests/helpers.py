"""Helpers shared by the tests: CLI invocation and database fingerprints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
from click.testing import CliRunner, Result

TABLES = ("model", "dataset", "prompt", "activation", "ingest_job", "ingest_chunk", "prompt_encoding", "token_embedding")


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run the layerbase CLI in-process."""
    from cli.main import root

    return CliRunner().invoke(root, list(args), env=env, catch_exceptions=False)


def cli_subprocess(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    """Start the layerbase CLI as a real process (for kill -9 and concurrency tests)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", "from cli.main import main; main()", *args],
        env=full_env,
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def fingerprint(url: str) -> dict[str, tuple[int, str]]:
    """Row count and an md5 over every row of every warehouse table."""
    out = {}
    with psycopg.connect(url) as conn:
        for table in TABLES:
            count, digest = conn.execute(
                f"SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t"
            ).fetchone()
            out[table] = (count, digest)
    return out


def assert_clean_error(result: Result, *needles: str) -> None:
    """A one-line error, non-zero exit, no traceback, mentioning each needle."""
    assert result.exit_code != 0, result.output
    text = result.output
    assert "Traceback" not in text, text
    error_lines = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, text
    for needle in needles:
        assert needle.lower() in error_lines[0].lower(), text
