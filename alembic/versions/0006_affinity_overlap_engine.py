"""which engine counted an affinity matrix's shared neighbours

The overlap counts |N_k(x, f) ∩ N_k(x, g)| of every layer pair come from one SQL join over
the stored neighbour arrays (``sql``, the only way before this revision) or from one
scipy.sparse product over the same arrays read out with binary COPY (``sparse``). Both give
identical matrices; the run records which one made it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

COMMENT = "sql: one join of the unnested neighbour arrays; sparse: one scipy.sparse product of them"


def upgrade() -> None:
    op.add_column(
        "affinity_run",
        sa.Column("overlap_engine", sa.Text(), server_default="sql", nullable=False, comment=COMMENT),
    )
    op.create_check_constraint(
        op.f("ck_affinity_run_overlap_engine"), "affinity_run", "overlap_engine IN ('sql', 'sparse')"
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_affinity_run_overlap_engine"), "affinity_run", type_="check")
    op.drop_column("affinity_run", "overlap_engine")
