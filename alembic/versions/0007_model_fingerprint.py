"""a model's fingerprint: sha256 over the files it was loaded from

A model name was tied to a path, not to the weights: after the files at the path changed,
another ingest under the same name stored vectors of other weights. The fingerprint
(``ingest.fingerprint``) is stored with the model and checked whenever the model is loaded
again. Models stored before this revision have none; their next load records it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

COMMENT = "sha256 over the weight, config and tokenizer files loaded (NULL: stored before 0.2)"


def upgrade() -> None:
    op.add_column("model", sa.Column("fingerprint", sa.Text(), nullable=True, comment=COMMENT))


def downgrade() -> None:
    op.drop_column("model", "fingerprint")
