"""Loaded models kept warm between calls, within a memory budget.

A ``Layerbase`` object (and ``layerbase serve``) owns one cache: the second text lookup or
steering call on a model finds it loaded. When the weights held would exceed the budget,
the least recently used models are dropped first.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable

from layerbase.ingest.loading import LoadedModel

# Default budget: the weights of a few small models. LAYERBASE_MODEL_MEMORY (bytes, or
# with a K/M/G suffix) overrides it.
DEFAULT_BUDGET = 4 * 1024**3
BUDGET_ENV_VAR = "LAYERBASE_MODEL_MEMORY"

Key = tuple[str, str | None, str, str | None, str | None]  # source, revision, dtype, device asked, fingerprint


def parse_size(text: str) -> int:
    """'512M' -> 536870912; plain digits are bytes."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    text = text.strip().upper().removesuffix("B")
    factor = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        return int(float(number) * factor)
    except ValueError:
        from layerbase.warehouse.errors import ConfigError

        raise ConfigError(f"{BUDGET_ENV_VAR}={text!r} is not a size; use bytes or e.g. 512M, 8G") from None


def weight_bytes(lm: LoadedModel) -> int:
    """Bytes held by a loaded model's parameters and buffers."""
    tensors = [*lm.model.parameters(), *lm.model.buffers()]
    seen: set[int] = set()
    total = 0
    for t in tensors:  # tied weights are one tensor seen twice
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class ModelCache:
    """Least-recently-used loaded models, at most ``budget`` bytes of weights (one model
    larger than the budget is still kept, alone). Safe to share between threads."""

    def __init__(self, budget: int | None = None) -> None:
        env = os.environ.get(BUDGET_ENV_VAR)
        self.budget = budget if budget is not None else parse_size(env) if env else DEFAULT_BUDGET
        self._models: OrderedDict[Key, tuple[LoadedModel, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # how many times a model was loaded rather than found

    def get(self, key: Key, load: Callable[[], LoadedModel]) -> LoadedModel:
        """The model cached under ``key``, else ``load()``'s, cached."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key][0]
            lm = load()
            self.loads += 1
            size = weight_bytes(lm)
            while self._models and sum(s for _, s in self._models.values()) + size > self.budget:
                self._models.popitem(last=False)
            self._models[key] = (lm, size)
            return lm

    def __len__(self) -> int:
        return len(self._models)

    def held_bytes(self) -> int:
        return sum(size for _, size in self._models.values())

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
