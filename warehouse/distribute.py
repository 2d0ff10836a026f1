"""Scale-out on Citus: the hot tables distributed, the small ones reference tables
(docs/scale-out.md).

* ``activation`` by ``model_id``, with ``prompt_encoding`` and ``token_embedding``
  co-located: a k-NN pass over one (model, layer), exact or through its partial HNSW index,
  reads one shard on one worker.
* ``knn_neighbor`` by ``position`` (the prompt): mutual k-NN joins two models' neighbour lists
  prompt by prompt, so the join stays within each shard and fans out over all workers.
* ``knn_array`` by ``run_id``: a layer's packed sets (up to megabytes a run), read whole.
* Every other table is a reference table (a copy on every node): small, joined from every
  shard, with its foreign keys kept (Citus allows them from distributed to reference tables
  and among reference tables).
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from layerbase.warehouse.engine import Warehouse, raw_connection, translate_errors
from layerbase.warehouse.errors import InputError
from layerbase.warehouse.models import Base

# (table, distribution column, co-located with)
DISTRIBUTED = (
    ("activation", "model_id", None),
    ("prompt_encoding", "model_id", "activation"),
    ("token_embedding", "model_id", "activation"),
    ("knn_neighbor", "position", None),
    ("knn_array", "run_id", None),
)
# Kept on the coordinator as a plain table: Alembic's bookkeeping.
LOCAL = ("alembic_version",)

CITUS_VERSION = "SELECT extversion FROM pg_extension WHERE extname = 'citus'"
PLACEMENTS = """
SELECT p.logicalrelid::regclass::text AS name, p.partmethod, p.repmodel,
       column_to_column_name(p.logicalrelid, p.partkey) AS column,
       (SELECT count(*) FROM pg_dist_shard s WHERE s.logicalrelid = p.logicalrelid) AS shards
FROM pg_dist_partition p ORDER BY 1
"""


def _kind(partmethod: str, repmodel: str) -> str:
    """A table's layout in Citus's metadata: hash-distributed, a reference table (replicated
    with two-phase commit), or a local table Citus added to its metadata on the coordinator
    (a table created after distribution with a foreign key to a reference table: a migration's
    new table), which ``distribute`` still has to lay out."""
    return "distributed" if partmethod == "h" else "reference" if repmodel == "t" else "local"


@dataclass(frozen=True)
class Placement:
    """How a table is laid out: ``distributed`` (by ``column``, in ``shards`` shards),
    ``reference`` or ``local`` (``_kind``); ``changed`` when this call made it so."""

    table: str
    kind: str
    column: str | None
    shards: int
    changed: bool

    def as_dict(self) -> dict[str, object]:
        return {"table": self.table, "kind": self.kind, "column": self.column, "shards": self.shards}


def citus_version(conn: sa.Connection) -> str | None:
    """The Citus extension's version in this database, or None without it."""
    return conn.execute(sa.text(CITUS_VERSION)).scalar()


def distribute(wh: Warehouse, *, shard_count: int | None = None) -> list[Placement]:
    """Make the hot tables distributed and the rest reference tables; tables already laid
    out are left as they are, so a second call changes nothing. One transaction: a failure
    leaves the warehouse as it was."""
    with translate_errors(wh), wh.engine.begin() as conn:
        version = citus_version(conn)
        if version is None:
            raise InputError(
                f"{wh.display_url} has no Citus extension, so nothing can be distributed; run Layerbase against "
                "a Citus coordinator (docker compose --profile citus, docs/scale-out.md) where CREATE EXTENSION "
                "citus has been run"
            )
        workers = conn.execute(sa.text("SELECT count(*) FROM citus_get_active_worker_nodes()")).scalar_one()
        if not workers:
            raise InputError(
                "the Citus coordinator has no active workers; register them first "
                "(SELECT citus_add_node('host', port) on the coordinator)"
            )
        if shard_count is not None:
            if not 1 <= shard_count <= 64_000:
                raise InputError(f"--shard-count must be between 1 and 64000 (got {shard_count})")
            conn.execute(sa.text("SELECT set_config('citus.shard_count', :n, true)"), {"n": str(shard_count)})
        # The two immutability triggers (UPDATE refused on steering vectors and Emb2Emb maps)
        # only raise; Citus runs them on the reference tables' placements.
        conn.execute(sa.text("SET LOCAL citus.enable_unsafe_triggers TO on"))
        # Local tables in Citus's metadata are laid out like plain ones (Citus converts them).
        done = {
            row.name: row for row in conn.execute(sa.text(PLACEMENTS)) if _kind(row.partmethod, row.repmodel) != "local"
        }
        distributed = {table: (column, colocate) for table, column, colocate in DISTRIBUTED}
        changed = set()
        # Reference tables first, in foreign-key order; then the distributed ones, whose
        # foreign keys point at reference tables.
        for name in (t.name for t in Base.metadata.sorted_tables):
            if name in distributed or name in LOCAL or name in done:
                continue
            conn.execute(sa.text("SELECT create_reference_table(:t)"), {"t": name})
            changed.add(name)
        for name, (column, colocate) in distributed.items():
            if name in done:
                if done[name].partmethod != "h" or done[name].column != column:
                    raise InputError(
                        f"{name} is already distributed, but not by {column}; undistribute it "
                        f"(SELECT undistribute_table('{name}')) and run `layerbase db distribute` again"
                    )
                continue
            conn.execute(
                sa.text("SELECT create_distributed_table(:t, :c, colocate_with => :w)"),
                {"t": name, "c": column, "w": colocate or "default"},
            )
            changed.add(name)
        _restore_comments(conn, changed)
        return _placements(conn, changed)


def _restore_comments(conn: sa.Connection, tables: set[str]) -> None:
    """Citus recreates a table it distributes without its column comments; put the schema's
    back (they document the columns, and `alembic check` compares them)."""
    from psycopg import sql

    cur = raw_connection(conn).cursor()
    for table in Base.metadata.sorted_tables:
        if table.name not in tables:
            continue
        for column in table.columns:
            if column.comment:
                cur.execute(
                    sql.SQL("COMMENT ON COLUMN {}.{} IS {}").format(
                        sql.Identifier(table.name), sql.Identifier(column.name), sql.Literal(column.comment)
                    )
                )


def _placements(conn: sa.Connection, changed: set[str]) -> list[Placement]:
    return [
        Placement(r.name, _kind(r.partmethod, r.repmodel), r.column, int(r.shards), r.name in changed)
        for r in conn.execute(sa.text(PLACEMENTS))
    ]
