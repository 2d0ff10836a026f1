"""token geometry, emb2emb maps and steering

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21

Token geometry runs (global and local), Emb2Emb maps, steering vectors and their
evaluations. Maps and steering vectors are immutable: a trigger refuses UPDATE, so a
stored vector always is what its provenance says (a changed vector is a new row).
The ``special`` flag on token embeddings lets matching leave special tokens out.
"""

from __future__ import annotations

import pgvector.sqlalchemy
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


IMMUTABLE = ("emb2emb_map", "steering_vector")

FUNCTION = """
CREATE FUNCTION layerbase_refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are immutable: store a new row instead of changing %', TG_TABLE_NAME, OLD.id
        USING ERRCODE = 'restrict_violation';
END $$
"""

VIEWS = [
    """
    CREATE VIEW bi_steering_eval AS
    SELECT e.id AS steering_eval_id, v.name AS vector, m.name AS model, v.layer, v.method,
           e.baseline_logodds, p.control, p.replicate, p.coefficient,
           p.shift_logodds, p.sd_logodds, p.shift_positive, p.shift_negative, p.n_prompts
    FROM steering_eval_point p
    JOIN steering_eval e ON e.id = p.eval_id
    JOIN steering_vector v ON v.id = e.vector_id
    JOIN model m ON m.id = v.model_id
    """,
    """
    CREATE VIEW bi_geometry AS
    SELECT 'global' AS kind, g.id AS run_id, ma.name AS model_a, mb.name AS model_b, g.matrix_a, g.matrix_b,
           g.n_tokens, g.pearson, NULL::double precision AS id_pearson, NULL::double precision AS err_transfer,
           NULL::double precision AS err_random, g.created_at
    FROM geometry_global g JOIN model ma ON ma.id = g.model_a_id JOIN model mb ON mb.id = g.model_b_id
    UNION ALL
    SELECT 'local', l.id, ma.name, mb.name, l.matrix_a, l.matrix_b, l.n_tokens, NULL, l.id_pearson,
           l.err_transfer, l.err_random, l.created_at
    FROM geometry_local_run l JOIN model ma ON ma.id = l.model_a_id JOIN model mb ON mb.id = l.model_b_id
    """,
]


def upgrade() -> None:
    op.create_table(
        "emb2emb_map",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("model_a_id", sa.Integer(), nullable=False),
        sa.Column("model_b_id", sa.Integer(), nullable=False),
        sa.Column("pairs", sa.Text(), nullable=False, comment="tokens-input, tokens-output or prompts"),
        sa.Column("layer_a", sa.SmallInteger(), nullable=True, comment="for prompt pairs"),
        sa.Column("layer_b", sa.SmallInteger(), nullable=True),
        sa.Column("dataset_id", sa.Integer(), nullable=True),
        sa.Column("layer_rule", sa.Text(), nullable=True, comment="how layer_b was chosen"),
        sa.Column("bias", sa.Boolean(), nullable=False),
        sa.Column("ridge", sa.Double(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False, comment="of the train/held-out split"),
        sa.Column("n_pairs", sa.Integer(), nullable=False),
        sa.Column("n_train", sa.Integer(), nullable=False),
        sa.Column("n_test", sa.Integer(), nullable=False),
        sa.Column("r2_train", sa.Double(), nullable=False),
        sa.Column(
            "r2_test", sa.Double(), nullable=False, comment="held-out R^2 (variance-weighted over B's dimensions)"
        ),
        sa.Column("cosine_test", sa.Double(), nullable=False, comment="mean cosine of mapped vs true held-out vectors"),
        sa.Column("width_a", sa.Integer(), nullable=False),
        sa.Column("width_b", sa.Integer(), nullable=False),
        sa.Column("weights", postgresql.ARRAY(sa.REAL()), nullable=False, comment="W, width_a x width_b, row-major"),
        sa.Column("bias_vec", postgresql.ARRAY(sa.REAL()), nullable=True),
        sa.Column("seconds", sa.Double(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("pairs IN ('tokens-input', 'tokens-output', 'prompts')", name=op.f("ck_emb2emb_map_pairs")),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["dataset.id"], name=op.f("fk_emb2emb_map_dataset_id_dataset"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_a_id"], ["model.id"], name=op.f("fk_emb2emb_map_model_a_id_model"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_b_id"], ["model.id"], name=op.f("fk_emb2emb_map_model_b_id_model"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_emb2emb_map")),
    )
    op.create_table(
        "geometry_global",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("model_a_id", sa.Integer(), nullable=False),
        sa.Column("model_b_id", sa.Integer(), nullable=False),
        sa.Column("matrix_a", sa.Text(), nullable=False, comment="input or output"),
        sa.Column("matrix_b", sa.Text(), nullable=False, comment="input or output"),
        sa.Column(
            "matching",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            comment="how tokens were matched across the two vocabularies",
        ),
        sa.Column("n_tokens", sa.Integer(), nullable=False, comment="tokens in the sample"),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column(
            "pearson", sa.Double(), nullable=False, comment="Pearson r over the sample's token pairs (upper triangle)"
        ),
        sa.Column("spearman", sa.Double(), nullable=False),
        sa.Column(
            "token_ids_a", postgresql.ARRAY(sa.Integer()), nullable=False, comment="the sample, as model A's token ids"
        ),
        sa.Column("token_ids_b", postgresql.ARRAY(sa.Integer()), nullable=False, comment="the same tokens in model B"),
        sa.Column("seconds", sa.Double(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_a_id"], ["model.id"], name=op.f("fk_geometry_global_model_a_id_model"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_b_id"], ["model.id"], name=op.f("fk_geometry_global_model_b_id_model"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_geometry_global")),
    )
    op.create_table(
        "geometry_local_run",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("model_a_id", sa.Integer(), nullable=False),
        sa.Column("model_b_id", sa.Integer(), nullable=False),
        sa.Column("matrix_a", sa.Text(), nullable=False),
        sa.Column("matrix_b", sa.Text(), nullable=False),
        sa.Column("matching", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("k", sa.SmallInteger(), nullable=False, comment="neighbours per token for LLE"),
        sa.Column("id_k", sa.SmallInteger(), nullable=False, comment="neighbourhood size for the intrinsic dimension"),
        sa.Column(
            "variance_threshold", sa.Double(), nullable=False, comment="variance share the ID's components must explain"
        ),
        sa.Column(
            "regularizer",
            sa.Double(),
            nullable=False,
            comment="LLE ridge, relative to the trace of the local Gram matrix",
        ),
        sa.Column("n_tokens", sa.Integer(), nullable=False, comment="tokens in the sample"),
        sa.Column("n_candidates", sa.Integer(), nullable=False, comment="matched tokens the neighbours are drawn from"),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column(
            "err_own",
            sa.Double(),
            nullable=False,
            comment="median relative error: B from B's own neighbours and weights",
        ),
        sa.Column(
            "err_refit", sa.Double(), nullable=False, comment="median: B from A's neighbours with weights refitted in B"
        ),
        sa.Column(
            "err_transfer", sa.Double(), nullable=False, comment="median: B from A's neighbours with A's weights"
        ),
        sa.Column(
            "err_random",
            sa.Double(),
            nullable=False,
            comment="median: B from A's neighbours with random sum-to-one weights",
        ),
        sa.Column(
            "id_pearson", sa.Double(), nullable=True, comment="correlation of intrinsic dimensions across the models"
        ),
        sa.Column("id_spearman", sa.Double(), nullable=True),
        sa.Column("mean_id_a", sa.Double(), nullable=False),
        sa.Column("mean_id_b", sa.Double(), nullable=False),
        sa.Column("seconds", sa.Double(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_a_id"], ["model.id"], name=op.f("fk_geometry_local_run_model_a_id_model"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_b_id"], ["model.id"], name=op.f("fk_geometry_local_run_model_b_id_model"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_geometry_local_run")),
    )
    op.create_table(
        "geometry_local_token",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("token_id_a", sa.Integer(), nullable=False),
        sa.Column("token_id_b", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column(
            "neighbors_a", postgresql.ARRAY(sa.Integer()), nullable=False, comment="A's token ids, nearest first"
        ),
        sa.Column(
            "weights_a", postgresql.ARRAY(sa.REAL()), nullable=False, comment="A's LLE weights over neighbors_a (sum 1)"
        ),
        sa.Column(
            "neighbors_b", postgresql.ARRAY(sa.Integer()), nullable=False, comment="B's token ids, nearest first"
        ),
        sa.Column("weights_b", postgresql.ARRAY(sa.REAL()), nullable=False),
        sa.Column("id_a", sa.SmallInteger(), nullable=False, comment="intrinsic dimension in A"),
        sa.Column("id_b", sa.SmallInteger(), nullable=False),
        sa.Column("err_own", sa.Double(), nullable=False),
        sa.Column("err_refit", sa.Double(), nullable=False),
        sa.Column("err_transfer", sa.Double(), nullable=False),
        sa.Column("err_random", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["geometry_local_run.id"],
            name=op.f("fk_geometry_local_token_run_id_geometry_local_run"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "token_id_a", name=op.f("pk_geometry_local_token")),
    )
    op.create_table(
        "steering_vector",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.SmallInteger(), nullable=False, comment="added to the output of this decoder block"),
        sa.Column("hook_site", sa.Text(), nullable=False),
        sa.Column("token_rule", sa.Text(), nullable=False, comment="last or mean: which token states were averaged"),
        sa.Column("method", sa.Text(), nullable=False, comment="mean-difference or emb2emb"),
        sa.Column(
            "positive",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=True,
            comment="the positive prompt set: source, count, texts",
        ),
        sa.Column("negative", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("norm", sa.Double(), nullable=False),
        sa.Column(
            "activation_norm",
            sa.Double(),
            nullable=False,
            comment="median norm of the layer's activations it was measured against",
        ),
        sa.Column("source_vector_id", sa.Integer(), nullable=True),
        sa.Column("map_id", sa.Integer(), nullable=True),
        sa.Column(
            "calibration",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=True,
            comment="how a mapped vector's norm was set",
        ),
        sa.Column("vec", pgvector.sqlalchemy.Vector(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("method IN ('mean-difference', 'emb2emb')", name=op.f("ck_steering_vector_method")),
        sa.CheckConstraint("token_rule IN ('last', 'mean')", name=op.f("ck_steering_vector_token_rule")),
        sa.ForeignKeyConstraint(
            ["map_id"], ["emb2emb_map.id"], name=op.f("fk_steering_vector_map_id_emb2emb_map"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["model.id"], name=op.f("fk_steering_vector_model_id_model"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["source_vector_id"],
            ["steering_vector.id"],
            name=op.f("fk_steering_vector_source_vector_id_steering_vector"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_steering_vector")),
        sa.UniqueConstraint("name", name=op.f("uq_steering_vector_name")),
    )
    op.create_table(
        "steering_eval",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("vector_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.SmallInteger(), nullable=False),
        sa.Column(
            "prompts",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            comment="the evaluation prompts: source, count, texts",
        ),
        sa.Column(
            "targets",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            comment="positive and negative target words and their token ids",
        ),
        sa.Column("coefficients", postgresql.ARRAY(sa.REAL()), nullable=False),
        sa.Column("n_random", sa.SmallInteger(), nullable=False, comment="random control vectors of the same norm"),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column(
            "baseline_logodds",
            sa.Double(),
            nullable=False,
            comment="mean log-odds of positive vs negative targets, unsteered",
        ),
        sa.Column("seconds", sa.Double(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["vector_id"],
            ["steering_vector.id"],
            name=op.f("fk_steering_eval_vector_id_steering_vector"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_steering_eval")),
    )
    op.create_table(
        "steering_eval_point",
        sa.Column("eval_id", sa.Integer(), nullable=False),
        sa.Column("control", sa.Text(), nullable=False, comment="vector or random"),
        sa.Column("replicate", sa.SmallInteger(), nullable=False),
        sa.Column("coefficient", sa.REAL(), nullable=False),
        sa.Column(
            "shift_logodds", sa.Double(), nullable=False, comment="mean over prompts of the log-odds shift vs unsteered"
        ),
        sa.Column("sd_logodds", sa.Double(), nullable=False),
        sa.Column("shift_positive", sa.Double(), nullable=False, comment="mean shift of log P(positive targets)"),
        sa.Column("shift_negative", sa.Double(), nullable=False, comment="mean shift of log P(negative targets)"),
        sa.Column("n_prompts", sa.Integer(), nullable=False),
        sa.CheckConstraint("control IN ('vector', 'random')", name=op.f("ck_steering_eval_point_control")),
        sa.ForeignKeyConstraint(
            ["eval_id"],
            ["steering_eval.id"],
            name=op.f("fk_steering_eval_point_eval_id_steering_eval"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("eval_id", "control", "replicate", "coefficient", name=op.f("pk_steering_eval_point")),
    )
    op.add_column(
        "token_embedding",
        sa.Column(
            "special", sa.Boolean(), server_default="false", nullable=False, comment="a special token of the tokenizer"
        ),
    )
    op.execute(FUNCTION)
    for table in IMMUTABLE:
        op.execute(
            f"CREATE TRIGGER {table}_immutable BEFORE UPDATE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION layerbase_refuse_update()"
        )
    for statement in VIEWS:
        op.execute(statement)


def downgrade() -> None:
    for view in ("bi_geometry", "bi_steering_eval"):
        op.execute(f"DROP VIEW IF EXISTS {view}")
    for table in IMMUTABLE:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_immutable ON {table}")
    op.execute("DROP FUNCTION IF EXISTS layerbase_refuse_update()")
    op.drop_column("token_embedding", "special")
    op.drop_table("steering_eval_point")
    op.drop_table("steering_eval")
    op.drop_table("steering_vector")
    op.drop_table("geometry_local_token")
    op.drop_table("geometry_local_run")
    op.drop_table("geometry_global")
    op.drop_table("emb2emb_map")
