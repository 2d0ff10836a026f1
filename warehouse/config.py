"""Where the warehouse lives: database URL resolution and the data directory.

Precedence: an explicit URL (``--database-url``) > ``LAYERBASE_DATABASE_URL`` >
``DATABASE_URL`` > the embedded server under the data directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote

import platformdirs
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from layerbase.warehouse.errors import ConfigError

URL_ENV_VARS = ("LAYERBASE_DATABASE_URL", "DATABASE_URL")
EXPLICIT = "the URL of --database-url (or connect(url))"
HOME_ENV_VAR = "LAYERBASE_HOME"


def data_dir() -> Path:
    """The directory that holds the embedded server's data and the model cache."""
    configured = os.environ.get(HOME_ENV_VAR)
    path = Path(configured).expanduser() if configured else Path(platformdirs.user_data_dir("layerbase"))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the Layerbase data directory {path}: {exc.strerror}; "
            f"set {HOME_ENV_VAR} to a writable directory"
        ) from None
    return path


def configured_url(explicit: str | None = None) -> tuple[URL, str] | None:
    """The database URL the user configured and where it came from (``--database-url`` or
    the environment variable's name), or None to use the embedded server."""
    raw = explicit
    source = EXPLICIT
    if not raw:
        for var in URL_ENV_VARS:
            if os.environ.get(var):
                raw, source = os.environ[var], var
                break
    if not raw:
        return None
    return parse_url(raw, source), source


def parse_url(raw: str, source: str = "the database URL") -> URL:
    """Parse a Postgres URL and force the psycopg 3 driver."""
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):  # a port that is not a number raises ValueError
        raise ConfigError(
            f"{source} is not a valid database URL; use the form postgresql://USER:PASSWORD@HOST:PORT/DBNAME"
        ) from None
    if url.port is not None and not 0 < url.port < 65536:
        raise ConfigError(f"{source} has port {url.port}, outside 1-65535; fix the port")
    if url.get_backend_name() not in ("postgresql", "postgres"):
        raise ConfigError(
            f"{source} points at a {url.get_backend_name()!r} database; Layerbase needs "
            "PostgreSQL with pgvector: use a postgresql:// URL"
        )
    return url.set(drivername="postgresql+psycopg")


def safe_url(url: URL) -> str:
    """The URL as text with the password hidden, for every message a user can see."""
    return unquote(url.render_as_string(hide_password=True))
