"""``layerbase serve``: the HTTP JSON API, with models, connections and caches kept warm."""

from __future__ import annotations

import os

import click

from layerbase.cli.common import Context

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--allow-writes", is_flag=True, help="Serve the routes that store (a transferred vector).")
@click.option(
    "--request-timeout",
    type=click.FloatRange(0.1),
    default=300.0,
    show_default=True,
    help="Seconds a request may run before it is answered 503.",
)
@click.option(
    "--token-env",
    default="LAYERBASE_TOKEN",
    show_default=True,
    metavar="VAR",
    help="With --allow-writes: the environment variable that holds the bearer token writes need.",
)
@click.pass_obj
def serve(obj: Context, host: str, port: int, allow_writes: bool, request_timeout: float, token_env: str) -> None:
    """Serve the warehouse over HTTP: JSON under /api, OpenAPI at /openapi.json.

    Reads run in read-only transactions. Writes need --allow-writes and a bearer token, which
    is read from an environment variable, never from the command line."""
    import uvicorn

    from layerbase.cli.server.app import create_app, read_only_api

    token = os.environ.get(token_env) if allow_writes else None
    if allow_writes and not token:
        raise click.UsageError(f"--allow-writes needs a bearer token in ${token_env}; set it, or leave writes off")
    if host not in LOOPBACK:
        click.echo(f"Warning: serving on {host}, beyond this machine; put TLS and a firewall in front", err=True)
    lb = obj.api()
    lb.progress = False
    read = read_only_api(lb)  # every read in a read-only transaction, the same loaded models
    app = create_app(read, lb if allow_writes else None, token, request_timeout)
    click.echo(f"Layerbase on {read.url}: http://{host}:{port}/ (API under /api, OpenAPI at /openapi.json)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
