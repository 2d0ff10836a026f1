"""A data directory of Layerbase < 0.2 (pgserver 0.1.4: PostgreSQL 16.2, pgvector 0.6.2) is
refused with the command that moves it, and `layerbase db move-embedded` copies its
warehouse into PostgreSQL 18 with every row, keeping the old directory."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine

from layerbase.analysis.knn.materialize import materialize
from layerbase.analysis.similarity.affinity import compute_affinity
from layerbase.ingest.synthetic import store_synthetic
from layerbase.warehouse import embedded
from layerbase.warehouse.config import parse_url
from layerbase.warehouse.engine import Warehouse
from layerbase.warehouse.schema import upgrade
from tests.helpers import assert_clean_error, cli, fingerprint


def make_old_warehouse(pgdata: Path) -> str:
    """A real old embedded data directory with a warehouse in it; returns its URL."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
    import psycopg

    server = pgserver.get_server(pgdata, cleanup_mode=None)
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE layerbase")
    url = server.get_uri("layerbase")
    engine = create_engine(parse_url(url))
    with engine.begin() as conn:
        upgrade(conn)
    wh = Warehouse(engine, parse_url(url), embedded=False)
    store_synthetic(wh, "A", "d", n=60, d=24, n_layers=3, seed=1)
    store_synthetic(wh, "B", "d", n=60, d=16, n_layers=2, seed=2)
    materialize(wh, "A", "d", k_max=5, progress=False)
    compute_affinity(wh, "A", "B", "d", k=5, progress=False)
    engine.dispose()
    return url


def test_an_old_data_directory_is_refused_then_moved_with_every_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    pgdata = home / "pgdata"
    old_url = make_old_warehouse(pgdata)
    before = fingerprint(old_url)
    with Warehouse(create_engine(parse_url(old_url)), parse_url(old_url), False).engine.connect() as conn:
        old_vectors = conn.exec_driver_sql("SELECT vec::text FROM activation ORDER BY model_id, layer, prompt_id").all()
    monkeypatch.delenv("LAYERBASE_DATABASE_URL", raising=False)
    monkeypatch.setenv("LAYERBASE_HOME", str(home))
    try:
        # The new binaries never open it: one line that names the command.
        refused = cli("models")
        assert_clean_error(refused, "made by PostgreSQL 16", "layerbase db move-embedded", "the old directory is kept")
        assert (pgdata / "PG_VERSION").read_text().strip() == "16"

        moved = cli("db", "move-embedded", "--json")
        assert moved.exit_code == 0, moved.output
        report = json.loads(moved.output)
        assert report["old_server"].startswith("PostgreSQL 16.") and report["old_server"].endswith("pgvector 0.6.2")
        assert report["new_server"].startswith("PostgreSQL 18.") and report["new_server"].endswith("pgvector 0.8.5")
        assert report["activations"] == 60 * 3 + 60 * 2
        kept = home / "pgdata-postgresql16"
        assert report["kept_as"] == str(kept) and (kept / "PG_VERSION").read_text().strip() == "16"
        assert (pgdata / "PG_VERSION").read_text().strip() == "18"

        status = json.loads(cli("db", "status", "--json").output)
        assert status["server"].startswith("18.") and status["pgvector"] == "0.8.5"
        assert status["activation_storage"].startswith("float32, float16")  # the halfvec column was added
        new_url = embedded.embedded_url().render_as_string(hide_password=False).replace("+psycopg", "")
        after = fingerprint(new_url)
        for table, value in before.items():
            if table in ("indexes", "roles", "relations"):
                continue
            if table == "activation":  # its rows gained the (empty) half-precision column
                assert after[table][0] == value[0]
                continue
            assert after[table] == value, table  # every row, byte for byte in its text form
        with create_engine(parse_url(new_url)).connect() as conn:
            new_vectors = conn.exec_driver_sql(
                "SELECT vec::text FROM activation ORDER BY model_id, layer, prompt_id"
            ).all()
        assert [json.loads(v[0]) for v in new_vectors] == [json.loads(v[0]) for v in old_vectors]
        # The moved warehouse works: the stored matrix reads back, new work runs.
        again = cli("affinity", "--models", "A,B", "--dataset", "d", "-k", "5", "--json", "--no-progress")
        assert again.exit_code == 0, again.output
        assert np.array(json.loads(again.output)[0]["scores"]).shape == (3, 2)
        # A second move has nothing to do.
        assert_clean_error(cli("db", "move-embedded"), "already PostgreSQL 18", "nothing to move")
    finally:
        embedded.stop_embedded(home / "pgdata")
        embedded.stop_embedded(home / "pgdata-postgresql16")
