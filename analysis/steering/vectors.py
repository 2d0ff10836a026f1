"""Steering vectors: make one from two contrasting prompt sets, add it to the residual
stream during generation, and measure its effect on target-token log-probabilities
against the unsteered model and random vectors of the same norm.

A vector at layer i is added to the output of decoder block i (the same site whose
output ``ingest`` stores as layer i), at every position, times a coefficient.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from layerbase.analysis.steering.presets import EVALUATION_PROMPTS, NEGATIVE_WORDS, POSITIVE_WORDS, PRESETS
from layerbase.analysis.vectors import layer_vectors
from layerbase.ingest.datasets import dataset_prompts, validate_name
from layerbase.ingest.extract import Extractor, stored_settings
from layerbase.ingest.loading import LoadedModel, open_stored_model
from layerbase.warehouse.engine import Warehouse
from layerbase.warehouse.errors import InputError
from layerbase.warehouse.lookup import get_dataset, get_model, get_vector
from layerbase.warehouse.models import Model, SteeringEval, SteeringEvalPoint, SteeringVector

if TYPE_CHECKING:
    from layerbase.ingest.model_cache import ModelCache

TOKEN_RULES = ("last", "mean")


# ------------------------------------------------------------------- prompt sets


@dataclass
class PromptSource:
    """Texts and where they came from (a stored dataset, a file, a preset)."""

    label: str
    texts: list[str]
    dataset: str | None = None

    def provenance(self) -> dict[str, Any]:
        digest = hashlib.sha256("\n".join(self.texts).encode()).hexdigest()
        return {
            "source": self.label,
            "dataset": self.dataset,
            "count": len(self.texts),
            "sha256": digest,
            "texts": self.texts,
        }


def prompt_source(
    wh: Warehouse,
    *,
    dataset: str | None = None,
    file: Path | None = None,
    preset: str | None = None,
    what: str = "prompts",
) -> PromptSource:
    """Exactly one of a stored dataset, a text file (one prompt per line) or a built-in set."""
    given = [x is not None for x in (dataset, file, preset)]
    if sum(given) != 1:
        raise InputError(f"give the {what} as exactly one of a stored dataset, a file or a preset")
    if dataset is not None:
        with Session(wh.engine) as session:
            ds = get_dataset(session, dataset)
            texts = [text for _, _, text in dataset_prompts(session, ds.id, 0, ds.n_prompts - 1)]
        return PromptSource(f"dataset {dataset}", texts, dataset)
    if file is not None:
        from layerbase.ingest.sources import read_lines

        try:
            prompts = read_lines(Path(file))  # bounded, and checked as any dataset's prompts are
        except InputError as exc:
            raise InputError(f"the {what} file: {exc}") from None
        return PromptSource(f"file {Path(file).name}", [t.strip() for t in prompts.texts])
    assert preset is not None  # exactly one of the three was given
    return PromptSource(f"preset {preset}", list(preset_texts(preset, what)))


def preset_texts(preset: str, what: str) -> list[str]:
    if preset == "evaluation":
        return EVALUATION_PROMPTS
    name, _, side = preset.partition(":")
    if name not in PRESETS or side not in ("positive", "negative"):
        known = ", ".join(f"{p}:positive, {p}:negative" for p in PRESETS) + ", evaluation"
        raise InputError(f"unknown preset {preset!r} for the {what}; known presets: {known}")
    positive, negative = PRESETS[name]
    return positive if side == "positive" else negative


# ------------------------------------------------------------------ activations


def extract_layer(
    lm: LoadedModel, model: Model, texts: list[str], layer: int, token_rule: str, batch_size: int = 16
) -> np.ndarray:
    """[n, width] activations of texts at a layer, pooled by the token rule, with the
    model's stored extraction settings otherwise."""
    extractor = Extractor(lm, stored_settings(model, pooling=token_rule))
    index = extractor.layers.index(layer)
    out = [extractor(texts[i : i + batch_size]).vectors[:, index] for i in range(0, len(texts), batch_size)]
    return np.concatenate(out).astype(np.float32)


def _stored_activations(
    wh: Warehouse, model: Model, layer: int, source: PromptSource, token_rule: str
) -> np.ndarray | None:
    """The dataset's stored activations at the layer, when they were pooled by the token rule."""
    if source.dataset is None or model.pooling != token_rule:
        return None
    with Session(wh.engine) as session:
        ds = get_dataset(session, source.dataset)
        dataset_id, n = ds.id, ds.n_prompts
    with wh.engine.connect() as conn:
        positions, vectors = layer_vectors(conn, model.id, layer, dataset_id)
    return vectors if len(positions) == n and n > 0 else None


def check_layer(model: Model, layer: int) -> None:
    if not 1 <= layer <= model.n_layers:
        raise InputError(f"layer {layer} is outside {model.name} (layers 1..{model.n_layers})")


def check_width(vector: np.ndarray, model: Model, name: str, fix: str | None = None) -> None:
    if vector.shape[-1] != model.width:
        fix = fix or f"map it into {model.name} with `layerbase steer transfer {name} --to {model.name}`"
        raise InputError(
            f"steering vector {name!r} is {vector.shape[-1]} wide but {model.name}'s residual stream is "
            f"{model.width} wide; {fix}"
        )


# ------------------------------------------------------------------------ make


@dataclass
class VectorInfo:
    id: int
    name: str
    model: str
    layer: int
    method: str
    token_rule: str
    norm: float
    activation_norm: float
    n_positive: int
    n_negative: int
    source: str  # stored activations or the model run

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_new_name(session: Session, name: str) -> None:
    validate_name(name, "steering vector")
    if session.scalar(sa.select(SteeringVector.id).where(SteeringVector.name == name)) is not None:
        raise InputError(f"a steering vector named {name!r} exists; vectors are immutable, so choose another --name")


def make_vector(
    wh: Warehouse,
    model_name: str,
    layer: int,
    positive: PromptSource,
    negative: PromptSource,
    *,
    name: str,
    token_rule: str = "last",
    device: str | None = None,
    batch_size: int = 16,
    models: ModelCache | None = None,
) -> VectorInfo:
    """Mean difference of the positive and negative prompts' activations at a layer; stored."""
    if token_rule not in TOKEN_RULES:
        raise InputError(f"unknown token rule {token_rule!r}; use last or mean")
    with Session(wh.engine) as session:
        model = get_model(session, model_name)
        check_new_name(session, name)
        check_layer(model, layer)
        session.expunge(model)
    for side in (positive, negative):
        if not side.texts:
            raise InputError(f"the prompt set {side.label} is empty")
    found = [_stored_activations(wh, model, layer, side, token_rule) for side in (positive, negative)]
    lm = None
    if any(f is None for f in found):
        lm = open_stored_model(model, device=device, models=models)
        found = [
            f if f is not None else extract_layer(lm, model, side.texts, layer, token_rule, batch_size)
            for f, side in zip(found, (positive, negative))
        ]
    pos, neg = found
    assert pos is not None and neg is not None  # each side read from storage or extracted above
    vector = pos.mean(axis=0) - neg.mean(axis=0)
    if not np.isfinite(vector).all() or not np.linalg.norm(vector) > 0:
        raise InputError("the two prompt sets give the same mean activation; use sets that differ")
    activation_norm = float(np.median(np.linalg.norm(np.concatenate([pos, neg]), axis=1)))
    source = "model run" if lm is not None else "stored activations"
    hook_site = lm.hook_site if lm is not None else model.hook_site
    with wh.engine.begin() as conn:
        vector_id = conn.execute(
            sa.insert(SteeringVector)
            .values(
                name=name,
                model_id=model.id,
                layer=layer,
                hook_site=hook_site,
                token_rule=token_rule,
                method="mean-difference",
                positive=positive.provenance() | {"activations": source},
                negative=negative.provenance() | {"activations": source},
                norm=float(np.linalg.norm(vector)),
                activation_norm=activation_norm,
                vec=vector.astype(np.float32),
            )
            .returning(SteeringVector.id)
        ).scalar_one()
    return VectorInfo(
        vector_id,
        name,
        model_name,
        layer,
        "mean-difference",
        token_rule,
        float(np.linalg.norm(vector)),
        activation_norm,
        len(positive.texts),
        len(negative.texts),
        source,
    )


# Read before the file is loaded, so that a large array is refused without reading it.
MAX_VECTOR_FILE_BYTES = 16 << 20


def import_vector(
    wh: Warehouse, model_name: str, layer: int, path: Path, *, name: str, token_rule: str = "last"
) -> VectorInfo:
    """Store a vector from a .npy or .pt file (a researcher's own) for a model and layer."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_VECTOR_FILE_BYTES:
            raise InputError(
                f"{path} holds {size:,} bytes; a steering vector is one row (64 KB at width 16384): "
                "save just the vector"
            )
        if Path(path).suffix == ".npy":
            vector = np.load(path, allow_pickle=False)
        elif Path(path).suffix in (".pt", ".pth"):
            import torch

            vector = torch.load(path, map_location="cpu", weights_only=True)
            vector = vector.detach().float().numpy() if hasattr(vector, "detach") else np.asarray(vector)
        else:
            raise InputError(f"{path}: use a .npy or .pt file holding one vector")
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"cannot read a vector from {path}: {str(exc).splitlines()[0]}") from None
    vector = np.asarray(vector, dtype=np.float32).squeeze()
    if vector.ndim != 1:
        raise InputError(f"{path} holds an array of shape {vector.shape}; a steering vector is one-dimensional")
    if not np.isfinite(vector).all():
        raise InputError(f"{path} holds NaN or Inf values")
    with Session(wh.engine) as session:
        model = get_model(session, model_name)
        check_new_name(session, name)
        check_layer(model, layer)
        check_width(
            vector,
            model,
            name,
            fix=f"import it for the model it was made in, then `layerbase steer transfer` it to {model_name}",
        )
        row = SteeringVector(
            name=name,
            model_id=model.id,
            layer=layer,
            hook_site=model.hook_site,
            token_rule=token_rule,
            method="imported",
            positive={"source": f"imported from {Path(path).name}"},
            negative=None,
            norm=float(np.linalg.norm(vector)),
            activation_norm=0.0,
            vec=vector,
        )
        session.add(row)
        session.commit()
        return VectorInfo(row.id, name, model_name, layer, row.method, token_rule, row.norm, 0.0, 0, 0, "file")


def load_vector(session: Session, name: str) -> tuple[SteeringVector, Model, np.ndarray]:
    row = get_vector(session, name)
    model = session.get_one(Model, row.model_id)
    return row, model, np.asarray(row.vec, dtype=np.float32)


def list_vectors(wh: Warehouse) -> list[dict[str, Any]]:
    with Session(wh.engine) as session:
        rows = session.execute(
            sa.select(SteeringVector, Model.name)
            .join(Model, Model.id == SteeringVector.model_id)
            .order_by(SteeringVector.id)
        ).all()
        return [
            {
                "name": v.name,
                "model": m,
                "layer": v.layer,
                "method": v.method,
                "token_rule": v.token_rule,
                "norm": round(v.norm, 3),
                "activation_norm": round(v.activation_norm, 3),
                "from": (v.positive or {}).get("source", ""),
                "created_at": v.created_at.isoformat(timespec="seconds"),
            }
            for v, m in rows
        ]


# -------------------------------------------------------------------- steering


@contextlib.contextmanager
def added_to_residual(lm: LoadedModel, layer: int, delta: np.ndarray | None) -> Iterator[None]:
    """Add ``delta`` to decoder block ``layer``'s output at every position, inside the block.
    The model's lock is held throughout, also without a delta, so that no other thread's
    hook is active during an unsteered pass either."""
    if delta is None:
        with lm.lock:
            yield
        return
    import torch

    block = lm.blocks[layer - 1]
    param = next(lm.model.parameters())
    shift = torch.as_tensor(delta, dtype=param.dtype, device=param.device)

    def hook(module: Any, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0] + shift,) + output[1:]
        return output + shift

    with lm.lock:
        handle = block.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def generate(
    wh: Warehouse,
    vector_name: str,
    prompt: str,
    *,
    coefficient: float = 1.0,
    max_new_tokens: int = 40,
    sample: bool = False,
    seed: int = 0,
    temperature: float = 1.0,
    model_name: str | None = None,
    layer: int | None = None,
    device: str | None = None,
    models: ModelCache | None = None,
) -> dict[str, Any]:
    """The model's continuation of a prompt, unsteered and with the vector added."""

    if max_new_tokens <= 0:
        raise InputError("--max-new-tokens must be positive")
    with Session(wh.engine) as session:
        row, model, vector = load_vector(session, vector_name)
        if model_name is not None:
            model = get_model(session, model_name)
        layer = layer or row.layer
        check_layer(model, layer)
        check_width(vector, model, vector_name)
        session.expunge_all()
    if model.kind != "causal":
        raise InputError(f"{model.name} is an encoder; steering generation needs a causal language model")
    lm = open_stored_model(model, device=device, models=models)
    with lm.lock:
        outputs = _generate_both(
            lm, model, prompt, layer, coefficient * vector, max_new_tokens, sample, temperature, seed
        )
    return {
        "vector": vector_name,
        "model": model.name,
        "layer": layer,
        "coefficient": coefficient,
        "prompt": prompt,
        "decoding": "sampled" if sample else "greedy",
        **outputs,
    }


def _generate_both(
    lm: LoadedModel,
    model: Model,
    prompt: str,
    layer: int,
    delta: np.ndarray,
    max_new_tokens: int,
    sample: bool,
    temperature: float,
    seed: int,
) -> dict[str, str]:
    """The unsteered and the steered continuation, with the model's lock held by the caller."""
    import torch

    tok = lm.tokenizer
    text = (
        tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        if model.chat_template
        else prompt
    )
    enc = tok(text, return_tensors="pt", add_special_tokens=not model.chat_template).to(lm.device)
    outputs = {}
    for label, added in (("unsteered", None), ("steered", delta)):
        torch.manual_seed(seed)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": sample,
            "pad_token_id": tok.pad_token_id or tok.eos_token_id,
        }
        if sample:
            kwargs["temperature"] = temperature
        else:  # greedy: clear sampling defaults a generation config may carry
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with added_to_residual(lm, layer, added), torch.inference_mode():
            out = lm.model.generate(**enc, **kwargs)
        outputs[label] = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return outputs


# ------------------------------------------------------------------- evaluation


def target_ids(tokenizer: Any, words: list[str]) -> list[int]:
    """The first token of each target word (as written, so ' good' keeps its space)."""
    ids = []
    for word in words:
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not pieces:
            raise InputError(f"the target word {word!r} has no tokens")
        ids.append(int(pieces[0]))
    return sorted(set(ids))


def next_token_logprobs(lm: LoadedModel, texts: list[str], batch_size: int = 16) -> np.ndarray:
    """[n, vocab] log-probabilities of the token after each text (right padding)."""
    with lm.lock:  # sets the shared tokenizer's padding side, and runs the shared model
        return _next_token_logprobs(lm, texts, batch_size)


def _next_token_logprobs(lm: LoadedModel, texts: list[str], batch_size: int) -> np.ndarray:
    import torch

    tok = lm.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True).to(lm.device)
        with torch.inference_mode():
            logits = lm.model(**enc, use_cache=False).logits
        last = enc["attention_mask"].sum(dim=1) - 1
        rows = logits[torch.arange(len(last), device=logits.device), last].float()
        out.append(torch.log_softmax(rows, dim=-1).cpu().numpy())
    return np.concatenate(out)


def _logodds(logprobs: np.ndarray, positive: list[int], negative: list[int]) -> tuple[np.ndarray, ...]:
    from scipy.special import logsumexp

    pos = logsumexp(logprobs[:, positive], axis=1)
    neg = logsumexp(logprobs[:, negative], axis=1)
    return pos - neg, pos, neg


@dataclass
class EvalResult:
    id: int
    vector: str
    model: str
    layer: int
    n_prompts: int
    baseline_logodds: float
    points: list[dict[str, Any]]
    targets: dict[str, Any]
    seconds: float
    prompts_label: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> list[dict[str, Any]]:
        """Per coefficient: the vector's shift and the random controls' mean and range."""
        rows = []
        for c in sorted({p["coefficient"] for p in self.points}):
            vec = [p for p in self.points if p["coefficient"] == c and p["control"] == "vector"][0]
            rand = [p["shift_logodds"] for p in self.points if p["coefficient"] == c and p["control"] == "random"]
            rows.append(
                {
                    "coefficient": c,
                    "vector_shift": vec["shift_logodds"],
                    "vector_sd": vec["sd_logodds"],
                    "random_mean": float(np.mean(rand)) if rand else None,
                    "random_min": float(np.min(rand)) if rand else None,
                    "random_max": float(np.max(rand)) if rand else None,
                }
            )
        return rows


def parse_coefficients(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--coefficients must be numbers separated by commas, got {text!r}") from None
    if not values or not all(np.isfinite(values)):
        raise InputError(f"--coefficients must be finite numbers, got {text!r}")
    return sorted(set(values))


def evaluate(
    wh: Warehouse,
    vector_name: str,
    prompts: PromptSource,
    *,
    positive_words: list[str] | None = None,
    negative_words: list[str] | None = None,
    coefficients: list[float] | None = None,
    n_random: int = 3,
    seed: int = 0,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
    models: ModelCache | None = None,
) -> EvalResult:
    """Mean log-odds shift of positive vs negative target tokens over a prompt set, per
    coefficient, for the vector and for ``n_random`` random vectors of the same norm."""
    started = time.perf_counter()
    positive_words = positive_words or POSITIVE_WORDS
    negative_words = negative_words or NEGATIVE_WORDS
    coefficients = coefficients or [-2.0, -1.0, -0.5, 0.5, 1.0, 2.0]
    if n_random < 0:
        raise InputError("--random must be >= 0")
    if not prompts.texts:
        raise InputError(f"the evaluation prompt set {prompts.label} is empty")
    with Session(wh.engine) as session:
        row, model, vector = load_vector(session, vector_name)
        check_width(vector, model, vector_name)
        vector_id, layer = row.id, row.layer
        session.expunge_all()
    if model.kind != "causal":
        raise InputError(f"{model.name} is an encoder; target-token log-probabilities need a causal language model")
    lm = open_stored_model(model, device=device, models=models)
    pos_ids, neg_ids = target_ids(lm.tokenizer, positive_words), target_ids(lm.tokenizer, negative_words)
    if set(pos_ids) & set(neg_ids):
        raise InputError("the positive and negative target words share a first token; choose distinct words")
    rng = np.random.default_rng(seed)
    norm = float(np.linalg.norm(vector))
    randoms = [(d := rng.standard_normal(vector.shape[0])) / np.linalg.norm(d) * norm for _ in range(n_random)]

    def logodds(delta: np.ndarray | None) -> tuple[np.ndarray, ...]:
        with added_to_residual(lm, layer, delta):
            return _logodds(next_token_logprobs(lm, prompts.texts, batch_size), pos_ids, neg_ids)

    from tqdm.auto import tqdm

    runs = [
        (c, control, replicate, direction)
        for c in coefficients
        for control, replicate, direction in [("vector", 0, vector)] + [("random", i, r) for i, r in enumerate(randoms)]
    ]
    bar = tqdm(
        total=len(runs) + 1, desc=f"evaluate {vector_name}", unit="pass", disable=not progress, dynamic_ncols=True
    )
    base, base_pos, base_neg = logodds(None)
    bar.update()
    points = []
    for coefficient, control, replicate, direction in runs:
        lo, lp, ln = logodds(coefficient * direction)
        bar.update()
        shift = lo - base
        points.append(
            {
                "control": control,
                "replicate": replicate,
                "coefficient": coefficient,
                "shift_logodds": float(shift.mean()),
                "sd_logodds": float(shift.std(ddof=1)) if len(shift) > 1 else 0.0,
                "shift_positive": float((lp - base_pos).mean()),
                "shift_negative": float((ln - base_neg).mean()),
                "n_prompts": len(shift),
            }
        )
    bar.close()
    targets = {
        "positive_words": positive_words,
        "negative_words": negative_words,
        "positive_ids": pos_ids,
        "negative_ids": neg_ids,
        "rule": "first token of each word",
    }
    seconds = time.perf_counter() - started
    with wh.engine.begin() as conn:
        eval_id = conn.execute(
            sa.insert(SteeringEval)
            .values(
                vector_id=vector_id,
                layer=layer,
                prompts=prompts.provenance(),
                targets=targets,
                coefficients=coefficients,
                n_random=n_random,
                seed=seed,
                baseline_logodds=float(base.mean()),
                seconds=seconds,
            )
            .returning(SteeringEval.id)
        ).scalar_one()
        conn.execute(sa.insert(SteeringEvalPoint), [{"eval_id": eval_id, **p} for p in points])
    return EvalResult(
        eval_id,
        vector_name,
        model.name,
        layer,
        len(prompts.texts),
        float(base.mean()),
        points,
        targets,
        seconds,
        prompts.label,
    )
