"""The root ``layerbase`` group, global options, and the one place errors become messages.

The subcommand modules import only ``cli.common``, never this module, so that importing
any of them (or running ``python -m layerbase``) has no import cycle.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click
from sqlalchemy.exc import InterfaceError, OperationalError

from layerbase.cli import analyze, cache, dataset, db, demo, geometry, ingest, serve, steer
from layerbase.cli.common import Context
from layerbase.warehouse.errors import LayerbaseError


class LayerbaseGroup(click.Group):
    """Turns LayerbaseError (and a few environment failures) into one clean line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # The reader of our output went away (`layerbase … | head`): not an error of ours.
            # Point stdout at /dev/null so that the interpreter's final flush stays quiet.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)
        except KeyboardInterrupt:
            click.echo("Interrupted; stored work is kept, re-run the command to resume.", err=True)
            ctx.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except LayerbaseError as exc:
            _fail(ctx, str(exc), exc.exit_code)
        except (OperationalError, InterfaceError) as exc:
            from layerbase.warehouse.engine import first_line

            _fail(
                ctx,
                f"the database connection failed: {first_line(exc.orig or exc)}; check that the server "
                "runs, then re-run the command: committed work is kept and it resumes where it stopped",
                3,
            )
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            _fail(
                ctx,
                f"unexpected {type(exc).__name__}: {first} "
                "(re-run with --traceback for details, and report it if it persists)",
                1,
            )


class _WarningLine(logging.Handler):
    """Layerbase's warnings (a retried chunk, an adapted default) as one line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.secho(f"Warning: {record.getMessage()}", fg="yellow", err=True)


def _show_warnings() -> None:
    logger = logging.getLogger("layerbase")
    if not any(isinstance(h, _WarningLine) for h in logger.handlers):
        handler = _WarningLine(logging.WARNING)
        logger.addHandler(handler)


def _fail(ctx: click.Context, message: str, code: int) -> None:
    """Re-raise the error being handled when a traceback is wanted, else print one line and exit."""
    if _traceback_wanted(ctx):
        raise
    click.secho(f"Error: {message}", fg="red", err=True)
    ctx.exit(code)


def _traceback_wanted(ctx: click.Context) -> bool:
    obj = ctx.find_object(Context)
    return bool(obj and obj.traceback) or os.environ.get("LAYERBASE_TRACEBACK") == "1"


@click.group(cls=LayerbaseGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--database-url",
    metavar="URL",
    help="PostgreSQL URL (default: $LAYERBASE_DATABASE_URL, $DATABASE_URL, else the embedded server).",
)
@click.option("--traceback", is_flag=True, help="Show the full stack on errors.")
@click.version_option(package_name="layerbase")
@click.pass_context
def root(ctx: click.Context, database_url: str | None, traceback: bool) -> None:
    """Layerbase: a Postgres + pgvector warehouse for language-model activations."""
    _show_warnings()
    ctx.obj = Context(database_url, traceback)


def _register() -> None:
    for command in (
        demo.demo,
        db.db,
        cache.cache,
        dataset.dataset,
        ingest.ingest_command,
        ingest.jobs,
        ingest.models,
        ingest.embeddings,
        analyze.knn,
        analyze.affinity,
        analyze.affinity_runs,
        analyze.neighbors,
        analyze.report,
        geometry.geometry,
        steer.steer,
        serve.serve,
    ):
        root.add_command(command)


_register()


def main() -> None:
    root(prog_name="layerbase")


if __name__ == "__main__":
    main()
