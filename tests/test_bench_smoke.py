"""The benchmark commands start and run on tiny shapes (timings are not checked here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("module", ["bench.knn_blas", "bench.affinity"])
def test_bench_help(module: str) -> None:
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "usage" in result.stdout


@pytest.mark.parametrize(
    "module, args, ratio_column",
    [
        ("bench.knn_blas", ["--sizes", "300x16", "--k-max", "10", "--repeats", "1"], "ratio"),
        ("bench.affinity", ["--shapes", "3x2", "--n", "120", "--d", "16", "--pairs", "2", "--repeats", "1"],
         "per_pair/sql"),
    ],
)
def test_bench_runs_on_tiny_shapes(module: str, args: list[str], ratio_column: str) -> None:
    # the benchmarks make their own throw-away embedded server
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LAYERBASE_DATABASE_URL")}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert ratio_column in result.stdout.splitlines()[-2]
