"""Listings of what has been ingested: models and jobs with their progress."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from layerbase.warehouse.engine import Warehouse

JOBS = """
SELECT j.id, m.name AS model, d.name AS dataset, j.state, j.n_prompts,
       coalesce(sum(c.last_position - c.first_position + 1) FILTER (WHERE c.done), 0) AS done,
       (SELECT count(*) FROM prompt_encoding e WHERE e.job_id = j.id AND e.truncated) AS truncated,
       j.include_layer0, j.error, j.updated_at
FROM ingest_job j
JOIN model m ON m.id = j.model_id
JOIN dataset d ON d.id = j.dataset_id
LEFT JOIN ingest_chunk c ON c.job_id = j.id
GROUP BY j.id, m.name, d.name
ORDER BY j.id
"""
MODELS = """
SELECT name, source, architecture, kind, n_layers, width, dtype, storage, pooling, padding_side,
       max_tokens, chat_template, gguf_file, revision, transformers_version
FROM model ORDER BY id
"""


def list_jobs(wh: Warehouse) -> list[dict[str, Any]]:
    """Every ingest job with prompts done and truncated."""
    with wh.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(JOBS))]


def list_models(wh: Warehouse) -> list[dict[str, Any]]:
    """Every stored model with its extraction settings."""
    with wh.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(MODELS))]
