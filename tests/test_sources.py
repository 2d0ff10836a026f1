"""Prompt sources and dataset registration."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from layerbase.ingest.sources import generate_random, lead_of, read_pairs, read_path
from layerbase.warehouse.errors import InputError
from tests.helpers import assert_clean_error, cli, fingerprint


def test_every_file_format_reads_the_same_prompts(tmp_path: Path) -> None:
    texts = ["first prompt", "second, with a comma", 'third "quoted"']
    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    import csv

    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([[i, t] for i, t in enumerate(texts)])
    pq.write_table(pa.table({"text": texts}), tmp_path / "p.parquet")
    d = tmp_path / "dir"
    d.mkdir()
    for i, t in enumerate(texts):
        (d / f"{i:03}.txt").write_text(t)

    assert read_path(tmp_path / "p.txt").texts == texts
    assert read_path(tmp_path / "p.jsonl", field="text").texts == texts
    assert read_path(tmp_path / "p.csv", field="text").texts == texts
    assert read_path(tmp_path / "p.parquet", field="text").texts == texts
    assert read_path(d).texts == texts
    assert read_path(tmp_path / "p.txt").refs == ["line 1", "line 2", "line 3"]


def test_lead_paragraphs_end_where_a_paragraph_ends() -> None:
    article = "Title\n\nFirst para. It ends.\n\nSecond para.\n\nThird para.\n\nFourth."
    assert lead_of(article, 3) == "Title\n\nFirst para. It ends.\n\nSecond para."


def test_sampling_is_seeded_and_keeps_source_order(tmp_path: Path) -> None:
    prompts = read_path(Path(__file__).parent / "test_sources.py", "lines")  # any file with many lines
    a, b = prompts.sample(10, seed=3), prompts.sample(10, seed=3)
    assert a.texts == b.texts and a.refs == b.refs
    assert prompts.sample(10, seed=4).texts != a.texts
    lines = [int(r.split()[1]) for r in a.refs]
    assert lines == sorted(lines)
    with pytest.raises(InputError, match="more prompts than"):
        prompts.sample(10**6, seed=0)


def test_random_strings_follow_options() -> None:
    rs = generate_random(20, 7, "ab", seed=5)
    assert len(rs.texts) == 20 and all(len(t) == 7 and set(t) <= {"a", "b"} for t in rs.texts)
    assert generate_random(20, 7, "ab", seed=5).texts == rs.texts
    assert generate_random(20, 7, "ab", seed=6).texts != rs.texts


def test_pairs_file_gives_two_parallel_sets(tmp_path: Path) -> None:
    f = tmp_path / "de-en"
    f.write_text("Guten Morgen :: Good morning\nDanke :: Thank you\n")
    left, right = read_pairs(f, " :: ")
    assert left.texts == ["Guten Morgen", "Danke"] and right.texts == ["Good morning", "Thank you"]


def test_cli_registers_datasets_idempotently(db_url: str, tmp_path: Path) -> None:
    f = tmp_path / "prompts.txt"
    f.write_text("alpha\nbeta\ngamma\n")
    first = cli("dataset", "add", "greek", str(f))
    assert first.exit_code == 0 and "Registered dataset 'greek': 3 prompts" in first.output
    again = cli("dataset", "add", "greek", str(f))
    assert "Already registered" in again.output
    f.write_text("delta\n")
    assert_clean_error(cli("dataset", "add", "greek", str(f)), "already exists", "another name")
    listing = cli("dataset", "list", "--json")
    assert json.loads(listing.stdout)[0]["prompts"] == 3
    shown = cli("dataset", "show", "greek", "--json")
    assert [r["text"] for r in json.loads(shown.stdout)] == ["alpha", "beta", "gamma"]


def test_parallel_datasets_link_prompt_to_prompt(db_url: str, tmp_path: Path) -> None:
    f = tmp_path / "de-en.txt"
    f.write_text("".join(f"Satz {i} :: Sentence {i}\n" for i in range(10)))
    result = cli("dataset", "add-pairs", "de", "en", str(f), "--sample", "6", "--seed", "2")
    assert result.exit_code == 0, result.output
    with psycopg.connect(db_url) as conn:
        pairs = conn.execute(
            """SELECT p.text, q.text FROM prompt p JOIN prompt q ON q.id = p.parallel_prompt_id
               JOIN dataset d ON d.id = p.dataset_id WHERE d.name = 'de' ORDER BY p.position"""
        ).fetchall()
    assert len(pairs) == 6
    assert all(de.replace("Satz", "Sentence") == en for de, en in pairs)
    # --parallel-to with a different count is refused
    g = tmp_path / "three.txt"
    g.write_text("a\nb\nc\n")
    assert_clean_error(cli("dataset", "add", "x", str(g), "--parallel-to", "de"), "same count")


def test_random_dataset_via_cli(db_url: str) -> None:
    result = cli("dataset", "add-random", "noise", "--count", "50", "--length", "16", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert "50 prompts" in result.output


def test_hf_dataset_fails_offline_with_clear_message(db_url: str) -> None:
    result = cli("dataset", "add-hf", "wiki", "wikitext", "--config", "wikitext-2-raw-v1")
    assert_clean_error(result, "could not load the Hugging Face dataset", "layerbase dataset add")


def _bad_inputs(tmp: Path) -> list[tuple[list[str], list[str]]]:
    (tmp / "empty.txt").write_text("")
    (tmp / "blank.txt").write_text("\n  \n")
    (tmp / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    (tmp / "nofield.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    (tmp / "bad.csv").write_text('text,id\n"ok",1\n"unterminated,2\n')
    (tmp / "ragged.csv").write_text("text,id\nok,1\ntoo,many,fields\n")
    (tmp / "nocol.csv").write_text("body\nx\n")
    (tmp / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp / "latin1.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    (tmp / "noext.xyz").write_text("a\n")
    (tmp / "emptydir").mkdir(exist_ok=True)
    pq.write_table(pa.table({"body": ["x"]}), tmp / "nocol.parquet")
    return [
        (["dataset", "add", "d", str(tmp / "empty.txt")], ["holds no prompts"]),
        (["dataset", "add", "d", str(tmp / "blank.txt")], ["holds no prompts"]),
        (["dataset", "add", "d", str(tmp / "bad.jsonl"), "--field", "text"], ["line 2", "malformed JSON"]),
        (["dataset", "add", "d", str(tmp / "nofield.jsonl"), "--field", "text"], ["line 2", "no field 'text'"]),
        (["dataset", "add", "d", str(tmp / "bad.jsonl")], ["--field"]),
        (["dataset", "add", "d", str(tmp / "bad.csv"), "--column", "text"], ["malformed CSV"]),
        (["dataset", "add", "d", str(tmp / "ragged.csv"), "--column", "text"], ["line 3"]),
        (["dataset", "add", "d", str(tmp / "nocol.csv"), "--column", "text"], ["no column 'text'", "body"]),
        (["dataset", "add", "d", str(tmp / "bad.parquet"), "--column", "text"], ["not a readable Parquet"]),
        (["dataset", "add", "d", str(tmp / "nocol.parquet"), "--column", "text"], ["no column 'text'"]),
        (["dataset", "add", "d", str(tmp / "latin1.txt")], ["line 2", "UTF-8", "--decode-errors"]),
        (["dataset", "add", "d", str(tmp / "noext.xyz")], ["--format"]),
        (["dataset", "add", "d", str(tmp / "missing.txt")], ["does not exist"]),
        (["dataset", "add", "d", str(tmp / "emptydir")], ["no .txt files"]),
        (["dataset", "add", "d", str(tmp / "latin1.txt"), "--decode-errors", "replace", "--sample", "0"], ["--sample"]),
        (["dataset", "add", "", str(tmp / "noext.xyz"), "--format", "lines"], ["name must not be empty"]),
        (["dataset", "add-random", "r", "--count", "0"], ["positive"]),
        (["dataset", "show", "no-such-dataset"], ["no dataset named", "layerbase dataset add"]),
        (
            ["dataset", "add", "p", str(tmp / "noext.xyz"), "--format", "lines", "--parallel-to", "nope"],
            ["no dataset named"],
        ),
    ]


def test_bad_dataset_inputs_give_clean_errors_and_write_nothing(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "seed.txt").write_text("one\ntwo\n")
    assert cli("dataset", "add", "seeded", str(tmp_path / "seed.txt")).exit_code == 0
    before = fingerprint(db_url)
    for args, needles in _bad_inputs(tmp_path):
        result = cli(*args)
        assert_clean_error(result, *needles)
    assert fingerprint(db_url) == before


def test_names_with_quotes_and_sql_are_just_names(db_url: str, tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("x\ny\n")
    name = "Robert'); DROP TABLE prompt; --"
    assert cli("dataset", "add", name, str(f)).exit_code == 0
    shown = cli("dataset", "show", name, "--json")
    assert shown.exit_code == 0 and len(json.loads(shown.stdout)) == 2
