"""The limits on what Layerbase reads, and the checks that every text must pass before it
reaches the database (docs/reliability.md, "Limits").

Every reader is bounded: a source larger than ``max_input_bytes`` (a file, a FIFO, a device
such as /dev/zero) is refused after reading at most that many bytes, a dataset of more than
``max_prompts`` prompts and a prompt longer than ``max_prompt_chars`` characters are refused
before anything is stored. Each limit can be raised with its environment variable.

PostgreSQL's text type cannot hold a NUL character, and UTF-8 cannot hold a lone surrogate
(which a JSON ``\\ud800`` escape makes); both are refused with the place they came from.
"""

from __future__ import annotations

import codecs
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from layerbase.warehouse.errors import ConfigError, InputError

LIMITS = {
    # name: (default, environment variable, what it bounds)
    "max_prompts": (1_000_000, "LAYERBASE_MAX_PROMPTS", "prompts in one dataset"),
    "max_input_bytes": (512 << 20, "LAYERBASE_MAX_INPUT_BYTES", "bytes read from one source"),
    "max_prompt_chars": (1_000_000, "LAYERBASE_MAX_PROMPT_CHARS", "characters in one prompt"),
}
CHUNK = 8 << 20


def limit(name: str) -> int:
    """A limit's value: its environment variable when set, else the default."""
    default, var, _ = LIMITS[name]
    raw = os.environ.get(var)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{var}={raw!r} is not a positive whole number; fix or unset it")
    return value


def over(name: str, subject: str) -> InputError:
    """The error for a source beyond a limit: which limit, and how to raise it."""
    value, var, bounds = limit(name), LIMITS[name][1], LIMITS[name][2]
    return InputError(
        f"{subject} is over the limit of {value:,} {bounds}; split it, take a --sample, or raise the limit with {var}"
    )


def read_bounded(path: Path) -> bytes:
    """A file's bytes (or a FIFO's, or a device's), at most ``max_input_bytes`` of them,
    without a UTF-8 byte-order mark. A NUL byte stops the read at once (a text source has
    none; /dev/zero is nothing but)."""
    cap = limit("max_input_bytes")
    parts: list[bytes] = []
    total = 0
    try:
        with path.open("rb") as f:
            while block := f.read(min(CHUNK, cap + 1 - total)):
                nul = block.find(b"\0")
                if nul >= 0:
                    line = sum(p.count(b"\n") for p in parts) + block[:nul].count(b"\n") + 1
                    raise InputError(
                        f"{path}, line {line}: a NUL byte, which a text prompt cannot hold (PostgreSQL text "
                        "refuses it); is this a binary file? Remove the NUL bytes (tr -d '\\000') or pass a text file"
                    )
                parts.append(block)
                total += len(block)
                if total > cap:
                    raise over("max_input_bytes", str(path))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    raw = b"".join(parts)
    return raw[len(codecs.BOM_UTF8) :] if raw.startswith(codecs.BOM_UTF8) else raw


def check_texts(texts: Sequence[str], refs: Sequence[str], uri: str) -> None:
    """Refuse a prompt set the database cannot store or the limits do not allow."""
    if len(texts) > limit("max_prompts"):
        raise over("max_prompts", f"{uri} ({len(texts):,} prompts)")
    longest = limit("max_prompt_chars")
    for text, ref in zip(texts, refs):
        if len(text) > longest:
            raise over("max_prompt_chars", f"{uri}, {ref}: a prompt of {len(text):,} characters")
        problem = text_problem(text)
        if problem:
            raise InputError(f"{uri}, {ref}: {problem}")


def text_problem(text: str) -> str | None:
    """Why a text cannot be stored, or None."""
    if "\0" in text:
        return "contains a NUL character (U+0000), which PostgreSQL text cannot hold; remove it"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"contains a lone surrogate (U+{ord(text[exc.start]):04X}, e.g. from a JSON \\u escape), which is "
            "not valid Unicode; fix that text"
        )
    return None


def check_name(name: str, what: str) -> None:
    """A stored name holds printable text: no control characters (a newline, a NUL, an
    escape sequence), nothing the database refuses."""
    problem = text_problem(name)
    if problem:
        raise InputError(f"the {what} name {problem}")
    bad = next((c for c in name if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise InputError(f"the {what} name contains the control character U+{ord(bad):04X}; use printable text")
