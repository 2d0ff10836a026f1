"""knn sets, affinity matrices and diagonal tests

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21

Materialized k-NN sets (long form, by dataset position), affinity runs and cells,
diagonal tests, and the plain-numeric views that BI tools read.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Plain-numeric views for BI tools: names and relative depths in place of ids.
VIEWS = [
    """
    CREATE VIEW bi_affinity_cell AS
    SELECT r.id AS affinity_run_id, ma.name AS model_a, mb.name AS model_b,
           da.name AS dataset_a, db.name AS dataset_b, r.k, r.n_prompts, r.study,
           c.layer_a, c.layer_b, c.depth_a, c.depth_b, c.score, c.chance,
           c.score / nullif(c.chance, 0) AS score_over_chance, c.log10_p_null
    FROM affinity_cell c
    JOIN affinity_run r ON r.id = c.run_id
    JOIN model ma ON ma.id = r.model_a_id
    JOIN model mb ON mb.id = r.model_b_id
    JOIN dataset da ON da.id = r.dataset_a_id
    JOIN dataset db ON db.id = r.dataset_b_id
    """,
    """
    CREATE VIEW bi_diagonal_test AS
    SELECT r.id AS affinity_run_id, ma.name AS model_a, mb.name AS model_b,
           da.name AS dataset_a, db.name AS dataset_b, r.k, r.n_prompts, r.study,
           r.n_layers_a, r.n_layers_b, r.chance,
           t.rows_model, t.n_on, t.n_off, t.mean_on, t.mean_off, t.mean_on - t.mean_off AS difference,
           t.t, t.p, t.log10_p, t.n_pairs, t.p_bonferroni, t.log10_p_bonferroni
    FROM diagonal_test t
    JOIN affinity_run r ON r.id = t.run_id
    JOIN model ma ON ma.id = r.model_a_id
    JOIN model mb ON mb.id = r.model_b_id
    JOIN dataset da ON da.id = r.dataset_a_id
    JOIN dataset db ON db.id = r.dataset_b_id
    """,
    """
    CREATE VIEW bi_max_similarity_path AS
    SELECT DISTINCT ON (c.affinity_run_id, c.layer_a)
           c.affinity_run_id, c.model_a, c.model_b, c.dataset_a, c.dataset_b, c.k,
           c.layer_a, c.depth_a, c.layer_b AS best_layer_b, c.depth_b AS best_depth_b, c.score
    FROM bi_affinity_cell c
    ORDER BY c.affinity_run_id, c.layer_a, c.score DESC, c.layer_b
    """,
]


def upgrade() -> None:
    op.create_table(
        "affinity_run",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("model_a_id", sa.Integer(), nullable=False),
        sa.Column("model_b_id", sa.Integer(), nullable=False),
        sa.Column("dataset_a_id", sa.Integer(), nullable=False),
        sa.Column("dataset_b_id", sa.Integer(), nullable=False),
        sa.Column("k", sa.SmallInteger(), nullable=False),
        sa.Column("include_layer0", sa.Boolean(), nullable=False),
        sa.Column("n_prompts", sa.Integer(), nullable=False),
        sa.Column("n_layers_a", sa.Integer(), nullable=False),
        sa.Column("n_layers_b", sa.Integer(), nullable=False),
        sa.Column("chance", sa.Double(), nullable=False, comment="null mean k/(|D|-1)"),
        sa.Column("null_sd", sa.Double(), nullable=False, comment="null standard deviation of M_k"),
        sa.Column("knn_engine", sa.Text(), nullable=False),
        sa.Column("study", sa.Text(), nullable=True),
        sa.Column("seconds", sa.Double(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_a_id"], ["dataset.id"], name=op.f("fk_affinity_run_dataset_a_id_dataset"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["dataset_b_id"], ["dataset.id"], name=op.f("fk_affinity_run_dataset_b_id_dataset"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_a_id"], ["model.id"], name=op.f("fk_affinity_run_model_a_id_model"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_b_id"], ["model.id"], name=op.f("fk_affinity_run_model_b_id_model"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_affinity_run")),
        sa.UniqueConstraint(
            "model_a_id",
            "model_b_id",
            "dataset_a_id",
            "dataset_b_id",
            "k",
            "include_layer0",
            name="uq_affinity_run_pair",
        ),
    )
    op.create_table(
        "knn_run",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.SmallInteger(), nullable=False),
        sa.Column(
            "k_max",
            sa.SmallInteger(),
            nullable=False,
            comment="neighbours stored per prompt; any k <= k_max can be read",
        ),
        sa.Column("metric", sa.Text(), server_default="cosine", nullable=False),
        sa.Column("engine", sa.Text(), nullable=False, comment="sql, hnsw or blas"),
        sa.Column(
            "strategy", sa.Text(), nullable=False, comment="how the engine answered: exact scan, hnsw on vector(d), …"
        ),
        sa.Column("ef_search", sa.Integer(), nullable=True),
        sa.Column(
            "recall",
            sa.Double(),
            nullable=True,
            comment="recall@min(10, k_max) against exact, on recall_queries prompts",
        ),
        sa.Column("recall_queries", sa.Integer(), nullable=True),
        sa.Column("n_prompts", sa.Integer(), nullable=False),
        sa.Column("seconds", sa.Double(), nullable=False),
        sa.Column("device", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("engine IN ('sql', 'hnsw', 'blas')", name=op.f("ck_knn_run_engine")),
        sa.CheckConstraint("metric = 'cosine'", name=op.f("ck_knn_run_metric")),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["dataset.id"], name=op.f("fk_knn_run_dataset_id_dataset"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["model_id"], ["model.id"], name=op.f("fk_knn_run_model_id_model"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_knn_run")),
        sa.UniqueConstraint(
            "model_id", "dataset_id", "layer", "engine", name=op.f("uq_knn_run_model_id_dataset_id_layer_engine")
        ),
    )
    op.create_table(
        "affinity_cell",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("layer_a", sa.SmallInteger(), nullable=False),
        sa.Column("layer_b", sa.SmallInteger(), nullable=False),
        sa.Column("depth_a", sa.Double(), nullable=False, comment="layer_a / n_layers_a"),
        sa.Column("depth_b", sa.Double(), nullable=False, comment="layer_b / n_layers_b"),
        sa.Column("score", sa.Double(), nullable=False, comment="mutual k-NN in [0, 1]"),
        sa.Column("chance", sa.Double(), nullable=False),
        sa.Column(
            "log10_p_null", sa.Double(), nullable=False, comment="log10 p of the score under random neighbour sets"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["affinity_run.id"], name=op.f("fk_affinity_cell_run_id_affinity_run"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "layer_a", "layer_b", name=op.f("pk_affinity_cell")),
    )
    op.create_table(
        "diagonal_test",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column(
            "rows_model", sa.Text(), nullable=False, comment="a or b: the deeper model, whose layers are the rows"
        ),
        sa.Column("n_on", sa.Integer(), nullable=False),
        sa.Column("n_off", sa.Integer(), nullable=False),
        sa.Column("mean_on", sa.Double(), nullable=False),
        sa.Column("mean_off", sa.Double(), nullable=False),
        sa.Column("t", sa.Double(), nullable=False),
        sa.Column("p", sa.Double(), nullable=False),
        sa.Column("log10_p", sa.Double(), nullable=False),
        sa.Column("n_pairs", sa.Integer(), nullable=False, comment="model pairs in the study (Bonferroni factor)"),
        sa.Column("p_bonferroni", sa.Double(), nullable=False),
        sa.Column("log10_p_bonferroni", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["affinity_run.id"], name=op.f("fk_diagonal_test_run_id_affinity_run"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_diagonal_test")),
    )
    op.create_table(
        "knn_neighbor",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column(
            "neighbors", postgresql.ARRAY(sa.Integer()), nullable=False, comment="dataset positions, nearest first"
        ),
        sa.Column("distances", postgresql.ARRAY(sa.REAL()), nullable=False, comment="cosine distances, ascending"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["knn_run.id"], name=op.f("fk_knn_neighbor_run_id_knn_run"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "position", name=op.f("pk_knn_neighbor")),
    )

    for statement in VIEWS:
        op.execute(statement)


def downgrade() -> None:
    for view in ("bi_max_similarity_path", "bi_diagonal_test", "bi_affinity_cell"):
        op.execute(f"DROP VIEW IF EXISTS {view}")
    op.drop_table("knn_neighbor")
    op.drop_table("diagonal_test")
    op.drop_table("affinity_cell")
    op.drop_table("knn_run")
    op.drop_table("affinity_run")
