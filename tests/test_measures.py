"""The similarity measures against brute-force float64 versions written here from the papers'
formulas (sharing no code with the implementation), and their known properties."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr

from layerbase.analysis.similarity.all_pairs import AllPairs, Side, preprocess
from layerbase.analysis.similarity.measures import MEASURES, MeasureOptions

K = 5


# ---- brute force, one pair at a time ---------------------------------------------------
def _h(n: int) -> np.ndarray:
    return np.eye(n) - np.ones((n, n)) / n


def hsic_biased(k: np.ndarray, l_: np.ndarray) -> float:
    n = len(k)
    return float(np.trace(k @ _h(n) @ l_ @ _h(n))) / (n - 1) ** 2


def hsic_song(k: np.ndarray, l_: np.ndarray) -> float:
    """Song et al. (2012), eq. 5."""
    n = len(k)
    kt, lt = k.copy(), l_.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    value = (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ kt @ lt @ one)
    )
    return float(value / (n * (n - 3)))


def cka(k: np.ndarray, l_: np.ndarray, hsic=hsic_biased) -> float:
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def rbf_gram(x: np.ndarray, threshold: float) -> np.ndarray:
    """Kornblith et al.'s reference gram_rbf."""
    dot = x @ x.T
    sq_norms = np.diag(dot)
    sq = -2 * dot + sq_norms[:, None] + sq_norms[None, :]
    sigma2 = (threshold * np.sqrt(np.median(sq))) ** 2
    return np.exp(-sq / (2 * sigma2))


def knn_sets(x: np.ndarray, k: int) -> list[set[int]]:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    return [set(np.argsort(-row, kind="stable")[:k]) for row in sim]


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int) -> float:
    return float(np.mean([len(a & b) / k for a, b in zip(knn_sets(x, k), knn_sets(y, k))]))


def jaccard_knn(x: np.ndarray, y: np.ndarray, k: int) -> float:
    return float(np.mean([len(a & b) / len(a | b) for a, b in zip(knn_sets(x, k), knn_sets(y, k))]))


def cknna(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """Huh et al. (2024): cosine kernels masked to mutual neighbourhoods, unbiased HSIC."""
    ux = x / np.linalg.norm(x, axis=1, keepdims=True)
    uy = y / np.linalg.norm(y, axis=1, keepdims=True)
    kx, ky = ux @ ux.T, uy @ uy.T

    def mask(kernel: np.ndarray) -> np.ndarray:
        m = np.zeros_like(kernel)
        for i, s in enumerate(_topk_from_kernel(kernel, k)):
            m[i, list(s)] = 1
        return m

    mx, my = mask(kx), mask(ky)
    kl = hsic_song(mx * my * kx, mx * my * ky)
    kk = hsic_song(mx * kx, mx * kx)
    ll = hsic_song(my * ky, my * ky)
    return kl / np.sqrt(kk * ll)


def _topk_from_kernel(kernel: np.ndarray, k: int) -> list[set[int]]:
    s = kernel.copy()
    np.fill_diagonal(s, -np.inf)
    return [set(np.argsort(-row, kind="stable")[:k]) for row in s]


def _cca(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classical CCA: canonical correlations and x's canonical weights (columns), from the
    covariance matrices."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    sxx, syy, sxy = xc.T @ xc, yc.T @ yc, xc.T @ yc
    wx = linalg.inv(linalg.sqrtm(sxx)).real
    wy = linalg.inv(linalg.sqrtm(syy)).real
    u, rho, _ = np.linalg.svd(wx @ sxy @ wy)
    return rho[: min(x.shape[1], y.shape[1])], wx @ u


def svd_reduce(x: np.ndarray, dims: int) -> np.ndarray:
    xc = x - x.mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    return u[:, :dims] * s[:dims]


def svcca(x: np.ndarray, y: np.ndarray, dims: int) -> float:
    rho, _ = _cca(svd_reduce(x, dims), svd_reduce(y, dims))
    return float(np.mean(rho))


def pwcca(x: np.ndarray, y: np.ndarray, dims: int) -> float:
    """Morcos et al. (2018), as their code: weights from x's canonical variates."""
    rx, ry = svd_reduce(x, dims), svd_reduce(y, dims)
    rho, w = _cca(rx, ry)
    h = (rx - rx.mean(0)) @ w[:, : len(rho)]
    q, _ = np.linalg.qr(h)
    alpha = np.abs(q.T @ (rx - rx.mean(0))).sum(1)
    alpha = alpha / alpha.sum()
    return float(alpha @ rho)


def procrustes(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(0), y - y.mean(0)
    xc, yc = xc / np.linalg.norm(xc), yc / np.linalg.norm(yc)
    width = max(xc.shape[1], yc.shape[1])
    xp = np.pad(xc, ((0, 0), (0, width - xc.shape[1])))
    yp = np.pad(yc, ((0, 0), (0, width - yc.shape[1])))
    r, _ = linalg.orthogonal_procrustes(yp, xp)
    distance2 = np.linalg.norm(xp - yp @ r) ** 2
    return float((2 - distance2) / 2)


def rsa_(x: np.ndarray, y: np.ndarray) -> float:
    return float(spearmanr(pdist(x, "correlation"), pdist(y, "correlation")).statistic)


BRUTE = {
    "mutual_knn": lambda x, y: mutual_knn(x, y, K),
    "jaccard_knn": lambda x, y: jaccard_knn(x, y, K),
    "cknna": lambda x, y: cknna(x, y, K),
    "linear_cka": lambda x, y: cka(x @ x.T, y @ y.T),
    "unbiased_cka": lambda x, y: cka(x @ x.T, y @ y.T, hsic_song),
    "rbf_cka": lambda x, y: cka(rbf_gram(x, 0.8), rbf_gram(y, 0.8)),
    "svcca": lambda x, y: svcca(x, y, 4),
    "pwcca": lambda x, y: pwcca(x, y, 4),
    "procrustes": procrustes,
    "rsa": rsa_,
}
OPTIONS = MeasureOptions(rbf_bandwidth=0.8, cca_dims=4, permutations=3)


def layers(seed: int, n: int = 40, widths: tuple[int, ...] = (12, 9, 16)) -> list[np.ndarray]:
    """Layers sharing a latent structure, with an outlying coordinate as real activations have."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 6))
    out = []
    for i, d in enumerate(widths):
        x = latent @ rng.standard_normal((6, d)) + (0.3 + 0.4 * i) * rng.standard_normal((n, d))
        x[:, 0] += 5.0
        out.append(x)
    return out


def all_pairs(name: str, xs: list[np.ndarray], ys: list[np.ndarray], options: MeasureOptions = OPTIONS) -> np.ndarray:
    return AllPairs(MEASURES[name], options, K, Side(list(xs)), Side(list(ys))).matrix()


@pytest.mark.parametrize("name", list(MEASURES))
def test_every_pair_equals_the_brute_force_formula(name):
    xs, ys = layers(1), layers(2, widths=(10, 20))
    got = all_pairs(name, xs, ys)
    want = np.array([[BRUTE[name](x, y) for y in ys] for x in xs])
    np.testing.assert_allclose(got, want, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("name", list(MEASURES))
def test_identical_inputs_score_one(name):
    xs = layers(3)
    got = all_pairs(name, xs, xs)
    np.testing.assert_allclose(np.diag(got), 1.0, atol=1e-9)
    assert (got <= 1 + 1e-9).all()


@pytest.mark.parametrize("name", ["linear_cka", "unbiased_cka", "rbf_cka", "procrustes", "svcca", "pwcca"])
def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(name):
    xs, ys = layers(4), layers(5)
    rng = np.random.default_rng(0)
    moved = []
    for x in xs:
        q, _ = np.linalg.qr(rng.standard_normal((x.shape[1], x.shape[1])))
        moved.append(3.7 * x @ q)
    np.testing.assert_allclose(all_pairs(name, moved, ys), all_pairs(name, xs, ys), atol=1e-9)


@pytest.mark.parametrize("name", ["mutual_knn", "jaccard_knn", "cknna", "rsa"])
def test_invariant_to_scaling(name):
    xs, ys = layers(6), layers(7)
    np.testing.assert_allclose(all_pairs(name, [2.5 * x for x in xs], ys), all_pairs(name, xs, ys), atol=1e-9)


@pytest.mark.parametrize("name", [m.name for m in MEASURES.values() if m.symmetric])
def test_symmetric_measures_are_symmetric(name):
    xs, ys = layers(8), layers(9, widths=(7, 11))
    np.testing.assert_allclose(all_pairs(name, xs, ys), all_pairs(name, ys, xs).T, atol=1e-9)


@pytest.mark.parametrize("name", ["pwcca", "cknna"])
def test_asymmetric_measures_are_not_symmetric_and_say_so(name):
    xs, ys = layers(8), layers(9, widths=(7, 11))
    assert not MEASURES[name].symmetric
    assert not np.allclose(all_pairs(name, xs, ys), all_pairs(name, ys, xs).T, atol=1e-6)


def test_preprocessing():
    x = np.array([[1.0, 100.0], [3.0, -2.0], [5.0, 4.0]])
    np.testing.assert_allclose(preprocess(x, "center").mean(0), 0, atol=1e-12)
    q = np.quantile(np.abs(x), 0.95, axis=1).mean()
    assert np.abs(preprocess(x, "clamp95")).max() == pytest.approx(q)
    assert preprocess(x, "none") is x


@pytest.mark.parametrize("name", ["linear_cka", "cknna", "svcca", "procrustes", "rsa"])
def test_the_permutation_null_sits_near_zero_and_real_structure_beats_it(name):
    xs, ys = layers(10, n=60), layers(10, n=60)  # same latent: strongly related
    pairs = AllPairs(MEASURES[name], MeasureOptions(permutations=8), K, Side(xs), Side(ys))
    scores = pairs.matrix()
    null = pairs.null(scores)
    assert null is not None and null.method == "permutation"
    assert null.mean.shape == scores.shape and (null.sd > 0).all()
    assert (scores > null.mean + 2 * null.sd).all()
    assert (null.log10_p < -2).all()
    # the same seed gives the same null
    again = AllPairs(MEASURES[name], MeasureOptions(permutations=8), K, Side(xs), Side(ys)).null(scores)
    np.testing.assert_array_equal(again.mean, null.mean)


def test_closed_form_null_of_jaccard_matches_simulation():
    from layerbase.analysis.similarity.neighbourhoods import jaccard_null

    n, k = 50, 5
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(4000):
        a = set(rng.choice(n - 1, k, replace=False))
        b = set(rng.choice(n - 1, k, replace=False))
        draws.append(len(a & b) / len(a | b))
    mean, sd = jaccard_null(k, n)
    assert mean == pytest.approx(np.mean(draws), abs=0.004)
    assert sd * np.sqrt(n) == pytest.approx(np.std(draws), rel=0.05)


@pytest.mark.parametrize("name", ["mutual_knn", "cknna", "linear_cka", "svcca", "rsa"])
def test_bootstrap_is_reproducible_and_brackets_the_estimate(name):
    xs, ys = layers(11, n=50), layers(12, n=50)
    pairs = AllPairs(MEASURES[name], OPTIONS, K, Side(xs), Side(ys))
    first = np.stack(pairs.bootstrap(20, seed=3))
    again = np.stack(pairs.bootstrap(20, seed=3))
    np.testing.assert_array_equal(first, again)
    assert first.shape == (20, 3, 3)
    assert np.isfinite(first).all()
    scores = pairs.matrix()
    low, high = np.quantile(first, [0.005, 0.995], axis=0)
    assert ((low <= scores + 0.15) & (scores - 0.15 <= high)).all()


# ---- through the warehouse -------------------------------------------------------------
def _store_pair(wh, n: int = 60) -> dict[str, list[np.ndarray]]:
    """Models A (4 layers, width 12) and B (3 layers, width 9) on dataset d, related layer by
    layer; returns their float32 activations as stored."""
    from layerbase.ingest.synthetic import store_synthetic

    rng = np.random.default_rng(5)
    latent = rng.standard_normal((n, 6))
    stored = {}
    for name, depth, width in (("A", 4, 12), ("B", 3, 9)):
        layers = {}
        for layer in range(1, depth + 1):
            x = latent @ rng.standard_normal((6, width)) + 0.4 * layer * rng.standard_normal((n, width))
            x[:, 0] += 8.0  # a dominant coordinate, as real activations have
            layers[layer] = x.astype(np.float32)
        store_synthetic(wh, name, "d", n=n, d=width, n_layers=depth, layer_vectors=layers)
        stored[name] = list(layers.values())
    return stored


def test_every_measure_is_stored_with_its_parameters_null_and_test(wh, db_url: str) -> None:
    import psycopg

    from layerbase.analysis.similarity.affinity import compute_affinity, list_runs, load_run

    stored = _store_pair(wh)
    options = MeasureOptions(rbf_bandwidth=0.8, cca_dims=4, permutations=5)
    for name in MEASURES:
        m = compute_affinity(wh, "A", "B", "d", measure=name, k=K, options=options, progress=False)
        want = np.array(
            [[BRUTE[name](x.astype(np.float64), y.astype(np.float64)) for y in stored["B"]] for x in stored["A"]]
        )
        np.testing.assert_allclose(m.scores, want, atol=1e-4, err_msg=name)
        assert m.measure == name and m.test is not None and m.test.n_on + m.test.n_off == 12
        assert m.parameters["preprocess"] == "none" and (("k" in m.parameters) == MEASURES[name].uses_k)
        assert m.k == (K if MEASURES[name].uses_k else None)
        assert m.null_method == MEASURES[name].null and m.cell_chance is not None and m.chance is not None
        again = load_run(wh, m.run_id)
        np.testing.assert_array_equal(again.scores, m.scores)
        assert again.parameters == m.parameters and again.test == m.test
        # the run a computation returns is the run as stored
        assert (again.k, again.chance, again.null_method, again.knn_engine) == (
            m.k,
            m.chance,
            m.null_method,
            m.knn_engine,
        )
        np.testing.assert_array_equal(again.cell_chance, m.cell_chance)
        # asked again with the same parameters, the stored run answers; other parameters make a new one
        assert (
            compute_affinity(wh, "A", "B", "d", measure=name, k=K, options=options, progress=False).run_id == m.run_id
        )
    other = compute_affinity(
        wh, "A", "B", "d", measure="rbf_cka", options=MeasureOptions(rbf_bandwidth=0.5, permutations=5), progress=False
    )
    assert other.parameters["rbf_bandwidth"] == 0.5 and other.run_id > m.run_id
    runs = list_runs(wh)
    assert {r["measure"] for r in runs} == set(MEASURES) and all(r["is_current"] for r in runs)
    with psycopg.connect(db_url) as conn:
        views = conn.execute(
            "SELECT measure, count(*), bool_and(chance IS NOT NULL) FROM bi_affinity_cell GROUP BY measure"
        ).fetchall()
        assert {v[0]: v[1] for v in views} == {**{n: 12 for n in MEASURES}, "rbf_cka": 24}
        assert all(v[2] for v in views)
        tests = conn.execute("SELECT measure, parameters FROM bi_diagonal_test ORDER BY affinity_run_id").fetchall()
        assert len(tests) == len(MEASURES) + 1 and '"rbf_bandwidth": 0.5' in tests[-1][1]
        paths = conn.execute("SELECT DISTINCT measure FROM bi_max_similarity_path").fetchall()
        assert len(paths) == len(MEASURES)


def test_mutual_knn_in_memory_equals_the_stored_sets_path_and_preprocessing_changes_the_sets(wh) -> None:
    from layerbase.analysis.similarity.affinity import compute_affinity

    stored = _store_pair(wh)
    from_sets = compute_affinity(wh, "A", "B", "d", k=K, progress=False)
    in_memory = AllPairs(MEASURES["mutual_knn"], MeasureOptions(), K, Side(stored["A"]), Side(stored["B"])).matrix()
    np.testing.assert_allclose(from_sets.scores, in_memory, atol=1e-12)
    centered = compute_affinity(wh, "A", "B", "d", k=K, options=MeasureOptions(preprocess="center"), progress=False)
    assert centered.run_id != from_sets.run_id and centered.parameters["preprocess"] == "center"
    want = np.array([[mutual_knn(x - x.mean(0), y - y.mean(0), K) for y in stored["B"]] for x in stored["A"]])
    np.testing.assert_allclose(centered.scores, want, atol=1e-12)
    assert not np.allclose(centered.scores, from_sets.scores)


def test_bootstrap_intervals_are_stored_with_their_seed_and_reused(wh, db_url: str) -> None:
    import psycopg

    from layerbase.analysis.similarity.affinity import compute_affinity, load_run

    _store_pair(wh)
    options = MeasureOptions(permutations=0, seed=7)
    m = compute_affinity(
        wh, "A", "B", "d", measure="linear_cka", options=options, bootstrap=30, bootstrap_cells=[(2, 2)], progress=False
    )
    assert m.null_method == "none" and m.chance is None and m.cell_chance is None
    by = {(i.statistic, i.layer_a, i.layer_b): i for i in m.intervals}
    assert set(by) == {("diagonal_t", None, None), ("diagonal_difference", None, None), ("cell", 2, 2)}
    cell = by[("cell", 2, 2)]
    assert cell.low <= cell.estimate <= cell.high and cell.estimate == pytest.approx(m.scores[1, 1])
    assert by[("diagonal_t", None, None)].estimate == pytest.approx(m.test.t)
    stored = load_run(wh, m.run_id)
    assert stored.intervals == m.intervals and stored.interval_settings == m.interval_settings == [(30, 7, 0.95)] * 3
    # the same request reuses the run and its intervals; another cell is added to the same run
    again = compute_affinity(
        wh, "A", "B", "d", measure="linear_cka", options=options, bootstrap=30, bootstrap_cells=[(2, 2)], progress=False
    )
    assert again.run_id == m.run_id and len(again.intervals) == 3
    more = compute_affinity(
        wh, "A", "B", "d", measure="linear_cka", options=options, bootstrap=30, bootstrap_cells=[(4, 3)], progress=False
    )
    assert more.run_id == m.run_id and len(more.intervals) == 4
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT statistic, replicates, seed, level FROM bi_affinity_bootstrap ORDER BY statistic"
        ).fetchall()
    assert len(rows) == 4 and all(r[1:] == (30, 7, 0.95) for r in rows)


def test_cli_measures_json_equals_float64_from_the_stored_activations(wh) -> None:
    import json

    from tests.helpers import cli

    stored = _store_pair(wh)
    result = cli(
        "affinity",
        "--models",
        "A,B",
        "--dataset",
        "d",
        "--measure",
        "linear_cka,unbiased_cka,cknna",
        "-k",
        str(K),
        "--permutations",
        "3",
        "--json",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    runs = json.loads(result.output)
    assert [r["measure"] for r in runs] == ["linear_cka", "unbiased_cka", "cknna"]
    for run in runs:
        want = np.array(
            [
                [BRUTE[run["measure"]](x.astype(np.float64), y.astype(np.float64)) for y in stored["B"]]
                for x in stored["A"]
            ]
        )
        np.testing.assert_allclose(np.array(run["scores"]), want, atol=1e-4)
        assert run["test"]["n_on"] == 6 and run["null_method"] == "permutation"
    text = cli(
        "affinity",
        "--models",
        "A,B",
        "--dataset",
        "d",
        "--measure",
        "svcca",
        "--cca-dims",
        "3",
        "--bootstrap",
        "10",
        "--bootstrap-cells",
        "1:1",
        "--no-progress",
    )
    assert text.exit_code == 0, text.output
    assert (
        "SVCCA (cca_dims = 3" in text.output and "cell 1:1" in text.output and "10 bootstrap resamples" in text.output
    )
    listed = cli("affinity-runs")
    assert "linear_cka" in listed.output and "svcca" in listed.output


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--measure", "cka"], "unknown measure 'cka'"),
        (["--measure", "rbf_cka", "--rbf-bandwidth", "0"], "--rbf-bandwidth must be positive"),
        (["--measure", "svcca", "--cca-dims", "0"], "--cca-dims must be at least 1"),
        (["--measure", "rsa", "--permutations", "-1"], "--permutations must be between"),
        (["--bootstrap-cells", "1:1"], "--bootstrap-cells needs --bootstrap"),
        (["--bootstrap", "5", "--bootstrap-cells", "9:1"], "cell 9:1 is not in the matrix"),
        (["--bootstrap", "5", "--level", "1.5"], "confidence level"),
    ],
)
def test_bad_measure_options_get_clean_errors_and_store_nothing(wh, db_url: str, args, problem) -> None:
    from tests.helpers import assert_clean_error, cli, fingerprint

    _store_pair(wh)
    before = fingerprint(db_url)
    result = cli("affinity", "--models", "A,B", "--dataset", "d", *args)
    assert_clean_error(result, problem)
    assert fingerprint(db_url) == before


def test_report_shows_every_measure_side_by_side(wh, tmp_path) -> None:
    from layerbase.analysis.reporting.report import build_report

    _store_pair(wh)
    report = build_report(
        wh,
        ["A", "B"],
        ["d"],
        tmp_path / "r",
        k=K,
        measures=["linear_cka", "rsa"],
        options=MeasureOptions(permutations=2),
        progress=False,
    )
    html = report.html.read_text()
    assert "Similarity measures" in html and "linear_cka" in html and "rsa" in html
    tests = report.tables["measure_tests"]
    assert [t["measure"] for t in tests] == ["mutual_knn", "linear_cka", "rsa"]
    assert all(t["t"] is not None for t in tests)
    correlations = report.tables["measure_correlations"]
    assert len(correlations) == 3 and all(-1 <= c["spearman"] <= 1 for c in correlations)
    assert any(p.name.startswith("measures_") for p in report.images)
    assert any(p.name.startswith("measure_correlations_") for p in report.images)


def test_the_api_and_cli_offer_the_same_measures() -> None:
    import layerbase.api as api
    from layerbase.cli.analyze import MEASURE_NAMES, PREPROCESS_NAMES

    assert api.MEASURES == MEASURE_NAMES == tuple(MEASURES)
    assert api.PREPROCESSING == PREPROCESS_NAMES


def test_kernel_measures_stream_in_chunks_when_the_gram_matrices_do_not_fit(monkeypatch) -> None:
    xs, ys = layers(13, n=40, widths=(12, 9, 16, 5)), layers(14, n=40, widths=(10, 20, 7))
    whole = {name: all_pairs(name, xs, ys) for name in ("linear_cka", "unbiased_cka", "rbf_cka")}
    # room for one 40 x 40 float64 matrix a side: every chunk is a single layer
    monkeypatch.setenv("LAYERBASE_MEASURE_MEMORY", str(2 * 40 * 40 * 8))
    for name, matrix in whole.items():
        np.testing.assert_allclose(all_pairs(name, xs, ys), matrix, atol=1e-12)


def test_serve_answers_runs_of_any_measure(wh, db_url: str) -> None:
    from fastapi.testclient import TestClient

    import layerbase
    from layerbase.cli.server.app import create_app, read_only_api

    _store_pair(wh)
    lb = layerbase.connect(db_url, progress=False)
    cka = lb.affinity("A", "B", "d", measure="linear_cka", permutations=3, bootstrap=5, bootstrap_cells=[(1, 1)])
    plain = lb.affinity("A", "B", "d", measure="rsa", permutations=0)
    read = read_only_api(lb)
    with TestClient(create_app(read)) as client:
        runs = {r["run_id"]: r for r in client.get("/api/affinity").json()}
        assert runs[cka.run_id]["measure"] == "linear_cka" and runs[cka.run_id]["k"] is None
        body = client.get(f"/api/affinity/{cka.run_id}").json()
        assert body["measure"] == "linear_cka" and body["label"] == "linear CKA"
        np.testing.assert_allclose(body["scores"], cka.scores, atol=1e-6)
        assert np.array(body["cell_chance"]).shape == (4, 3) and body["parameters"]["permutations"] == 3
        assert {i["statistic"] for i in body["bootstrap"]} == {"diagonal_t", "diagonal_difference", "cell"}
        rsa = client.get(f"/api/affinity/{plain.run_id}").json()
        assert rsa["chance"] is None and rsa["cell_chance"] is None and rsa["null_method"] == "none"
    read.warehouse.engine.dispose()


@pytest.mark.parametrize("n", [5, 64, 130])
def test_the_symmetric_gram_product_equals_the_general_one(n: int) -> None:
    """kernels.gram computes one triangle through BLAS's dsyrk and mirrors it: the whole
    matrix, exactly symmetric, for sizes that do not divide into its mirror blocks."""
    import torch

    from layerbase.analysis.similarity.kernels import gram

    x = torch.as_tensor(np.random.default_rng(n).standard_normal((n, 7)) * 30)
    out = torch.full((n, n), np.nan, dtype=torch.float64)
    gram(x, out)
    want = x.numpy() @ x.numpy().T
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-12, atol=1e-9)
    assert torch.equal(out, out.T)
