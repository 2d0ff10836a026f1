"""affinity runs of any similarity measure, with their parameters, null level and bootstrap

* ``affinity_run.measure`` (mutual_knn for every earlier run) and ``parameters`` (JSONB:
  every option the measure depends on, preprocessing included). Earlier runs get
  ``{"preprocess": "none", "k": k}``, which is what a mutual k-NN run stores now, so that
  they stay current.
* ``k`` is NULL for the measures that have none; so are ``chance`` and ``null_sd`` of a
  run without a null level, and ``knn_engine``/``overlap_engine`` of a run that used no
  k-NN sets. ``null_method`` says where the null level comes from.
* ``affinity_cell.null_sd``: the per-cell standard deviation of a permutation null (the
  closed form's for k-NN measures); ``chance`` and ``log10_p_null`` may be NULL.
* ``affinity_bootstrap``: percentile confidence intervals over prompts of the diagonal
  test's statistic and of chosen cells, with the replicates and the seed.
* The BI views gain ``measure`` and ``parameters``; a run is current when no newer run has
  its models, datasets, measure, k, parameters and layer-0 choice. ``bi_affinity_bootstrap``
  is new.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

MEASURES = (
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
KEY = ["model_a_id", "model_b_id", "dataset_a_id", "dataset_b_id", "measure", "k", "include_layer0"]


def _in(values: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


CURRENT = """NOT EXISTS (
        SELECT 1 FROM affinity_run n
        WHERE n.model_a_id = r.model_a_id AND n.model_b_id = r.model_b_id AND n.dataset_a_id = r.dataset_a_id
          AND n.dataset_b_id = r.dataset_b_id AND n.measure = r.measure AND n.k IS NOT DISTINCT FROM r.k
          AND n.parameters = r.parameters AND n.include_layer0 = r.include_layer0 AND n.id > r.id
    )"""
PAIR_KIND = "CASE WHEN r.model_a_id = r.model_b_id THEN 'within-model' ELSE 'cross-model' END"
NAMES = """JOIN model ma ON ma.id = r.model_a_id
    JOIN model mb ON mb.id = r.model_b_id
    JOIN dataset da ON da.id = r.dataset_a_id
    JOIN dataset db ON db.id = r.dataset_b_id"""

# New columns go last: CREATE OR REPLACE VIEW keeps the existing ones in place.
VIEWS = [
    f"""
    CREATE OR REPLACE VIEW bi_affinity_cell AS
    SELECT r.id AS affinity_run_id, ma.name AS model_a, mb.name AS model_b,
           da.name AS dataset_a, db.name AS dataset_b, r.k, r.n_prompts, r.study,
           c.layer_a, c.layer_b, c.depth_a, c.depth_b, c.score, c.chance,
           c.score / nullif(c.chance, 0) AS score_over_chance, c.log10_p_null,
           {CURRENT} AS is_current,
           {PAIR_KIND} AS pair_kind,
           r.dataset_a_id = r.dataset_b_id AS same_dataset,
           r.created_at,
           r.measure, r.parameters::text AS parameters, c.null_sd
    FROM affinity_cell c
    JOIN affinity_run r ON r.id = c.run_id
    {NAMES}
    """,
    f"""
    CREATE OR REPLACE VIEW bi_diagonal_test AS
    SELECT r.id AS affinity_run_id, ma.name AS model_a, mb.name AS model_b,
           da.name AS dataset_a, db.name AS dataset_b, r.k, r.n_prompts, r.study,
           r.n_layers_a, r.n_layers_b, r.chance,
           t.rows_model, t.n_on, t.n_off, t.mean_on, t.mean_off, t.mean_on - t.mean_off AS difference,
           t.t, t.p, t.log10_p, t.n_pairs, t.p_bonferroni, t.log10_p_bonferroni,
           t.undefined_reason,
           {CURRENT} AS is_current,
           {PAIR_KIND} AS pair_kind,
           r.created_at,
           r.measure, r.parameters::text AS parameters
    FROM diagonal_test t
    JOIN affinity_run r ON r.id = t.run_id
    {NAMES}
    """,
    """
    CREATE OR REPLACE VIEW bi_max_similarity_path AS
    SELECT DISTINCT ON (c.affinity_run_id, c.layer_a)
           c.affinity_run_id, c.model_a, c.model_b, c.dataset_a, c.dataset_b, c.k,
           c.layer_a, c.depth_a, c.layer_b AS best_layer_b, c.depth_b AS best_depth_b, c.score,
           c.measure, c.is_current
    FROM bi_affinity_cell c
    ORDER BY c.affinity_run_id, c.layer_a, c.score DESC, c.layer_b
    """,
    f"""
    CREATE VIEW bi_affinity_bootstrap AS
    SELECT r.id AS affinity_run_id, ma.name AS model_a, mb.name AS model_b,
           da.name AS dataset_a, db.name AS dataset_b, r.measure, r.parameters::text AS parameters, r.k,
           b.statistic, b.layer_a, b.layer_b, b.estimate, b.low, b.high, b.std_error, b.level,
           b.replicates, b.seed,
           {CURRENT} AS is_current,
           b.created_at
    FROM affinity_bootstrap b
    JOIN affinity_run r ON r.id = b.run_id
    {NAMES}
    """,
]


def upgrade() -> None:
    op.add_column(
        "affinity_run",
        sa.Column("measure", sa.Text(), nullable=False, server_default="mutual_knn", comment="the similarity measure"),
    )
    op.add_column(
        "affinity_run",
        sa.Column(
            "parameters",
            postgresql.JSONB(),
            nullable=False,
            server_default=sa.text("'{}'::jsonb"),
            comment="every option the measure depends on (preprocessing, k, bandwidth, dimensions, permutations, seed)",
        ),
    )
    op.add_column(
        "affinity_run",
        sa.Column(
            "null_method",
            sa.Text(),
            nullable=False,
            server_default="closed_form",
            comment="closed_form (random neighbour sets), permutation (model B's prompts shuffled) or none",
        ),
    )
    # One statement per k with a constant: Citus refuses functions of column values in an
    # UPDATE of a distributed or reference table, and this must run on a distributed warehouse.
    bind = op.get_bind()
    for (k,) in bind.execute(sa.text("SELECT DISTINCT k FROM affinity_run")).all():
        bind.execute(
            sa.text("UPDATE affinity_run SET parameters = CAST(:p AS jsonb) WHERE k = :k"),
            {"p": f'{{"preprocess": "none", "k": {int(k)}}}', "k": k},
        )
    for column in ("k", "chance", "null_sd", "knn_engine", "overlap_engine"):
        op.alter_column("affinity_run", column, nullable=True)
    op.alter_column("affinity_run", "chance", comment="mean of the null level over the cells")
    op.alter_column("affinity_run", "null_sd", comment="mean of the null level's standard deviation over the cells")
    op.create_check_constraint(op.f("ck_affinity_run_measure"), "affinity_run", f"measure IN {_in(MEASURES)}")
    op.create_check_constraint(
        op.f("ck_affinity_run_k_if_needed"), "affinity_run", f"(k IS NOT NULL) = (measure IN {_in(K_MEASURES)})"
    )
    op.create_check_constraint(
        op.f("ck_affinity_run_null_method"), "affinity_run", "null_method IN ('closed_form', 'permutation', 'none')"
    )
    op.drop_index("ix_affinity_run_key", "affinity_run")
    op.create_index("ix_affinity_run_key", "affinity_run", [*KEY, "id"])

    for column in ("chance", "log10_p_null"):
        op.alter_column("affinity_cell", column, nullable=True)
    op.alter_column("affinity_cell", "score", comment="the run's measure of the two layers")
    op.alter_column("affinity_cell", "chance", comment="the null level's mean for this cell")
    op.add_column(
        "affinity_cell", sa.Column("null_sd", sa.Double(), nullable=True, comment="the null level's standard deviation")
    )

    op.create_table(
        "affinity_bootstrap",
        sa.Column("id", sa.Integer(), sa.Identity(always=False), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column(
            "statistic",
            sa.Text(),
            nullable=False,
            comment="diagonal_t, diagonal_difference (mean on - mean off) or cell",
        ),
        sa.Column("layer_a", sa.SmallInteger(), nullable=True),
        sa.Column("layer_b", sa.SmallInteger(), nullable=True),
        sa.Column("estimate", sa.Double(), nullable=False, comment="the statistic on the prompts themselves"),
        sa.Column("low", sa.Double(), nullable=False),
        sa.Column("high", sa.Double(), nullable=False),
        sa.Column("std_error", sa.Double(), nullable=False),
        sa.Column("level", sa.Double(), nullable=False, comment="confidence level of [low, high] (percentile)"),
        sa.Column("replicates", sa.Integer(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "statistic IN ('diagonal_t', 'diagonal_difference', 'cell')", name=op.f("ck_affinity_bootstrap_statistic")
        ),
        sa.CheckConstraint(
            "(statistic = 'cell') = (layer_a IS NOT NULL AND layer_b IS NOT NULL)",
            name=op.f("ck_affinity_bootstrap_cell_has_layers"),
        ),
        sa.CheckConstraint(
            "estimate <> 'NaN' AND low <> 'NaN' AND high <> 'NaN' AND std_error <> 'NaN'",
            name=op.f("ck_affinity_bootstrap_no_nan"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["affinity_run.id"], name=op.f("fk_affinity_bootstrap_run_id_affinity_run"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_affinity_bootstrap")),
    )
    op.create_index("ix_affinity_bootstrap_run", "affinity_bootstrap", ["run_id"])
    for statement in VIEWS:
        op.execute(statement)


def downgrade() -> None:
    import runpy
    from pathlib import Path

    earlier = runpy.run_path(str(Path(__file__).with_name("0008_immutable_affinity_runs.py")))
    op.execute("DROP VIEW IF EXISTS bi_affinity_bootstrap")
    for view in ("bi_max_similarity_path", "bi_diagonal_test", "bi_affinity_cell"):
        op.execute(f"DROP VIEW IF EXISTS {view}")
    before = runpy.run_path(str(Path(__file__).with_name("0002_knn_and_affinity.py")))
    for statement in before["VIEWS"]:
        op.execute(statement)
    for statement in earlier["VIEWS"]:
        op.execute(statement)
    op.drop_table("affinity_bootstrap")
    # Only mutual k-NN runs existed before; the others go.
    op.execute("DELETE FROM affinity_run WHERE measure <> 'mutual_knn' OR chance IS NULL")
    op.drop_column("affinity_cell", "null_sd")
    op.execute("UPDATE affinity_cell SET log10_p_null = 0 WHERE log10_p_null IS NULL")
    for column in ("chance", "log10_p_null"):
        op.alter_column("affinity_cell", column, nullable=False)
    op.drop_index("ix_affinity_run_key", "affinity_run")
    op.create_index(
        "ix_affinity_run_key",
        "affinity_run",
        ["model_a_id", "model_b_id", "dataset_a_id", "dataset_b_id", "k", "include_layer0", "id"],
    )
    for name in ("ck_affinity_run_measure", "ck_affinity_run_k_if_needed", "ck_affinity_run_null_method"):
        op.drop_constraint(op.f(name), "affinity_run", type_="check")
    op.execute("UPDATE affinity_run SET knn_engine = '' WHERE knn_engine IS NULL")
    op.execute("UPDATE affinity_run SET overlap_engine = 'sparse' WHERE overlap_engine IS NULL")
    for column in ("k", "chance", "null_sd", "knn_engine", "overlap_engine"):
        op.alter_column("affinity_run", column, nullable=False)
    for column in ("null_method", "parameters", "measure"):
        op.drop_column("affinity_run", column)
