"""The report: a self-contained HTML file (images inlined, opens offline) plus the PNG
files and, optionally, every table as CSV, Parquet or JSON.

For chosen models and datasets it shows each pair's affinity heatmap (rectangular and
on a relative-depth square, with the generalized diagonal and the max-similarity path),
the mean square matrix, on- vs off-diagonal means per pair, the diagonal tests, each
model's within-model layer x layer matrix (Claim 1), and one prompt's neighbours at two
layers of two models with their overlap (the paper's Figures 2 and 3).
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from layerbase.analysis.knn.lookup import overlap
from layerbase.analysis.reporting import plots
from layerbase.analysis.similarity.affinity import AffinityMatrix, compute_affinity, compute_study
from layerbase.analysis.similarity.stats import max_similarity_path, mean_square, resize_square
from layerbase.warehouse.engine import Warehouse
from layerbase.warehouse.errors import InputError

EXPORT_FORMATS = ("csv", "parquet", "json")
TRUNCATION_WARNING_SHARE = 0.10

TRUNCATION_SQL = """
SELECT m.name AS model, d.name AS dataset, count(*) AS prompts,
       count(*) FILTER (WHERE e.truncated) AS truncated, avg(e.n_tokens)::float8 AS mean_tokens
FROM prompt_encoding e
JOIN model m ON m.id = e.model_id
JOIN ingest_job j ON j.id = e.job_id
JOIN dataset d ON d.id = j.dataset_id
WHERE m.name = ANY(:models) AND d.name = ANY(:datasets)
GROUP BY m.name, d.name ORDER BY d.name, m.name
"""


@dataclass
class Report:
    """What a report run wrote."""

    html: Path
    images: list[Path]
    tables: dict[str, list[dict[str, Any]]]
    exported: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    matrices: list[AffinityMatrix] = field(default_factory=list)  # the cross-model pairs shown

    def as_dict(self) -> dict[str, Any]:
        return {
            "html": str(self.html),
            "images": [str(p) for p in self.images],
            "exported": [str(p) for p in self.exported],
            "warnings": self.warnings,
            "tests": self.tables["diagonal_tests"],
        }


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)[:80]


def build_report(
    wh: Warehouse,
    models: list[str],
    datasets: list[str],
    out_dir: Path,
    *,
    k: int = 10,
    prompt: int = 0,
    square_size: int = 32,
    export_format: str | None = None,
    progress: bool = True,
) -> Report:
    """Compute what is missing, draw every figure, and write the report into ``out_dir``."""
    if len(set(models)) < 2:
        raise InputError("a report compares models: give at least two (e.g. --models A,B)")
    if not datasets:
        raise InputError("give at least one dataset (--datasets NAME[,NAME…])")
    if export_format is not None and export_format not in EXPORT_FORMATS:
        raise InputError(f"unknown --format {export_format!r}; use one of {', '.join(EXPORT_FORMATS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    images: list[Path] = []
    sections: list[str] = []
    tests: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    paths: list[dict[str, Any]] = []
    squares: list[dict[str, Any]] = []
    scatter: list[tuple[str, float, float]] = []
    neighbour_rows: list[dict[str, Any]] = []
    shown: list[AffinityMatrix] = []
    chance_levels: list[float] = []

    truncation = _truncation(wh, models, datasets)
    warnings = [
        f"{t['truncated']} of {t['prompts']} prompts of {t['dataset']} ({t['truncated'] / t['prompts']:.0%}) were "
        f"truncated for {t['model']}: with last-token pooling the last token is then an arbitrary sub-word, "
        "which can hide the structure the report looks for"
        for t in truncation
        if t["prompts"] and t["truncated"] / t["prompts"] > TRUNCATION_WARNING_SHARE
    ]

    for dataset in datasets:
        pairs = compute_study(wh, models, dataset, k=k, progress=progress)
        shown += pairs
        within = [compute_affinity(wh, m, m, dataset, k=k, progress=progress) for m in models]
        chance = pairs[0].chance
        chance_levels.append(chance)
        vmax = max(float(m.scores.max()) for m in pairs)
        part = [
            f"<h2>Dataset {html.escape(dataset)}</h2>",
            f"<p>{pairs[0].n_prompts} prompts, k = {k}, chance level k/(|D|−1) = {chance:.4f}.</p>",
        ]
        for m in pairs:
            label = f"{m.model_a} × {m.model_b} @ {dataset}"
            sub = _test_line(m)
            rect = plots.save(
                plots.affinity_heatmap(
                    m.scores,
                    m.layers_a,
                    m.layers_b,
                    m.model_a,
                    m.model_b,
                    k=k,
                    chance=m.chance,
                    subtitle=f"{dataset}; {sub}",
                    vmax=vmax,
                ),
                out_dir / f"affinity_{_slug(m.model_a)}__{_slug(m.model_b)}__{_slug(dataset)}.png",
            )
            square = resize_square(m.scores, square_size)
            sq = plots.save(
                plots.square_heatmap(
                    square,
                    f"{m.model_a} × {m.model_b} on {dataset}\nrelative depth, {square_size}×{square_size}",
                    vmax=vmax,
                    name_a=m.model_a,
                    name_b=m.model_b,
                ),
                out_dir / f"square_{_slug(m.model_a)}__{_slug(m.model_b)}__{_slug(dataset)}.png",
            )
            images += [rect, sq]
            part.append(
                f"<h3>{html.escape(label)}</h3><p>{html.escape(sub)}</p><div class='row'>{_img(rect)}{_img(sq)}</div>"
            )
            if m.test:
                scatter.append((label, m.test.mean_off, m.test.mean_on))
                tests.append(
                    {"model_a": m.model_a, "model_b": m.model_b, "dataset": dataset, "k": k, **m.test.as_dict()}
                )
            cells += [
                {
                    "model_a": m.model_a,
                    "model_b": m.model_b,
                    "dataset": dataset,
                    "k": k,
                    "layer_a": la,
                    "layer_b": lb,
                    "depth_a": la / max(m.layers_a),
                    "depth_b": lb / max(m.layers_b),
                    "score": float(m.scores[i, j]),
                    "chance": m.chance,
                }
                for i, la in enumerate(m.layers_a)
                for j, lb in enumerate(m.layers_b)
            ]
            best = max_similarity_path(m.scores)
            paths += [
                {
                    "model_a": m.model_a,
                    "model_b": m.model_b,
                    "dataset": dataset,
                    "layer_a": la,
                    "depth_a": la / max(m.layers_a),
                    "best_layer_b": m.layers_b[int(j)],
                    "best_depth_b": m.layers_b[int(j)] / max(m.layers_b),
                    "score": float(m.scores[i, int(j)]),
                }
                for i, (la, j) in enumerate(zip(m.layers_a, best))
            ]
        mean = mean_square([m.scores for m in pairs], square_size)
        mean_png = plots.save(
            plots.square_heatmap(
                mean,
                f"Mean over {len(pairs)} model pair(s) on {dataset}",
                label="mean mutual k-NN",
                name_a="row model",
                name_b="column model",
            ),
            out_dir / f"mean_square__{_slug(dataset)}.png",
        )
        images.append(mean_png)
        squares += [
            {
                "dataset": dataset,
                "row": r,
                "col": c,
                "depth_row": (r + 1) / square_size,
                "depth_col": (c + 1) / square_size,
                "mean_score": float(mean[r, c]),
            }
            for r in range(square_size)
            for c in range(square_size)
        ]
        part.append(f"<h3>Mean square affinity matrix</h3>{_img(mean_png)}")
        part.append("<h3>Within each model (Claim 1: nearby layers are similar)</h3><div class='row'>")
        for w in within:
            png = plots.save(
                plots.affinity_heatmap(
                    w.scores,
                    w.layers_a,
                    w.layers_b,
                    w.model_a,
                    w.model_a,
                    k=k,
                    chance=w.chance,
                    subtitle=f"{dataset}, within-model",
                    diagonal=False,
                    path=False,
                ),
                out_dir / f"within_{_slug(w.model_a)}__{_slug(dataset)}.png",
            )
            images.append(png)
            part.append(_img(png))
        part.append("</div>")
        neighbour_png, rows = _neighbour_figure(wh, pairs[0], dataset, prompt, k, out_dir)
        images.append(neighbour_png)
        neighbour_rows += rows
        part.append(f"<h3>Neighbours of prompt {prompt} (as in the paper's Figures 2 and 3)</h3>{_img(neighbour_png)}")
        sections.append("\n".join(part))

    # one chance line only when every dataset has the same size
    chances = {round(m, 12) for m in chance_levels}
    scatter_png = plots.save(
        plots.on_off_scatter(scatter, chances.pop() if len(chances) == 1 else None), out_dir / "on_vs_off_diagonal.png"
    )
    images.append(scatter_png)
    tables = {
        "diagonal_tests": tests,
        "affinity_cells": cells,
        "max_similarity_paths": paths,
        "mean_square": squares,
        "neighbours": neighbour_rows,
        "truncation": truncation,
    }
    page = _page(models, datasets, k, sections, tests, scatter_png, truncation, warnings)
    html_path = out_dir / "report.html"
    html_path.write_text(page, encoding="utf-8")
    report = Report(html_path, images, tables, warnings=warnings, matrices=shown)
    if export_format:
        report.exported = export_tables(tables, out_dir / "tables", export_format)
    return report


def _test_line(m: AffinityMatrix) -> str:
    t = m.test
    if t is None:
        return "no diagonal test (matrix too small)"
    return (
        f"on-diagonal mean {t.mean_on:.3f} vs off {t.mean_off:.3f}, t = {t.t:.1f}, "
        f"log10 p = {t.log10_p:.1f} (Bonferroni, {t.n_pairs} pair(s): {t.log10_p_bonferroni:.1f})"
    )


def _truncation(wh: Warehouse, models: list[str], datasets: list[str]) -> list[dict[str, Any]]:
    with wh.engine.connect() as conn:
        return [
            dict(r._mapping) for r in conn.execute(sa.text(TRUNCATION_SQL), {"models": models, "datasets": datasets})
        ]


def _neighbour_figure(
    wh: Warehouse, m: AffinityMatrix, dataset: str, prompt: int, k: int, out_dir: Path
) -> tuple[Path, list[dict[str, Any]]]:
    """Neighbours of one prompt at an early and a late layer of model A, each next to the
    most similar layer of model B (from the max-similarity path)."""
    path = max_similarity_path(m.scores)
    picks = sorted({m.layers_a[max(0, round(len(m.layers_a) * f) - 1)] for f in (1 / 3, 2 / 3)})
    panels, rows, query = [], [], ""
    for layer_a in picks:
        layer_b = m.layers_b[int(path[m.layers_a.index(layer_a)])]
        o = overlap(wh, prompt, (m.model_a, layer_a, dataset), (m.model_b, layer_b, dataset), k)
        query = o.first.query
        shared = set(o.shared)
        for side in (o.first, o.second):
            panels.append(
                (
                    f"{side.model} layer {side.layer} — {len(shared)}/{k} shared",
                    [(r["position"], r["text"]) for r in side.rows],
                    shared,
                )
            )
            rows += [
                {
                    "dataset": dataset,
                    "prompt": prompt,
                    "model": side.model,
                    "layer": side.layer,
                    "rank": rank,
                    "neighbor_position": r["position"],
                    "distance": r["distance"],
                    "shared": r["position"] in shared,
                    "text": r["text"],
                }
                for rank, r in enumerate(side.rows, start=1)
            ]
    fig = plots.neighbour_lists(query.split(": ", 1)[-1], panels[:2])
    png = plots.save(fig, out_dir / f"neighbours_prompt{prompt}__{_slug(dataset)}.png")
    if len(panels) > 2:
        extra = plots.save(
            plots.neighbour_lists(query.split(": ", 1)[-1], panels[2:]),
            out_dir / f"neighbours_prompt{prompt}__{_slug(dataset)}_late.png",
        )
        png = _stack_vertically(png, extra)
    return png, rows


def _stack_vertically(top: Path, bottom: Path) -> Path:
    """Join two PNGs into the first file (one figure per prompt keeps the page short)."""
    import matplotlib.image as mpimg

    a, b = mpimg.imread(top), mpimg.imread(bottom)
    width = max(a.shape[1], b.shape[1])

    def pad(img: np.ndarray) -> np.ndarray:
        out = np.ones((img.shape[0], width, img.shape[2]), dtype=img.dtype)
        out[:, : img.shape[1]] = img
        return out

    mpimg.imsave(top, np.vstack([pad(a), pad(b)]))
    bottom.unlink()
    return top


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'>"


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = []
    for r in rows:
        cells = []
        for key, _ in columns:
            v = r.get(key, "")
            cells.append(f"<td>{v:.4g}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _page(
    models: list[str],
    datasets: list[str],
    k: int,
    sections: list[str],
    tests: list[dict[str, Any]],
    scatter_png: Path,
    truncation: list[dict[str, Any]],
    warnings: list[str],
) -> str:
    warn = "".join(f"<p class='warn'>Warning: {html.escape(w)}</p>" for w in warnings)
    test_table = _table(
        tests,
        [
            ("model_a", "model A"),
            ("model_b", "model B"),
            ("dataset", "dataset"),
            ("n_on", "on cells"),
            ("n_off", "off cells"),
            ("mean_on", "mean on"),
            ("mean_off", "mean off"),
            ("t", "t"),
            ("log10_p", "log10 p"),
            ("n_pairs", "pairs"),
            ("log10_p_bonferroni", "log10 p (Bonferroni)"),
        ],
    )
    trunc_table = _table(
        truncation,
        [
            ("model", "model"),
            ("dataset", "dataset"),
            ("prompts", "prompts"),
            ("truncated", "truncated"),
            ("mean_tokens", "mean tokens"),
        ],
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Layerbase report: {html.escape(", ".join(models))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }}
img {{ max-width: 100%; margin: 0.4em; border: 1px solid #ddd; }}
.row {{ display: flex; flex-wrap: wrap; align-items: flex-start; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }}
.warn {{ background: #fff3cd; border: 1px solid #e0c36a; padding: 0.5em 0.8em; }}
</style></head><body>
<h1>Layer affinity across models</h1>
<p>Models: {html.escape(", ".join(models))}. Datasets: {html.escape(", ".join(datasets))}. Mutual k-NN with k = {k}
(Wolfram &amp; Schein 2025): A[i, j] is the mean share of the k nearest prompts that layer i of one model and layer j
of the other agree on. The generalized diagonal (dashed outline) holds the cells with 0 ≤ i − j ≤ n − m (rows = the
deeper model); the test is a one-sided pooled-variance t-test of on- vs off-diagonal cells.</p>
{warn}
<h2>Diagonal tests</h2>{test_table}
{_img(scatter_png)}
<h2>Prompts and truncation</h2>{trunc_table}
{"".join(sections)}
</body></html>
"""


def export_tables(tables: dict[str, list[dict[str, Any]]], directory: Path, fmt: str) -> list[Path]:
    """Write each table as ``<name>.<fmt>``."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in tables.items():
        path = directory / f"{name}.{fmt}"
        if fmt == "json":
            path.write_text(json.dumps(rows, indent=1, default=float))
        elif fmt == "csv":
            with path.open("w", newline="") as f:
                columns = list(rows[0]) if rows else []
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
        else:
            pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({}), path)
        written.append(path)
    return written
