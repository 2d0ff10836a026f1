"""What a red-team run and a new user found (issue 22): each class of failure, with other
instances of the class than the ones reported, and the database unchanged on refusal."""

from __future__ import annotations

import psycopg
import pytest

from layerbase.analysis.similarity.affinity import compute_affinity
from layerbase.ingest.synthetic import store_synthetic
from tests.helpers import assert_clean_error, cli, fingerprint

ROLE_STATE = """
SELECT r.rolcreatedb, r.rolcreaterole, r.rolbypassrls,
       array(SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
             WHERE m.member = r.oid ORDER BY 1),
       has_table_privilege(r.oid, 'knn_neighbor', 'DELETE')
FROM pg_roles r WHERE r.rolname = %s
"""


def _powerful_role(url: str, name: str) -> None:
    """A role with the rights the red-team run gave: attributes, a predefined role, a grant,
    a column grant, and default privileges on future tables."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {name}")
        conn.execute(f"CREATE ROLE {name} LOGIN CREATEDB CREATEROLE BYPASSRLS")
        conn.execute(f"GRANT pg_write_all_data, pg_read_all_data TO {name}")
        conn.execute(f"GRANT DELETE ON knn_neighbor TO {name}")
        conn.execute(f"GRANT UPDATE (name) ON model TO {name}")
        conn.execute(f"GRANT CREATE ON SCHEMA public TO {name}")
        conn.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT INSERT ON TABLES TO {name}")


def _drop_role(url: str, name: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP OWNED BY {name}")
        conn.execute(f"DROP ROLE {name}")


def test_grant_reader_refuses_an_existing_role_and_strips_it_only_when_asked(wh, db_url: str) -> None:
    store_synthetic(wh, "A", "d", n=30, d=8, n_layers=2, seed=1)
    store_synthetic(wh, "B", "d", n=30, d=8, n_layers=2, seed=2)
    compute_affinity(wh, "A", "B", "d", k=5, progress=False)
    name = "lb_powerful"
    _powerful_role(db_url, name)
    try:
        with psycopg.connect(db_url) as conn:
            before = conn.execute(ROLE_STATE, (name,)).fetchone()
        assert before == (True, True, True, ["pg_read_all_data", "pg_write_all_data"], True)
        tables = fingerprint(db_url)
        refused = cli("db", "grant-reader", name)
        assert_clean_error(refused, "already exists", "--strip-existing", "new name")
        with psycopg.connect(db_url) as conn:
            assert conn.execute(ROLE_STATE, (name,)).fetchone() == before  # untouched
        assert fingerprint(db_url) == tables

        done = cli("db", "grant-reader", name, "--strip-existing", "--password-env", "PW", env={"PW": "pw-9"})
        assert done.exit_code == 0, done.output
        assert "Stripped and re-granted" in done.output and "Verified in the catalog" in done.output
        with psycopg.connect(db_url) as conn:
            assert conn.execute(ROLE_STATE, (name,)).fetchone() == (False, False, False, [], False)
            verifier = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (name,)).fetchone()[0]
        assert verifier.startswith("SCRAM-SHA-256$")
        reader = db_url.replace("postgres:@", f"{name}:pw-9@")
        with psycopg.connect(reader, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM bi_affinity_cell").fetchone()[0] > 0
            for statement in (
                "DELETE FROM knn_neighbor",
                "UPDATE model SET name = 'x'",
                "SELECT * FROM activation LIMIT 1",
                "CREATE TABLE mine (x int)",
                f"CREATE ROLE {name}_child",
                "CREATE DATABASE mine",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
        # a table made later by the owner is not granted to the reader by default privileges
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE later (x int)")
            assert not conn.execute(f"SELECT has_table_privilege('{name}', 'later', 'INSERT')").fetchone()[0]
        # the role is now Layerbase's reader: running again needs no flag
        assert cli("db", "grant-reader", name).exit_code == 0
    finally:
        _drop_role(db_url, name)


def test_grant_reader_refuses_a_role_that_owns_objects_or_would_keep_public_rights(wh, db_url: str) -> None:
    name = "lb_owner"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {name}")
        conn.execute(f"CREATE ROLE {name} LOGIN")
        conn.execute("CREATE TABLE owned_by_role (x int)")
        conn.execute(f"ALTER TABLE owned_by_role OWNER TO {name}")
    try:
        tables = fingerprint(db_url)
        refused = cli("db", "grant-reader", name, "--strip-existing")
        assert_clean_error(refused, "owns 1 objects", "REASSIGN OWNED")
        assert fingerprint(db_url) == tables
    finally:
        _drop_role(db_url, name)
    # a right every role holds through PUBLIC would make the claim false: refused, and the
    # new role is not created (the transaction rolls back)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("GRANT SELECT ON prompt TO PUBLIC")
    try:
        refused = cli("db", "grant-reader", "lb_new_reader")
        assert_clean_error(refused, "would still hold rights", "SELECT on public.prompt", "PUBLIC")
        with psycopg.connect(db_url) as conn:
            assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = 'lb_new_reader'").fetchone()[0] == 0
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("REVOKE SELECT ON prompt FROM PUBLIC")
    assert_clean_error(cli("db", "grant-reader", "postgres"), "superuser")


def test_embedded_server_listens_on_a_private_socket_only(pg_server, tmp_path) -> None:
    """The embedded server trusts local connections, so only its socket's owner (and root)
    may reach it: no TCP listener, socket mode 0700 in a 0700 directory, and any TCP rule a
    user enables later asks for a SCRAM password."""
    import os
    import stat
    import subprocess
    import sys
    from pathlib import Path

    with psycopg.connect(pg_server.get_uri()) as conn:
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('listen_addresses', 'unix_socket_permissions', 'unix_socket_directories', 'password_encryption')"
            ).fetchall()
        )
        rules = conn.execute("SELECT type, auth_method FROM pg_hba_file_rules").fetchall()
        pgdata = Path(conn.execute("SHOW data_directory").fetchone()[0])
    assert settings["listen_addresses"] == ""
    assert settings["unix_socket_permissions"] == "0700"
    assert settings["password_encryption"] == "scram-sha-256"
    assert {method for kind, method in rules if kind == "local"} == {"trust"}
    assert {method for kind, method in rules if kind.startswith("host")} == {"scram-sha-256"}
    assert stat.S_IMODE(pgdata.stat().st_mode) == 0o700
    socket = Path(settings["unix_socket_directories"]) / f".s.PGSQL.{pg_server._postmaster_info.port}"
    assert stat.S_IMODE(socket.stat().st_mode) == 0o700
    if os.geteuid() != 0:
        return  # only root can act as another user here; the modes above are the guard
    # another OS user is refused by the socket's mode, even where it can see the socket
    probe = (
        "import os, psycopg\n"
        "os.setgid(65534); os.setuid(65534)\n"
        f"try:\n    psycopg.connect({pg_server.get_uri()!r}, connect_timeout=5)\n"
        "except psycopg.OperationalError as e:\n    print('refused:', e)\n"
        "else:\n    print('connected')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "refused:" in out.stdout and "connected" not in out.stdout.replace("refused", ""), out


def _changed(model_dir, what: str) -> None:
    """Change one part of a saved model: its weights, its config, or its tokenizer."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    if what == "weights":  # one block's weights, as a fine-tune would (layers above it change)
        weights = load_file(model_dir / "model.safetensors")
        name = next(n for n in weights if ".2." in n and n.endswith("weight"))
        weights[name] = weights[name] + 0.5 * torch.randn_like(weights[name])
        save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    elif what == "config":
        config = json.loads((model_dir / "config.json").read_text())
        config["layer_norm_epsilon"] = 0.1
        (model_dir / "config.json").write_text(json.dumps(config))
    else:
        tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
        tokenizer["normalizer"] = {"type": "Lowercase"}
        (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))


@pytest.mark.parametrize("what", ["weights", "config", "tokenizer"])
def test_a_model_name_stays_tied_to_the_files_its_activations_came_from(
    wh, db_url: str, tiny_models, tmp_path, what: str
) -> None:
    import shutil

    import sqlalchemy as sa

    from tests.conftest import random_texts, write_lines

    model_dir = tmp_path / "mdir"
    shutil.copytree(tiny_models["gpt2"], model_dir)
    for name in ("a", "b"):
        assert cli("dataset", "add", name, str(write_lines(tmp_path / f"{name}.txt", random_texts(6)))).exit_code == 0
    first = cli("ingest", "--model", str(model_dir), "--dataset", "a", "--name", "same", "--no-progress")
    assert first.exit_code == 0, first.output
    with wh.engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT fingerprint FROM model WHERE name = 'same'")).scalar_one()
    assert stored.startswith("sha256:") and len(stored) == 71
    _changed(model_dir, what)
    before = fingerprint(db_url)
    again = cli("ingest", "--model", str(model_dir), "--dataset", "b", "--name", "same", "--no-progress")
    assert_clean_error(again, "changed since its activations were stored", stored[7:19], "new --name")
    lookup = cli("neighbors", "--model", "same", "--layer", "1", "--dataset", "a", "--text", "a new text", "-k", "3")
    assert_clean_error(lookup, "changed since its activations were stored")
    assert fingerprint(db_url) == before
    # under a new name the changed files are a model of their own
    other = cli("ingest", "--model", str(model_dir), "--dataset", "b", "--name", "changed", "--no-progress")
    assert other.exit_code == 0, other.output
    with wh.engine.connect() as conn:
        prints = dict(conn.execute(sa.text("SELECT name, fingerprint FROM model")).all())
    assert prints["changed"] != prints["same"] == stored


def test_a_model_stored_before_fingerprints_adopts_one_on_its_next_load(wh, tiny_models, tmp_path) -> None:
    import sqlalchemy as sa

    from layerbase.ingest.loading import source_fingerprint
    from tests.conftest import random_texts, write_lines

    for name in ("a", "b"):
        assert cli("dataset", "add", name, str(write_lines(tmp_path / f"{name}.txt", random_texts(5)))).exit_code == 0
    args = ("--model", str(tiny_models["llama"]), "--name", "old", "--no-progress")
    assert cli("ingest", "--dataset", "a", *args).exit_code == 0
    with wh.engine.begin() as conn:
        conn.execute(sa.text("UPDATE model SET fingerprint = NULL"))
    assert cli("ingest", "--dataset", "b", *args).exit_code == 0
    with wh.engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT fingerprint FROM model")).scalar_one()
    assert stored == source_fingerprint(str(tiny_models["llama"]))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["ingest", "--model", "no-org/no-such-model", "--dataset", "small"], "the model 'no-org/no-such-model'"),
        (["dataset", "add-hf", "x", "no-org/no-such-data"], "the dataset 'no-org/no-such-data'"),
    ],
)
def test_an_unknown_hub_id_fails_at_once_without_retries(db_url: str, tmp_path, args, needle) -> None:
    """With the hub switched on (no HF_HUB_OFFLINE) and out of reach, as on these machines: one
    question to the hub, one line, no retry warnings. Where the hub is reachable, the same ids
    get 'no such repository' instead; either way nothing is stored."""
    import os
    import subprocess
    import sys

    from tests.conftest import random_texts, write_lines

    assert cli("dataset", "add", "small", str(write_lines(tmp_path / "s.txt", random_texts(3)))).exit_code == 0
    before = fingerprint(db_url)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    run = subprocess.run(
        [sys.executable, "-m", "layerbase", *args], env=env, capture_output=True, text=True, timeout=120
    )
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert run.returncode == 2 and lines[-1].startswith("Error:") and needle in lines[-1], lines
    assert "hub cannot be reached" in lines[-1] or "no model" in lines[-1] or "no dataset" in lines[-1], lines
    assert not any("Retry" in line for line in lines) and len(lines) == 1, lines
    assert fingerprint(db_url) == before


def test_affinity_runs_are_immutable_and_ids_stay_valid(wh, db_url: str, tmp_path) -> None:
    import numpy as np

    import layerbase
    from layerbase.warehouse.errors import NotFoundError

    store_synthetic(wh, "A", "d", n=60, d=8, n_layers=3, seed=1)
    store_synthetic(wh, "B", "d", n=60, d=8, n_layers=2, seed=2)
    lb = layerbase.connect(db_url, progress=False)
    first = lb.affinity("A", "B", "d", k=5)
    assert lb.affinity("A", "B", "d", k=5).run_id == first.run_id  # current: reused, not recomputed
    assert cli("knn", "--model", "A", "--dataset", "d", "--k-max", "20", "--force", "--no-progress").exit_code == 0
    second = lb.affinity("A", "B", "d", k=5)  # A's sets are newer than the first run: a new run
    assert second.run_id > first.run_id
    third = lb.affinity("A", "B", "d", k=5, recompute=True)
    assert third.run_id > second.run_id
    # a report adds nothing where the study's runs are current, and removes nothing
    before = set(lb.affinity_runs()["run_id"])
    report = cli(
        "report", "--models", "A,B", "--datasets", "d", "-k", "5", "--out", str(tmp_path / "r"), "--no-progress"
    )
    assert report.exit_code == 0, report.output
    runs = lb.affinity_runs()
    assert before <= set(runs["run_id"])
    kept = lb.affinity_run(first.run_id)  # the first id still gives the first matrix
    assert np.array_equal(kept.scores, first.scores) and kept.test == first.test
    current = runs[runs["is_current"]]
    assert set(current["pair_kind"]) == {"cross-model", "within-model"}  # the report's A x A, B x B
    with psycopg.connect(db_url) as conn:
        cells = conn.execute(
            "SELECT affinity_run_id, bool_and(is_current), min(pair_kind) FROM bi_affinity_cell GROUP BY 1 ORDER BY 1"
        ).fetchall()
    assert {r[0]: r[1] for r in cells}[first.run_id] is False
    assert [r[1] for r in cells].count(True) == len(current)
    with pytest.raises(NotFoundError, match="there is no affinity run 9999"):
        lb.affinity_run(9999)
    listed = cli("affinity-runs", "--all")
    assert listed.exit_code == 0 and str(first.run_id) in listed.output


def test_degenerate_statistics_are_refused_or_stored_as_undefined(wh, db_url: str) -> None:
    import numpy as np

    from layerbase.analysis.similarity.stats import diagonal_test

    store_synthetic(wh, "A", "d", n=20, d=8, n_layers=3, seed=1)
    store_synthetic(wh, "B", "d", n=20, d=8, n_layers=2, seed=2)
    before = fingerprint(db_url)
    refused = cli("affinity", "--models", "A,B", "--dataset", "d", "-k", "19", "--no-progress")
    assert_clean_error(refused, "k = 19 on 20 prompts", "every score is 1", "at most 18")
    assert fingerprint(db_url) == before
    # cells without variance: counts and means, no statistic, and the reason
    flat = diagonal_test(np.full((4, 3), 0.25))
    assert flat.t is None and flat.p is None and flat.log10_p_bonferroni is None
    assert "same score" in flat.undefined_reason and flat.mean_on == flat.mean_off == 0.25
    split = diagonal_test(np.where(np.eye(4, 3, dtype=bool) | np.eye(4, 3, -1, dtype=bool), 0.5, 0.1))
    assert split.t is None and "no variance" in split.undefined_reason
    # and the database refuses a NaN statistic whatever writes it
    ok = cli("affinity", "--models", "A,B", "--dataset", "d", "-k", "18", "--no-progress")  # n - 2: defined
    assert ok.exit_code == 0, ok.output
    with psycopg.connect(db_url) as conn:
        for statement in (
            "UPDATE diagonal_test SET t = 'NaN'",
            "UPDATE diagonal_test SET t = NULL",  # undefined needs its reason
            "UPDATE affinity_cell SET score = 'NaN'",
        ):
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute(statement)
            conn.rollback()


def test_bulk_writes_of_derived_rows_leave_fresh_planner_statistics(wh, db_url: str) -> None:
    store_synthetic(wh, "A", "d", n=80, d=8, n_layers=2, seed=1)
    store_synthetic(wh, "B", "d", n=80, d=8, n_layers=2, seed=2)

    def estimated_and_real(table: str) -> tuple[float, int]:
        with psycopg.connect(db_url) as conn:
            return conn.execute(
                f"SELECT (SELECT reltuples FROM pg_class WHERE relname = '{table}'), (SELECT count(*) FROM {table})"
            ).fetchone()

    assert cli("knn", "--model", "A", "--dataset", "d", "--k-max", "10", "--no-progress").exit_code == 0
    assert estimated_and_real("knn_neighbor") == (160, 160)
    assert cli("affinity", "--models", "A,B", "--dataset", "d", "-k", "5", "--no-progress").exit_code == 0
    assert estimated_and_real("knn_neighbor") == (320, 320)
    assert estimated_and_real("affinity_cell") == (4, 4)


def test_cache_list_and_clear_touch_only_the_caches(tmp_path, monkeypatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("LAYERBASE_HOME", str(home))
    converted = home / "models" / "SmolLM2-135M-Instruct.Q4_1-0123abcd"
    converted.mkdir(parents=True)
    (converted / "model.safetensors").write_bytes(b"x" * 5000)
    (converted / "complete").write_text("")
    partial = home / "models" / "gemma-3-270m-Q4_K_M-4567ef"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"x" * 300)
    (home / "packaged").mkdir()
    (home / "packaged" / "gemma-3-270m-Q4_K_M.gguf").write_bytes(b"g" * 2000)
    (home / "pgdata").mkdir()
    (home / "pgdata" / "PG_VERSION").write_text("18")

    listed = cli("cache", "list")
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert "models/SmolLM2-135M-Instruct.Q4_1-0123abcd" in lines[1] and "5.0 KB" in lines[1]  # largest first
    assert "incomplete: rebuilt on next load" in listed.output and "3 entries" in listed.output
    assert_clean_error(cli("cache", "clear", "pgdata"), "no cache entry named 'pgdata'")
    assert converted.exists() and (home / "pgdata" / "PG_VERSION").exists()
    one = cli("cache", "clear", "packaged/gemma-3-270m-Q4_K_M.gguf")
    assert one.exit_code == 0 and "Cleared 1 entries, 2.0 KB" in one.output
    assert not (home / "packaged" / "gemma-3-270m-Q4_K_M.gguf").exists() and converted.exists()
    rest = cli("cache", "clear", "--json")
    assert rest.exit_code == 0 and sorted(__import__("json").loads(rest.output)["cleared"]) == [
        "models/SmolLM2-135M-Instruct.Q4_1-0123abcd",
        "models/gemma-3-270m-Q4_K_M-4567ef",
    ]
    assert (home / "pgdata" / "PG_VERSION").exists()  # the database is not a cache
    assert "No cached models." in cli("cache", "list").output


def test_slow_loading_steps_say_what_runs_and_how_long(capsys) -> None:
    from layerbase.ingest.steps import step

    with step("gemma: de-quantizing model.gguf to float32 (once)"):
        pass
    with pytest.raises(KeyboardInterrupt), step("gemma: caching"):
        raise KeyboardInterrupt
    with step("hidden", shown=False):
        pass
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "gemma: de-quantizing model.gguf to float32 (once) ..."
    assert err[1].startswith("gemma: de-quantizing model.gguf to float32 (once): done in ")
    assert err[2:] == ["gemma: caching ...", "gemma: caching: failed"]


def test_the_on_off_scatter_keeps_its_labels_inside_the_axes() -> None:
    from layerbase.analysis.reporting.plots import on_off_scatter

    points = [
        ("SmolLM2-135M-Instruct × gemma-3-270m @ bbc-news-leads-512", 0.145, 0.203),
        ("SmolLM2-135M-Instruct × gemma-3-270m @ random-strings-512", 0.021, 0.024),
        ("gemma-3-270m × all-MiniLM-L6-v2 @ bbc-news-leads-512", 0.30, 0.31),
    ]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = on_off_scatter(points, chance=0.0196)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    [ax] = fig.axes
    box = ax.get_window_extent(renderer)
    for label in ax.texts:
        extent = label.get_window_extent(renderer)
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1, (
            label.get_text()
        )


def _near_ties(n: int = 300, d: int = 64, seed: int = 0):
    """Nearly collinear vectors, as last-token activations are: cosine distances about 1e-6
    apart, below float32's rounding of a dot product, with some exact duplicates."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.standard_normal(d)
    x = (base + 1e-3 * rng.standard_normal((n, d))).astype(np.float32)
    x[10] = x[3]
    x[200] = x[3]  # duplicates of row 3: the same distance to everything, ties go by position
    return x


def _float64_truth(x, k: int):
    """The definition, computed independently: exactly rounded float64 dot products
    (math.fsum), then by distance, equal distances by position."""
    import math

    import numpy as np

    x64 = x.astype(np.float64)
    norms = [math.sqrt(math.fsum(v * v)) for v in x64]
    out = []
    for q in range(len(x)):
        dist = np.array([1.0 - math.fsum(x64[j] * x64[q]) / (norms[j] * norms[q]) for j in range(len(x))])
        dist[q] = np.inf
        out.append(np.lexsort((np.arange(len(x)), dist))[:k])
    return np.array(out)


@pytest.mark.parametrize("k", [10, 20])
def test_exact_engines_agree_with_a_float64_brute_force_on_near_ties(wh, k: int) -> None:
    import numpy as np

    from layerbase.analysis.knn.materialize import materialize
    from layerbase.analysis.knn.topk import exact_topk, normalize
    from tests.test_knn_affinity import stored_sets

    x = _near_ties()
    truth = _float64_truth(x, k)
    # the data are what the red-team run met: a float32 ranking gets sets wrong
    xn = normalize(x)
    f32 = 1.0 - xn @ xn.T
    np.fill_diagonal(f32, np.inf)
    by_float32 = np.lexsort((np.broadcast_to(np.arange(len(x)), f32.shape), f32), axis=1)[:, :k]
    assert (np.sort(by_float32, axis=1) != np.sort(truth, axis=1)).any(axis=1).sum() > 0
    # the blas engine's blocks (whatever their shape) and the sql engine equal the definition
    for block_rows in (7, 64, None):
        idx, _ = exact_topk(x, k, block_rows=block_rows)
        assert np.array_equal(idx, truth), block_rows
    store_synthetic(wh, "tied", "d", n=len(x), d=x.shape[1], n_layers=1, layer_vectors={1: x})
    for engine in ("blas", "sql"):
        materialize(wh, "tied", "d", k_max=k, engine=engine, progress=False)
        assert np.array_equal(stored_sets(wh, "tied", engine, k)[1], truth), engine
    # duplicates (rows 3, 10, 200) are each other's nearest, at distance 0, by position
    assert list(truth[3][:2]) == [10, 200] and list(truth[10][:2]) == [3, 200] and list(truth[200][:2]) == [3, 10]


def test_lookup_output_says_what_its_numbers_are(wh, tiny_models, tmp_path) -> None:
    from tests.conftest import random_texts, write_lines

    assert "0-based" in cli("neighbors", "--help").output
    assert cli("dataset", "add", "p", str(write_lines(tmp_path / "p.txt", random_texts(8)))).exit_code == 0
    args = ("--model", str(tiny_models["gpt2"]), "--dataset", "p", "--name", "g", "--no-progress")
    assert cli("ingest", *args).exit_code == 0
    found = cli("neighbors", "--model", "g", "--layer", "1", "--dataset", "p", "--prompt", "0", "-k", "3")
    lines = found.output.splitlines()
    assert lines[2].split() == ["rank", "position", "cosine", "distance", "text"]
    distance = lines[3].split()[2]
    assert len(distance.split(".")[1]) == 8  # near-tied neighbours 1e-5 apart stay apart
    jobs = cli("jobs")
    assert jobs.exit_code == 0 and "None" not in jobs.output
