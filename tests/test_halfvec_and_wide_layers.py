"""What pgvector 0.7 and later offer, on the embedded server (PostgreSQL 18, pgvector 0.8.5):
half-precision storage, halfvec indexes for wide layers (a halfvec subvector index above 4000
dimensions), parallel HNSW builds; and the schema on a server without them (pgvector 0.6.2)."""

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

from layerbase.analysis.knn.materialize import materialize
from layerbase.analysis.knn.topk import exact_topk
from layerbase.analysis.similarity.affinity import compute_affinity
from layerbase.analysis.similarity.stats import diagonal_test, mutual_knn
from layerbase.analysis.vectors import stored_layer
from layerbase.ingest.synthetic import store_synthetic
from layerbase.warehouse.engine import connect
from tests.conftest import REPO, random_texts, write_lines
from tests.helpers import cli
from tests.test_knn_affinity import stored_sets


def index_definition(url: str, method: str) -> str:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname LIKE %s", (f"{method}_activation_%",)
        ).fetchone()[0]


def exact_distances(wh, engine: str) -> list[float]:
    with wh.engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT n.distances FROM knn_neighbor n JOIN knn_run r ON r.id = n.run_id "
                "WHERE n.position = 0 AND r.engine = :e"
            ),
            {"e": engine},
        ).scalar()


def test_the_embedded_kind_of_server_offers_half_precision(db_url: str) -> None:
    status = json.loads(cli("db", "status", "--json").output)
    assert status["server"].startswith("18.") and status["pgvector"] == "0.8.5"
    assert status["activation_storage"].startswith("float32, float16")


def test_migrations_and_models_agree_on_a_server_without_halfvec(old_db_url: str) -> None:
    env = {**os.environ, "LAYERBASE_DATABASE_URL": old_db_url}
    check = subprocess.run(["alembic", "check"], cwd=REPO, env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr
    status = json.loads(cli("db", "status", "--json").output)
    assert status["server"].startswith("16.") and status["pgvector"] == "0.6.2"
    assert status["activation_storage"].startswith("float32 only")


@pytest.mark.parametrize(
    "width, method, strategy, in_index",
    [
        (2100, "hnsw", "hnsw on halfvec(2100), re-ranked exactly", ("halfvec(2100)", "halfvec_cosine_ops")),
        (
            4100,
            "ivfflat",
            "ivfflat on the first 4000 of 4100 dimensions (halfvec), re-ranked exactly",
            ("subvector(", "halfvec(4000)"),
        ),
    ],
)
def test_wide_layers_get_a_halfvec_index_and_are_re_ranked_exactly(
    db_url: str,
    caplog,
    width: int,
    method: str,
    strategy: str,
    in_index: tuple[str, str],
) -> None:
    wh = connect(db_url)
    store_synthetic(wh, "wide", "d", n=60, d=width, n_layers=1, seed=3)
    with caplog.at_level(logging.WARNING):
        [result] = materialize(wh, "wide", "d", k_max=5, engine=method, min_recall=1.0, progress=False)
    assert result.strategy == strategy and result.recall == 1.0
    assert "CVE-2026-3172" not in caplog.text  # pgvector 0.8.5 builds HNSW in parallel safely
    index = index_definition(db_url, method)
    assert all(text in index for text in in_index)
    materialize(wh, "wide", "d", k_max=5, engine="blas", progress=False)
    assert (stored_sets(wh, "wide", method, 5)[1] == stored_sets(wh, "wide", "blas", 5)[1]).all()
    # the stored distances are the exact float32 ones, not the index's half-precision ones
    np.testing.assert_allclose(exact_distances(wh, method), exact_distances(wh, "blas"), atol=2e-6)


def test_lookups_through_a_halfvec_index_equal_the_exact_scan(db_url: str) -> None:
    wh = connect(db_url)
    store_synthetic(wh, "wide", "d", n=80, d=2048, n_layers=1, seed=5)
    ask = ("neighbors", "--model", "wide", "--layer", "1", "--dataset", "d", "--prompt", "7", "-k", "6", "--json")
    exact = json.loads(cli(*ask, "--exact").stdout)
    assert (
        cli("knn", "--model", "wide", "--dataset", "d", "--engine", "hnsw", "--k-max", "6", "--no-progress").exit_code
        == 0
    )
    indexed = json.loads(cli(*ask).stdout)
    assert indexed["path"].startswith("HNSW index hnsw_activation_") and "halfvec(2048)" in indexed["path"]
    assert [r["position"] for r in indexed["neighbors"]] == [r["position"] for r in exact["neighbors"]]
    np.testing.assert_allclose(
        [r["distance"] for r in indexed["neighbors"]], [r["distance"] for r in exact["neighbors"]], atol=2e-6
    )


def test_ingest_knn_and_affinity_end_to_end_agree_with_memory(
    db_url: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    cli("dataset", "add", "toy", str(write_lines(tmp_path / "t.txt", random_texts(30, seed=12))))
    for name in ("gpt2", "llama"):
        assert (
            cli(
                "ingest", "--model", str(tiny_models[name]), "--dataset", "toy", "--name", name, "--no-progress"
            ).exit_code
            == 0
        )
    wh = connect(db_url)
    run = compute_affinity(wh, "llama", "gpt2", "toy", k=5, progress=False)
    matrix = run.scores
    assert matrix.shape == (4, 3)
    with wh.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM activation")).scalar() == 30 * (4 + 3)
    # Every cell equals mutual k-NN computed here from the stored activations, and the test
    # is the diagonal test of that matrix.
    sets = {
        (name, layer): exact_topk(stored_layer(wh, name, "toy", layer), 5)[0]
        for name, depth in (("llama", 4), ("gpt2", 3))
        for layer in range(1, depth + 1)
    }
    expected = np.array([[mutual_knn(sets["llama", a], sets["gpt2", b], 5) for b in (1, 2, 3)] for a in (1, 2, 3, 4)])
    np.testing.assert_allclose(matrix, expected, atol=1e-12)
    reference = diagonal_test(expected)
    assert run.test is not None and (run.test.n_on, run.test.n_off) == (reference.n_on, reference.n_off)
    assert run.test.t == pytest.approx(reference.t) and run.test.mean_on == pytest.approx(reference.mean_on)


def test_half_precision_storage_from_ingest_to_lookups(
    db_url: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    from layerbase.analysis.vectors import layer_vectors

    texts = random_texts(40, seed=21)
    assert cli("dataset", "add", "toy", str(write_lines(tmp_path / "t.txt", texts))).exit_code == 0
    for name, storage in (("half", "float16"), ("full", "float32")):
        result = cli(
            "ingest",
            "--model",
            str(tiny_models["gpt2"]),
            "--dataset",
            "toy",
            "--name",
            name,
            "--storage",
            storage,
            "--no-progress",
        )
        assert result.exit_code == 0, result.output
    wh = connect(db_url)
    with wh.engine.connect() as conn:
        ids = dict(conn.execute(sa.text("SELECT name, id FROM model")).all())
        sizes = dict(
            conn.execute(
                sa.text(
                    "SELECT m.name, avg(coalesce(pg_column_size(a.vec), 0) + coalesce(pg_column_size(a.vec_half), 0)) "
                    "FROM activation a JOIN model m ON m.id = a.model_id GROUP BY m.name"
                )
            ).all()
        )
        halves = conn.execute(
            sa.text("SELECT count(*) FILTER (WHERE vec IS NULL), count(*) FROM activation WHERE model_id = :m"),
            {"m": ids["half"]},
        ).one()
        positions, half = layer_vectors(conn, ids["half"], 2, 1)
        _, full = layer_vectors(conn, ids["full"], 2, 1)
    assert halves == (40 * 3, 40 * 3)  # every row in vec_half
    assert sizes["half"] <= 8 + 2 * 32 and sizes["full"] >= 4 + 4 * 32  # header, dims, 2 or 4 bytes a value
    # the same forward pass, stored in half precision: float32 values rounded to the nearest half
    assert (positions == np.arange(40)).all() and half.dtype == np.float32
    np.testing.assert_array_equal(half, full.astype(np.float16).astype(np.float32))
    models = {m["name"]: m for m in json.loads(cli("models", "--json").stdout)}
    assert models["half"]["storage"] == "float16" and models["full"]["storage"] == "float32"

    # another precision under the same name is another extraction: refused, nothing changed
    again = cli("ingest", "--model", str(tiny_models["gpt2"]), "--dataset", "toy", "--name", "half", "--no-progress")
    assert again.exit_code != 0 and "storage='float16' (now 'float32')" in again.output

    ask = ("neighbors", "--model", "half", "--layer", "2", "--dataset", "toy", "-k", "5", "--json")
    exact = json.loads(cli(*ask, "--prompt", "3").stdout)  # nothing stored or indexed yet: a scan
    assert exact["path"].startswith("exact scan")

    # every engine reads the half-precision column; the exact ones agree set for set
    for engine in ("blas", "sql", "hnsw"):
        [result] = materialize(wh, "half", "toy", layers=[2], k_max=5, engine=engine, min_recall=1.0, progress=False)
    assert result.strategy == "hnsw on halfvec(32) of half-precision rows, re-ranked exactly" and result.recall == 1.0
    index = index_definition(db_url, "hnsw")
    assert "vec_half" in index and "halfvec(32)" in index
    sets = {engine: stored_sets(wh, "half", engine, 5)[2] for engine in ("blas", "sql", "hnsw")}
    assert (sets["blas"] == sets["sql"]).all() and (sets["hnsw"] == sets["blas"]).all()

    stored = json.loads(cli(*ask, "--prompt", "3").stdout)
    assert stored["path"].startswith("stored k-NN set")
    assert [r["position"] for r in exact["neighbors"]] == [r["position"] for r in stored["neighbors"]]
    text = json.loads(cli(*ask, "--text", texts[3]).stdout)  # a new text: its vector cast to halfvec
    assert text["path"].startswith("HNSW index") and text["neighbors"][0]["position"] == 3
    assert text["neighbors"][0]["distance"] < 1e-3
    run = compute_affinity(wh, "half", "full", "toy", k=5, progress=False)
    assert run.scores.shape == (3, 3) and run.scores.min() > 0.5  # the same model, stored two ways


def test_half_precision_rows_become_float32_on_downgrade(db_url: str) -> None:
    from layerbase.analysis.vectors import layer_vectors
    from layerbase.warehouse.schema import downgrade, upgrade

    wh = connect(db_url)
    vectors = np.random.default_rng(4).standard_normal((12, 6)).astype(np.float32)
    model_id = store_synthetic(wh, "h", "d", n=12, d=6, n_layers=1, layer_vectors={1: vectors}, storage="float16")
    with wh.engine.begin() as conn:
        downgrade(conn, "0004")
    with wh.engine.begin() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM activation WHERE vec IS NOT NULL")).scalar() == 12
        upgrade(conn)
    with wh.engine.connect() as conn:
        _, read = layer_vectors(conn, model_id, 1, 1)  # the model is float32 now, its values those halves
    np.testing.assert_array_equal(read, vectors.astype(np.float16).astype(np.float32))


def test_activations_beyond_half_precision_are_refused_with_the_prompt_named(
    db_url: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    loud = tmp_path / "loud-gpt2"
    model = GPT2LMHeadModel.from_pretrained(tiny_models["gpt2"])
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1e7)  # the residual stream carries ~1e5: finite in float32, not in half
    model.save_pretrained(loud)
    AutoTokenizer.from_pretrained(tiny_models["gpt2"]).save_pretrained(loud)
    cli("dataset", "add", "toy", str(write_lines(tmp_path / "t.txt", random_texts(8, seed=2))))
    result = cli("ingest", "--model", str(loud), "--dataset", "toy", "--storage", "float16", "--no-progress")
    assert result.exit_code != 0
    assert "prompt 0 (id 1) of dataset 'toy'" in result.output and "beyond float16's range (65504)" in result.output
    assert "--storage float32" in result.output and "Traceback" not in result.output
    with connect(db_url).engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM activation")).scalar() == 0
    assert cli("ingest", "--model", str(loud), "--dataset", "toy", "--no-progress").exit_code == 0  # float32 holds it


def test_a_model_made_by_embeddings_export_takes_the_storage_of_its_first_ingest(
    db_url: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model = str(tiny_models["gpt2"])
    assert cli("embeddings", "export", "--model", model, "--name", "g", "--no-progress").exit_code == 0
    for name in ("a", "b"):
        cli("dataset", "add", name, str(write_lines(tmp_path / f"{name}.txt", random_texts(6, seed=len(name)))))
    first = cli("ingest", "--model", model, "--dataset", "a", "--name", "g", "--storage", "float16", "--no-progress")
    assert first.exit_code == 0, first.output
    other = cli("ingest", "--model", model, "--dataset", "b", "--name", "g", "--no-progress")  # float32
    assert other.exit_code != 0 and "storage='float16' (now 'float32')" in other.output
    assert [m["storage"] for m in json.loads(cli("models", "--json").stdout)] == ["float16"]
