"""What every command shares: the context object (how to reach the warehouse), the
options that several commands take, and printing results as text or JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import pandas as pd

    from layerbase.api import Layerbase
    from layerbase.warehouse.engine import Warehouse


@dataclass
class Context:
    """The root group's options, passed to every command."""

    database_url: str | None
    traceback: bool
    _api: Layerbase | None = field(default=None, repr=False)

    def api(self) -> Layerbase:
        """The Python API over the configured warehouse (whose schema must be current)."""
        if self._api is None:
            from layerbase.api import connect

            self._api = connect(self.database_url, upgrade=False)
        return self._api

    def warehouse(self, *, check_schema: bool = True) -> Warehouse:
        """The warehouse itself, for the commands below the API (``db``)."""
        from layerbase.warehouse.engine import connect

        return connect(self.database_url, check_schema=check_schema)


class NonEmptyText(click.ParamType):
    """A text option: refused when blank, instead of silently meaning nothing."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not str(value).strip():
            self.fail("is empty; give some text, or leave the option out", param, ctx)
        return str(value)


TEXT = NonEmptyText()

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
progress_option = click.option("--progress/--no-progress", default=True, help="Show progress bars.")
device_option = click.option("--device", help="cuda, mps or cpu (default: the best available).")
plot_option = click.option(
    "--plot",
    # The folder must exist and be writable before anything is computed.
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    callback=lambda ctx, param, value: _writable_parent(value, "--plot"),
    help="Write a PNG figure here.",
)


def _writable_parent(path: Path | None, option: str) -> Path | None:
    import os

    if path is None:
        return None
    parent = path.expanduser().resolve().parent
    if not parent.is_dir():
        raise click.BadParameter(
            f"the folder {parent} does not exist; create it or pick another path", param_hint=option
        )
    if not os.access(parent, os.W_OK):
        raise click.BadParameter(f"the folder {parent} is not writable; pick another path", param_hint=option)
    return path


def emit(data: Any, as_json: bool, text: str | None = None) -> None:
    """Print a result as JSON or as text."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    elif text is not None:
        click.echo(text)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain aligned text table."""
    if not rows:
        return "(none)"
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A DataFrame's rows as plain Python dicts (numpy scalars unwrapped, NaN as None)."""
    rows = frame.to_dict("records")
    for row in rows:
        for key, value in row.items():
            if hasattr(value, "item"):
                value = value.item()
            row[key] = None if isinstance(value, float) and math.isnan(value) else value
    return rows


def neighbors_answer(frame: pd.DataFrame, about: dict, *, ranks: bool = False) -> dict[str, Any]:
    """One neighbour set (``Layerbase.neighbors``'s DataFrame and its ``attrs``) as the JSON
    answers of the CLI and the server give it; ``ranks`` keeps each neighbour's rank."""
    return {key: about.get(key) for key in ("model", "layer", "dataset", "query", "path", "only")} | {
        "neighbors": records(frame.reset_index(drop=not ranks))
    }


def names(text: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']."""
    return [n.strip() for n in text.split(",") if n.strip()]
