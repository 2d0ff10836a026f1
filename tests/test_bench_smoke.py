"""The benchmark commands start and run on tiny shapes (timings are not checked here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


MODULES = [
    "bench.knn_blas",
    "bench.knn_indb",
    "bench.affinity",
    "bench.measures",
    "bench.study",
    "bench.ingest_overhead",
    "bench.lookup",
    "bench.steering_calibration",
    "bench.serve",
]


@pytest.mark.parametrize("module", MODULES)
def test_bench_help(module: str) -> None:
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "Usage:" in result.stdout


@pytest.mark.parametrize(
    "module, args, expected",
    [
        ("bench.knn_blas", ["--sizes", "300x16", "--k-max", "10", "--repeats", "1"], ["ratio"]),
        (
            "bench.knn_indb",
            [
                "--sizes",
                "300x16",
                "--repeats",
                "1",
                "--sample",
                "64",
                "--hnsw-m",
                "8",
                "--ef-construction",
                "16",
                "--lists",
                "9",
            ],
            ["ivfflat", "hnsw", "sql", "recall@10", "m 8, ef_construction 16", "lists 9"],
        ),
        (
            "bench.affinity",
            ["--shapes", "3x2", "--n", "120", "--d", "16", "--pairs", "2", "--repeats", "1"],
            ["per_pair/warehouse", "numpy overlap engine"],
        ),
        (
            "bench.measures",
            [
                "--measures",
                "linear_cka,cknna,procrustes",
                "--shape",
                "3x2",
                "--n",
                "64",
                "--widths",
                "16,12",
                "--pairs",
                "1",
                "--repeats",
                "1",
            ],
            ["per_pair/warehouse", "warehouse/in_memory", "procrustes"],
        ),
        (
            "bench.study",
            ["--families", "3x16,2x12,2x8", "--n", "64"],
            ["3 models (7 layers), n = 64, 3 pairs", "affinity", "ratio"],
        ),
        (
            "bench.ingest_overhead",
            ["--model", "all-MiniLM-L6-v2", "--prompts", "8", "--batch-size", "4", "--repeats", "1"],
            ["outside the forward pass"],
        ),
        (
            "bench.serve",
            ["--n", "300", "--d", "16", "--seconds", "1", "--clients", "2", "--no-text"],
            ["stored prompt", "p50/in_process", "rss_growth_%"],
        ),
        (
            "bench.lookup",
            ["--n", "1500", "--d", "16", "--queries", "10"],
            ["HNSW index", "stored k-NN set", "p50/numpy", "activation-like data, embedded server"],
        ),
        (
            "bench.knn_indb",
            [
                "--sizes",
                "300x2100",
                "--engines",
                "ivfflat,sql",
                "--repeats",
                "1",
                "--sample",
                "32",
                "--data",
                "isotropic",
                "--storage",
                "float16",
            ],
            ["ivfflat on halfvec(2100)", "exact scan, timed on 32", "isotropic data, embedded server, float16 storage"],
        ),
    ],
)
def test_bench_runs_on_tiny_shapes(module: str, args: list[str], expected: list[str]) -> None:
    # the benchmarks make their own throw-away embedded server
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LAYERBASE_DATABASE_URL")}
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    for text in expected:
        assert text in result.stdout, result.stdout


def test_paired_times_takes_the_median_of_each_rounds_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from bench import common

    # Three rounds, each (reference, subject): (1 s, 2 s), (2 s, 4 s), (1 s, 3 s). The clock is
    # read before and after each call.
    ticks = iter([0, 1, 1, 3, 3, 5, 5, 9, 9, 10, 10, 13])
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(ticks))
    calls: list[str] = []
    timed = common.paired_times(lambda: calls.append("ref") or "r", lambda: calls.append("sub") or "s", 3)
    assert calls == ["ref", "sub"] * 3  # back to back, round by round
    assert (timed.reference_s, timed.subject_s) == (1, 3)
    assert (timed.ratio, timed.low, timed.high, timed.spread) == (2, 2, 3, "2.00-3.00")
    assert (timed.reference, timed.subject) == ("r", "s")
    ticks = iter([0, 2, 2, 3])  # a subject timed on a sample of a tenth: 1 s stands for 10 s
    scaled = common.paired_times(lambda: None, lambda: None, 1, subject_scale=10)
    assert (scaled.reference_s, scaled.subject_s, scaled.ratio) == (2, 10, 5)
