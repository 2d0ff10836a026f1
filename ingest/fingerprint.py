"""A model's fingerprint: one sha256 over the files it is loaded from (weights, config,
tokenizer), so that a model name stays tied to the weights its activations came from.

A name is given to a source (a path, a hub id, a packaged model); the files at a path can
change. Layerbase stores the fingerprint with the model and refuses to add activations to,
or run, a stored model whose files now hash differently.

What is hashed:
* a GGUF file: the file (its config and tokenizer are inside it);
* a model directory: its top-level files that loading can read (``MODEL_FILES``), by name
  and content;
* a hub id: the cached snapshot of that revision. Its files are links to blobs named by
  their content hash, so those names stand in for reading them.

sha256 runs at about 1.2 GB/s here (OpenSSL); the packaged models hash in 0.1-0.2 s
(docs/reliability.md). A file's digest is kept for the process, keyed by its path, inode,
size and modification time, so that a model opened twice is read once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from layerbase.warehouse.errors import InputError

# The top-level files of a Hugging Face model directory that loading may read. Others
# (README.md, .gitattributes, Python files of a package that ships the model) are not hashed.
MODEL_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".json", ".txt", ".model", ".tiktoken", ".vocab")
CHUNK = 8 << 20
_digests: dict[tuple[str, int, int, int], str] = {}


def file_digest(path: Path) -> str:
    """The sha256 of a file's content, computed once per process for an unchanged file."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
        _digests[key] = h.hexdigest()
    return _digests[key]


def model_files(directory: Path) -> list[Path]:
    """The files of a model directory that the fingerprint covers."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and p.suffix in MODEL_SUFFIXES and not p.name.startswith(".") and p.name != "README.md"
    )


def fingerprint(where: str, gguf_file: str | None = None, revision: str | None = None) -> str | None:
    """``sha256:<hex>`` over the files a model loads from: ``where`` is a local directory
    (with ``gguf_file`` in it) or a hub id. None for a hub id with no cached snapshot."""
    directory = Path(where)
    if directory.is_dir():
        files = [directory / gguf_file] if gguf_file else model_files(directory)
        entries = [(f.name, file_digest(f)) for f in files]
    else:
        snapshot = _hub_snapshot(where, revision)
        if snapshot is None:
            return None
        entries = [(f.name, _hub_digest(f)) for f in model_files(snapshot)]
    if not entries:
        raise InputError(f"{where} holds no model files to load (weights, config, tokenizer)")
    manifest = "\n".join(f"{name}\t{digest}" for name, digest in entries)
    return "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()


def short(fingerprint: str | None) -> str:
    """A fingerprint as messages show it: its first 12 hex digits."""
    return fingerprint.split(":", 1)[-1][:12] if fingerprint else "none"


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


def _hub_digest(path: Path) -> str:
    """A cached hub file's content hash: the name of the blob it links to (sha256 for LFS
    files, the git blob id for others), else the file's own sha256."""
    target = Path(os.path.realpath(path))
    return f"blob:{target.name}" if target.parent.name == "blobs" else file_digest(path)
