"""The ingest job runner: register the model, plan the job, and work through its chunks.

Atomicity unit: one chunk (= one forward batch). A worker claims a pending chunk with
``SELECT … FOR UPDATE SKIP LOCKED`` and, in that same transaction, COPYs the chunk's
activations and tokenization records and marks the chunk done. A crash (even
``kill -9``) rolls the transaction back and releases the lock, so a re-run (or another
worker) redoes exactly the missing chunks: no duplicates, no gaps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from layerbase.ingest.datasets import dataset_prompts, validate_name
from layerbase.ingest.extract import ExtractionSettings, Extractor, NonFiniteActivation
from layerbase.ingest.loading import (
    LoadedModel,
    check_fingerprint,
    default_model_name,
    open_model,
    source_fingerprint,
    source_identity,
)
from layerbase.warehouse.copy import copy_columns
from layerbase.warehouse.engine import Warehouse, raw_connection
from layerbase.warehouse.errors import InputError
from layerbase.warehouse.models import Activation, Dataset, IngestChunk, IngestJob, Model
from layerbase.warehouse.storage import FLOAT32, HALF_MAX, STORAGES, Storage, require_storage

log = logging.getLogger(__name__)

CLAIM_CHUNK = """
SELECT chunk_no, first_position, last_position FROM ingest_chunk
WHERE job_id = :job AND NOT done
ORDER BY chunk_no
LIMIT 1
FOR UPDATE SKIP LOCKED
"""
JOB_PROGRESS = """
SELECT count(*) FILTER (WHERE done) AS chunks_done,
       coalesce(sum(last_position - first_position + 1) FILTER (WHERE done), 0) AS prompts_done,
       count(*) AS chunks
FROM ingest_chunk WHERE job_id = :job
"""
# Identity of an extraction: a model name stands for exactly these.
IDENTITY_FIELDS = ("source", "revision", "gguf_file", "dtype", "pooling", "padding_side", "max_tokens", "chat_template")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def library_versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__, "tokenizers": tokenizers.__version__}


def model_row_values(lm: LoadedModel, name: str, extractor: Extractor) -> dict[str, Any]:
    versions = library_versions()
    s = extractor.settings
    config = lm.model.config.to_diff_dict()
    return {
        "name": name,
        "source": lm.source,
        "revision": lm.revision,
        "gguf_file": lm.gguf_file,
        "architecture": lm.architecture,
        "kind": lm.kind,
        "n_layers": lm.n_layers,
        "width": lm.width,
        "vocab_size": lm.vocab_size,
        "dtype": lm.dtype,
        "hook_site": lm.hook_site,
        "pooling": s.pooling,
        "padding_side": s.padding_side,
        "max_tokens": extractor.limit,
        "chat_template": s.chat_template,
        "tied_embeddings": lm.tied_embeddings,
        "config": _jsonable(config),
        "transformers_version": versions["transformers"],
        "torch_version": versions["torch"],
        "fingerprint": lm.fingerprint,
    }


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def ensure_model(
    session: Session, lm: LoadedModel, name: str, extractor: Extractor, storage: str | None = None
) -> Model:
    """The model row for this (weights, extraction settings), created if new.

    A name already used for other weights or settings is refused: the key
    (model, layer, prompt) must mean one extraction. So is another ``storage`` (float32 or
    float16) once the model has activations or a job that has not failed; None (token
    embeddings) takes the model's.
    """
    validate_name(name, "model")
    values = model_row_values(lm, name, extractor)
    session.execute(
        insert(Model).values(**values, storage=storage or FLOAT32.name).on_conflict_do_nothing(index_elements=["name"])
    )
    model = session.scalar(sa.select(Model).where(Model.name == name))
    assert model is not None
    diffs = [
        f"{f}={getattr(model, f)!r} (now {values[f]!r})" for f in IDENTITY_FIELDS if getattr(model, f) != values[f]
    ]
    if not diffs:
        check_fingerprint(model, lm.fingerprint)
        if model.fingerprint is None and lm.fingerprint is not None:  # stored before fingerprints: adopted
            model.fingerprint = lm.fingerprint
            session.flush()
    if storage is not None and model.storage != storage:
        # A live job fixes the storage even before its first chunk commits elsewhere.
        if session.scalar(sa.select(sa.exists().where(Activation.model_id == model.id))) or session.scalar(
            sa.select(sa.exists().where(IngestJob.model_id == model.id, IngestJob.state != "failed"))
        ):
            diffs.append(f"storage={model.storage!r} (now {storage!r})")
        else:  # no activations yet (made by `embeddings export`, or a failed first ingest): as now asked
            model.storage = storage
            session.flush()
    if diffs:
        raise InputError(
            f"model name {name!r} is already used for another extraction ({'; '.join(diffs)}); "
            "pass --name to store this one under a new name"
        )
    return model


def ensure_job(session: Session, model: Model, dataset: Dataset, *, include_layer0: bool, batch_size: int) -> IngestJob:
    """The job for (model, dataset), planned into chunks if new."""
    if batch_size <= 0:
        raise InputError(f"--batch-size must be positive, got {batch_size}")
    n = dataset.n_prompts
    n_chunks = (n + batch_size - 1) // batch_size
    job_id = session.scalar(
        insert(IngestJob)
        .values(
            model_id=model.id,
            dataset_id=dataset.id,
            include_layer0=include_layer0,
            batch_size=batch_size,
            n_prompts=n,
            n_chunks=n_chunks,
            settings={"created_by": worker_id(), **library_versions()},
        )
        .on_conflict_do_nothing(index_elements=["model_id", "dataset_id"])
        .returning(IngestJob.id)
    )
    if job_id is not None:
        session.execute(
            insert(IngestChunk),
            [
                {
                    "job_id": job_id,
                    "chunk_no": c,
                    "first_position": c * batch_size,
                    "last_position": min(n, (c + 1) * batch_size) - 1,
                }
                for c in range(n_chunks)
            ],
        )
    job = session.scalar(sa.select(IngestJob).where(IngestJob.model_id == model.id, IngestJob.dataset_id == dataset.id))
    assert job is not None
    if job.include_layer0 != include_layer0:
        have = "with" if job.include_layer0 else "without"
        raise InputError(
            f"model {model.name!r} was already ingested on {dataset.name!r} {have} layer 0; "
            f"re-run {'with' if job.include_layer0 else 'without'} --layer0, or use --name for a separate extraction"
        )
    return job


@dataclass
class JobReport:
    """What a run of a job did and where the job stands."""

    job_id: int
    model: str
    dataset: str
    n_prompts: int
    prompts_done: int
    prompts_written_now: int
    chunks_left: int
    state: str
    n_truncated_now: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def job_progress(conn: sa.Connection, job_id: int) -> tuple[int, int, int]:
    """(chunks done, prompts done, chunks) of a job."""
    row = conn.execute(sa.text(JOB_PROGRESS), {"job": job_id}).one()
    return int(row.chunks_done), int(row.prompts_done), int(row.chunks)


def _set_state(wh: Warehouse, job_id: int, state: str, error: str | None = None) -> None:
    def attempt() -> None:
        with wh.engine.begin() as conn:
            conn.execute(
                sa.update(IngestJob)
                .where(IngestJob.id == job_id)
                .values(
                    state=state,
                    error=error,
                    updated_at=sa.func.now(),
                    finished_at=sa.func.now() if state == "done" else None,
                )
            )

    _retried("the job's state", attempt)


def run_job(
    wh: Warehouse,
    job: IngestJob,
    extractor: Extractor,
    *,
    model_name: str,
    dataset_name: str,
    progress: bool = True,
    storage: Storage = FLOAT32,
) -> JobReport:
    """Process the job's pending chunks until none is left to claim, storing activations
    as ``storage`` (the model's)."""
    from tqdm.auto import tqdm

    worker = worker_id()
    with wh.engine.connect() as conn:
        _, done_before, _ = job_progress(conn, job.id)
    if done_before < job.n_prompts:
        _set_state(wh, job.id, "running")
    bar = tqdm(
        total=job.n_prompts,
        initial=done_before,
        unit="prompt",
        desc=f"{model_name} × {dataset_name}",
        disable=not progress,
        dynamic_ncols=True,
    )
    written = truncated = 0
    try:
        while True:
            n, n_trunc = _chunk_with_retries(wh, job, extractor, worker, dataset_name, storage)
            if n == 0:
                break
            written += n
            truncated += n_trunc
            bar.update(n)
    except Exception as exc:
        from layerbase.warehouse.errors import LayerbaseError

        message = str(exc) if isinstance(exc, LayerbaseError) else f"{type(exc).__name__}: {exc}"
        # The database itself may be what failed; the original error is the one to raise.
        with contextlib.suppress(sa.exc.SQLAlchemyError):
            _set_state(wh, job.id, "failed", message)
        raise
    finally:
        bar.close()
    with wh.engine.connect() as conn:
        chunks_done, prompts_done, chunks = job_progress(conn, job.id)
    state = "done" if chunks_done == chunks else "running"
    if state == "done":
        _set_state(wh, job.id, "done")
    return JobReport(
        job.id, model_name, dataset_name, job.n_prompts, prompts_done, written, chunks - chunks_done, state, truncated
    )


# A chunk is one transaction, so a chunk whose connection was lost (the server restarted,
# a failover, a network blip) is simply claimed and computed again. The waits cover a
# server restart (a few seconds); a server down for longer ends the command with the
# connection error, and re-running resumes. A deadlock is retried the same way: on Citus,
# a chunk's writes lock the reference tables' shards that its foreign keys point at, and
# two workers (one storing a chunk, the other marking the job done) could take those locks
# in opposite orders (seen on a local cluster: "canceling the transaction since it was
# involved in a distributed deadlock").
CHUNK_RETRY_WAITS = (0.5, 1.0, 2.0, 4.0, 8.0)
T = TypeVar("T")


def _retried(what: str, attempt: Callable[[], T]) -> T:
    """``attempt`` (one transaction), again after a lost connection or a deadlock
    (``CHUNK_RETRY_WAITS``)."""
    for number, wait in enumerate((*CHUNK_RETRY_WAITS, None), start=1):
        try:
            return attempt()
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            if wait is None:
                raise
            deadlock = isinstance(exc.orig, psycopg.errors.DeadlockDetected)
            log.warning(
                "%s (%s); retrying %s in %g s (attempt %d of %d)",
                "a deadlock with another worker" if deadlock else "the database connection was lost",
                str(exc.orig or exc).strip().splitlines()[0] if str(exc.orig or exc).strip() else type(exc).__name__,
                what,
                wait,
                number + 1,
                len(CHUNK_RETRY_WAITS) + 1,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def _chunk_with_retries(
    wh: Warehouse, job: IngestJob, extractor: Extractor, worker: str, dataset_name: str, storage: Storage
) -> tuple[int, int]:
    """``_process_one_chunk``, again after a lost connection or a deadlock (``_retried``)."""
    return _retried("the chunk", lambda: _process_one_chunk(wh, job, extractor, worker, dataset_name, storage))


def _process_one_chunk(
    wh: Warehouse, job: IngestJob, extractor: Extractor, worker: str, dataset_name: str, storage: Storage
) -> tuple[int, int]:
    """Claim, extract and store one chunk in one transaction; (prompts, truncated) or (0, 0)."""
    with wh.engine.begin() as conn:
        claimed = conn.execute(sa.text(CLAIM_CHUNK), {"job": job.id}).first()
        if claimed is None:
            return 0, 0
        with Session(bind=conn) as session:
            prompts = dataset_prompts(session, job.dataset_id, claimed.first_position, claimed.last_position)
        ids = np.array([p[0] for p in prompts], dtype=np.int64)
        try:
            batch = extractor([p[2] for p in prompts])
        except NonFiniteActivation as exc:
            pid, position, text = prompts[exc.index]
            preview = text[:60] + ("…" if len(text) > 60 else "")
            raise InputError(
                f"prompt {position} (id {pid}) of dataset {dataset_name!r} gave NaN/Inf activations at "
                f"layer {exc.layer}: {preview!r}; nothing of its batch was stored. Check the model's weights "
                "and --dtype (float16 overflows; try float32), or remove the prompt"
            ) from None
        n_prompts, n_layers, _ = batch.vectors.shape
        rows = batch.vectors.reshape(n_prompts * n_layers, -1)
        vectors, bad = storage.encode(rows)
        if bad is not None:
            pid, position, _ = prompts[bad // n_layers]
            raise InputError(
                f"prompt {position} (id {pid}) of dataset {dataset_name!r} has an activation of magnitude "
                f"{float(np.abs(rows[bad]).max()):.4g} at layer {batch.layers[bad % n_layers]}, beyond float16's "
                f"range ({HALF_MAX:.0f}); nothing of its batch was stored. Store this model as float32 "
                "(`--storage float32`, under another --name if it already has activations)"
            )
        cur = raw_connection(conn).cursor()
        copy_columns(
            cur,
            "activation",
            ("model_id", "layer", "prompt_id", "dataset_id", storage.column),
            [
                ("int4", np.full(n_prompts * n_layers, job.model_id, dtype=np.int32)),
                ("int2", np.tile(np.array(batch.layers, dtype=np.int16), n_prompts)),
                ("int8", np.repeat(ids, n_layers)),
                ("int4", np.full(n_prompts * n_layers, job.dataset_id, dtype=np.int32)),
                (storage.type, vectors),
            ],
        )
        copy_columns(
            cur,
            "prompt_encoding",
            ("model_id", "prompt_id", "job_id", "n_tokens", "n_tokens_full", "truncated"),
            [
                ("int4", np.full(n_prompts, job.model_id, dtype=np.int32)),
                ("int8", ids),
                ("int4", np.full(n_prompts, job.id, dtype=np.int32)),
                ("int4", batch.n_tokens),
                ("int4", batch.n_tokens_full),
                ("bool", batch.truncated),
            ],
        )
        conn.execute(
            sa.update(IngestChunk)
            .where(IngestChunk.job_id == job.id, IngestChunk.chunk_no == claimed.chunk_no)
            .values(done=True, worker=worker, done_at=sa.func.now())
        )
    return n_prompts, int(batch.truncated.sum())


def _finished_report(
    session: Session,
    name: str,
    dataset: Dataset,
    source: str,
    revision: str | None,
    dtype: str,
    settings: ExtractionSettings,
    include_layer0: bool,
    storage: str = FLOAT32.name,
) -> JobReport | None:
    """The report of an already complete job with these settings, or None.

    Compares what is known before loading the model (the gguf file and the default token
    limit come from the loaded model; ``ensure_model`` checks those once it is loaded).
    """
    model = session.scalar(sa.select(Model).where(Model.name == name))
    if model is None:
        return None
    job = session.scalar(sa.select(IngestJob).where(IngestJob.model_id == model.id, IngestJob.dataset_id == dataset.id))
    if job is None or job.state != "done" or job.include_layer0 != include_layer0:
        return None
    wanted: dict[str, object] = {
        "source": source_identity(source),
        "revision": revision,
        "dtype": dtype,
        "pooling": settings.pooling,
        "padding_side": settings.padding_side,
        "chat_template": settings.chat_template,
        "storage": storage,
    }
    if settings.max_tokens is not None:
        wanted["max_tokens"] = settings.max_tokens
    if any(getattr(model, field) != value for field, value in wanted.items()):
        return None
    return JobReport(job.id, name, dataset.name, job.n_prompts, job.n_prompts, 0, 0, "done", 0)


def ingest(wh: Warehouse, source: str, dataset_name: str, **options: Any) -> JobReport:
    """Run a model over a dataset and store every block's pooled activation per prompt.

    Idempotent and resumable: only chunks not yet stored are computed. Options are those
    of ``ingest_datasets``.
    """
    return ingest_datasets(wh, source, [dataset_name], **options)[0]


def ingest_datasets(
    wh: Warehouse,
    source: str,
    dataset_names: list[str],
    *,
    name: str | None = None,
    revision: str | None = None,
    dtype: str = "float32",
    device: str | None = None,
    settings: ExtractionSettings = ExtractionSettings(),
    include_layer0: bool = False,
    batch_size: int = 16,
    progress: bool = True,
    storage: str = FLOAT32.name,
) -> list[JobReport]:
    """Ingest several datasets with one model, loading it at most once (not at all when
    every job is already complete). ``storage``: float32, or float16 (pgvector's halfvec,
    half the size) where the server has it."""
    from layerbase.warehouse.lookup import get_dataset

    if batch_size <= 0:
        raise InputError(f"--batch-size must be positive, got {batch_size}")
    name = name or default_model_name(source)
    validate_name(name, "model")
    reports: list[JobReport | None] = []
    with Session(wh.engine) as session:  # fail fast, before loading a model
        require_storage(session.connection(), storage)
        for dataset_name in dataset_names:
            dataset = get_dataset(session, dataset_name)
            reports.append(
                _finished_report(session, name, dataset, source, revision, dtype, settings, include_layer0, storage)
            )
        complete = [r for r in reports if r is not None]
        if len(complete) == len(reports):
            return complete
        # Files that changed since the name's activations were stored: refused before loading.
        stored = session.scalar(sa.select(Model).where(Model.name == name))
        if stored is not None and stored.source == source_identity(source):
            check_fingerprint(stored, source_fingerprint(source, revision))
    lm = open_model(source, revision=revision, dtype=dtype, device=device, progress=progress)
    extractor = Extractor(lm, settings, include_layer0=include_layer0)
    done: list[JobReport] = []
    for dataset_name, finished in zip(dataset_names, reports):
        if finished is not None:
            done.append(finished)
            continue
        with Session(wh.engine) as session, session.begin():
            model = ensure_model(session, lm, name, extractor, storage)
            dataset = get_dataset(session, dataset_name)
            job = ensure_job(session, model, dataset, include_layer0=include_layer0, batch_size=batch_size)
            session.expunge(job)
        done.append(
            run_job(
                wh,
                job,
                extractor,
                model_name=name,
                dataset_name=dataset_name,
                progress=progress,
                storage=STORAGES[storage],
            )
        )
    return done
