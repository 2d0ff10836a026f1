"""``layerbase demo``: the main job, end to end on the embedded database."""

from __future__ import annotations

import time
from pathlib import Path

import click

from layerbase.cli.common import Context, device_option, emit, json_option, progress_option


@click.command()
@click.option(
    "--prompts",
    "n_prompts",
    type=int,
    default=512,
    show_default=True,
    help="News articles to sample (up to 2225); the random-strings set has as many.",
)
@click.option("--batch-size", type=int, default=16, show_default=True)
@device_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the report (report.html and PNG files; default: demo-report/ in the data directory).",
)
@progress_option
@json_option
@click.pass_obj
def demo(
    obj: Context,
    n_prompts: int,
    batch_size: int,
    device: str | None,
    out_dir: Path | None,
    progress: bool,
    as_json: bool,
) -> None:
    """Create the warehouse, ingest news leads and random strings through two real packaged
    models (SmolLM2-135M, Gemma-3-270M), compute k-NN sets, affinity matrices and
    diagonal tests, and write the HTML report. A second run reuses what is stored.

    Each step is printed as it starts (with --json, only the result at the end)."""
    from layerbase.api import connect
    from layerbase.cli.analyze import describe_affinity
    from layerbase.ingest.demo import DEMO_MODELS, register_demo_datasets
    from layerbase.warehouse.config import data_dir
    from layerbase.warehouse.status import server_versions

    def say(line: str) -> None:
        if not as_json:
            click.echo(line)

    started = time.perf_counter()
    out_dir = out_dir or data_dir() / "demo-report"
    lb = connect(obj.database_url, progress=progress)  # creates the schema on a fresh warehouse
    server, pgvector = server_versions(lb.warehouse)
    say(f"Warehouse: {lb.url} (PostgreSQL {server}, pgvector {pgvector})")
    say(f"Report to: {out_dir.resolve()}")
    summaries = register_demo_datasets(lb.warehouse, n_prompts)
    datasets = [s["name"] for s in summaries]
    shown = [f"{s['name']} ({s['prompts']} prompts{'' if s['created'] else ', stored before'})" for s in summaries]
    say("Datasets: " + ", ".join(shown))
    reports = []
    for model in DEMO_MODELS:
        say(f"Ingesting {model} (first time: the model is unpacked, converted and cached) ...")
        for r in lb.ingest(model, datasets, batch_size=batch_size, device=device):
            reports.append(r)
            say(
                f"  {r.model:<24} × {r.dataset:<24} {r.prompts_done:>5} prompts"
                f" ({r.prompts_written_now} new, {r.n_truncated_now} truncated)"
            )
    say("k-NN sets, affinity matrices and the report ...")
    report = lb.report(list(DEMO_MODELS), datasets, out_dir, k=10)
    matrices = report.matrices
    elapsed = time.perf_counter() - started
    lines = [describe_affinity(m, show_matrix=False) for m in matrices]
    lines += [f"Warning: {w}" for w in report.warnings]
    lines.append(f"Report: {report.html} ({len(report.images)} figures)")
    lines.append(f"Done in {elapsed:.0f} s.")
    emit(
        {
            "database": lb.url,
            "jobs": [r.as_dict() for r in reports],
            "affinity": [m.summary() for m in matrices],
            "report": report.as_dict(),
            "seconds": round(elapsed, 1),
        },
        as_json,
        "\n".join(lines),
    )
