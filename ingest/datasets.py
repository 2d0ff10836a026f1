"""Register prompt sets as datasets in the warehouse (idempotent by content)."""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from sqlalchemy.orm import Session

from layerbase.ingest.limits import check_name
from layerbase.ingest.sources import PromptSet
from layerbase.warehouse.copy import copy_rows
from layerbase.warehouse.engine import Warehouse, analyze, raw_connection
from layerbase.warehouse.errors import InputError
from layerbase.warehouse.lookup import get_dataset
from layerbase.warehouse.models import Dataset, Prompt

LINK_PARALLEL = """
UPDATE prompt AS p SET parallel_prompt_id = q.id
FROM prompt AS q
WHERE p.dataset_id = :a AND q.dataset_id = :b AND p.position = q.position
"""


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_hash(texts: list[str]) -> str:
    """sha256 over the ordered prompt texts (each hashed, so boundaries count)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(bytes.fromhex(text_hash(text)))
    return digest.hexdigest()


def validate_name(name: str, what: str = "dataset") -> str:
    """Names are free text (quotes and semicolons are fine: they never reach SQL text)."""
    if not name or not name.strip():
        raise InputError(f"the {what} name must not be empty")
    if len(name) > 200:
        raise InputError(f"the {what} name is longer than 200 characters; choose a shorter name")
    check_name(name, what)
    return name


def register(
    session: Session, name: str, prompts: PromptSet, *, parallel_to: str | None = None
) -> tuple[Dataset, bool]:
    """Store a prompt set as dataset ``name``; return (dataset, created).

    Registering the same content under the same name again is a no-op; other content
    under an existing name is refused. Prompts are written with binary COPY.
    """
    validate_name(name)
    digest = content_hash(prompts.texts)
    existing = session.scalar(sa.select(Dataset).where(Dataset.name == name))
    partner = get_dataset(session, parallel_to) if parallel_to else None
    if partner is not None and partner.n_prompts != len(prompts.texts):
        raise InputError(
            f"dataset {name!r} would have {len(prompts.texts)} prompts but its parallel dataset "
            f"{parallel_to!r} has {partner.n_prompts}; parallel datasets pair prompts by position, "
            "so they need the same count"
        )
    if existing is not None:
        if existing.content_hash == digest and existing.parallel_to_id == (partner.id if partner else None):
            return existing, False
        raise InputError(f"a dataset named {name!r} already exists with other prompts; choose another name")
    dataset = Dataset(
        name=name,
        source_kind=prompts.kind,
        source_uri=prompts.uri,
        options=prompts.options,
        n_prompts=len(prompts.texts),
        content_hash=digest,
        parallel_to_id=partner.id if partner else None,
    )
    session.add(dataset)
    session.flush()
    cur = raw_connection(session.connection()).cursor()
    copy_rows(
        cur,
        "prompt",
        ("dataset_id", "position", "text", "content_hash", "source_ref"),
        ("int4", "int4", "text", "text", "text"),
        ((dataset.id, i, text, text_hash(text), ref) for i, (text, ref) in enumerate(zip(prompts.texts, prompts.refs))),
    )
    if partner is not None:
        session.execute(sa.text(LINK_PARALLEL), {"a": dataset.id, "b": partner.id})
        session.execute(sa.text(LINK_PARALLEL), {"a": partner.id, "b": dataset.id})
    return dataset, True


def dataset_prompts(session: Session, dataset_id: int, first: int, last: int) -> list[tuple[int, int, str]]:
    """(prompt id, position, text) for positions first..last inclusive, in order."""
    rows = session.execute(
        sa.select(Prompt.id, Prompt.position, Prompt.text)
        .where(Prompt.dataset_id == dataset_id, Prompt.position.between(first, last))
        .order_by(Prompt.position)
    ).all()
    return [(r[0], r[1], r[2]) for r in rows]


def add_datasets(wh: Warehouse, entries: list[tuple[str, PromptSet]], *, parallel_to: str | None = None) -> list[dict]:
    """Register prompt sets in one transaction; the second of two pairs with the first.

    Returns a summary per dataset. Either all are stored or none.
    """
    from layerbase.warehouse.engine import translate_errors

    summaries = []
    with translate_errors(wh), Session(wh.engine) as session, session.begin():
        partner = parallel_to
        for name, prompts in entries:
            dataset, created = register(session, name, prompts, parallel_to=partner)
            summaries.append(
                {
                    "name": dataset.name,
                    "prompts": dataset.n_prompts,
                    "created": created,
                    "source": dataset.source_uri,
                    "parallel_to": partner,
                }
            )
            if len(entries) == 2:
                partner = name
    if any(s["created"] for s in summaries):
        analyze(wh, "dataset", "prompt")  # lookups join the new prompts by position
    return summaries


def list_datasets(wh: Warehouse) -> list[dict]:
    """Every dataset with its size, source and parallel partner."""
    partner = sa.orm.aliased(Dataset)
    with Session(wh.engine) as session:
        rows = session.execute(
            sa.select(Dataset, partner.name)
            .outerjoin(partner, Dataset.parallel_to_id == partner.id)
            .order_by(Dataset.id)
        ).all()
        return [
            {
                "name": d.name,
                "prompts": d.n_prompts,
                "kind": d.source_kind,
                "source": d.source_uri,
                "parallel_to": p or "",
                "options": d.options,
            }
            for d, p in rows
        ]


def show_prompts(wh: Warehouse, name: str, limit: int | None = None) -> list[dict]:
    """The first ``limit`` prompts of a dataset (all of them without a limit)."""
    with Session(wh.engine) as session:
        dataset = get_dataset(session, name)
        last = dataset.n_prompts - 1 if limit is None else max(limit, 1) - 1
        return [
            {"position": pos, "id": pid, "text": text}
            for pid, pos, text in dataset_prompts(session, dataset.id, 0, last)
        ]
