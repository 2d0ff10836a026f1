"""the ivfflat k-NN engine with recall-tuned search; imported steering vectors labelled as such

k-NN runs may come from the new ``ivfflat`` engine, and an indexed engine's search
settings (ef_search, or lists and probes; candidates re-ranked; workers) and the recall of
each setting it tried are kept in ``knn_run.search``.

Activation rows up to 8160 bytes (widths up to about 2030) now stay in the table instead
of moving their vector out of line (TOAST starts at 2032 bytes by default, so a 576-wide
vector of 2308 bytes went out of line): every index scan and exact re-rank then reads the
vector from the row itself (measured: all-prompt IVFFlat k-NN 20 % faster at width 576).
Rows written before this revision keep their storage until rewritten.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22

``steer import`` stored its vectors with method 'mean-difference'. They now get their own
method, 'imported', and the rows stored before this revision (recognisable by their
'imported from FILE' source) are relabelled. Steering vectors are immutable (a trigger
refuses UPDATE), so the trigger is paused for this one relabelling.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SEARCH = (
    "an indexed engine's search settings (ef_search or lists and probes, candidates re-ranked, workers) "
    "and the recall of each setting tried"
)
IMPORTED = "positive->>'source' LIKE 'imported from %'"


def _relabel(method: str, where: str) -> None:
    op.execute("ALTER TABLE steering_vector DISABLE TRIGGER steering_vector_immutable")
    op.execute(f"UPDATE steering_vector SET method = '{method}' WHERE {where}")
    op.execute("ALTER TABLE steering_vector ENABLE TRIGGER steering_vector_immutable")


def upgrade() -> None:
    op.execute("ALTER TABLE activation SET (toast_tuple_target = 8160)")
    op.drop_constraint(op.f("ck_knn_run_engine"), "knn_run", type_="check")
    op.create_check_constraint(op.f("ck_knn_run_engine"), "knn_run", "engine IN ('sql', 'hnsw', 'blas', 'ivfflat')")
    op.alter_column(
        "knn_run",
        "engine",
        existing_type=sa.Text(),
        existing_nullable=False,
        comment="blas, sql, hnsw or ivfflat",
        existing_comment="sql, hnsw or blas",
    )
    op.add_column(
        "knn_run", sa.Column("search", postgresql.JSONB(astext_type=sa.Text()), nullable=True, comment=SEARCH)
    )
    op.drop_constraint(op.f("ck_steering_vector_method"), "steering_vector", type_="check")
    op.create_check_constraint(
        op.f("ck_steering_vector_method"), "steering_vector", "method IN ('mean-difference', 'emb2emb', 'imported')"
    )
    op.alter_column(
        "steering_vector",
        "method",
        existing_type=sa.Text(),
        existing_nullable=False,
        comment="mean-difference, emb2emb or imported",
        existing_comment="mean-difference or emb2emb",
    )
    _relabel("imported", f"method = 'mean-difference' AND {IMPORTED}")


def downgrade() -> None:
    op.execute("ALTER TABLE activation RESET (toast_tuple_target)")
    op.drop_column("knn_run", "search")
    op.execute("DELETE FROM knn_run WHERE engine = 'ivfflat'")
    op.drop_constraint(op.f("ck_knn_run_engine"), "knn_run", type_="check")
    op.create_check_constraint(op.f("ck_knn_run_engine"), "knn_run", "engine IN ('sql', 'hnsw', 'blas')")
    op.alter_column(
        "knn_run",
        "engine",
        existing_type=sa.Text(),
        existing_nullable=False,
        comment="sql, hnsw or blas",
        existing_comment="blas, sql, hnsw or ivfflat",
    )
    _relabel("mean-difference", "method = 'imported'")
    op.drop_constraint(op.f("ck_steering_vector_method"), "steering_vector", type_="check")
    op.create_check_constraint(
        op.f("ck_steering_vector_method"), "steering_vector", "method IN ('mean-difference', 'emb2emb')"
    )
    op.alter_column(
        "steering_vector",
        "method",
        existing_type=sa.Text(),
        existing_nullable=False,
        comment="mean-difference or emb2emb",
        existing_comment="mean-difference, emb2emb or imported",
    )
