"""each k-NN run's sets also as two rank-major arrays, for reading whole layers; the numpy
overlap engine

``knn_array`` holds, per k-NN run, the neighbour positions (int4) and cosine distances
(float4) of every prompt, big-endian, rank by rank (models.KnnArray), stored uncompressed so
that the first k ranks can be read alone. ``knn_neighbor`` stays as it is: one row per
prompt, for SQL and lookups. Existing runs are packed from their rows here, run by run, in
Python (plain reads and inserts, which also work on a Citus cluster, where the new table
stays on the coordinator until `layerbase db distribute` runs again).

Mutual k-NN's shared neighbours are now counted from those arrays by Layerbase itself
(``affinity_run.overlap_engine = 'numpy'``); runs that one scipy.sparse product counted keep
'sparse'.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from __future__ import annotations

import numpy as np
import sqlalchemy as sa

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

COMMENTS = {
    "neighbors": "n_prompts x k_max int4 (big-endian) dataset positions, rank-major",
    "distances": "n_prompts x k_max float4 (big-endian) cosine distances, rank-major",
}
RUNS = "SELECT id, n_prompts, k_max FROM knn_run ORDER BY id"
ROWS = "SELECT position, neighbors, distances FROM knn_neighbor WHERE run_id = :run"
INSERT = "INSERT INTO knn_array (run_id, neighbors, distances) VALUES (:run, :neighbors, :distances)"
OVERLAP_COMMENT = (
    "sql: one join of the unnested neighbour arrays; numpy: counted in Layerbase from the stored arrays; "
    "sparse: one scipy.sparse product of them (runs made before migration 0010)"
)
OLD_OVERLAP_COMMENT = "sql: one join of the unnested neighbour arrays; sparse: one scipy.sparse product of them"


def _overlap_engines(values: str, comment: str) -> None:
    op.drop_constraint(op.f("ck_affinity_run_overlap_engine"), "affinity_run", type_="check")
    op.create_check_constraint(op.f("ck_affinity_run_overlap_engine"), "affinity_run", f"overlap_engine IN ({values})")
    op.alter_column("affinity_run", "overlap_engine", existing_type=sa.Text(), comment=comment)


def upgrade() -> None:
    _overlap_engines("'sql', 'numpy', 'sparse'", OVERLAP_COMMENT)
    op.create_table(
        "knn_array",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("neighbors", sa.LargeBinary(), nullable=False, comment=COMMENTS["neighbors"]),
        sa.Column("distances", sa.LargeBinary(), nullable=False, comment=COMMENTS["distances"]),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_knn_array")),
    )
    # Uncompressed and out of line: substring() then reads only the bytes of the first k ranks.
    # Set before the foreign key: on a distributed warehouse, the key to a reference table
    # makes this a Citus local table, whose storage Citus does not let ALTER TABLE change.
    op.execute("ALTER TABLE knn_array ALTER COLUMN neighbors SET STORAGE EXTERNAL")
    op.execute("ALTER TABLE knn_array ALTER COLUMN distances SET STORAGE EXTERNAL")
    op.create_foreign_key(
        op.f("fk_knn_array_run_id_knn_run"), "knn_array", "knn_run", ["run_id"], ["id"], ondelete="CASCADE"
    )
    # Citus makes that Citus local table anew, without the column comments: set them again.
    for column, comment in COMMENTS.items():
        op.alter_column("knn_array", column, existing_type=sa.LargeBinary(), comment=comment)
    conn = op.get_bind()
    for run, n, k_max in conn.execute(sa.text(RUNS)).all():
        neighbors = np.full((k_max, n), -1, dtype=">i4")
        distances = np.full((k_max, n), np.inf, dtype=">f4")
        for position, row_neighbors, row_distances in conn.execute(sa.text(ROWS), {"run": run}):
            neighbors[: len(row_neighbors), position] = row_neighbors
            distances[: len(row_distances), position] = row_distances
        conn.execute(sa.text(INSERT), {"run": run, "neighbors": neighbors.tobytes(), "distances": distances.tobytes()})


def downgrade() -> None:
    op.drop_table("knn_array")
    # Runs counted by Layerbase have the counts a scipy.sparse product gives.
    op.execute("UPDATE affinity_run SET overlap_engine = 'sparse' WHERE overlap_engine = 'numpy'")
    _overlap_engines("'sql', 'sparse'", OLD_OVERLAP_COMMENT)
