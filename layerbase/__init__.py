"""Layerbase: a Postgres + pgvector warehouse for language-model activations.

    import layerbase
    lb = layerbase.connect()          # the embedded server, or layerbase.connect("postgresql://…")
    lb.add_dataset("news", texts)
    lb.ingest("SmolLM2-135M-Instruct", "news")
    m = lb.affinity("SmolLM2-135M-Instruct", "gemma-3-270m", "news")
    m.matrix, m.test, m.plot()

The subpackages hold the layers underneath: ``layerbase.warehouse`` (the database),
``layerbase.ingest`` (prompts, models, extraction), ``layerbase.analysis`` (k-NN, similarity,
geometry, steering, reports) and ``layerbase.cli`` (the ``layerbase`` command). Importing
this package loads none of them, nor torch: they load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from layerbase.api import Layerbase, connect
    from layerbase.warehouse.errors import LayerbaseError

__all__ = ["Layerbase", "LayerbaseError", "connect"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import layerbase` stays fast and imports neither SQLAlchemy nor torch.
    if name in ("Layerbase", "connect"):
        from layerbase import api

        return getattr(api, name)
    if name == "LayerbaseError":
        from layerbase.warehouse.errors import LayerbaseError

        return LayerbaseError
    raise AttributeError(f"module 'layerbase' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
