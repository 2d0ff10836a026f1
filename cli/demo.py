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
    default=Path("layerbase-report"),
    show_default=True,
    help="Directory for the report (report.html and PNG files).",
)
@progress_option
@json_option
@click.pass_obj
def demo(
    obj: Context, n_prompts: int, batch_size: int, device: str | None, out_dir: Path, progress: bool, as_json: bool
) -> None:
    """Create the warehouse, ingest news leads and random strings through two real packaged
    models (SmolLM2-135M, Gemma-3-270M), compute k-NN sets, affinity matrices and
    diagonal tests, and write the HTML report. A second run reuses what is stored."""
    from layerbase.api import connect
    from layerbase.cli.analyze import describe_affinity
    from layerbase.ingest.demo import DEMO_MODELS, register_demo_datasets

    started = time.perf_counter()
    lb = connect(obj.database_url, progress=progress)  # creates the schema on a fresh warehouse
    datasets = register_demo_datasets(lb.warehouse, n_prompts)
    reports = [
        r for model in DEMO_MODELS for r in lb.ingest(model, list(datasets), batch_size=batch_size, device=device)
    ]
    report = lb.report(list(DEMO_MODELS), list(datasets), out_dir, k=10)
    matrices = report.matrices
    elapsed = time.perf_counter() - started
    lines = [f"Warehouse: {lb.url}"]
    lines += [
        f"  {r.model:<24} × {r.dataset:<24} {r.prompts_done:>5} prompts"
        f" ({r.prompts_written_now} new, {r.n_truncated_now} truncated)"
        for r in reports
    ]
    lines += [describe_affinity(m, show_matrix=False) for m in matrices]
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
