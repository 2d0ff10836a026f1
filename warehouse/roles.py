"""A read-only role for BI tools: SELECT on the ``bi_*`` views and nothing else.

Views run with their owner's rights, so the role needs no grant on the tables behind them.
"""

from __future__ import annotations

import sqlalchemy as sa
from psycopg import sql

from layerbase.warehouse.engine import Warehouse, raw_connection, translate_errors
from layerbase.warehouse.errors import InputError

BI_VIEWS = ("bi_affinity_cell", "bi_diagonal_test", "bi_max_similarity_path", "bi_steering_eval", "bi_geometry")


def grant_reader(wh: Warehouse, role: str, password: str | None = None) -> list[str]:
    """Create (or update) ``role`` as a login role that can only read the BI views."""
    if not role or len(role) > 63:
        raise InputError("the role name must be 1 to 63 characters")
    with translate_errors(wh), wh.engine.begin() as conn:
        cur = raw_connection(conn).cursor()
        ident = sql.Identifier(role)
        is_super = conn.execute(sa.text("SELECT rolsuper FROM pg_roles WHERE rolname = :r"), {"r": role}).scalar()
        if is_super:
            raise InputError(f"role {role!r} is a superuser; choose another name for a read-only role")
        if is_super is None:  # no such role yet
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE").format(ident))
        if password is not None:
            cur.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident, sql.Literal(password)))
        database = str(conn.execute(sa.text("SELECT current_database()")).scalar_one())
        cur.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {}").format(ident))
        cur.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM {}").format(ident))
        # PUBLIC may create in schema public on servers before PostgreSQL 15.
        cur.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
        cur.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), ident))
        cur.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(ident))
        for view in BI_VIEWS:
            cur.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(view), ident))
    return list(BI_VIEWS)
