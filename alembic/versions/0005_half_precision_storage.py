"""half-precision activation storage (halfvec) where the server has it

A model's activations may be stored in half precision (``ingest --storage float16``):
``model.storage`` says which, and ``activation.vec_half`` (pgvector's ``halfvec``, 0.7
and later) holds them, with ``activation.vec`` NULL. On a server without ``halfvec`` the
column is not made, and every row keeps its float32 vector; a check says so in both cases.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22

Downgrading converts half-precision rows to float32 (exactly: every half value is a
float32 value) and drops the column.
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

STORAGE = "float32 (activation.vec) or float16 (activation.vec_half, halfvec)"


def _has_halfvec() -> bool:
    return bool(op.get_bind().execute(sa.text("SELECT to_regtype('halfvec') IS NOT NULL")).scalar())


def upgrade() -> None:
    op.add_column("model", sa.Column("storage", sa.Text(), server_default="float32", nullable=False, comment=STORAGE))
    op.create_check_constraint(op.f("ck_model_storage"), "model", "storage IN ('float32', 'float16')")
    op.alter_column("activation", "vec", existing_nullable=False, nullable=True)
    if _has_halfvec():
        op.execute("ALTER TABLE activation ADD COLUMN vec_half halfvec")
        op.create_check_constraint(op.f("ck_activation_one_vector"), "activation", "num_nonnulls(vec, vec_half) = 1")
    else:
        op.create_check_constraint(op.f("ck_activation_one_vector"), "activation", "vec IS NOT NULL")


def downgrade() -> None:
    op.drop_constraint(op.f("ck_activation_one_vector"), "activation", type_="check")
    if (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = 'activation' AND column_name = 'vec_half')"
            )
        )
        .scalar()
    ):
        op.execute("UPDATE activation SET vec = vec_half::vector, vec_half = NULL WHERE vec IS NULL")
        op.drop_column("activation", "vec_half")
    op.alter_column("activation", "vec", existing_nullable=True, nullable=False)
    op.drop_constraint(op.f("ck_model_storage"), "model", type_="check")
    op.drop_column("model", "storage")
