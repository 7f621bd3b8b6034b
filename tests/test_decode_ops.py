"""The decode ops' PyTorch references (kernels/) against the model's own reference step, on random
pools with ragged lengths, padding rows and reused slots; and the paged decode against the dense one."""
from __future__ import annotations

import pytest
import torch

from engine import EngineArgs, LLMEngine, SamplingParams
from kernels import decode_attention_ref, ssm_step_ref, store_kv_ref
from models.attention import gathered_attention
from models.ssm import ChunkSSM, SSMState
from conftest import ENGINE, make_checkpoint


def test_ssm_step_ref_equals_chunk_ssm_step() -> None:
    torch.manual_seed(0)
    d, E, N, h, W, S = 16, 8, 4, 2, 4, 5
    ssms = [ChunkSSM(d, E, N, h, W) for _ in range(2)]
    for m in ssms:
        m.reset_parameters()
    C = E + 2 * N
    conv = torch.randn(2, S, C, W - 1)
    ssm = torch.randn(2, S, h, E // h, N)
    before_conv, before_ssm = conv.clone(), ssm.clone()
    slots = torch.tensor([3, -1, 0, 4])  # slot 3 reused by a new sequence (reset), a padding row
    reset = torch.tensor([True, False, False, True])
    u = torch.randn(4, d)
    zxbcdt = torch.stack([m.in_proj(u) for m in ssms], 1)  # [B, 2, 2E + 2N + h]
    y = ssm_step_ref(zxbcdt[..., E : E + C], zxbcdt[..., E + C :], conv, ssm,
                     torch.stack([m.conv_weight for m in ssms]), torch.stack([m.A_log for m in ssms]),
                     torch.stack([m.D for m in ssms]), slots, reset)
    assert torch.all(y[1] == 0)  # padding row
    for g, m in enumerate(ssms):
        for b in (0, 2, 3):
            s = int(slots[b])
            state = SSMState(before_conv[g, s][None], before_ssm[g, s][None])
            out, new = m.step(u[b : b + 1], reset[b : b + 1], state)
            torch.testing.assert_close(conv[g, s], new.conv[0])
            torch.testing.assert_close(ssm[g, s], new.ssm[0])
            # y is the SSM output before the gate, norm and out_proj that the layer applies
            torch.testing.assert_close(m._output(y[b : b + 1, g], zxbcdt[b : b + 1, g, :E]), out)
    untouched = [1, 2]  # slots that no live row names
    assert torch.equal(conv[:, untouched], before_conv[:, untouched]) and torch.equal(ssm[:, untouched], before_ssm[:, untouched])


def test_store_kv_ref_skips_minus_one() -> None:
    k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    kc, vc = torch.zeros(10, 2, 4), torch.zeros(10, 2, 4)
    store_kv_ref(k, v, kc, vc, torch.tensor([7, -1, 2]))
    assert torch.equal(kc[7], k[0]) and torch.equal(vc[2], v[2])
    assert int((kc.abs().sum((1, 2)) > 0).sum()) == 2


@pytest.mark.parametrize("H,Hkv,W", [(4, 4, 3), (6, 2, 0), (4, 1, 5)])
def test_decode_attention_ref_equals_gathered_attention(H: int, Hkv: int, W: int) -> None:
    """Paged blocks (scattered, ragged) plus a ring, one softmax == the dense gathered reference."""
    torch.manual_seed(1)
    D, bs, num_blocks, S = 8, 4, 12, 3
    k_cache, v_cache = torch.randn(num_blocks, bs, Hkv, D), torch.randn(num_blocks, bs, Hkv, D)
    win_k, win_v = torch.randn(S, W, Hkv, D), torch.randn(S, W, Hkv, D)
    lens = torch.tensor([9, 1, 0, 5])  # ragged; row 2 is padding
    tables = torch.tensor([[5, 0, 11], [3, 0, 0], [0, 0, 0], [2, 7, 0]])  # non-contiguous blocks
    slots = torch.tensor([2, 0, -1, 1])
    win_mask = torch.rand(4, W) < 0.6
    win_mask[1] = True  # a row with one boundary entry reads its whole ring
    q = torch.randn(4, H, D)
    out = decode_attention_ref(q, k_cache, v_cache, tables, lens, win_k, win_v, slots, win_mask, D**-0.5)
    assert torch.all(out[2] == 0)
    for b in (0, 1, 3):
        entries = torch.arange(int(lens[b]))
        flat = tables[b, entries // bs] * bs + entries % bs
        parts = [(k_cache.flatten(0, 1)[flat][None], v_cache.flatten(0, 1)[flat][None], torch.ones(1, len(flat), dtype=torch.bool))]
        if W:
            s = int(slots[b])
            parts.append((win_k[s][None], win_v[s][None], win_mask[b][None]))
        torch.testing.assert_close(out[b : b + 1], gathered_attention(q[b : b + 1], parts))


@pytest.mark.parametrize("kind,dtype", [("attamba", "float32"), ("transformer", "float32"), ("sliding", "float32"),
                                        ("attamba", "bfloat16"), ("transformer", "bfloat16")])
def test_paged_decode_with_padding_row_equals_dense_decode(tmp_path, tokenizer_file, kind: str, dtype: str) -> None:
    """The engine's paged decode (LM.decode) == the dense fp32 reference step (models/state.py), for
    a ragged batch; a padding row (slot -1) changes nothing. bf16 weights and cache stay within a
    tolerance of the fp32 reference."""
    from models import decode_step, load_model, prefill

    extra = {"n_kv_heads": 2} if kind == "transformer" else {}
    path = make_checkpoint(tmp_path, tokenizer_file, kind, **extra)
    engine = LLMEngine(EngineArgs(model=str(path), cache_memory=ENGINE["cache_memory"], block_size=2,
                                  max_num_batched_tokens=64, dtype=dtype,
                                  enable_prefix_caching=False))  # one step prefills every prompt whole
    model = load_model(path)
    prompts = [[5, 9, 3, 7, 11, 2, 8], [4, 6], [13, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12]]
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    engine.step()  # every prompt prefilled, first tokens sampled
    seqs = [engine.requests[f"r{i}"][0] for i in range(3)]
    pad = type(seqs[0])("pad", 0, [1], seqs[0].params, 1, decoder=None)
    pad.num_computed, pad.block_table = 3, [0]  # slot -1: a padding row, pointing at a live block
    for step in range(5):
        refs = []  # the reference: a dense state built from scratch on prompt + outputs so far
        for s in seqs:
            _, state = prefill(model, torch.tensor([s.prompt_ids + s.output_ids[:-1]]))
            refs.append(decode_step(model, torch.tensor([s.output_ids[-1]]), state)[0][0])
        for s in seqs:
            engine.cache.allocate(s, s.num_computed + 1)
        if step % 2:  # a padding row between live rows: computed, never stored
            logits = engine.runner.decode([seqs[0], pad, seqs[1], seqs[2]])[[0, 2, 3]]
        else:
            logits = engine.runner.decode(seqs)
        for s, got, want in zip(seqs, logits, refs):
            if dtype == "float32":
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            else:  # bf16 keeps ~3 significant digits of weights and cache: compare the distributions
                torch.testing.assert_close(got.softmax(-1), want.softmax(-1), atol=5e-3, rtol=0)
            s.num_computed += 1
            s.output_ids.append(int(got.argmax()))


def test_padded_metadata_changes_no_live_row(tmp_path, tokenizer_file) -> None:
    """What a captured CUDA graph runs: the batch padded with slot -1 rows and block tables
    widened to the most a sequence can need gives the live rows the same logits and stores."""
    from models.paged import pad_decode_metadata

    path = make_checkpoint(tmp_path, tokenizer_file, "attamba")
    engines = [LLMEngine(EngineArgs(model=str(path), **ENGINE, block_size=2)) for _ in range(2)]
    for engine in engines:
        for i, n in enumerate((5, 11)):
            engine.add_request(f"r{i}", list(range(3, 3 + n)), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        engine.step()
    outs = []
    for padded, engine in enumerate(engines):
        runner = engine.runner
        seqs = [engine.requests[f"r{i}"][0] for i in range(2)]
        for s in seqs:
            engine.cache.allocate(s, s.num_computed + 1)
        tokens = torch.tensor([s.last_token for s in seqs])
        meta = runner._metadata(seqs)
        if padded:
            meta = pad_decode_metadata(meta, 4, meta.block_tables.shape[1] + 3)
            tokens = torch.cat([tokens, torch.tensor([7, 9])])
        with torch.no_grad():
            logits = runner.model.decode(tokens, meta, runner.caches)[:2]
        outs.append((logits, runner.k_pool.clone(), runner.ssm.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager(tmp_path, tokenizer_file) -> None:
    from engine import LLM

    path = make_checkpoint(tmp_path, tokenizer_file, "attamba")
    prompts = [list(range(3, 3 + n)) for n in (1, 6, 17, 40, 3)]  # 5 rows: replayed from the graph of 8
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = []
    for eager in (True, False):
        llm = LLM(str(path), device="cuda", max_num_seqs=8, enforce_eager=eager)
        assert (llm.engine.runner.graphs is None) == eager
        outs.append([o.token_ids for o in llm.generate(prompts, params)])
    assert outs[0] == outs[1]
