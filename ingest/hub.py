"""Reaching the Hugging Face hub: once, quickly, and only when the local cache cannot answer.

Left to itself, loading an id that is not cached asks the hub for each file with five
retries and growing waits: an unknown id on a machine without the hub printed eleven
warnings over 28 s before its error. Layerbase instead
* loads a cached model or dataset without asking the hub at all (``local_files_only``);
* otherwise asks the hub once, with a short timeout and no retries, whether the repository
  exists, and turns the answer into one line: no such repository, a gated one, an unknown
  revision, or a hub that cannot be reached.
"""

from __future__ import annotations

import os

from layerbase.warehouse.errors import InputError

PROBE_TIMEOUT_S = 10
OFFLINE_VALUES = ("1", "on", "yes", "true")


def offline() -> bool:
    """Whether the user turned the hub off (``HF_HUB_OFFLINE``); loading then reads the cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in OFFLINE_VALUES


def cached(repo_id: str, revision: str | None = None, kind: str = "model") -> bool:
    """Whether a snapshot of the repository (at ``revision``) is in the local hub cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, repo_type=kind, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        return False
    return True


def probe(repo_id: str, revision: str | None = None, kind: str = "model") -> None:
    """Ask the hub once whether ``repo_id`` exists and can be read; raise one clear line if not."""
    from huggingface_hub import dataset_info, model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    ask = model_info if kind == "model" else dataset_info
    try:
        ask(repo_id, revision=revision, timeout=PROBE_TIMEOUT_S)
    except GatedRepoError:
        raise InputError(
            f"the {kind} {repo_id!r} on the Hugging Face hub is gated: accept its terms on the hub and log in "
            "(`hf auth login`), or pass a local copy"
        ) from None
    except RevisionNotFoundError:
        raise InputError(f"the {kind} {repo_id!r} has no revision {revision!r} on the Hugging Face hub") from None
    except RepositoryNotFoundError:
        raise InputError(
            f"there is no {kind} {repo_id!r} on the Hugging Face hub (or it is private); check the id, "
            "or pass a local path"
        ) from None
    except Exception as exc:  # the hub client raises its HTTP library's errors for a network that fails
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"cannot load the {kind} {repo_id!r}: it is not a local path, not in the Hugging Face cache, and "
            f"the hub cannot be reached ({reason[:160]}); pass a local "
            + ("model directory or .gguf file" if kind == "model" else "file (`layerbase dataset add`)")
            + ", run where the hub is reachable, or set HF_HUB_OFFLINE=1 to read only what is cached"
        ) from None


def prepare(repo_id: str, revision: str | None = None, kind: str = "model") -> bool:
    """Before loading a hub id: True to load it from the cache only, False to let loading
    download it (the hub answered); raises when neither can work."""
    if offline() or cached(repo_id, revision, kind):
        return True
    probe(repo_id, revision, kind)
    return False
