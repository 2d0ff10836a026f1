"""Per-(model, layer, dataset) partial vector indexes (HNSW or IVFFlat) on the shared
``activation.vec`` column (``vec_half`` for a model stored in half precision).

The column has no typmod (models of different widths share it), so each index is on an
expression that casts to the layer's width. pgvector indexes take at most 2000 dimensions
of ``vector``, and 4000 of ``halfvec`` (pgvector >= 0.7). A wider layer is indexed on its
leading dimensions (the subvector indexing of pgvector's documentation; before 0.7 there is
no ``subvector``, so the prefix is an array slice), and every candidate the index returns
is re-ranked by its exact distance on the full vector. The recall that costs is measured
and stored with each k-NN run.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import sqlalchemy as sa
from psycopg import sql

from layerbase.warehouse.embedded import machine_memory
from layerbase.warehouse.engine import Warehouse, pgvector_version, raw_connection, version_tuple
from layerbase.warehouse.errors import InputError
from layerbase.warehouse.storage import FLOAT16, FLOAT32, Storage

log = logging.getLogger(__name__)

METHODS = ("hnsw", "ivfflat")
VECTOR_LIMIT = 2000
HALFVEC_LIMIT = 4000
EF_SEARCH_LIMIT = 1000  # pgvector's largest hnsw.ef_search
# Build parameters: pgvector's defaults (an index made without options has these) and the
# ranges it accepts. HNSW's m and ef_construction trade build time for graph quality: at
# n = 10000, width 576, m 12 / ef_construction 40 built in 0.9 s instead of 1.5 s, and its
# searches needed a wider ef_search for the same recall (README, figure 2).
BUILD_DEFAULTS = {"hnsw": {"m": 16, "ef_construction": 64}, "ivfflat": {"lists": 100}}
BUILD_LIMITS = {"m": (2, 100), "ef_construction": (4, 1000), "lists": (1, 32768)}
BUILD_FLAGS = {"m": "--hnsw-m", "ef_construction": "--ef-construction", "lists": "--lists"}
# pgvector 0.6.0-0.8.1: parallel HNSW builds have a security bug (CVE-2026-3172, fixed in 0.8.2).
PARALLEL_BUILD_BUG = ((0, 6, 0), (0, 8, 1))
_warned_parallel = False
# The planner's cost model can rank a sequential scan with a top-N sort below the vector
# index (measured on pgvector 0.8.5: IVFFlat at 4 probes over 2000 rows of halfvec(2048)
# planned as a scan, 13 ms a query instead of 0.5 ms). A search tuned for the index must
# use it: with these settings the index scan is the only plan without a disabled node.
USE_INDEX = (sql.SQL("SET LOCAL enable_seqscan = off"), sql.SQL("SET LOCAL enable_sort = off"))


@dataclass(frozen=True)
class IndexPlan:
    """How one (model, layer, dataset) is indexed by one method."""

    name: str
    method: str  # hnsw or ivfflat
    cast: str  # the type the indexed expression has, e.g. vector(576)
    prefix: int | None  # index the first `prefix` dimensions only (a wide layer)
    strategy: str
    storage: Storage = FLOAT32  # how the layer is stored: the column indexed

    @property
    def column(self) -> sql.Composable:
        return sql.Identifier(self.storage.column)

    @property
    def opclass(self) -> str:
        return f"{self.cast.split('(')[0]}_cosine_ops"

    @property
    def reduced(self) -> bool:
        """Whether index distances differ from exact ones: a prefix, or half precision. Even
        for vectors stored in half precision: a cosine index holds them normalized, rounded
        to half precision again (measured: Gemma-3-270m's last-token activations, 10-NN
        distances 1e-4 apart, gave lookups recall@10 0.93 at every ef_search with k + 1
        candidates)."""
        return self.prefix is not None or self.cast.startswith("halfvec")

    def lookup_candidates(self, k: int) -> int:
        """Rows a lookup of k neighbours takes from the index before the exact re-rank: k + 1
        (self may be among them), 4x that from a prefix index (measured with IVFFlat at width
        2048 indexed on its first 2000 dimensions: 40 candidates gave recall@10 0.999, 11 gave
        0.85), and 2x from a half-precision index of every dimension, which differs at near
        ties only."""
        return (k + 1) * (4 if self.rough_order else 2 if self.reduced else 1)

    @property
    def rough_order(self) -> bool:
        """Whether the index orders neighbours only roughly: a prefix of the dimensions. Half
        precision on all of them only swaps near ties."""
        return self.prefix is not None

    @property
    def value_bytes(self) -> int:
        """Bytes of one indexed value: a varlena header and the elements of ``cast``."""
        kind, dims = self.cast.rstrip(")").split("(")
        return 8 + (2 if kind == "halfvec" else 4) * int(dims)

    def expression(self, vec: sql.Composable) -> sql.Composable:
        """The indexed expression of a vector expression (the index's own, or a query's)."""
        if self.prefix is None:
            return sql.SQL("{}::{}").format(vec, sql.SQL(self.cast))
        if self.cast.startswith("halfvec"):  # pgvector >= 0.7 has subvector
            return sql.SQL("subvector({}, 1, {})::{}").format(vec, sql.Literal(self.prefix), sql.SQL(self.cast))
        return sql.SQL("(({}::real[])[1:{}])::{}").format(vec, sql.Literal(self.prefix), sql.SQL(self.cast))

    def distance(self, column: sql.Composable, query: sql.Composable) -> sql.Composable:
        """The index-ordered distance of a stored vector column to a query vector."""
        return sql.SQL("{} <=> {}").format(self.expression(column), self.expression(query))


def ef_search_for(k: int, asked: int | None = None, floor: int = 0) -> int:
    """The HNSW ef_search for k results: as asked, but never below 2(k + 1) nor the floor.
    Callers cap it at, or refuse it above, pgvector's limit ``EF_SEARCH_LIMIT``."""
    return int(max(asked or 0, 2 * (k + 1), floor))


def build_options(
    method: str, n_rows: int, asked: Mapping[str, int | None] | None = None, kept: Mapping[str, int] | None = None
) -> dict[str, int]:
    """An index's build parameters: pgvector's m 16 and ef_construction 64 for HNSW,
    ``ivfflat_lists(n_rows)`` lists for IVFFlat, then those ``kept`` from an existing
    index, then what was asked, checked against what pgvector accepts."""
    given = {key: value for key, value in (asked or {}).items() if value is not None}
    for key in given:
        if key not in BUILD_DEFAULTS[method]:
            owner = next(m for m, keys in BUILD_DEFAULTS.items() if key in keys)
            raise InputError(f"{BUILD_FLAGS[key]} builds {owner} indexes; use it with --engine {owner}")
        low, high = BUILD_LIMITS[key]
        if not low <= given[key] <= high:
            raise InputError(f"{BUILD_FLAGS[key]} {given[key]} is outside pgvector's range {low}-{high}")
    options = dict(BUILD_DEFAULTS["hnsw"]) if method == "hnsw" else {"lists": ivfflat_lists(n_rows)}
    options.update(kept or {})
    options.update(given)
    if method == "hnsw" and options["ef_construction"] < 2 * options["m"]:

        def shown(key: str) -> str:  # say which value the user did not give
            carried = key in (kept or {}) and key not in given
            return f"{options[key]}, kept from the existing index" if carried else str(options[key])

        raise InputError(
            f"pgvector needs ef_construction ({shown('ef_construction')}) >= 2 x m ({shown('m')}); "
            "raise --ef-construction or lower --hnsw-m"
        )
    if method == "ivfflat" and options["lists"] > n_rows:
        raise InputError(f"--lists {options['lists']} is more than the {n_rows} rows to index; lower it")
    return options


def built_with(options: Mapping[str, int], asked: Mapping[str, int]) -> bool:
    """Whether an index with these build parameters has every one asked."""
    return all(options.get(key) == value for key, value in asked.items())


def ivfflat_lists(n: int) -> int:
    """IVFFlat lists for n vectors: sqrt(n), the usual choice for up to millions of rows."""
    return max(1, round(math.sqrt(n)))


def index_name(method: str, model_id: int, layer: int, dataset_id: int) -> str:
    return f"{method}_activation_m{model_id}_l{layer}_d{dataset_id}"


def plan_index(
    method: str,
    model_id: int,
    layer: int,
    dataset_id: int,
    width: int,
    pgvector: str | None,
    storage: Storage = FLOAT32,
) -> IndexPlan:
    """The index a layer of this width and storage gets on this pgvector version."""
    name = index_name(method, model_id, layer, dataset_id)
    if storage is FLOAT32 and width <= VECTOR_LIMIT:
        return IndexPlan(name, method, f"vector({width})", None, f"{method} on vector({width})")
    if storage is FLOAT16 or version_tuple(pgvector) >= (0, 7, 0):  # halfvec rows exist from pgvector 0.7 only
        rows = " of half-precision rows" if storage is FLOAT16 else ""
        if width <= HALFVEC_LIMIT:
            return IndexPlan(
                name,
                method,
                f"halfvec({width})",
                None,
                f"{method} on halfvec({width}){rows}, re-ranked exactly",
                storage,
            )
        return IndexPlan(
            name,
            method,
            f"halfvec({HALFVEC_LIMIT})",
            HALFVEC_LIMIT,
            f"{method} on the first {HALFVEC_LIMIT} of {width} dimensions (halfvec){rows}, re-ranked exactly",
            storage,
        )
    return IndexPlan(
        name,
        method,
        f"vector({VECTOR_LIMIT})",
        VECTOR_LIMIT,
        f"{method} on the first {VECTOR_LIMIT} of {width} dimensions (pgvector {pgvector} indexes at "
        f"most {VECTOR_LIMIT}), re-ranked exactly",
    )


def parallel_build_unsafe(pgvector: str | None) -> bool:
    """Whether this pgvector has the parallel-HNSW-build bug."""
    v = version_tuple(pgvector)
    return PARALLEL_BUILD_BUG[0] <= v <= PARALLEL_BUILD_BUG[1]


def index_options(conn: sa.Connection, name: str) -> dict[str, int] | None:
    """The build parameters of an existing index (pgvector's defaults where it was built
    without them), or None when there is no such index."""
    row = conn.execute(
        sa.text(
            "SELECT c.reloptions, a.amname FROM pg_class c JOIN pg_am a ON a.oid = c.relam "
            "WHERE c.oid = to_regclass(:n)"
        ),
        {"n": name},
    ).first()
    if row is None:
        return None
    stored = dict(option.split("=", 1) for option in row[0] or [])
    return {key: int(stored.get(key, default)) for key, default in BUILD_DEFAULTS.get(row[1], {}).items()}


# pgvector's in-memory HNSW graph, per element (hnsw.h): the element itself (its 10 heap
# TIDs and pointers), a neighbour array of 2m candidates of 16 bytes on layer 0 (m on the
# few higher layers an element reaches) and the indexed value (a varlena header and its
# elements). A graph that outgrows maintenance_work_mem is flushed and the rest of the
# build runs on disk: at n = 10000, width 576, 32 MB did not hold it (7.8 s against 3.6 s).
GRAPH_ELEMENT_BYTES = 200
GRAPH_CANDIDATE_BYTES = 16
GRAPH_HEADROOM = 1.5
# PostgreSQL gives each participant of a parallel index build at least 32 MB of
# maintenance_work_mem, and plans fewer workers when there is less; pgvector keeps 3 MB of
# a parallel build's memory for other objects and 1 MB as a margin.
PARTICIPANT_MEMORY = 32 << 20
GRAPH_RESERVED = 4 << 20
IVFFLAT_MEMORY = 512 << 20
SERVER_MEMORY_CAP = 1 << 30


def graph_memory(n_rows: int, value_bytes: int, m: int) -> int:
    """Bytes an HNSW build of n_rows needs to keep its graph in memory, with headroom."""
    per_element = GRAPH_ELEMENT_BYTES + 2 * m * GRAPH_CANDIDATE_BYTES + value_bytes
    return int(n_rows * per_element * GRAPH_HEADROOM) + GRAPH_RESERVED


def build_settings(
    conn: sa.Connection,
    method: str,
    *,
    n_rows: int = 0,
    value_bytes: int = 0,
    m: int = BUILD_DEFAULTS["hnsw"]["m"],
    embedded: bool = False,
) -> None:
    """Settings for an index build in this transaction: its memory and parallel workers.

    An HNSW build gets the memory its graph needs (``graph_memory``), and at least 32 MB per
    participant. More is slower: a parallel build sets up shared memory of that size (at
    n = 10000, width 576, pgvector 0.8.5 on 2 cores, one build took 3.2 s with 128 MB and
    3.6 s with 512 MB, and the whole k-NN run 4.65x the in-memory reference with 1 GB
    against 3.53x with 512 MB). The memory is capped at a quarter of the machine on the
    ``embedded`` server, and elsewhere at the server's own setting or 1 GB, whichever is
    more (a graph that does not fit is finished on disk).

    Workers: the embedded server shares this machine's cores, and the leader builds too, so
    it gets cores - 1 workers, every core busy without a process more than there are cores
    (measured on 2 cores: 3.6 s with one worker, 4.3 s with two). Another server keeps its
    max_parallel_maintenance_workers. On a pgvector with the parallel-build bug, no workers
    (said once per process)."""
    global _warned_parallel
    if method != "hnsw":
        conn.execute(sa.text(f"SET LOCAL maintenance_work_mem = '{IVFFLAT_MEMORY >> 20}MB'"))
        return
    version = pgvector_version(conn)
    if parallel_build_unsafe(version):
        workers = 0
        if not _warned_parallel:
            log.warning(
                "pgvector %s has a bug in parallel HNSW index builds (CVE-2026-3172, fixed in 0.8.2): "
                "building HNSW indexes without parallel workers",
                version,
            )
            _warned_parallel = True
    elif embedded:
        workers = max(0, (os.cpu_count() or 1) - 1)
    else:
        workers = int(conn.execute(sa.text("SHOW max_parallel_maintenance_workers")).scalar_one())
    if embedded:
        cap = machine_memory() // 4
    else:
        setting = conn.execute(sa.text("SELECT pg_size_bytes(current_setting('maintenance_work_mem'))")).scalar_one()
        cap = max(int(setting), SERVER_MEMORY_CAP)
    memory = min(cap, max(graph_memory(n_rows, value_bytes, m), PARTICIPANT_MEMORY * (workers + 1)))
    conn.execute(sa.text(f"SET LOCAL max_parallel_maintenance_workers = {int(workers)}"))
    conn.execute(sa.text(f"SET LOCAL maintenance_work_mem = '{-(-memory >> 20)}MB'"))


@dataclass(frozen=True)
class IndexState:
    """An index as ``ensure_index`` left it."""

    built: bool  # built by this call
    options: dict[str, int]  # its build parameters


def ensure_index(
    wh: Warehouse,
    plan: IndexPlan,
    model_id: int,
    layer: int,
    dataset_id: int,
    n_rows: int,
    asked: Mapping[str, int | None] | None = None,
) -> IndexState:
    """The layer's partial index of ``plan.method``: an existing one is kept when it has the
    build parameters asked (any, when none are asked), else it is built (``build_options``),
    replacing the other method's index, or one with other parameters (whose parameters not
    asked carry over).

    Drops commit before the build starts: a transaction that drops an index locks the whole
    table (reads included) until it ends, and a build can take minutes.
    """
    given: dict[str, int] = {}
    for key, value in (asked or {}).items():
        if value is not None:
            given[key] = value
    with wh.engine.connect() as conn:
        existing = index_options(conn, plan.name)
    if existing is not None and built_with(existing, given):
        return IndexState(False, existing)
    wanted = build_options(plan.method, n_rows, given, kept=existing)
    # Both methods index the same expression under the same predicate, so the planner could
    # answer a query tuned for one method with the other's index (measured: recall 0.55 when
    # an HNSW-tuned search ran on an IVFFlat index at its default probes). One method's index
    # per (model, layer, dataset), then: building one drops the other.
    stale = [index_name(method, model_id, layer, dataset_id) for method in METHODS if method != plan.method]
    if existing is not None:
        stale.append(plan.name)
    with wh.engine.begin() as conn:
        for name in stale:
            conn.execute(sa.text(f'DROP INDEX IF EXISTS "{name}"'))
    with wh.engine.begin() as conn:
        build_settings(
            conn,
            plan.method,
            n_rows=n_rows,
            value_bytes=plan.value_bytes,
            m=wanted.get("m", BUILD_DEFAULTS["hnsw"]["m"]),
            embedded=wh.embedded,
        )
        statement = sql.SQL(
            "CREATE INDEX IF NOT EXISTS {name} ON activation USING {method} (({expr}) {opclass}) WITH ({options}) "
            "WHERE model_id = {model} AND layer = {layer} AND dataset_id = {dataset}"
        ).format(
            name=sql.Identifier(plan.name),
            method=sql.SQL(plan.method),  # one of METHODS, never from input
            expr=plan.expression(plan.column),
            opclass=sql.SQL(plan.opclass),
            options=sql.SQL(", ").join(
                sql.SQL("{} = {}").format(sql.SQL(key), sql.Literal(value)) for key, value in wanted.items()
            ),  # keys from BUILD_DEFAULTS
            model=sql.Literal(model_id),
            layer=sql.Literal(layer),
            dataset=sql.Literal(dataset_id),
        )
        raw_connection(conn).cursor().execute(statement)
        # IF NOT EXISTS: a concurrent run may have built it first, with its own parameters.
        return IndexState(True, index_options(conn, plan.name) or wanted)
