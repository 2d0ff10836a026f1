"""Activation extraction: tokenize, run the model, and pool each decoder block's output.

Layer i (1..L) is the output of decoder block i, the residual stream after that block,
taken with a forward hook on the block (docs/design.md §3): in Llama/Gemma-style models the
last entry of ``hidden_states`` has the final norm applied and is *not* the block output.
Layer 0, when asked for, is the input of block 1 (the embedding output).

Pooling happens inside the hooks, so a batch never holds more than one layer's full
token-level activations at a time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from layerbase.ingest.loading import LoadedModel
from layerbase.warehouse.errors import InputError

if TYPE_CHECKING:
    from layerbase.warehouse.models import Model

POOLINGS = ("last", "mean")
PADDING_SIDES = ("right", "left")


@dataclass(frozen=True)
class ExtractionSettings:
    """How activations are taken; stored with the model row as provenance."""

    pooling: str = "last"
    padding_side: str = "right"
    max_tokens: int | None = None
    chat_template: bool = False

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise InputError(f"unknown pooling {self.pooling!r}; use one of {', '.join(POOLINGS)}")
        if self.padding_side not in PADDING_SIDES:
            raise InputError(f"unknown padding side {self.padding_side!r}; use right or left")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise InputError(f"--max-tokens must be positive, got {self.max_tokens}")


@dataclass
class ExtractedBatch:
    """Pooled activations of a batch: vectors[prompt, layer index, width]."""

    layers: list[int]
    vectors: np.ndarray
    n_tokens: np.ndarray
    n_tokens_full: np.ndarray

    @property
    def truncated(self) -> np.ndarray:
        return self.n_tokens < self.n_tokens_full


class NonFiniteActivation(InputError):
    """A prompt produced NaN or Inf activations."""

    def __init__(self, index: int, layer: int) -> None:
        self.index, self.layer = index, layer
        super().__init__(f"non-finite activation at layer {layer}")


def pool(hidden: Any, mask: Any, how: str) -> Any:
    """Pool token states [B, T, D] over real tokens (mask [B, T]) to [B, D] float32.

    last: the last real token, wherever padding is (right padding puts it at
    ``mask.sum(1) - 1``, left padding at ``T - 1``); mean: the mean over real tokens.
    """
    import torch

    hidden = hidden.float()
    if how == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = torch.where(mask.bool(), positions, -1).max(dim=1).values
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    real = mask.bool().unsqueeze(-1)
    # torch.where, not multiplication: a padded position may hold NaN, and NaN * 0 is NaN.
    total = torch.where(real, hidden, torch.zeros((), device=hidden.device)).sum(dim=1)
    return total / mask.sum(dim=1, keepdim=True).clamp(min=1).float()


class Extractor:
    """Runs a loaded model over texts and returns pooled per-layer activations."""

    def __init__(self, lm: LoadedModel, settings: ExtractionSettings, *, include_layer0: bool = False) -> None:
        self.lm = lm
        self.settings = settings
        self.include_layer0 = include_layer0
        self.layers = ([0] if include_layer0 else []) + list(range(1, lm.n_layers + 1))
        self.limit = min(settings.max_tokens or lm.context_length, lm.context_length)
        tok = lm.tokenizer
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise InputError("the tokenizer has neither a pad nor an end-of-sequence token; cannot batch prompts")
            tok.pad_token = tok.eos_token  # the pad id never reaches a real position
        tok.padding_side = settings.padding_side
        if settings.chat_template and not getattr(tok, "chat_template", None):
            raise InputError("this model's tokenizer has no chat template; drop --chat-template")
        self._forward_params = set(inspect.signature(lm.base.forward).parameters)

    def prepare(self, texts: list[str]) -> tuple[list[str], bool]:
        """Texts as the model reads them (chat-wrapped if asked), and whether to add special tokens."""
        if not self.settings.chat_template:
            return texts, True
        tok = self.lm.tokenizer
        wrapped = [
            tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts
        ]
        return wrapped, False  # the template already holds the special tokens

    def encode(self, texts: list[str]) -> tuple[Any, np.ndarray]:
        """Tokenized, truncated, padded batch and each prompt's untruncated length."""
        tok = self.lm.tokenizer
        prepared, special = self.prepare(texts)
        full = tok(prepared, add_special_tokens=special, truncation=False, verbose=False)["input_ids"]
        n_full = np.array([len(ids) for ids in full], dtype=np.int32)
        enc = tok(
            prepared,
            add_special_tokens=special,
            truncation=True,
            max_length=self.limit,
            padding=True,
            return_tensors="pt",
        )
        return enc, n_full

    def __call__(self, texts: list[str]) -> ExtractedBatch:
        with self.lm.lock:  # hooks and tokenizer state are the model's, shared across threads
            return self._extract(texts)

    def _extract(self, texts: list[str]) -> ExtractedBatch:
        import torch

        enc, n_full = self.encode(texts)
        device = self.lm.device
        input_ids = enc["input_ids"].to(device)
        mask = enc["attention_mask"].to(device)
        pooled: dict[int, Any] = {}

        def keep(layer: int) -> Callable[..., None]:
            def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
                hidden = output[0] if isinstance(output, (tuple, list)) else output
                pooled[layer] = pool(hidden, mask, self.settings.pooling)

            return hook

        def keep_input(module: Any, args: Any, kwargs: Any) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            pooled[0] = pool(hidden, mask, self.settings.pooling)

        handles = [
            block.register_forward_hook(keep(i), with_kwargs=True) for i, block in enumerate(self.lm.blocks, start=1)
        ]
        if self.include_layer0:
            handles.append(self.lm.blocks[0].register_forward_pre_hook(keep_input, with_kwargs=True))
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in enc and "token_type_ids" in self._forward_params:
            inputs["token_type_ids"] = enc["token_type_ids"].to(device)
        if "position_ids" in self._forward_params:
            # Positions count real tokens only, so left padding does not shift them.
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if "use_cache" in self._forward_params:
            inputs["use_cache"] = False
        try:
            with torch.inference_mode():
                self.lm.base(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        vectors = torch.stack([pooled[layer] for layer in self.layers], dim=1).cpu().numpy()
        finite = np.isfinite(vectors).all(axis=2)
        if not finite.all():
            index, layer_index = np.argwhere(~finite)[0]
            raise NonFiniteActivation(int(index), self.layers[int(layer_index)])
        n_tokens = mask.sum(dim=1).cpu().numpy().astype(np.int32)
        return ExtractedBatch(self.layers, vectors.astype(np.float32, copy=False), n_tokens, n_full)


def stored_settings(model: Model, pooling: str | None = None) -> ExtractionSettings:
    """The extraction settings a stored model row records (optionally with another pooling)."""
    return ExtractionSettings(pooling or model.pooling, model.padding_side, model.max_tokens, model.chat_template)
