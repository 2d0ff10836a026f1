"""imported steering vectors are labelled as such

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
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

IMPORTED = "positive->>'source' LIKE 'imported from %'"


def _relabel(method: str, where: str) -> None:
    op.execute("ALTER TABLE steering_vector DISABLE TRIGGER steering_vector_immutable")
    op.execute(f"UPDATE steering_vector SET method = '{method}' WHERE {where}")
    op.execute("ALTER TABLE steering_vector ENABLE TRIGGER steering_vector_immutable")


def upgrade() -> None:
    op.drop_constraint(op.f('ck_steering_vector_method'), 'steering_vector', type_='check')
    op.create_check_constraint(op.f('ck_steering_vector_method'), 'steering_vector',
                               "method IN ('mean-difference', 'emb2emb', 'imported')")
    op.alter_column('steering_vector', 'method', existing_type=sa.Text(), existing_nullable=False, comment='mean-difference, emb2emb or imported',
                    existing_comment='mean-difference or emb2emb')
    _relabel('imported', f"method = 'mean-difference' AND {IMPORTED}")


def downgrade() -> None:
    _relabel('mean-difference', "method = 'imported'")
    op.drop_constraint(op.f('ck_steering_vector_method'), 'steering_vector', type_='check')
    op.create_check_constraint(op.f('ck_steering_vector_method'), 'steering_vector',
                               "method IN ('mean-difference', 'emb2emb')")
    op.alter_column('steering_vector', 'method', existing_type=sa.Text(), existing_nullable=False, comment='mean-difference or emb2emb',
                    existing_comment='mean-difference, emb2emb or imported')
