"""The whole pipeline on a real Citus cluster: the coordinator given by LAYERBASE_CITUS_URL
(docs/scale-out.md says how to start one with a local coordinator and two workers). Without it
the cluster tests skip, and say why; the refusal on a server without Citus always runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest

from tests.conftest import random_texts, write_lines
from tests.helpers import assert_clean_error, cli, cli_subprocess, fingerprint

REPO = Path(__file__).resolve().parent.parent
CITUS_URL = os.environ.get("LAYERBASE_CITUS_URL")
needs_cluster = pytest.mark.skipif(
    not CITUS_URL,
    reason="LAYERBASE_CITUS_URL is not set: no Citus coordinator to run the scale-out tests on "
    "(docs/scale-out.md starts one: a coordinator and two workers on loopback)",
)


def test_distribute_is_refused_on_a_server_without_citus(wh, db_url: str) -> None:
    before = fingerprint(db_url)
    assert_clean_error(cli("db", "distribute"), "has no Citus extension", "docker compose --profile citus")
    assert fingerprint(db_url) == before


def _empty(url: str) -> None:
    """Drop Layerbase's objects from the cluster's database (the extensions stay)."""
    from layerbase.warehouse.models import Base

    with psycopg.connect(url, autocommit=True) as conn:
        for (view,) in conn.execute(
            "SELECT viewname FROM pg_views WHERE schemaname = 'public' AND viewname LIKE 'bi\\_%'"
        ).fetchall():
            conn.execute(f'DROP VIEW IF EXISTS "{view}" CASCADE')
        for table in [*reversed(Base.metadata.sorted_tables)]:
            conn.execute(f'DROP TABLE IF EXISTS "{table.name}" CASCADE')
        conn.execute("DROP TABLE IF EXISTS alembic_version")
        conn.execute("DROP FUNCTION IF EXISTS layerbase_refuse_update() CASCADE")
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'lb_citus_reader'").fetchone():
            conn.execute("DROP OWNED BY lb_citus_reader")
            conn.execute("DROP ROLE lb_citus_reader")


@pytest.fixture(scope="module")
def citus_url():
    assert CITUS_URL
    _empty(CITUS_URL)
    saved = {key: os.environ.get(key) for key in ("DATABASE_URL", "LAYERBASE_DATABASE_URL")}
    os.environ["DATABASE_URL"] = CITUS_URL
    os.environ.pop("LAYERBASE_DATABASE_URL", None)
    try:
        yield CITUS_URL
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@needs_cluster
def test_the_whole_pipeline_on_a_citus_cluster(citus_url: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import layerbase
    from layerbase.analysis.similarity.all_pairs import AllPairs, Side
    from layerbase.analysis.similarity.measures import MEASURES, MeasureOptions
    from layerbase.ingest.synthetic import store_synthetic

    # 1. schema through the migrations, then distributed; a second call changes nothing
    assert cli("db", "upgrade").exit_code == 0
    first = cli("db", "distribute", "--json")
    assert first.exit_code == 0, first.output
    layout = {p["table"]: p for p in json.loads(first.output)}
    assert layout["activation"]["kind"] == "distributed" and layout["activation"]["column"] == "model_id"
    assert layout["knn_neighbor"]["column"] == "position" and layout["model"]["kind"] == "reference"
    assert layout["knn_array"]["kind"] == "distributed" and layout["knn_array"]["column"] == "run_id"
    again = cli("db", "distribute")
    assert again.exit_code == 0 and "0 tables changed" in again.output, again.output
    assert not layerbase.connect(citus_url, progress=False).distribute()["changed"].any()
    # the schema is the migrations' on the distributed tables too (column comments included)
    check = subprocess.run([sys.executable, "-m", "alembic", "check"], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    # 2. ingest by two worker processes that share the job
    texts = random_texts(60, seed=3, words=20)
    assert cli("dataset", "add", "p", str(write_lines(tmp_path / "p.txt", texts))).exit_code == 0
    args = ["ingest", "--model", str(tiny_models["llama"]), "--dataset", "p", "--batch-size", "4", "--no-progress"]
    procs = [cli_subprocess(*args, env={"DATABASE_URL": citus_url}) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    with psycopg.connect(citus_url) as conn:
        rows, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT (model_id, layer, prompt_id)) FROM activation"
        ).fetchone()
        layers = conn.execute("SELECT n_layers FROM model").fetchone()[0]
        chunks = conn.execute("SELECT count(*), count(DISTINCT chunk_no) FROM ingest_chunk").fetchone()
    assert rows == distinct == 60 * layers
    assert chunks[0] == chunks[1] == 15  # 60 prompts in chunks of 4, each written once

    # 3. k-NN engines: exact sets agree between sql and blas; hnsw within its recall
    lb = layerbase.connect(citus_url, progress=False)
    wh = lb.warehouse
    store_synthetic(wh, "A", "d", n=200, d=16, n_layers=4, seed=1)
    store_synthetic(wh, "B", "d", n=200, d=12, n_layers=3, seed=2)
    for engine in ("sql", "blas", "hnsw"):
        lb.knn("A", "d", k=10, engine=engine)
    lb.knn("B", "d", k=10)
    with psycopg.connect(citus_url) as conn:
        sets = dict(
            conn.execute(
                "SELECT r.engine, array_agg(n.neighbors[1:10] ORDER BY r.layer, n.position) FROM knn_neighbor n "
                "JOIN knn_run r ON r.id = n.run_id JOIN model m ON m.id = r.model_id WHERE m.name = 'A' "
                "GROUP BY r.engine"
            ).fetchall()
        )
        # a lookup over one (model, layer) runs on one shard, on one worker
        model_id = conn.execute("SELECT id FROM model WHERE name = 'A'").fetchone()[0]
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                f"EXPLAIN SELECT prompt_id FROM activation WHERE model_id = {model_id} AND layer = 2 "
                f"ORDER BY vec::vector(16) <=> (SELECT vec::vector(16) FROM activation WHERE model_id = {model_id} "
                "AND layer = 2 LIMIT 1) LIMIT 10"
            ).fetchall()
        )
    assert sets["sql"] == sets["blas"]
    assert "Task Count: 1" in plan, plan

    # 4. every measure, stored, equal to the in-memory computation on the same activations
    side_a = Side([lb.activations("A", "d", layer) for layer in range(1, 5)])
    side_b = Side([lb.activations("B", "d", layer) for layer in range(1, 4)])
    for name in MEASURES:
        m = lb.affinity("A", "B", "d", measure=name, permutations=2)
        want = AllPairs(MEASURES[name], MeasureOptions(permutations=2), 10, side_a, side_b).matrix()
        np.testing.assert_allclose(m.scores, want, atol=1e-5, err_msg=name)
        assert m.test is not None
    counted_here = lb.affinity("A", "B", "d")
    in_sql = lb.affinity("A", "B", "d", overlap="sql", recompute=True)
    assert np.array_equal(counted_here.scores, in_sql.scores)
    boot = lb.affinity("A", "B", "d", measure="linear_cka", permutations=2, bootstrap=5, bootstrap_cells=[(1, 1)])
    assert len(boot.intervals) == 3

    # 5. lookups, the report, the BI views and the reader role, the server
    assert len(lb.neighbors("A", "d", 2, prompt=0, k=5)) == 5
    report = lb.report(["A", "B"], ["d"], tmp_path / "report", measures=["linear_cka"], permutations=2)
    assert report.html.exists() and report.tables["measure_tests"]
    reader = cli("db", "grant-reader", "lb_citus_reader", "--password-env", "READER_PW", env={"READER_PW": "pw-1"})
    assert reader.exit_code == 0, reader.output
    with psycopg.connect(citus_url) as conn:
        measures = conn.execute("SELECT DISTINCT measure FROM bi_diagonal_test WHERE is_current").fetchall()
    assert {m for (m,) in measures} == set(MEASURES)
    from fastapi.testclient import TestClient

    from layerbase.cli.server.app import create_app, read_only_api

    read = read_only_api(lb)
    with TestClient(create_app(read)) as client:
        assert client.get("/api/health").status_code == 200
        runs = client.get("/api/affinity").json()
        assert client.get(f"/api/affinity/{runs[-1]['run_id']}").status_code == 200
        assert client.get("/api/neighbors", params={"model": "A", "dataset": "d", "layer": 2, "prompt": 3}).json()
    read.warehouse.engine.dispose()

    # 6. migrations run on the distributed warehouse, down and up again, keeping its data
    for step in (["downgrade", "0008"], ["upgrade", "head"], ["check"]):
        done = subprocess.run([sys.executable, "-m", "alembic", *step], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    with psycopg.connect(citus_url) as conn:
        # the tables the migrations made again are in Citus's metadata as local tables
        assert conn.execute("SELECT count(*) FROM pg_dist_partition").fetchone()[0] == 22
        assert conn.execute("SELECT count(*) FROM activation").fetchone()[0] == rows + 200 * 4 + 200 * 3
        packed = conn.execute("SELECT count(*) FROM knn_array").fetchone()[0]
        assert packed == conn.execute("SELECT count(*) FROM knn_run").fetchone()[0] > 0  # packed again by 0010
    # distributing again lays them out, and the affinity from the repacked sets is the same
    again = cli("db", "distribute", "--json")
    assert again.exit_code == 0, again.output
    layout = {p["table"]: p for p in json.loads(again.output)}
    assert layout["knn_array"]["kind"] == "distributed" and layout["knn_array"]["column"] == "run_id"
    assert layout["affinity_bootstrap"]["kind"] == "reference"
    assert all(p["kind"] != "local" for p in layout.values())
    repacked = layerbase.connect(citus_url, progress=False).affinity("A", "B", "d", recompute=True)
    assert np.array_equal(repacked.scores, counted_here.scores)
