"""Emb2Emb: a linear (optionally affine) map from model A's space to model B's, fitted
by least squares on paired vectors, and the transfer of A's steering vectors into B.

Pairs are the embeddings of tokens both vocabularies hold (matched by decoded text, as
the token geometry matches them), or the hidden states of the same stored prompts at
corresponding layers. A steering vector is a *difference* of activations, so it maps
through the linear part only: T(x + v) - T(x) = v·W, whatever the bias.

Residual-stream norms differ by orders of magnitude between models, so a mapped vector's
norm is calibrated (docs/design.md §4); the rule and the numbers used are stored with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from layerbase.analysis.geometry.tokens import load_token_matrix, match_tokens
from layerbase.analysis.similarity.stats import max_similarity_path
from layerbase.analysis.steering.vectors import VectorInfo, check_layer, check_new_name, extract_layer, load_vector
from layerbase.analysis.vectors import layer_vectors
from layerbase.ingest.loading import open_stored_model
from layerbase.warehouse.engine import Warehouse
from layerbase.warehouse.errors import InputError
from layerbase.warehouse.lookup import get_dataset, get_model, get_vector
from layerbase.warehouse.models import AffinityCell, AffinityRun, Dataset, Emb2EmbMap, Model, SteeringVector

if TYPE_CHECKING:
    from layerbase.ingest.model_cache import ModelCache

PAIRS = ("tokens-input", "tokens-output", "prompts")
# How a mapped vector's norm is set (docs/geometry-and-steering.md, measured with
# bench/steering_calibration.py): ``contrast``, the default, gives it the norm of the target
# model's own mean difference over the same contrast prompts; ``relative`` keeps its norm
# relative to the layer's median activation norm; ``none`` keeps the map's output.
CALIBRATIONS = ("contrast", "relative", "none")
DEFAULT_CALIBRATION = "contrast"
TEST_SHARE = 0.1


@dataclass
class LinearMap:
    weights: np.ndarray  # [d_a, d_b]
    bias: np.ndarray | None  # [d_b]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.weights
        return y + self.bias if self.bias is not None else y


def fit_linear_map(x: np.ndarray, y: np.ndarray, *, bias: bool = True, ridge: float = 0.0) -> LinearMap:
    """Least squares y ≈ x·W (+ b), with an optional ridge penalty ridge·||W||² (the bias is
    not penalised). Without ridge it is the minimum-norm solution (lstsq), which also
    handles fewer pairs than dimensions."""
    if ridge < 0:
        raise InputError(f"--ridge must be >= 0, got {ridge}")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x_mean = x.mean(axis=0) if bias else np.zeros(x.shape[1])
    y_mean = y.mean(axis=0) if bias else np.zeros(y.shape[1])
    xc, yc = x - x_mean, y - y_mean
    if ridge > 0:
        weights = np.linalg.solve(xc.T @ xc + ridge * np.eye(x.shape[1]), xc.T @ yc)
    else:
        weights = np.linalg.lstsq(xc, yc, rcond=None)[0]
    return LinearMap(weights.astype(np.float32), (y_mean - x_mean @ weights).astype(np.float32) if bias else None)


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float:
    """1 - SS_res / SS_tot summed over all output dimensions (variance-weighted R²)."""
    total = ((y - y.mean(axis=0)) ** 2).sum()
    return float(1 - ((y - predicted) ** 2).sum() / total) if total > 0 else float("nan")


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.where(den > 0, den, 1)))


@dataclass
class MapInfo:
    id: int
    model_a: str
    model_b: str
    pairs: str
    layer_a: int | None
    layer_b: int | None
    layer_rule: str | None
    bias: bool
    ridge: float
    n_pairs: int
    n_train: int
    n_test: int
    r2_train: float
    r2_test: float
    cosine_test: float
    reused: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _paired_vectors(
    wh: Warehouse, a: Model, b: Model, pairs: str, layer_a: int | None, layer_b: int | None, dataset: str | None
) -> tuple[np.ndarray, np.ndarray, int | None]:
    if pairs.startswith("tokens-"):
        matrix = pairs.split("-", 1)[1]
        ta, tb = load_token_matrix(wh, a.name, matrix), load_token_matrix(wh, b.name, matrix)
        matching = match_tokens(ta, tb)
        return ta.vectors[matching.rows_a], tb.vectors[matching.rows_b], None
    if dataset is None:
        raise InputError("--pairs prompts needs --dataset: a dataset both models have ingested")
    if layer_a is None or layer_b is None:
        raise InputError("--pairs prompts pairs hidden states of one layer of each model; give both layers")
    with Session(wh.engine) as session:
        ds = get_dataset(session, dataset)
        dataset_id = ds.id
    with wh.engine.connect() as conn:
        pos_a, xa = layer_vectors(conn, a.id, layer_a, dataset_id)
        pos_b, xb = layer_vectors(conn, b.id, layer_b, dataset_id)
    if len(pos_a) == 0 or len(pos_b) == 0:
        missing = a.name if len(pos_a) == 0 else b.name
        raise InputError(
            f"{missing} has no stored activations of {dataset!r} at the layer asked; "
            f"run `layerbase ingest --model {missing} --dataset {dataset}` first"
        )
    common, ia, ib = np.intersect1d(pos_a, pos_b, return_indices=True)
    return xa[ia], xb[ib], dataset_id


def fit_map(
    wh: Warehouse,
    model_a: str,
    model_b: str,
    *,
    pairs: str = "tokens-input",
    layer_a: int | None = None,
    layer_b: int | None = None,
    layer_rule: str | None = None,
    dataset: str | None = None,
    bias: bool = True,
    ridge: float = 0.0,
    seed: int = 0,
) -> tuple[MapInfo, LinearMap]:
    """Fit (or reuse the stored) map with these settings; store it with its fit quality."""
    if pairs not in PAIRS:
        raise InputError(f"unknown --pairs {pairs!r}; use one of {', '.join(PAIRS)}")
    with Session(wh.engine) as session:
        a, b = get_model(session, model_a), get_model(session, model_b)
        dataset_id = get_dataset(session, dataset).id if dataset and pairs == "prompts" else None
        if pairs != "prompts":
            layer_a = layer_b = None
            layer_rule = None  # a token map serves every layer
        found = session.scalar(
            sa.select(Emb2EmbMap)
            .where(
                Emb2EmbMap.model_a_id == a.id,
                Emb2EmbMap.model_b_id == b.id,
                Emb2EmbMap.pairs == pairs,
                Emb2EmbMap.layer_a.is_not_distinct_from(layer_a),
                Emb2EmbMap.layer_b.is_not_distinct_from(layer_b),
                Emb2EmbMap.dataset_id.is_not_distinct_from(dataset_id),
                Emb2EmbMap.bias == bias,
                Emb2EmbMap.ridge == ridge,
                Emb2EmbMap.seed == seed,
            )
            .order_by(Emb2EmbMap.id.desc())
            .limit(1)
        )
        if found is not None:
            linear = stored_map(found)
            return _map_info(found, model_a, model_b, reused=True), linear
        session.expunge_all()
    started = time.perf_counter()
    x, y, dataset_id = _paired_vectors(wh, a, b, pairs, layer_a, layer_b, dataset)
    n = len(x)
    if n < 10:
        raise InputError(f"only {n} paired vectors; a map needs at least 10 (more than the width to be determined)")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * TEST_SHARE)))
    test, train = order[:n_test], order[n_test:]
    linear = fit_linear_map(x[train], y[train], bias=bias, ridge=ridge)
    r2_train, r2_test = r_squared(y[train], linear(x[train])), r_squared(y[test], linear(x[test]))
    cosine_test = mean_cosine(linear(x[test]), y[test])
    row = Emb2EmbMap(
        model_a_id=a.id,
        model_b_id=b.id,
        pairs=pairs,
        layer_a=layer_a,
        layer_b=layer_b,
        dataset_id=dataset_id,
        layer_rule=layer_rule,
        bias=bias,
        ridge=ridge,
        seed=seed,
        n_pairs=n,
        n_train=len(train),
        n_test=n_test,
        r2_train=r2_train,
        r2_test=r2_test,
        cosine_test=cosine_test,
        width_a=x.shape[1],
        width_b=y.shape[1],
        weights=linear.weights.ravel().tolist(),
        bias_vec=linear.bias.tolist() if linear.bias is not None else None,
        seconds=time.perf_counter() - started,
    )
    with Session(wh.engine) as session, session.begin():
        session.add(row)
        session.flush()
        info = _map_info(row, model_a, model_b, reused=False)
    return info, linear


def stored_map(row: Emb2EmbMap) -> LinearMap:
    weights = np.asarray(row.weights, dtype=np.float32).reshape(row.width_a, row.width_b)
    return LinearMap(weights, np.asarray(row.bias_vec, dtype=np.float32) if row.bias_vec is not None else None)


def _map_info(row: Emb2EmbMap, model_a: str, model_b: str, *, reused: bool) -> MapInfo:
    return MapInfo(
        row.id,
        model_a,
        model_b,
        row.pairs,
        row.layer_a,
        row.layer_b,
        row.layer_rule,
        row.bias,
        row.ridge,
        row.n_pairs,
        row.n_train,
        row.n_test,
        row.r2_train,
        row.r2_test,
        row.cosine_test,
        reused,
    )


def corresponding_layer(wh: Warehouse, a: Model, b: Model, layer_a: int, dataset: str | None = None) -> tuple[int, str]:
    """B's layer for A's layer: the max-similarity path of the newest stored affinity
    matrix of the pair (on ``dataset`` when given) if there is one, else the same relative depth."""
    with Session(wh.engine) as session:
        dataset_id = get_dataset(session, dataset).id if dataset else None
        for first, second, flipped in ((a, b, False), (b, a, True)):
            query = sa.select(AffinityRun).where(
                AffinityRun.model_a_id == first.id,
                AffinityRun.model_b_id == second.id,
                AffinityRun.include_layer0.is_(False),
            )
            if dataset_id is not None:
                query = query.where(AffinityRun.dataset_a_id == dataset_id)
            run = session.scalar(query.order_by(AffinityRun.id.desc()).limit(1))
            if run is None:
                continue
            cells = session.execute(
                sa.select(AffinityCell.layer_a, AffinityCell.layer_b, AffinityCell.score).where(
                    AffinityCell.run_id == run.id
                )
            ).all()
            matrix = np.zeros((run.n_layers_a, run.n_layers_b))
            for la, lb, score in cells:
                matrix[la - 1, lb - 1] = score
            if flipped:
                matrix = matrix.T  # rows are A's layers
            best = int(max_similarity_path(matrix)[layer_a - 1]) + 1
            on = session.get_one(Dataset, run.dataset_a_id).name
            return best, f"max-similarity path of affinity run {run.id} (k = {run.k}, on {on})"
    proportional = max(1, min(b.n_layers, int(round(layer_a / a.n_layers * b.n_layers))))
    return proportional, "same relative depth (no affinity run of the pair is stored)"


def target_norms(
    model: Model,
    layer: int,
    positive: list[str],
    negative: list[str],
    token_rule: str,
    device: str | None = None,
    models: ModelCache | None = None,
) -> tuple[float, float]:
    """A model's median activation norm at a layer over the contrast prompts, and the norm of
    the mean difference between its activations on the two sides: the norm a native vector
    made from the same prompts has."""
    lm = open_stored_model(model, device=device, models=models)
    acts = extract_layer(lm, model, positive + negative, layer, token_rule)
    contrast = acts[: len(positive)].mean(axis=0) - acts[len(positive) :].mean(axis=0)
    return float(np.median(np.linalg.norm(acts, axis=1))), float(np.linalg.norm(contrast))


def transfer(
    wh: Warehouse,
    vector_name: str,
    target: str,
    *,
    layer: int | None = None,
    pairs: str = "tokens-input",
    dataset: str | None = None,
    bias: bool = True,
    ridge: float = 0.0,
    seed: int = 0,
    calibration: str = DEFAULT_CALIBRATION,
    name: str | None = None,
    device: str | None = None,
    models: ModelCache | None = None,
) -> tuple[VectorInfo, MapInfo, dict[str, Any]]:
    """Map a steering vector of model A into model B through a fitted Emb2Emb map and store it."""
    if calibration not in CALIBRATIONS and not calibration.startswith("native:"):
        raise InputError(f"unknown --calibrate {calibration!r}; use contrast, relative, none or native:VECTOR")
    with Session(wh.engine) as session:
        source, a, vector = load_vector(session, vector_name)
        b = get_model(session, target)
        if a.id == b.id:
            raise InputError(f"{vector_name} already lives in {target}; transfer maps into another model")
        name = name or f"{vector_name}->{b.name}"
        check_new_name(session, name)
        native = None
        if calibration.startswith("native:"):
            native_row = get_vector(session, calibration.split(":", 1)[1])
            if native_row.model_id != b.id:
                raise InputError(f"--calibrate {calibration}: that vector lives in another model than {target}")
            native = float(native_row.norm)
        session.expunge_all()
    if layer is None:
        layer, rule = corresponding_layer(wh, a, b, source.layer, dataset)
    else:
        rule = "given"
    check_layer(b, layer)
    map_info, linear = fit_map(
        wh,
        a.name,
        b.name,
        pairs=pairs,
        layer_a=source.layer,
        layer_b=layer,
        layer_rule=rule,
        dataset=dataset,
        bias=bias,
        ridge=ridge,
        seed=seed,
    )
    if linear.weights.shape[0] != vector.shape[0]:
        raise InputError(
            f"the map takes {linear.weights.shape[0]}-wide vectors but {vector_name} is {vector.shape[0]} wide"
        )
    mapped = vector @ linear.weights  # a difference of activations: the bias cancels
    mapped_norm = float(np.linalg.norm(mapped))
    if not mapped_norm > 0:
        raise InputError("the map sends this vector to zero; fit it on other pairs")
    positive = (source.positive or {}).get("texts", [])
    negative = (source.negative or {}).get("texts", [])
    target_activation_norm = 0.0
    detail: dict[str, Any] = {}
    if positive and negative and source.activation_norm:
        # Both norms are recorded whatever the rule, so that a user can compare them.
        target_activation_norm, target_contrast_norm = target_norms(
            b, layer, positive, negative, source.token_rule, device, models
        )
        relative_norm = source.norm / source.activation_norm * target_activation_norm
        detail = {
            "source_norm": source.norm,
            "source_activation_norm": source.activation_norm,
            "target_activation_norm": target_activation_norm,
            "target_contrast_norm": target_contrast_norm,
            "relative_norm": relative_norm,
        }
    elif calibration in ("contrast", "relative"):
        raise InputError(
            f"{vector_name} records no contrast prompts to calibrate on; use --calibrate none or native:VECTOR"
        )
    if calibration == "contrast":
        wanted = detail["target_contrast_norm"]
        detail |= {
            "rule": "contrast",
            "explanation": "||v_B|| = ||mean h_B(positive) - mean h_B(negative)||: the norm of "
            f"{b.name}'s own vector from the same contrast prompts",
        }
    elif calibration == "relative":
        wanted = detail["relative_norm"]
        detail |= {
            "rule": "relative",
            "explanation": "||v_B|| / median ||h_B|| = ||v_A|| / median ||h_A|| over the same contrast prompts",
        }
    elif native is not None:
        wanted = native
        detail |= {"rule": calibration, "native_norm": native}
    else:
        wanted = mapped_norm
        detail |= {"rule": "none"}
    scale = wanted / mapped_norm
    detail |= {"mapped_norm": mapped_norm, "scale": scale}
    final = (mapped * scale).astype(np.float32)
    with wh.engine.begin() as conn:
        vector_id = conn.execute(
            sa.insert(SteeringVector)
            .values(
                name=name,
                model_id=b.id,
                layer=layer,
                hook_site=b.hook_site,
                token_rule=source.token_rule,
                method="emb2emb",
                positive=source.positive,
                negative=source.negative,
                norm=float(np.linalg.norm(final)),
                activation_norm=target_activation_norm,
                source_vector_id=source.id,
                map_id=map_info.id,
                calibration=detail,
                vec=final,
            )
            .returning(SteeringVector.id)
        ).scalar_one()
    info = VectorInfo(
        vector_id,
        name,
        b.name,
        layer,
        "emb2emb",
        source.token_rule,
        float(np.linalg.norm(final)),
        target_activation_norm,
        len((source.positive or {}).get("texts", [])),
        len((source.negative or {}).get("texts", [])),
        f"mapped from {vector_name}",
    )
    return info, map_info, detail | {"layer_rule": rule}


def compare_vectors(wh: Warehouse, first: str, second: str) -> float:
    """Cosine similarity of two stored vectors of one model."""
    with Session(wh.engine) as session:
        r1, m1, v1 = load_vector(session, first)
        r2, m2, v2 = load_vector(session, second)
    if m1.id != m2.id or len(v1) != len(v2):
        raise InputError(f"{first} and {second} live in different models; compare vectors of one model")
    return float(v1 @ v2 / (np.linalg.norm(v1) * np.linalg.norm(v2)))
