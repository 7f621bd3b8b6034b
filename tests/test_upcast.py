"""bf16 linears whose matrix-matrix products run in fp32 and whose FFN and head weights are held as fp16
(models/upcast.py) against F.linear, their slow twin; the engine uses them for bf16 on a CPU without native bf16,
and the tied head stays tied."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import LLMEngine, llm_engine
from engine.config import EngineArgs, resolve_dtype
from models import upcast
from models.upcast import HalfEmbedding, UpcastLinear, upcast_linear, upcast_linears
from conftest import ENGINE, make_checkpoint


@pytest.mark.parametrize("rows", [1, 3, 4, 9, 40])
def test_upcast_linear_equals_its_twin(monkeypatch, rows: int) -> None:
    monkeypatch.setattr(upcast, "CHUNK_BYTES", 4 * 24 * 7)  # chunks of 7 weight rows: 50 = 7 x 7 + 1
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, 24, generator=g).bfloat16(), torch.randn(50, 24, generator=g).bfloat16()
    got = upcast_linear(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 50)
    if rows <= upcast.NATIVE_ROWS:  # a matrix-vector product stays bf16
        assert torch.equal(got, F.linear(x, w))
    else:  # fp32 products by chunks of rows, one rounding: the fp32 product rounded once
        torch.testing.assert_close(got, F.linear(x.float(), w.float()).bfloat16(), atol=0, rtol=2**-8)
    torch.testing.assert_close(got, F.linear(x, w), atol=0.1, rtol=2**-6)  # and what native bf16 computes
    half = upcast_linear(x, w.half())  # the same values held as fp16: fp32 accumulation, fp16 then bf16 rounding
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, F.linear(x.float(), w.float()).bfloat16(), atol=0, rtol=2**-7)


def test_ffn_and_head_weights_are_held_as_fp16_unless_out_of_range() -> None:
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(40, 8).bfloat16()
    model.head = torch.nn.Linear(8, 40, bias=False).bfloat16()
    model.head.weight = model.embed.weight
    model.w2 = torch.nn.Linear(8, 8, bias=False).bfloat16()
    model.wo = torch.nn.Linear(8, 8, bias=False).bfloat16()
    with torch.no_grad():
        model.w2.weight[0, 0] = 1e5  # beyond fp16's range
    embed_rows = model.embed.weight[torch.tensor([3, 7])].clone()
    x = torch.randn(1, 8, generator=g).bfloat16()
    head_out = F.linear(x.float(), model.embed.weight.float())
    assert upcast_linears(model) == 3
    assert model.head.weight.dtype == torch.float16 and model.head.weight is model.embed.weight  # still tied
    assert isinstance(model.embed, HalfEmbedding) and torch.equal(model.embed(torch.tensor([3, 7])), embed_rows)
    assert model.w2.weight.dtype == torch.bfloat16 and model.wo.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.head(x), head_out.bfloat16(), atol=0, rtol=2**-7)


def test_a_bf16_engine_without_native_bf16_upcasts_every_linear(tmp_path, tokenizer_file, monkeypatch) -> None:
    monkeypatch.setattr(llm_engine, "native_bf16", lambda: False)
    path = make_checkpoint(tmp_path, tokenizer_file, "attamba", tie_embeddings=True)
    engine = LLMEngine(EngineArgs(model=str(path), **{**ENGINE, "dtype": "bfloat16"}))
    model = engine.model
    assert isinstance(model.head, UpcastLinear) and model.head.weight is model.embed.weight  # still tied
    blk = model.blocks[0]
    assert isinstance(blk.attn.packed.w_in, UpcastLinear) and isinstance(blk.ffn.w13, UpcastLinear)
    assert blk.ffn.w13.weight.dtype == model.head.weight.dtype == torch.float16  # upcast.HALF_LINEARS
    assert blk.attn.packed.w_in.weight.dtype == blk.attn.wo.weight.dtype == torch.bfloat16
    assert blk.attn.wq.weight.data_ptr() == blk.attn.packed.w_in.weight.data_ptr()  # packed: views, no copy
    assert not any(type(m) is torch.nn.Linear for m in model.modules() if getattr(m, "bias", None) is None)
    fp32 = LLMEngine(EngineArgs(model=str(path), **ENGINE))
    assert not any(isinstance(m, UpcastLinear) for m in fp32.model.modules())


def test_auto_dtype_is_bf16_where_bf16_products_are_vectorised(monkeypatch) -> None:
    from engine import config

    monkeypatch.setattr(config, "native_bf16", lambda: False)
    for capability, want in (("AVX2", torch.bfloat16), ("AVX512", torch.bfloat16), ("DEFAULT", torch.float32)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert resolve_dtype("auto", "cpu") == want
    assert resolve_dtype("float32", "cpu") == torch.float32
