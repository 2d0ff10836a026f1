"""k-NN engines, affinity in SQL, neighbour lookups, BI views and the reader role."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa

from layerbase.analysis.knn.materialize import materialize, neighbor_array
from layerbase.analysis.knn.topk import exact_topk
from layerbase.analysis.similarity.affinity import compute_affinity, load_matrix
from layerbase.analysis.similarity.stats import mutual_knn
from layerbase.analysis.vectors import layer_vectors
from layerbase.ingest.synthetic import clustered_vectors, store_synthetic
from layerbase.warehouse.errors import InputError
from tests.conftest import random_texts, write_lines
from tests.helpers import assert_clean_error, cli, fingerprint


def stored_sets(wh, model: str, engine: str, k: int) -> dict[int, np.ndarray]:
    with wh.engine.connect() as conn:
        runs = conn.execute(
            sa.text(
                "SELECT r.layer, r.id FROM knn_run r JOIN model m ON m.id = r.model_id "
                "WHERE m.name = :m AND r.engine = :e"
            ),
            {"m": model, "e": engine},
        ).all()
        return {layer: neighbor_array(conn, rid, k) for layer, rid in runs}


def test_blocked_topk_is_exact_and_breaks_ties_by_index() -> None:
    x = clustered_vectors(120, 16, seed=3)
    x[50] = x[7]  # a duplicate: distance 0 to each other
    x[51] = x[7]
    idx, dist = exact_topk(x, 9)
    idx_small, dist_small = exact_topk(x, 9, block_rows=7)
    assert (idx == idx_small).all() and np.array_equal(dist, dist_small)
    # float64 distances, ties by index (docs/reliability.md, "What exact means")
    from tests.test_hardening import _float64_truth

    assert (idx == _float64_truth(x, 9)).all()
    assert idx[7, :2].tolist() == [50, 51] and idx[50, :2].tolist() == [7, 51]


def test_blas_and_sql_engines_give_identical_sets(wh) -> None:
    store_synthetic(wh, "syn", "d", n=160, d=48, n_layers=3, seed=1)
    blas = materialize(wh, "syn", "d", k_max=25, engine="blas", progress=False)
    sql_ = materialize(wh, "syn", "d", k_max=25, engine="sql", progress=False)
    assert [r.layer for r in blas] == [1, 2, 3] and all(not r.reused for r in blas + sql_)
    a, b = stored_sets(wh, "syn", "blas", 25), stored_sets(wh, "syn", "sql", 25)
    for layer in (1, 2, 3):
        assert (a[layer] == b[layer]).all()
    with wh.engine.connect() as conn:
        distances = conn.execute(
            sa.text(
                """SELECT n.distances FROM knn_neighbor n JOIN knn_run r ON r.id = n.run_id
               WHERE r.engine = 'blas' AND r.layer = 1 AND n.position = 0"""
            )
        ).scalar()
        sql_distances = conn.execute(
            sa.text(
                """SELECT n.distances FROM knn_neighbor n JOIN knn_run r ON r.id = n.run_id
               WHERE r.engine = 'sql' AND r.layer = 1 AND n.position = 0"""
            )
        ).scalar()
        positions, vectors = layer_vectors(conn, 1, 1, 1)
    assert distances == sorted(distances) and len(distances) == 25
    _, ref = exact_topk(vectors, 25)
    assert np.allclose(distances, ref[0], atol=1e-5) and np.allclose(sql_distances, ref[0], atol=1e-5)
    # reuse: a smaller k is served by the stored sets
    again = materialize(wh, "syn", "d", k_max=10, engine="blas", progress=False)
    assert all(r.reused for r in again)


@pytest.mark.parametrize("engine", ["hnsw", "ivfflat"])
def test_indexed_engines_tune_their_search_to_the_recall_asked(wh, db_url: str, engine: str) -> None:
    store_synthetic(wh, "syn", "d", n=400, d=32, n_layers=1, seed=2)
    [narrow] = materialize(wh, "syn", "d", k_max=10, engine=engine, min_recall=0.0, progress=False)
    assert narrow.strategy == f"{engine} on vector(32)" and len(narrow.search["tried"]) == 1
    [tuned] = materialize(wh, "syn", "d", k_max=10, engine=engine, min_recall=1.0, force=True, progress=False)
    tried = tuned.search["tried"]
    breadth = "ef_search" if engine == "hnsw" else "probes"
    # the search widened from the narrow setting until the sample's recall was perfect
    assert tried[0][breadth] == narrow.search[breadth] and tried[-1]["recall"] == tuned.recall == 1.0
    assert [t[breadth] for t in tried] == sorted(t[breadth] for t in tried)
    with psycopg.connect(db_url) as conn:
        stored = conn.execute("SELECT recall, recall_queries, search FROM knn_run").fetchone()
        index = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname LIKE %s", (f"{engine}_activation_%",)
        ).fetchone()[0]
    assert stored[0] == 1.0 and stored[1] == 200 and stored[2]["tried"] == tried
    assert engine in index and "vector(32)" in index and "model_id = 1" in index
    if engine == "ivfflat":
        assert stored[2]["lists"] == 20 and "lists='20'" in index
    else:  # k_max 10: the run's own tuning, from ef_search 2(k + 1), is the lookups' too
        assert tried[0]["ef_search"] == 22
        assert stored[2]["lookup"] == {**tried[-1], "queries": 200, "k": 10, "tried": tried}
    # a setting passes on the lower confidence bound of the sample's recall, not its mean
    assert all(t["recall_low"] < 1.0 for t in tried[:-1]) and tried[-1]["recall_low"] == 1.0
    assert all(t["recall_low"] <= t["recall"] for t in tried)
    found = stored_sets(wh, "syn", engine, 10)[1]
    with wh.engine.connect() as conn:
        _, vectors = layer_vectors(conn, 1, 1, 1)
    idx, _ = exact_topk(vectors, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, idx)]) >= 0.99


def test_one_vector_index_per_layer_so_that_each_search_uses_its_own(wh, db_url: str) -> None:
    store_synthetic(wh, "syn", "d", n=300, d=16, n_layers=1, seed=5)
    materialize(wh, "syn", "d", k_max=10, engine="ivfflat", progress=False)
    [hnsw] = materialize(wh, "syn", "d", k_max=10, engine="hnsw", min_recall=0.0, progress=False)
    with psycopg.connect(db_url) as conn:
        names = [r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE indexname LIKE '%_activation_m%'")]
    assert names == ["hnsw_activation_m1_l1_d1"]
    assert hnsw.recall is not None and hnsw.recall >= 0.95


def test_index_build_parameters_are_asked_recorded_and_rebuilt_when_they_change(wh, db_url: str) -> None:
    store_synthetic(wh, "syn", "d", n=300, d=16, n_layers=1, seed=6)

    def reloptions() -> list[str]:
        with psycopg.connect(db_url) as conn:
            return conn.execute(
                "SELECT c.reloptions FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid "
                "WHERE c.relname LIKE '%_activation_m%'"
            ).fetchone()[0]

    [default] = materialize(wh, "syn", "d", k_max=10, engine="hnsw", min_recall=0.0, progress=False)
    assert (default.search["m"], default.search["ef_construction"]) == (16, 64)
    assert sorted(reloptions()) == ["ef_construction=64", "m=16"]
    [light] = materialize(
        wh, "syn", "d", k_max=10, engine="hnsw", m=8, ef_construction=24, min_recall=0.0, progress=False
    )
    # other parameters: the index is rebuilt and the stored run is not reused, without --force
    assert not light.reused and (light.search["m"], light.search["ef_construction"]) == (8, 24)
    assert sorted(reloptions()) == ["ef_construction=24", "m=8"]
    # asking for nothing, or for what the index has, keeps both the index and the run
    assert materialize(wh, "syn", "d", k_max=10, engine="hnsw", progress=False)[0].reused
    assert materialize(wh, "syn", "d", k_max=10, engine="hnsw", m=8, progress=False)[0].reused
    assert sorted(reloptions()) == ["ef_construction=24", "m=8"]
    # a rebuild keeps the parameters not asked
    materialize(wh, "syn", "d", k_max=10, engine="hnsw", m=10, min_recall=0.0, progress=False)
    assert sorted(reloptions()) == ["ef_construction=24", "m=10"]
    with pytest.raises(InputError, match=r"ef_construction \(24, kept from the existing index\) >= 2 x m \(16\)"):
        materialize(wh, "syn", "d", k_max=10, engine="hnsw", m=16, progress=False)
    assert sorted(reloptions()) == ["ef_construction=24", "m=10"]  # refused before anything was dropped

    [ivf] = materialize(wh, "syn", "d", k_max=10, engine="ivfflat", lists=6, min_recall=1.0, progress=False)
    assert reloptions() == ["lists=6"] and ivf.search["lists"] == 6
    assert all(t["probes"] <= 6 for t in ivf.search["tried"])  # probes are bounded by the index's own lists
    result = cli("knn", "--model", "syn", "--dataset", "d", "--k-max", "10", "--engine", "ivfflat", "--lists", "6")
    assert result.exit_code == 0, result.output
    assert "lists 6, probes" in result.output and "True" in result.output  # reused, and shown with its lists


def test_ivfflat_rows_its_probes_cannot_fill_are_answered_exactly(wh) -> None:
    # 40 prompts in 6 lists of about 7: one probe returns fewer than k + 1 rows
    store_synthetic(wh, "syn", "d", n=40, d=16, n_layers=1, seed=4)
    [result] = materialize(wh, "syn", "d", k_max=10, engine="ivfflat", min_recall=0.0, progress=False)
    assert result.search["probes"] == 1 and result.search["lists"] == 6
    found = stored_sets(wh, "syn", "ivfflat", 10)[1]
    assert found.shape == (40, 10) and (found >= 0).all()
    assert all(len(set(row)) == 10 and i not in row for i, row in enumerate(found))


def test_wide_layers_are_indexed_on_a_prefix_and_re_ranked_exactly(old_wh, old_db_url: str) -> None:
    """Without halfvec (pgvector 0.6.2) a layer wider than 2000 is indexed on its first 2000."""
    wh, db_url = old_wh, old_db_url
    store_synthetic(wh, "wide", "d", n=40, d=2100, n_layers=1, seed=3)
    [result] = materialize(wh, "wide", "d", k_max=5, engine="hnsw", min_recall=1.0, progress=False)
    assert result.strategy.startswith("hnsw on the first 2000 of 2100 dimensions") and result.recall == 1.0
    assert result.search["candidates"] >= 12  # twice k + 1 at least: the prefix orders them only roughly
    with psycopg.connect(db_url) as conn:
        index = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname LIKE 'hnsw_activation_%'").fetchone()[0]
    assert "[1:2000]" in index and "vector(2000)" in index
    materialize(wh, "wide", "d", k_max=5, engine="blas", progress=False)
    hnsw, blas = stored_sets(wh, "wide", "hnsw", 5)[1], stored_sets(wh, "wide", "blas", 5)[1]
    assert (hnsw == blas).all()
    with wh.engine.connect() as conn:
        distances = dict(
            conn.execute(
                sa.text(
                    "SELECT r.engine, n.distances FROM knn_neighbor n JOIN knn_run r ON r.id = n.run_id "
                    "WHERE n.position = 0"
                )
            ).all()
        )
    np.testing.assert_allclose(distances["hnsw"], distances["blas"], atol=2e-6)  # exact, not prefix distances


def test_affinity_in_sql_equals_in_memory_reference(wh, db_url: str) -> None:
    n = 120
    base = clustered_vectors(n, 24, seed=9)
    rng = np.random.default_rng(0)
    # model B's layers are noisy copies of A's (layer j ~ layer j), so the diagonal is strong
    store_synthetic(
        wh,
        "A",
        "d",
        n=n,
        d=24,
        n_layers=4,
        layer_vectors={layer: base + 0.3 * layer * rng.standard_normal(base.shape) for layer in range(1, 5)},
    )
    store_synthetic(
        wh,
        "B",
        "d",
        n=n,
        d=24,
        n_layers=3,
        layer_vectors={layer: base + 0.3 * layer * rng.standard_normal(base.shape) for layer in range(1, 4)},
    )
    m = compute_affinity(wh, "A", "B", "d", k=10, progress=False)
    assert m.scores.shape == (4, 3)
    with wh.engine.connect() as conn:
        sets = {}
        for model_id, layers in ((1, 4), (2, 3)):
            for layer in range(1, layers + 1):
                _, v = layer_vectors(conn, model_id, layer, 1)
                sets[(model_id, layer)] = exact_topk(v, 10)[0]
    ref = np.array([[mutual_knn(sets[(1, i)], sets[(2, j)], 10) for j in range(1, 4)] for i in range(1, 5)])
    assert np.allclose(m.scores, ref)
    stored, la, lb = load_matrix(wh, m.run_id)
    assert np.allclose(stored, ref) and la == [1, 2, 3, 4] and lb == [1, 2, 3]
    assert m.test is not None and m.test.n_on == 6 and m.test.t > 0
    with psycopg.connect(db_url) as conn:
        cells = conn.execute(
            "SELECT layer_a, layer_b, depth_a, depth_b, score, chance, log10_p_null FROM bi_affinity_cell "
            "WHERE model_a = 'A' ORDER BY layer_a, layer_b"
        ).fetchall()
        test = conn.execute("SELECT n_on, n_off, rows_model, n_pairs FROM bi_diagonal_test").fetchone()
        path = conn.execute("SELECT layer_a, best_layer_b FROM bi_max_similarity_path ORDER BY layer_a").fetchall()
    assert len(cells) == 12 and cells[0][2] == pytest.approx(0.25) and cells[0][3] == pytest.approx(1 / 3)
    assert all(0 <= c[4] <= 1 and c[5] == pytest.approx(10 / 119) for c in cells)
    assert test == (6, 6, "a", 1)
    assert [p[1] for p in path] == [int(j) + 1 for j in np.argmax(ref, axis=1)]
    # asked again, the current run answers; recomputed, here with the SQL join for the overlap
    # counts, it gives the identical matrix as a new run, and the first stays as it was
    assert compute_affinity(wh, "A", "B", "d", k=10, progress=False).run_id == m.run_id
    in_sql = compute_affinity(wh, "A", "B", "d", k=10, overlap="sql", recompute=True, progress=False)
    assert np.array_equal(in_sql.scores, m.scores) and in_sql.test == m.test and in_sql.run_id > m.run_id
    with psycopg.connect(db_url) as conn:
        engines = conn.execute("SELECT overlap_engine FROM affinity_run ORDER BY id").fetchall()
        assert engines == [("numpy",), ("sql",)]
        assert conn.execute("SELECT count(*) FROM affinity_cell").fetchone()[0] == 24
    with pytest.raises(InputError, match="unknown overlap engine"):
        compute_affinity(wh, "A", "B", "d", k=10, overlap="gpu", progress=False)


def test_shared_neighbours_equal_the_sparse_product_with_missing_neighbours_and_many_layers(monkeypatch) -> None:
    import scipy.sparse as sp

    import layerbase.analysis.similarity.overlap as overlap

    rng = np.random.default_rng(7)
    n, k = 150, 6

    def layers(count: int) -> np.ndarray:
        base = np.argsort(rng.random((n, n)), axis=1)[:, :k]  # distinct neighbours per prompt
        sets = np.stack(
            [
                np.where(rng.random((n, k)) < 0.5, base, np.argsort(rng.random((n, n)), axis=1)[:, :k])
                for _ in range(count)
            ]
        )
        for layer in sets:  # repairs may repeat a neighbour within a prompt: draw those rows again
            for row in np.nonzero([len(set(r)) < k for r in layer])[0]:
                layer[row] = rng.permutation(n)[:k]
        sets[rng.random(sets.shape) < 0.02] = -1  # neighbours an index could not find
        return sets.astype(np.int32)

    def by_sparse_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        def stack(sets: np.ndarray) -> sp.csr_matrix:
            rows, cols = np.nonzero(sets.reshape(len(sets), -1) >= 0)
            keys = (cols // k) * n + sets.reshape(len(sets), -1)[rows, cols]
            return sp.csr_matrix((np.ones(len(keys)), (rows, keys)), shape=(len(sets), n * n))

        return np.rint((stack(a) @ stack(b).T).toarray()).astype(np.int64)

    a, b = layers(5), layers(70)  # more B layers than one 64-bit mask holds
    want = by_sparse_product(a, b)
    assert want.min() > 0
    assert np.array_equal(overlap.shared_neighbours(a, b), want)
    monkeypatch.setattr(overlap, "BLOCK_BYTES", 8 * n * 7)  # blocks of 7 prompts, the last one short
    monkeypatch.setattr(overlap, "MIN_BLOCK_PROMPTS", 1)
    assert np.array_equal(overlap.shared_neighbours(a, b), want)
    assert np.array_equal(overlap.shared_neighbours(b, a), want.T)


def test_parallel_dataset_affinity(wh, db_url: str, tmp_path: Path) -> None:
    f = tmp_path / "pairs.txt"
    f.write_text("".join(f"links {i} :: rechts {i}\n" for i in range(60)))
    assert cli("dataset", "add-pairs", "left", "right", str(f)).exit_code == 0
    base = clustered_vectors(60, 16, seed=4)
    store_synthetic(wh, "L", "left", n=60, d=16, n_layers=2, layer_vectors={1: base, 2: base * 2})
    store_synthetic(
        wh, "R", "right", n=60, d=16, n_layers=2, layer_vectors={1: base, 2: clustered_vectors(60, 16, seed=5)}
    )
    m = compute_affinity(wh, "L", "R", "left", "right", k=5, progress=False)
    in_sql = compute_affinity(wh, "L", "R", "left", "right", k=5, overlap="sql", recompute=True, progress=False)
    assert np.array_equal(in_sql.scores, m.scores)  # parallel datasets: both engines pair prompt i with i
    # same vectors up to scale -> identical neighbour sets; unrelated vectors share few
    assert m.scores[0, 0] == 1.0 and m.scores[1, 0] == 1.0 and m.scores[0, 1] < 0.5
    result = cli(
        "affinity", "--models", "L,R", "--dataset", "left", "--dataset-b", "right", "-k", "5", "--json", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["scores"][0][0] == 1.0


def test_affinity_and_knn_bad_inputs(wh, db_url: str, tmp_path: Path) -> None:
    store_synthetic(wh, "A", "d", n=30, d=8, n_layers=2, seed=1)
    store_synthetic(wh, "B", "d", n=30, d=8, n_layers=2, seed=2)
    store_synthetic(wh, "C", "other", n=20, d=8, n_layers=2, seed=3)
    before = fingerprint(db_url)
    cases = [
        (["knn", "--model", "A", "--dataset", "d", "--k-max", "30"], ["0 < k < the number of prompts"]),
        (["knn", "--model", "A", "--dataset", "d", "--k-max", "0"], ["0 < k"]),
        (["knn", "--model", "A", "--dataset", "d", "--layers", "3"], ["stored layers are 1..2"]),
        (["knn", "--model", "A", "--dataset", "d", "--layers", "x-y"], ["not a layer list"]),
        (["knn", "--model", "Z", "--dataset", "d"], ["no model named 'Z'"]),
        (["knn", "--model", "C", "--dataset", "d"], ["has not been ingested"]),
        (["affinity", "--models", "A", "--dataset", "d"], ["at least two"]),
        (["affinity", "--models", "A,B", "--dataset", "d", "-k", "30"], ["0 < k"]),
        (["affinity", "--models", "A,C", "--dataset", "d", "--dataset-b", "other"], ["differ in size"]),
        (["affinity", "--models", "A,B", "--dataset", "d", "--layer0"], ["--layer0"]),
        (["neighbors", "--model", "A", "--layer", "1", "--dataset", "d"], ["exactly one of"]),
        (["neighbors", "--model", "A", "--layer", "1", "--dataset", "d", "--prompt", "99"], ["outside"]),
        (["neighbors", "--model", "A", "--layer", "7", "--dataset", "d", "--prompt", "1"], ["layer 7 is not stored"]),
        (["neighbors", "--model", "A", "--layer", "1", "--dataset", "d", "--text", "hi"], ["synthetic"]),
    ]
    for args, needles in cases:
        assert_clean_error(cli(*args, "--no-progress") if args[0] != "neighbors" else cli(*args), *needles)
    assert fingerprint(db_url) == before


def test_a_stored_prompts_vector_is_one_key_read_before_any_statistics(wh) -> None:
    """A lookup of a stored prompt reads the prompt's vector by primary key: one row, also
    right after an ingest, before the planner has the layer's statistics (as a join it read
    every row of the layer, twice: 349 ms a lookup at n = 100000)."""
    from psycopg import sql

    from layerbase.analysis.knn.lookup import STORED_QUERY
    from layerbase.warehouse.engine import raw_connection

    n = 3000
    store_synthetic(wh, "syn", "d", n=n, d=8, n_layers=2, seed=3)
    with wh.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM pg_stats WHERE tablename = 'activation'")).scalar() == 0
        model_id, dataset_id = conn.execute(sa.text("SELECT m.id, d.id FROM model m, dataset d")).one()
        query = sql.SQL(STORED_QUERY).format(
            column=sql.Identifier("vec"),
            model=sql.Literal(model_id),
            layer=sql.Literal(2),
            dataset=sql.Literal(dataset_id),
            position=sql.Literal(1234),
        )
        cur = raw_connection(conn).cursor()
        cur.execute(sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) SELECT {}").format(query))
        plan = cur.fetchone()[0][0]["Plan"]
        cur.execute(sql.SQL("SELECT {}::real[]").format(query))
        vector = np.array(cur.fetchone()[0], dtype=np.float32)
        positions, vectors = layer_vectors(conn, model_id, 2, dataset_id)

    def nodes(node: dict):
        yield node
        for child in node.get("Plans", []):
            yield from nodes(child)

    assert max(node["Actual Rows"] for node in nodes(plan)) == 1
    assert np.array_equal(vector, vectors[positions == 1234][0])


def test_neighbors_cli_uses_index_and_embeds_new_text(
    db_url: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    texts = random_texts(40, seed=11)
    cli("dataset", "add", "toy", str(write_lines(tmp_path / "t.txt", texts)))
    assert (
        cli(
            "ingest", "--model", str(tiny_models["llama"]), "--dataset", "toy", "--name", "tl", "--no-progress"
        ).exit_code
        == 0
    )
    exact = cli("neighbors", "--model", "tl", "--layer", "2", "--dataset", "toy", "--prompt", "3", "-k", "5", "--json")
    assert json.loads(exact.stdout)["path"].startswith("exact scan")
    assert (
        cli("knn", "--model", "tl", "--dataset", "toy", "--engine", "hnsw", "--k-max", "5", "--no-progress").exit_code
        == 0
    )
    indexed = json.loads(
        cli(
            "neighbors", "--model", "tl", "--layer", "2", "--dataset", "toy", "--prompt", "3", "-k", "5", "--json"
        ).stdout
    )
    assert indexed["path"].startswith("HNSW index hnsw_activation_") and "tuned by `layerbase knn`" in indexed["path"]
    asked = json.loads(
        cli(
            "neighbors",
            "--model",
            "tl",
            "--layer",
            "2",
            "--dataset",
            "toy",
            "--prompt",
            "3",
            "-k",
            "5",
            "--ef-search",
            "30",
            "--json",
        ).stdout
    )
    assert "ef_search 30, as asked" in asked["path"] and asked["neighbors"] == indexed["neighbors"]
    assert [r["position"] for r in indexed["neighbors"]] == [
        r["position"] for r in json.loads(exact.stdout)["neighbors"]
    ]
    assert 3 not in [r["position"] for r in indexed["neighbors"]]
    # With an exact stored set of at least k neighbours, a stored prompt is read from its row.
    assert cli("knn", "--model", "tl", "--dataset", "toy", "--k-max", "5", "--no-progress").exit_code == 0
    stored = json.loads(
        cli(
            "neighbors", "--model", "tl", "--layer", "2", "--dataset", "toy", "--prompt", "3", "-k", "4", "--json"
        ).stdout
    )
    assert stored["path"].startswith("stored k-NN set") and "blas engine" in stored["path"]
    scanned = json.loads(exact.stdout)["neighbors"][:4]
    assert [(r["position"], r["text"]) for r in stored["neighbors"]] == [(r["position"], r["text"]) for r in scanned]
    np.testing.assert_allclose(
        [r["distance"] for r in stored["neighbors"]], [r["distance"] for r in scanned], atol=2e-6
    )
    wider = json.loads(
        cli(
            "neighbors", "--model", "tl", "--layer", "2", "--dataset", "toy", "--prompt", "3", "-k", "6", "--json"
        ).stdout
    )
    assert wider["path"].startswith("HNSW index")  # more neighbours than the set holds
    # a new text equal to stored prompt 3 finds prompt 3 itself at distance ~0
    by_text = json.loads(
        cli(
            "neighbors", "--model", "tl", "--layer", "2", "--dataset", "toy", "--text", texts[3], "-k", "3", "--json"
        ).stdout
    )
    assert by_text["neighbors"][0]["position"] == 3 and by_text["neighbors"][0]["distance"] < 1e-5
    overlap = cli(
        "neighbors", "--model", "tl", "--layer", "1", "--dataset", "toy", "--prompt", "3", "--vs-layer", "4", "-k", "5"
    )
    assert overlap.exit_code == 0 and "Shared:" in overlap.output


def test_reader_role_reads_views_only(wh, db_url: str) -> None:
    store_synthetic(wh, "A", "d", n=30, d=8, n_layers=2, seed=1)
    store_synthetic(wh, "B", "d", n=30, d=8, n_layers=2, seed=2)
    compute_affinity(wh, "A", "B", "d", k=5, progress=False)
    result = cli("db", "grant-reader", "bi_reader", "--password-env", "READER_PW", env={"READER_PW": "pw-123"})
    assert result.exit_code == 0, result.output
    assert "pw-123" not in result.output
    reader = db_url.replace("postgres:@", "bi_reader:pw-123@")
    with psycopg.connect(reader, autocommit=True) as conn:
        for view in ("bi_affinity_cell", "bi_diagonal_test", "bi_max_similarity_path"):
            assert conn.execute(f"SELECT count(*) FROM {view}").fetchone()[0] > 0
        for statement in (
            "SELECT * FROM activation LIMIT 1",
            "SELECT * FROM prompt LIMIT 1",
            "SELECT * FROM model LIMIT 1",
            "DELETE FROM affinity_cell",
            "INSERT INTO dataset (name) VALUES ('x')",
            "CREATE TABLE mine (x int)",
            "CREATE VIEW mine AS SELECT 1",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    # running it again is harmless
    assert cli("db", "grant-reader", "bi_reader").exit_code == 0


def test_hnsw_builds_without_parallel_workers_on_affected_pgvector(old_wh, caplog) -> None:
    import logging

    wh = old_wh  # pgvector 0.6.2
    import layerbase.analysis.knn.index as hnsw

    assert hnsw.parallel_build_unsafe("0.6.2") and hnsw.parallel_build_unsafe("0.8.1")
    assert not hnsw.parallel_build_unsafe("0.8.2") and not hnsw.parallel_build_unsafe("0.5.1")
    store_synthetic(wh, "syn", "d", n=50, d=8, n_layers=1)
    hnsw._warned_parallel = False
    plan = hnsw.plan_index("hnsw", 1, 1, 1, 8, "0.6.2")
    with caplog.at_level(logging.WARNING, logger="layerbase.analysis.knn.index"), wh.engine.begin() as conn:
        hnsw.build_settings(conn, "hnsw")
        assert conn.execute(sa.text("SHOW max_parallel_maintenance_workers")).scalar() == "0"
    assert "CVE-2026-3172" in caplog.text and "without parallel workers" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="layerbase.analysis.knn.index"):  # said once per process
        assert hnsw.ensure_index(wh, plan, 1, 1, 1, 50).built
        assert not hnsw.ensure_index(wh, plan, 1, 1, 1, 50).built  # an existing index is not rebuilt
    assert "CVE" not in caplog.text


def test_hnsw_builds_get_the_memory_their_graph_needs_and_a_worker_per_core_but_one(wh) -> None:
    import os

    import layerbase.analysis.knn.index as hnsw
    from layerbase.warehouse.engine import raw_connection

    n, d = 3000, 2000
    store_synthetic(wh, "syn", "d", n=n, d=d, n_layers=1)
    plan = hnsw.plan_index("hnsw", 1, 1, 1, d, "0.8.5")
    assert plan.value_bytes == 8 + 4 * d
    needed = hnsw.graph_memory(n, plan.value_bytes, 16)
    assert needed > hnsw.PARTICIPANT_MEMORY  # so that the estimate, not the floor, sizes this build
    with wh.engine.begin() as conn:  # the embedded server: this machine's cores, the leader building too
        hnsw.build_settings(conn, "hnsw", n_rows=n, value_bytes=plan.value_bytes, embedded=True)
        workers = int(conn.execute(sa.text("SHOW max_parallel_maintenance_workers")).scalar_one())
        assert workers == max(0, (os.cpu_count() or 1) - 1)
        memory = conn.execute(sa.text("SELECT pg_size_bytes(current_setting('maintenance_work_mem'))")).scalar()
        assert memory >= max(needed, hnsw.PARTICIPANT_MEMORY * (workers + 1))

    def build(settings: list[str]) -> list[str]:
        """The notices of a build of the layer's index after these settings."""
        notices: list[str] = []
        with wh.engine.begin() as conn:
            conn.execute(sa.text(f'DROP INDEX IF EXISTS "{plan.name}"'))
            raw_connection(conn).add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
            for statement in settings:
                conn.execute(sa.text(statement))
            conn.execute(
                sa.text(
                    f'CREATE INDEX "{plan.name}" ON activation USING hnsw ((vec::vector({d})) vector_cosine_ops) '
                    "WHERE model_id = 1 AND layer = 1 AND dataset_id = 1"
                )
            )
        return notices

    # One process (no workers) with the estimate alone: the graph fits; with a third of it, it does not.
    workers_off = "SET LOCAL max_parallel_maintenance_workers = 0"
    assert not [m for m in build([workers_off, f"SET LOCAL maintenance_work_mem = '{needed >> 20}MB'"]) if "fits" in m]
    assert [m for m in build([workers_off, f"SET LOCAL maintenance_work_mem = '{needed // 3 >> 20}MB'"]) if "fits" in m]
    with wh.engine.begin() as conn:  # another server keeps its workers
        conn.execute(sa.text("SET LOCAL max_parallel_maintenance_workers = 3"))
        hnsw.build_settings(conn, "hnsw", n_rows=n, value_bytes=plan.value_bytes)
        assert conn.execute(sa.text("SHOW max_parallel_maintenance_workers")).scalar() == "3"
        memory = conn.execute(sa.text("SELECT pg_size_bytes(current_setting('maintenance_work_mem'))")).scalar()
        assert memory >= hnsw.PARTICIPANT_MEMORY * 4


def test_packed_arrays_hold_every_run_s_rows_and_migration_0010_packs_earlier_runs(wh, db_url: str) -> None:
    from layerbase.analysis.knn.stored import stored_sets as packed_sets
    from layerbase.warehouse.config import parse_url
    from layerbase.warehouse.schema import downgrade, upgrade

    store_synthetic(wh, "syn", "d", n=90, d=12, n_layers=2, seed=5)
    for engine in ("blas", "sql", "hnsw", "ivfflat"):
        materialize(wh, "syn", "d", k_max=7, engine=engine, progress=False)

    def rows_and_packed() -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        with wh.engine.connect() as conn:
            runs = conn.execute(sa.text("SELECT id FROM knn_run ORDER BY id")).scalars().all()
            rows = conn.execute(
                sa.text("SELECT run_id, neighbors, distances FROM knn_neighbor ORDER BY run_id, position")
            ).all()
            packed = packed_sets(conn, runs, 7, distances=True)
        assert len(runs) == 8 and len(rows) == 8 * 90
        by_run = {run: [r for r in rows if r.run_id == run] for run in runs}
        return [
            (
                np.array([r.neighbors for r in by_run[run]]),
                np.array([r.distances for r in by_run[run]], dtype=np.float32),
                *sets,
            )
            for run, sets in zip(runs, packed)
        ]

    def check(found: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        for neighbors, distances, packed_neighbors, packed_distances in found:
            assert np.array_equal(neighbors, packed_neighbors) and np.array_equal(distances, packed_distances)

    before = rows_and_packed()
    check(before)
    with wh.engine.connect() as conn:  # a prefix reads the first k of each prompt
        run = conn.execute(sa.text("SELECT min(id) FROM knn_run")).scalar()
        (first,) = packed_sets(conn, [run], 3)
        assert np.array_equal(first[0], before[0][0][:, :3])
        with pytest.raises(InputError, match="fewer than 8 neighbours"):
            packed_sets(conn, [run], 8)
        with pytest.raises(InputError, match="not stored"):
            packed_sets(conn, [run, 10_000], 3)
    # Runs stored before migration 0010 are packed from their rows by it.
    engine = sa.create_engine(parse_url(db_url))
    with engine.begin() as conn:
        downgrade(conn, "0009")
    with engine.begin() as conn:
        upgrade(conn)
    engine.dispose()
    after = rows_and_packed()
    check(after)
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(before, after))


def test_cli_offers_every_engine() -> None:
    from layerbase.analysis.knn.materialize import ENGINES
    from layerbase.cli.analyze import ENGINES as CLI_ENGINES

    assert sorted(CLI_ENGINES) == sorted(ENGINES)


def test_layer_vectors_come_in_position_order_whatever_the_storage_order(wh) -> None:
    vectors = clustered_vectors(50, 8, seed=6)
    store_synthetic(wh, "syn", "d", n=50, d=8, n_layers=1, layer_vectors={1: vectors})
    with wh.engine.begin() as conn:  # updated rows get new tuples at the end of the heap
        conn.execute(
            sa.text("UPDATE activation SET vec = vec WHERE prompt_id IN (SELECT id FROM prompt WHERE position < 10)")
        )
        stored = (
            conn.execute(sa.text("SELECT p.position FROM activation a JOIN prompt p ON p.id = a.prompt_id"))
            .scalars()
            .all()
        )
        positions, read = layer_vectors(conn, 1, 1, 1)
    assert stored != sorted(stored)  # the storage order really changed
    assert positions.tolist() == list(range(50))
    np.testing.assert_array_equal(read, vectors)


def test_lookups_get_their_own_ef_search_when_the_run_keeps_more_neighbours(wh) -> None:
    store_synthetic(wh, "syn", "d", n=400, d=32, n_layers=1, seed=2)
    [run] = materialize(wh, "syn", "d", k_max=30, engine="hnsw", min_recall=0.99, progress=False)
    assert run.search["tried"][0]["ef_search"] == 62  # 2(k_max + 1)
    lookup = run.search["lookup"]
    efs = [t["ef_search"] for t in lookup["tried"]]
    assert lookup["k"] == 10 and efs[0] == 22 and efs == sorted(efs) and lookup["ef_search"] == efs[-1]  # 2(k + 1)
    assert lookup["ef_search"] <= run.search["ef_search"]
    assert lookup["recall_low"] >= 0.99 or lookup["ef_search"] == run.search["ef_search"]


def test_lookup_calibration_widens_from_22_and_stops_at_the_runs_setting() -> None:
    from layerbase.analysis.knn.index import plan_index
    from layerbase.analysis.knn.search import SampleRecall, Search, calibrate_lookups

    def calibrate(plan, run_ef: int, passes_from: int) -> list[int]:
        tried: list[Search] = []

        def recall_of(search: Search) -> SampleRecall:
            tried.append(search)
            return SampleRecall.of([1.0 if search.breadth >= passes_from else 0.9] * 50)

        found = calibrate_lookups(plan, Search("hnsw", run_ef, 1000, 11), 10, 400, 50, 0.99, recall_of)
        assert [t["ef_search"] for t in found["tried"]] == [s.breadth for s in tried]
        assert {s.candidates for s in tried} == {plan.lookup_candidates(10)}  # lookups take their own candidates
        return [s.breadth for s in tried]

    plain = plan_index("hnsw", 1, 1, 1, 576, "0.6.2")
    assert calibrate(plain, 200, 50) == [22, 33, 50]  # by half a step until the recall is reached
    assert calibrate(plain, 40, 1000) == [22, 33, 40]  # never past the run's own, whose recall is known
    assert calibrate(plain, 15, 1000) == [15]
    prefix = plan_index("hnsw", 1, 1, 1, 2100, "0.6.2")  # lookups take 44 candidates, more than the run's 22
    assert calibrate(prefix, 22, 1000) == [44]


def test_sample_recall_passes_on_its_lower_confidence_bound() -> None:
    from layerbase.analysis.knn.search import SampleRecall

    perfect = SampleRecall.of([1.0] * 200)
    assert perfect.mean == perfect.low == 1.0 and perfect.reaches(0.99)
    mostly = SampleRecall.of([1.0] * 180 + [0.9] * 20)  # mean 0.99, but 20 prompts missed one
    assert mostly.mean == pytest.approx(0.99) and mostly.low < 0.99 and not mostly.reaches(0.99)
    assert mostly.reaches(0.98)


def test_search_widens_candidates_only_where_the_index_orders_roughly() -> None:
    from layerbase.analysis.knn.index import plan_index
    from layerbase.analysis.knn.search import initial_search
    from layerbase.warehouse.storage import FLOAT16

    prefix = plan_index("ivfflat", 1, 1, 1, 2100, "0.6.2")  # the first 2000 dimensions
    half = plan_index("ivfflat", 1, 1, 1, 2100, "0.8.5")  # all 2100, in half precision
    # rows stored in half precision: the index holds them normalized, rounded to half again
    stored_half = plan_index("ivfflat", 1, 1, 1, 576, "0.8.5", FLOAT16)
    plain = plan_index("ivfflat", 1, 1, 1, 576, "0.6.2")
    assert prefix.rough_order and prefix.reduced and not half.rough_order and half.reduced
    assert stored_half.reduced and not stored_half.rough_order and stored_half.lookup_candidates(10) == 22
    assert not plain.reduced
    for plan, grows in ((prefix, True), (half, False), (stored_half, False), (plain, False)):
        first = initial_search(plan, 10, 10000, None)
        assert first.candidates == (22 if plan.reduced else 11) and first.breadth == 5  # 100 lists / 20
        wider = first.wider(plan.rough_order, 10000)
        assert wider is not None and wider.breadth == 10
        assert wider.candidates == (44 if grows else first.candidates)
    # ef_search starts at 2(k + 1) and grows by half; it covers the candidates of a prefix index
    hnsw = initial_search(plan_index("hnsw", 1, 1, 1, 576, "0.6.2"), 10, 10000, None)
    assert (hnsw.breadth, hnsw.candidates) == (22, 11)
    assert [(s.breadth, s.candidates) for s in (hnsw.wider(False, 10000), hnsw.wider(True, 10000))] == [
        (33, 11),
        (33, 22),
    ]


def test_activation_like_vectors_have_a_real_models_neighbour_contrast() -> None:
    from layerbase.ingest.synthetic import activation_like_vectors

    def contrast(x: np.ndarray) -> float:  # how far the 1st neighbour is, against the 10th
        _, dist = exact_topk(x, 10)
        return float(np.median(dist[:, 0]) / np.median(dist[:, 9]))

    like = activation_like_vectors(1024, 576, seed=0)
    assert like.shape == (1024, 576) and like.dtype == np.float32
    assert (like == activation_like_vectors(1024, 576, seed=0)).all()
    unit = like / np.linalg.norm(like, axis=1, keepdims=True)
    variance = np.linalg.svd(unit - unit.mean(0), compute_uv=False) ** 2
    half = int(np.searchsorted(np.cumsum(variance) / variance.sum(), 0.5)) + 1
    assert 6 <= half <= 20  # SmolLM2 layer 15: 13 components hold half the variance
    assert 0.72 <= contrast(like) <= 0.85  # SmolLM2 layer 15: 0.76
    assert contrast(clustered_vectors(1024, 576, seed=0)) > 0.88  # isotropic noise: near ties


def test_filtered_lookups_keep_their_recall_through_iterative_index_scans(wh, monkeypatch) -> None:
    from layerbase.analysis.knn import lookup
    from layerbase.analysis.knn.lookup import PromptFilter, nearest

    store_synthetic(wh, "syn", "d", n=3000, d=32, n_layers=1, seed=4)  # source_ref = the position
    materialize(wh, "syn", "d", k_max=10, engine="hnsw", min_recall=0.9, progress=False)
    only = PromptFilter(source="%77%")  # 2 % of the prompts: 77, 177, ..., 770-779, 1077, ...
    passing = {i for i in range(3000) if "77" in str(i)}
    with wh.engine.connect() as conn:
        _, vectors = layer_vectors(conn, 1, 1, 1)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    found = []
    for position in (5, 500, 2999):
        answer = nearest(wh, "syn", 1, "d", position=position, only=only)
        # the stored exact set knows nothing of the filter: the index answers, and walks on
        assert "HNSW index" in answer.path and "iterative scan" in answer.path
        assert len(answer.rows) == 10 and set(answer.positions) <= passing - {position}
        candidates = np.array(sorted(passing - {position}))
        truth = candidates[np.argsort(1 - unit[candidates] @ unit[position], kind="stable")[:10]]
        found.append(len(set(answer.positions) & set(truth)) / 10)
        exact = nearest(wh, "syn", 1, "d", position=position, only=only, exact=True)
        assert exact.positions == list(truth) and exact.path == "exact scan"
    assert np.mean(found) >= 0.95
    both = nearest(wh, "syn", 1, "d", position=1, only=PromptFilter(text="PROMPT 17", source="%7%"), k=5)
    assert all("17" in str(p) for p in both.positions) and len(both.rows) == 5
    # without iterative scans (pgvector < 0.8) the index finds too few: an exact scan answers
    monkeypatch.setattr(lookup, "ITERATIVE_SCAN", (9, 9, 9))
    fallback = nearest(wh, "syn", 1, "d", position=5, only=only)
    assert fallback.path.startswith("exact scan; the HNSW index found fewer than 10")
    assert fallback.positions == nearest(wh, "syn", 1, "d", position=5, only=only, exact=True).positions
    with pytest.raises(InputError, match=r"no prompt of 'd' other than the query passes the filter"):
        nearest(wh, "syn", 1, "d", position=5, only=PromptFilter(source="nothing%"))
    with pytest.raises(InputError, match=r"only 1 prompts of 'd' other than the query pass the filter"):
        nearest(wh, "syn", 1, "d", position=5, only=PromptFilter(source="2777"), k=3)
    with pytest.raises(InputError, match="an empty filter"):
        PromptFilter(text="")


def test_k_max_beyond_what_a_run_s_packed_sets_hold_is_refused_before_any_work(wh, monkeypatch) -> None:
    import layerbase.analysis.knn.materialize as materialize_module

    store_synthetic(wh, "syn", "d", n=40, d=8, n_layers=1)
    monkeypatch.setattr(materialize_module, "MAX_PACKED_SETS", 200)  # PostgreSQL's 1 GB, scaled down
    with pytest.raises(InputError, match="lower --k-max to 5 or less"):
        materialize(wh, "syn", "d", k_max=6, progress=False)
    assert materialize(wh, "syn", "d", k_max=5, progress=False)[0].k_max == 5
