"""Extraction semantics (docs/design.md §3) on tiny random GPT-2, Llama and BERT models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from layerbase.ingest.extract import ExtractionSettings, Extractor, pool
from layerbase.ingest.loading import find_blocks, load_model
from layerbase.warehouse.errors import InputError
from tests.conftest import random_texts

ARCHS = ["gpt2", "llama", "bert"]


@pytest.fixture(scope="module")
def loaded(tiny_models: dict[str, Path]):
    return {arch: load_model(str(path), device="cpu") for arch, path in tiny_models.items()}


def test_models_load_with_their_blocks(loaded) -> None:
    assert loaded["gpt2"].hook_site == "transformer.h[i] output" and loaded["gpt2"].kind == "causal"
    assert loaded["llama"].hook_site == "model.layers[i] output" and loaded["llama"].n_layers == 4
    assert loaded["bert"].hook_site == "encoder.layer[i] output" and loaded["bert"].kind == "encoder"
    assert loaded["gpt2"].tied_embeddings and not loaded["llama"].tied_embeddings


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_are_block_outputs(loaded, arch: str) -> None:
    """Stored layer i equals decoder block i's output, as an independent hook sees it."""
    lm = loaded[arch]
    texts = ["a short one", "a somewhat longer prompt with more words in it"]
    batch = Extractor(lm, ExtractionSettings(), include_layer0=True)(texts)
    assert batch.layers == list(range(lm.n_layers + 1))

    seen: dict[int, torch.Tensor] = {}
    hooks = [
        block.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
        for i, block in enumerate(lm.blocks, start=1)
    ]
    tok = lm.tokenizer
    try:
        for row, text in enumerate(texts):  # one prompt at a time: no padding at all
            enc = tok([text], return_tensors="pt")
            with torch.no_grad():
                out = lm.base(**enc, output_hidden_states=True)
            for layer in range(1, lm.n_layers + 1):
                np.testing.assert_allclose(batch.vectors[row, layer], seen[layer][0, -1].numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(batch.vectors[row, 0], out.hidden_states[0][0, -1].numpy(), rtol=1e-4, atol=1e-4)
            # hidden_states[i] is block i's output for every block but (in decoders) the last,
            # which has the final norm applied: that is why we hook the blocks.
            for layer in range(1, lm.n_layers):
                np.testing.assert_allclose(
                    batch.vectors[row, layer], out.hidden_states[layer][0, -1].numpy(), rtol=1e-4, atol=1e-4
                )
            if arch == "llama":
                assert not np.allclose(batch.vectors[row, -1], out.hidden_states[-1][0, -1].numpy(), atol=1e-3)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_a_prompts_vector_does_not_depend_on_its_batch(loaded, arch: str, padding_side: str, pooling: str) -> None:
    lm = loaded[arch]
    texts = random_texts(9, seed=1)
    extractor = Extractor(lm, ExtractionSettings(pooling=pooling, padding_side=padding_side))
    together = extractor(texts).vectors
    alone = np.concatenate([extractor([t]).vectors for t in texts])
    shuffled_order = [4, 0, 8, 2, 6, 1, 7, 3, 5]
    shuffled = extractor([texts[i] for i in shuffled_order]).vectors
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(together[shuffled_order], shuffled, rtol=1e-4, atol=1e-4)


def test_pooling_picks_real_tokens_under_either_padding() -> None:
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(hidden, right, "last").flatten().tolist() == [1.0, 7.0]
    assert pool(hidden, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool(hidden, right, "mean").flatten().tolist() == [0.5, 5.5]
    nan_pad = hidden.clone()
    nan_pad[0, 2:] = float("nan")
    assert torch.isfinite(pool(nan_pad, right, "mean")).all()


def test_truncation_is_applied_and_recorded(loaded) -> None:
    lm = loaded["llama"]
    long_text = " ".join(["markets rallied"] * 40)
    batch = Extractor(lm, ExtractionSettings(max_tokens=8))(["short", long_text])
    assert batch.n_tokens.tolist()[1] == 8
    assert batch.n_tokens_full[1] > 8
    assert batch.truncated.tolist() == [False, True]


def test_chat_template_wraps_prompts(loaded) -> None:
    lm = loaded["llama"]
    plain = Extractor(lm, ExtractionSettings())
    chat = Extractor(lm, ExtractionSettings(chat_template=True))
    wrapped, special = chat.prepare(["hello"])
    assert wrapped == ["<s>user: hello\nassistant:"] and special is False
    assert not np.allclose(plain(["hello"]).vectors, chat(["hello"]).vectors)
    with pytest.raises(InputError, match="no chat template"):
        Extractor(loaded["gpt2"], ExtractionSettings(chat_template=True))


def test_missing_blocks_are_reported() -> None:
    class NoBlocks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("C", (), {"model_type": "weird"})()
            self.proj = torch.nn.Linear(2, 2)

    with pytest.raises(InputError, match="cannot find the decoder blocks"):
        find_blocks(NoBlocks(), 4)


@pytest.mark.parametrize(
    "source, needle",
    [
        ("/no/such/model", "does not exist"),
        ("./missing-dir/model.gguf", "does not exist"),
        ("no-org/no-such-model-xyz", "not a local path"),
    ],
)
def test_unknown_models_are_reported(source: str, needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        load_model(source, device="cpu")


def test_non_model_directory_is_reported(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("not a model")
    with pytest.raises(InputError, match="not a model directory"):
        load_model(str(tmp_path), device="cpu")
