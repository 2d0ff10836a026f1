"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-21

The warehouse: models, datasets and prompts, activations, ingest jobs and chunks,
per-prompt tokenization records, and token embeddings.
"""

from __future__ import annotations

import pgvector.sqlalchemy
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # pgvector first: the activation and token_embedding tables use its type.
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.create_table(
        "dataset",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column(
            "source_kind", sa.Text(), nullable=False, comment="lines, jsonl, csv, parquet, txt_dir, hf, random, pairs"
        ),
        sa.Column("source_uri", sa.Text(), nullable=False),
        sa.Column(
            "options", postgresql.JSONB(astext_type=sa.Text()), nullable=False, comment="reader options, sampling, seed"
        ),
        sa.Column("n_prompts", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False, comment="sha256 over the ordered prompt texts"),
        sa.Column(
            "parallel_to_id",
            sa.Integer(),
            nullable=True,
            comment="dataset whose prompt i is the translation/pair of this dataset's prompt i",
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["parallel_to_id"], ["dataset.id"], name=op.f("fk_dataset_parallel_to_id_dataset"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dataset")),
        sa.UniqueConstraint("name", name=op.f("uq_dataset_name")),
    )
    op.create_table(
        "model",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False, comment="Hugging Face id, local directory or GGUF path"),
        sa.Column("revision", sa.Text(), nullable=True),
        sa.Column("gguf_file", sa.Text(), nullable=True),
        sa.Column("architecture", sa.Text(), nullable=False, comment="config.model_type"),
        sa.Column("kind", sa.Text(), nullable=False, comment="causal or encoder"),
        sa.Column("n_layers", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("vocab_size", sa.Integer(), nullable=False),
        sa.Column("dtype", sa.Text(), nullable=False),
        sa.Column(
            "hook_site", sa.Text(), nullable=False, comment="module path of the decoder blocks whose outputs are stored"
        ),
        sa.Column("pooling", sa.Text(), nullable=False),
        sa.Column("padding_side", sa.Text(), nullable=False),
        sa.Column(
            "max_tokens", sa.Integer(), nullable=False, comment="token limit applied (context length if not set)"
        ),
        sa.Column("chat_template", sa.Boolean(), nullable=False),
        sa.Column("tied_embeddings", sa.Boolean(), nullable=False),
        sa.Column("config", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("transformers_version", sa.Text(), nullable=False),
        sa.Column("torch_version", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("kind IN ('causal', 'encoder')", name=op.f("ck_model_kind")),
        sa.CheckConstraint("padding_side IN ('left', 'right')", name=op.f("ck_model_padding_side")),
        sa.CheckConstraint("pooling IN ('last', 'mean')", name=op.f("ck_model_pooling")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model")),
        sa.UniqueConstraint("name", name=op.f("uq_model_name")),
    )
    op.create_table(
        "activation",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.SmallInteger(), nullable=False, comment="1..L block outputs; 0 = embedding output"),
        sa.Column("prompt_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "dataset_id",
            sa.Integer(),
            nullable=False,
            comment="the prompt's dataset, denormalized so that per-(model, layer, dataset) indexes can be partial",
        ),
        sa.Column("vec", pgvector.sqlalchemy.Vector(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["model.id"], name=op.f("fk_activation_model_id_model"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("model_id", "layer", "prompt_id", name=op.f("pk_activation")),
    )
    op.create_table(
        "ingest_job",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("include_layer0", sa.Boolean(), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("n_prompts", sa.Integer(), nullable=False),
        sa.Column("n_chunks", sa.Integer(), nullable=False),
        sa.Column("state", sa.Text(), server_default="pending", nullable=False),
        sa.Column(
            "settings",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            comment="library versions, device, tokenizer settings",
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("state IN ('pending', 'running', 'done', 'failed')", name=op.f("ck_ingest_job_state")),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["dataset.id"], name=op.f("fk_ingest_job_dataset_id_dataset"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["model.id"], name=op.f("fk_ingest_job_model_id_model"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_job")),
        sa.UniqueConstraint("model_id", "dataset_id", name=op.f("uq_ingest_job_model_id_dataset_id")),
    )
    op.create_table(
        "prompt",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False, comment="0-based position in the dataset"),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False, comment="sha256 of the text"),
        sa.Column(
            "source_ref", sa.Text(), nullable=False, comment="where in the source it came from (line, file, row)"
        ),
        sa.Column(
            "parallel_prompt_id", sa.BigInteger(), nullable=True, comment="the paired prompt of a parallel dataset"
        ),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["dataset.id"], name=op.f("fk_prompt_dataset_id_dataset"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["parallel_prompt_id"], ["prompt.id"], name=op.f("fk_prompt_parallel_prompt_id_prompt"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompt")),
        sa.UniqueConstraint("dataset_id", "position", name=op.f("uq_prompt_dataset_id_position")),
    )
    op.create_table(
        "prompt_encoding",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.BigInteger(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("n_tokens", sa.Integer(), nullable=False, comment="tokens the model read"),
        sa.Column("n_tokens_full", sa.Integer(), nullable=False, comment="tokens before truncation"),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["model.id"], name=op.f("fk_prompt_encoding_model_id_model"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("model_id", "prompt_id", name=op.f("pk_prompt_encoding")),
    )
    op.create_table(
        "token_embedding",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("matrix", sa.Text(), nullable=False, comment="input or output"),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("token", sa.Text(), nullable=False, comment="the vocabulary entry"),
        sa.Column("text", sa.Text(), nullable=False, comment="the token decoded to text"),
        sa.Column("vec", pgvector.sqlalchemy.Vector(), nullable=False),
        sa.CheckConstraint("matrix IN ('input', 'output')", name=op.f("ck_token_embedding_matrix")),
        sa.ForeignKeyConstraint(
            ["model_id"], ["model.id"], name=op.f("fk_token_embedding_model_id_model"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("model_id", "matrix", "token_id", name=op.f("pk_token_embedding")),
    )
    op.create_table(
        "ingest_chunk",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("chunk_no", sa.Integer(), nullable=False),
        sa.Column("first_position", sa.Integer(), nullable=False),
        sa.Column("last_position", sa.Integer(), nullable=False, comment="inclusive"),
        sa.Column("done", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("worker", sa.Text(), nullable=True),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["ingest_job.id"], name=op.f("fk_ingest_chunk_job_id_ingest_job"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "chunk_no", name=op.f("pk_ingest_chunk")),
    )


def downgrade() -> None:
    op.drop_table("ingest_chunk")
    op.drop_table("token_embedding")
    op.drop_table("prompt_encoding")
    op.drop_table("prompt")
    op.drop_table("ingest_job")
    op.drop_table("activation")
    op.drop_table("model")
    op.drop_table("dataset")
