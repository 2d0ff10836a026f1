"""What Layerbase keeps on disk besides the database, and how to see and clear it.

* ``models/``: GGUF models converted to safetensors, so that the next load skips the
  de-quantization (about 30 s for SmolLM2-135M). A converted model is stored in its dtype:
  Gemma-3-270M as float32 takes 1.1 GB, SmolLM2-135M 0.5 GB.
* ``packaged/``: packaged models assembled from their package's chunks (Gemma-3-270M's GGUF,
  253 MB).

Both are rebuilt on demand, so clearing them loses nothing but time. The database
(``pgdata/``) is not a cache: nothing here lists or deletes it. The Hugging Face hub cache
(``HF_HUB_CACHE``) belongs to the hub client; its size is shown, and ``hf cache`` manages it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from layerbase.warehouse.config import data_dir
from layerbase.warehouse.errors import InputError

KINDS = {"models": "converted GGUF model", "packaged": "assembled packaged model"}


@dataclass(frozen=True)
class CacheEntry:
    name: str  # '<kind>/<entry>', as `layerbase cache clear` takes it
    kind: str
    path: Path
    bytes: int
    modified: datetime
    complete: bool  # a converted model whose write finished (an interrupted one is rebuilt)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cache_entries() -> list[CacheEntry]:
    """Every entry of Layerbase's caches, largest first."""
    root = data_dir()
    entries = []
    for kind, what in KINDS.items():
        folder = root / kind
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            complete = kind != "models" or (path / "complete").exists()
            modified = datetime.fromtimestamp(path.stat().st_mtime).astimezone()
            entries.append(CacheEntry(f"{kind}/{path.name}", what, path, _size(path), modified, complete))
    return sorted(entries, key=lambda e: -e.bytes)


def hub_cache() -> tuple[Path, int] | None:
    """The Hugging Face hub cache's folder and size, when it exists."""
    from huggingface_hub.constants import HF_HUB_CACHE

    path = Path(HF_HUB_CACHE)
    return (path, _size(path)) if path.is_dir() else None


def clear_caches(names: list[str] | None = None) -> list[CacheEntry]:
    """Delete the named entries (``cache_entries`` names), or all of them; return what went.
    An unknown name is refused before anything is deleted."""
    entries = cache_entries()
    if names:
        known = {e.name: e for e in entries}
        missing = [n for n in names if n not in known]
        if missing:
            listed = ", ".join(known) or "none"
            raise InputError(f"no cache entry named {missing[0]!r}; the entries are: {listed}")
        entries = [known[n] for n in names]
    for entry in entries:
        if entry.path.is_dir():
            shutil.rmtree(entry.path)
        else:
            entry.path.unlink()
    return entries
