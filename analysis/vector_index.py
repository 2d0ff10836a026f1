"""Per-(model, layer, dataset) partial vector indexes (HNSW or IVFFlat) on the shared
``activation.vec`` column.

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
from dataclasses import dataclass

import sqlalchemy as sa
from psycopg import sql

from warehouse.engine import pgvector_version, raw_connection, version_tuple
from warehouse.models import RUNTIME_INDEX_PREFIXES

log = logging.getLogger(__name__)

METHODS = ("hnsw", "ivfflat")
VECTOR_LIMIT = 2000
HALFVEC_LIMIT = 4000
EF_SEARCH_LIMIT = 1000  # pgvector's largest hnsw.ef_search
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

    @property
    def opclass(self) -> str:
        return f"{self.cast.split('(')[0]}_cosine_ops"

    @property
    def reduced(self) -> bool:
        """Whether index distances differ from exact ones (a prefix, or half precision)."""
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


def ivfflat_lists(n: int) -> int:
    """IVFFlat lists for n vectors: sqrt(n), the usual choice for up to millions of rows."""
    return max(1, round(math.sqrt(n)))


def index_name(method: str, model_id: int, layer: int, dataset_id: int) -> str:
    return f"{method}_activation_m{model_id}_l{layer}_d{dataset_id}"


def plan_index(method: str, model_id: int, layer: int, dataset_id: int, width: int, pgvector: str | None) -> IndexPlan:
    """The index a layer of this width gets on this pgvector version."""
    name = index_name(method, model_id, layer, dataset_id)
    if width <= VECTOR_LIMIT:
        return IndexPlan(name, method, f"vector({width})", None, f"{method} on vector({width})")
    if version_tuple(pgvector) >= (0, 7, 0):
        if width <= HALFVEC_LIMIT:
            return IndexPlan(name, method, f"halfvec({width})", None,
                             f"{method} on halfvec({width}), re-ranked exactly")
        return IndexPlan(name, method, f"halfvec({HALFVEC_LIMIT})", HALFVEC_LIMIT,
                         f"{method} on the first {HALFVEC_LIMIT} of {width} dimensions (halfvec), re-ranked exactly")
    return IndexPlan(name, method, f"vector({VECTOR_LIMIT})", VECTOR_LIMIT,
                     f"{method} on the first {VECTOR_LIMIT} of {width} dimensions (pgvector {pgvector} indexes at "
                     f"most {VECTOR_LIMIT}), re-ranked exactly")


def parallel_build_unsafe(pgvector: str | None) -> bool:
    """Whether this pgvector has the parallel-HNSW-build bug."""
    v = version_tuple(pgvector)
    return PARALLEL_BUILD_BUG[0] <= v <= PARALLEL_BUILD_BUG[1]


def index_exists(conn: sa.Connection, name: str) -> bool:
    return bool(conn.execute(sa.text("SELECT to_regclass(:n) IS NOT NULL"), {"n": name}).scalar())


def ensure_index(conn: sa.Connection, plan: IndexPlan, model_id: int, layer: int, dataset_id: int,
                 n_rows: int | None = None) -> bool:
    """Build the partial index if missing (dropping the other method's); return whether one was built.

    IVFFlat needs the row count for its lists (``ivfflat_lists``); HNSW ignores it.
    """
    global _warned_parallel
    if index_exists(conn, plan.name):
        return False
    # Both methods index the same expression under the same predicate, so the planner could
    # answer a query tuned for one method with the other's index (measured: recall 0.55 when
    # an HNSW-tuned search ran on an IVFFlat index at its default probes). One method's index
    # per (model, layer, dataset), then: building one drops the other.
    for other in METHODS:
        if other != plan.method:
            conn.execute(sa.text(f'DROP INDEX IF EXISTS "{index_name(other, model_id, layer, dataset_id)}"'))
    if plan.method == "hnsw":
        version = pgvector_version(conn)
        if parallel_build_unsafe(version):
            conn.execute(sa.text("SET LOCAL max_parallel_maintenance_workers = 0"))
            if not _warned_parallel:
                log.warning(
                    "pgvector %s has a bug in parallel HNSW index builds (CVE-2026-3172, fixed in 0.8.2): "
                    "building HNSW indexes without parallel workers", version,
                )
                _warned_parallel = True
        options = sql.SQL("m = 16, ef_construction = 64")
    else:
        if n_rows is None:
            raise ValueError("an IVFFlat index needs the row count for its lists")
        options = sql.SQL("lists = {}").format(sql.Literal(ivfflat_lists(n_rows)))
    conn.execute(sa.text("SET LOCAL maintenance_work_mem = '512MB'"))
    statement = sql.SQL(
        "CREATE INDEX IF NOT EXISTS {name} ON activation USING {method} (({expr}) {opclass}) WITH ({options}) "
        "WHERE model_id = {model} AND layer = {layer} AND dataset_id = {dataset}"
    ).format(
        name=sql.Identifier(plan.name),
        method=sql.SQL(plan.method),  # one of METHODS, never from input
        expr=plan.expression(sql.Identifier("vec")),
        opclass=sql.SQL(plan.opclass),
        options=options,
        model=sql.Literal(model_id),
        layer=sql.Literal(layer),
        dataset=sql.Literal(dataset_id),
    )
    raw_connection(conn).cursor().execute(statement)
    return True
