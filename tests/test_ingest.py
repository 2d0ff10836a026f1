"""Ingest end to end: counts, provenance, resume after kill -9, shared work, bad inputs."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
import torch

from layerbase.ingest.extract import ExtractionSettings, Extractor
from layerbase.ingest.loading import load_model
from layerbase.ingest.runner import ensure_job, ensure_model, run_job
from tests.conftest import new_database, random_texts, write_lines
from tests.helpers import assert_clean_error, cli, cli_subprocess, fingerprint

PROVENANCE = """
SELECT m.source, m.revision, m.dtype, m.pooling, m.padding_side, m.hook_site, m.transformers_version,
       e.n_tokens, e.n_tokens_full, e.truncated, j.settings->>'torch' AS torch_version
FROM activation a
JOIN model m ON m.id = a.model_id
JOIN prompt_encoding e ON e.model_id = a.model_id AND e.prompt_id = a.prompt_id
JOIN ingest_job j ON j.id = e.job_id
WHERE a.layer = 2 AND a.prompt_id = (SELECT min(prompt_id) FROM activation)
"""


def activations(url: str) -> list[tuple]:
    """(model name, layer, dataset position, vector text) of every stored activation, in order."""
    with psycopg.connect(url) as conn:
        return conn.execute(
            """SELECT m.name, a.layer, p.position, a.vec::text FROM activation a
               JOIN model m ON m.id = a.model_id JOIN prompt p ON p.id = a.prompt_id
               ORDER BY 1, 2, 3"""
        ).fetchall()


def test_ingest_stores_every_layer_of_every_prompt(db_url: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    texts = random_texts(21) + ["markets " * 60]
    assert cli("dataset", "add", "toy", str(write_lines(tmp_path / "toy.txt", texts))).exit_code == 0
    result = cli(
        "ingest",
        "--model",
        str(tiny_models["llama"]),
        "--dataset",
        "toy",
        "--name",
        "tiny-llama",
        "--batch-size",
        "5",
        "--max-tokens",
        "48",
        "--layer0",
        "--no-progress",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["state"] == "done" and report["prompts_done"] == 22 and report["n_truncated_now"] == 1

    with psycopg.connect(db_url) as conn:
        counts = conn.execute("SELECT layer, count(*) FROM activation GROUP BY layer ORDER BY layer").fetchall()
        dims = conn.execute("SELECT DISTINCT vector_dims(vec) FROM activation").fetchall()
        prov = conn.execute(PROVENANCE).fetchone()
        truncated = conn.execute("SELECT count(*) FROM prompt_encoding WHERE truncated").fetchone()[0]
    assert counts == [(layer, 22) for layer in range(0, 5)]
    assert dims == [(32,)]
    assert prov[0] == str(tiny_models["llama"]) and prov[2] == "float32" and prov[3] == "last"
    assert prov[4] == "right" and prov[5] == "model.layers[i] output" and prov[6] and prov[10]
    assert truncated == 1

    again = cli(
        "ingest",
        "--model",
        str(tiny_models["llama"]),
        "--dataset",
        "toy",
        "--name",
        "tiny-llama",
        "--batch-size",
        "5",
        "--max-tokens",
        "48",
        "--layer0",
        "--no-progress",
        "--json",
    )
    assert json.loads(again.stdout)["prompts_written_now"] == 0

    jobs = cli("jobs", "--json")
    assert json.loads(jobs.stdout)[0]["truncated"] == 1
    assert "tiny-llama" in cli("models").output


def test_stored_vectors_equal_extraction(db_url: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    texts = random_texts(7, seed=4)
    cli("dataset", "add", "toy", str(write_lines(tmp_path / "t.txt", texts)))
    assert cli("ingest", "--model", str(tiny_models["gpt2"]), "--dataset", "toy", "--no-progress").exit_code == 0
    lm = load_model(str(tiny_models["gpt2"]), device="cpu")
    expected = Extractor(lm, ExtractionSettings())(texts).vectors
    rows = activations(db_url)
    stored = np.array([json.loads(v) for *_, v in rows], dtype=np.float32).reshape(3, 7, 32).transpose(1, 0, 2)
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-6)


def test_settings_conflict_needs_a_new_name(db_url: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    cli("dataset", "add", "toy", str(write_lines(tmp_path / "t.txt", random_texts(4))))
    base = ["ingest", "--model", str(tiny_models["gpt2"]), "--dataset", "toy", "--no-progress"]
    assert cli(*base).exit_code == 0
    before = fingerprint(db_url)
    assert_clean_error(cli(*base, "--pooling", "mean"), "already used for another extraction", "--name")
    assert fingerprint(db_url) == before
    assert cli(*base, "--pooling", "mean", "--name", "gpt2-mean").exit_code == 0


def test_killed_ingest_resumes_without_duplicates_or_gaps(
    pg_server, db_url: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    texts = random_texts(400, seed=7, words=30)
    data = write_lines(tmp_path / "t.txt", texts)
    args = [
        "ingest",
        "--model",
        str(tiny_models["llama"]),
        "--dataset",
        "toy",
        "--name",
        "m",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    cli("dataset", "add", "toy", str(data))

    proc = cli_subprocess(*args)
    deadline = time.time() + 120
    with psycopg.connect(db_url, autocommit=True) as conn:
        while time.time() < deadline:
            done = conn.execute("SELECT count(*) FROM ingest_chunk WHERE done").fetchone()[0]
            if done >= 5:
                break
            time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with psycopg.connect(db_url) as conn:
        done, total = conn.execute("SELECT count(*) FILTER (WHERE done), count(*) FROM ingest_chunk").fetchone()
        stored = conn.execute("SELECT count(*) FROM activation").fetchone()[0]
    assert 5 <= done < total, "the kill must land mid-job"
    assert stored == done * 2 * 4  # whole chunks only: 2 prompts x 4 layers each

    resumed = cli(*args, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["prompts_written_now"] == 400 - done * 2

    reference = new_database(pg_server)
    env = {"LAYERBASE_DATABASE_URL": reference}
    cli("dataset", "add", "toy", str(data), env=env)
    assert cli(*args, env=env).exit_code == 0
    assert activations(db_url) == activations(reference)  # row for row, identical vectors
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM prompt_encoding").fetchone()[0] == 400


class SlowExtractor:
    """Wraps an extractor so that each batch takes a while (test-side, to force overlap)."""

    def __init__(self, inner: Extractor, delay: float) -> None:
        self.inner, self.delay = inner, delay

    def __call__(self, texts):
        time.sleep(self.delay)
        return self.inner(texts)


def test_concurrent_workers_share_a_job(wh, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from sqlalchemy.orm import Session

    from layerbase.ingest.datasets import add_datasets, get_dataset
    from layerbase.ingest.sources import read_path

    add_datasets(wh, [("toy", read_path(write_lines(tmp_path / "t.txt", random_texts(30))))])
    lm = load_model(str(tiny_models["gpt2"]), device="cpu")
    extractor = Extractor(lm, ExtractionSettings())
    with Session(wh.engine) as session, session.begin():
        model = ensure_model(session, lm, "gpt2", extractor)
        job = ensure_job(session, model, get_dataset(session, "toy"), include_layer0=False, batch_size=2)
        session.expunge(job)

    reports = []
    errors = []

    # One model copy per worker, as separate processes would have: hooks are per module.
    extractors = [
        SlowExtractor(Extractor(load_model(str(tiny_models["gpt2"]), device="cpu"), ExtractionSettings()), 0.05)
        for _ in range(3)
    ]

    def work(extractor: SlowExtractor) -> None:
        try:
            reports.append(
                run_job(
                    wh,
                    job,
                    extractor,
                    model_name="gpt2",
                    dataset_name="toy",
                    progress=False,
                )
            )
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(e,)) for e in extractors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(r.prompts_written_now for r in reports) == 30
    assert all(r.prompts_written_now > 0 for r in reports), "every worker should have done some of the work"
    with wh.engine.connect() as conn:
        import sqlalchemy as sa

        per_layer = conn.execute(sa.text("SELECT count(*), count(DISTINCT (layer, prompt_id)) FROM activation")).one()
        workers = conn.execute(sa.text("SELECT count(DISTINCT worker) FROM ingest_chunk")).scalar()
        state = conn.execute(sa.text("SELECT state FROM ingest_job")).scalar()
    assert per_layer == (90, 90)
    assert workers == 1  # threads of one process share the worker id (host:pid)
    assert state == "done"


def test_two_cli_processes_write_each_activation_once(
    db_url: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    cli("dataset", "add", "toy", str(write_lines(tmp_path / "t.txt", random_texts(300, words=30))))
    args = ["ingest", "--model", str(tiny_models["llama"]), "--dataset", "toy", "--batch-size", "2", "--no-progress"]
    procs = [cli_subprocess(*args) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    with psycopg.connect(db_url) as conn:
        rows, distinct = conn.execute("SELECT count(*), count(DISTINCT (layer, prompt_id)) FROM activation").fetchone()
        state = conn.execute("SELECT state FROM ingest_job").fetchone()[0]
    assert rows == distinct == 300 * 4
    assert state == "done"


def test_nan_activations_name_the_prompt_and_store_nothing_of_the_batch(
    db_url: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "nan-llama"
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(broken)

    cli("dataset", "add", "toy", str(write_lines(tmp_path / "t.txt", random_texts(6))))
    before = fingerprint(db_url)
    result = cli("ingest", "--model", str(broken), "--dataset", "toy", "--no-progress")
    assert_clean_error(result, "prompt 0", "'toy'", "NaN/Inf", "layer 3")
    after = fingerprint(db_url)
    for table in ("activation", "prompt_encoding", "prompt", "dataset"):
        assert after[table] == before[table]
    jobs = json.loads(cli("jobs", "--json").stdout)
    assert jobs[0]["state"] == "failed" and "NaN" in jobs[0]["error"]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--model", "/no/such/dir"], ["does not exist"]),
        (["--model", "no-org/unknown-model-xyz"], ["not a local path"]),
        (["--model", "{gpt2}", "--dataset", "nope"], ["no dataset named 'nope'"]),
        (["--model", "{gpt2}", "--batch-size", "0"], ["--batch-size"]),
        (["--model", "{gpt2}", "--max-tokens", "-3"], ["--max-tokens"]),
        (["--model", "{gpt2}", "--chat-template"], ["no chat template"]),
        (["--model", "{tmp}"], ["not a model directory"]),
        (["--model", "{gpt2}", "--device", "cuda:0"], ["CUDA is not available"]),
    ],
)
def test_bad_ingest_inputs(
    db_url: str, tiny_models: dict[str, Path], tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    cli("dataset", "add", "toy", str(write_lines(tmp_path / "t.txt", random_texts(3))))
    before = fingerprint(db_url)
    args = [a.format(gpt2=tiny_models["gpt2"], tmp=tmp_path) for a in args]
    if "--dataset" not in args:
        args += ["--dataset", "toy"]
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_clean_error(cli("ingest", *args, "--no-progress"), *needles)
    assert fingerprint(db_url) == before


def test_embedding_export(wh, db_url: str, tiny_models: dict[str, Path]) -> None:
    result = cli("embeddings", "export", "--model", str(tiny_models["llama"]), "--name", "tl", "--no-progress")
    assert result.exit_code == 0, result.output
    lm = load_model(str(tiny_models["llama"]), device="cpu")
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT matrix, count(*), max(vector_dims(vec)) FROM token_embedding GROUP BY matrix ORDER BY matrix"
        ).fetchall()
        text = conn.execute(
            "SELECT text, vec::text FROM token_embedding WHERE matrix = 'input' AND token_id = 300"
        ).fetchone()
    assert rows == [("input", lm.vocab_size, 32), ("output", lm.vocab_size, 32)]
    assert text[0] == lm.tokenizer.decode([300])
    np.testing.assert_allclose(
        json.loads(text[1]), lm.model.get_input_embeddings().weight[300].detach().numpy(), rtol=1e-6
    )
    # re-export replaces, never duplicates
    assert (
        cli("embeddings", "export", "--model", str(tiny_models["llama"]), "--name", "tl", "--no-progress").exit_code
        == 0
    )
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM token_embedding").fetchone()[0] == 2 * lm.vocab_size
