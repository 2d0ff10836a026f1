"""Reports (HTML with inlined images, PNGs, table exports) and the docker-compose file."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from layerbase.analysis.reporting.report import build_report
from layerbase.ingest.synthetic import clustered_vectors, store_synthetic
from tests.helpers import assert_clean_error, cli

REPO = Path(__file__).resolve().parent.parent


def check_report(html_path: Path, images: list[Path]) -> None:
    """The HTML exists and inlines every image; each PNG decodes with a sensible size."""
    page = html_path.read_text()
    inlined = re.findall(r"src=[\"']data:image/png;base64,([A-Za-z0-9+/=]+)[\"']", page)
    assert len(inlined) == len(images)
    assert "http://" not in page and "https://" not in page  # opens offline
    for data in inlined:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    for png in images:
        with Image.open(png) as img:
            assert img.format == "PNG" and img.width >= 300 and img.height >= 250, (png, img.size)


def synthetic_study(wh) -> None:
    base = clustered_vectors(80, 16, seed=1)
    rng = np.random.default_rng(0)
    store_synthetic(
        wh,
        "deep",
        "news",
        n=80,
        d=16,
        n_layers=6,
        layer_vectors={layer: base + 0.25 * layer * rng.standard_normal(base.shape) for layer in range(1, 7)},
    )
    store_synthetic(
        wh,
        "shallow",
        "news",
        n=80,
        d=16,
        n_layers=4,
        layer_vectors={layer: base + 0.4 * layer * rng.standard_normal(base.shape) for layer in range(1, 5)},
    )


def test_report_files_and_exports(wh, tmp_path: Path) -> None:
    synthetic_study(wh)
    out = tmp_path / "report"
    report = build_report(
        wh, ["deep", "shallow"], ["news"], out, k=5, prompt=3, square_size=16, export_format="parquet", progress=False
    )
    check_report(report.html, report.images)
    names = sorted(p.name for p in report.images)
    assert "affinity_deep__shallow__news.png" in names and "square_deep__shallow__news.png" in names
    assert "mean_square__news.png" in names and "on_vs_off_diagonal.png" in names
    assert {"within_deep__news.png", "within_shallow__news.png", "neighbours_prompt3__news.png"} <= set(names)
    from layerbase.analysis.reporting.plots import DPI, heatmap_size

    width, height = (round(v * DPI) for v in heatmap_size(6, 4))
    with Image.open(out / "affinity_deep__shallow__news.png") as img:
        assert abs(img.width - width) < 0.1 * width and abs(img.height - height) < 0.1 * height, img.size
    page = report.html.read_text()
    assert "deep" in page and "shallow" in page and "log10 p" in page and "generalized diagonal" in page
    tables = {p.stem: pq.read_table(p) for p in report.exported}
    assert set(tables) == {
        "diagonal_tests",
        "affinity_cells",
        "max_similarity_paths",
        "mean_square",
        "neighbours",
        "truncation",
    }
    assert tables["affinity_cells"].num_rows == 24 and tables["mean_square"].num_rows == 256
    assert tables["diagonal_tests"].column("n_on").to_pylist() == [12]


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_report_cli_exports(db_url: str, wh, tmp_path: Path, fmt: str) -> None:
    synthetic_study(wh)
    result = cli(
        "report",
        "--models",
        "deep,shallow",
        "--datasets",
        "news",
        "--out",
        str(tmp_path / "r"),
        "-k",
        "5",
        "--format",
        fmt,
        "--no-progress",
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert Path(summary["html"]).exists() and len(summary["exported"]) == 6
    cells = tmp_path / "r" / "tables" / f"affinity_cells.{fmt}"
    text = cells.read_text()
    assert (
        ("layer_a,layer_b" in text.splitlines()[0].replace("model_a,model_b,dataset,k,", ""))
        if fmt == "csv"
        else len(json.loads(text)) == 24
    )


def test_report_warns_about_truncation(db_url: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    f = tmp_path / "long.txt"
    f.write_text("".join(f"{'markets rallied ' * (20 + i)} number {i}\n" for i in range(12)))
    cli("dataset", "add", "long", str(f))
    for arch in ("gpt2", "llama"):
        assert (
            cli(
                "ingest", "--model", str(tiny_models[arch]), "--dataset", "long", "--max-tokens", "16", "--no-progress"
            ).exit_code
            == 0
        )
    result = cli(
        "report",
        "--models",
        "tiny-gpt2,tiny-llama",
        "--datasets",
        "long",
        "--out",
        str(tmp_path / "r"),
        "-k",
        "3",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "Warning: 12 of 12 prompts of long (100%) were truncated" in result.output
    assert "truncated for tiny-gpt2" in (tmp_path / "r" / "report.html").read_text()


def test_report_bad_inputs(db_url: str, wh, tmp_path: Path) -> None:
    synthetic_study(wh)
    assert_clean_error(cli("report", "--models", "deep", "--datasets", "news", "--out", str(tmp_path)), "at least two")
    assert_clean_error(
        cli("report", "--models", "deep,nope", "--datasets", "news", "--out", str(tmp_path)), "no model named 'nope'"
    )


def test_compose_file_runs_pgvector_and_matches_the_docs() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    db = compose["services"]["db"]
    assert db["image"].startswith("pgvector/pgvector:")
    tag = db["image"].split(":")[1]  # e.g. 0.8.5-pg17
    assert tuple(int(x) for x in tag.split("-")[0].split(".")) >= (0, 8, 5)
    env = db["environment"]
    assert env["POSTGRES_USER"] == "${LAYERBASE_DB_USER:-layerbase}"
    readme = (REPO / "docs" / "cli.md").read_text()
    # the URL the docs tell users to export is the one the compose defaults give
    assert "export DATABASE_URL=postgresql://layerbase:layerbase@localhost:5432/layerbase" in readme
    assert "${LAYERBASE_DB_PORT:-5432}:5432" in db["ports"]
    bi = compose["services"]["superset"]
    assert bi["profiles"] == ["bi"] and "db" in bi["depends_on"]
    reader_url = bi["environment"]["DATABASE_URL"]
    assert reader_url.startswith("postgresql://${LAYERBASE_READER_USER:-layerbase_reader}:")
    assert "@db:5432/" in reader_url
    assert "grant-reader layerbase_reader" in (REPO / "docker-compose.yml").read_text()


def test_the_page_escapes_what_it_inserts(tmp_path: Path) -> None:
    from layerbase.analysis.reporting.report import _render, _Tables

    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    tables = _Tables(truncation=[{"model": "<b>m</b>", "dataset": "d&d", "prompts": 3, "truncated": 1}])
    page = _render(["<script>alert(1)</script>", "b"], ["d&d"], 10, 0, [], tables, png, ["a <i>warning</i>"])
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>m</b>" not in page and "&lt;b&gt;m&lt;/b&gt;" in page
    assert "d&amp;d" in page and "a &lt;i&gt;warning&lt;/i&gt;" in page


def test_heatmap_subtitles_break_between_clauses() -> None:
    from layerbase.analysis.reporting.plots import wrap_clauses

    text = "news; on-diagonal mean 0.215 vs off 0.149, t = 10.9, log10 p = -24.7 (Bonferroni, 1 pair(s): -24.7)"
    lines = wrap_clauses(text, 58).split("\n")
    assert lines == [
        "news; on-diagonal mean 0.215 vs off 0.149, t = 10.9,",
        "log10 p = -24.7 (Bonferroni, 1 pair(s): -24.7)",
    ]
    long = wrap_clauses("word " * 40, 30).split("\n")  # one clause longer than a line: wrapped at spaces
    assert len(long) > 1 and all(len(line) <= 30 for line in long)
