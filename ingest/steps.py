"""One line on stderr for each slow step that has no progress bar of its own (unpacking a
packaged model, reading a GGUF tokenizer, de-quantizing, writing a cache): what runs, then
how long it took. Measured on the first load of Gemma-3-270M on 2 cores: tokenizer 12 s,
weights 29 s, cache 8 s; nothing was printed for any of them before."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def step(what: str, shown: bool = True) -> Iterator[None]:
    """``what ...`` before the step, ``what: done in 12.3 s`` after it (or ``failed``)."""
    if not shown:
        yield
        return
    started = time.perf_counter()
    print(f"{what} ...", file=sys.stderr, flush=True)
    try:
        yield
    except BaseException:
        print(f"{what}: failed", file=sys.stderr, flush=True)
        raise
    print(f"{what}: done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
