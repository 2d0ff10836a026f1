"""A k-NN run's sets as two rank-major arrays (``knn_array``): how they are packed when a run
is stored, and how the first k neighbours of every prompt of many runs are read back.

``knn_neighbor`` keeps one row per prompt, for SQL and for looking up one prompt. A measure
over all layer pairs reads every prompt of every layer instead, and row by row that cost
more than the measure: at 30 + 18 layers of 2048 prompts, 80 ms on the server to build
each side's arrays (``array_agg`` of 61k and 37k rows, each element sent through its own
output function), against 12 ms for both sides from ``knn_array``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from psycopg import sql

from layerbase.warehouse.copy import read_keyed_fields
from layerbase.warehouse.engine import raw_connection
from layerbase.warehouse.errors import InputError

# The first k ranks of each run, in one binary COPY: the run's index in the list, then the
# prefixes of its arrays (``substring`` of an uncompressed column reads only those bytes).
STORED_SETS = """
SELECT array_position({runs}, a.run_id) - 1, r.n_prompts,
       substring(a.neighbors FROM 1 FOR 4 * r.n_prompts * {k}){distances}
FROM knn_array a JOIN knn_run r ON r.id = a.run_id
WHERE a.run_id = ANY({runs})
"""
DISTANCES = ", substring(a.distances FROM 1 FOR 4 * r.n_prompts * {k})"
# A run's arrays are one value each, and a PostgreSQL value holds at most 1 GB: n x k_max
# entries of 4 bytes, with room for the varlena header.
MAX_PACKED_SETS = ((1 << 30) - 64) // 4
# Wire (big-endian) dtype -> the dtype of the arrays handed out.
WIRE_INT, WIRE_FLOAT = np.dtype(">i4"), np.dtype(">f4")
NATIVE = {WIRE_INT: np.int32, WIRE_FLOAT: np.float32}


@dataclass
class RunArrays:
    """A run's sets being gathered for ``knn_array``: [n, k_max] neighbour positions (-1
    where missing) and cosine distances (infinity where missing), rows by position."""

    neighbors: np.ndarray
    distances: np.ndarray

    @classmethod
    def empty(cls, n: int, k_max: int) -> RunArrays:
        return cls(np.full((n, k_max), -1, dtype=np.int32), np.full((n, k_max), np.inf, dtype=np.float32))

    def add(
        self, positions: np.ndarray, neighbors: np.ndarray, distances: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Take the sets of the prompts at ``positions``; return them, for chaining."""
        self.neighbors[positions] = neighbors
        self.distances[positions] = distances
        return positions, neighbors, distances

    def store(self, conn: sa.Connection, run_id: int) -> None:
        conn.execute(
            sa.text("INSERT INTO knn_array (run_id, neighbors, distances) VALUES (:run, :neighbors, :distances)"),
            {
                "run": run_id,
                "neighbors": self.neighbors.T.astype(WIRE_INT).tobytes(),  # rank-major: the transpose's rows
                "distances": self.distances.T.astype(WIRE_FLOAT).tobytes(),
            },
        )


def stored_sets(conn: sa.Connection, runs: list[int], k: int, *, distances: bool = False) -> list[list[np.ndarray]]:
    """For each run in ``runs`` (in that order), [neighbours [n, k]] or, with ``distances``,
    [neighbours, distances [n, k]]; rows by position, -1 (and infinity) where an index found
    fewer than k. Every run must hold at least k neighbours per prompt."""
    query = sql.SQL(STORED_SETS).format(
        runs=sql.SQL("{}::int[]").format(sql.Literal(runs)),
        k=sql.Literal(k),
        distances=sql.SQL(DISTANCES).format(k=sql.Literal(k)) if distances else sql.SQL(""),
    )
    out: list[list[np.ndarray] | None] = [None] * len(runs)
    for index, (n_field, *arrays) in read_keyed_fields(raw_connection(conn).cursor(), query):
        n = int.from_bytes(n_field, "big")
        if any(len(field) != 4 * n * k for field in arrays):
            raise InputError(f"a stored k-NN set holds fewer than {k} neighbours per prompt; lower k")
        out[index] = [
            np.ascontiguousarray(np.frombuffer(field, dtype=wire).reshape(k, n).T, dtype=NATIVE[wire])
            for field, wire in zip(arrays, (WIRE_INT, WIRE_FLOAT))
        ]
    missing = [run for run, sets in zip(runs, out) if sets is None]
    if missing:
        raise InputError(f"k-NN runs {missing} are not stored; recompute them (`layerbase knn --force`)")
    return out  # type: ignore[return-value]  # no None is left
