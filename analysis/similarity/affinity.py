"""Cross-model layer affinity: A[i, j] = M_k(f_A^(i), f_B^(j)) (Wolfram & Schein 2025),
computed in SQL from the materialized neighbour lists, stored with its statistics.

The overlap counts |N_k(x, f) ∩ N_k(x, g)| for every layer pair come from one join of the
unnested neighbour arrays on (position, neighbour position); positions make parallel
datasets (prompt i of D1 <-> prompt i of D2) intersect directly.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.orm import Session

from layerbase.analysis.knn.materialize import DERIVED_DATA_COMMIT, EXACT_ENGINES, lock_key, materialize
from layerbase.analysis.resolve import get_dataset, get_model, ingested_layers
from layerbase.analysis.similarity.stats import (
    DiagonalTest,
    diagonal_test,
    log10_p_null,
    max_similarity_path,
    null_model,
    relative_depths,
)
from layerbase.warehouse.copy import copy_columns, read_keyed_int_arrays
from layerbase.warehouse.engine import Warehouse, analyze, raw_connection
from layerbase.warehouse.errors import InputError, NotFoundError
from layerbase.warehouse.models import AffinityRun, KnnRun
from layerbase.warehouse.models import DiagonalTest as DiagonalTestRow
from layerbase.warehouse.parallel import default_workers, run_in_parallel

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

OVERLAP_ENGINES = ("sparse", "sql")
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
    """A stored affinity matrix with its test (rows = model A's layers)."""

    run_id: int
    model_a: str
    model_b: str
    dataset_a: str
    dataset_b: str
    k: int
    n_prompts: int
    layers_a: list[int]
    layers_b: list[int]
    scores: np.ndarray
    chance: float
    null_sd: float
    test: DiagonalTest | None
    seconds: float
    knn_engine: str
    n_layers_a: int
    n_layers_b: int

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
        return (
            f"<p><b>{html.escape(self.model_a)} × {html.escape(self.model_b)}</b> on "
            f"{html.escape(self.dataset_a)}: {len(self.layers_a)}×{len(self.layers_b)} layers, k = {self.k}, "
            f"|D| = {self.n_prompts}, chance {self.chance:.4f}; {test} (affinity run {self.run_id})</p>"
        )

    def summary(self) -> dict:
        t = self.test
        return {
            "run_id": self.run_id,
            "model_a": self.model_a,
            "model_b": self.model_b,
            "dataset_a": self.dataset_a,
            "dataset_b": self.dataset_b,
            "k": self.k,
            "n_prompts": self.n_prompts,
            "shape": list(self.scores.shape),
            "chance": self.chance,
            "max_score": float(self.scores.max()),
            "test": t.as_dict() if t else None,
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


def compute_affinity(
    wh: Warehouse,
    model_a: str,
    model_b: str,
    dataset_a: str,
    dataset_b: str | None = None,
    *,
    k: int = 10,
    include_layer0: bool = False,
    engine: str = "blas",
    study: str | None = None,
    n_pairs: int = 1,
    workers: int | None = None,
    overlap: str = "sparse",
    recompute: bool = False,
    any_study: bool = False,
    progress: bool = True,
) -> AffinityMatrix:
    """The affinity matrix ``A[i, j] = M_k(f_A^(i), f_B^(j))`` (docs/design.md §4) with its
    diagonal test: the current stored run when there is one (``CURRENT_RUN``), else computed
    (materializing missing k-NN sets first) and stored as a new run. Stored runs are never
    changed nor replaced; ``recompute`` adds a new run even when a current one exists.
    ``any_study``: a current run of another study (another Bonferroni count) is reused too.
    ``overlap``: where the shared neighbours of all layer pairs are counted, ``sparse`` (one
    scipy.sparse product, the default) or ``sql`` (one join in the database); the two give
    identical matrices."""
    if overlap not in OVERLAP_ENGINES:
        raise InputError(f"unknown overlap engine {overlap!r}; use one of {', '.join(OVERLAP_ENGINES)}")
    dataset_b = dataset_b or dataset_a
    pair = _resolve_pair(wh, model_a, model_b, dataset_a, dataset_b, include_layer0)
    if not 0 < k < pair.n_prompts:
        raise InputError(f"k = {k} needs 0 < k < the number of prompts ({pair.n_prompts}); lower -k")
    if k >= pair.n_prompts - 1:
        raise InputError(
            f"k = {k} on {pair.n_prompts} prompts: every prompt's {k} neighbours are all the others, so every "
            f"score is 1 and the test means nothing; lower -k to at most {pair.n_prompts - 2}"
        )
    key = (*pair.model_ids, *pair.dataset_ids, k, include_layer0)
    if not recompute:
        with wh.engine.connect() as conn:
            current = _current_run(conn, key, n_pairs, study, any_study)
        if current is not None:
            return load_run(wh, current)
    _ensure_knn_sets(wh, pair, (model_a, model_b), (dataset_a, dataset_b), k, engine, progress)
    started = time.perf_counter()
    with wh.engine.begin() as conn:
        conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(:key)"),
            {"key": lock_key("affinity", *pair.model_ids, *pair.dataset_ids, k)},
        )
        # Another process may have stored it while this one waited for the lock.
        current = None if recompute else _current_run(conn, key, n_pairs, study, any_study)
        if current is not None:
            return load_run(wh, current)
        conn.execute(sa.text(DERIVED_DATA_COMMIT))
        scores, engines = _scores(wh, conn, pair, k, engine, workers, overlap)
        # The diagonal test never includes the embedding layer (docs/design.md §4).
        block = scores[np.array(pair.layers_a) > 0][:, np.array(pair.layers_b) > 0]
        # Within one model on one dataset the diagonal is 1 by construction: no test.
        testable = block.size - min(block.shape) >= 2 and not pair.same_side
        test = diagonal_test(block, n_pairs) if testable else None
        elapsed = time.perf_counter() - started
        chance, null_sd = null_model(k, pair.n_prompts)
        run_id = _store_run(
            conn, pair, k, include_layer0, scores, test, n_pairs, (chance, null_sd), engines, overlap, study, elapsed
        )
    analyze(wh, "affinity_run", "affinity_cell", "diagonal_test")
    return AffinityMatrix(
        run_id,
        model_a,
        model_b,
        dataset_a,
        dataset_b,
        k,
        pair.n_prompts,
        pair.layers_a,
        pair.layers_b,
        scores,
        chance,
        null_sd,
        test,
        elapsed,
        engines,
        *pair.n_layers,
    )


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
    runs_a = _knn_runs(conn, pair.model_ids[0], pair.dataset_ids[0], pair.layers_a, k, engine)
    runs_b = _knn_runs(conn, pair.model_ids[1], pair.dataset_ids[1], pair.layers_b, k, engine)
    run_ids = list(runs_a.values()) + list(runs_b.values())
    engines = set(conn.execute(sa.select(KnnRun.engine).where(KnnRun.id.in_(run_ids))).scalars())
    if overlap == "sparse":
        counts = _sparse_overlap_counts(conn, runs_a, runs_b, k, pair.n_prompts)
    else:
        counts = _overlap_counts(wh, list(runs_a.values()), list(runs_b.values()), k, pair.n_prompts, workers)
    scores = np.zeros((len(pair.layers_a), len(pair.layers_b)))
    row = {layer: i for i, layer in enumerate(pair.layers_a)}
    col = {layer: j for j, layer in enumerate(pair.layers_b)}
    for (layer_a, layer_b), shared in counts.items():
        scores[row[layer_a], col[layer_b]] = shared / (k * pair.n_prompts)
    return scores, "+".join(sorted(engines))


def _store_run(
    conn: sa.Connection,
    pair: _Pair,
    k: int,
    include_layer0: bool,
    scores: np.ndarray,
    test: DiagonalTest | None,
    n_pairs: int,
    null: tuple[float, float],
    engines: str,
    overlap: str,
    study: str | None,
    seconds: float,
) -> int:
    """Store a new run of this pair and k: run, cells and test. Earlier runs stay as they are.
    ``null``: the null model's mean (chance) and standard deviation of M_k."""
    (model_a, model_b), (dataset_a, dataset_b) = pair.model_ids, pair.dataset_ids
    chance, null_sd = null
    run_id: int = conn.execute(
        sa.insert(AffinityRun)
        .values(
            model_a_id=model_a,
            model_b_id=model_b,
            dataset_a_id=dataset_a,
            dataset_b_id=dataset_b,
            k=k,
            include_layer0=include_layer0,
            n_prompts=pair.n_prompts,
            n_layers_a=pair.n_layers[0],
            n_layers_b=pair.n_layers[1],
            chance=chance,
            null_sd=null_sd,
            knn_engine=engines,
            overlap_engine=overlap,
            study=study,
            seconds=seconds,
        )
        .returning(AffinityRun.id)
    ).scalar_one()
    _store_cells(conn, run_id, scores, pair.layers_a, pair.layers_b, *pair.n_layers, k, pair.n_prompts, chance)
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


# Whether run ``r`` is the newest of its key (model A, model B, datasets, k, layer 0): the
# current run, as the BI views' ``is_current`` says too (migration 0008).
NEWEST = """NOT EXISTS (
    SELECT 1 FROM affinity_run newer
    WHERE newer.model_a_id = r.model_a_id AND newer.model_b_id = r.model_b_id
      AND newer.dataset_a_id = r.dataset_a_id AND newer.dataset_b_id = r.dataset_b_id
      AND newer.k = r.k AND newer.include_layer0 = r.include_layer0 AND newer.id > r.id
)"""
# The newest run of a key, unless a k-NN set of either side was computed after it (then it
# was made from other sets, and is not current); for a study, only when its diagonal test
# was corrected for the same number of pairs in a study of the same name.
CURRENT_RUN = f"""
SELECT r.id FROM affinity_run r
LEFT JOIN diagonal_test t ON t.run_id = r.id
WHERE r.model_a_id = :ma AND r.model_b_id = :mb AND r.dataset_a_id = :da AND r.dataset_b_id = :db
  AND r.k = :k AND r.include_layer0 = :l0
  AND (:any_study OR ((t.run_id IS NULL OR t.n_pairs = :n_pairs) AND r.study IS NOT DISTINCT FROM :study))
  AND NOT EXISTS (
      SELECT 1 FROM knn_run n
      WHERE ((n.model_id = :ma AND n.dataset_id = :da) OR (n.model_id = :mb AND n.dataset_id = :db))
        AND n.created_at > r.created_at
  )
  AND {NEWEST}
"""


def _current_run(conn: sa.Connection, key: tuple, n_pairs: int, study: str | None, any_study: bool) -> int | None:
    ma, mb, da, db, k, l0 = key
    values = {"ma": ma, "mb": mb, "da": da, "db": db, "k": k, "l0": l0}
    return conn.execute(
        sa.text(CURRENT_RUN), {**values, "n_pairs": n_pairs, "study": study, "any_study": any_study}
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


# The stored sets of several runs (layers) in one binary COPY, one row per run: its index in
# the list, the prompts' positions, and their first k neighbours as one [n, k] array. One
# statement per side rather than one per layer (each costs a few milliseconds), and a row per
# layer rather than per prompt (each COPY row costs Python a few microseconds).
NEIGHBOUR_SETS = """
SELECT array_position({runs}, run_id) - 1, array_agg(position), array_agg(neighbors[1:{k}])
FROM knn_neighbor WHERE run_id = ANY({runs}) GROUP BY run_id
"""


def _sparse_overlap_counts(
    conn: sa.Connection, runs_a: dict[int, int], runs_b: dict[int, int], k: int, n: int
) -> Counter[tuple[int, int]]:
    """Shared (prompt, neighbour) pairs per layer pair in one sparse product: each layer's
    sets become a row of an (L x n^2) 0/1 matrix, with a 1 at prompt x n + neighbour."""
    import scipy.sparse as sp

    def stack(runs: dict[int, int]) -> sp.csr_matrix:
        run_ids = sql.SQL("{}::int[]").format(sql.Literal(list(runs.values())))
        query = sql.SQL(NEIGHBOUR_SETS).format(runs=run_ids, k=sql.Literal(k))
        rows, cols = [], []
        for layer_index, (positions, sets) in read_keyed_int_arrays(raw_connection(conn).cursor(), query):
            found = sets >= 0  # -1 marks a neighbour an index could not find
            cells = positions.astype(np.int64)[:, None] * n + sets.astype(np.int64)
            cols.append(cells[found])
            rows.append(np.full(int(found.sum()), layer_index, dtype=np.int64))
        if not cols:
            return sp.csr_matrix((len(runs), n * n))
        flat = np.concatenate(cols)
        return sp.csr_matrix((np.ones(len(flat)), (np.concatenate(rows), flat)), shape=(len(runs), n * n))

    shared = (stack(runs_a) @ stack(runs_b).T).toarray()
    layers_a, layers_b = list(runs_a), list(runs_b)
    return Counter({(layers_a[i], layers_b[j]): int(round(shared[i, j])) for i, j in np.ndindex(*shared.shape)})


def _store_cells(
    conn: sa.Connection,
    run_id: int,
    scores: np.ndarray,
    layers_a: list[int],
    layers_b: list[int],
    n_layers_a: int,
    n_layers_b: int,
    k: int,
    n: int,
    chance: float,
) -> None:
    la = np.repeat(np.array(layers_a, dtype=np.int16), len(layers_b))
    lb = np.tile(np.array(layers_b, dtype=np.int16), len(layers_a))
    flat = scores.ravel()
    copy_columns(
        raw_connection(conn).cursor(),
        "affinity_cell",
        ("run_id", "layer_a", "layer_b", "depth_a", "depth_b", "score", "chance", "log10_p_null"),
        [
            ("int4", np.full(flat.size, run_id, dtype=np.int32)),
            ("int2", la),
            ("int2", lb),
            ("float8", la / n_layers_a),
            ("float8", lb / n_layers_b),
            ("float8", flat),
            ("float8", np.full(flat.size, chance)),
            ("float8", log10_p_null(flat, k, n)),
        ],
    )


def compute_study(
    wh: Warehouse,
    models: list[str],
    dataset: str,
    dataset_b: str | None = None,
    *,
    k: int = 10,
    include_layer0: bool = False,
    engine: str = "blas",
    study: str | None = None,
    overlap: str = "sparse",
    recompute: bool = False,
    progress: bool = True,
) -> list[AffinityMatrix]:
    """Affinity matrices for every pair of models, Bonferroni-corrected over the pairs: the
    current stored runs where there are, new runs for the rest (``compute_affinity``).

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
            k=k,
            include_layer0=include_layer0,
            engine=engine,
            study=study,
            overlap=overlap,
            n_pairs=len(pairs),
            recompute=recompute,
            progress=progress,
        )
        for a, b in pairs
    ]


RUNS_SQL = f"""
SELECT r.id AS run_id, ma.name AS model_a, mb.name AS model_b, da.name AS dataset_a, db.name AS dataset_b, r.k,
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
    """Every stored affinity run with its models, datasets, k and diagonal test."""
    with wh.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(RUNS_SQL + " ORDER BY r.id"))]


def load_run(wh: Warehouse, run_id: int) -> AffinityMatrix:
    """A stored affinity run by id, as computed: matrix, diagonal test and provenance."""
    with wh.engine.connect() as conn:
        run = conn.execute(sa.text(RUNS_SQL + " WHERE r.id = :id"), {"id": run_id}).mappings().first()
        if run is None:
            raise _missing_run(run_id)
        test_row = (
            conn.execute(sa.select(DiagonalTestRow.__table__).where(DiagonalTestRow.run_id == run["run_id"]))
            .mappings()
            .first()
        )
    scores, layers_a, layers_b = load_matrix(wh, run["run_id"])
    test = None
    if test_row is not None:
        stored = {
            f: test_row[f]
            for f in (
                "mean_on",
                "mean_off",
                "t",
                "p",
                "p_bonferroni",
                "log10_p",
                "log10_p_bonferroni",
                "undefined_reason",
            )
        }
        test = DiagonalTest(
            n_on=test_row["n_on"],
            n_off=test_row["n_off"],
            n_pairs=test_row["n_pairs"],
            transposed=test_row["rows_model"] == "b",
            **stored,
        )
    return AffinityMatrix(
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
    )


def load_matrix(wh: Warehouse, run_id: int) -> tuple[np.ndarray, list[int], list[int]]:
    """(scores, layers_a, layers_b) of a stored affinity run; a missing id is an error."""
    with wh.engine.connect() as conn:
        cells = conn.execute(
            sa.text("SELECT layer_a, layer_b, score FROM affinity_cell WHERE run_id = :r ORDER BY layer_a, layer_b"),
            {"r": run_id},
        ).all()
    if not cells:
        raise _missing_run(run_id)
    layers_a = sorted({c[0] for c in cells})
    layers_b = sorted({c[1] for c in cells})
    scores = np.array([c[2] for c in cells]).reshape(len(layers_a), len(layers_b))
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
