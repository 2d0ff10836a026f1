"""Bad input across the CLI: one line naming the problem and the fix, a non-zero exit,
no traceback, and the database exactly as it was (rows, checksums, indexes, roles)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from layerbase.ingest.synthetic import store_synthetic
from tests.conftest import random_texts, write_lines
from tests.helpers import assert_clean_error, cli, fingerprint

SQL_NAME = "x'); DROP TABLE activation; --"


def make_files(tmp: Path) -> dict[str, Path]:
    files = {
        "bad.jsonl": '{"text": "fine"}\n{"text": "broken\n',
        "nofield.jsonl": '{"text": "fine"}\n{"body": "x"}\n',
        "bad.csv": 'text\n"fine"\n"unterminated\n',
        "nocol.csv": "body\nx\n",
        "empty.txt": "",
        "ok.txt": "one\ntwo\n",
        "pairs.txt": "links :: rechts\nkaputt\n",
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "bad.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(pa.table({"body": ["x"]}), tmp / "nocol.parquet")
    (tmp / "latin1.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    (tmp / "notamodel").mkdir()
    (tmp / "notamodel" / "notes.txt").write_text("hello")
    (tmp / "nodir").mkdir()
    np.save(tmp / "wide.npy", np.ones(16, dtype=np.float32))
    np.save(tmp / "nan.npy", np.array([np.nan] * 8, dtype=np.float32))
    np.save(tmp / "matrix.npy", np.ones((2, 8), dtype=np.float32))
    return {p.name: p for p in tmp.iterdir()}


CASES: list[tuple[str, list[str], list[str]]] = [
    ("malformed JSONL", ["dataset", "add", "n", "{bad.jsonl}", "--field", "text"], ["line 2", "malformed JSON"]),
    ("JSONL without the field", ["dataset", "add", "n", "{nofield.jsonl}", "--field", "text"], ["line 2", "--field"]),
    ("malformed CSV", ["dataset", "add", "n", "{bad.csv}", "--column", "text"], ["malformed CSV"]),
    (
        "CSV without the column",
        ["dataset", "add", "n", "{nocol.csv}", "--column", "text"],
        ["no column 'text'", "--column"],
    ),
    ("malformed Parquet", ["dataset", "add", "n", "{bad.parquet}", "--column", "text"], ["not a readable Parquet"]),
    ("Parquet without the column", ["dataset", "add", "n", "{nocol.parquet}", "--column", "text"], ["no column"]),
    ("empty dataset", ["dataset", "add", "n", "{empty.txt}"], ["holds no prompts"]),
    ("non-UTF-8 text", ["dataset", "add", "n", "{latin1.txt}"], ["line 2", "UTF-8", "re-encode"]),
    ("missing file", ["dataset", "add", "n", "{ok.txt}.gone"], ["does not exist"]),
    ("directory without .txt", ["dataset", "add", "n", "{nodir}"], ["no .txt files"]),
    ("malformed pairs file", ["dataset", "add-pairs", "l", "r", "{pairs.txt}"], ["line 2", "--separator"]),
    ("sample larger than the source", ["dataset", "add", "n", "{ok.txt}", "--sample", "5"], ["lower --sample"]),
    (
        "parallel to a dataset of another size",
        ["dataset", "add", "n", "{ok.txt}", "--parallel-to", "d"],
        ["same count"],
    ),
    ("unknown model id", ["ingest", "--model", "no-org/no-such-model", "--dataset", "small"], ["not a local path"]),
    ("non-model directory", ["ingest", "--model", "{notamodel}", "--dataset", "small"], ["not a model directory"]),
    ("missing model path", ["ingest", "--model", "./nowhere/model.gguf", "--dataset", "small"], ["does not exist"]),
    ("unknown dataset", ["ingest", "--model", "{gpt2}", "--dataset", "nope"], ["no dataset named 'nope'"]),
    ("batch size 0", ["ingest", "--model", "{gpt2}", "--dataset", "small", "--batch-size", "0"], ["--batch-size"]),
    (
        "negative token limit",
        ["ingest", "--model", "{gpt2}", "--dataset", "small", "--max-tokens", "-1"],
        ["--max-tokens"],
    ),
    (
        "layers out of range",
        ["knn", "--model", "A", "--dataset", "d", "--layers", "2-9"],
        ["layer 4", "stored layers are 1..3"],
    ),
    ("layers not a list", ["knn", "--model", "A", "--dataset", "d", "--layers", "one"], ["not a layer list"]),
    ("k >= n", ["knn", "--model", "A", "--dataset", "d", "--k-max", "40"], ["k = 40", "lower --k-max"]),
    ("k <= 0", ["knn", "--model", "A", "--dataset", "d", "--k-max", "0"], ["k = 0"]),
    (
        "index parameters for the blas engine",
        ["knn", "--model", "A", "--dataset", "d", "--k-max", "10", "--hnsw-m", "8"],
        ["--hnsw-m sets how an index is built", "--engine hnsw"],
    ),
    (
        "lists for an hnsw index",
        ["knn", "--model", "A", "--dataset", "d", "--k-max", "10", "--engine", "hnsw", "--lists", "4"],
        ["--lists builds ivfflat indexes", "--engine ivfflat"],
    ),
    (
        "hnsw m out of range",
        ["knn", "--model", "A", "--dataset", "d", "--k-max", "10", "--engine", "hnsw", "--hnsw-m", "1"],
        ["--hnsw-m 1", "2-100"],
    ),
    (
        "ef_construction below 2 m",
        [
            "knn",
            "--model",
            "A",
            "--dataset",
            "d",
            "--k-max",
            "10",
            "--engine",
            "hnsw",
            "--hnsw-m",
            "16",
            "--ef-construction",
            "20",
        ],
        ["ef_construction (20) >= 2 x m (16)"],
    ),
    (
        "more lists than prompts",
        ["knn", "--model", "A", "--dataset", "d", "--k-max", "10", "--engine", "ivfflat", "--lists", "500"],
        ["--lists 500", "lower it"],
    ),
    ("affinity k >= n", ["affinity", "--models", "A,B", "--dataset", "d", "-k", "40"], ["k = 40", "lower -k"]),
    (
        "parallel datasets of different sizes",
        ["affinity", "--models", "A,C", "--dataset", "d", "--dataset-b", "e"],
        ["differ in size", "add-pairs"],
    ),
    (
        "datasets that are not parallel",
        ["affinity", "--models", "A,D", "--dataset", "d", "--dataset-b", "f"],
        ["not parallel", "add-pairs"],
    ),
    ("one model for an affinity", ["affinity", "--models", "A", "--dataset", "d"], ["at least two"]),
    (
        "model not ingested on the dataset",
        ["knn", "--model", "C", "--dataset", "d"],
        ["has not been ingested", "layerbase ingest"],
    ),
    (
        "prompt outside the dataset",
        ["neighbors", "--model", "A", "--layer", "1", "--dataset", "d", "--prompt", "99"],
        ["outside"],
    ),
    ("name with SQL in it", ["knn", "--model", SQL_NAME, "--dataset", "d"], ["no model named"]),
    ("dataset name with quotes", ["dataset", "show", 'a"; DELETE FROM prompt; --'], ["no dataset named"]),
    (
        "report over an unknown dataset",
        ["report", "--models", "A,B", "--datasets", "zzz", "--out", "{tmp}/r"],
        ["no dataset named 'zzz'"],
    ),
    ("reader role that is a superuser", ["db", "grant-reader", "postgres"], ["superuser", "another name"]),
    (
        "steering vector of the wrong width",
        ["steer", "import", "--model", "A", "--layer", "1", "--file", "{wide.npy}", "--name", "w"],
        ["16 wide", "8 wide", "steer transfer"],
    ),
    (
        "steering vector with NaN",
        ["steer", "import", "--model", "A", "--layer", "1", "--file", "{nan.npy}", "--name", "w"],
        ["NaN"],
    ),
    (
        "steering vector that is a matrix",
        ["steer", "import", "--model", "A", "--layer", "1", "--file", "{matrix.npy}", "--name", "w"],
        ["one-dimensional"],
    ),
    (
        "steering layer out of range",
        ["steer", "make", "--model", "A", "--layer", "9", "--preset", "sentiment", "--name", "s"],
        ["layer 9", "1..3"],
    ),
    ("steering without prompts", ["steer", "make", "--model", "A", "--layer", "1", "--name", "s"], ["exactly one"]),
    ("unknown steering vector", ["steer", "evaluate", "nope"], ["no steering vector named 'nope'", "steer make"]),
    ("coefficients that are not numbers", ["steer", "evaluate", "nope", "--coefficients", "a,b"], ["--coefficients"]),
    ("geometry before exporting embeddings", ["geometry", "global", "--models", "A,B"], ["embeddings export"]),
    ("local geometry of one model", ["geometry", "local", "--models", "A"], ["exactly two"]),
]


@pytest.fixture
def bad_input_world(wh, db_url: str, tmp_path: Path, tiny_models: dict[str, Path]) -> dict[str, str]:
    files = make_files(tmp_path)
    store_synthetic(wh, "A", "d", n=40, d=8, n_layers=3, seed=1)
    store_synthetic(wh, "B", "d", n=40, d=8, n_layers=2, seed=2)
    store_synthetic(wh, "C", "e", n=30, d=8, n_layers=2, seed=3)
    store_synthetic(wh, "D", "f", n=40, d=8, n_layers=2, seed=4)
    assert cli("dataset", "add", "small", str(write_lines(tmp_path / "small.txt", random_texts(3)))).exit_code == 0
    assert (
        cli("knn", "--model", "A", "--dataset", "d", "--engine", "hnsw", "--k-max", "5", "--no-progress").exit_code == 0
    )
    return {**{k: str(v) for k, v in files.items()}, "gpt2": str(tiny_models["gpt2"]), "tmp": str(tmp_path)}


def test_at_least_25_bad_inputs_are_refused_cleanly_and_change_nothing(
    db_url: str, bad_input_world: dict[str, str]
) -> None:
    assert len(CASES) >= 25
    before = fingerprint(db_url)
    for label, args, needles in CASES:
        filled = [re.sub(r"\{([\w.]+)\}", lambda m: bad_input_world[m.group(1)], a) for a in args]
        result = cli(*filled)
        try:
            assert_clean_error(result, *needles)
        except AssertionError as exc:
            raise AssertionError(f"{label}: {exc}") from None
        assert fingerprint(db_url) == before, label


@pytest.mark.parametrize(
    "url, needles",
    [
        ("not a url", ["not a valid database URL", "postgresql://"]),
        ("sqlite:///x.db", ["PostgreSQL", "postgresql://"]),
        ("postgresql://u:TopSecret@127.0.0.1:9/db", ["cannot reach the database", "DATABASE_URL"]),
    ],
)
def test_bad_database_urls(url: str, needles: list[str]) -> None:
    result = cli("dataset", "list", env={"LAYERBASE_DATABASE_URL": url})
    assert_clean_error(result, *needles)
    assert "TopSecret" not in result.output


def test_server_without_pgvector_changes_nothing(server_without_pgvector: str) -> None:
    for args in (["db", "upgrade"], ["dataset", "add-random", "r", "--count", "3"], ["jobs"]):
        assert_clean_error(
            cli(*args, env={"LAYERBASE_DATABASE_URL": server_without_pgvector}), "pgvector", "install pgvector"
        )
    with psycopg.connect(server_without_pgvector) as conn:
        assert (
            conn.execute("SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace").fetchone()[0] == 0
        )


def test_outdated_schema_changes_nothing(db_url: str, tmp_path: Path) -> None:
    import sqlalchemy as sa

    from layerbase.warehouse.config import parse_url
    from layerbase.warehouse.schema import downgrade

    engine = sa.create_engine(parse_url(db_url))
    with engine.begin() as conn:
        downgrade(conn, "0001")
    engine.dispose()
    before = fingerprint(db_url)
    for args in (["dataset", "add", "x", str(write_lines(tmp_path / "x.txt", ["a", "b"]))], ["jobs"], ["models"]):
        assert_clean_error(cli(*args), "behind the code", "layerbase db upgrade")
    assert fingerprint(db_url) == before


def test_half_precision_on_a_server_without_halfvec_changes_nothing(
    old_db_url: str, tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    assert cli("dataset", "add", "small", str(write_lines(tmp_path / "s.txt", random_texts(4)))).exit_code == 0
    before = fingerprint(old_db_url)
    result = cli("ingest", "--model", str(tiny_models["gpt2"]), "--dataset", "small", "--storage", "float16")
    assert_clean_error(result, "float16 storage needs the halfvec column", "pgvector 0.6.2", "pgvector 0.7 or later")
    assert fingerprint(old_db_url) == before
