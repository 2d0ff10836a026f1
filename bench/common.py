"""Shared pieces of the benchmarks: a throw-away warehouse, repeated and paired timing, and
tables."""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import psycopg

SERVERS = ("embedded", "old")
DATA = ("activation-like", "isotropic")


data_option = click.option(
    "--data",
    type=click.Choice(DATA),
    default="activation-like",
    show_default=True,
    help="activation-like: clusters with the variance spectrum and neighbour contrast of SmolLM2's hidden "
    "states; isotropic: clusters of isotropic noise, whose near-tied neighbours are the hardest case "
    "for an approximate index",
)


def bench_vectors(data: str, n: int, d: int, seed: int) -> Any:
    """Synthetic activations of one of the ``DATA`` kinds."""
    from layerbase.ingest.synthetic import activation_like_vectors, clustered_vectors

    if data == "isotropic":
        return clustered_vectors(n, d, seed=seed)
    return activation_like_vectors(n, d, seed=seed)


storage_option = click.option(
    "--storage",
    type=click.Choice(("float32", "float16")),
    default="float32",
    show_default=True,
    help="how the synthetic activations are stored (`ingest --storage`); float16 needs pgvector 0.7 or later "
    "(not --server old). The reference then computes on the same half-precision values",
)


def as_stored(vectors: Any, storage: str) -> Any:
    """The values a warehouse holds of these float32 vectors under ``storage``."""
    import numpy as np

    return vectors.astype(np.float16).astype(np.float32) if storage == "float16" else vectors


server_option = click.option(
    "--server",
    type=click.Choice(SERVERS),
    default="embedded",
    show_default=True,
    help="embedded: the default server (PostgreSQL 18, pgvector 0.8.5); old: the embedded server of Layerbase "
    "< 0.2 (PostgreSQL 16, pgvector 0.6.2: no halfvec, single-worker HNSW builds), from the test extra, for "
    "comparison with earlier figures",
)


@contextmanager
def bench_warehouse(server: str = "embedded") -> Iterator[Any]:
    """A fresh warehouse in a temporary directory, removed afterwards.

    ``embedded`` is Layerbase's own embedded server; ``old`` the one of Layerbase < 0.2
    (PostgreSQL 16 with pgvector 0.6.2), sized like the embedded one. With
    DATABASE_URL (or LAYERBASE_DATABASE_URL) set, that server is used instead: point it at an
    empty database, since the benchmark stores synthetic models there.
    """
    from layerbase.warehouse.embedded import stop_embedded

    home, old = None, None
    if not (os.environ.get("LAYERBASE_DATABASE_URL") or os.environ.get("DATABASE_URL")):
        home = tempfile.mkdtemp(prefix="layerbase-bench-")
        os.environ["LAYERBASE_HOME"] = home
        if server == "old":
            old = _old_server(Path(home) / "pg16")
            os.environ["LAYERBASE_DATABASE_URL"] = old.get_uri()
    from layerbase.warehouse.engine import connect
    from layerbase.warehouse.status import upgrade_schema

    upgrade_schema(connect(check_schema=False))
    wh = connect()
    try:
        yield wh
    finally:
        wh.engine.dispose()
        if old is not None:
            del os.environ["LAYERBASE_DATABASE_URL"]
            old.cleanup()
        elif home:
            stop_embedded()
        if home:
            shutil.rmtree(home, ignore_errors=True)


def _old_server(pgdata: Path) -> Any:
    """PostgreSQL 16 + pgvector 0.6.2 in ``pgdata``, with the embedded server's memory settings."""
    try:
        import pgserver
    except ImportError:
        raise SystemExit("--server old needs the test extra: pip install -e '.[test]'") from None
    from layerbase.warehouse.embedded import size_memory

    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        restart = size_memory(conn)
    if restart:
        server.stop()
        server.start()
    return server


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls, and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


@dataclass(frozen=True)
class Paired:
    """A subject timed against its reference in rounds (``paired_times``)."""

    reference_s: float  # median over the rounds
    subject_s: float  # median over the rounds
    ratio: float  # median of the rounds' subject / reference
    low: float  # the smallest and largest round's ratio
    high: float
    reference: Any  # the last round's results
    subject: Any

    @property
    def spread(self) -> str:
        """The rounds' ratios as a range, e.g. '2.50-2.69'."""
        return f"{self.low:.2f}-{self.high:.2f}"


def paired_times(
    reference: Callable[[], Any], subject: Callable[[], Any], rounds: int, *, subject_scale: float = 1.0
) -> Paired:
    """Time ``reference`` and then ``subject``, back to back, in each of ``rounds`` rounds.

    These machines' speed drifts by a third within minutes (the same k-NN reference took
    1.5 s and 2.3 s in one hour), so a reference timed before the subject's runs can
    flatter or sink a ratio. A round's two runs see the same machine: the ratio is the
    median of the rounds' ratios. ``subject_scale`` multiplies the subject's times (a
    subject timed on a sample and scaled to the whole)."""
    ref_times, sub_times, ref_result, sub_result = [], [], None, None
    for _ in range(max(1, rounds)):
        start = time.perf_counter()
        ref_result = reference()
        ref_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        sub_result = subject()
        sub_times.append((time.perf_counter() - start) * subject_scale)
    ratios = [s / r for s, r in zip(sub_times, ref_times)]
    return Paired(
        statistics.median(ref_times),
        statistics.median(sub_times),
        statistics.median(ratios),
        min(ratios),
        max(ratios),
        ref_result,
        sub_result,
    )


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """An aligned text table on stdout."""

    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    widths = {c: max(len(c), *(len(fmt(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(fmt(r[c]).rjust(widths[c]) for c in columns))
