"""Export a model's input-embedding and unembedding matrices, one row per token with the
token and its decoded text, for the token-geometry analyses."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from layerbase.ingest.extract import ExtractionSettings, Extractor
from layerbase.ingest.loading import LoadedModel
from layerbase.ingest.runner import ensure_model
from layerbase.warehouse.engine import Warehouse, raw_connection
from layerbase.warehouse.models import TokenEmbedding

BLOCK_ROWS = 8192


def matrices_of(lm: LoadedModel) -> dict[str, Any]:
    """The model's embedding matrices by name; the unembedding only when it is untied."""
    found = {"input": lm.model.get_input_embeddings().weight}
    if lm.kind == "causal" and not lm.tied_embeddings:
        out = lm.model.get_output_embeddings()
        if out is not None:
            found["output"] = out.weight
    return found


def token_texts(tokenizer: Any, n: int) -> tuple[list[str], list[str]]:
    """(vocabulary entry, decoded text) of token ids 0..n-1; ids past the tokenizer are ''."""
    known = min(n, len(tokenizer))
    pieces = tokenizer.convert_ids_to_tokens(list(range(known)))
    texts = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=False)
    pad = [""] * (n - known)
    return [p if p is not None else "" for p in pieces] + pad, list(texts) + pad


def export_token_embeddings(wh: Warehouse, lm: LoadedModel, name: str, *, progress: bool = True) -> dict[str, int]:
    """Store the model's embedding matrices; return rows written per matrix.

    Each matrix is replaced whole in one transaction, so a re-run never leaves a mix.
    """
    from pgvector.psycopg import register_vector
    from tqdm.auto import tqdm

    extractor = Extractor(lm, ExtractionSettings())
    with Session(wh.engine) as session, session.begin():
        model_id = ensure_model(session, lm, name, extractor).id
    written: dict[str, int] = {}
    for matrix, weight in matrices_of(lm).items():
        values = weight.detach().float().cpu().numpy()
        pieces, texts = token_texts(lm.tokenizer, values.shape[0])
        special = set(getattr(lm.tokenizer, "all_special_ids", None) or [])
        special |= _special_added(lm.tokenizer)
        with wh.engine.begin() as conn:
            conn.execute(
                sa.delete(TokenEmbedding).where(TokenEmbedding.model_id == model_id, TokenEmbedding.matrix == matrix)
            )
            raw = raw_connection(conn)
            register_vector(raw)
            cur = raw.cursor()
            with cur.copy(
                "COPY token_embedding (model_id, matrix, token_id, token, text, special, vec) "
                "FROM STDIN WITH (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["int4", "text", "int4", "text", "text", "bool", "vector"])
                for i in tqdm(
                    range(values.shape[0]),
                    desc=f"{name} {matrix} embeddings",
                    unit="token",
                    disable=not progress,
                    miniters=BLOCK_ROWS,
                ):
                    copy.write_row((model_id, matrix, i, _clean(pieces[i]), _clean(texts[i]), i in special, values[i]))
        written[matrix] = int(values.shape[0])
    return written


def _special_added(tokenizer: Any) -> set[int]:
    """Ids of added tokens marked special (control tokens such as Gemma's <start_of_turn>)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {i for i, t in added.items() if getattr(t, "special", False)}


def _clean(text: str) -> str:
    # Postgres text cannot hold NUL; byte-fallback vocabularies have a token for it.
    return text.replace("\x00", "\\x00")
