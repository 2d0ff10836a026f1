"""Bulk writes with binary COPY.

psycopg's ``Copy.write_row`` formats each row in Python (and pgvector's dumper builds a
``Vector`` object per row). For hundreds of thousands of activation rows that dominates
ingest time, so this module builds the whole binary COPY stream with numpy in one go:
the format is fixed-width for every column we bulk-load (ints and float4 vectors), so a
numpy structured array *is* the wire format. Text columns go through ``write_row``.

Binary COPY format: https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4
pgvector's binary ``vector``: int16 dim, int16 unused, dim × float4 (all big-endian);
``halfvec`` the same with dim × float2.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import psycopg
import psycopg.sql

SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
TRAILER = b"\xff\xff"

# Postgres type name -> big-endian numpy dtype of its binary wire form.
FIXED_TYPES = {"int2": ">i2", "int4": ">i4", "int8": ">i8", "float4": ">f4", "float8": ">f8", "bool": "?"}
# pgvector's vector types: wire dtype of an element.
VECTOR_TYPES = {"vector": ">f4", "halfvec": ">f2"}
# One-dimensional arrays without NULLs: element type oid and wire dtype.
ARRAY_TYPES = {"int4[]": (23, ">i4"), "float4[]": (700, ">f4")}


def binary_copy_payload(columns: Sequence[tuple[str, np.ndarray]]) -> bytes:
    """The binary COPY stream for rows given column-wise.

    Each column is (postgres type, array): a fixed type with a 1-D array of n values,
    ``vector`` or ``halfvec`` with an (n, d) float array, or ``int4[]``/``float4[]`` with an (n, k) array
    (every row an array of k elements). Every column must have n rows.
    """
    n = len(columns[0][1])
    fields: list[tuple[Any, ...]] = [("nfields", ">i2")]  # numpy structured-dtype fields
    for i, (pgtype, values) in enumerate(columns):
        if len(values) != n:
            raise ValueError("all columns must have the same number of rows")
        fields.append((f"len{i}", ">i4"))
        if pgtype in VECTOR_TYPES:
            d = values.shape[1]
            fields += [(f"dim{i}", ">i2"), (f"unused{i}", ">i2"), (f"val{i}", VECTOR_TYPES[pgtype], (d,))]
        elif pgtype in ARRAY_TYPES:
            k = values.shape[1]
            element = np.dtype([("len", ">i4"), ("v", ARRAY_TYPES[pgtype][1])])
            fields += [
                (f"ndim{i}", ">i4"),
                (f"nulls{i}", ">i4"),
                (f"oid{i}", ">i4"),
                (f"size{i}", ">i4"),
                (f"lbound{i}", ">i4"),
                (f"val{i}", element, (k,)),
            ]
        else:
            fields.append((f"val{i}", FIXED_TYPES[pgtype]))
    rows = np.empty(n, dtype=np.dtype(fields))
    rows["nfields"] = len(columns)
    for i, (pgtype, values) in enumerate(columns):
        if pgtype in VECTOR_TYPES:
            d = values.shape[1]
            rows[f"len{i}"] = 4 + np.dtype(VECTOR_TYPES[pgtype]).itemsize * d
            rows[f"dim{i}"] = d
            rows[f"unused{i}"] = 0
            rows[f"val{i}"] = values
        elif pgtype in ARRAY_TYPES:
            k = values.shape[1]
            rows[f"len{i}"] = 20 + 8 * k
            rows[f"ndim{i}"], rows[f"nulls{i}"], rows[f"oid{i}"] = 1, 0, ARRAY_TYPES[pgtype][0]
            rows[f"size{i}"], rows[f"lbound{i}"] = k, 1
            rows[f"val{i}"]["len"] = 4
            rows[f"val{i}"]["v"] = values
        else:
            rows[f"len{i}"] = np.dtype(FIXED_TYPES[pgtype]).itemsize
            rows[f"val{i}"] = values
    return SIGNATURE + rows.tobytes() + TRAILER


def copy_columns(
    cur: psycopg.Cursor, table: str, names: Sequence[str], columns: Sequence[tuple[str, np.ndarray]]
) -> int:
    """COPY rows (given column-wise, see ``binary_copy_payload``) into ``table``.

    ``table`` and ``names`` are identifiers chosen by the code, never user input.
    """
    return copy_column_blocks(cur, table, names, [columns])


def copy_column_blocks(
    cur: psycopg.Cursor, table: str, names: Sequence[str], blocks: Iterable[Sequence[tuple[str, np.ndarray]]]
) -> int:
    """One COPY of rows that arrive in blocks (each as for ``copy_columns``): a block is
    sent as soon as it is produced, so the server stores it while the next is computed."""
    statement = f"COPY {table} ({', '.join(names)}) FROM STDIN WITH (FORMAT BINARY)"
    count = 0
    with cur.copy(statement) as copy:
        copy.write(SIGNATURE)
        for columns in blocks:
            if len(columns[0][1]) == 0:
                continue
            # Chunked so that psycopg streams rather than holding a second copy in its buffer.
            view = memoryview(binary_copy_payload(columns))[len(SIGNATURE) : -len(TRAILER)]
            step = 1 << 22
            for start in range(0, len(view), step):
                copy.write(view[start : start + step])
            count += len(columns[0][1])
        copy.write(TRAILER)
    return count


def copy_rows(
    cur: psycopg.Cursor, table: str, names: Sequence[str], types: Sequence[str], rows: Iterable[Sequence[object]]
) -> int:
    """COPY rows with text columns (row by row through psycopg's binary formatter)."""
    count = 0
    with cur.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(list(types))
        for row in rows:
            copy.write_row(row)
            count += 1
    return count


def _copy_out(cur: psycopg.Cursor, query: psycopg.sql.Composable) -> memoryview:
    """The rows of ``COPY (query) TO STDOUT`` in binary, without the header and trailer."""
    buffer = bytearray()
    with cur.copy(psycopg.sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT BINARY)").format(query)) as copy:
        for block in copy:
            buffer += block
    header_ext = int.from_bytes(buffer[15:19], "big")
    return memoryview(buffer)[19 + header_ext : len(buffer) - 2]


def read_positions_and_vectors(
    cur: psycopg.Cursor, query: psycopg.sql.Composable, pgtype: str = "vector"
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``COPY (query) TO STDOUT`` in binary for rows (int4, ``pgtype``: vector or
    halfvec) and parse with numpy; the vectors come back as float32.

    All vectors must have one width (as every activation of a (model, layer) does). The
    rows are fixed-width, so the stream is read as one numpy structured array.
    """
    body = _copy_out(cur, query)
    if len(body) == 0:
        return np.zeros(0, dtype=np.int32), np.zeros((0, 0), dtype=np.float32)
    # row: int16 nfields, int32 len, int32 value, int32 len, int16 dim, int16 unused, element x dim
    dim = int.from_bytes(body[14:16], "big")
    row = np.dtype(
        [
            ("nf", ">i2"),
            ("l0", ">i4"),
            ("pos", ">i4"),
            ("l1", ">i4"),
            ("dim", ">i2"),
            ("unused", ">i2"),
            ("vec", VECTOR_TYPES[pgtype], (dim,)),
        ]
    )
    if len(body) % row.itemsize:
        raise ValueError("vectors of different widths in one layer")
    rows = np.frombuffer(body, dtype=row)
    if (rows["dim"] != dim).any():
        raise ValueError("vectors of different widths in one layer")
    return rows["pos"].astype(np.int32), rows["vec"].astype(np.float32)


def read_keyed_fields(cur: psycopg.Cursor, query: psycopg.sql.Composable) -> list[tuple[int, list[memoryview]]]:
    """Run ``COPY (query) TO STDOUT`` in binary for rows (int4 key, fields…): each row's key and
    its other fields' raw binary values, without NULLs. Meant for a few large rows (a field
    can be megabytes), since psycopg hands a binary COPY over message by message, at about
    2.5 us each."""
    body = _copy_out(cur, query)
    rows, at = [], 0
    while at < len(body):
        n_fields = int.from_bytes(body[at : at + 2], "big")
        at += 2
        fields = []
        for _ in range(n_fields):
            size = int.from_bytes(body[at : at + 4], "big", signed=True)
            if size < 0:
                raise ValueError("a field is NULL")
            fields.append(body[at + 4 : at + 4 + size])
            at += 4 + size
        rows.append((int.from_bytes(fields[0], "big", signed=True), fields[1:]))
    return rows
