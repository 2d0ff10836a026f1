"""The Python API as a notebook uses it: ``layerbase.connect()`` and every method of its
object, against a real PostgreSQL with pgvector, with tiny models for the forward passes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest

import layerbase
from layerbase.ingest.synthetic import store_synthetic
from layerbase.warehouse.errors import InputError
from tests.conftest import new_database, random_texts, write_lines
from tests.helpers import cli

REPO = Path(__file__).resolve().parent.parent


def stored_rows(url: str, model: str, dataset: str, layer: int) -> np.ndarray:
    """The activation rows as the database holds them, read as text (not through COPY)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT a.vec::text FROM activation a JOIN prompt p ON p.id = a.prompt_id JOIN model m ON m.id = a.model_id"
            " JOIN dataset d ON d.id = a.dataset_id WHERE m.name = %s AND d.name = %s AND a.layer = %s"
            " ORDER BY p.position",
            (model, dataset, layer),
        ).fetchall()
    return np.array([json.loads(r[0]) for r in rows], dtype=np.float32)


def test_connect_creates_the_schema_of_an_empty_database(empty_db_url: str) -> None:
    lb = layerbase.connect(empty_db_url, progress=False)
    assert repr(lb).startswith("<Layerbase server postgresql+psycopg://")
    assert lb.models().empty and list(lb.models().columns)[:2] == ["name", "source"]
    assert lb.datasets().empty and lb.jobs().empty and lb.affinity_runs().empty and lb.steering_vectors().empty
    status = lb.status()
    assert status["schema_revision"] == status["code_revision"]
    lb.close()


def test_connect_without_upgrade_refuses_an_empty_database(empty_db_url: str) -> None:
    with pytest.raises(layerbase.LayerbaseError, match="layerbase db upgrade"):
        layerbase.connect(empty_db_url, upgrade=False)


def test_notebook_session_from_texts_to_affinity(db_url: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    lb = layerbase.connect(db_url, progress=False)
    texts = random_texts(24, seed=5)
    added = lb.add_dataset("toy", texts)
    assert added["created"] and added["prompts"] == 24
    assert not lb.add_dataset("toy", texts)["created"]  # the same prompts again: a no-op
    from_file = lb.add_dataset("toy-file", write_lines(tmp_path / "p.txt", texts[:10]))
    assert from_file["prompts"] == 10
    assert lb.add_random_dataset("rnd", 12, 8)["prompts"] == 12
    with pytest.raises(InputError, match="blank"):
        lb.add_dataset("bad", ["fine", "  "])
    datasets = lb.datasets()
    assert set(datasets["name"]) == {"toy", "toy-file", "rnd"}
    prompts = lb.prompts("toy")
    assert prompts["text"].tolist() == texts and prompts.index.tolist() == list(range(24))

    report = lb.ingest(str(tiny_models["gpt2"]), "toy", name="g")
    assert report.state == "done" and report.prompts_done == 24
    both = lb.ingest(str(tiny_models["llama"]), ["toy", "rnd"], name="l")
    assert isinstance(both, list) and [r.dataset for r in both] == ["toy", "rnd"]
    models = lb.models().set_index("name")
    assert models.loc["g", "n_layers"] == 3 and models.loc["l", "n_layers"] == 4
    assert set(lb.jobs()["state"]) == {"done"}

    # Activations: float32 [n, d] in prompt order, equal to the stored rows.
    x = lb.activations("g", "toy", 2)
    assert x.dtype == np.float32 and x.shape == (24, 32)
    np.testing.assert_array_equal(x, stored_rows(db_url, "g", "toy", 2))
    with pytest.raises(InputError, match="stored layers are 1..3"):
        lb.activations("g", "toy", 7)
    with pytest.raises(InputError, match="has not been ingested"):
        lb.activations("g", "rnd", 1)
    # Arguments in another order: a clear error, not the database's type error.
    with pytest.raises(InputError, match=r"not 'toy': the call is neighbors\(model, dataset, layer"):
        lb.neighbors("g", 2, "toy", prompt=0)
    with pytest.raises(InputError, match="each side of an overlap is"):
        lb.overlap(0, ("g", 2), ("l", 2, "toy"))

    knn = lb.knn("g", "toy", k=5)
    assert knn["layer"].tolist() == [1, 2, 3] and (knn["engine"] == "blas").all() and not knn["reused"].any()
    assert lb.knn("g", "toy", k=5)["reused"].all()

    # The CLI computes and stores the matrix; the API reads that same matrix back.
    out = cli("affinity", "--models", "g,l", "--dataset", "toy", "-k", "5", "--json", "--no-progress")
    assert out.exit_code == 0, out.output
    stored = json.loads(out.output)[0]
    m = lb.affinity("g", "l", "toy", k=5)
    assert m.run_id == stored["run_id"]
    np.testing.assert_allclose(m.matrix, np.array(stored["scores"]), atol=1e-6)
    assert m.matrix.shape == (3, 4) and m.layers_a == [1, 2, 3] and m.layers_b == [1, 2, 3, 4]
    assert m.test is not None and m.test.n_on + m.test.n_off == 12
    assert m.test.mean_on == pytest.approx(stored["test"]["mean_on"])
    path = m.path
    assert path["layer_a"].tolist() == [1, 2, 3]
    assert (path["score"].to_numpy() == m.matrix.max(axis=1)).all()
    cells = m.to_pandas()
    assert len(cells) == 12 and cells["on_diagonal"].sum() == m.test.n_on
    assert cells.loc[(cells.layer_a == 3) & (cells.layer_b == 4), "depth_b"].item() == 1.0
    figure = m.plot()
    figure.savefig(tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 1000
    assert "g × l" in m._repr_html_()
    runs = lb.affinity_runs()
    assert runs["run_id"].tolist() == [m.run_id] and runs["n_pairs"].tolist() == [1]
    # Recomputing gives the same matrix under a new run.
    again = lb.affinity("g", "l", "toy", k=5, recompute=True)
    assert again.run_id != m.run_id
    np.testing.assert_allclose(again.matrix, m.matrix)
    with pytest.raises(InputError, match="unknown measure"):
        lb.affinity("g", "l", "toy", measure="nope")

    # Neighbours of a stored prompt, of a new text (the model loads once), and an overlap.
    near = lb.neighbors("g", "toy", 2, prompt=3, k=4)
    assert near.index.tolist() == [1, 2, 3, 4] and 3 not in near["position"].tolist()
    assert near.attrs["path"].startswith("stored k-NN set") and near["distance"].is_monotonic_increasing
    by_text = lb.neighbors("g", "toy", 2, text=texts[3], k=4)
    assert by_text["position"].iloc[0] == 3 and by_text["distance"].iloc[0] < 1e-5
    lb.neighbors("g", "toy", 1, text="another text", k=4)
    assert lb.model_cache.loads == 1 and len(lb.model_cache) == 1
    both_sides = lb.overlap(3, ("g", 2, "toy"), ("l", 3, "toy"), k=4)
    assert both_sides["side"].value_counts().to_dict() == {"first": 4, "second": 4}
    shared = both_sides.attrs["shared"]
    assert sorted(set(both_sides.loc[both_sides["shared"], "position"])) == shared
    assert both_sides.attrs["overlap"] == len(shared) / 4
    lb.close()


def test_notebook_steering_geometry_and_report(db_url: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    lb = layerbase.connect(db_url, progress=False)
    lb.add_dataset("toy", random_texts(16, seed=2))
    lb.ingest(str(tiny_models["gpt2"]), "toy", name="g")
    lb.ingest(str(tiny_models["llama"]), "toy", name="l")
    for name, model in (("g", "gpt2"), ("l", "llama")):
        exported = lb.export_embeddings(str(tiny_models[model]), name=name)
        assert exported["model"] == name and exported["rows"]["input"] > 300

    info = lb.make_steering_vector("l", 2, ["a happy day", "good news"], ["a sad day", "bad news"], name="mood")
    assert info.method == "mean-difference" and info.n_positive == 2
    vectors = lb.steering_vectors()
    assert vectors["name"].tolist() == ["mood"]
    v = lb.steering_vector("mood")
    assert v.dtype == np.float32 and v.shape == (32,) and np.linalg.norm(v) == pytest.approx(info.norm, rel=1e-5)
    out = lb.generate("mood", "The weather", 4.0, max_new_tokens=5)
    assert set(out) >= {"steered", "unsteered"} and out["layer"] == 2
    lb.generate("mood", "The weather", -4.0, max_new_tokens=5)
    assert lb.model_cache.loads == 1  # the model that made the vector stayed loaded
    evaluation = lb.evaluate_steering(
        "mood",
        ["The day was", "News:"],
        positive_words=[" the"],
        negative_words=[" dog"],
        coefficients=[1.0],
        n_random=1,
    )
    assert [row["coefficient"] for row in evaluation.summary()] == [1.0]

    moved = lb.transfer("mood", to="g", layer=2, calibrate="none")
    assert moved.vector.model == "g" and moved.map.model_a == "l" and moved.calibration["rule"] == "none"
    assert lb.compare_vectors("mood->g", "mood->g") == pytest.approx(1.0)

    matrix, pairs = lb.geometry_global(["g", "l"], sample=200)
    assert matrix.shape == (2, 2) and np.allclose(np.diag(matrix), 1) and len(pairs) == 1
    local = lb.geometry_local("g", "l", sample=50, k=5, id_k=10)
    assert local.n_tokens == 50

    report = lb.report(["g", "l"], ["toy"], tmp_path / "r", k=3)
    assert report.html.exists() and report.images
    lb.close()


def test_affinity_of_synthetic_models_is_read_back_exactly(wh, db_url: str) -> None:
    store_synthetic(wh, "A", "d", n=40, d=8, n_layers=3, seed=1)
    store_synthetic(wh, "B", "d", n=40, d=8, n_layers=2, seed=2)
    lb = layerbase.Layerbase(wh, progress=False)
    first = lb.affinity("A", "B", "d", k=5)
    second = lb.affinity("A", "B", "d", k=5)
    assert second.run_id == first.run_id and (second.matrix == first.matrix).all()
    assert second.test == first.test
    with psycopg.connect(db_url) as conn:
        cells = conn.execute(
            "SELECT layer_a, layer_b, score FROM affinity_cell WHERE run_id = %s", (first.run_id,)
        ).fetchall()
    for layer_a, layer_b, score in cells:
        assert first.matrix[layer_a - 1, layer_b - 1] == score


def _run(code: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_is_light_and_changes_no_global_state(tmp_path: Path) -> None:
    code = """
import logging, sys, warnings
import layerbase
heavy = [m for m in ("torch", "numpy", "pandas", "sqlalchemy", "matplotlib", "transformers") if m in sys.modules]
assert not heavy, heavy
# The libraries underneath may set their own filters when imported (scipy does); what is
# checked is that Layerbase's own modules change nothing on top of them.
import numpy, scipy.stats, pandas, sqlalchemy, matplotlib, psycopg, click, tqdm.auto, torch, transformers
filters, handlers = list(warnings.filters), list(logging.root.handlers)
# The modules a session that uses all of the API imports.
import importlib
for name in ["layerbase.api", "layerbase.cli.main", "layerbase.analysis.reporting.plots",
             "layerbase.analysis.reporting.report", "layerbase.analysis.similarity.affinity",
             "layerbase.analysis.steering.vectors", "layerbase.analysis.steering.emb2emb",
             "layerbase.analysis.geometry.tokens", "layerbase.ingest.runner", "layerbase.ingest.loading"]:
    importlib.import_module(name)
assert "matplotlib.pyplot" not in sys.modules, "pyplot selects a backend"
assert warnings.filters == filters, "warning filters changed"
assert logging.root.handlers == handlers and logging.root.level == logging.WARNING
print("ok")
"""
    result = _run(code, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_python_m_layerbase_is_the_cli(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "layerbase", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "Usage: layerbase" in result.stdout and "affinity" in result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the checkout, so that the build leaves nothing in it."""
    import shutil

    source = tmp_path_factory.mktemp("source") / "layerbase"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".venv"),
    )
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (found,) = out.glob("layerbase-*.whl")
    return found


def test_the_wheel_holds_one_namespace_with_its_migrations(wheel: Path) -> None:
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"layerbase", wheel.name.split("-py")[0] + ".dist-info"}
    for needed in (
        "layerbase/__init__.py",
        "layerbase/__main__.py",
        "layerbase/api.py",
        "layerbase/warehouse/engine.py",
        "layerbase/ingest/runner.py",
        "layerbase/analysis/knn/materialize.py",
        "layerbase/cli/main.py",
        "layerbase/migrations/env.py",
        "layerbase/migrations/script.py.mako",
        "layerbase/migrations/versions/0001_initial_schema.py",
    ):
        assert needed in names, needed
    versions = {n for n in names if n.startswith("layerbase/migrations/versions/") and n.endswith(".py")}
    assert len(versions) == len(list((REPO / "alembic" / "versions").glob("*.py")))
    entry_points = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points[0]).decode()
    assert "layerbase = layerbase.cli.main:main" in text


def test_the_installed_wheel_creates_its_schema_without_the_checkout(wheel: Path, pg_server, tmp_path: Path) -> None:
    import os

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    url = new_database(pg_server, template="template1")
    env = {**os.environ, "PYTHONPATH": str(target), "LAYERBASE_DATABASE_URL": url}
    where = tmp_path / "elsewhere"
    where.mkdir()
    code = """
import layerbase, layerbase.warehouse.schema as schema
print(layerbase.__file__)
print(schema.migrations_dir())
try:
    import warehouse
    print("warehouse importable")
except ImportError:
    print("no top-level warehouse")
"""
    shown = _run(code, where, env)
    assert shown.returncode == 0, shown.stderr
    package, migrations, top = shown.stdout.split("\n")[:3]
    assert package.startswith(str(target)) and migrations == str(target / "layerbase" / "migrations")
    assert top == "no top-level warehouse"
    upgrade = subprocess.run(
        [sys.executable, "-m", "layerbase", "db", "upgrade"],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert upgrade.returncode == 0, upgrade.stderr
    assert "Schema upgraded (empty) ->" in upgrade.stdout
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT to_regclass('activation') IS NOT NULL").fetchone()[0]


def test_connect_with_no_url_starts_the_embedded_server(tmp_path: Path) -> None:
    """What a fresh notebook does: no URL, no server running, an empty data directory."""
    import os

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LAYERBASE_DATABASE_URL")}
    env["LAYERBASE_HOME"] = str(home)
    code = """
import layerbase
lb = layerbase.connect(progress=False)
added = lb.add_dataset("d", ["one text", "another text"])
print(lb.warehouse.embedded, added["prompts"], lb.datasets()["name"].tolist())
lb.close()
lb = layerbase.connect(progress=False)  # the server keeps running: the same warehouse again
print(lb.datasets()["name"].tolist(), lb.status()["embedded"])
"""
    try:
        result = _run(code, tmp_path, env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["True 2 ['d']", "['d'] True"]
        assert (home / "pgdata").is_dir() and oct((home / "pgdata").stat().st_mode & 0o777) == "0o700"
    finally:
        subprocess.run([sys.executable, "-m", "layerbase", "db", "stop"], env=env, capture_output=True, timeout=120)
