"""``layerbase dataset``: register and inspect prompt datasets."""

from __future__ import annotations

from pathlib import Path

import click

from layerbase.cli.common import Context, emit, json_option, records, table

sample_option = click.option("--sample", type=int, help="Keep N prompts drawn at random (in source order).")
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Seed for --sample.")


@click.group()
def dataset() -> None:
    """Register prompt datasets and look at them."""


def _print_summaries(summaries: list[dict], as_json: bool) -> None:
    text = "\n".join(
        f"{'Registered' if s['created'] else 'Already registered'} dataset {s['name']!r}: {s['prompts']} prompts"
        + (f", parallel to {s['parallel_to']!r}" if s["parallel_to"] else "")
        for s in summaries
    )
    emit(summaries, as_json, text)


@dataset.command("add")
@click.argument("name")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["lines", "jsonl", "csv", "parquet", "txt_dir"]),
    help="Reader (default: from the suffix; a directory reads every .txt file as one prompt).",
)
@click.option("--field", "--column", "field", help="JSON field or CSV/Parquet column holding the text.")
@click.option("--lead-paragraphs", type=int, help="For .txt directories: keep each file's first N paragraphs.")
@click.option("--parallel-to", help="Pair prompt i with prompt i of this existing dataset.")
@click.option(
    "--decode-errors",
    type=click.Choice(["strict", "replace"]),
    default="strict",
    show_default=True,
    help="What to do with bytes that are not UTF-8: fail, or replace them with U+FFFD.",
)
@sample_option
@seed_option
@json_option
@click.pass_obj
def add(
    obj: Context,
    name: str,
    path: Path,
    fmt: str | None,
    field: str | None,
    lead_paragraphs: int | None,
    parallel_to: str | None,
    decode_errors: str,
    sample: int | None,
    seed: int,
    as_json: bool,
) -> None:
    """Register the prompts in PATH (a text/JSONL/CSV/Parquet file or a directory) as NAME."""
    summary = obj.api().add_dataset(
        name,
        path,
        format=fmt,
        field=field,
        lead_paragraphs=lead_paragraphs,
        parallel_to=parallel_to,
        decode_errors=decode_errors,
        sample=sample,
        seed=seed,
    )
    _print_summaries([summary], as_json)


@dataset.command("add-random")
@click.argument("name")
@click.option("--count", type=int, default=512, show_default=True, help="Number of strings.")
@click.option("--length", type=int, default=32, show_default=True, help="Characters per string.")
@click.option("--alphabet", help="Characters to draw from (default: letters and digits).")
@seed_option
@json_option
@click.pass_obj
def add_random(
    obj: Context, name: str, count: int, length: int, alphabet: str | None, seed: int, as_json: bool
) -> None:
    """Register COUNT random alphanumeric strings as NAME."""
    _print_summaries([obj.api().add_random_dataset(name, count, length, alphabet=alphabet, seed=seed)], as_json)


@dataset.command("add-hf")
@click.argument("name")
@click.argument("hf_name")
@click.option("--split", default="train", show_default=True)
@click.option("--field", "--column", "field", default="text", show_default=True, help="Column holding the text.")
@click.option("--config", "hf_config", help="Dataset configuration name.")
@sample_option
@seed_option
@json_option
@click.pass_obj
def add_hf(
    obj: Context,
    name: str,
    hf_name: str,
    split: str,
    field: str,
    hf_config: str | None,
    sample: int | None,
    seed: int,
    as_json: bool,
) -> None:
    """Register a Hugging Face dataset's text column as NAME (needs the hub or its cache)."""
    summary = obj.api().add_hf_dataset(
        name, hf_name, split=split, field=field, config=hf_config, sample=sample, seed=seed
    )
    _print_summaries([summary], as_json)


@dataset.command("add-pairs")
@click.argument("left_name")
@click.argument("right_name")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--separator", default=" :: ", show_default=True, help="Text between the two sides of a line.")
@sample_option
@seed_option
@json_option
@click.pass_obj
def add_pairs(
    obj: Context,
    left_name: str,
    right_name: str,
    path: Path,
    separator: str,
    sample: int | None,
    seed: int,
    as_json: bool,
) -> None:
    """Register a file of 'left SEP right' lines (e.g. German :: English) as two parallel datasets."""
    _print_summaries(
        obj.api().add_parallel_datasets(left_name, right_name, path, separator=separator, sample=sample, seed=seed),
        as_json,
    )


@dataset.command("list")
@json_option
@click.pass_obj
def list_(obj: Context, as_json: bool) -> None:
    """List the registered datasets."""
    rows = records(obj.api().datasets())
    emit(rows, as_json, table(rows, ["name", "prompts", "kind", "source", "parallel_to"]))


@dataset.command()
@click.argument("name")
@click.option("--limit", type=int, default=10, show_default=True)
@json_option
@click.pass_obj
def show(obj: Context, name: str, limit: int, as_json: bool) -> None:
    """Show the first prompts of dataset NAME."""
    rows = records(obj.api().prompts(name, limit).reset_index())
    for r in rows:
        r["text"] = r["text"] if as_json else r["text"].replace("\n", " ")[:100]
    emit(rows, as_json, table(rows, ["position", "id", "text"]))
