"""``layerbase ingest``, ``jobs``, ``models`` and ``embeddings``."""

from __future__ import annotations

import click

from layerbase.cli.common import Context, device_option, emit, json_option, progress_option, records, table

model_option = click.option(
    "--model",
    "source",
    required=True,
    help="Packaged model name (SmolLM2-135M-Instruct, gemma-3-270m, all-MiniLM-L6-v2), "
    "Hugging Face id, local model directory, or .gguf file.",
)
name_option = click.option("--name", help="Name to store the model under (default: from --model).")
revision_option = click.option("--revision", help="Hub revision (branch, tag or commit).")
dtype_option = click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Weights dtype for the forward pass (stored vectors are float32, unless `ingest --storage float16`).",
)


@click.command("ingest")
@model_option
@click.option(
    "--dataset",
    "dataset_names",
    required=True,
    multiple=True,
    help="Registered dataset to run over (repeat for several: the model loads once).",
)
@name_option
@revision_option
@dtype_option
@device_option
@click.option(
    "--pooling",
    type=click.Choice(["last", "mean"]),
    default="last",
    show_default=True,
    help="Last real token, or mean over real tokens.",
)
@click.option("--padding-side", type=click.Choice(["right", "left"]), default="right", show_default=True)
@click.option("--max-tokens", type=int, help="Truncate prompts to N tokens (default: the context length).")
@click.option("--chat-template", is_flag=True, help="Wrap each prompt in the model's chat template as a user turn.")
@click.option("--layer0", is_flag=True, help="Also store layer 0 (the embedding output).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Prompts per forward pass and per commit.")
@click.option(
    "--storage",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Precision the activations are stored in: float16 is pgvector's halfvec, half the size "
    "(needs pgvector 0.7 or later on the server).",
)
@progress_option
@json_option
@click.pass_obj
def ingest_command(
    obj: Context,
    source: str,
    dataset_names: tuple[str, ...],
    name: str | None,
    revision: str | None,
    dtype: str,
    device: str | None,
    pooling: str,
    padding_side: str,
    max_tokens: int | None,
    chat_template: bool,
    layer0: bool,
    batch_size: int,
    storage: str,
    progress: bool,
    as_json: bool,
) -> None:
    """Run a model over datasets; store every block's pooled activation per prompt.

    Re-running finishes an interrupted job; several processes on one job share its work.
    With --json: one object for one dataset, a list for several.
    """
    reports = obj.api().ingest(
        source,
        list(dataset_names),
        name=name,
        revision=revision,
        dtype=dtype,
        device=device,
        pooling=pooling,
        padding_side=padding_side,
        max_tokens=max_tokens,
        chat_template=chat_template,
        layer0=layer0,
        batch_size=batch_size,
        storage=storage,
        progress=progress,
    )
    lines = []
    for report in reports:
        line = (
            f"{report.model} × {report.dataset}: {report.prompts_done}/{report.n_prompts} prompts stored "
            f"({report.prompts_written_now} now), job {report.job_id} {report.state}"
        )
        if report.state != "done":
            line += f"; {report.chunks_left} chunk(s) are being processed by other workers"
        if report.n_truncated_now:
            line += f"\nWarning: {report.n_truncated_now} prompt(s) were truncated (see `layerbase jobs`)."
        lines.append(line)
    data = reports[0].as_dict() if len(reports) == 1 else [r.as_dict() for r in reports]
    emit(data, as_json, "\n".join(lines))


@click.command()
@json_option
@click.pass_obj
def jobs(obj: Context, as_json: bool) -> None:
    """List ingest jobs with their progress and truncation counts."""
    rows = records(obj.api().jobs())
    for r in rows:
        r["progress"] = f"{r['done']}/{r['n_prompts']}"
        r["error"] = r["error"] or ""  # a job without an error shows none, not 'None'
    emit(rows, as_json, table(rows, ["id", "model", "dataset", "state", "progress", "truncated", "error"]))


@click.command()
@json_option
@click.pass_obj
def models(obj: Context, as_json: bool) -> None:
    """List stored models with their extraction settings."""
    rows = records(obj.api().models())
    emit(
        rows,
        as_json,
        table(rows, ["name", "architecture", "kind", "n_layers", "width", "dtype", "storage", "pooling", "source"]),
    )


@click.group()
def embeddings() -> None:
    """Token-embedding matrices."""


@embeddings.command("export")
@model_option
@name_option
@revision_option
@dtype_option
@device_option
@progress_option
@json_option
@click.pass_obj
def export(
    obj: Context,
    source: str,
    name: str | None,
    revision: str | None,
    dtype: str,
    device: str | None,
    progress: bool,
    as_json: bool,
) -> None:
    """Store a model's input embeddings (and unembeddings, when untied), one row per token."""
    result = obj.api().export_embeddings(
        source, name=name, revision=revision, dtype=dtype, device=device, progress=progress
    )
    written = result["rows"]
    note = "" if "output" in written else " (unembedding tied to the input embedding, or none: not stored separately)"
    emit(result, as_json, f"{result['model']}: " + ", ".join(f"{k} {v} rows" for k, v in written.items()) + note)
