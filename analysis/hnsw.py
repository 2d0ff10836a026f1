"""Per-(model, layer, dataset) partial HNSW indexes on the shared ``activation.vec`` column.

The column has no typmod (models of different widths share it), so each index is on an
expression that casts to the model's width. pgvector limits HNSW to 2000 dimensions for
``vector`` and 4000 for ``halfvec`` (pgvector >= 0.7); wider layers are answered by an
exact scan instead. The strategy used is recorded with each k-NN run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import sqlalchemy as sa
from psycopg import sql

from warehouse.engine import pgvector_version, version_tuple
from warehouse.models import RUNTIME_INDEX_PREFIX

log = logging.getLogger(__name__)

VECTOR_LIMIT = 2000
HALFVEC_LIMIT = 4000
# pgvector 0.6.0-0.8.1: parallel HNSW builds have a security bug (CVE-2026-3172, fixed in 0.8.2).
PARALLEL_BUILD_BUG = ((0, 6, 0), (0, 8, 1))
_warned_parallel = False


@dataclass(frozen=True)
class IndexPlan:
    """How one (model, layer, dataset) is indexed, or why it is not."""

    name: str
    expression: str | None  # e.g. vec::vector(576); None: no index possible (exact scan)
    opclass: str | None
    strategy: str

    @property
    def indexable(self) -> bool:
        return self.expression is not None


EF_SEARCH_LIMIT = 1000


def ef_search_for(k: int, asked: int | None, floor: int) -> int:
    """The HNSW ef_search for k results: as asked, but never below 2(k + 1) nor the floor.
    Callers cap it at, or refuse it above, pgvector's limit ``EF_SEARCH_LIMIT``."""
    return int(max(asked or 0, 2 * (k + 1), floor))


def index_name(model_id: int, layer: int, dataset_id: int) -> str:
    return f"{RUNTIME_INDEX_PREFIX}m{model_id}_l{layer}_d{dataset_id}"


def plan_index(model_id: int, layer: int, dataset_id: int, width: int, pgvector: str | None) -> IndexPlan:
    """The index a layer of this width can have on this pgvector version."""
    name = index_name(model_id, layer, dataset_id)
    if width <= VECTOR_LIMIT:
        return IndexPlan(name, f"vec::vector({width})", "vector_cosine_ops", f"hnsw on vector({width})")
    if version_tuple(pgvector) >= (0, 7, 0) and width <= HALFVEC_LIMIT:
        return IndexPlan(name, f"vec::halfvec({width})", "halfvec_cosine_ops",
                         f"hnsw on halfvec({width}), re-ranked exactly")
    return IndexPlan(name, None, None,
                     f"exact scan: width {width} exceeds pgvector {pgvector}'s HNSW limits")


def parallel_build_unsafe(pgvector: str | None) -> bool:
    """Whether this pgvector has the parallel-HNSW-build bug."""
    v = version_tuple(pgvector)
    return PARALLEL_BUILD_BUG[0] <= v <= PARALLEL_BUILD_BUG[1]


def index_exists(conn: sa.Connection, name: str) -> bool:
    return bool(conn.execute(sa.text("SELECT to_regclass(:n) IS NOT NULL"), {"n": name}).scalar())


def ensure_index(conn: sa.Connection, plan: IndexPlan, model_id: int, layer: int, dataset_id: int) -> bool:
    """Build the partial HNSW index if missing; return whether one was built."""
    global _warned_parallel
    if not plan.indexable or index_exists(conn, plan.name):
        return False
    version = pgvector_version(conn)
    if parallel_build_unsafe(version):
        conn.execute(sa.text("SET LOCAL max_parallel_maintenance_workers = 0"))
        if not _warned_parallel:
            log.warning(
                "pgvector %s has a bug in parallel HNSW index builds (CVE-2026-3172, fixed in 0.8.2): "
                "building HNSW indexes without parallel workers", version,
            )
            _warned_parallel = True
    conn.execute(sa.text("SET LOCAL maintenance_work_mem = '512MB'"))
    statement = sql.SQL(
        "CREATE INDEX IF NOT EXISTS {name} ON activation USING hnsw (({expr}) {opclass}) "
        "WITH (m = 16, ef_construction = 64) "
        "WHERE model_id = {model} AND layer = {layer} AND dataset_id = {dataset}"
    ).format(
        name=sql.Identifier(plan.name),
        expr=sql.SQL(plan.expression),  # built above from an int width, never from input
        opclass=sql.SQL(plan.opclass),
        model=sql.Literal(model_id),
        layer=sql.Literal(layer),
        dataset=sql.Literal(dataset_id),
    )
    raw = conn.connection.dbapi_connection
    raw.cursor().execute(statement)
    return True
