"""Faults survived, concurrent work shared, nothing lost (see docs/reliability.md)."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import psycopg
import pytest

from tests.conftest import new_database, random_texts, write_lines
from tests.helpers import cli, cli_subprocess
from tests.test_ingest import activations

N_PROMPTS = 300
BATCH = 2
LAYERS = 4  # the tiny Llama


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lines(tmp_path_factory.mktemp("data") / "prompts.txt", random_texts(N_PROMPTS, seed=21, words=30))


def ingest_args(model: Path) -> list[str]:
    return [
        "ingest",
        "--model",
        str(model),
        "--dataset",
        "toy",
        "--name",
        "m",
        "--batch-size",
        str(BATCH),
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def reference(pg_server, tiny_models: dict[str, Path], prompts_file: Path) -> list[tuple]:
    """The activations of an uninterrupted run."""
    url = new_database(pg_server)
    env = {"LAYERBASE_DATABASE_URL": url}
    assert cli("dataset", "add", "toy", str(prompts_file), env=env).exit_code == 0
    assert cli(*ingest_args(tiny_models["llama"]), env=env).exit_code == 0
    rows = activations(url)
    assert len(rows) == N_PROMPTS * LAYERS
    return rows


def chunks_done(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM ingest_chunk WHERE done").fetchone()[0]


def wait_for_chunks(url: str, target: int, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if chunks_done(url) >= target:
            return
        time.sleep(0.02)


@pytest.mark.parametrize("seed", range(5))
def test_sigkill_at_random_points_then_rerun_gives_identical_rows(
    seed: int, db_url: str, tiny_models: dict[str, Path], prompts_file: Path, reference: list[tuple]
) -> None:
    rng = random.Random(seed)
    cli("dataset", "add", "toy", str(prompts_file))
    kills = 2 if seed % 2 else 1  # odd seeds kill twice before the final run
    for _ in range(kills):
        proc = cli_subprocess(*ingest_args(tiny_models["llama"]))
        target = chunks_done(db_url) + rng.choice([0, rng.randint(1, 60)])
        if target == chunks_done(db_url):
            time.sleep(rng.uniform(0.2, 3.0))  # while the model loads or the first chunk runs
        else:
            wait_for_chunks(db_url, target, proc)
            time.sleep(rng.uniform(0, 0.05))  # anywhere inside the next chunk's transaction
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with psycopg.connect(db_url) as conn:
            stored, encoded, done = conn.execute(
                """SELECT (SELECT count(*) FROM activation), (SELECT count(*) FROM prompt_encoding),
                          (SELECT coalesce(sum(last_position - first_position + 1), 0) FROM ingest_chunk WHERE done)"""
            ).fetchone()
        assert stored == encoded * LAYERS == done * LAYERS  # whole chunks only, nothing half-written
        assert done < N_PROMPTS, "the kill must land before the job ends"
    final = cli(*ingest_args(tiny_models["llama"]), "--json")
    assert final.exit_code == 0, final.output
    assert json.loads(final.stdout)["state"] == "done"
    assert activations(db_url) == reference


def test_database_restart_during_ingest(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path], prompts_file: Path, reference: list[tuple]
) -> None:
    from layerbase.warehouse import embedded

    pgdata = tmp_path_factory.mktemp("restart") / "data"
    server = embedded.server(pgdata)
    try:
        url = new_database(server, template="template1")
        env = {"LAYERBASE_DATABASE_URL": url}
        assert cli("db", "upgrade", env=env).exit_code == 0
        assert cli("dataset", "add", "toy", str(prompts_file), env=env).exit_code == 0
        proc = cli_subprocess(*ingest_args(tiny_models["llama"]), "--json", env=env)
        wait_for_chunks(url, 5, proc)
        at_restart = chunks_done(url)
        embedded.pg_ctl(pgdata, "-w", "-m", "fast", "restart")
        out, err = proc.communicate(timeout=300)
        # The restart cut the ingest's connection mid-job; the ingest reconnects, claims the
        # chunk it lost again, and finishes in the same run.
        assert at_restart < N_PROMPTS // BATCH, "the restart must land before the job ends"
        assert proc.returncode == 0, err
        assert json.loads(out)["state"] == "done" and "Traceback" not in err
        assert "the database connection was lost" in err and "retrying the chunk" in err
        assert activations(url) == reference
    finally:
        embedded.stop_embedded(pgdata)


def test_three_workers_share_two_jobs_and_write_each_row_once(
    db_url: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    for name, seed in (("a", 1), ("b", 2)):
        cli("dataset", "add", name, str(write_lines(tmp_path / f"{name}.txt", random_texts(300, seed=seed, words=30))))
    args = [
        "ingest",
        "--model",
        str(tiny_models["llama"]),
        "--dataset",
        "a",
        "--dataset",
        "b",
        "--batch-size",
        "1",
        "--no-progress",
    ]
    procs = [cli_subprocess(*args) for _ in range(3)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    with psycopg.connect(db_url) as conn:
        rows, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT (model_id, layer, prompt_id)) FROM activation"
        ).fetchone()
        states = conn.execute("SELECT state FROM ingest_job ORDER BY id").fetchall()
        per_worker = conn.execute("SELECT worker, count(*) FROM ingest_chunk GROUP BY worker").fetchall()
    assert rows == distinct == 2 * 300 * LAYERS
    assert states == [("done",), ("done",)]
    assert len(per_worker) == 3, per_worker  # every worker did some of the work
    assert sum(n for _, n in per_worker) == 600


def test_concurrent_knn_and_affinity_runs_do_not_duplicate(wh, db_url: str) -> None:
    from layerbase.ingest.synthetic import store_synthetic

    store_synthetic(wh, "A", "d", n=400, d=64, n_layers=3, seed=1)
    store_synthetic(wh, "B", "d", n=400, d=64, n_layers=2, seed=2)
    knn = ["knn", "--model", "A", "--dataset", "d", "--k-max", "20", "--force", "--no-progress"]
    aff = ["affinity", "--models", "A,B", "--dataset", "d", "-k", "10", "--no-progress"]
    for args in (knn, aff):
        procs = [cli_subprocess(*args) for _ in range(2)]
        outputs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), outputs
    with psycopg.connect(db_url) as conn:
        runs = conn.execute(
            "SELECT m.name, r.layer, r.engine, count(*) OVER (PARTITION BY r.model_id, r.layer, r.engine), "
            "(SELECT sum(cardinality(n.neighbors)) FROM knn_neighbor n WHERE n.run_id = r.id) "
            "FROM knn_run r JOIN model m ON m.id = r.model_id ORDER BY 1, 2"
        ).fetchall()
        affinity = conn.execute("SELECT count(*) FROM affinity_run").fetchone()[0]
        cells = conn.execute(
            "SELECT count(*), count(DISTINCT (run_id, layer_a, layer_b)) FROM affinity_cell"
        ).fetchone()
        tests = conn.execute("SELECT count(*) FROM diagonal_test").fetchone()[0]
    assert [(r[0], r[1]) for r in runs] == [("A", 1), ("A", 2), ("A", 3), ("B", 1), ("B", 2)]
    assert all(r[3] == 1 for r in runs)  # one set per (model, layer, engine)
    assert all(r[4] == 400 * (20 if r[0] == "A" else 100) for r in runs)
    assert affinity == 1 and cells == (6, 6) and tests == 1


def test_a_deadlock_with_another_worker_is_retried(monkeypatch, caplog) -> None:
    import logging

    import psycopg
    import sqlalchemy as sa

    from layerbase.ingest import runner

    monkeypatch.setattr(runner, "CHUNK_RETRY_WAITS", (0.0, 0.0))
    calls: list[int] = []

    def deadlocked_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise sa.exc.OperationalError("UPDATE ingest_job", {}, psycopg.errors.DeadlockDetected("deadlock detected"))
        return "stored"

    with caplog.at_level(logging.WARNING, logger=runner.log.name):
        assert runner._retried("the job's state", deadlocked_once) == "stored"
    assert len(calls) == 2 and "a deadlock with another worker" in caplog.text and "the job's state" in caplog.text

    def always() -> None:
        raise sa.exc.OperationalError("UPDATE ingest_job", {}, psycopg.errors.DeadlockDetected("deadlock detected"))

    with pytest.raises(sa.exc.OperationalError):  # after the last wait, the error is the caller's
        runner._retried("the job's state", always)
