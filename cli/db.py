"""``layerbase db``: create and inspect the warehouse."""

from __future__ import annotations

import click

from layerbase.cli.common import Context, emit, json_option, table


@click.group()
def db() -> None:
    """Create, upgrade and inspect the warehouse database."""


@db.command()
@click.pass_obj
def upgrade(obj: Context) -> None:
    """Create or upgrade the schema to the newest migration."""
    from layerbase.warehouse.status import upgrade_schema

    before, after, display = upgrade_schema(obj.warehouse(check_schema=False))
    if before == after:
        click.echo(f"Schema already at {after} ({display}).")
    else:
        click.echo(f"Schema upgraded {before or '(empty)'} -> {after} ({display}).")


@db.command()
@json_option
@click.pass_obj
def status(obj: Context, as_json: bool) -> None:
    """Show the server, pgvector, the migration revision and row counts."""
    from layerbase.warehouse.status import database_status

    info = database_status(obj.warehouse(check_schema=False))
    counts = info.pop("row_counts")
    text = "\n".join(f"{k.replace('_', ' ')}: {v}" for k, v in info.items())
    text += "\n\n" + table([{"table": t, "rows": n} for t, n in counts.items()], ["table", "rows"])
    emit({**info, "row_counts": counts}, as_json, text)


@db.command()
@click.option("--shard-count", type=int, help="Shards of each distributed table (default: Citus's citus.shard_count).")
@json_option
@click.pass_obj
def distribute(obj: Context, shard_count: int | None, as_json: bool) -> None:
    """On a Citus coordinator: distribute the hot tables (activations by model, neighbour lists
    by prompt) and make the rest reference tables (docs/scale-out.md). Idempotent."""
    from layerbase.warehouse.distribute import distribute as run

    placed = run(obj.warehouse(), shard_count=shard_count)
    rows = [{**p.as_dict(), "changed": p.changed} for p in placed]
    changed = sum(p.changed for p in placed)
    emit(
        [p.as_dict() for p in placed],
        as_json,
        table(rows, ["table", "kind", "column", "shards", "changed"]) + f"\n{changed} tables changed.",
    )


@db.command()
def stop() -> None:
    """Stop the embedded server (it starts again on the next command)."""
    from layerbase.warehouse.embedded import stop_embedded

    click.echo("Embedded server stopped." if stop_embedded() else "The embedded server was not running.")


@db.command("move-embedded")
@json_option
def move_embedded(as_json: bool) -> None:
    """Copy an embedded warehouse made by Layerbase before 0.2 (PostgreSQL 16) into a new
    PostgreSQL 18 data directory; the old directory is kept beside it, renamed."""
    from layerbase.warehouse.move import move_embedded as move

    report = move()
    tables = ", ".join(f"{t} {n}" for t, n in report.row_counts.items() if n)
    emit(
        report.as_dict(),
        as_json,
        f"Moved the embedded warehouse from {report.old_server} to {report.new_server} in {report.seconds:.0f} s.\n"
        f"Rows copied and checked: {tables}; activation checksum {report.checksum} agrees.\n"
        f"The old data directory is kept at {report.kept_as}; delete it when you no longer need it.",
    )


@db.command("grant-reader")
@click.argument("role")
@click.option("--password-env", metavar="VAR", help="Set the role's password (SCRAM) from this environment variable.")
@click.option(
    "--strip-existing",
    is_flag=True,
    help="ROLE exists already: remove every attribute, membership and privilege it has here, then make it a reader.",
)
@click.pass_obj
def grant_reader(obj: Context, role: str, password_env: str | None, strip_existing: bool) -> None:
    """Create ROLE: a login that can read the BI views (bi_*) and nothing else.

    An existing role is refused unless this command made it, or --strip-existing is given.
    What is reported is read back from the server's catalog."""
    import os

    from layerbase.warehouse.roles import grant_reader as grant

    password = None
    if password_env:
        password = os.environ.get(password_env)
        if not password:
            raise click.UsageError(f"--password-env {password_env}: that variable is not set")
    reader = grant(obj.warehouse(), role, password, strip_existing=strip_existing)
    done = "Created" if reader.created else "Stripped and re-granted" if reader.stripped else "Re-granted"
    click.echo(
        f"{done} role {role!r}. Verified in the catalog of database {reader.database!r}: a login with no role "
        f"attributes and no memberships; SELECT on {', '.join(reader.views)}; no other right on any table, "
        "view, sequence or column, no CREATE on the database or any schema"
        + (", and (as every role by default) temporary tables." if reader.temporary_tables else ".")
    )
