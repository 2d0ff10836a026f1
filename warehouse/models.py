"""SQLAlchemy models: the warehouse schema as the code sees it.

The schema is created and changed only by Alembic migrations (``alembic/versions``);
``alembic check`` proves that these models and the migrations agree.

Citus-readiness (docs/design.md §7): the hot tables (``activation``, ``prompt_encoding``,
``token_embedding``) carry their distribution column (``model_id``) in the primary key
and have no foreign keys to other hot tables. ``activation`` also has no foreign key to
``prompt``: a per-row trigger check would slow bulk COPY, and the runner writes
activations only for prompts it has just read from ``prompt``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    REAL,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Indexes created at run time (per-(model, layer, dataset) partial HNSW or IVFFlat indexes)
# carry one of these prefixes.
RUNTIME_INDEX_PREFIXES = ("hnsw_activation_", "ivfflat_activation_")
# activation's half-precision column, made by migration 0005 only where the server has halfvec.
SERVER_DEPENDENT_COLUMNS = {("activation", "vec_half")}


def compared_by_autogenerate(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Alembic's ``include_object``: what the models and the migrations must agree on. Not the
    per-(model, layer, dataset) vector indexes that `layerbase knn` makes at run time, nor a
    column that migrations make only on some servers."""
    if type_ == "column" and (obj.table.name, name) in SERVER_DEPENDENT_COLUMNS:
        return False
    return not (type_ == "index" and reflected and name and name.startswith(RUNTIME_INDEX_PREFIXES))


STORAGE_COMMENT = "float32 (activation.vec) or float16 (activation.vec_half, halfvec)"
FINGERPRINT_COMMENT = "sha256 over the weight, config and tokenizer files loaded (NULL: stored before 0.2)"

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONB}


def _now() -> Any:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Model(Base):
    """A model and the extraction settings its activations were taken with.

    One row per (weights, extraction settings): ingesting the same weights with another
    pooling is stored under another name, so that (model, layer, prompt) stays the key.
    """

    __tablename__ = "model"

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    source: Mapped[str] = mapped_column(Text, comment="Hugging Face id, local directory or GGUF path")
    revision: Mapped[str | None] = mapped_column(Text)
    gguf_file: Mapped[str | None] = mapped_column(Text)
    architecture: Mapped[str] = mapped_column(Text, comment="config.model_type")
    kind: Mapped[str] = mapped_column(Text, comment="causal or encoder")
    n_layers: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    vocab_size: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(Text)
    hook_site: Mapped[str] = mapped_column(Text, comment="module path of the decoder blocks whose outputs are stored")
    pooling: Mapped[str] = mapped_column(Text)
    padding_side: Mapped[str] = mapped_column(Text)
    max_tokens: Mapped[int] = mapped_column(Integer, comment="token limit applied (context length if not set)")
    chat_template: Mapped[bool] = mapped_column(Boolean)
    tied_embeddings: Mapped[bool] = mapped_column(Boolean)
    config: Mapped[dict[str, Any]] = mapped_column()
    transformers_version: Mapped[str] = mapped_column(Text)
    torch_version: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    storage: Mapped[str] = mapped_column(Text, server_default="float32", comment=STORAGE_COMMENT)
    fingerprint: Mapped[str | None] = mapped_column(Text, comment=FINGERPRINT_COMMENT)

    __table_args__ = (
        CheckConstraint("pooling IN ('last', 'mean')", name="pooling"),
        CheckConstraint("padding_side IN ('left', 'right')", name="padding_side"),
        CheckConstraint("kind IN ('causal', 'encoder')", name="kind"),
        CheckConstraint("storage IN ('float32', 'float16')", name="storage"),
    )


class Dataset(Base):
    """A named, ordered set of prompts."""

    __tablename__ = "dataset"

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    source_kind: Mapped[str] = mapped_column(Text, comment="lines, jsonl, csv, parquet, txt_dir, hf, random, pairs")
    source_uri: Mapped[str] = mapped_column(Text)
    options: Mapped[dict[str, Any]] = mapped_column(comment="reader options, sampling, seed")
    n_prompts: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64), comment="sha256 over the ordered prompt texts")
    parallel_to_id: Mapped[int | None] = mapped_column(
        ForeignKey("dataset.id", ondelete="SET NULL"),
        comment="dataset whose prompt i is the translation/pair of this dataset's prompt i",
    )
    created_at: Mapped[datetime] = _now()


class Prompt(Base):
    """One prompt text at a position of a dataset."""

    __tablename__ = "prompt"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer, comment="0-based position in the dataset")
    text: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64), comment="sha256 of the text")
    source_ref: Mapped[str] = mapped_column(Text, comment="where in the source it came from (line, file, row)")
    parallel_prompt_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("prompt.id", ondelete="SET NULL"), comment="the paired prompt of a parallel dataset"
    )

    __table_args__ = (UniqueConstraint("dataset_id", "position"),)


class Activation(Base):
    """The pooled activation of a prompt at the end of one layer's block."""

    __tablename__ = "activation"

    model_id: Mapped[int] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"), primary_key=True)
    layer: Mapped[int] = mapped_column(
        SmallInteger, primary_key=True, comment="1..L block outputs; 0 = embedding output"
    )
    prompt_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(
        Integer, comment="the prompt's dataset, denormalized so that per-(model, layer, dataset) indexes can be partial"
    )
    # No typmod: models of different widths share this column (docs/design.md §2). NULL where
    # the model stores half precision, in ``vec_half`` (halfvec): that column exists only
    # on servers with pgvector >= 0.7, so it is not declared here (see warehouse.storage).
    vec: Mapped[Any | None] = mapped_column(Vector())


class IngestJob(Base):
    """Running one model over one dataset: its state, settings and error."""

    __tablename__ = "ingest_job"

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    include_layer0: Mapped[bool] = mapped_column(Boolean)
    batch_size: Mapped[int] = mapped_column(Integer)
    n_prompts: Mapped[int] = mapped_column(Integer)
    n_chunks: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(Text, server_default="pending")
    settings: Mapped[dict[str, Any]] = mapped_column(comment="library versions, device, tokenizer settings")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("model_id", "dataset_id"),
        CheckConstraint("state IN ('pending', 'running', 'done', 'failed')", name="state"),
    )


class IngestChunk(Base):
    """A unit of ingest work: a contiguous range of prompt positions.

    Workers claim chunks with ``FOR UPDATE SKIP LOCKED`` and write the chunk's activations
    in the same transaction that marks it done, so a chunk is stored whole or not at all.
    """

    __tablename__ = "ingest_chunk"

    job_id: Mapped[int] = mapped_column(ForeignKey("ingest_job.id", ondelete="CASCADE"), primary_key=True)
    chunk_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    first_position: Mapped[int] = mapped_column(Integer)
    last_position: Mapped[int] = mapped_column(Integer, comment="inclusive")
    done: Mapped[bool] = mapped_column(Boolean, server_default="false")
    worker: Mapped[str | None] = mapped_column(Text)
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PromptEncoding(Base):
    """How a model tokenized a prompt: token counts and whether it was truncated."""

    __tablename__ = "prompt_encoding"

    model_id: Mapped[int] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"), primary_key=True)
    prompt_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    job_id: Mapped[int] = mapped_column(Integer)
    n_tokens: Mapped[int] = mapped_column(Integer, comment="tokens the model read")
    n_tokens_full: Mapped[int] = mapped_column(Integer, comment="tokens before truncation")
    truncated: Mapped[bool] = mapped_column(Boolean)


class TokenEmbedding(Base):
    """A row of a model's input-embedding or unembedding matrix."""

    __tablename__ = "token_embedding"

    model_id: Mapped[int] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"), primary_key=True)
    matrix: Mapped[str] = mapped_column(Text, primary_key=True, comment="input or output")
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token: Mapped[str] = mapped_column(Text, comment="the vocabulary entry")
    text: Mapped[str] = mapped_column(Text, comment="the token decoded to text")
    special: Mapped[bool] = mapped_column(Boolean, server_default="false", comment="a special token of the tokenizer")
    vec: Mapped[Any] = mapped_column(Vector())

    __table_args__ = (CheckConstraint("matrix IN ('input', 'output')", name="matrix"),)


class KnnRun(Base):
    """One materialized k-NN computation: (model, layer, dataset) by one engine."""

    __tablename__ = "knn_run"

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    layer: Mapped[int] = mapped_column(SmallInteger)
    k_max: Mapped[int] = mapped_column(SmallInteger, comment="neighbours stored per prompt; any k <= k_max can be read")
    metric: Mapped[str] = mapped_column(Text, server_default="cosine")
    engine: Mapped[str] = mapped_column(Text, comment="blas, sql, hnsw or ivfflat")
    strategy: Mapped[str] = mapped_column(Text, comment="how the engine answered: exact scan, hnsw on vector(d), …")
    ef_search: Mapped[int | None] = mapped_column(Integer)
    search: Mapped[dict[str, Any] | None] = mapped_column(
        comment="an indexed engine's search settings (ef_search or lists and probes, candidates re-ranked, workers) "
        "and the recall of each setting tried"
    )
    recall: Mapped[float | None] = mapped_column(
        comment="recall@min(10, k_max) against exact, on recall_queries prompts"
    )
    recall_queries: Mapped[int | None] = mapped_column(Integer)
    n_prompts: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column()
    device: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()

    __table_args__ = (
        UniqueConstraint("model_id", "dataset_id", "layer", "engine"),
        CheckConstraint("engine IN ('sql', 'hnsw', 'blas', 'ivfflat')", name="engine"),
        CheckConstraint("metric = 'cosine'", name="metric"),
    )


class KnnNeighbor(Base):
    """The ranked nearest neighbours of one prompt (self excluded) in one k-NN run.

    One row per prompt with the neighbours' dataset positions and cosine distances as
    arrays, nearest first: ``neighbors[1:k]`` is N_k for any k <= k_max. (Long form, one row
    per neighbour, cost about 80 bytes per neighbour and dominated the write time.)
    Prompts are named by dataset position, so that neighbour sets of parallel datasets
    (prompt i of D1 <-> prompt i of D2) intersect directly.
    """

    __tablename__ = "knn_neighbor"

    run_id: Mapped[int] = mapped_column(ForeignKey("knn_run.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    neighbors: Mapped[list[int]] = mapped_column(ARRAY(Integer), comment="dataset positions, nearest first")
    distances: Mapped[list[float]] = mapped_column(ARRAY(REAL), comment="cosine distances, ascending")


class KnnArray(Base):
    """A k-NN run's sets as two rank-major arrays, for reading the first k neighbours of
    every prompt in one piece (``analysis.knn.stored``).

    ``neighbors`` holds n_prompts x k_max big-endian int4 dataset positions, and
    ``distances`` as many big-endian float4 cosine distances, rank by rank: bytes
    ``4 (r n + i)`` to ``4 (r n + i) + 3`` are the (r + 1)-th nearest of the prompt at
    position i (-1 and infinity where an index found too few). The first k ranks are a
    prefix, and the columns are stored uncompressed, so ``substring`` reads just them.
    Written with ``knn_neighbor`` in the same transaction and deleted with its run.
    (Reading one row per prompt cost 80 ms for 48 layers of 2048 prompts; this, 12 ms.)
    """

    __tablename__ = "knn_array"

    run_id: Mapped[int] = mapped_column(ForeignKey("knn_run.id", ondelete="CASCADE"), primary_key=True)
    neighbors: Mapped[bytes] = mapped_column(
        LargeBinary, comment="n_prompts x k_max int4 (big-endian) dataset positions, rank-major"
    )
    distances: Mapped[bytes] = mapped_column(
        LargeBinary, comment="n_prompts x k_max float4 (big-endian) cosine distances, rank-major"
    )


# The measures an affinity run may hold (analysis.similarity.measures defines them), and
# those with a neighbourhood size k.
AFFINITY_MEASURES = (
    "mutual_knn",
    "jaccard_knn",
    "cknna",
    "linear_cka",
    "unbiased_cka",
    "rbf_cka",
    "svcca",
    "pwcca",
    "procrustes",
    "rsa",
)
K_MEASURES = ("mutual_knn", "jaccard_knn", "cknna")


def _sql_list(values: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


class AffinityRun(Base):
    """A layer x layer similarity matrix between two models (Wolfram & Schein 2025), of one
    measure with its parameters."""

    __tablename__ = "affinity_run"

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    model_a_id: Mapped[int] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"))
    model_b_id: Mapped[int] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"))
    dataset_a_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    dataset_b_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    k: Mapped[int | None] = mapped_column(SmallInteger)
    include_layer0: Mapped[bool] = mapped_column(Boolean)
    n_prompts: Mapped[int] = mapped_column(Integer)
    n_layers_a: Mapped[int] = mapped_column(Integer)
    n_layers_b: Mapped[int] = mapped_column(Integer)
    chance: Mapped[float | None] = mapped_column(comment="mean of the null level over the cells")
    null_sd: Mapped[float | None] = mapped_column(comment="mean of the null level's standard deviation over the cells")
    knn_engine: Mapped[str | None] = mapped_column(Text)
    overlap_engine: Mapped[str | None] = mapped_column(
        Text,
        server_default="sql",
        comment="sql: one join of the unnested neighbour arrays; numpy: counted in Layerbase from the stored arrays; "
        "sparse: one scipy.sparse product of them (runs made before migration 0010)",
    )
    study: Mapped[str | None] = mapped_column(Text)
    seconds: Mapped[float] = mapped_column()
    created_at: Mapped[datetime] = _now()
    measure: Mapped[str] = mapped_column(Text, server_default="mutual_knn", comment="the similarity measure")
    parameters: Mapped[dict[str, Any]] = mapped_column(
        server_default=text("'{}'::jsonb"),
        comment="every option the measure depends on (preprocessing, k, bandwidth, dimensions, permutations, seed)",
    )
    null_method: Mapped[str] = mapped_column(
        Text,
        server_default="closed_form",
        comment="closed_form (random neighbour sets), permutation (model B's prompts shuffled) or none",
    )

    # Runs are immutable: computing a pair again adds a run, and the newest of a key is current.
    __table_args__ = (
        CheckConstraint("overlap_engine IN ('sql', 'numpy', 'sparse')", name="overlap_engine"),
        CheckConstraint(f"measure IN {_sql_list(AFFINITY_MEASURES)}", name="measure"),
        CheckConstraint(f"(k IS NOT NULL) = (measure IN {_sql_list(K_MEASURES)})", name="k_if_needed"),
        CheckConstraint("null_method IN ('closed_form', 'permutation', 'none')", name="null_method"),
        Index(
            "ix_affinity_run_key",
            "model_a_id",
            "model_b_id",
            "dataset_a_id",
            "dataset_b_id",
            "measure",
            "k",
            "include_layer0",
            "id",
        ),
    )


class AffinityCell(Base):
    """One cell A[i, j] = M_k(f_A^(i), f_B^(j))."""

    __tablename__ = "affinity_cell"

    run_id: Mapped[int] = mapped_column(ForeignKey("affinity_run.id", ondelete="CASCADE"), primary_key=True)
    layer_a: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    layer_b: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    depth_a: Mapped[float] = mapped_column(comment="layer_a / n_layers_a")
    depth_b: Mapped[float] = mapped_column(comment="layer_b / n_layers_b")
    score: Mapped[float] = mapped_column(comment="the run's measure of the two layers")
    chance: Mapped[float | None] = mapped_column(comment="the null level's mean for this cell")
    log10_p_null: Mapped[float | None] = mapped_column(comment="log10 p of the score under random neighbour sets")
    null_sd: Mapped[float | None] = mapped_column(comment="the null level's standard deviation")

    __table_args__ = (CheckConstraint("score <> 'NaN' AND log10_p_null <> 'NaN'", name="no_nan"),)


class DiagonalTest(Base):
    """The generalized-diagonal t-test of an affinity matrix."""

    __tablename__ = "diagonal_test"

    run_id: Mapped[int] = mapped_column(ForeignKey("affinity_run.id", ondelete="CASCADE"), primary_key=True)
    rows_model: Mapped[str] = mapped_column(Text, comment="a or b: the deeper model, whose layers are the rows")
    n_on: Mapped[int] = mapped_column(Integer)
    n_off: Mapped[int] = mapped_column(Integer)
    mean_on: Mapped[float] = mapped_column()
    mean_off: Mapped[float] = mapped_column()
    t: Mapped[float | None] = mapped_column()
    p: Mapped[float | None] = mapped_column()
    log10_p: Mapped[float | None] = mapped_column()
    n_pairs: Mapped[int] = mapped_column(Integer, comment="model pairs in the study (Bonferroni factor)")
    p_bonferroni: Mapped[float | None] = mapped_column()
    log10_p_bonferroni: Mapped[float | None] = mapped_column()
    undefined_reason: Mapped[str | None] = mapped_column(
        Text, comment="why the test has no statistic (NULL when it has one)"
    )

    __table_args__ = (
        CheckConstraint("(t IS NULL) = (undefined_reason IS NOT NULL)", name="undefined_has_reason"),
        CheckConstraint(
            "mean_on <> 'NaN' AND mean_off <> 'NaN' AND t <> 'NaN' AND p <> 'NaN' AND log10_p <> 'NaN' "
            "AND p_bonferroni <> 'NaN' AND log10_p_bonferroni <> 'NaN'",
            name="no_nan",
        ),
    )


class AffinityBootstrap(Base):
    """A percentile bootstrap interval over prompts of an affinity run's diagonal-test
    statistic or of one of its cells."""

    __tablename__ = "affinity_bootstrap"

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("affinity_run.id", ondelete="CASCADE"), index=False)
    statistic: Mapped[str] = mapped_column(Text, comment="diagonal_t, diagonal_difference (mean on - mean off) or cell")
    layer_a: Mapped[int | None] = mapped_column(SmallInteger)
    layer_b: Mapped[int | None] = mapped_column(SmallInteger)
    estimate: Mapped[float] = mapped_column(comment="the statistic on the prompts themselves")
    low: Mapped[float] = mapped_column()
    high: Mapped[float] = mapped_column()
    std_error: Mapped[float] = mapped_column()
    level: Mapped[float] = mapped_column(comment="confidence level of [low, high] (percentile)")
    replicates: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _now()

    __table_args__ = (
        CheckConstraint("statistic IN ('diagonal_t', 'diagonal_difference', 'cell')", name="statistic"),
        CheckConstraint("(statistic = 'cell') = (layer_a IS NOT NULL AND layer_b IS NOT NULL)", name="cell_has_layers"),
        CheckConstraint("estimate <> 'NaN' AND low <> 'NaN' AND high <> 'NaN' AND std_error <> 'NaN'", name="no_nan"),
        Index("ix_affinity_bootstrap_run", "run_id"),
    )


class GeometryGlobal(Base):
    """Global token geometry (Lee et al. 2025): the Pearson correlation of two models'
    token-token cosine-similarity matrices over one sample of matched tokens."""

    __tablename__ = "geometry_global"

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    model_a_id: Mapped[int] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"))
    model_b_id: Mapped[int] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"))
    matrix_a: Mapped[str] = mapped_column(Text, comment="input or output")
    matrix_b: Mapped[str] = mapped_column(Text, comment="input or output")
    matching: Mapped[dict[str, Any]] = mapped_column(comment="how tokens were matched across the two vocabularies")
    n_tokens: Mapped[int] = mapped_column(Integer, comment="tokens in the sample")
    seed: Mapped[int] = mapped_column(Integer)
    pearson: Mapped[float] = mapped_column(comment="Pearson r over the sample's token pairs (upper triangle)")
    spearman: Mapped[float] = mapped_column()
    token_ids_a: Mapped[list[int]] = mapped_column(ARRAY(Integer), comment="the sample, as model A's token ids")
    token_ids_b: Mapped[list[int]] = mapped_column(ARRAY(Integer), comment="the same tokens in model B")
    seconds: Mapped[float] = mapped_column()
    created_at: Mapped[datetime] = _now()


class GeometryLocalRun(Base):
    """Local token geometry of two models over one token sample: LLE weights, their
    transfer from A to B, and per-token intrinsic dimensions."""

    __tablename__ = "geometry_local_run"

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    model_a_id: Mapped[int] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"))
    model_b_id: Mapped[int] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"))
    matrix_a: Mapped[str] = mapped_column(Text)
    matrix_b: Mapped[str] = mapped_column(Text)
    matching: Mapped[dict[str, Any]] = mapped_column()
    k: Mapped[int] = mapped_column(SmallInteger, comment="neighbours per token for LLE")
    id_k: Mapped[int] = mapped_column(SmallInteger, comment="neighbourhood size for the intrinsic dimension")
    variance_threshold: Mapped[float] = mapped_column(comment="variance share the ID's components must explain")
    regularizer: Mapped[float] = mapped_column(comment="LLE ridge, relative to the trace of the local Gram matrix")
    n_tokens: Mapped[int] = mapped_column(Integer, comment="tokens in the sample")
    n_candidates: Mapped[int] = mapped_column(Integer, comment="matched tokens the neighbours are drawn from")
    seed: Mapped[int] = mapped_column(Integer)
    err_own: Mapped[float] = mapped_column(comment="median relative error: B from B's own neighbours and weights")
    err_refit: Mapped[float] = mapped_column(comment="median: B from A's neighbours with weights refitted in B")
    err_transfer: Mapped[float] = mapped_column(comment="median: B from A's neighbours with A's weights")
    err_random: Mapped[float] = mapped_column(comment="median: B from A's neighbours with random sum-to-one weights")
    id_pearson: Mapped[float | None] = mapped_column(comment="correlation of intrinsic dimensions across the models")
    id_spearman: Mapped[float | None] = mapped_column()
    mean_id_a: Mapped[float] = mapped_column()
    mean_id_b: Mapped[float] = mapped_column()
    seconds: Mapped[float] = mapped_column()
    created_at: Mapped[datetime] = _now()


class GeometryLocalToken(Base):
    """One sampled token of a local-geometry run, in both models."""

    __tablename__ = "geometry_local_token"

    run_id: Mapped[int] = mapped_column(ForeignKey("geometry_local_run.id", ondelete="CASCADE"), primary_key=True)
    token_id_a: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_id_b: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    neighbors_a: Mapped[list[int]] = mapped_column(ARRAY(Integer), comment="A's token ids, nearest first")
    weights_a: Mapped[list[float]] = mapped_column(ARRAY(REAL), comment="A's LLE weights over neighbors_a (sum 1)")
    neighbors_b: Mapped[list[int]] = mapped_column(ARRAY(Integer), comment="B's token ids, nearest first")
    weights_b: Mapped[list[float]] = mapped_column(ARRAY(REAL))
    id_a: Mapped[int] = mapped_column(SmallInteger, comment="intrinsic dimension in A")
    id_b: Mapped[int] = mapped_column(SmallInteger)
    err_own: Mapped[float] = mapped_column()
    err_refit: Mapped[float] = mapped_column()
    err_transfer: Mapped[float] = mapped_column()
    err_random: Mapped[float] = mapped_column()


class Emb2EmbMap(Base):
    """A linear (optionally affine) map y = x·W + b from model A's space to model B's,
    fitted by (ridge) least squares on paired vectors. Immutable once written."""

    __tablename__ = "emb2emb_map"

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    model_a_id: Mapped[int] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"))
    model_b_id: Mapped[int] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"))
    pairs: Mapped[str] = mapped_column(Text, comment="tokens-input, tokens-output or prompts")
    layer_a: Mapped[int | None] = mapped_column(SmallInteger, comment="for prompt pairs")
    layer_b: Mapped[int | None] = mapped_column(SmallInteger)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    layer_rule: Mapped[str | None] = mapped_column(Text, comment="how layer_b was chosen")
    bias: Mapped[bool] = mapped_column(Boolean)
    ridge: Mapped[float] = mapped_column()
    seed: Mapped[int] = mapped_column(Integer, comment="of the train/held-out split")
    n_pairs: Mapped[int] = mapped_column(Integer)
    n_train: Mapped[int] = mapped_column(Integer)
    n_test: Mapped[int] = mapped_column(Integer)
    r2_train: Mapped[float] = mapped_column()
    r2_test: Mapped[float] = mapped_column(comment="held-out R^2 (variance-weighted over B's dimensions)")
    cosine_test: Mapped[float] = mapped_column(comment="mean cosine of mapped vs true held-out vectors")
    width_a: Mapped[int] = mapped_column(Integer)
    width_b: Mapped[int] = mapped_column(Integer)
    weights: Mapped[list[float]] = mapped_column(ARRAY(REAL), comment="W, width_a x width_b, row-major")
    bias_vec: Mapped[list[float] | None] = mapped_column(ARRAY(REAL))
    seconds: Mapped[float] = mapped_column()
    created_at: Mapped[datetime] = _now()

    __table_args__ = (CheckConstraint("pairs IN ('tokens-input', 'tokens-output', 'prompts')", name="pairs"),)


class SteeringVector(Base):
    """A steering vector in one model at one layer, with its provenance. Immutable once
    written: a different vector is a new row."""

    __tablename__ = "steering_vector"

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"))
    layer: Mapped[int] = mapped_column(SmallInteger, comment="added to the output of this decoder block")
    hook_site: Mapped[str] = mapped_column(Text)
    token_rule: Mapped[str] = mapped_column(Text, comment="last or mean: which token states were averaged")
    method: Mapped[str] = mapped_column(Text, comment="mean-difference, emb2emb or imported")
    positive: Mapped[dict[str, Any] | None] = mapped_column(comment="the positive prompt set: source, count, texts")
    negative: Mapped[dict[str, Any] | None] = mapped_column()
    norm: Mapped[float] = mapped_column()
    activation_norm: Mapped[float] = mapped_column(
        comment="median norm of the layer's activations it was measured against"
    )
    source_vector_id: Mapped[int | None] = mapped_column(ForeignKey("steering_vector.id", ondelete="CASCADE"))
    map_id: Mapped[int | None] = mapped_column(ForeignKey("emb2emb_map.id", ondelete="CASCADE"))
    calibration: Mapped[dict[str, Any] | None] = mapped_column(comment="how a mapped vector's norm was set")
    vec: Mapped[Any] = mapped_column(Vector())
    created_at: Mapped[datetime] = _now()

    __table_args__ = (
        CheckConstraint("method IN ('mean-difference', 'emb2emb', 'imported')", name="method"),
        CheckConstraint("token_rule IN ('last', 'mean')", name="token_rule"),
    )


class SteeringEval(Base):
    """A measured effect of a steering vector: target-token log-probability shifts over a
    prompt set, across coefficients, against random vectors of the same norm."""

    __tablename__ = "steering_eval"

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    vector_id: Mapped[int] = mapped_column(ForeignKey("steering_vector.id", ondelete="CASCADE"))
    layer: Mapped[int] = mapped_column(SmallInteger)
    prompts: Mapped[dict[str, Any]] = mapped_column(comment="the evaluation prompts: source, count, texts")
    targets: Mapped[dict[str, Any]] = mapped_column(comment="positive and negative target words and their token ids")
    coefficients: Mapped[list[float]] = mapped_column(ARRAY(REAL))
    n_random: Mapped[int] = mapped_column(SmallInteger, comment="random control vectors of the same norm")
    seed: Mapped[int] = mapped_column(Integer)
    baseline_logodds: Mapped[float] = mapped_column(comment="mean log-odds of positive vs negative targets, unsteered")
    seconds: Mapped[float] = mapped_column()
    created_at: Mapped[datetime] = _now()


class SteeringEvalPoint(Base):
    """One (control, replicate, coefficient) point of a steering evaluation."""

    __tablename__ = "steering_eval_point"

    eval_id: Mapped[int] = mapped_column(ForeignKey("steering_eval.id", ondelete="CASCADE"), primary_key=True)
    control: Mapped[str] = mapped_column(Text, primary_key=True, comment="vector or random")
    replicate: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    coefficient: Mapped[float] = mapped_column(REAL, primary_key=True)
    shift_logodds: Mapped[float] = mapped_column(comment="mean over prompts of the log-odds shift vs unsteered")
    sd_logodds: Mapped[float] = mapped_column()
    shift_positive: Mapped[float] = mapped_column(comment="mean shift of log P(positive targets)")
    shift_negative: Mapped[float] = mapped_column(comment="mean shift of log P(negative targets)")
    n_prompts: Mapped[int] = mapped_column(Integer)

    __table_args__ = (CheckConstraint("control IN ('vector', 'random')", name="control"),)
