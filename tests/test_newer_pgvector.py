"""Layerbase on a newer server: PostgreSQL 18 with pgvector 0.8.5, standing in for a user's
own server (the embedded one has pgvector 0.6.2). Here wide layers get halfvec indexes,
layers wider than 4000 a halfvec subvector index, and HNSW builds may use parallel workers."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa

from analysis.affinity import compute_affinity
from analysis.knn import materialize
from ingest.synthetic import store_synthetic
from tests.conftest import REPO, random_texts, write_lines
from tests.helpers import cli
from tests.test_knn_affinity import stored_sets
from warehouse.engine import connect


def index_definition(url: str, method: str) -> str:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname LIKE %s",
                            (f"{method}_activation_%",)).fetchone()[0]


def exact_distances(wh, engine: str) -> list[float]:  # type: ignore[no-untyped-def]
    with wh.engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT n.distances FROM knn_neighbor n JOIN knn_run r ON r.id = n.run_id "
            "WHERE n.position = 0 AND r.engine = :e"), {"e": engine}).scalar()


def test_migrations_and_models_agree_on_the_newer_server(newer_db_url: str) -> None:
    env = {**os.environ, "LAYERBASE_DATABASE_URL": newer_db_url}
    check = subprocess.run(["alembic", "check"], cwd=REPO, env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr
    status = cli("db", "status")
    assert status.exit_code == 0 and "0.8.5" in status.output and "18." in status.output


@pytest.mark.parametrize("width, method, strategy, in_index", [
    (2100, "hnsw", "hnsw on halfvec(2100), re-ranked exactly", ("halfvec(2100)", "halfvec_cosine_ops")),
    (4100, "ivfflat", "ivfflat on the first 4000 of 4100 dimensions (halfvec), re-ranked exactly",
     ("subvector(", "halfvec(4000)")),
])
def test_wide_layers_get_a_halfvec_index_and_are_re_ranked_exactly(newer_db_url: str, caplog, width: int,  # type: ignore[no-untyped-def]
                                                                    method: str, strategy: str,
                                                                    in_index: tuple[str, str]) -> None:
    wh = connect(newer_db_url)
    store_synthetic(wh, "wide", "d", n=60, d=width, n_layers=1, seed=3)
    with caplog.at_level(logging.WARNING):
        [result] = materialize(wh, "wide", "d", k_max=5, engine=method, min_recall=1.0, progress=False)
    assert result.strategy == strategy and result.recall == 1.0
    assert "CVE-2026-3172" not in caplog.text  # pgvector 0.8.5 builds HNSW in parallel safely
    index = index_definition(newer_db_url, method)
    assert all(text in index for text in in_index)
    materialize(wh, "wide", "d", k_max=5, engine="blas", progress=False)
    assert (stored_sets(wh, "wide", method, 5)[1] == stored_sets(wh, "wide", "blas", 5)[1]).all()
    # the stored distances are the exact float32 ones, not the index's half-precision ones
    np.testing.assert_allclose(exact_distances(wh, method), exact_distances(wh, "blas"), atol=2e-6)


def test_lookups_through_a_halfvec_index_equal_the_exact_scan(newer_db_url: str) -> None:
    wh = connect(newer_db_url)
    store_synthetic(wh, "wide", "d", n=80, d=2048, n_layers=1, seed=5)
    ask = ("neighbors", "--model", "wide", "--layer", "1", "--dataset", "d", "--prompt", "7", "-k", "6", "--json")
    exact = json.loads(cli(*ask, "--exact").stdout)
    assert cli("knn", "--model", "wide", "--dataset", "d", "--engine", "hnsw", "--k-max", "6",
               "--no-progress").exit_code == 0
    indexed = json.loads(cli(*ask).stdout)
    assert indexed["path"].startswith("HNSW index hnsw_activation_") and "halfvec(2048)" in indexed["path"]
    assert [r["position"] for r in indexed["neighbors"]] == [r["position"] for r in exact["neighbors"]]
    np.testing.assert_allclose([r["distance"] for r in indexed["neighbors"]],
                               [r["distance"] for r in exact["neighbors"]], atol=2e-6)


def test_ingest_knn_and_affinity_end_to_end_on_the_newer_server(newer_db_url: str, tiny_models: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    cli("dataset", "add", "toy", str(write_lines(tmp_path / "t.txt", random_texts(30, seed=12))))
    for name in ("gpt2", "llama"):
        assert cli("ingest", "--model", str(tiny_models[name]), "--dataset", "toy", "--name", name,
                   "--no-progress").exit_code == 0
    wh = connect(newer_db_url)
    run = compute_affinity(wh, "llama", "gpt2", "toy", k=5, progress=False)
    matrix = run.scores
    assert matrix.shape == (4, 3) and ((matrix >= 0) & (matrix <= 1)).all()
    with wh.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM activation")).scalar() == 30 * (4 + 3)
