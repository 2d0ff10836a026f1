"""The database: schema creation, status, URL handling and the errors users meet."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from tests.helpers import assert_clean_error, cli


def test_upgrade_creates_schema_and_status_reports_it(empty_db_url: str) -> None:
    before = cli("db", "status", "--json")
    assert before.exit_code == 0, before.output
    assert "none" in before.output and '"pgvector"' in before.output

    from layerbase.warehouse.schema import head_revision

    head = head_revision()
    result = cli("db", "upgrade")
    assert result.exit_code == 0, result.output
    assert f"upgraded (empty) -> {head}" in result.output

    again = cli("db", "upgrade")
    assert f"already at {head}" in again.output

    status = cli("db", "status")
    assert status.exit_code == 0, status.output
    assert "pgvector: 0.8.5" in status.output and "server: 18." in status.output
    assert f"schema revision: {head}" in status.output
    assert "activation" in status.output and "token_embedding" in status.output


@pytest.mark.parametrize("server", ["db_url", "old_db_url"])
def test_models_and_migrations_agree(server: str, request: pytest.FixtureRequest) -> None:
    """What `alembic check` asserts, on servers with and without halfvec: autogenerate finds
    nothing to change."""
    import sqlalchemy as sa

    from layerbase.warehouse.config import parse_url
    from layerbase.warehouse.models import Base, compared_by_autogenerate

    engine = sa.create_engine(parse_url(request.getfixturevalue(server)))
    with engine.connect() as conn:
        options = {"compare_type": True, "include_object": compared_by_autogenerate}
        ctx = MigrationContext.configure(conn, opts=options)
        assert compare_metadata(ctx, Base.metadata) == []
    engine.dispose()


def test_commands_refuse_a_database_without_schema(empty_db_url: str) -> None:
    result = cli("dataset", "list")
    assert_clean_error(result, "layerbase db upgrade")


def test_schema_behind_the_code_asks_for_upgrade(db_url: str) -> None:
    import sqlalchemy as sa

    from layerbase.warehouse.config import parse_url
    from layerbase.warehouse.schema import downgrade

    engine = sa.create_engine(parse_url(db_url))
    with engine.begin() as conn:
        downgrade(conn, "0001")
    engine.dispose()
    assert_clean_error(cli("dataset", "list"), "behind the code", "run `layerbase db upgrade`")
    assert cli("db", "upgrade").exit_code == 0
    assert cli("dataset", "list").exit_code == 0


def test_unknown_revision_is_reported_as_newer_than_code(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'ffff'")
    assert_clean_error(cli("dataset", "list"), "ffff", "upgrade Layerbase")


def test_unreachable_server_gives_clear_error_without_password() -> None:
    url = "postgresql://alice:s3cret-pw@127.0.0.1:1/nowhere"
    result = cli("db", "status", env={"LAYERBASE_DATABASE_URL": url})
    assert_clean_error(result, "cannot reach the database", "127.0.0.1")
    assert "s3cret-pw" not in result.output


@pytest.mark.parametrize(
    "url, needle",
    [("not a url at all", "not a valid database URL"), ("mysql://u:p@localhost/db", "PostgreSQL")],
)
def test_malformed_database_url(url: str, needle: str) -> None:
    result = cli("db", "status", env={"DATABASE_URL": url, "LAYERBASE_DATABASE_URL": ""})
    assert_clean_error(result, needle)


def test_layerbase_url_takes_precedence_over_database_url(db_url: str) -> None:
    result = cli("db", "status", "--json", env={"DATABASE_URL": "postgresql://x:y@127.0.0.1:1/z"})
    assert result.exit_code == 0, result.output


def test_no_command_prints_a_password(pg_server, db_url: str, tiny_models, tmp_path) -> None:
    from tests.conftest import random_texts, write_lines

    secret = "Very-Secret-42"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS lb_pw_user")
        conn.execute(f"CREATE ROLE lb_pw_user LOGIN SUPERUSER PASSWORD '{secret}'")
    # The embedded server trusts local sockets, so the password is accepted and unused.
    url = db_url.replace("postgres:@", f"lb_pw_user:{secret}@")
    data = write_lines(tmp_path / "p.txt", random_texts(12))
    commands = [
        ["db", "status"],
        ["db", "status", "--json"],
        ["db", "upgrade"],
        ["dataset", "add", "p", str(data)],
        ["dataset", "list"],
        ["dataset", "show", "p"],
        ["ingest", "--model", str(tiny_models["gpt2"]), "--dataset", "p", "--name", "g", "--no-progress"],
        ["ingest", "--model", str(tiny_models["llama"]), "--dataset", "p", "--name", "l", "--no-progress"],
        ["jobs"],
        ["models"],
        ["embeddings", "export", "--model", str(tiny_models["gpt2"]), "--name", "g", "--no-progress"],
        ["knn", "--model", "g", "--dataset", "p", "--k-max", "3", "--no-progress"],
        ["affinity", "--models", "g,l", "--dataset", "p", "-k", "3", "--no-progress"],
        ["neighbors", "--model", "g", "--layer", "1", "--dataset", "p", "--prompt", "0", "-k", "3"],
        ["report", "--models", "g,l", "--datasets", "p", "-k", "3", "--out", str(tmp_path / "r"), "--no-progress"],
        ["db", "grant-reader", "lb_reader", "--password-env", "READER_PW"],
    ]
    failing = [
        (["knn", "--model", "nope", "--dataset", "p"], 2, "no model named"),  # an error path
        (["--database-url", url.replace("/t_", "/missing_"), "jobs"], 3, "cannot reach"),  # an unreachable database
    ]
    env = {"LAYERBASE_DATABASE_URL": url, "READER_PW": "reader-pw-7"}
    for args in commands:
        result = cli(*args, env=env)
        assert result.exit_code == 0, (args, result.output)
        assert secret not in result.output and "reader-pw-7" not in result.output, args
    assert "lb_pw_user:***@" in cli("db", "status", env=env).output  # the URL is shown, its password hidden
    for args, code, problem in failing:
        result = cli(*args, env=env)
        assert result.exit_code == code and problem in result.output, (args, result.output)
        assert secret not in result.output and "reader-pw-7" not in result.output, args
    report = (tmp_path / "r" / "report.html").read_text()
    assert secret not in report
    log = (pg_server.pgdata / "log").read_text(errors="replace")
    assert secret not in log and "reader-pw-7" not in log


def test_server_without_pgvector_is_refused(server_without_pgvector: str) -> None:
    for args in (["db", "upgrade"], ["db", "status"], ["dataset", "list"]):
        result = cli(*args, env={"LAYERBASE_DATABASE_URL": server_without_pgvector})
        assert_clean_error(result, "does not have the pgvector extension", "install pgvector")
    with psycopg.connect(server_without_pgvector) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0]
    assert tables == 0  # nothing was written


def test_embedded_server_sizes_its_memory_once_and_keeps_the_users_setting(tmp_path: Path) -> None:
    from layerbase.warehouse import embedded

    pgdata = tmp_path / "pgdata"

    def shared_buffers_mb() -> int:
        url = embedded.embedded_url(pgdata)
        with psycopg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False)) as conn:
            return int(
                conn.execute(
                    "SELECT setting::bigint * 8 / 1024 FROM pg_settings WHERE name = 'shared_buffers'"
                ).fetchone()[0]
            )

    try:
        expected = min(embedded.MAX_SHARED_BUFFERS_MB, (embedded.machine_memory() >> 20) // 4)
        assert shared_buffers_mb() == expected
        url = embedded.embedded_url(pgdata).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET shared_buffers = '256MB'")
        embedded.pg_ctl(pgdata, "-w", "restart")
        assert shared_buffers_mb() == 256
    finally:
        embedded.stop_embedded(pgdata)


def test_parallel_work_runs_in_read_only_transactions(wh) -> None:
    from layerbase.warehouse.parallel import run_in_parallel

    def read(cur: psycopg.Cursor, item: int) -> int:
        return cur.execute("SELECT %s::int + 1", (item,)).fetchone()[0]

    assert run_in_parallel(wh, [1, 2, 3], read, workers=2) == [2, 3, 4]

    def write(cur: psycopg.Cursor, item: int) -> None:
        cur.execute("CREATE TABLE parallel_write_probe (x int)")

    for workers in (1, 2):
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            run_in_parallel(wh, [1, 2], write, workers=workers)
    with wh.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT to_regclass('parallel_write_probe')").scalar() is None


def test_small_writes_leave_statistics_to_autovacuum_and_large_ones_analyze(wh) -> None:
    from layerbase.warehouse.engine import analyze_if_grown

    def write(rows: int) -> None:
        with wh.engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO scratch SELECT generate_series(1, :n)"), {"n": rows})

    def analyzed_rows() -> float:
        with wh.engine.connect() as conn:
            return conn.execute(sa.text("SELECT reltuples FROM pg_class WHERE relname = 'scratch'")).scalar_one()

    def column_statistics() -> int:
        # reltuples is written in place, so it survives a rolled-back ANALYZE; the column
        # statistics that the planner uses are committed with the transaction or lost.
        with wh.engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM pg_stats WHERE tablename = 'scratch'")).scalar_one()

    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE scratch (x int)"))
    write(100)
    analyze_if_grown(wh, {"scratch": 100})  # never analyzed: analyzed now
    assert analyzed_rows() == 100 and column_statistics() == 1
    write(5)
    analyze_if_grown(wh, {"scratch": 5})  # 5 % of the rows: left to autovacuum
    assert analyzed_rows() == 100
    write(50)
    analyze_if_grown(wh, {"scratch": 50})
    assert analyzed_rows() == 155
