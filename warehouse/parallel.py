"""Statements spread over several connections, so that the server uses several cores.

PostgreSQL runs one backend per connection, and its own parallel query plans neither the
per-prompt index scans of the in-database k-NN engines nor (profitably) the overlap join
of the affinity matrix. Work that splits by prompt is therefore cut into items, dealt to
``workers`` connections, each in one read-only transaction, and the results are gathered
here. Splitting by prompt is also how the work divides on Citus, where the k-NN tables
are distributed by prompt (docs/design.md §7).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from layerbase.warehouse.engine import Warehouse, raw_connection

READ_ONLY = "SET TRANSACTION READ ONLY"

Item = TypeVar("Item")
Result = TypeVar("Result")


def default_workers() -> int:
    """Connections used at once: the cores here, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def run_in_parallel(
    wh: Warehouse,
    items: Sequence[Item],
    work: Callable[[psycopg.Cursor, Item], Result],
    *,
    workers: int,
    settings: Sequence[sql.Composable] = (),
) -> list[Result]:
    """``work(cursor, item)`` for every item, on up to ``workers`` connections at once, each
    in one read-only transaction; the results in item order. Each connection runs
    ``settings`` (``SET LOCAL …``) first."""
    shares = [list(range(i, len(items), workers)) for i in range(min(workers, len(items)))]
    results: list[Any] = [None] * len(items)

    def run(share: list[int]) -> None:
        with wh.engine.connect() as conn, conn.begin():
            cur = raw_connection(conn).cursor()
            # The work only reads; the server holds it to that.
            cur.execute(READ_ONLY)
            for statement in settings:
                cur.execute(statement)
            for i in share:
                results[i] = work(cur, items[i])

    if len(shares) <= 1:
        for share in shares:
            run(share)
        return results
    with ThreadPoolExecutor(max_workers=len(shares)) as pool:
        for future in [pool.submit(run, share) for share in shares]:
            future.result()
    return results
