"""The paged layout (models/paged.py) and the prefill op (kernels/prefill_attention.py): the op
equals its naive `_ref` on ragged, padded rows; chunks prefilled through the pools, over several
steps, equal dense attention over whole sequences; building metadata changes nothing."""
from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from kernels import prefill_attention, prefill_attention_ref
from models import ModelConfig, build_model
from models.attention import dense_attention_ref
from models.kv_spec import CacheSpec
from models.paged import LayerCache, build_decode_metadata, build_prefill_metadata, record_ring

prefill_mod = importlib.import_module("kernels.prefill_attention")
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def op_inputs(H: int, Hkv: int, W: int, window: int, block_size: int, dtype: torch.dtype, seed: int) -> dict:
    """Three rows right-padded to 7 tokens (7, 3 and 1 real), each at its own start, with what the
    metadata would give them: boundaries read by count, other keys up to `window` positions on."""
    g = torch.Generator().manual_seed(seed)
    B, T, D = 3, 7, 8
    starts, lengths = torch.tensor([0, 9, 4]), torch.tensor([7, 3, 1])
    idx = torch.arange(T)
    q_pos, real = starts[:, None] + idx, idx < lengths[:, None]
    bnd = (torch.rand(B, T, generator=g) < 0.3) & real
    bnd[2, 0] = True  # row 2's one token is a boundary: its padding queries read nothing
    k_last = torch.where(bnd | ~real, -1, q_pos + torch.randint(0, window + 1, (B, T), generator=g))
    bnd_count = torch.where(real, torch.tensor([0, 5, 2])[:, None] + bnd.long().cumsum(1), 0)
    M = -(-int(bnd_count.max()) // block_size)
    tables = torch.randperm(B * M + 1, generator=g)[: B * M].view(B, M)
    S = B + 1 if W else 0
    win_last = torch.where(torch.rand(B, W, generator=g) < 0.7,
                           starts[:, None] + torch.randint(-1, T + 1, (B, W), generator=g), -1)
    win_last[2] = -1

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    return dict(q=randn(B, T, H, D), k=randn(B, T, Hkv, D), v=randn(B, T, Hkv, D), q_pos=q_pos, k_last=k_last,
                k_cache=randn(B * M + 1, block_size, Hkv, D), v_cache=randn(B * M + 1, block_size, Hkv, D),
                block_tables=tables, bnd_count=bnd_count, win_k=randn(S, W, Hkv, D), win_v=randn(S, W, Hkv, D),
                slots=torch.randperm(max(S, B), generator=g)[:B], win_last=win_last, window=window, scale=D**-0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,W,window,block_size", [(2, 2, 3, 2, 2), (4, 2, 0, 0, 4), (3, 1, 5, 9, 1)])
def test_prefill_attention_equals_ref(monkeypatch, dtype: torch.dtype, H: int, Hkv: int, W: int, window: int,
                                      block_size: int) -> None:
    monkeypatch.setattr(prefill_mod, "BLOCK_Q", 3)  # three query blocks, each with its own band and entries
    inp = op_inputs(H, Hkv, W, window, block_size, dtype, seed=H + W + window)
    want = prefill_attention_ref(**inp)
    got = prefill_attention(**inp)
    scale = max(1.0, want.float().abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype] * scale, rtol=TOL[dtype])
    assert not want[2, 1:].any() and not got[2, 1:].any()  # queries that read no key give zeros


def tiny(kind: str) -> ModelConfig:
    return ModelConfig(kind=kind, vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2 * (kind == "transformer"),
                       chunk_size=4, window=3, ssm_state=8, ssm_inner=16, ssm_heads=2, sliding_window=6)


@pytest.mark.parametrize("kind", ["attamba", "transformer", "sliding"])
def test_chunks_through_the_pools_equal_dense_attention(kind: str) -> None:
    """Three sequences prefilled in chunks over three steps (rows ragged, right-padded with noise,
    one sequence joining late in a reused slot): each chunk's attention through the pools equals
    dense attention over its whole sequence."""
    torch.manual_seed(0)
    cfg = tiny(kind)
    spec = CacheSpec.from_config(cfg)
    attn = build_model(cfg, seed=0).blocks[1].attn  # layer 1: an offset other than layer 0's
    H, Hkv, D, bs = cfg.num_attn_heads, cfg.num_kv_heads, cfg.head_dim, 2
    lengths = [13, 6, 20]
    q, k, v = ([torch.randn(1, n, h, D) for n in lengths] for h in (H, Hkv, Hkv))
    per_seq = max(1, -(-spec.max_entries(max(lengths)) // bs))  # tables are never empty (as the runner's)
    tables = torch.randperm(3 * per_seq + 1)[: 3 * per_seq].view(3, per_seq)
    W = spec.window_slots
    S = 2 if W else 0
    k_pool, v_pool = torch.zeros(3 * per_seq + 1, bs, Hkv, D), torch.zeros(3 * per_seq + 1, bs, Hkv, D)
    win_k, win_v = torch.randn(S, W, Hkv, D), torch.randn(S, W, Hkv, D)  # noise: rings start empty
    cache = LayerCache(k_pool, v_pool, win_k, win_v, None, None)
    win_pos = torch.full((S, W), -1)
    slot_of = [0, 1, 1]  # sequence 2 takes sequence 1's slot after it
    for rows in [[(0, 0, 5), (1, 0, 6)], [(0, 5, 13), (2, 0, 8)], [(2, 8, 9)], [(2, 9, 20)]]:  # (seq, from, to)
        if W:  # a sequence starting in a slot empties its ring (as the runner does)
            win_pos[[slot_of[s] for s, a, _ in rows if a == 0]] = -1
        T = max(e - a for _, a, e in rows)
        chunk = [torch.randn(len(rows), T, h, D) for h in (H, Hkv, Hkv)]  # padding stays noise
        for b, (s, a, e) in enumerate(rows):
            for c, full in zip(chunk, (q, k, v)):
                c[b, : e - a] = full[s][0, a:e]
        meta = build_prefill_metadata(spec, torch.tensor([a for _, a, _ in rows]), torch.tensor([e - a for _, a, e in rows]),
                                      torch.tensor([slot_of[s] for s, _, _ in rows]), tables[[s for s, _, _ in rows]],
                                      win_pos, bs, T)
        out = attn.prefill(*chunk, meta, cache)
        record_ring(win_pos, meta.win_store, meta.positions)
        for b, (s, a, e) in enumerate(rows):
            pos = torch.arange(e)
            want = dense_attention_ref(q[s][:, :e], k[s][:, :e], v[s][:, :e], pos, attn.spec.is_boundary(pos),
                                       attn.spec.window)
            torch.testing.assert_close(out[b, : e - a], want[0, a:e], atol=1e-5, rtol=1e-5)


def test_building_metadata_changes_nothing() -> None:
    """The ring's positions are read, never written: the runner records them after the step."""
    spec = CacheSpec.from_config(tiny("attamba"))
    win_pos = torch.arange(3 * spec.window_slots).view(3, -1)
    before = win_pos.clone()
    slots, tables = torch.tensor([2, 0]), torch.tensor([[1, 2, 3], [4, 5, 6]])
    meta = build_decode_metadata(spec, torch.tensor([9, 4]), slots, tables, win_pos, 2, 8, 10000.0)
    assert torch.equal(win_pos, before)
    record_ring(win_pos, meta.win_store, meta.positions)
    assert win_pos[2, spec.ring_slot(torch.tensor(9))] == 9 and win_pos[0, spec.ring_slot(torch.tensor(4))] == 4
    win_pos = before.clone()
    build_prefill_metadata(spec, torch.tensor([5, 0]), torch.tensor([3, 6]), slots, tables, win_pos, 2, 6)
    assert torch.equal(win_pos, before)


@pytest.mark.parametrize("kind", ["attamba", "transformer"])
def test_layers_with_one_key_rule_share_a_prefill_plan(kind: str) -> None:
    """PrefillMetadata.plan makes one plan for the layers whose KeySpec is the same: their rows of the metadata
    are the same (so is the plan), and a plan is made once per KeySpec."""
    spec = CacheSpec.from_config(dataclasses.replace(tiny(kind), n_layers=9))  # 9 layers, P 4: offsets repeat
    win_pos = torch.arange(2 * spec.window_slots).view(2, -1)
    meta = build_prefill_metadata(spec, torch.tensor([7, 0]), torch.tensor([5, 9]), torch.tensor([1, 0]),
                                  torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]), win_pos, 2, 9)
    for i, a in enumerate(spec.layers):
        for j, b in enumerate(spec.layers[:i]):
            if a == b:
                for rows in (meta.bnd_count, meta.key_last, meta.win_last):
                    assert torch.equal(rows[i], rows[j])
        assert meta.plan(i, a) is meta.plan(next(j for j, b in enumerate(spec.layers) if b == a), a)
    assert len(meta.plans) == len(set(spec.layers)) < len(spec.layers)
