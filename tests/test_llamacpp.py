"""benchmarks.llamacpp: our transformer exported with models.gguf.write_gguf gives llama.cpp's logits equal to ours.

Skipped without llama-cpp-python or gguf. Small random models (plain and grouped-query attention, tied and
untied embeddings), f32 and f16 GGUFs; a few tokens, so rotary positions matter.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from benchmarks.llamacpp import llamacpp_decode, llamacpp_logits  # noqa: E402
from models import ModelConfig, build_model  # noqa: E402
from models.gguf import write_gguf  # noqa: E402

IDS = [5, 300, 17, 42, 511, 8, 99, 256, 3, 77, 150, 12]


@pytest.mark.parametrize("n_kv_heads,tie", [(0, False), (2, True)])
@pytest.mark.parametrize("dtype,atol", [("f32", 1e-2), ("f16", 2e-2)])
def test_logits_equal_ours(tmp_path: Path, n_kv_heads: int, tie: bool, dtype: str, atol: float) -> None:
    cfg = ModelConfig(kind="transformer", vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                      tie_embeddings=tie, max_seq_len=256)
    model = build_model(cfg, seed=0).eval()
    path = write_gguf(model, tmp_path / "m.gguf", dtype)
    with torch.no_grad():
        ours = model(torch.tensor([IDS]))[0].numpy()
    theirs = llamacpp_logits(path, IDS)
    assert theirs.shape == ours.shape
    # llama.cpp keeps K/V in f16 (and f16 weights in the f16 file); the logits here reach about 4
    np.testing.assert_allclose(theirs, ours, atol=atol, rtol=0)
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def test_decode_reports_rates(tmp_path: Path) -> None:
    cfg = ModelConfig(kind="transformer", vocab_size=512, d_model=64, n_layers=1, n_heads=2, max_seq_len=256)
    path = write_gguf(cfg, tmp_path / "m.gguf")
    for batch in (1, 3):
        r = llamacpp_decode(path, context=40, steps=3, threads=1, batch=batch)
        assert r["batch"] == batch and r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0


def test_rejects_other_kinds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="transformer-kind"):
        write_gguf(ModelConfig(kind="attamba", vocab_size=512, d_model=64, n_layers=1, n_heads=2), tmp_path / "a.gguf")
    with pytest.raises(ValueError, match="dtype"):
        write_gguf(ModelConfig(kind="transformer", vocab_size=512, d_model=64, n_layers=1, n_heads=2),
                   tmp_path / "b.gguf", dtype="q4")


def test_bench_smollm2_flags() -> None:
    import argparse

    from benchmarks import cli as bench_cli

    parser = argparse.ArgumentParser()
    bench_cli.configure(parser)
    args = parser.parse_args(["smollm2", "--threads", "1", "--batches", "1,8", "--skip-hf"])
    assert (args.out, args.batches, args.contexts, args.skip_hf) == (Path("bench-results"), [1, 8], [1024, 4096], True)
    with pytest.raises(SystemExit):
        parser.parse_args(["smollm2", "--threads", "0"])


def test_checkpoint_tokenizer_json_becomes_llamacpp_vocab(tmp_path: Path) -> None:
    """transformer-wt2 with its own tokenizer.json: llama.cpp splits and spells text as our tokenizer does."""
    from llama_cpp import Llama
    from tokenizers import Tokenizer

    ckpt = Path(__file__).parents[1] / "checkpoints" / "transformer-wt2"
    path = write_gguf(ckpt, tmp_path / "wt2.gguf", vocab_from=ckpt / "tokenizer.json")
    ours = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    llm = Llama(str(path), vocab_only=True, verbose=False)
    text = "The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building."
    ids = ours.encode(text).ids
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    assert llm.detokenize(ids).decode() == ours.decode(ids)
    assert llm.token_eos() == 0


def test_tokenizer_json_must_match_the_vocabulary(tmp_path: Path) -> None:
    cfg = ModelConfig(kind="transformer", vocab_size=512, d_model=64, n_layers=1, n_heads=2)
    tokenizer = Path(__file__).parents[1] / "checkpoints" / "transformer-wt2" / "tokenizer.json"
    with pytest.raises(ValueError, match="8192 tokens"):
        write_gguf(cfg, tmp_path / "m.gguf", vocab_from=tokenizer)
