"""``layerbase demo``: the main job, end to end on the embedded database."""

from __future__ import annotations

import time
from pathlib import Path

import click

from cli.main import Context, emit


@click.command()
@click.option("--prompts", "n_prompts", type=int, default=512, show_default=True,
              help="News articles to sample (up to 2225); the random-strings set has as many.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--device", help="cuda, mps or cpu (default: the best available).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("layerbase-report"),
              show_default=True, help="Directory for the report (report.html and PNG files).")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def demo(obj: Context, n_prompts: int, batch_size: int, device: str | None, out_dir: Path, progress: bool,
         as_json: bool) -> None:
    """Create the warehouse, ingest news leads and random strings through two real packaged
    models (SmolLM2-135M, Gemma-3-270M), compute k-NN sets, affinity matrices and
    diagonal tests, and write the HTML report. A second run reuses what is stored."""
    from cli.analyze import describe_affinity
    from ingest.demo import DEMO_MODELS, register_demo_datasets
    from analysis.report import build_report
    from ingest.runner import ingest_datasets
    from warehouse.status import upgrade_schema

    started = time.perf_counter()
    upgrade_schema(obj.database_url)
    wh = obj.warehouse()
    datasets = register_demo_datasets(wh, n_prompts)
    reports = [
        r for model in DEMO_MODELS
        for r in ingest_datasets(wh, model, list(datasets), batch_size=batch_size, device=device, progress=progress)
    ]
    report = build_report(wh, list(DEMO_MODELS), list(datasets), out_dir, k=10, progress=progress)
    matrices = report.matrices
    elapsed = time.perf_counter() - started
    lines = [f"Warehouse: {wh.display_url}"]
    lines += [
        f"  {r.model:<24} × {r.dataset:<24} {r.prompts_done:>5} prompts"
        f" ({r.prompts_written_now} new, {r.n_truncated_now} truncated)"
        for r in reports
    ]
    lines += [describe_affinity(m, show_matrix=False) for m in matrices]
    lines += [f"Warning: {w}" for w in report.warnings]
    lines.append(f"Report: {report.html} ({len(report.images)} figures)")
    lines.append(f"Done in {elapsed:.0f} s.")
    emit({"database": wh.display_url, "jobs": [r.as_dict() for r in reports],
          "affinity": [m.summary() for m in matrices], "report": report.as_dict(), "seconds": round(elapsed, 1)},
         as_json, "\n".join(lines))
