"""A read-only role for BI tools: SELECT on the ``bi_*`` views and nothing else.

Views run with their owner's rights, so the role needs no grant on the tables behind them.

A role this command made carries a comment that says so, and is made a reader again on every
run. Any other existing role may hold rights that a reader must not have (attributes such as
CREATEROLE, memberships such as ``pg_write_all_data``, grants on tables). It is refused,
unless the caller asks to strip it: then every attribute, membership and privilege in this
database goes (``DROP OWNED``, which revokes them all, once the role is known to own
nothing here). Either way the role's real privileges are read back from the catalog before
anything is reported, and the transaction rolls back if they are not exactly a reader's.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import sqlalchemy as sa
from psycopg import sql

from layerbase.warehouse.engine import Warehouse, raw_connection, translate_errors
from layerbase.warehouse.errors import InputError

BI_VIEWS = (
    "bi_affinity_cell",
    "bi_diagonal_test",
    "bi_max_similarity_path",
    "bi_affinity_bootstrap",
    "bi_steering_eval",
    "bi_geometry",
)
MARK = "Layerbase BI reader: SELECT on the bi_* views only (layerbase db grant-reader)"

ROLE = """
SELECT r.oid, r.rolsuper, d.description
FROM pg_roles r LEFT JOIN pg_shdescription d ON d.objoid = r.oid AND d.classoid = 'pg_authid'::regclass
WHERE r.rolname = :role
"""
# What the role owns in this database (or this database itself): a reader owns nothing.
OWNED = """
SELECT count(*) FROM pg_shdepend
WHERE refclassid = 'pg_authid'::regclass AND refobjid = :oid AND deptype = 'o'
  AND (dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
       OR (dbid = 0 AND classid = 'pg_database'::regclass
           AND objid = (SELECT oid FROM pg_database WHERE datname = current_database())))
"""
MEMBERSHIPS = """
SELECT g.rolname, b.rolname FROM pg_auth_members m
JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles b ON b.oid = m.grantor
WHERE m.member = :oid
"""
# Every right the role holds, read from the catalog through the has_*_privilege functions,
# which count rights held through PUBLIC and through memberships. One row per right that a
# reader must not have; the BI views' SELECT is the only expected privilege, besides reading
# the catalog views that an extension made and granted to PUBLIC (Citus's citus_tables and
# citus_schemas), which hold no warehouse data.
EXTENSION_RELATION = (
    "EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')"
)
VIOLATIONS = f"""
SELECT 'role attribute ' || a FROM pg_roles r,
  LATERAL (VALUES ('SUPERUSER', r.rolsuper), ('CREATEDB', r.rolcreatedb), ('CREATEROLE', r.rolcreaterole),
                  ('REPLICATION', r.rolreplication), ('BYPASSRLS', r.rolbypassrls)) AS t(a, held)
  WHERE r.oid = :oid AND held
UNION ALL
SELECT 'member of ' || g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = :oid
UNION ALL
SELECT format('%s on %I.%I', p, n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
  LATERAL unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER']) AS p
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
  AND has_table_privilege(:oid, c.oid, p)
  AND NOT (p = 'SELECT' AND n.nspname = 'public' AND c.relname = ANY(:views))
  AND NOT (p = 'SELECT' AND {EXTENSION_RELATION})
UNION ALL
SELECT format('column rights on %I.%I', n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
  AND NOT (n.nspname = 'public' AND c.relname = ANY(:views))
  AND has_any_column_privilege(
      :oid, c.oid,
      CASE WHEN {EXTENSION_RELATION} THEN 'INSERT, UPDATE, REFERENCES' ELSE 'SELECT, INSERT, UPDATE, REFERENCES' END
  )
UNION ALL
SELECT format('CREATE on schema %I', n.nspname) FROM pg_namespace n
WHERE n.nspname NOT LIKE 'pg\\_%' AND has_schema_privilege(:oid, n.oid, 'CREATE')
UNION ALL
SELECT 'CREATE on database ' || current_database() WHERE has_database_privilege(:oid, current_database(), 'CREATE')
UNION ALL
SELECT 'default privileges on new objects' FROM pg_default_acl d, aclexplode(d.defaclacl) e WHERE e.grantee = :oid
UNION ALL
SELECT 'no SELECT on ' || v FROM unnest(CAST(:views AS text[])) v
WHERE to_regclass(v) IS NULL OR NOT has_table_privilege(:oid, to_regclass(v), 'SELECT')
"""


@dataclass(frozen=True)
class Reader:
    """A role verified to be a reader: what it can do, as read from the catalog."""

    role: str
    views: list[str]
    database: str
    created: bool
    stripped: bool
    temporary_tables: bool  # PUBLIC's default TEMP right on the database, which every role has


def grant_reader(wh: Warehouse, role: str, password: str | None = None, *, strip_existing: bool = False) -> Reader:
    """Make ``role`` a login role that can read the BI views and nothing else; see the module."""
    if not role or len(role) > 63:
        raise InputError("the role name must be 1 to 63 characters")
    with translate_errors(wh), wh.engine.begin() as conn:
        cur = raw_connection(conn).cursor()
        ident = sql.Identifier(role)
        found = conn.execute(sa.text(ROLE), {"role": role}).first()
        stripped = False
        if found is not None:
            oid, is_super, comment = found
            if is_super:
                raise InputError(f"role {role!r} is a superuser; choose another name for a read-only role")
            if comment != MARK and not strip_existing:
                raise InputError(
                    f"role {role!r} already exists and was not made by `layerbase db grant-reader`, so it may "
                    "hold other rights (attributes, memberships, grants); choose a new name, or pass "
                    "--strip-existing to remove every right it has here and leave it a reader"
                )
            owned = conn.execute(sa.text(OWNED), {"oid": oid}).scalar_one()
            if owned:
                raise InputError(
                    f"role {role!r} owns {owned} objects in this database, which a reader must not; "
                    f"choose a new name, or move them first (REASSIGN OWNED BY {role} TO another role)"
                )
            _strip(conn, cur, ident, oid)
            stripped = comment != MARK
        else:
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
            oid = conn.execute(sa.text(ROLE), {"role": role}).scalar_one()
        cur.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(ident, sql.Literal(MARK)))
        if password is not None:
            # Whatever the server's default: a password for a TCP client is kept as a SCRAM
            # verifier, never as md5 or plain text.
            cur.execute("SET LOCAL password_encryption = 'scram-sha-256'")
            cur.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident, sql.Literal(password)))
        database = str(conn.execute(sa.text("SELECT current_database()")).scalar_one())
        # PUBLIC may create in schema public on servers before PostgreSQL 15.
        cur.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
        cur.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), ident))
        cur.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(ident))
        for view in BI_VIEWS:
            cur.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(view), ident))
        wrong = conn.execute(sa.text(VIOLATIONS), {"oid": oid, "views": list(BI_VIEWS)}).scalars().all()
        if wrong:  # the transaction rolls back: nothing changed
            raise InputError(
                f"role {role!r} would still hold rights beyond reading the BI views ({'; '.join(wrong[:8])}"
                f"{'; …' if len(wrong) > 8 else ''}), granted through PUBLIC or by another owner; "
                "revoke them, or choose another database for BI"
            )
        temporary = bool(
            conn.execute(
                sa.text("SELECT has_database_privilege(:oid, current_database(), 'TEMP')"), {"oid": oid}
            ).scalar_one()
        )
    return Reader(role, list(BI_VIEWS), database, found is None, stripped, temporary)


def _strip(conn: sa.Connection, cur: psycopg.Cursor, ident: sql.Identifier, oid: int) -> None:
    """Remove every attribute, membership and privilege (in this database) of a role that
    owns nothing here."""
    cur.execute(sql.SQL("ALTER ROLE {} LOGIN NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS").format(ident))
    new_server = conn.execute(sa.text("SHOW server_version_num")).scalar_one()
    for granted, grantor in conn.execute(sa.text(MEMBERSHIPS), {"oid": oid}).all():
        # PostgreSQL 16 records each grantor; a REVOKE removes only the grant of the one named.
        by = sql.SQL(" GRANTED BY {}").format(sql.Identifier(grantor)) if int(new_server) >= 160000 else sql.SQL("")
        cur.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(granted), ident) + by)
    # With nothing owned, DROP OWNED only revokes: every privilege granted to the role on
    # this database's objects, on the database itself, and its default privileges.
    cur.execute(sql.SQL("DROP OWNED BY {}").format(ident))
