"""Load a Hugging Face model (hub id, local directory, or local GGUF file) and find
its decoder blocks.

GGUF files are de-quantized by transformers' GGUF loader, which is slow (tens of
seconds); the result is cached as safetensors under the data directory, keyed by the
file's path, size and modification time, so that later loads take a second or two.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerbase.ingest.steps import step
from layerbase.warehouse.config import data_dir
from layerbase.warehouse.errors import InputError

if TYPE_CHECKING:
    from layerbase.ingest.model_cache import ModelCache
    from layerbase.warehouse.models import Model

DTYPES = ("float32", "float16", "bfloat16")
ENCODER_TYPES = {
    "bert",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "electra",
    "deberta",
    "deberta-v2",
    "mpnet",
    "albert",
    "camembert",
}


@dataclass
class LoadedModel:
    """A model ready for extraction, with what provenance needs to know about it."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any
    blocks: Any  # torch.nn.ModuleList of the decoder blocks
    hook_site: str
    kind: str  # causal or encoder
    source: str
    revision: str | None
    gguf_file: str | None
    dtype: str
    device: str
    n_layers: int
    width: int
    vocab_size: int
    context_length: int
    tied_embeddings: bool
    from_cache: bool = False
    fingerprint: str | None = None  # ingest.fingerprint: sha256 over the files loaded
    # Held by every use that installs hooks or sets tokenizer state (extraction, steering,
    # next-token scores): threads that share a loaded model (``layerbase serve``) would
    # otherwise see each other's hooks, and a steering vector would leak into a lookup.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def architecture(self) -> str:
        return str(self.model.config.model_type)

    @property
    def base(self) -> Any:
        """The model without its LM head: extraction needs no logits."""
        prefix = getattr(self.model, "base_model_prefix", "")
        return getattr(self.model, prefix, self.model) if prefix else self.model


def pick_device(requested: str | None = None) -> str:
    """CUDA if present, else MPS, else CPU (unless the user asked for one)."""
    import torch

    if requested:
        try:
            device = torch.device(requested)
        except (RuntimeError, ValueError):
            device = None
        if device is None or device.type not in ("cpu", "cuda", "mps"):
            raise InputError(f"--device {requested!r} is not a device; use cpu, cuda, cuda:N or mps")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"--device {requested} was asked for but CUDA is not available here; use --device cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise InputError(
                f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA devices "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError(f"--device {requested} was asked for but MPS is not available here; use --device cpu")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise InputError(f"unknown --dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or source.endswith(".gguf")
        or os.sep + os.sep in source
    )


def gguf_cache_dir(path: Path, dtype: str) -> Path:
    """Where a GGUF file's converted model is cached: keyed by the file's content and the dtype."""
    from layerbase.ingest.fingerprint import file_digest

    key = hashlib.sha256(f"{file_digest(path)}|{dtype}".encode()).hexdigest()[:24]
    return data_dir() / "models" / f"{path.stem}-{key}"


def is_causal(config: Any) -> bool:
    """Causal LM or encoder, from the config's architectures, flags and model type."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    if getattr(config, "is_encoder_decoder", False):
        raise InputError(f"{config.model_type} is an encoder-decoder model; Layerbase supports causal LMs and encoders")
    return config.model_type not in ENCODER_TYPES


def find_blocks(model: Any, n_layers: int) -> tuple[str, Any]:
    """The ModuleList of the model's ``n_layers`` decoder (or encoder) blocks, and its path."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers and n_layers > 0:
            return name, module
    raise InputError(
        f"cannot find the decoder blocks of this {model.config.model_type} model: no module list "
        f"with num_hidden_layers = {n_layers} blocks; this architecture is not supported"
    )


def _from_pretrained(cls: Any, where: str, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(where, **kwargs)


def _load_config(where: str, revision: str | None, gguf_file: str | None, source: str, local_only: bool) -> Any:
    from transformers import AutoConfig

    try:
        return _from_pretrained(AutoConfig, where, revision=revision, gguf_file=gguf_file, local_files_only=local_only)
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if Path(where).exists():
            raise InputError(
                f"{source} is not a loadable model ({reason[:300]}); point at a model directory or .gguf file"
            ) from None
        raise InputError(
            f"cannot load model {source!r}: it is not a local path and the Hugging Face hub did not "
            f"provide it ({reason[:200]}); pass a local model directory or .gguf file"
        ) from None


def load_model(
    source: str,
    *,
    revision: str | None = None,
    dtype: str = "float32",
    device: str | None = None,
    gguf_file: str | None = None,
    progress: bool = True,
    label: str | None = None,
) -> LoadedModel:
    """Load a causal LM or encoder with its tokenizer, in eval mode on the chosen device.
    ``label`` names the model in progress lines (default: ``source``).

    ``progress`` shows the one bar loading can need: a GGUF file's conversion (about 30 s the
    first time, before the converted model is cached)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # our own bars say what runs
    from layerbase.ingest import hub
    from layerbase.ingest.fingerprint import fingerprint

    device = pick_device(device)
    where, gguf_file = _locate(source, gguf_file)
    local_only = Path(where).exists() or hub.prepare(where, revision)
    model, tokenizer, causal, from_cache = _load_weights(
        source, where, gguf_file, revision, dtype, progress, local_only, label or source
    )
    model.to(device).eval()
    lm = _describe(model, tokenizer, causal, source, revision, gguf_file, dtype, device, from_cache)
    lm.fingerprint = fingerprint(where, gguf_file, revision)  # a hub model's files exist once loaded
    return lm


def _locate(source: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Where to load from (a resolved local directory, or the hub id as given) and the GGUF
    file in it, if any; a path that is neither a model directory nor a .gguf file is refused."""
    path = Path(source).expanduser()
    if not path.exists():
        if _looks_like_path(source):
            raise InputError(f"model path {source} does not exist; check the path")
        return source, gguf_file
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"{source} is a file but not a .gguf file; pass a model directory or a .gguf file")
        path, gguf_file = path.parent, path.name
    elif gguf_file is None and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise InputError(
                f"{source} is not a model directory (no config.json"
                + (f", and {len(ggufs)} .gguf files: pick one by passing its path" if ggufs else "")
                + "); point at a Hugging Face model directory or a .gguf file"
            )
        gguf_file = ggufs[0].name
    return str(path.resolve()), gguf_file


def _load_weights(
    source: str,
    where: str,
    gguf_file: str | None,
    revision: str | None,
    dtype: str,
    progress: bool,
    local_only: bool = True,
    label: str = "",
) -> tuple[Any, Any, bool, bool]:
    """(model, tokenizer, whether it is a causal LM, whether a cached conversion was used). A GGUF file is read from its
    safetensors cache when one is complete, else de-quantized and then cached."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from_cache = False
    load_from, load_gguf = where, gguf_file
    if gguf_file:
        cache = gguf_cache_dir(Path(where) / gguf_file, dtype)
        if (cache / "complete").exists():
            load_from, load_gguf, from_cache = str(cache), None, True
    config = _load_config(load_from, revision if not gguf_file else None, load_gguf, source, local_only)
    causal = is_causal(config)
    cls = AutoModelForCausalLM if causal else AutoModel
    # Local files, or a hub model already cached: never ask the hub (its client retries).
    options: dict[str, Any] = {"local_files_only": True} if local_only else {}
    if load_gguf:
        options["gguf_file"] = load_gguf
    elif revision and not gguf_file:
        options["revision"] = revision
    # A GGUF file's first load is slow (about 50 s for Gemma-3-270M): each step says so.
    slow = progress and bool(load_gguf)
    try:
        with step(f"{label or source}: reading the tokenizer from {load_gguf}", slow):
            tokenizer = _from_pretrained(AutoTokenizer, load_from, **options)
        with (
            step(f"{label or source}: de-quantizing {load_gguf} to {dtype} (once)", slow),
            _gguf_conversion_bar(shown=progress),
        ):
            model = _from_pretrained(cls, load_from, dtype=_torch_dtype(dtype), **options)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise InputError(f"cannot load model {source!r}: {reason[:300]}") from None
    if load_gguf:
        size = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
        cache_dir = gguf_cache_dir(Path(where) / load_gguf, dtype)
        with step(f"{label or source}: caching the converted model ({size:.1f} GB) in {cache_dir}", slow):
            model = _cache_gguf(model, tokenizer, Path(where) / load_gguf, dtype)
    return model, tokenizer, causal, from_cache


def _describe(
    model: Any,
    tokenizer: Any,
    causal: bool,
    source: str,
    revision: str | None,
    gguf_file: str | None,
    dtype: str,
    device: str,
    from_cache: bool,
) -> LoadedModel:
    """The loaded model with its blocks, width, vocabulary, context and embedding tying."""
    text_config = model.config.get_text_config()
    n_layers = int(text_config.num_hidden_layers)
    hook_site, blocks = find_blocks(model, n_layers)
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings() if causal else None
    tied = out is not None and out.weight.data_ptr() == inp.weight.data_ptr()
    context = int(getattr(text_config, "max_position_embeddings", 0) or 0)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max and tok_max < 1_000_000:
        context = min(context, int(tok_max)) if context else int(tok_max)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        blocks=blocks,
        hook_site=f"{hook_site}[i] output",
        kind="causal" if causal else "encoder",
        source=source,
        revision=revision,
        gguf_file=gguf_file,
        dtype=dtype,
        device=device,
        n_layers=n_layers,
        width=int(text_config.hidden_size),
        vocab_size=int(inp.weight.shape[0]),
        context_length=context or 2048,
        tied_embeddings=bool(tied),
        from_cache=from_cache,
    )


@contextmanager
def _gguf_conversion_bar(*, shown: bool) -> Iterator[None]:
    """transformers draws the GGUF conversion bar with tqdm directly, past its own
    ``disable_progress_bar()`` (and tqdm 4.70 reads no TQDM_DISABLE at run time), so the
    bar is hidden by handing that module a disabled tqdm while the model loads."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf
    except ImportError:  # pragma: no cover - transformers without GGUF support
        yield
        return
    original = getattr(gguf, "tqdm", None)
    if shown or original is None:
        yield
        return
    gguf.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf.tqdm = original


def _cache_gguf(model: Any, tokenizer: Any, gguf_path: Path, dtype: str) -> Any:
    """Save a de-quantized GGUF model as safetensors; return a plain (unquantized) model.

    The GGUF-loaded model carries a quantization config that ``save_pretrained`` keeps;
    we drop it and rebuild the model class from the config (docs/design.md §6).
    """
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.to(model.dtype)
    cache = gguf_cache_dir(gguf_path, dtype)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "complete").write_text(str(gguf_path))
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    except OSError as exc:  # the cache is an optimisation; a full disk must not fail ingest
        warnings.warn(f"could not cache the converted GGUF model in {cache}: {exc}", stacklevel=2)
        shutil.rmtree(tmp, ignore_errors=True)
    return plain.eval()


def source_identity(source: str) -> str:
    """What the model row's ``source`` holds for a --model value: a packaged name, or as given."""
    from layerbase.ingest.packaged import ALIASES

    return ALIASES.get(source.lower(), source)


def default_model_name(source: str) -> str:
    """The name a model is stored under when the user gives none.

    Packaged names are looked up, not resolved: resolving Gemma assembles its GGUF file.
    """
    from pathlib import Path

    from layerbase.ingest.packaged import ALIASES

    if source.lower() in ALIASES:
        return ALIASES[source.lower()]
    path = Path(source)
    if path.exists():
        return path.stem if path.suffix == ".gguf" else path.resolve().name
    return source


def source_fingerprint(source: str, revision: str | None = None) -> str | None:
    """The fingerprint of the files a --model value loads from, before loading them (None
    for a hub id not in the local cache)."""
    from layerbase.ingest.fingerprint import fingerprint
    from layerbase.ingest.packaged import resolve_packaged

    packaged = resolve_packaged(source)
    where, gguf_file = _locate(str(packaged[1]) if packaged else source, None)
    return fingerprint(where, gguf_file, revision)


def check_fingerprint(model: Model, found: str | None) -> None:
    """Refuse a stored model whose files no longer hash as when its activations were stored."""
    from layerbase.ingest.fingerprint import short

    if model.fingerprint is not None and found is not None and found != model.fingerprint:
        raise InputError(
            f"the files of model {model.name!r} at {model.source} changed since its activations were stored "
            f"(fingerprint {short(model.fingerprint)}, now {short(found)}); store the new files under a new "
            "--name, or restore the old ones"
        )


def open_model(
    source: str,
    *,
    revision: str | None = None,
    dtype: str = "float32",
    device: str | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Load a model by packaged name, hub id, directory or GGUF path."""
    from layerbase.ingest.loading import load_model
    from layerbase.ingest.packaged import resolve_packaged

    packaged = resolve_packaged(source, progress)
    if packaged:
        _, path = packaged
        name = source_identity(source)
        lm = load_model(str(path), revision=revision, dtype=dtype, device=device, progress=progress, label=name)
        lm.source = name
        return lm
    return load_model(source, revision=revision, dtype=dtype, device=device, progress=progress)


def open_stored_model(model: Model, *, device: str | None = None, models: ModelCache | None = None) -> LoadedModel:
    """Reload the weights a stored model row was ingested with; from ``models`` when it
    holds them already (it keeps what is loaded here)."""
    if model.source == "synthetic":
        raise InputError(f"model {model.name!r} is synthetic: it has no weights to run")

    found = source_fingerprint(model.source, model.revision)
    check_fingerprint(model, found)  # before loading: hashing is cheap, loading is not

    def load() -> LoadedModel:
        return open_model(model.source, revision=model.revision, dtype=model.dtype, device=device)

    if models is None:
        return load()
    return models.get((model.source, model.revision, model.dtype, device, found), load)
