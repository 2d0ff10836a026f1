"""affinity runs are immutable; a degenerate diagonal test is stored as undefined; no NaN

* A new computation of a pair no longer replaces its stored run: it adds one, and ids stay
  valid for as long as the data they came from. The unique key of a pair becomes a plain
  index; the newest run of a key is its current one. The BI views say which runs are
  current (``is_current``) and whether a run compares two models or one model with itself
  (``pair_kind``).
* A diagonal test whose t statistic is not finite (cells without variance) keeps its counts
  and means, with NULL statistics and ``undefined_reason``, instead of NaN next to p = 1.
* NaN cannot be stored in a statistic: CHECK constraints on the cells and the tests
  (PostgreSQL orders NaN as equal to itself, so ``x <> 'NaN'`` is false only for NaN).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

KEY = ["model_a_id", "model_b_id", "dataset_a_id", "dataset_b_id", "k", "include_layer0"]
TEST_STATISTICS = ["t", "p", "log10_p", "p_bonferroni", "log10_p_bonferroni"]
REASON_COMMENT = "why the test has no statistic (NULL when it has one)"

# A run is current when no newer run of the same key exists.
CURRENT = """NOT EXISTS (
        SELECT 1 FROM affinity_run n
        WHERE n.model_a_id = r.model_a_id AND n.model_b_id = r.model_b_id AND n.dataset_a_id = r.dataset_a_id
          AND n.dataset_b_id = r.dataset_b_id AND n.k = r.k AND n.include_layer0 = r.include_layer0 AND n.id > r.id
    )"""
PAIR_KIND = "CASE WHEN r.model_a_id = r.model_b_id THEN 'within-model' ELSE 'cross-model' END"
# A run's models and datasets by name.
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
           r.created_at
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
           r.created_at
    FROM diagonal_test t
    JOIN affinity_run r ON r.id = t.run_id
    {NAMES}
    """,
]


def upgrade() -> None:
    op.drop_constraint("uq_affinity_run_pair", "affinity_run", type_="unique")
    op.create_index("ix_affinity_run_key", "affinity_run", [*KEY, "id"])
    op.add_column("diagonal_test", sa.Column("undefined_reason", sa.Text(), nullable=True, comment=REASON_COMMENT))
    for column in TEST_STATISTICS:
        op.alter_column("diagonal_test", column, existing_type=sa.Double(), nullable=True)
    # Tests stored before this revision with a NaN statistic become undefined.
    op.execute(
        "UPDATE diagonal_test SET t = NULL, p = NULL, log10_p = NULL, p_bonferroni = NULL, "
        "log10_p_bonferroni = NULL, undefined_reason = 'stored before 0.2 with a t statistic that was not a number' "
        "WHERE t = 'NaN' OR p = 'NaN' OR log10_p = 'NaN' OR t IN ('Infinity', '-Infinity')"
    )
    op.create_check_constraint(
        op.f("ck_diagonal_test_undefined_has_reason"), "diagonal_test", "(t IS NULL) = (undefined_reason IS NOT NULL)"
    )
    op.create_check_constraint(
        op.f("ck_diagonal_test_no_nan"),
        "diagonal_test",
        " AND ".join(f"{c} <> 'NaN'" for c in ["mean_on", "mean_off", *TEST_STATISTICS]),
    )
    op.create_check_constraint(
        op.f("ck_affinity_cell_no_nan"), "affinity_cell", "score <> 'NaN' AND log10_p_null <> 'NaN'"
    )
    for statement in VIEWS:
        op.execute(statement)


def downgrade() -> None:
    # The views' new columns cannot be dropped by CREATE OR REPLACE: recreate them as 0002 made them.
    import runpy
    from pathlib import Path

    earlier = runpy.run_path(str(Path(__file__).with_name("0002_knn_and_affinity.py")))
    for view in ("bi_max_similarity_path", "bi_diagonal_test", "bi_affinity_cell"):
        op.execute(f"DROP VIEW IF EXISTS {view}")
    for statement in earlier["VIEWS"]:
        op.execute(statement)
    op.drop_constraint(op.f("ck_affinity_cell_no_nan"), "affinity_cell", type_="check")
    op.drop_constraint(op.f("ck_diagonal_test_no_nan"), "diagonal_test", type_="check")
    op.drop_constraint(op.f("ck_diagonal_test_undefined_has_reason"), "diagonal_test", type_="check")
    op.execute("DELETE FROM diagonal_test WHERE t IS NULL")
    for column in TEST_STATISTICS:
        op.alter_column("diagonal_test", column, existing_type=sa.Double(), nullable=False)
    op.drop_column("diagonal_test", "undefined_reason")
    # Keep the newest run of each key, as the unique key requires.
    op.execute(
        "DELETE FROM affinity_run r WHERE EXISTS (SELECT 1 FROM affinity_run n WHERE "
        + " AND ".join(f"n.{c} = r.{c}" for c in KEY)
        + " AND n.id > r.id)"
    )
    op.drop_index("ix_affinity_run_key", "affinity_run")
    op.create_unique_constraint("uq_affinity_run_pair", "affinity_run", KEY)
