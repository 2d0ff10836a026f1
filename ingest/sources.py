"""Prompt sources: read prompts from files, directories, Hugging Face datasets or a
generator, with the place each came from, and sample them with a seed.

Every reader raises ``InputError`` naming the file and line (or row) at fault, and is
bounded by the limits of ``ingest.limits``.
"""

from __future__ import annotations

import csv
import json
import random
import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerbase.ingest.limits import check_texts, limit, over, read_bounded
from layerbase.warehouse.errors import InputError

FORMATS = ("lines", "jsonl", "csv", "parquet", "txt_dir")
SUFFIX_FORMATS = {
    ".txt": "lines",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass
class PromptSet:
    """Prompts read from one source, in order, with where each came from."""

    kind: str
    uri: str
    texts: list[str]
    refs: list[str]
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.texts:
            raise InputError(f"{self.uri} holds no prompts; give a source with at least one non-empty prompt")
        check_texts(self.texts, self.refs, self.uri)

    def sample(self, n: int | None, seed: int) -> PromptSet:
        """n prompts drawn without replacement with ``seed``, kept in source order."""
        if n is None:
            return self
        if n <= 0:
            raise InputError(f"--sample must be positive, got {n}")
        if n > len(self.texts):
            raise InputError(
                f"--sample {n} asks for more prompts than {self.uri} holds ({len(self.texts)}); "
                "lower --sample or omit it"
            )
        keep = sorted(random.Random(seed).sample(range(len(self.texts)), n))
        return PromptSet(
            self.kind,
            self.uri,
            [self.texts[i] for i in keep],
            [self.refs[i] for i in keep],
            {**self.options, "sample": n, "seed": seed},
        )


def prompts_from_texts(texts: Iterable[str], what: str = "the texts") -> PromptSet:
    """Prompts given as Python strings (in a notebook); blank ones are refused, not skipped,
    so that positions match the caller's list."""
    listed = list(texts)
    for index, text in enumerate(listed):
        if not isinstance(text, str):
            raise InputError(f"{what}[{index}] is a {type(text).__name__}, not a string; give a list of texts")
        if not text.strip():
            raise InputError(f"{what}[{index}] is blank; every prompt needs text")
    return PromptSet("python", "python list", listed, [f"item {i}" for i in range(len(listed))])


def detect_format(path: Path) -> str:
    """The reader for a path: a directory of .txt files, or by file suffix."""
    if path.is_dir():
        return "txt_dir"
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"cannot tell the format of {path} from its suffix; pass --format with one of {', '.join(FORMATS)}"
        )
    return fmt


def read_path(
    path: Path,
    fmt: str | None = None,
    *,
    field: str | None = None,
    lead_paragraphs: int | None = None,
    decode_errors: str = "strict",
) -> PromptSet:
    """Read prompts from a file or directory."""
    if not path.exists():
        raise InputError(f"{path} does not exist; check the path")
    fmt = fmt or detect_format(path)
    if fmt != "txt_dir" and path.is_dir():
        raise InputError(f"{path} is a directory; use --format txt_dir (one prompt per .txt file)")
    if fmt in ("jsonl", "csv", "parquet") and not field:
        what = "--field NAME (the JSON key)" if fmt == "jsonl" else "--column NAME"
        raise InputError(f"reading {fmt} needs the name of the text field: pass {what}")
    _check_options(fmt, field, lead_paragraphs, decode_errors)
    if fmt == "lines":
        prompts = read_lines(path, decode_errors)
    elif fmt == "jsonl":
        prompts = read_jsonl(path, field or "", decode_errors)
    elif fmt == "csv":
        prompts = read_csv(path, field or "", decode_errors)
    elif fmt == "parquet":
        prompts = read_parquet(path, field or "")
    elif fmt == "txt_dir":
        prompts = read_txt_dir(path, lead_paragraphs, decode_errors)
    else:
        raise InputError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if decode_errors != "strict":
        prompts.options["decode_errors"] = decode_errors
    return prompts


def _check_options(fmt: str, field: str | None, lead_paragraphs: int | None, decode_errors: str) -> None:
    """Refuse an option that the format would silently ignore, or a value that means nothing."""
    if field is not None and fmt in ("lines", "txt_dir"):
        raise InputError(f"--field/--column names a column of jsonl, csv or parquet; {fmt} has none: leave it out")
    if lead_paragraphs is not None:
        if fmt != "txt_dir":
            raise InputError(
                f"--lead-paragraphs cuts each file of a directory of .txt files (txt_dir), not {fmt}: leave it out"
            )
        if lead_paragraphs < 1:
            raise InputError(f"--lead-paragraphs must be at least 1, got {lead_paragraphs}")
    if decode_errors not in DECODE_ERRORS:
        raise InputError(f"--decode-errors must be one of {', '.join(DECODE_ERRORS)}, got {decode_errors!r}")
    if decode_errors != "strict" and fmt == "parquet":
        raise InputError("--decode-errors applies to text files; Parquet strings are decoded already: leave it out")


DECODE_ERRORS = ("strict", "replace")


def _decode(raw: bytes, path: Path, unit: str = "line", errors: str = "strict") -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        where = f"line {line}" if unit == "line" else unit
        raise InputError(
            f"{path}, {where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); re-encode the file as UTF-8, "
            "or pass --decode-errors replace to replace undecodable bytes with U+FFFD"
        ) from None


def read_lines(path: Path, decode_errors: str = "strict") -> PromptSet:
    """One prompt per line; blank lines are skipped."""
    text = _decode(read_bounded(path), path, errors=decode_errors)
    texts, refs = [], []
    for no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            texts.append(line.rstrip("\r"))
            refs.append(f"line {no}")
    return PromptSet("lines", str(path), texts, refs)


def read_jsonl(path: Path, field_name: str, decode_errors: str = "strict") -> PromptSet:
    """One JSON object per line; the prompt is ``field_name``."""
    text = _decode(read_bounded(path), path, errors=decode_errors)
    texts, refs = [], []
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}, line {no}: malformed JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}, line {no}: expected a JSON object, got {type(obj).__name__}")
        if field_name not in obj:
            keys = ", ".join(sorted(obj)) or "none"
            raise InputError(f"{path}, line {no}: no field {field_name!r} (fields: {keys}); pass the right --field")
        value = obj[field_name]
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{path}, line {no}: field {field_name!r} is not a non-empty string")
        texts.append(value)
        refs.append(f"line {no}")
    return PromptSet("jsonl", str(path), texts, refs, {"field": field_name})


def read_csv(path: Path, column: str, decode_errors: str = "strict") -> PromptSet:
    """A CSV (or TSV) file with a header; the prompt is ``column``."""
    text = _decode(read_bounded(path), path, errors=decode_errors)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(text.splitlines(), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(f"{path} is empty; a CSV file needs a header row and at least one row") from None
    except csv.Error as exc:
        raise InputError(f"{path}, line 1: malformed CSV header ({exc})") from None
    if column not in header:
        raise InputError(f"{path}: no column {column!r} (columns: {', '.join(header)}); pass the right --column")
    index = header.index(column)
    texts, refs = [], []
    try:
        for row in reader:
            no = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise InputError(
                    f"{path}, line {no}: {len(row)} fields where the header has {len(header)}; fix the quoting"
                )
            if not row[index].strip():
                raise InputError(f"{path}, line {no}: column {column!r} is empty")
            texts.append(row[index])
            refs.append(f"line {no}")
    except csv.Error as exc:
        raise InputError(f"{path}, line {reader.line_num}: malformed CSV ({exc})") from None
    return PromptSet("csv", str(path), texts, refs, {"column": column})


def read_parquet(path: Path, column: str) -> PromptSet:
    """A Parquet file; the prompt is ``column`` (a string column)."""
    import pyarrow.parquet as pq
    from pyarrow.lib import ArrowException

    try:
        if path.stat().st_size > limit("max_input_bytes"):
            raise over("max_input_bytes", f"{path} ({path.stat().st_size:,} bytes)")
        rows = pq.ParquetFile(path).metadata.num_rows
        if rows > limit("max_prompts"):
            raise over("max_prompts", f"{path} ({rows:,} rows)")
        table = pq.read_table(path)
    except (ArrowException, OSError) as exc:
        raise InputError(f"{path} is not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    if column not in table.column_names:
        raise InputError(
            f"{path}: no column {column!r} (columns: {', '.join(table.column_names)}); pass the right --column"
        )
    values = table.column(column).to_pylist()
    texts, refs = [], []
    for row, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{path}, row {row}: column {column!r} is not a non-empty string")
        texts.append(value)
        refs.append(f"row {row}")
    return PromptSet("parquet", str(path), texts, refs, {"column": column})


def lead_of(text: str, paragraphs: int) -> str:
    """The first ``paragraphs`` paragraphs (blank-line separated) of a text.

    Prompts then end where a paragraph ends, not mid-sentence: with last-token pooling the
    final token matters (docs/design.md §6).
    """
    parts = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    return "\n\n".join(parts[:paragraphs])


def read_txt_dir(path: Path, lead_paragraphs: int | None = None, decode_errors: str = "strict") -> PromptSet:
    """Every ``*.txt`` file under a directory (recursively, sorted) is one prompt."""
    files = []
    for file in path.rglob("*.txt"):
        if file.is_file():
            files.append(file)
            if len(files) > limit("max_prompts"):
                raise over("max_prompts", f"{path} (more .txt files)")
    files.sort()
    if sum(file.stat().st_size for file in files) > limit("max_input_bytes"):
        raise over("max_input_bytes", f"{path} (its .txt files together)")
    if not files:
        raise InputError(f"{path} contains no .txt files; point at a directory of .txt files")
    texts, refs = [], []
    for file in files:
        rel = str(file.relative_to(path))
        body = _decode(read_bounded(file), file, unit=f"file {rel}", errors=decode_errors)
        if lead_paragraphs:
            body = lead_of(body, lead_paragraphs)
        if body.strip():
            texts.append(body.strip())
            refs.append(rel)
    options = {"lead_paragraphs": lead_paragraphs} if lead_paragraphs else {}
    return PromptSet("txt_dir", str(path), texts, refs, options)


def read_pairs(path: Path, separator: str) -> tuple[PromptSet, PromptSet]:
    """A file of ``left SEPARATOR right`` lines (e.g. ``DE :: EN``): two parallel sets."""
    text = _decode(read_bounded(path), path)
    left, right, refs = [], [], []
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(separator)
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise InputError(
                f"{path}, line {no}: expected 'left{separator}right' with both sides non-empty; "
                "fix the line or pass the right --separator"
            )
        left.append(parts[0].strip())
        right.append(parts[1].strip())
        refs.append(f"line {no}")
    options = {"separator": separator}
    return (
        PromptSet("pairs", f"{path}#left", left, refs, {**options, "side": "left"}),
        PromptSet("pairs", f"{path}#right", right, list(refs), {**options, "side": "right"}),
    )


def read_hf(name: str, split: str, field_name: str, config: str | None = None) -> PromptSet:
    """A Hugging Face dataset through the ``datasets`` library (needs the hub or its cache)."""
    import datasets

    from layerbase.ingest import hub

    # Offline (HF_HUB_OFFLINE=1, which the datasets library honours too) or cached: the cache
    # answers; else the hub is asked once, and an unreachable or unknown id fails here.
    local_only = hub.prepare(name, None, "dataset")
    download = datasets.DownloadConfig(local_files_only=True) if local_only else None
    try:
        ds = datasets.load_dataset(name, config, split=split, download_config=download)
    except Exception as exc:  # datasets raises many types for 'not reachable' / 'not found'
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"could not load the Hugging Face dataset {name!r} (split {split!r}): {reason[:300]}; "
            "the hub may be unreachable from here: download it where it is reachable and "
            "register the saved file (JSONL, CSV or Parquet) with `layerbase dataset add`"
        ) from None
    if field_name not in ds.column_names:
        raise InputError(f"dataset {name!r} has no column {field_name!r} (columns: {', '.join(ds.column_names)})")
    if len(ds) > limit("max_prompts"):
        raise over("max_prompts", f"the Hugging Face dataset {name!r} ({len(ds):,} rows)")
    texts, refs = [], []
    for row, value in enumerate(ds[field_name]):
        if isinstance(value, str) and value.strip():
            texts.append(value)
            refs.append(f"row {row}")
    return PromptSet("hf", f"hf://{name}", texts, refs, {"split": split, "field": field_name, "config": config})


def generate_random(count: int, length: int, alphabet: str | None = None, seed: int = 0) -> PromptSet:
    """``count`` random strings of ``length`` characters drawn from ``alphabet``."""
    if count <= 0 or length <= 0:
        raise InputError("--count and --length must be positive")
    if alphabet is not None and not alphabet:
        raise InputError("--alphabet is empty; give the characters to draw from, or omit it for letters and digits")
    alphabet = alphabet or string.ascii_letters + string.digits
    if count > limit("max_prompts"):
        raise over("max_prompts", f"--count {count:,}")
    if length > limit("max_prompt_chars"):
        raise over("max_prompt_chars", f"--length {length:,}")
    if count * length > limit("max_input_bytes"):
        raise over("max_input_bytes", f"--count {count:,} x --length {length:,}")
    rng = random.Random(seed)
    texts = ["".join(rng.choice(alphabet) for _ in range(length)) for _ in range(count)]
    refs = [f"string {i}" for i in range(count)]
    return PromptSet(
        "random",
        f"random:{count}x{length}",
        texts,
        refs,
        {"count": count, "length": length, "alphabet": alphabet, "seed": seed},
    )
