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
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from layerbase.analysis.knn.lookup import overlap
from layerbase.analysis.reporting import plots
from layerbase.analysis.similarity.affinity import AffinityMatrix, compute_affinity, compute_study
from layerbase.analysis.similarity.measures import MeasureOptions, parse_measures
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


@dataclass
class _PairFigures:
    """One model pair on one dataset: its heatmap on layers and on the relative-depth square."""

    label: str
    test_line: str
    heatmap: Path
    square: Path


@dataclass
class _MeasureFigures:
    """One model pair on one dataset under every measure: the matrices side by side and the
    rank correlations between the measures."""

    label: str
    grid: Path
    correlations: Path


@dataclass
class _Section:
    """What the report shows for one dataset."""

    dataset: str
    n_prompts: int
    chance: float
    pairs: list[_PairFigures]
    mean_square: Path
    within: list[Path]
    neighbours: Path
    measures: list[_MeasureFigures] = field(default_factory=list)


@dataclass
class _Tables:
    """The report's tables, as exported; each a list of rows."""

    diagonal_tests: list[dict[str, Any]] = field(default_factory=list)
    affinity_cells: list[dict[str, Any]] = field(default_factory=list)
    max_similarity_paths: list[dict[str, Any]] = field(default_factory=list)
    mean_square: list[dict[str, Any]] = field(default_factory=list)
    neighbours: list[dict[str, Any]] = field(default_factory=list)
    truncation: list[dict[str, Any]] = field(default_factory=list)
    measure_tests: list[dict[str, Any]] = field(default_factory=list)
    measure_correlations: list[dict[str, Any]] = field(default_factory=list)


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
    measures: Sequence[str] = (),
    options: MeasureOptions | None = None,
    progress: bool = True,
) -> Report:
    """Compute what is missing, draw every figure, and write the report into ``out_dir``.

    The paper's figures use mutual k-NN; ``measures`` adds a section with each model pair's
    matrix and diagonal test under every measure given (and mutual k-NN), side by side, and
    the rank correlations between the measures."""
    _check_options(models, datasets, export_format)
    others = [m.name for m in parse_measures(list(measures))] if measures else []
    compared = list(dict.fromkeys(["mutual_knn", *others])) if others else []
    plots.make_folder(out_dir)
    tables = _Tables(truncation=_truncation(wh, models, datasets))
    warnings = _truncation_warnings(tables.truncation)
    sections, shown, scatter = [], [], []
    for dataset in datasets:
        pairs = compute_study(wh, models, dataset, k=k, progress=progress)
        shown += pairs
        sections.append(_dataset_section(wh, models, dataset, pairs, k, prompt, square_size, out_dir, progress, tables))
        if compared:
            sections[-1].measures = _measure_figures(
                wh, models, dataset, compared, k, options, out_dir, progress, tables
            )
        scatter += [
            (f"{m.model_a} × {m.model_b} @ {dataset}", m.test.mean_off, m.test.mean_on) for m in pairs if m.test
        ]
    chances = {round(s.chance, 12) for s in sections}  # one chance line only when every dataset has the same size
    scatter_png = plots.save(
        plots.on_off_scatter(scatter, chances.pop() if len(chances) == 1 else None), out_dir / "on_vs_off_diagonal.png"
    )
    html_path = out_dir / "report.html"
    html_path.write_text(
        _render(models, datasets, k, prompt, sections, tables, scatter_png, warnings, compared), encoding="utf-8"
    )
    images = [p for s in sections for p in _section_images(s)] + [scatter_png]
    # The measures' tables only when measures were asked for.
    exported = {name: rows for name, rows in asdict(tables).items() if rows or not name.startswith("measure_")}
    report = Report(html_path, images, exported, warnings=warnings, matrices=shown)
    if export_format:
        report.exported = export_tables(report.tables, out_dir / "tables", export_format)
    return report


def _check_options(models: list[str], datasets: list[str], export_format: str | None) -> None:
    if len(set(models)) < 2:
        raise InputError("a report compares models: give at least two (e.g. --models A,B)")
    if not datasets:
        raise InputError("give at least one dataset (--datasets NAME[,NAME…])")
    if export_format is not None and export_format not in EXPORT_FORMATS:
        raise InputError(f"unknown --format {export_format!r}; use one of {', '.join(EXPORT_FORMATS)}")


def _truncation_warnings(truncation: list[dict[str, Any]]) -> list[str]:
    """A warning for each (model, dataset) whose share of truncated prompts is large
    (docs/design.md §3: a cut prompt's last token is an arbitrary sub-word)."""
    return [
        f"{t['truncated']} of {t['prompts']} prompts of {t['dataset']} ({t['truncated'] / t['prompts']:.0%}) were "
        f"truncated for {t['model']}: with last-token pooling the last token is then an arbitrary sub-word, "
        "which can hide the structure the report looks for"
        for t in truncation
        if t["prompts"] and t["truncated"] / t["prompts"] > TRUNCATION_WARNING_SHARE
    ]


def _dataset_section(
    wh: Warehouse,
    models: list[str],
    dataset: str,
    pairs: list[AffinityMatrix],
    k: int,
    prompt: int,
    square_size: int,
    out_dir: Path,
    progress: bool,
    tables: _Tables,
) -> _Section:
    """Every figure of one dataset, its rows added to ``tables``."""
    vmax = max(float(m.scores.max()) for m in pairs)
    figures = [_pair_figures(m, dataset, k, square_size, vmax, out_dir) for m in pairs]
    for m in pairs:
        _add_pair_rows(tables, m, dataset, k)
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
    tables.mean_square += [
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
    within = [
        _within_figure(compute_affinity(wh, m, m, dataset, k=k, progress=progress), dataset, k, out_dir) for m in models
    ]
    neighbour_png, rows = _neighbour_figure(wh, pairs[0], dataset, prompt, k, out_dir)
    tables.neighbours += rows
    chance = pairs[0].chance
    assert chance is not None  # mutual k-NN always has its closed-form null
    return _Section(dataset, pairs[0].n_prompts, chance, figures, mean_png, within, neighbour_png)


def _pair_figures(
    m: AffinityMatrix, dataset: str, k: int, square_size: int, vmax: float, out_dir: Path
) -> _PairFigures:
    sub = _test_line(m)
    name = f"{_slug(m.model_a)}__{_slug(m.model_b)}__{_slug(dataset)}.png"
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
        out_dir / f"affinity_{name}",
    )
    square = plots.save(
        plots.square_heatmap(
            resize_square(m.scores, square_size),
            f"{m.model_a} × {m.model_b} on {dataset}\nrelative depth, {square_size}×{square_size}",
            vmax=vmax,
            name_a=m.model_a,
            name_b=m.model_b,
        ),
        out_dir / f"square_{name}",
    )
    return _PairFigures(f"{m.model_a} × {m.model_b} @ {dataset}", sub, rect, square)


def _add_pair_rows(tables: _Tables, m: AffinityMatrix, dataset: str, k: int) -> None:
    """The pair's test, cells and max-similarity path as table rows."""
    about = {"model_a": m.model_a, "model_b": m.model_b, "dataset": dataset}
    if m.test:
        tables.diagonal_tests.append({**about, "k": k, **m.test.as_dict()})
    tables.affinity_cells += [
        {**about, "k": k, **cell, "chance": m.chance}
        for cell in m.to_pandas().drop(columns="on_diagonal").to_dict("records")
    ]
    tables.max_similarity_paths += [
        {
            **about,
            "layer_a": int(p.layer_a),
            "depth_a": float(p.depth_a),
            "best_layer_b": int(p.layer_b),
            "best_depth_b": float(p.depth_b),
            "score": float(p.score),
        }
        for p in m.path.itertuples()
    ]


def _within_figure(w: AffinityMatrix, dataset: str, k: int, out_dir: Path) -> Path:
    return plots.save(
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


def _section_images(s: _Section) -> list[Path]:
    return (
        [p for pair in s.pairs for p in (pair.heatmap, pair.square)]
        + [s.mean_square, *s.within, s.neighbours]
        + [p for m in s.measures for p in (m.grid, m.correlations)]
    )


def _measure_figures(
    wh: Warehouse,
    models: list[str],
    dataset: str,
    measures: list[str],
    k: int,
    options: MeasureOptions | None,
    out_dir: Path,
    progress: bool,
    tables: _Tables,
) -> list[_MeasureFigures]:
    """Every cross-model pair under every measure: the matrices side by side, each one's
    diagonal test as a table row, and the Spearman correlation of the cells between measures."""
    from scipy.stats import spearmanr

    by_measure = {
        measure: compute_study(wh, models, dataset, measure=measure, k=k, options=options, progress=progress)
        for measure in measures
    }
    figures = []
    for index, first in enumerate(by_measure[measures[0]]):
        runs = [by_measure[measure][index] for measure in measures]
        for m in runs:
            t = m.test
            tables.measure_tests.append(
                {
                    "model_a": m.model_a,
                    "model_b": m.model_b,
                    "dataset": dataset,
                    "measure": m.measure,
                    "parameters": m.describe_parameters,
                    "chance": m.chance,
                    **(t.as_dict() if t else {}),
                    "run_id": m.run_id,
                }
            )
        label = f"{first.model_a} × {first.model_b} @ {dataset}"
        name = f"{_slug(first.model_a)}__{_slug(first.model_b)}__{_slug(dataset)}.png"
        panels = [(f"{m.label} ({m.describe_parameters or 'no parameters'}); {_test_line(m)}", m.scores) for m in runs]
        grid = plots.save(
            plots.measure_grid(panels, first.layers_a, first.layers_b, first.model_a, first.model_b, label),
            out_dir / f"measures_{name}",
        )
        rho = np.ones((len(runs), len(runs)))
        for i, a in enumerate(runs):
            for j, b in enumerate(runs[:i]):
                rho[i, j] = rho[j, i] = float(spearmanr(a.scores.ravel(), b.scores.ravel()).statistic)
                tables.measure_correlations.append(
                    {
                        "model_a": a.model_a,
                        "model_b": a.model_b,
                        "dataset": dataset,
                        "first": b.measure,
                        "second": a.measure,
                        "spearman": rho[i, j],
                    }
                )
        correlations = plots.save(
            plots.model_matrix(rho, measures, f"{label}\nrank correlation of the cells", label="Spearman ρ"),
            out_dir / f"measure_correlations_{name}",
        )
        figures.append(_MeasureFigures(label, grid, correlations))
    return figures


TEST_COLUMNS = [
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
    ("undefined_reason", "no test because"),
]
MEASURE_TEST_COLUMNS = [
    ("model_a", "model A"),
    ("model_b", "model B"),
    ("dataset", "dataset"),
    ("measure", "measure"),
    ("parameters", "parameters"),
    ("chance", "null mean"),
    ("mean_on", "mean on"),
    ("mean_off", "mean off"),
    ("t", "t"),
    ("log10_p_bonferroni", "log10 p (Bonferroni)"),
    ("undefined_reason", "no test because"),
    ("run_id", "run"),
]
TRUNCATION_COLUMNS = [
    ("model", "model"),
    ("dataset", "dataset"),
    ("prompts", "prompts"),
    ("truncated", "truncated"),
    ("mean_tokens", "mean tokens"),
]


def _render(
    models: list[str],
    datasets: list[str],
    k: int,
    prompt: int,
    sections: list[_Section],
    tables: _Tables,
    scatter: Path,
    warnings: list[str],
    measures: Sequence[str] = (),
) -> str:
    """The page, from templates/report.html (Jinja2 escapes every value it inserts)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("layerbase.analysis.reporting", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["data_uri"] = _data_uri
    env.filters["cell"] = lambda v: f"{v:.4g}" if isinstance(v, float) else "—" if v is None else v
    return env.get_template("report.html").render(
        models=models,
        datasets=datasets,
        k=k,
        prompt=prompt,
        sections=sections,
        tests=tables.diagonal_tests,
        test_columns=TEST_COLUMNS,
        truncation=tables.truncation,
        truncation_columns=TRUNCATION_COLUMNS,
        scatter=scatter,
        warnings=warnings,
        measures=measures,
        measure_tests=tables.measure_tests,
        measure_test_columns=MEASURE_TEST_COLUMNS,
    )


def _test_line(m: AffinityMatrix) -> str:
    t = m.test
    if t is None:
        return "no diagonal test (matrix too small)"
    if t.t is None:
        return f"on-diagonal mean {t.mean_on:.3f} vs off {t.mean_off:.3f}; no test: {t.undefined_reason}"
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


def _data_uri(path: Path) -> str:
    """A PNG file inlined, so that the page opens offline and travels as one file."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def export_tables(tables: dict[str, list[dict[str, Any]]], directory: Path, fmt: str) -> list[Path]:
    """Write each table as ``<name>.<fmt>``."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    plots.make_folder(directory)
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
