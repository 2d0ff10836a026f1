"""Shared pieces of the benchmarks: a throw-away warehouse, repeated timing, and tables."""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def bench_warehouse() -> Iterator[Any]:
    """A fresh warehouse: an embedded server in a temporary directory, removed afterwards.

    With DATABASE_URL (or LAYERBASE_DATABASE_URL) set, that server is used instead: point it
    at an empty database, since the benchmark stores synthetic models there.
    """
    home = None
    if not (os.environ.get("LAYERBASE_DATABASE_URL") or os.environ.get("DATABASE_URL")):
        home = tempfile.mkdtemp(prefix="layerbase-bench-")
        os.environ["LAYERBASE_HOME"] = home
    from warehouse.engine import connect
    from warehouse.status import upgrade_schema

    upgrade_schema()
    wh = connect()
    try:
        yield wh
    finally:
        wh.engine.dispose()
        if home:
            from warehouse.embedded import stop_embedded

            stop_embedded()
            shutil.rmtree(home, ignore_errors=True)


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls, and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """An aligned text table on stdout."""
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    widths = {c: max(len(c), *(len(fmt(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(fmt(r[c]).rjust(widths[c]) for c in columns))
