"""``layerbase cache``: the converted and assembled models kept on disk."""

from __future__ import annotations

import click

from layerbase.cli.common import emit, json_option, table


def _size(n: int) -> str:
    """Bytes in decimal units: '512 B', '5.0 KB', '1.1 GB'."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("KB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


@click.group()
def cache() -> None:
    """List or clear the model caches (rebuilt on demand; the database is never touched)."""


@cache.command("list")
@json_option
def list_(as_json: bool) -> None:
    """Every cache entry with its size, and the Hugging Face hub cache's size."""
    from layerbase.ingest.caches import cache_entries, hub_cache

    entries = cache_entries()
    rows = [
        {
            "name": e.name,
            "what": e.kind + ("" if e.complete else " (incomplete: rebuilt on next load)"),
            "size": _size(e.bytes),
            "bytes": e.bytes,
            "modified": e.modified.strftime("%Y-%m-%d %H:%M"),
            "path": str(e.path),
        }
        for e in entries
    ]
    hub = hub_cache()
    total = sum(e.bytes for e in entries)
    text = table(rows, ["name", "what", "size", "modified"]) if rows else "No cached models."
    text += f"\nLayerbase caches: {_size(total)} in {len(rows)} entries (`layerbase cache clear` frees them)."
    if hub is not None:
        text += f"\nHugging Face hub cache: {_size(hub[1])} in {hub[0]} (managed by `hf cache`)."
    emit({"entries": rows, "bytes": total, "hub_cache": hub and {"path": str(hub[0]), "bytes": hub[1]}}, as_json, text)


@cache.command()
@click.argument("names", nargs=-1)
@json_option
def clear(names: tuple[str, ...], as_json: bool) -> None:
    """Delete the cache entries NAMES (as `cache list` shows them), or all of them."""
    from layerbase.ingest.caches import clear_caches

    gone = clear_caches(list(names) or None)
    freed = sum(e.bytes for e in gone)
    emit(
        {"cleared": [e.name for e in gone], "bytes": freed},
        as_json,
        f"Cleared {len(gone)} entries, {_size(freed)}." if gone else "Nothing to clear.",
    )
