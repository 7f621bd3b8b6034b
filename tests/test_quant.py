"""Weight-only int8 linears: the fused product equals its dequantized twin, and row-wise scales make
quantize-then-concatenate equal concatenate-then-quantize (what weight packing relies on)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models.quant import Int8Linear, quantize_linears
from conftest import ENGINE, make_checkpoint


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_equals_its_dequantized_twin(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g)
    w[3] = 0  # an all-zero row keeps a finite scale
    lin = Int8Linear.from_weight(w.to(dtype))
    x = torch.randn(2, 5, 32, generator=g).to(dtype)
    ref = x.float() @ lin.dequantized().float().T
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(lin(x).float(), ref, atol=tol, rtol=tol)
    assert lin(x).shape == (2, 5, 48) and lin(x).dtype == dtype
    if dtype == torch.float32:  # off by at most half a quantization step in every row
        err = (lin.dequantized() - w).abs().max(1).values
        assert bool((err <= w.abs().amax(1) / 127 / 2 + 1e-6).all())


def test_concatenated_rows_equal_the_parts() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 24, generator=g), torch.randn(8, 24, generator=g) * 5
    parts = [Int8Linear.from_weight(a), Int8Linear.from_weight(b)]
    whole = Int8Linear.from_weight(torch.cat([a, b]))
    packed = Int8Linear.cat(parts)
    assert torch.equal(packed.qweight, whole.qweight) and torch.equal(packed.scales, whole.scales)
    assert parts[1].qweight.data_ptr() == packed.qweight[16:].data_ptr()  # the parts are views: no copy kept
    x = torch.randn(3, 24, generator=g)
    torch.testing.assert_close(packed(x), torch.cat([parts[0](x), parts[1](x)], -1))


def test_quantize_linears_replaces_only_the_named_bias_free_linears() -> None:
    model = nn.ModuleDict({"wq": nn.Linear(8, 8, bias=False), "w2": nn.Linear(8, 4, bias=False),
                           "other": nn.Linear(8, 8, bias=False), "b": nn.ModuleDict({"wq": nn.Linear(8, 8)})})
    assert quantize_linears(model, ("wq", "w2")) == 2
    assert isinstance(model["wq"], Int8Linear) and isinstance(model["w2"], Int8Linear)
    assert type(model["other"]) is nn.Linear and type(model["b"]["wq"]) is nn.Linear  # a bias is not handled
    with pytest.raises(ValueError, match="int8 weights"):
        Int8Linear(torch.zeros(4, 4), torch.ones(4))


@pytest.mark.parametrize("kind", ["attamba", "transformer"])
def test_int8_engine_generation_equals_the_int8_models_full_forward(tmp_path, tokenizer_file, kind: str) -> None:
    """--quantization int8: packed decode and chunked prefill agree with the quantized model's own forward."""
    from engine import LLM, SamplingParams
    from models import load_model
    from models.quant import INT8_LINEARS
    from tests.test_engine import greedy_reference, prompts_of

    path = make_checkpoint(tmp_path, tokenizer_file, kind)
    model = load_model(path)
    assert quantize_linears(model, INT8_LINEARS) == 7 * model.config.n_layers + 1  # 7 per block, the head
    prompts = prompts_of([1, 7, 20], model.config.vocab_size)
    llm = LLM(str(path), **ENGINE, max_num_batched_tokens=16, block_size=4, max_num_seqs=3, quantization="int8")
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert [o.token_ids for o in outs] == [greedy_reference(model, p, 8) for p in prompts]
