"""Token geometry, steering vectors and Emb2Emb: known answers, then the CLI end to end
on tiny models (one of them a planted linear image of the other)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa

from layerbase.analysis.geometry.tokens import (
    global_correlation,
    intrinsic_dimension,
    lle_weights,
    reconstruction_error,
)
from layerbase.analysis.steering.emb2emb import fit_linear_map, r_squared
from layerbase.warehouse.config import parse_url
from layerbase.warehouse.schema import downgrade, upgrade
from tests.conftest import random_texts, write_lines
from tests.helpers import cli

RNG = np.random.default_rng(7)


# ------------------------------------------------------------------ known answers


def test_lle_weights_reconstruct_a_point_in_the_span_of_its_neighbours() -> None:
    neighbours = RNG.normal(size=(20, 6, 40))
    raw = RNG.normal(size=(20, 6))
    planted = raw - raw.mean(axis=1, keepdims=True) + 1 / 6  # sums to one, some weights negative
    points = np.einsum("nk,nkd->nd", planted, neighbours)
    weights = lle_weights(points, neighbours, regularizer=1e-10)
    np.testing.assert_allclose(weights.sum(axis=1), 1, atol=1e-12)
    np.testing.assert_allclose(weights, planted, atol=1e-6)
    assert reconstruction_error(points, neighbours, weights).max() < 1e-6
    # A point off the neighbours' span is not reconstructed exactly, and the regulariser
    # keeps the solve defined with more neighbours than dimensions.
    off = points + RNG.normal(size=points.shape)
    assert reconstruction_error(off, neighbours, lle_weights(off, neighbours)).min() > 0.01
    wide = lle_weights(RNG.normal(size=(3, 4)), RNG.normal(size=(3, 9, 4)), regularizer=1e-3)
    assert np.isfinite(wide).all() and np.allclose(wide.sum(axis=1), 1)


@pytest.mark.parametrize("dim", [1, 3, 7])
def test_intrinsic_dimension_of_points_on_a_known_subspace(dim: int) -> None:
    basis = np.linalg.qr(RNG.normal(size=(64, dim)))[0]
    offset = RNG.normal(size=64)  # an affine subspace: the centring removes the offset
    hoods = RNG.normal(size=(12, 51, dim)) @ basis.T + offset
    assert (intrinsic_dimension(hoods, threshold=0.999) == dim).all()
    assert (intrinsic_dimension(hoods, threshold=0.5) <= dim).all()
    # Independent noise in every direction needs (almost) all components.
    assert (intrinsic_dimension(RNG.normal(size=(4, 200, 20)), threshold=0.999) >= 19).all()


def test_global_correlation_of_a_model_with_its_rotation_is_one() -> None:
    x = RNG.normal(size=(300, 48))
    rotation = np.linalg.qr(RNG.normal(size=(48, 48)))[0]
    pearson, spearman = global_correlation(x, x @ rotation * 3.0)  # rotation and scale keep cosines
    assert pearson == pytest.approx(1, abs=1e-6) and spearman == pytest.approx(1, abs=1e-6)
    unrelated, _ = global_correlation(x, RNG.normal(size=(300, 48)))
    assert abs(unrelated) < 0.05


@pytest.mark.parametrize("bias,ridge", [(True, 0.0), (False, 0.0), (True, 1e-6)])
def test_least_squares_recovers_a_planted_linear_map(bias: bool, ridge: float) -> None:
    x = RNG.normal(size=(500, 24))
    planted, shift = RNG.normal(size=(24, 40)), RNG.normal(size=40) if bias else np.zeros(40)
    y = x @ planted + shift
    fitted = fit_linear_map(x, y, bias=bias, ridge=ridge)
    np.testing.assert_allclose(fitted.weights, planted, atol=1e-3)
    if bias:
        np.testing.assert_allclose(fitted.bias, shift, atol=1e-3)
    assert r_squared(y, fitted(x)) > 0.999999


def test_ridge_shrinks_the_map() -> None:
    x = RNG.normal(size=(50, 10))
    y = x @ RNG.normal(size=(10, 5))
    free, shrunk = fit_linear_map(x, y, ridge=0.0), fit_linear_map(x, y, ridge=100.0)
    assert np.linalg.norm(shrunk.weights) < 0.8 * np.linalg.norm(free.weights)


# --------------------------------------------------------------- tiny-model world


@pytest.fixture(scope="module")
def planted_pair(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A second tiny Llama, 48 wide, with A's tokenizer, whose input embeddings are
    E_B = E_A · M + b: token pairs determine M exactly."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    a_dir = tiny_models["llama"]
    b_dir = tmp_path_factory.mktemp("planted") / "tiny-llama-48"
    tok = AutoTokenizer.from_pretrained(a_dir)
    tok.save_pretrained(b_dir)
    a = LlamaForCausalLM.from_pretrained(a_dir)
    torch.manual_seed(1)
    b = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=a.config.vocab_size,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    planted = np.random.default_rng(3).normal(size=(32, 48)).astype(np.float32) / 4
    shift = np.random.default_rng(4).normal(size=48).astype(np.float32) / 10
    with torch.no_grad():
        emb_a = a.get_input_embeddings().weight.numpy()
        b.get_input_embeddings().weight.copy_(torch.from_numpy(emb_a @ planted + shift))
    b.save_pretrained(b_dir)
    return {"a": str(a_dir), "b": str(b_dir), "planted": planted}


@pytest.fixture
def world(db_url: str, planted_pair: dict, tmp_path: Path) -> dict:
    pos = write_lines(tmp_path / "pos.txt", random_texts(12, seed=1))
    neg = write_lines(tmp_path / "neg.txt", random_texts(12, seed=2))
    for name, path in (("pos", pos), ("neg", neg)):
        assert cli("dataset", "add", name, str(path)).exit_code == 0
    for model, name in ((planted_pair["a"], "A"), (planted_pair["b"], "B")):
        result = cli("embeddings", "export", "--model", model, "--name", name, "--no-progress")
        assert result.exit_code == 0, result.output
        result = cli(
            "ingest",
            "--model",
            model,
            "--name",
            name,
            "--dataset",
            "pos",
            "--dataset",
            "neg",
            "--no-progress",
            "--batch-size",
            "5",
        )
        assert result.exit_code == 0, result.output
    return {"db": db_url, "pos": pos, "neg": neg, **planted_pair}


def _vector(db_url: str, name: str) -> tuple[np.ndarray, dict]:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT vec::text, norm, activation_norm, calibration, layer, method, map_id "
            "FROM steering_vector WHERE name = %s",
            (name,),
        ).fetchone()
    vec = np.array(json.loads(row[0]), dtype=np.float32)
    return vec, {
        "norm": row[1],
        "activation_norm": row[2],
        "calibration": row[3],
        "layer": row[4],
        "method": row[5],
        "map_id": row[6],
    }


def test_geometry_cli_on_a_model_and_its_planted_image(world: dict, tmp_path: Path) -> None:
    # Same tokenizer: every usable token matches, and A with itself (stored twice) is r = 1.
    result = cli("embeddings", "export", "--model", world["a"], "--name", "A2", "--no-progress")
    assert result.exit_code == 0
    plot = tmp_path / "global.png"
    result = cli(
        "geometry", "global", "--models", "A,A2,B", "--sample", "0", "--plot", str(plot), "--json", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["matrix"][0][1] == pytest.approx(1, abs=1e-6)
    assert all(p["matching"]["shared"] == p["n_tokens"] > 150 for p in out["pairs"])
    assert all(p["matching"]["dropped_a"]["special"] == 2 for p in out["pairs"])  # <|endoftext|> and <s>
    assert plot.stat().st_size > 5000
    # Centring and the frequent-token sample are options, stored with the result.
    result = cli(
        "geometry", "global", "--models", "A,B", "--sample", "50", "--sample-rule", "frequent", "--center", "--json"
    )
    assert result.exit_code == 0, result.output
    pair = json.loads(result.output)["pairs"][0]
    assert pair["centered"] and pair["matching"]["centered"] and "lowest token ids" in pair["matching"]["sample_rule"]
    with psycopg.connect(world["db"]) as conn:
        ids = conn.execute(
            "SELECT token_ids_a, token_ids_b FROM geometry_global WHERE id = %s", (pair["id"],)
        ).fetchone()
    assert ids[0] == ids[1] == sorted(ids[0]) and len(ids[0]) == 50
    result = cli(
        "geometry",
        "local",
        "--models",
        "A,A2",
        "--sample",
        "100",
        "-k",
        "5",
        "--id-k",
        "20",
        "--plot",
        str(tmp_path / "local.png"),
    )
    assert result.exit_code == 0, result.output
    assert "lowest-ID tokens" in result.output and (tmp_path / "local.png").exists()
    with psycopg.connect(world["db"]) as conn:
        run = conn.execute(
            "SELECT id, err_transfer, err_own, err_refit, err_random, id_pearson, n_tokens, k "
            "FROM geometry_local_run ORDER BY id DESC LIMIT 1"
        ).fetchone()
        tokens = conn.execute(
            "SELECT count(*), min(id_a - id_b), max(id_a - id_b), "
            "bool_and(array_length(neighbors_a, 1) = 5) FROM geometry_local_token WHERE run_id = %s",
            (run[0],),
        ).fetchone()
        sums = conn.execute(
            "SELECT max(abs(s - 1)) FROM (SELECT (SELECT sum(w) FROM unnest(weights_a) w) s "
            "FROM geometry_local_token WHERE run_id = %s) t",
            (run[0],),
        ).fetchone()[0]
    # Identical embeddings: A's weights are B's own, IDs agree, random weights are worse.
    assert run[1] == pytest.approx(run[2], abs=1e-5) == pytest.approx(run[3], abs=1e-5)
    assert run[4] > run[1] and run[5] == pytest.approx(1) and run[6] == 100 and run[7] == 5
    assert tokens == (100, 0, 0, True)
    assert sums < 1e-5


def test_make_vector_from_stored_activations_equals_running_the_model(world: dict) -> None:
    stored = cli(
        "steer",
        "make",
        "--model",
        "A",
        "--layer",
        "2",
        "--positive",
        "pos",
        "--negative",
        "neg",
        "--name",
        "v-stored",
        "--json",
    )
    assert stored.exit_code == 0, stored.output
    assert json.loads(stored.output)["source"] == "stored activations"
    run = cli(
        "steer",
        "make",
        "--model",
        "A",
        "--layer",
        "2",
        "--positive-file",
        str(world["pos"]),
        "--negative-file",
        str(world["neg"]),
        "--name",
        "v-run",
        "--json",
    )
    assert run.exit_code == 0, run.output
    assert json.loads(run.output)["source"] == "model run"
    a, info = _vector(world["db"], "v-stored")
    b, _ = _vector(world["db"], "v-run")
    np.testing.assert_allclose(a, b, atol=1e-5)
    with psycopg.connect(world["db"]) as conn:

        def mean(ds: str) -> np.ndarray:
            query = (
                "SELECT avg(a.vec)::text FROM activation a JOIN dataset d ON d.id = a.dataset_id JOIN model m "
                "ON m.id = a.model_id WHERE m.name = 'A' AND a.layer = 2 AND d.name = %s"
            )
            return np.array(json.loads(conn.execute(query, (ds,)).fetchone()[0]))

        expected = mean("pos") - mean("neg")
        provenance = conn.execute(
            "SELECT positive, negative, hook_site, token_rule FROM steering_vector WHERE name = 'v-stored'"
        ).fetchone()
        # Immutable: an UPDATE is refused by the database itself.
        with pytest.raises(psycopg.errors.RestrictViolation):
            conn.execute("UPDATE steering_vector SET norm = 0 WHERE name = 'v-stored'")
    np.testing.assert_allclose(a, expected, atol=1e-5)
    assert info["norm"] == pytest.approx(float(np.linalg.norm(a)), rel=1e-5)
    assert provenance[0]["dataset"] == "pos" and provenance[0]["count"] == 12 and len(provenance[0]["texts"]) == 12
    assert provenance[1]["dataset"] == "neg" and "layers" in provenance[2] and provenance[3] == "last"
    listing = cli("steer", "list")
    assert "v-stored" in listing.output and "v-run" in listing.output


def test_the_hook_adds_exactly_the_vector_at_its_layer(world: dict) -> None:
    from layerbase.analysis.steering.vectors import added_to_residual
    from layerbase.ingest.extract import ExtractionSettings, Extractor
    from layerbase.ingest.loading import load_model

    lm = load_model(world["a"], device="cpu")
    extractor = Extractor(lm, ExtractionSettings())
    texts = random_texts(3, seed=5)
    vector = np.random.default_rng(0).normal(size=32).astype(np.float32)
    plain = extractor(texts).vectors
    with added_to_residual(lm, 2, 3.0 * vector):
        steered = extractor(texts).vectors
    np.testing.assert_allclose(steered[:, 0], plain[:, 0], atol=1e-6)  # layer 1: before the vector
    np.testing.assert_allclose(steered[:, 1] - plain[:, 1], np.tile(3.0 * vector, (3, 1)), atol=1e-4)
    assert not np.allclose(steered[:, 3], plain[:, 3])  # later layers feel it
    np.testing.assert_allclose(extractor(texts).vectors, plain, atol=1e-6)  # removed afterwards


def test_generate_and_evaluate(world: dict, tmp_path: Path) -> None:
    assert (
        cli(
            "steer", "make", "--model", "A", "--layer", "2", "--positive", "pos", "--negative", "neg", "--name", "v"
        ).exit_code
        == 0
    )
    zero = cli("steer", "generate", "v", "--prompt", "the cat", "--coefficient", "0", "--max-new-tokens", "8", "--json")
    assert zero.exit_code == 0, zero.output
    out = json.loads(zero.output)
    assert out["steered"] == out["unsteered"] and out["decoding"] == "greedy"
    strong = json.loads(
        cli(
            "steer", "generate", "v", "--prompt", "the cat", "--coefficient", "500", "--max-new-tokens", "8", "--json"
        ).output
    )
    assert strong["steered"] != strong["unsteered"]
    # by default the opposite sign is shown too, as the sign is half the evidence
    assert strong["opposite"]["coefficient"] == -500 and strong["opposite"]["steered"] != strong["steered"]
    text = cli("steer", "generate", "v", "--prompt", "the cat", "--coefficient", "2", "--max-new-tokens", "4").output
    assert "unsteered:" in text and "steered (+2 x v)" in text and "steered (-2 x v)" in text
    prompts = write_lines(tmp_path / "eval.txt", random_texts(6, seed=9))
    plot = tmp_path / "sweep.png"
    result = cli(
        "steer",
        "evaluate",
        "v",
        "--prompts-file",
        str(prompts),
        "--positive-words",
        " the, cat",
        "--negative-words",
        " dog",
        "--coefficients",
        "0,1,4",
        "--random",
        "2",
        "--plot",
        str(plot),
        "--json",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    at_zero = [p for p in out["points"] if p["coefficient"] == 0]
    assert len(out["points"]) == 9 and all(p["shift_logodds"] == pytest.approx(0, abs=1e-5) for p in at_zero)
    assert plot.stat().st_size > 5000
    with psycopg.connect(world["db"]) as conn:
        points = conn.execute("SELECT count(*) FROM bi_steering_eval WHERE vector = 'v'").fetchone()[0]
    assert points == 9


def test_transfer_recovers_the_planted_map(world: dict) -> None:
    vector = np.random.default_rng(11).normal(size=32).astype(np.float32)
    np.save(world["pos"].parent / "v.npy", vector)
    assert (
        cli(
            "steer",
            "import",
            "--model",
            "A",
            "--layer",
            "2",
            "--file",
            str(world["pos"].parent / "v.npy"),
            "--name",
            "planted",
        ).exit_code
        == 0
    )
    result = cli("steer", "transfer", "planted", "--to", "B", "--calibrate", "none", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["map"]["r2_test"] > 0.99999 and out["map"]["cosine_test"] > 0.99999
    assert out["vector"]["layer"] == 3 and "relative depth" in out["calibration"]["layer_rule"]  # 2/4 of 6
    assert _vector(world["db"], "planted")[1]["method"] == "imported"
    # Vectors imported before migration 0004 were labelled 'mean-difference': 0004 relabels them.
    engine = sa.create_engine(parse_url(world["db"]))
    with engine.begin() as conn:
        downgrade(conn, "0003")
    assert _vector(world["db"], "planted")[1]["method"] == "mean-difference"
    with engine.begin() as conn:
        upgrade(conn)
    engine.dispose()
    assert _vector(world["db"], "planted")[1]["method"] == "imported"
    mapped, info = _vector(world["db"], "planted->B")
    np.testing.assert_allclose(mapped, vector @ world["planted"], rtol=1e-3, atol=1e-3)
    assert info["method"] == "emb2emb" and info["map_id"] == out["map"]["id"]
    # The same settings reuse the stored map; a wrong-width vector is refused.
    again = json.loads(
        cli("steer", "transfer", "planted", "--to", "B", "--calibrate", "none", "--name", "p2", "--json").output
    )
    assert again["map"]["reused"] and again["map"]["id"] == out["map"]["id"]
    wrong = cli("steer", "generate", "planted", "--model", "B", "--prompt", "x")
    assert wrong.exit_code == 2 and "32 wide" in wrong.output and "steer transfer planted --to B" in wrong.output
    # With an affinity matrix of the pair stored (here B x A, so it is read transposed),
    # the target layer follows its max-similarity path.
    assert cli("affinity", "--models", "B,A", "--dataset", "pos", "-k", "3", "--no-progress").exit_code == 0
    path = json.loads(
        cli(
            "steer",
            "transfer",
            "planted",
            "--to",
            "B",
            "--calibrate",
            "none",
            "--name",
            "p3",
            "--dataset",
            "pos",
            "--json",
        ).output
    )
    with psycopg.connect(world["db"]) as conn:
        cells = conn.execute(
            "SELECT layer_a, layer_b, score FROM bi_affinity_cell WHERE model_a = 'B' AND model_b = 'A'"
        ).fetchall()
    matrix = np.zeros((6, 4))
    for layer_b, layer_a, score in cells:
        matrix[layer_b - 1, layer_a - 1] = score
    assert "max-similarity path" in path["calibration"]["layer_rule"]
    assert path["vector"]["layer"] == int(np.argmax(matrix[:, 1])) + 1  # A's layer 2 -> B's most similar layer
    # Maps are immutable like vectors: the database refuses an UPDATE, and the map is unchanged.
    with psycopg.connect(world["db"]) as conn:
        before = conn.execute("SELECT md5(t::text) FROM emb2emb_map t WHERE id = %s", (path["map"]["id"],)).fetchone()
        with pytest.raises(psycopg.errors.RestrictViolation):
            conn.execute("UPDATE emb2emb_map SET ridge = 1 WHERE id = %s", (path["map"]["id"],))
    with psycopg.connect(world["db"]) as conn:
        after = conn.execute("SELECT md5(t::text) FROM emb2emb_map t WHERE id = %s", (path["map"]["id"],)).fetchone()
    assert before is not None and after == before


def test_transfer_on_prompt_pairs_with_relative_and_contrast_calibration(world: dict) -> None:
    assert (
        cli(
            "steer", "make", "--model", "A", "--layer", "4", "--positive", "pos", "--negative", "neg", "--name", "v4"
        ).exit_code
        == 0
    )
    transfer = ["steer", "transfer", "v4", "--to", "B", "--pairs", "prompts", "--dataset", "pos", "--ridge", "1"]
    result = cli(*transfer, "--layer", "5", "--calibrate", "relative", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["map"]["pairs"] == "prompts" and out["map"]["n_pairs"] == 12 and out["map"]["layer_b"] == 5
    source, source_info = _vector(world["db"], "v4")
    mapped, info = _vector(world["db"], "v4->B")
    assert info["layer"] == 5 and info["calibration"]["rule"] == "relative"
    # ||v_B|| / median ||h_B|| = ||v_A|| / median ||h_A||
    assert info["norm"] / info["activation_norm"] == pytest.approx(
        source_info["norm"] / source_info["activation_norm"], rel=1e-4
    )
    with psycopg.connect(world["db"]) as conn:
        stored = conn.execute(
            "SELECT width_a, width_b, array_length(weights, 1), ridge FROM emb2emb_map WHERE id = %s",
            (out["map"]["id"],),
        ).fetchone()
    assert stored == (32, 48, 32 * 48, 1.0)
    # the default calibration gives the mapped vector the norm of B's own vector from the
    # same contrast prompts, and records the relative norm beside it
    default = cli(*transfer, "--layer", "5", "--name", "v4-contrast", "--json")
    assert default.exit_code == 0, default.output
    native = cli(
        "steer", "make", "--model", "B", "--layer", "5", "--positive", "pos", "--negative", "neg", "--name", "native-b5"
    )
    assert native.exit_code == 0, native.output
    mapped, info = _vector(world["db"], "v4-contrast")
    _, native_info = _vector(world["db"], "native-b5")
    assert info["calibration"]["rule"] == "contrast"
    assert info["norm"] == pytest.approx(native_info["norm"], rel=1e-4)
    assert info["calibration"]["relative_norm"] == pytest.approx(
        source_info["norm"] / source_info["activation_norm"] * info["activation_norm"], rel=1e-4
    )
