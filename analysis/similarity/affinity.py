"""Cross-model layer affinity: A[i, j] = S(f_A^(i), f_B^(j)) (Wolfram & Schein 2025) for a
similarity measure S (``measures``), stored with its parameters, null level, diagonal test
and bootstrap intervals.

Mutual k-NN (the default) is computed from the materialized neighbour lists: the overlap
counts |N_k(x, f) ∩ N_k(x, g)| for every layer pair are counted in this process from the
stored arrays (``overlap``) or by one join of the unnested neighbour arrays on (position,
neighbour position); positions
make parallel datasets (prompt i of D1 <-> prompt i of D2) intersect directly. The other
k-NN measures read the same stored sets; the rest read every layer's activations
(``all_pairs``).
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.orm import Session

from layerbase.analysis.knn.materialize import DERIVED_DATA_COMMIT, EXACT_ENGINES, lock_key, materialize
from layerbase.analysis.knn.stored import stored_sets
from layerbase.analysis.resolve import get_dataset, get_model, ingested_layers
from layerbase.analysis.similarity.all_pairs import AllPairs, Interval, NullLevel, Side, closed_form_null
from layerbase.analysis.similarity.layer_data import activation_side, neighbourhood_side
from layerbase.analysis.similarity.measures import MEASURES, Measure, MeasureOptions, get_measure
from layerbase.analysis.similarity.overlap import shared_neighbours
from layerbase.analysis.similarity.stats import (
    DiagonalTest,
    diagonal_test,
    max_similarity_path,
    relative_depths,
)
from layerbase.warehouse.copy import copy_columns
from layerbase.warehouse.engine import Warehouse, analyze_if_grown, raw_connection
from layerbase.warehouse.errors import InputError, NotFoundError
from layerbase.warehouse.models import AffinityBootstrap, AffinityRun, KnnRun
from layerbase.warehouse.models import DiagonalTest as DiagonalTestRow
from layerbase.warehouse.parallel import default_workers, run_in_parallel

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

# Where mutual k-NN counts shared neighbours. Runs made before migration 0010 say 'sparse'
# (one scipy.sparse product, with the same counts).
OVERLAP_ENGINES = ("numpy", "sql")
OVERLAP_SQL = """
WITH a AS (
    SELECT r.layer, n.position, unnest(n.neighbors[1:CAST(%(k)s AS int)]) AS neighbor_position
    FROM knn_neighbor n JOIN knn_run r ON r.id = n.run_id
    WHERE n.run_id = ANY(%(runs_a)s) AND n.position BETWEEN %(first)s AND %(last)s
), b AS (
    SELECT r.layer, n.position, unnest(n.neighbors[1:CAST(%(k)s AS int)]) AS neighbor_position
    FROM knn_neighbor n JOIN knn_run r ON r.id = n.run_id
    WHERE n.run_id = ANY(%(runs_b)s) AND n.position BETWEEN %(first)s AND %(last)s
)
SELECT a.layer AS layer_a, b.layer AS layer_b, count(*) AS shared
FROM a JOIN b ON a.position = b.position AND a.neighbor_position = b.neighbor_position
GROUP BY a.layer, b.layer
"""


@dataclass
class AffinityMatrix:
    """A stored affinity matrix with its test (rows = model A's layers).

    ``chance`` and ``null_sd``: the null level's mean and standard deviation, averaged over
    the cells (None without a null level); ``cell_chance`` per cell. ``intervals``: bootstrap
    intervals of the diagonal test's statistic and of chosen cells."""

    run_id: int
    model_a: str
    model_b: str
    dataset_a: str
    dataset_b: str
    k: int | None
    n_prompts: int
    layers_a: list[int]
    layers_b: list[int]
    scores: np.ndarray
    chance: float | None
    null_sd: float | None
    test: DiagonalTest | None
    seconds: float
    knn_engine: str | None
    n_layers_a: int
    n_layers_b: int
    measure: str = "mutual_knn"
    parameters: dict[str, Any] = field(default_factory=dict)
    null_method: str = "closed_form"
    cell_chance: np.ndarray | None = None
    intervals: list[Interval] = field(default_factory=list)
    interval_settings: list[tuple[int, int, float]] = field(default_factory=list)  # (resamples, seed, level)

    @property
    def label(self) -> str:
        """The measure's name for people (e.g. 'linear CKA')."""
        return MEASURES[self.measure].label

    @property
    def describe_parameters(self) -> str:
        """The run's parameters in one phrase, e.g. 'k = 10' or 'cca_dims = 10, center'."""
        shown = [f"{key} = {value}" for key, value in self.parameters.items() if key not in ("preprocess", "seed")]
        if self.parameters.get("preprocess", "none") != "none":
            shown.append(f"preprocess {self.parameters['preprocess']}")
        return ", ".join(shown)

    @property
    def matrix(self) -> np.ndarray:
        """The scores, [model A's layers, model B's layers]."""
        return self.scores

    @property
    def path(self) -> pd.DataFrame:
        """The path of maximum similarity: for each of model A's layers, model B's most similar
        layer, with both relative depths and the score."""
        import pandas as pd

        best = max_similarity_path(self.scores)
        return pd.DataFrame(
            {
                "layer_a": self.layers_a,
                "layer_b": [self.layers_b[j] for j in best],
                "depth_a": np.array(self.layers_a) / self.n_layers_a,
                "depth_b": np.array([self.layers_b[j] for j in best]) / self.n_layers_b,
                "score": self.scores[np.arange(len(self.layers_a)), best],
            }
        )

    def to_pandas(self) -> pd.DataFrame:
        """One row per cell: both layers, their relative depths, the score, and whether the cell
        lies on the generalized diagonal."""
        import pandas as pd

        from layerbase.analysis.reporting.plots import diagonal_mask_for

        la = np.repeat(self.layers_a, len(self.layers_b))
        lb = np.tile(self.layers_b, len(self.layers_a))
        return pd.DataFrame(
            {
                "layer_a": la,
                "layer_b": lb,
                "depth_a": la / self.n_layers_a,
                "depth_b": lb / self.n_layers_b,
                "score": self.scores.ravel(),
                "on_diagonal": diagonal_mask_for(self.scores).ravel(),
            }
        )

    def plot(self, *, diagonal: bool = True, path: bool = True, vmax: float | None = None) -> Figure:
        """The heatmap (a matplotlib Figure; it shows inline in a notebook): the generalized
        diagonal outlined, the max-similarity path drawn, relative depths on the far axes."""
        from layerbase.analysis.reporting.plots import affinity_heatmap

        dataset = self.dataset_a if self.dataset_b == self.dataset_a else f"{self.dataset_a} | {self.dataset_b}"
        return affinity_heatmap(
            self.scores,
            self.layers_a,
            self.layers_b,
            self.model_a,
            self.model_b,
            label=self.label,
            k=self.k,
            chance=self.chance,
            subtitle=f"{dataset}, |D| = {self.n_prompts}",
            diagonal=diagonal,
            path=path,
            vmax=vmax,
        )

    def _repr_html_(self) -> str:
        import html

        test = f"diagonal test: {self.test.describe()}" if self.test else "no diagonal test"
        chance = "no null level" if self.chance is None else f"chance {self.chance:.4f}"
        return (
            f"<p><b>{html.escape(self.model_a)} × {html.escape(self.model_b)}</b>, {html.escape(self.label)} "
            f"({html.escape(self.describe_parameters)}) on {html.escape(self.dataset_a)}: "
            f"{len(self.layers_a)}×{len(self.layers_b)} layers, |D| = {self.n_prompts}, {chance}; {test} "
            f"(affinity run {self.run_id})</p>"
        )

    def summary(self) -> dict:
        t = self.test
        return {
            "run_id": self.run_id,
            "model_a": self.model_a,
            "model_b": self.model_b,
            "dataset_a": self.dataset_a,
            "dataset_b": self.dataset_b,
            "measure": self.measure,
            "parameters": self.parameters,
            "k": self.k,
            "n_prompts": self.n_prompts,
            "shape": list(self.scores.shape),
            "chance": self.chance,
            "null_method": self.null_method,
            "max_score": float(self.scores.max()),
            "test": t.as_dict() if t else None,
            "bootstrap": [i.as_dict() for i in self.intervals],
            "seconds": round(self.seconds, 3),
        }


def _knn_runs(
    conn: sa.Connection, model_id: int, dataset_id: int, layers: list[int], k: int, engine: str
) -> dict[int, int]:
    """run id per layer, preferring the requested engine, then exact ones; only runs with k_max >= k."""
    rows = conn.execute(
        sa.select(KnnRun.layer, KnnRun.id, KnnRun.engine).where(
            KnnRun.model_id == model_id, KnnRun.dataset_id == dataset_id, KnnRun.layer.in_(layers), KnnRun.k_max >= k
        )
    ).all()
    preference = [engine] + [e for e in EXACT_ENGINES if e != engine]
    best: dict[int, tuple[int, int]] = {}
    for layer, run_id, eng in rows:
        if eng not in preference:
            continue
        rank = preference.index(eng)
        if layer not in best or rank < best[layer][0]:
            best[layer] = (rank, run_id)
    return {layer: rid for layer, (_, rid) in best.items()}


@dataclass(frozen=True)
class _Pair:
    """Two (model, dataset) sides resolved to ids, with the layers the matrix covers."""

    model_ids: tuple[int, int]
    dataset_ids: tuple[int, int]
    n_layers: tuple[int, int]
    layers_a: list[int]
    layers_b: list[int]
    n_prompts: int

    @property
    def same_side(self) -> bool:
        return self.model_ids[0] == self.model_ids[1] and self.dataset_ids[0] == self.dataset_ids[1]


@dataclass(frozen=True)
class _Run:
    """What identifies a run besides its pair: measure, k, parameters, layer 0."""

    measure: Measure
    k: int | None
    parameters: dict[str, Any]
    include_layer0: bool


def compute_affinity(
    wh: Warehouse,
    model_a: str,
    model_b: str,
    dataset_a: str,
    dataset_b: str | None = None,
    *,
    measure: str = "mutual_knn",
    k: int = 10,
    options: MeasureOptions | None = None,
    include_layer0: bool = False,
    engine: str = "blas",
    study: str | None = None,
    n_pairs: int = 1,
    workers: int | None = None,
    overlap: str = "numpy",
    recompute: bool = False,
    any_study: bool = False,
    bootstrap: int = 0,
    bootstrap_cells: Sequence[tuple[int, int]] = (),
    level: float = 0.95,
    progress: bool = True,
) -> AffinityMatrix:
    """The affinity matrix ``A[i, j] = S(f_A^(i), f_B^(j))`` of ``measure`` (docs/measures.md)
    with its null level and diagonal test: the current stored run when there is one
    (``CURRENT_RUN``: same measure and parameters), else computed (materializing missing k-NN
    sets first) and stored as a new run. Stored runs are never changed nor replaced;
    ``recompute`` adds a new run even when a current one exists. ``any_study``: a current
    run of another study (another Bonferroni count) is reused too. ``overlap``: where mutual
    k-NN counts shared neighbours, ``numpy`` (in this process from the stored arrays, the
    default) or ``sql`` (one join in the database); the two give identical matrices. ``bootstrap``:
    that many resamples of the prompts give percentile intervals (``level``) of the diagonal
    test's t and mean difference and of ``bootstrap_cells`` ((layer A, layer B) pairs),
    added to the run."""
    if overlap not in OVERLAP_ENGINES:
        raise InputError(f"unknown overlap engine {overlap!r}; use one of {', '.join(OVERLAP_ENGINES)}")
    spec = get_measure(measure)
    options = (options or MeasureOptions()).check()
    dataset_b = dataset_b or dataset_a
    pair = _resolve_pair(wh, model_a, model_b, dataset_a, dataset_b, include_layer0)
    if spec.uses_k:
        _check_k(k, pair.n_prompts)
    elif pair.n_prompts < 4:
        raise InputError(f"{spec.label} needs at least 4 prompts ({dataset_a} has {pair.n_prompts})")
    _check_bootstrap(bootstrap, bootstrap_cells, level, pair)
    run = _Run(spec, k if spec.uses_k else None, options.parameters(spec, k), include_layer0)
    names = (model_a, model_b, dataset_a, dataset_b)
    boot = _Bootstrap(bootstrap, tuple(bootstrap_cells), level, options.seed)
    if not recompute:
        with wh.engine.connect() as conn:
            current = _current_run(conn, pair, run, n_pairs, study, any_study)
        if current is not None:
            return _with_bootstrap(wh, load_run(wh, current), pair, run, options, engine, boot)
    if spec.family == "neighbours" and options.preprocess == "none":
        _ensure_knn_sets(wh, pair, names[:2], names[2:], k, engine, progress)
    started = time.perf_counter()
    with wh.engine.begin() as conn:
        conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(:key)"),
            {"key": lock_key("affinity", *pair.model_ids, *pair.dataset_ids, measure, k)},
        )
        # Another process may have stored it while this one waited for the lock.
        current = None if recompute else _current_run(conn, pair, run, n_pairs, study, any_study)
        stored_now = current is None
        if stored_now:
            conn.execute(sa.text(DERIVED_DATA_COMMIT))
            # The inputs are read on a connection of their own: on Citus, a transaction that
            # read the distributed tables in parallel may not then write reference tables.
            with wh.engine.connect() as read:
                computed = _compute(wh, read, pair, run, options, engine, workers, overlap)
                test = _test(computed.scores, pair, n_pairs)
                intervals = (
                    _intervals(computed.all_pairs(), computed.scores, pair, test, boot) if boot.replicates else []
                )
            elapsed = time.perf_counter() - started
            current = _store_run(conn, pair, run, computed, test, n_pairs, overlap, study, elapsed)
            _store_intervals(conn, current, intervals, boot)
    assert current is not None
    if not stored_now:
        return _with_bootstrap(wh, load_run(wh, current), pair, run, options, engine, boot)
    analyze_if_grown(
        wh,
        {
            "affinity_run": 1,
            "affinity_cell": computed.scores.size,
            "diagonal_test": int(test is not None),
            "affinity_bootstrap": len(intervals),
        },
    )
    # The new run as stored, without reading it back.
    null = computed.null
    return AffinityMatrix(
        current,
        *names,
        run.k,
        pair.n_prompts,
        pair.layers_a,
        pair.layers_b,
        computed.scores,
        None if null is None else null.chance,
        None if null is None else null.mean_sd,
        test,
        elapsed,
        computed.knn_engines,
        *pair.n_layers,
        measure=spec.name,
        parameters=run.parameters,
        null_method="none" if null is None else null.method,
        cell_chance=None if null is None else null.mean,
        intervals=intervals,
        interval_settings=[boot.settings] * len(intervals),
    )


def _check_k(k: int, n: int) -> None:
    if not 0 < k < n:
        raise InputError(f"k = {k} needs 0 < k < the number of prompts ({n}); lower -k")
    if k >= n - 1:
        raise InputError(
            f"k = {k} on {n} prompts: every prompt's {k} neighbours are all the others, so every "
            f"score is 1 and the test means nothing; lower -k to at most {n - 2}"
        )


@dataclass(frozen=True)
class _Bootstrap:
    """What a bootstrap was asked for: resamples (0: none), cells, confidence level, seed."""

    replicates: int
    cells: tuple[tuple[int, int], ...]
    level: float
    seed: int

    @property
    def settings(self) -> tuple[int, int, float]:
        return self.replicates, self.seed, self.level


def _check_bootstrap(replicates: int, cells: Sequence[tuple[int, int]], level: float, pair: _Pair) -> None:
    if not 0 <= replicates <= 100_000:
        raise InputError(f"--bootstrap must be between 0 and 100000 resamples (got {replicates})")
    if cells and not replicates:
        raise InputError("--bootstrap-cells needs --bootstrap N (the number of resamples)")
    if not 0 < level < 1:
        raise InputError(f"the confidence level must lie between 0 and 1 (got {level})")
    for a, b in cells:
        if a not in pair.layers_a or b not in pair.layers_b:
            raise InputError(
                f"cell {a}:{b} is not in the matrix: its layers are {pair.layers_a[0]}..{pair.layers_a[-1]} "
                f"(model A) by {pair.layers_b[0]}..{pair.layers_b[-1]} (model B)"
            )


@dataclass
class _Computed:
    """A new run's matrix, null level and provenance; ``all_pairs`` gives the in-memory
    computation (for the bootstrap), made when first asked for."""

    scores: np.ndarray
    null: NullLevel | None
    knn_engines: str | None
    all_pairs: Any


def _compute(
    wh: Warehouse,
    conn: sa.Connection,
    pair: _Pair,
    run: _Run,
    options: MeasureOptions,
    engine: str,
    workers: int | None,
    overlap: str,
) -> _Computed:
    spec, k = run.measure, run.k
    made: list[AllPairs] = []

    def all_pairs() -> AllPairs:
        if not made:
            made.append(AllPairs(spec, options, k, *_sides(conn, pair, run, options, engine)))
        return made[0]

    if spec.name == "mutual_knn" and options.preprocess == "none":
        assert k is not None
        scores, engines = _scores(wh, conn, pair, k, engine, workers, overlap)
        return _Computed(scores, closed_form_null(spec.name, scores, k, pair.n_prompts), engines, all_pairs)
    computation = all_pairs()
    scores = computation.matrix()
    used: str | None = None  # the k-NN engines whose sets the run read
    if spec.family == "neighbours":
        assert k is not None
        used = _engines(conn, *_pair_runs(conn, pair, k, engine)) if options.preprocess == "none" else "blas"
    return _Computed(scores, computation.null(scores), used, all_pairs)


def _sides(conn: sa.Connection, pair: _Pair, run: _Run, options: MeasureOptions, engine: str) -> tuple[Side, Side]:
    """Both models' layers as the measure reads them: stored k-NN sets (k-NN measures on the
    activations as they are), else the activations, preprocessed."""
    if run.measure.family == "neighbours" and options.preprocess == "none":
        assert run.k is not None
        runs_a, runs_b = _pair_runs(conn, pair, run.k, engine)
        return (
            neighbourhood_side(conn, [runs_a[layer] for layer in pair.layers_a], run.k, pair.n_prompts),
            neighbourhood_side(conn, [runs_b[layer] for layer in pair.layers_b], run.k, pair.n_prompts),
        )
    return (
        activation_side(
            conn, pair.model_ids[0], pair.dataset_ids[0], pair.layers_a, pair.n_prompts, options.preprocess
        ),
        activation_side(
            conn, pair.model_ids[1], pair.dataset_ids[1], pair.layers_b, pair.n_prompts, options.preprocess
        ),
    )


def _test(scores: np.ndarray, pair: _Pair, n_pairs: int) -> DiagonalTest | None:
    """The diagonal test of a matrix (never over the embedding layer, docs/design.md §4); none
    within one model on one dataset, where the diagonal is 1 by construction."""
    block = _test_block(scores, pair)
    testable = block.size - min(block.shape) >= 2 and not pair.same_side
    return diagonal_test(block, n_pairs) if testable else None


def _test_block(scores: np.ndarray, pair: _Pair) -> np.ndarray:
    return scores[np.array(pair.layers_a) > 0][:, np.array(pair.layers_b) > 0]


def _intervals(
    computation: AllPairs, scores: np.ndarray, pair: _Pair, test: DiagonalTest | None, boot: _Bootstrap
) -> list[Interval]:
    """Percentile intervals over resamples of the prompts: the diagonal test's t and mean
    difference (when the run has a test), and the chosen cells."""
    resampled = computation.bootstrap(boot.replicates, boot.seed)
    level = boot.level
    out = []
    if test is not None:
        tests = [diagonal_test(_test_block(m, pair), test.n_pairs) for m in resampled]
        t_values = np.array([np.nan if r.t is None else r.t for r in tests])
        if test.t is not None:
            out.append(Interval.of("diagonal_t", test.t, t_values, level))
        differences = np.array([r.mean_on - r.mean_off for r in tests])
        out.append(Interval.of("diagonal_difference", test.mean_on - test.mean_off, differences, level))
    for a, b in boot.cells:
        i, j = pair.layers_a.index(a), pair.layers_b.index(b)
        out.append(Interval.of("cell", scores[i, j], np.array([m[i, j] for m in resampled]), level, (a, b)))
    return out


def _with_bootstrap(
    wh: Warehouse, m: AffinityMatrix, pair: _Pair, run: _Run, options: MeasureOptions, engine: str, boot: _Bootstrap
) -> AffinityMatrix:
    """A stored run with the bootstrap intervals asked for: those it lacks (for another count
    of resamples, seed, level or cell) are computed and added to it."""
    if not boot.replicates:
        return m
    have = {(i.statistic, i.layer_a, i.layer_b) for i, s in zip(m.intervals, m.interval_settings) if s == boot.settings}
    wanted = {("cell", a, b) for a, b in boot.cells} | ({("diagonal_difference", None, None)} if m.test else set())
    if wanted <= have:
        return m
    with wh.engine.connect() as read:
        computation = AllPairs(run.measure, options, run.k, *_sides(read, pair, run, options, engine))
        intervals = _intervals(computation, m.scores, pair, m.test, boot)
    missing = [i for i in intervals if (i.statistic, i.layer_a, i.layer_b) not in have]
    with wh.engine.begin() as conn:
        _store_intervals(conn, m.run_id, missing, boot)
    return load_run(wh, m.run_id)


def _store_intervals(conn: sa.Connection, run_id: int, intervals: list[Interval], boot: _Bootstrap) -> None:
    for i in intervals:
        conn.execute(
            sa.insert(AffinityBootstrap).values(
                run_id=run_id, **i.as_dict(), level=boot.level, replicates=boot.replicates, seed=boot.seed
            )
        )


def _pair_runs(conn: sa.Connection, pair: _Pair, k: int, engine: str) -> tuple[dict[int, int], dict[int, int]]:
    """The k-NN run of each layer of both sides (``_knn_runs``)."""
    return (
        _knn_runs(conn, pair.model_ids[0], pair.dataset_ids[0], pair.layers_a, k, engine),
        _knn_runs(conn, pair.model_ids[1], pair.dataset_ids[1], pair.layers_b, k, engine),
    )


def _engines(conn: sa.Connection, runs_a: dict[int, int], runs_b: dict[int, int]) -> str:
    """The engines that computed the k-NN sets a run read (e.g. 'blas', or 'blas+sql')."""
    run_ids = list(runs_a.values()) + list(runs_b.values())
    return "+".join(sorted(set(conn.execute(sa.select(KnnRun.engine).where(KnnRun.id.in_(run_ids))).scalars())))


def _resolve_pair(
    wh: Warehouse, model_a: str, model_b: str, dataset_a: str, dataset_b: str, include_layer0: bool
) -> _Pair:
    """Ids and layers of both sides; the datasets must be one, or a parallel pair."""
    with Session(wh.engine) as session:
        ma, mb = get_model(session, model_a), get_model(session, model_b)
        da, db = get_dataset(session, dataset_a), get_dataset(session, dataset_b)
        if da.n_prompts != db.n_prompts:
            raise InputError(
                f"datasets {dataset_a!r} ({da.n_prompts} prompts) and {dataset_b!r} ({db.n_prompts}) differ in size; "
                "a parallel affinity pairs prompt i with prompt i, so use parallel datasets (`dataset add-pairs`)"
            )
        if da.id != db.id and da.parallel_to_id != db.id and db.parallel_to_id != da.id:
            raise InputError(
                f"datasets {dataset_a!r} and {dataset_b!r} are not parallel; register them as a pair "
                "(`layerbase dataset add-pairs`, or `dataset add --parallel-to`)"
            )
        layers_a = [x for x in ingested_layers(session, ma, da) if x > 0 or include_layer0]
        layers_b = [x for x in ingested_layers(session, mb, db) if x > 0 or include_layer0]
        if include_layer0 and (0 not in layers_a or 0 not in layers_b):
            raise InputError("--layer0 needs both models ingested with --layer0")
        return _Pair((ma.id, mb.id), (da.id, db.id), (ma.n_layers, mb.n_layers), layers_a, layers_b, da.n_prompts)


def _ensure_knn_sets(
    wh: Warehouse,
    pair: _Pair,
    models: tuple[str, str],
    datasets: tuple[str, str],
    k: int,
    engine: str,
    progress: bool,
) -> None:
    """Materialize the k-NN sets of the layers that have none with at least k neighbours,
    up to K_max (100 by default) so that a later k up to it needs no recompute."""
    sides = zip(models, pair.model_ids, datasets, pair.dataset_ids, (pair.layers_a, pair.layers_b))
    for model, model_id, dataset, dataset_id, layers in sides:
        with wh.engine.connect() as conn:
            have = _knn_runs(conn, model_id, dataset_id, layers, k, engine)
        missing = [layer for layer in layers if layer not in have]
        if missing:
            k_max = max(k, min(100, pair.n_prompts - 1))
            materialize(wh, model, dataset, layers=missing, k_max=k_max, engine=engine, progress=progress)


def _scores(
    wh: Warehouse, conn: sa.Connection, pair: _Pair, k: int, engine: str, workers: int | None, overlap: str
) -> tuple[np.ndarray, str]:
    """The matrix [A's layers, B's layers] of M_k from the stored sets, and the engines that
    computed those sets ('blas', or e.g. 'blas+sql')."""
    runs_a, runs_b = _pair_runs(conn, pair, k, engine)
    if overlap == "numpy":
        counts = _array_overlap_counts(conn, runs_a, runs_b, k)
    else:
        counts = _overlap_counts(wh, list(runs_a.values()), list(runs_b.values()), k, pair.n_prompts, workers)
    scores = np.zeros((len(pair.layers_a), len(pair.layers_b)))
    row = {layer: i for i, layer in enumerate(pair.layers_a)}
    col = {layer: j for j, layer in enumerate(pair.layers_b)}
    for (layer_a, layer_b), shared in counts.items():
        scores[row[layer_a], col[layer_b]] = shared / (k * pair.n_prompts)
    return scores, _engines(conn, runs_a, runs_b)


def _store_run(
    conn: sa.Connection,
    pair: _Pair,
    run: _Run,
    computed: _Computed,
    test: DiagonalTest | None,
    n_pairs: int,
    overlap: str,
    study: str | None,
    seconds: float,
) -> int:
    """Store a new run of this pair, measure and parameters: run, cells and test. Earlier
    runs stay as they are."""
    (model_a, model_b), (dataset_a, dataset_b) = pair.model_ids, pair.dataset_ids
    null = computed.null
    run_id: int = conn.execute(
        sa.insert(AffinityRun)
        .values(
            model_a_id=model_a,
            model_b_id=model_b,
            dataset_a_id=dataset_a,
            dataset_b_id=dataset_b,
            measure=run.measure.name,
            parameters=run.parameters,
            k=run.k,
            include_layer0=run.include_layer0,
            n_prompts=pair.n_prompts,
            n_layers_a=pair.n_layers[0],
            n_layers_b=pair.n_layers[1],
            chance=None if null is None else null.chance,
            null_sd=None if null is None else null.mean_sd,
            null_method="none" if null is None else null.method,
            knn_engine=computed.knn_engines,
            overlap_engine=overlap if run.measure.name == "mutual_knn" and computed.knn_engines else None,
            study=study,
            seconds=seconds,
        )
        .returning(AffinityRun.id)
    ).scalar_one()
    _store_cells(conn, run_id, computed.scores, pair, null)
    if test is not None:
        conn.execute(
            sa.insert(DiagonalTestRow).values(
                run_id=run_id,
                rows_model="b" if test.transposed else "a",
                n_on=test.n_on,
                n_off=test.n_off,
                mean_on=test.mean_on,
                mean_off=test.mean_off,
                t=test.t,
                p=test.p,
                log10_p=test.log10_p,
                n_pairs=n_pairs,
                p_bonferroni=test.p_bonferroni,
                log10_p_bonferroni=test.log10_p_bonferroni,
                undefined_reason=test.undefined_reason,
            )
        )
    return run_id


# Whether run ``r`` is the newest of its key (models, datasets, measure, k, parameters, layer
# 0): the current run, as the BI views' ``is_current`` says too (migration 0009).
NEWEST = """NOT EXISTS (
    SELECT 1 FROM affinity_run newer
    WHERE newer.model_a_id = r.model_a_id AND newer.model_b_id = r.model_b_id
      AND newer.dataset_a_id = r.dataset_a_id AND newer.dataset_b_id = r.dataset_b_id
      AND newer.measure = r.measure AND newer.k IS NOT DISTINCT FROM r.k AND newer.parameters = r.parameters
      AND newer.include_layer0 = r.include_layer0 AND newer.id > r.id
)"""
# The newest run of a key, unless a k-NN set of either side was computed after it (then it
# may have been made from other sets, and is not current); for a study, only when its
# diagonal test was corrected for the same number of pairs in a study of the same name.
CURRENT_RUN = f"""
SELECT r.id FROM affinity_run r
LEFT JOIN diagonal_test t ON t.run_id = r.id
WHERE r.model_a_id = :ma AND r.model_b_id = :mb AND r.dataset_a_id = :da AND r.dataset_b_id = :db
  AND r.measure = :measure AND r.k IS NOT DISTINCT FROM CAST(:k AS smallint)
  AND r.parameters = CAST(:parameters AS jsonb) AND r.include_layer0 = :l0
  AND (:any_study OR ((t.run_id IS NULL OR t.n_pairs = :n_pairs) AND r.study IS NOT DISTINCT FROM :study))
  AND (r.knn_engine IS NULL OR NOT EXISTS (
      SELECT 1 FROM knn_run n
      WHERE ((n.model_id = :ma AND n.dataset_id = :da) OR (n.model_id = :mb AND n.dataset_id = :db))
        AND n.created_at > r.created_at
  ))
  AND {NEWEST}
"""


def _current_run(
    conn: sa.Connection, pair: _Pair, run: _Run, n_pairs: int, study: str | None, any_study: bool
) -> int | None:
    (ma, mb), (da, db) = pair.model_ids, pair.dataset_ids
    values = {"ma": ma, "mb": mb, "da": da, "db": db, "l0": run.include_layer0}
    return conn.execute(
        sa.text(CURRENT_RUN),
        {
            **values,
            "measure": run.measure.name,
            "k": run.k,
            "parameters": json.dumps(run.parameters),
            "n_pairs": n_pairs,
            "study": study,
            "any_study": any_study,
        },
    ).scalar()


# The planner cannot estimate the join of unnested arrays (it guesses thousands of rows
# where there are millions) and then picks sort-based plans; hashing is about 2x faster at
# 30 x 18 layers (measured), so sorts and merge joins are ruled out.
OVERLAP_SETTINGS = ("SET LOCAL enable_sort = off", "SET LOCAL enable_mergejoin = off")
# With the prompts split over several connections each already has a core: parallel
# workers of its own would only contend (measured at 30 x 18 on 2 cores: 0.26 s with
# them, 0.18 s without; one connection with its parallel workers: 0.31 s).
NO_PARALLEL_WORKERS = "SET LOCAL max_parallel_workers_per_gather = 0"


def _overlap_counts(
    wh: Warehouse, runs_a: list[int], runs_b: list[int], k: int, n: int, workers: int | None
) -> Counter[tuple[int, int]]:
    """Shared (prompt, neighbour) pairs per layer pair, the prompts split into one range per
    worker connection (the join is per prompt, so the ranges add up)."""
    workers = workers or default_workers()
    step = -(-n // workers)
    ranges = [(first, min(n, first + step) - 1) for first in range(0, n, step)]

    def count(cur: psycopg.Cursor, positions: tuple[int, int]) -> list[tuple[int, int, int]]:
        cur.execute(
            OVERLAP_SQL, {"runs_a": runs_a, "runs_b": runs_b, "k": k, "first": positions[0], "last": positions[1]}
        )
        return cur.fetchall()

    counts: Counter[tuple[int, int]] = Counter()
    settings = OVERLAP_SETTINGS + ((NO_PARALLEL_WORKERS,) if len(ranges) > 1 else ())
    for rows in run_in_parallel(
        wh, ranges, count, workers=workers, settings=[sql.SQL(statement) for statement in settings]
    ):
        for layer_a, layer_b, shared in rows:
            counts[(layer_a, layer_b)] += shared
    return counts


def _array_overlap_counts(
    conn: sa.Connection, runs_a: dict[int, int], runs_b: dict[int, int], k: int
) -> Counter[tuple[int, int]]:
    """Shared (prompt, neighbour) pairs per layer pair, counted in this process from the
    stored arrays (``overlap.shared_neighbours``)."""

    def side(runs: dict[int, int]) -> np.ndarray:
        return np.stack([sets for (sets,) in stored_sets(conn, list(runs.values()), k)])

    shared = shared_neighbours(side(runs_a), side(runs_b))
    layers_a, layers_b = list(runs_a), list(runs_b)
    return Counter({(layers_a[i], layers_b[j]): int(shared[i, j]) for i, j in np.ndindex(*shared.shape)})


def _store_cells(conn: sa.Connection, run_id: int, scores: np.ndarray, pair: _Pair, null: NullLevel | None) -> None:
    la = np.repeat(np.array(pair.layers_a, dtype=np.int16), len(pair.layers_b))
    lb = np.tile(np.array(pair.layers_b, dtype=np.int16), len(pair.layers_a))
    flat = scores.ravel()
    columns: list[tuple[str, str, np.ndarray]] = [
        ("run_id", "int4", np.full(flat.size, run_id, dtype=np.int32)),
        ("layer_a", "int2", la),
        ("layer_b", "int2", lb),
        ("depth_a", "float8", la / pair.n_layers[0]),
        ("depth_b", "float8", lb / pair.n_layers[1]),
        ("score", "float8", flat),
    ]
    finite = np.zeros(flat.size, dtype=bool)
    if null is not None:
        columns += [
            ("chance", "float8", null.mean.ravel()),
            ("null_sd", "float8", null.sd.ravel()),
            ("log10_p_null", "float8", null.log10_p.ravel()),
        ]
        finite = np.isfinite(null.log10_p.ravel())
    # log10 p is NULL where the null has no spread (NaN here), and the binary COPY writer
    # takes no NULLs: those cells are copied without the column (one COPY per kind of row).
    cur = raw_connection(conn).cursor()
    for rows, kept in ((finite, columns), (~finite, [c for c in columns if c[0] != "log10_p_null"])):
        if rows.any():
            copy_columns(cur, "affinity_cell", tuple(c[0] for c in kept), [(c[1], c[2][rows]) for c in kept])


def compute_study(
    wh: Warehouse,
    models: list[str],
    dataset: str,
    dataset_b: str | None = None,
    *,
    measure: str = "mutual_knn",
    k: int = 10,
    options: MeasureOptions | None = None,
    include_layer0: bool = False,
    engine: str = "blas",
    study: str | None = None,
    overlap: str = "numpy",
    recompute: bool = False,
    bootstrap: int = 0,
    bootstrap_cells: Sequence[tuple[int, int]] = (),
    level: float = 0.95,
    progress: bool = True,
) -> list[AffinityMatrix]:
    """Affinity matrices of one measure for every pair of models, Bonferroni-corrected over
    the pairs: the current stored runs where there are, new runs for the rest
    (``compute_affinity``).

    With one dataset, pairs are unordered (A, B) for A before B in the list. With a
    parallel pair of datasets, the first model reads ``dataset`` and the second ``dataset_b``.
    """
    if len(set(models)) < 2:
        raise InputError("give at least two different models (e.g. --models A,B)")
    pairs = list(itertools.combinations(models, 2))
    study = study or "+".join(models) + f"@{dataset}" + (f"|{dataset_b}" if dataset_b else "")
    return [
        compute_affinity(
            wh,
            a,
            b,
            dataset,
            dataset_b,
            measure=measure,
            k=k,
            options=options,
            include_layer0=include_layer0,
            engine=engine,
            study=study,
            overlap=overlap,
            n_pairs=len(pairs),
            recompute=recompute,
            bootstrap=bootstrap,
            bootstrap_cells=bootstrap_cells,
            level=level,
            progress=progress,
        )
        for a, b in pairs
    ]


RUNS_SQL = f"""
SELECT r.id AS run_id, ma.name AS model_a, mb.name AS model_b, da.name AS dataset_a, db.name AS dataset_b,
       r.measure, r.k, r.parameters, r.null_method,
       r.include_layer0, r.n_prompts, r.n_layers_a, r.n_layers_b, r.chance, r.null_sd, r.knn_engine, r.study,
       r.seconds, r.created_at, t.mean_on, t.mean_off, t.t, t.log10_p, t.n_pairs, t.log10_p_bonferroni,
       t.rows_model, t.undefined_reason,
       CASE WHEN r.model_a_id = r.model_b_id THEN 'within-model' ELSE 'cross-model' END AS pair_kind,
       {NEWEST} AS is_current
FROM affinity_run r
JOIN model ma ON ma.id = r.model_a_id
JOIN model mb ON mb.id = r.model_b_id
JOIN dataset da ON da.id = r.dataset_a_id
JOIN dataset db ON db.id = r.dataset_b_id
LEFT JOIN diagonal_test t ON t.run_id = r.id
"""


def list_runs(wh: Warehouse) -> list[dict[str, Any]]:
    """Every stored affinity run with its models, datasets, measure, parameters and diagonal test."""
    with wh.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(RUNS_SQL + " ORDER BY r.id"))]


TEST_FIELDS = ("mean_on", "mean_off", "t", "p", "p_bonferroni", "log10_p", "log10_p_bonferroni", "undefined_reason")


def load_run(wh: Warehouse, run_id: int) -> AffinityMatrix:
    """A stored affinity run by id, as computed: matrix, null level, diagonal test, bootstrap
    intervals and provenance."""
    with wh.engine.connect() as conn:
        run = conn.execute(sa.text(RUNS_SQL + " WHERE r.id = :id"), {"id": run_id}).mappings().first()
        if run is None:
            raise _missing_run(run_id)
        test_row = (
            conn.execute(sa.select(DiagonalTestRow.__table__).where(DiagonalTestRow.run_id == run["run_id"]))
            .mappings()
            .first()
        )
        boots = (
            conn.execute(
                sa.select(AffinityBootstrap.__table__)
                .where(AffinityBootstrap.run_id == run_id)
                .order_by(AffinityBootstrap.id)
            )
            .mappings()
            .all()
        )
    scores, layers_a, layers_b, chance = _load_cells(wh, run["run_id"])
    test = None
    if test_row is not None:
        test = DiagonalTest(
            n_on=test_row["n_on"],
            n_off=test_row["n_off"],
            n_pairs=test_row["n_pairs"],
            transposed=test_row["rows_model"] == "b",
            **{f: test_row[f] for f in TEST_FIELDS},
        )
    m = AffinityMatrix(
        run["run_id"],
        run["model_a"],
        run["model_b"],
        run["dataset_a"],
        run["dataset_b"],
        run["k"],
        run["n_prompts"],
        layers_a,
        layers_b,
        scores,
        run["chance"],
        run["null_sd"],
        test,
        run["seconds"],
        run["knn_engine"],
        run["n_layers_a"],
        run["n_layers_b"],
        measure=run["measure"],
        parameters=dict(run["parameters"]),
        null_method=run["null_method"],
        cell_chance=chance,
        intervals=[
            Interval(b["statistic"], b["estimate"], b["low"], b["high"], b["std_error"], b["layer_a"], b["layer_b"])
            for b in boots
        ],
        interval_settings=[(b["replicates"], b["seed"], b["level"]) for b in boots],
    )
    return m


def _load_cells(wh: Warehouse, run_id: int) -> tuple[np.ndarray, list[int], list[int], np.ndarray | None]:
    with wh.engine.connect() as conn:
        cells = conn.execute(
            sa.text(
                "SELECT layer_a, layer_b, score, chance FROM affinity_cell WHERE run_id = :r ORDER BY layer_a, layer_b"
            ),
            {"r": run_id},
        ).all()
    if not cells:
        raise _missing_run(run_id)
    layers_a = sorted({c[0] for c in cells})
    layers_b = sorted({c[1] for c in cells})
    shape = (len(layers_a), len(layers_b))
    scores = np.array([c[2] for c in cells]).reshape(shape)
    chance = None if cells[0][3] is None else np.array([c[3] for c in cells], dtype=np.float64).reshape(shape)
    return scores, layers_a, layers_b, chance


def load_matrix(wh: Warehouse, run_id: int) -> tuple[np.ndarray, list[int], list[int]]:
    """(scores, layers_a, layers_b) of a stored affinity run; a missing id is an error."""
    scores, layers_a, layers_b, _ = _load_cells(wh, run_id)
    return scores, layers_a, layers_b


def _missing_run(run_id: int) -> NotFoundError:
    return NotFoundError(
        f"there is no affinity run {run_id}; `layerbase affinity-runs` (affinity_runs() in Python) lists those stored"
    )


__all__ = [
    "AffinityMatrix",
    "compute_affinity",
    "compute_study",
    "list_runs",
    "load_matrix",
    "load_run",
    "relative_depths",
]
