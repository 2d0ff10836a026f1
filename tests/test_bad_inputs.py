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
    (tmp / "nul.txt").write_bytes(b"one\ntw\x00o\n")
    (tmp / "surrogate.jsonl").write_text('{"text": "\\ud800 half of a pair"}\n')
    (tmp / "nul.csv").write_bytes(b'text\n"a\x00b"\n')
    (tmp / "notamodel").mkdir()
    (tmp / "notamodel" / "notes.txt").write_text("hello")
    (tmp / "nodir").mkdir()
    np.save(tmp / "wide.npy", np.ones(16, dtype=np.float32))
    np.save(tmp / "nan.npy", np.array([np.nan] * 8, dtype=np.float32))
    np.save(tmp / "matrix.npy", np.ones((2, 8), dtype=np.float32))
    np.save(tmp / "huge.npy", np.ones((2100, 2048), dtype=np.float32))  # 17 MB: refused unread
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
        "a steering vector file of 17 MB",
        ["steer", "import", "--model", "A", "--layer", "1", "--file", "{huge.npy}", "--name", "w"],
        ["17,203,328 bytes", "save just the vector"],
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
    # bytes and text the database cannot store
    ("a NUL byte in a text file", ["dataset", "add", "n", "{nul.txt}"], ["line 2", "NUL byte"]),
    ("a NUL byte in a CSV file", ["dataset", "add", "n", "{nul.csv}", "--column", "text"], ["line 2", "NUL byte"]),
    ("a device of NUL bytes", ["dataset", "add", "n", "/dev/zero", "--format", "lines"], ["/dev/zero", "NUL byte"]),
    (
        "a lone surrogate from a JSON escape",
        ["dataset", "add", "n", "{surrogate.jsonl}", "--field", "text"],
        ["line 1", "lone surrogate", "U+D800"],
    ),
    ("a control character in a name", ["dataset", "add", "two\nlines", "{ok.txt}"], ["control character U+000A"]),
    ("a NUL in a model name", ["ingest", "--model", "{gpt2}", "--dataset", "small", "--name", "a\x00b"], ["NUL"]),
    # empty or impossible values
    (
        "an empty --text",
        ["neighbors", "--model", "A", "--layer", "1", "--dataset", "d", "--text", ""],
        ["--text", "is empty"],
    ),
    (
        "a blank --where-text",
        ["neighbors", "--model", "A", "--layer", "1", "--dataset", "d", "--prompt", "1", "--where-text", " "],
        ["--where-text", "is empty"],
    ),
    ("an empty prompt to steer", ["steer", "generate", "v", "--prompt", ""], ["--prompt", "is empty"]),
    ("an empty --alphabet", ["dataset", "add-random", "r", "--alphabet", ""], ["--alphabet is empty"]),
    ("a device that is none", ["ingest", "--model", "{gpt2}", "--dataset", "small", "--device", "gpu2"], ["'gpu2'"]),
    ("a CUDA device not here", ["ingest", "--model", "{gpt2}", "--dataset", "small", "--device", "cuda:7"], ["cuda:7"]),
    ("an empty layer range", ["knn", "--model", "A", "--dataset", "d", "--layers", "3-1"], ["empty range", "1-3"]),
    (
        "an output folder that cannot be made",
        ["report", "--models", "A,B", "--datasets", "d", "--out", "/proc/no/report"],
        ["cannot create the folder /proc/no/report"],
    ),
    (
        "a figure into a missing folder",
        ["affinity", "--models", "A,B", "--dataset", "d", "-k", "3", "--plot", "/no/such/dir/a.png"],
        ["--plot", "does not exist"],
    ),
    # options that would be silently ignored
    (
        "--lead-paragraphs on a plain file",
        ["dataset", "add", "n", "{ok.txt}", "--lead-paragraphs", "-1"],
        ["--lead-paragraphs", "txt_dir"],
    ),
    ("--lead-paragraphs 0", ["dataset", "add", "n", "{notamodel}", "--lead-paragraphs", "0"], ["at least 1"]),
    ("--field on a plain file", ["dataset", "add", "n", "{ok.txt}", "--field", "text"], ["lines has none"]),
    (
        "--decode-errors on Parquet",
        ["dataset", "add", "n", "{nocol.parquet}", "--column", "body", "--decode-errors", "replace"],
        ["already"],
    ),
    # unbounded inputs
    (
        "a billion random strings",
        ["dataset", "add-random", "r", "--count", "1000000000"],
        ["over the limit of 1,000,000 prompts", "LAYERBASE_MAX_PROMPTS"],
    ),
    ("a random string of 2M characters", ["dataset", "add-random", "r", "--length", "2000000"], ["MAX_PROMPT_CHARS"]),
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
        ("postgresql://u:TopSecret@127.0.0.1:9/db", ["cannot reach the database", "$LAYERBASE_DATABASE_URL"]),
        ("postgresql://u@localhost:5x32/db", ["not a valid database URL"]),
        ("postgresql://u@localhost:99999/db", ["port 99999", "1-65535"]),
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


def test_connection_errors_name_the_source_of_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    down = "postgresql://u:TopSecret@127.0.0.1:9/db"
    monkeypatch.delenv("LAYERBASE_DATABASE_URL", raising=False)
    assert_clean_error(cli("--database-url", down, "jobs"), "cannot reach", "--database-url", "leave it out")
    assert_clean_error(cli("jobs", env={"DATABASE_URL": down}), "cannot reach", "$DATABASE_URL", "unset it")
    result = cli("jobs", env={"LAYERBASE_DATABASE_URL": down})
    assert_clean_error(result, "$LAYERBASE_DATABASE_URL")
    assert "$DATABASE_URL" not in result.output


def test_every_reader_is_bounded_and_says_which_limit(db_url: str, tmp_path: Path, monkeypatch) -> None:
    import os
    import threading

    before = fingerprint(db_url)
    lines = write_lines(tmp_path / "ten.txt", random_texts(10))
    monkeypatch.setenv("LAYERBASE_MAX_PROMPTS", "5")
    assert_clean_error(cli("dataset", "add", "n", str(lines)), "10 prompts", "limit of 5 prompts", "--sample")
    (tmp_path / "dir").mkdir()
    for i in range(7):
        (tmp_path / "dir" / f"{i}.txt").write_text(f"text {i}")
    assert_clean_error(cli("dataset", "add", "n", str(tmp_path / "dir")), "more .txt files", "limit of 5")
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(6)]}), tmp_path / "six.parquet")
    assert_clean_error(cli("dataset", "add", "n", str(tmp_path / "six.parquet"), "--column", "text"), "6 rows")
    monkeypatch.setenv("LAYERBASE_MAX_PROMPTS", "many")
    assert_clean_error(cli("dataset", "add", "n", str(lines)), "LAYERBASE_MAX_PROMPTS='many'", "positive")
    monkeypatch.delenv("LAYERBASE_MAX_PROMPTS")

    monkeypatch.setenv("LAYERBASE_MAX_PROMPT_CHARS", "50")
    long = write_lines(tmp_path / "long.txt", ["short", "x" * 60])
    assert_clean_error(cli("dataset", "add", "n", str(long)), "line 2", "60 characters", "limit of 50")
    monkeypatch.delenv("LAYERBASE_MAX_PROMPT_CHARS")

    # a stream with no end (a FIFO fed forever) is read up to the byte limit, then refused
    monkeypatch.setenv("LAYERBASE_MAX_INPUT_BYTES", "100000")
    fifo = tmp_path / "endless"
    os.mkfifo(fifo)

    def feed() -> None:
        try:
            with open(fifo, "w") as f:
                while True:
                    f.write("yes, more text\n" * 1000)
        except (BrokenPipeError, OSError):
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    assert_clean_error(cli("dataset", "add", "n", str(fifo), "--format", "lines"), "limit of 100,000 bytes")
    writer.join(timeout=10)
    assert not writer.is_alive()
    assert fingerprint(db_url) == before


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(db_url: str, tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    (tmp_path / "bom.txt").write_bytes(bom + b"first\nsecond\n")
    (tmp_path / "bom.csv").write_bytes(bom + b"text,label\nfirst,1\n")
    assert cli("dataset", "add", "lines", str(tmp_path / "bom.txt")).exit_code == 0
    assert cli("dataset", "add", "table", str(tmp_path / "bom.csv"), "--column", "text").exit_code == 0
    with psycopg.connect(db_url) as conn:
        firsts = conn.execute("SELECT text FROM prompt WHERE position = 0 ORDER BY dataset_id").fetchall()
    assert firsts == [("first",), ("first",)]


def test_knn_adapts_its_default_k_to_a_small_dataset(wh, db_url: str) -> None:
    store_synthetic(wh, "A", "d", n=40, d=8, n_layers=1, seed=1)
    result = cli("knn", "--model", "A", "--dataset", "d", "--no-progress", "--json")
    assert result.exit_code == 0, result.output
    assert "'d' has 40 prompts, so each keeps its 39 nearest" in result.output
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT k_max FROM knn_run").fetchone()[0] == 39
