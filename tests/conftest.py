"""Shared fixtures: a tiny tokenizer and tiny random checkpoints of each kind."""
from __future__ import annotations

from pathlib import Path

import pytest

from models import ModelConfig, build_model, save_checkpoint
from models.tokenizer import Tokenizer, train_tokenizer

SAMPLE = Path(__file__).parent / "data" / "wikitext_sample.txt"


@pytest.fixture(scope="session")
def sample() -> str:
    """The shipped WikiText-style sample text."""
    return SAMPLE.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tok(sample: str) -> Tokenizer:
    """A 512-token BPE trained on the sample."""
    return Tokenizer(train_tokenizer(sample, vocab_size=512))


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer(train_tokenizer(SAMPLE.read_text(), vocab_size=300)).save(path)
    return path


def make_checkpoint(root: Path, tokenizer_file: Path, kind: str, **kw) -> Path:
    """A randomly initialised checkpoint directory of the given kind."""
    vocab = Tokenizer.from_file(tokenizer_file).vocab_size
    cfg = dict(kind=kind, vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, chunk_size=4, window=3, ssm_state=8,
               ssm_inner=16, ssm_heads=2, max_seq_len=64, sliding_window=8, reduced_head_dim=4)
    cfg.update(kw)
    path = root / kind
    save_checkpoint(build_model(ModelConfig(**cfg), seed=0), path, tokenizer_file)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tokenizer_file) -> Path:
    """A tiny random Attamba checkpoint (P = 4, L = 3)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), tokenizer_file, "attamba")


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory, tokenizer_file):
    root = tmp_path_factory.mktemp("ckpts")
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = make_checkpoint(root, tokenizer_file, kind)
        return cache[kind]

    return get
