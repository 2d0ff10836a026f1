"""Token-embedding geometry across models (Lee, Weber, Viégas & Wattenberg 2025).

* **Global**: the Pearson correlation between two models' token-token cosine-similarity
  matrices over one sample of tokens both vocabularies hold.
* **Local**: each sampled token's k nearest neighbours and LLE reconstruction weights
  (sum-to-one, regularised), compared across models by reconstructing model B's token
  from B's copies of A's neighbours with A's weights; and each token's intrinsic
  dimension (principal components of its neighbourhood needed to explain a variance
  share), correlated across models.

Tokens are matched by their decoded text (docs/design.md §4): a text that several ids of
one vocabulary decode to is ambiguous and left out, as are special tokens and texts
that do not decode alone (byte pieces decode to U+FFFD). Embeddings are read from the
``token_embedding`` table that ``layerbase embeddings export`` fills. LLE and the
intrinsic dimension work on unit-length embeddings, so that the neighbourhoods are the
cosine ones and errors compare across models whose embedding norms differ.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.orm import Session

from layerbase.analysis.knn.topk import exact_topk, normalize
from layerbase.warehouse.copy import read_positions_and_vectors
from layerbase.warehouse.engine import Warehouse, raw_connection
from layerbase.warehouse.errors import InputError, NotFoundError
from layerbase.warehouse.lookup import get_model
from layerbase.warehouse.models import GeometryGlobal, GeometryLocalRun, GeometryLocalToken, TokenEmbedding

MATRICES = ("input", "output")
UNDECODABLE = "\ufffd"


@dataclass
class TokenMatrix:
    """One model's stored embedding matrix, row i = token_ids[i]."""

    model: str
    model_id: int
    matrix: str
    token_ids: np.ndarray
    texts: list[str]
    special: np.ndarray
    vectors: np.ndarray


def load_token_matrix(wh: Warehouse, model_name: str, matrix: str = "input") -> TokenMatrix:
    """Read a model's stored token embeddings, or say how to store them."""
    if matrix not in MATRICES:
        raise InputError(f"unknown matrix {matrix!r}; use input or output")
    with Session(wh.engine) as session:
        model = get_model(session, model_name)
        model_id, tied = model.id, model.tied_embeddings
    with wh.engine.begin() as conn:
        rows = conn.execute(
            sa.select(TokenEmbedding.token_id, TokenEmbedding.text, TokenEmbedding.special)
            .where(TokenEmbedding.model_id == model_id, TokenEmbedding.matrix == matrix)
            .order_by(TokenEmbedding.token_id)
        ).all()
        if not rows:
            if matrix == "output" and tied:
                raise InputError(f"{model_name}'s unembedding is tied to its input embedding; use --matrix input")
            raise NotFoundError(
                f"no {matrix} token embeddings of {model_name} are stored; "
                f"run `layerbase embeddings export --model {model_name}` first"
            )
        query = sql.SQL(
            "SELECT token_id, vec FROM token_embedding WHERE model_id = {} AND matrix = {} ORDER BY token_id"
        ).format(sql.Literal(model_id), sql.Literal(matrix))
        ids, vectors = read_positions_and_vectors(raw_connection(conn).cursor(), query)
    return TokenMatrix(
        model_name,
        model_id,
        matrix,
        ids,
        [r.text for r in rows],
        np.array([r.special for r in rows], dtype=bool),
        vectors,
    )


@dataclass
class Matching:
    """Rows of A and of B that hold the same token, and how they were chosen."""

    rows_a: np.ndarray
    rows_b: np.ndarray
    texts: list[str]
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows_a)


def _usable(m: TokenMatrix) -> tuple[dict[str, int], dict[str, int]]:
    """Decoded text -> row for texts exactly one usable token decodes to; and drop counts."""
    seen: dict[str, list[int]] = {}
    dropped = {"special": 0, "empty": 0, "undecodable": 0, "zero_vector": 0}
    norms = np.linalg.norm(m.vectors, axis=1)
    for row, text in enumerate(m.texts):
        if m.special[row]:
            dropped["special"] += 1
        elif not text:
            dropped["empty"] += 1
        elif UNDECODABLE in text:
            dropped["undecodable"] += 1
        elif norms[row] == 0:
            dropped["zero_vector"] += 1
        else:
            seen.setdefault(text, []).append(row)
    unique = {t: rows[0] for t, rows in seen.items() if len(rows) == 1}
    dropped["ambiguous_tokens"] = sum(len(rows) for rows in seen.values() if len(rows) > 1)
    return unique, dropped


def match_tokens(a: TokenMatrix, b: TokenMatrix) -> Matching:
    """Tokens both vocabularies hold, matched by decoded text, ordered by A's token id."""
    unique_a, dropped_a = _usable(a)
    unique_b, dropped_b = _usable(b)
    shared = sorted((row, text) for text, row in unique_a.items() if text in unique_b)
    rows_a = np.array([row for row, _ in shared], dtype=np.int64)
    rows_b = np.array([unique_b[text] for _, text in shared], dtype=np.int64)
    stats = {
        "rule": "identical decoded text; special, empty, undecodable and ambiguous tokens left out",
        "vocab_a": len(a.texts),
        "vocab_b": len(b.texts),
        "usable_a": len(unique_a),
        "usable_b": len(unique_b),
        "dropped_a": dropped_a,
        "dropped_b": dropped_b,
        "shared": len(shared),
    }
    if not shared:
        raise InputError(f"{a.model} and {b.model} share no token text; token geometry needs a common vocabulary")
    return Matching(rows_a, rows_b, [text for _, text in shared], stats)


SAMPLE_RULES = ("uniform", "frequent")


def sample_rows(n: int, size: int | None, seed: int, rule: str = "uniform") -> np.ndarray:
    """A sorted sample of range(n): seeded uniform, or the first ``size`` rows ("frequent":
    matched rows are in model A's token-id order, and BPE vocabularies number their pieces
    in merge order, so the lowest ids are the most frequent pieces)."""
    if rule not in SAMPLE_RULES:
        raise InputError(f"unknown sample rule {rule!r}; use uniform or frequent")
    if size is None or size >= n:
        return np.arange(n)
    if size < 3:
        raise InputError(f"the token sample must hold at least 3 tokens (got {size})")
    if rule == "frequent":
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def sample_description(rule: str, seed: int) -> str:
    return (
        f"uniform without replacement, seed {seed}"
        if rule == "uniform"
        else "the lowest token ids of model A (the most frequent BPE pieces)"
    )


# ---------------------------------------------------------------- global geometry


def cosine_similarity_upper(x: np.ndarray) -> np.ndarray:
    """The strict upper triangle of x's row-by-row cosine-similarity matrix, flattened."""
    xn = normalize(np.asarray(x, dtype=np.float32))
    sims = xn @ xn.T
    return sims[np.triu_indices(len(x), k=1)]


def global_correlation(xa: np.ndarray, xb: np.ndarray) -> tuple[float, float]:
    """(Pearson, Spearman) between the cosine-similarity matrices of paired rows of xa, xb."""
    from scipy.stats import pearsonr, spearmanr

    if len(xa) != len(xb):
        raise InputError("the two embedding samples must pair row for row")
    if len(xa) < 3:
        raise InputError("global geometry needs at least 3 tokens")
    sa_, sb_ = cosine_similarity_upper(xa), cosine_similarity_upper(xb)
    return float(pearsonr(sa_, sb_).statistic), float(spearmanr(sa_, sb_).statistic)


@dataclass
class GlobalResult:
    id: int
    model_a: str
    model_b: str
    matrix_a: str
    matrix_b: str
    n_tokens: int
    seed: int
    centered: bool
    pearson: float
    spearman: float
    matching: dict[str, Any]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def compute_global(
    wh: Warehouse,
    model_a: str,
    model_b: str,
    *,
    matrix_a: str = "input",
    matrix_b: str = "input",
    sample: int | None = 4000,
    seed: int = 0,
    rule: str = "uniform",
    center: bool = False,
) -> GlobalResult:
    """Correlate two models' token-similarity structure over a matched token sample; store it.

    ``center`` subtracts each model's mean embedding over the matched tokens first: raw
    embeddings share a large common direction that makes every cosine similarity alike.
    """
    a, b = load_token_matrix(wh, model_a, matrix_a), load_token_matrix(wh, model_b, matrix_b)
    return _global_pair(wh, a, b, sample=sample, seed=seed, rule=rule, center=center)


def _global_pair(
    wh: Warehouse, a: TokenMatrix, b: TokenMatrix, *, sample: int | None, seed: int, rule: str, center: bool
) -> GlobalResult:
    """``compute_global`` on matrices already read (``seconds``: matching to storing)."""
    started = time.perf_counter()
    matching = match_tokens(a, b)
    picked = sample_rows(len(matching), sample, seed, rule)
    xa, xb = a.vectors[matching.rows_a], b.vectors[matching.rows_b]
    if center:
        xa, xb = xa - xa.mean(axis=0), xb - xb.mean(axis=0)
    pearson, spearman = global_correlation(xa[picked], xb[picked])
    rows_a, rows_b = matching.rows_a[picked], matching.rows_b[picked]
    stats = matching.stats | {"sampled": len(picked), "sample_rule": sample_description(rule, seed), "centered": center}
    seconds = time.perf_counter() - started
    with wh.engine.begin() as conn:
        run_id = conn.execute(
            sa.insert(GeometryGlobal)
            .values(
                model_a_id=a.model_id,
                model_b_id=b.model_id,
                matrix_a=a.matrix,
                matrix_b=b.matrix,
                matching=stats,
                n_tokens=len(picked),
                seed=seed,
                pearson=pearson,
                spearman=spearman,
                token_ids_a=a.token_ids[rows_a].tolist(),
                token_ids_b=b.token_ids[rows_b].tolist(),
                seconds=seconds,
            )
            .returning(GeometryGlobal.id)
        ).scalar_one()
    return GlobalResult(
        run_id, a.model, b.model, a.matrix, b.matrix, len(picked), seed, center, pearson, spearman, stats, seconds
    )


# ----------------------------------------------------------------- local geometry


def lle_weights(points: np.ndarray, neighbors: np.ndarray, regularizer: float = 1e-3) -> np.ndarray:
    """LLE reconstruction weights (Roweis & Saul 2000) of each point from its neighbours.

    points [n, d], neighbors [n, k, d] -> weights [n, k], each row summing to one, that
    minimise ||x - sum_j w_j n_j||^2. The local Gram matrix gets ``regularizer`` times its
    trace added to the diagonal (as scikit-learn's LLE does), which makes it solvable
    when k > d or the neighbours are collinear.
    """
    diffs = neighbors - points[:, None, :]
    gram = np.einsum("nkd,njd->nkj", diffs, diffs)
    k = gram.shape[1]
    trace = np.trace(gram, axis1=1, axis2=2)
    ridge = np.where(trace > 0, regularizer * trace, regularizer)
    gram = gram + ridge[:, None, None] * np.eye(k)
    w = np.linalg.solve(gram, np.ones((len(points), k, 1)))[..., 0]
    return w / w.sum(axis=1, keepdims=True)


def reconstruction_error(points: np.ndarray, neighbors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """||x - sum_j w_j n_j|| / ||x|| per point."""
    recon = np.einsum("nk,nkd->nd", weights, neighbors)
    return np.linalg.norm(points - recon, axis=1) / np.linalg.norm(points, axis=1)


def random_simplex_weights(n: int, k: int, seed: int) -> np.ndarray:
    """Random weights that sum to one (uniform on the simplex: Dirichlet(1, ..., 1))."""
    return np.random.default_rng(seed).dirichlet(np.ones(k), size=n)


def intrinsic_dimension(neighborhoods: np.ndarray, threshold: float = 0.9) -> np.ndarray:
    """Per neighbourhood [n, m, d]: the fewest principal components whose variance share
    reaches ``threshold`` (local PCA; at most min(m - 1, d))."""
    if not 0 < threshold <= 1:
        raise InputError(f"the variance threshold must be in (0, 1], got {threshold}")
    centred = neighborhoods - neighborhoods.mean(axis=1, keepdims=True)
    singular = np.linalg.svd(centred, compute_uv=False)
    variance = singular.astype(np.float64) ** 2
    total = variance.sum(axis=1, keepdims=True)
    share = np.cumsum(variance, axis=1) / np.where(total > 0, total, 1)
    # 1e-9 slack: a share that reaches the threshold exactly must count despite rounding.
    return (share < threshold - 1e-9).sum(axis=1) + 1


@dataclass
class LocalResult:
    id: int
    model_a: str
    model_b: str
    n_tokens: int
    n_candidates: int
    k: int
    id_k: int
    variance_threshold: float
    regularizer: float
    err_own: float
    err_refit: float
    err_transfer: float
    err_random: float
    id_pearson: float | None
    id_spearman: float | None
    mean_id_a: float
    mean_id_b: float
    lowest: list[dict[str, Any]]
    highest: list[dict[str, Any]]
    matching: dict[str, Any]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def local_geometry(
    xa: np.ndarray,
    xb: np.ndarray,
    queries: np.ndarray,
    *,
    k: int = 10,
    id_k: int = 50,
    threshold: float = 0.9,
    regularizer: float = 1e-3,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per query row of the paired matrices xa, xb (row i of both is one token): neighbours,
    LLE weights, reconstruction errors of B's token and intrinsic dimensions."""
    n = len(xa)
    if len(xb) != n:
        raise InputError("the two embedding matrices must pair row for row")
    if not 0 < k < n or not 0 < id_k < n:
        raise InputError(
            f"k = {k} and the ID neighbourhood {id_k} must be between 1 and {n - 1} "
            "(the matched tokens minus one); lower them"
        )
    ua, ub = normalize(xa), normalize(xb)
    depth = max(k, id_k)
    nn_a, _ = exact_topk(ua, depth, queries=queries)
    nn_b, _ = exact_topk(ub, depth, queries=queries)
    qa, qb = ua[queries], ub[queries]
    lle_a, lle_b = nn_a[:, :k], nn_b[:, :k]
    w_a = lle_weights(qa, ua[lle_a], regularizer)
    w_b = lle_weights(qb, ub[lle_b], regularizer)
    w_refit = lle_weights(qb, ub[lle_a], regularizer)
    w_rand = random_simplex_weights(len(queries), k, seed)
    # A neighbourhood is the token and its id_k nearest neighbours.
    hood_a = np.concatenate([queries[:, None], nn_a[:, :id_k]], axis=1)
    hood_b = np.concatenate([queries[:, None], nn_b[:, :id_k]], axis=1)
    return {
        "neighbors_a": lle_a,
        "weights_a": w_a,
        "neighbors_b": lle_b,
        "weights_b": w_b,
        "err_own": reconstruction_error(qb, ub[lle_b], w_b),
        "err_refit": reconstruction_error(qb, ub[lle_a], w_refit),
        "err_transfer": reconstruction_error(qb, ub[lle_a], w_a),
        "err_random": reconstruction_error(qb, ub[lle_a], w_rand),
        "id_a": intrinsic_dimension(ua[hood_a], threshold),
        "id_b": intrinsic_dimension(ub[hood_b], threshold),
        "id_neighbors_a": nn_a[:, :id_k],
    }


def _correlations(x: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
    from scipy.stats import pearsonr, spearmanr

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None  # constant IDs have no correlation
    return float(pearsonr(x, y).statistic), float(spearmanr(x, y).statistic)


def compute_local(
    wh: Warehouse,
    model_a: str,
    model_b: str,
    *,
    matrix_a: str = "input",
    matrix_b: str = "input",
    sample: int | None = 2000,
    seed: int = 0,
    k: int = 10,
    id_k: int = 50,
    threshold: float = 0.9,
    regularizer: float = 1e-3,
    show: int = 10,
) -> LocalResult:
    """Local geometry of a token sample in two models; stored per token and as a summary."""
    if regularizer < 0:
        raise InputError(f"the regulariser must be >= 0, got {regularizer}")
    started = time.perf_counter()
    a, b = load_token_matrix(wh, model_a, matrix_a), load_token_matrix(wh, model_b, matrix_b)
    matching = match_tokens(a, b)
    xa, xb = a.vectors[matching.rows_a], b.vectors[matching.rows_b]
    queries = sample_rows(len(matching), sample, seed)
    out = local_geometry(xa, xb, queries, k=k, id_k=id_k, threshold=threshold, regularizer=regularizer, seed=seed)
    id_pearson, id_spearman = _correlations(out["id_a"].astype(float), out["id_b"].astype(float))
    ids_a, ids_b = a.token_ids[matching.rows_a], b.token_ids[matching.rows_b]
    medians = {name: float(np.median(out[name])) for name in ("err_own", "err_refit", "err_transfer", "err_random")}
    stats = matching.stats | {
        "sampled": len(queries),
        "sample_rule": sample_description("uniform", seed),
        "neighbours_from": "all matched tokens",
    }
    seconds = time.perf_counter() - started
    with wh.engine.begin() as conn:
        run_id = conn.execute(
            sa.insert(GeometryLocalRun)
            .values(
                model_a_id=a.model_id,
                model_b_id=b.model_id,
                matrix_a=matrix_a,
                matrix_b=matrix_b,
                matching=stats,
                k=k,
                id_k=id_k,
                variance_threshold=threshold,
                regularizer=regularizer,
                n_tokens=len(queries),
                n_candidates=len(matching),
                seed=seed,
                **medians,
                id_pearson=id_pearson,
                id_spearman=id_spearman,
                mean_id_a=float(out["id_a"].mean()),
                mean_id_b=float(out["id_b"].mean()),
                seconds=seconds,
            )
            .returning(GeometryLocalRun.id)
        ).scalar_one()
        conn.execute(
            sa.insert(GeometryLocalToken),
            [
                {
                    "run_id": run_id,
                    "token_id_a": int(ids_a[q]),
                    "token_id_b": int(ids_b[q]),
                    "text": matching.texts[q],
                    "neighbors_a": ids_a[out["neighbors_a"][i]].tolist(),
                    "weights_a": out["weights_a"][i].tolist(),
                    "neighbors_b": ids_b[out["neighbors_b"][i]].tolist(),
                    "weights_b": out["weights_b"][i].tolist(),
                    "id_a": int(out["id_a"][i]),
                    "id_b": int(out["id_b"][i]),
                    **{name: float(out[name][i]) for name in medians},
                }
                for i, q in enumerate(queries)
            ],
        )
    order = np.lexsort((queries, out["id_a"]))

    def listing(rows: np.ndarray) -> list[dict[str, Any]]:
        return [
            {
                "text": matching.texts[queries[i]],
                "id_a": int(out["id_a"][i]),
                "id_b": int(out["id_b"][i]),
                "neighbors": [matching.texts[j] for j in out["neighbors_a"][i]],
            }
            for i in rows
        ]

    return LocalResult(
        run_id,
        model_a,
        model_b,
        len(queries),
        len(matching),
        k,
        id_k,
        threshold,
        regularizer,
        **medians,
        id_pearson=id_pearson,
        id_spearman=id_spearman,
        mean_id_a=float(out["id_a"].mean()),
        mean_id_b=float(out["id_b"].mean()),
        lowest=listing(order[:show]),
        highest=listing(order[::-1][:show]),
        matching=stats,
        seconds=seconds,
    )


def global_matrix(
    wh: Warehouse,
    models: list[str],
    *,
    matrix: str = "input",
    sample: int | None = 4000,
    seed: int = 0,
    rule: str = "uniform",
    center: bool = False,
    progress: bool = True,
) -> tuple[np.ndarray, list[GlobalResult]]:
    """The Pearson matrix over every pair of models (1 on the diagonal), each pair stored."""
    from tqdm.auto import tqdm

    if len(set(models)) < 2:
        raise InputError("name at least two different models")
    size = len(models)
    out = np.eye(size)
    results = []
    pairs = [(i, j) for i in range(size) for j in range(i + 1, size)]
    # Each model's matrix is read once, not once per pair (Gemma's 262k rows take seconds to
    # read); all of them are held at once, a few hundred MB to a few GB for a handful of models.
    matrices = [load_token_matrix(wh, name, matrix) for name in models]
    for i, j in tqdm(
        pairs, desc="global geometry", unit="pair", disable=not progress or len(pairs) < 2, dynamic_ncols=True
    ):
        r = _global_pair(wh, matrices[i], matrices[j], sample=sample, seed=seed, rule=rule, center=center)
        out[i, j] = out[j, i] = r.pearson
        results.append(r)
    return out, results
