"""The model core: attention pattern, chunked SSM, cached decoding == full forward, state bytes, checkpoints."""
from __future__ import annotations

import pytest
import torch

from models import ModelConfig, build_model, decode_step, full_kv_bytes, load_model, prefill, save_checkpoint, state_bytes
from models.attention import block_attention, dense_attention_ref
from models.kv_spec import CacheSpec, chunk_start, is_boundary, num_boundaries, visible
from models.loading import CheckpointError
from models.ssm import ChunkSSM, chunk_ids, ssd_banded, ssd_recurrent_ref


def tiny(kind: str, P: int = 4, L: int = 3, **kw) -> ModelConfig:
    base = dict(kind=kind, vocab_size=61, d_model=32, n_layers=3, n_heads=4, chunk_size=P, window=L,
                ssm_state=8, ssm_inner=16, ssm_heads=2, sliding_window=P + L + 1, reduced_head_dim=4)
    base.update(kw)
    return ModelConfig(**base)


def boundary_set(T: int, P: int, o: int) -> set[int]:
    """B_l straight from the paper's formula."""
    return {0} | {(k + 1) * P - 1 - o for k in range(T // P + 2)}


# ---- chunk boundaries --------------------------------------------------------------------------
@pytest.mark.parametrize("P", [1, 2, 4, 8, 16])
def test_boundaries_match_formula(P: int) -> None:
    cfg = ModelConfig(vocab_size=16, chunk_size=P)
    pos = torch.arange(100)
    for layer in range(cfg.n_layers):
        o = cfg.layer_offset(layer)
        want = boundary_set(100, P, o)
        got = {int(p) for p in pos[is_boundary(pos, P, o)]}
        assert got == {b for b in want if b < 100}
        for n in range(0, 100):
            assert num_boundaries(n, P, o) == len([b for b in want if b < n])
        starts = {int(p) for p in pos[chunk_start(pos, P, o)]}
        assert starts == {0} | {b + 1 for b in want if b + 1 < 100}


def test_paper_examples() -> None:
    cfg = ModelConfig(vocab_size=16, chunk_size=8, n_layers=8)
    pos = torch.arange(20)
    assert pos[is_boundary(pos, 8, cfg.layer_offset(0))].tolist() == [0, 7, 15]
    assert pos[is_boundary(pos, 8, cfg.layer_offset(7))].tolist() == [0, 8, 16]
    assert [cfg.layer_offset(i) for i in range(8)] == list(range(8))
    assert {ModelConfig(vocab_size=16, chunk_size=4, n_layers=8).layer_offset(i) for i in range(8)} == {0}


# ---- attention pattern -------------------------------------------------------------------------
@pytest.mark.parametrize("kind,P,L", [("attamba", 4, 3), ("attamba", 8, 0), ("attamba", 2, 8), ("sliding", 4, 3), ("transformer", 4, 3)])
def test_block_attention_equals_dense_mask(kind: str, P: int, L: int) -> None:
    torch.manual_seed(0)
    T, H, D = 37, 2, 8
    q, k, v = (torch.randn(2, T, H, D) for _ in range(3))
    pos = torch.arange(T)
    spec = CacheSpec.from_config(tiny(kind, P, L)).layers[1]
    bnd = spec.is_boundary(pos)
    ref = dense_attention_ref(q, k, v, pos, bnd, spec.window)
    out = block_attention(q, k, v, pos, pos, bnd, spec.window, block=5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_visibility_is_the_papers_rule() -> None:
    P, L, o, T = 4, 3, 2, 30
    bset = boundary_set(T, P, o)
    pos = torch.arange(T)
    mask = visible(pos, pos, is_boundary(pos, P, o), L)
    for t in range(T):
        want = [s for s in range(T) if s <= t and (s in bset or s >= t - L)]
        assert mask[t].nonzero().squeeze(1).tolist() == want
        assert mask[t, 0]  # token 0 is always visible


@pytest.mark.parametrize("kind,P,L", [("attamba", 4, 3), ("attamba", 8, 0), ("attamba", 3, 5), ("sliding", 4, 3),
                                      ("transformer", 4, 3), ("pseudo", 4, 3)])
def test_key_spec_agrees_with_the_mask(kind: str, P: int, L: int) -> None:
    """Entries kept, keys read, window ring and bytes all follow from the one visibility rule."""
    cfg = tiny(kind, P, L)
    cache = CacheSpec.from_config(cfg)
    T, horizon = 40, 60  # queries up to T, looked at by later queries up to the horizon
    pos = torch.arange(horizon)
    for layer, spec in enumerate(cache.layers):
        mask = spec.visible(pos, pos)  # [horizon, horizon]
        for t in range(T):
            # keys no later query can lose are exactly the boundaries: what the blocks keep
            kept_forever = [s for s in range(t) if all(mask[u, s] for u in range(s, horizon))]
            assert int(spec.num_entries(t)) == len(kept_forever)
            assert spec.keys_seen(t) == int(mask[t].sum())
            # every visible key is a boundary or inside the window ring
            assert all(spec.is_boundary(torch.tensor(s)) or t - s < max(spec.window_slots, 1) for s in range(t + 1) if mask[t, s])
        assert torch.equal(cache.is_boundary(pos)[layer], spec.is_boundary(pos))
        assert torch.equal(cache.chunk_start(pos)[layer], chunk_start(pos, P, spec.offset))
        assert torch.equal(cache.num_entries(pos)[layer], spec.num_entries(pos))
    full = CacheSpec.from_config(cfg.replace(kind="transformer"))
    assert full.seq_bytes(T, torch.float32) == cache.full_kv_bytes(T, torch.float32) or cfg.kind == "reduced"


@pytest.mark.parametrize("kind,P,L", [("attamba", 4, 3), ("attamba", 8, 0), ("attamba", 3, 5), ("sliding", 4, 3),
                                      ("transformer", 4, 3)])
def test_window_rule_and_ring_follow_the_papers_mask(kind: str, P: int, L: int) -> None:
    """last_query, window_last, ring_slot and ring_reads against the mask written from the paper's
    formula: a ring written one position at a time serves exactly the visible keys that are not
    boundaries, the blocks (num_entries) exactly the visible boundaries."""
    cfg = tiny(kind, P, L)
    cache = CacheSpec.from_config(cfg)
    T = 40
    pos = torch.arange(T)
    window = {"attamba": L, "sliding": cfg.sliding_window - 1}.get(kind, T)
    for layer, spec in enumerate(cache.layers):
        bset = boundary_set(T, P, cfg.layer_offset(layer)) if kind == "attamba" else set(range(T) if kind == "transformer" else ())
        mask = torch.tensor([[s <= t and (s in bset or s >= t - window) for s in range(T)] for t in range(T)])
        assert torch.equal(spec.visible(pos, pos), mask)
        last_seen = [max(t for t in range(T) if mask[t, s]) for s in range(T)]  # the last query in view
        assert spec.last_query(pos).clamp(max=T - 1).tolist() == last_seen
        assert spec.window_last(pos).clamp(max=T - 1).tolist() == [-1 if s in bset else last_seen[s] for s in range(T)]
        ring = torch.full((spec.window_slots,), -1)
        for t in range(T):
            if spec.window_slots:
                ring[spec.ring_slot(torch.tensor(t))] = t
                assert sorted(ring[spec.ring_reads(torch.tensor(t), ring)].tolist()) == [
                    s for s in range(t + 1) if mask[t, s] and s not in bset]
            else:  # no ring: every visible key is a boundary
                assert all(s in bset for s in range(t + 1) if mask[t, s])
            assert int(spec.num_entries(t + 1)) == sum(1 for s in range(t + 1) if mask[t, s] and s in bset)
        assert torch.equal(cache.window_last(pos)[layer], spec.window_last(pos))
        if spec.window_slots:
            rings = torch.stack([pos[t - spec.window_slots + 1 : t + 1] for t in range(spec.window_slots, T)])
            q = torch.arange(spec.window_slots, T)[:, None]
            assert torch.equal(cache.ring_reads(q, rings)[layer], spec.ring_reads(q, rings))
            assert torch.equal(cache.ring_slot(pos), spec.ring_slot(pos))


# ---- SSM -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("P,o", [(2, 0), (4, 1), (8, 7), (16, 3)])
def test_banded_ssd_equals_recurrence_with_resets(P: int, o: int) -> None:
    torch.manual_seed(1)
    B, T, h, p, N = 2, 41, 3, 4, 5
    x, Bm, Cm = torch.randn(B, T, h, p), torch.randn(B, T, N), torch.randn(B, T, N)
    dt = torch.rand(B, T, h) * 0.5
    A = -torch.rand(h) - 0.1
    pos = torch.arange(T)
    y, final = ssd_banded(x, dt, A, Bm, Cm, chunk_ids(pos, P, o), P, last=torch.tensor([T - 1, T - 1]))
    y_ref, s_ref = ssd_recurrent_ref(x, dt, A, Bm, Cm, chunk_start(pos, P, o))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, s_ref, atol=1e-5, rtol=1e-5)


def test_banded_ssd_continues_from_a_state() -> None:
    """Split a sequence mid-chunk: the second half starts from the first half's state."""
    torch.manual_seed(2)
    B, T, h, p, N, P, o = 1, 30, 2, 3, 4, 8, 5
    x, Bm, Cm = torch.randn(B, T, h, p), torch.randn(B, T, N), torch.randn(B, T, N)
    dt, A = torch.rand(B, T, h), -torch.rand(h) - 0.1
    pos = torch.arange(T)
    y_ref, s_ref = ssd_recurrent_ref(x, dt, A, Bm, Cm, chunk_start(pos, P, o))
    for cut in (5, 11, 13):
        cid = chunk_ids(pos, P, o)
        _, s1 = ssd_banded(x[:, :cut], dt[:, :cut], A, Bm[:, :cut], Cm[:, :cut], cid[:cut], P, last=torch.tensor([cut - 1]))
        cont = cid[cut:] == cid[cut - 1]
        y2, s2 = ssd_banded(x[:, cut:], dt[:, cut:], A, Bm[:, cut:], Cm[:, cut:], cid[cut:], P, s1, cont, torch.tensor([T - cut - 1]))
        torch.testing.assert_close(y2, y_ref[:, cut:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s2, s_ref, atol=1e-5, rtol=1e-5)


def test_ssm_module_forward_equals_step() -> None:
    torch.manual_seed(3)
    ssm = ChunkSSM(16, 8, 4, 2, 4)
    ssm.reset_parameters()
    P, o, T = 4, 1, 23
    u = torch.randn(2, T, 16)
    with torch.no_grad():
        y, st = ssm(u, torch.arange(T), P, o, None, torch.tensor([T - 1, T - 1]))
        s = ssm.empty_state(2, "cpu", torch.float32)
        ys = []
        for t in range(T):
            yt, s = ssm.step(u[:, t], chunk_start(torch.tensor([t, t]), P, o), s)
            ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.ssm, st.ssm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.conv, st.conv, atol=1e-6, rtol=1e-6)


# ---- cached decoding == full forward ---------------------------------------------------------------
CASES = [(kind, P, L) for kind in ("attamba", "transformer", "sliding") for P in (2, 4, 8, 16) for L in (0, 3, 9)
         if not (kind == "transformer" and L != 3)]
CASES += [("pseudo", 4, 3), ("reduced", 4, 3), ("reduced", 2, 3)]


@pytest.mark.parametrize("kind,P,L", CASES)
def test_prefill_and_steps_equal_forward(kind: str, P: int, L: int) -> None:
    torch.manual_seed(4)
    cfg = tiny(kind, P, L, d_model=16, n_heads=2, ssm_inner=8, ssm_state=4, reduced_head_dim=2)
    model = build_model(cfg, seed=0).eval()
    T = 45
    ids = torch.randint(0, cfg.vocab_size, (3, T))
    prompt = torch.tensor([1, 7, 18])  # unequal prompt lengths, right padded
    with torch.no_grad():
        full = model(ids)
        logits, state = prefill(model, ids[:, : int(prompt.max())], prompt)
        for b in range(3):
            torch.testing.assert_close(logits[b, : prompt[b]], full[b, : prompt[b]], atol=1e-4, rtol=0)
        # each row decodes from its own position: feed the true next tokens (teacher forcing)
        for i in range(T - int(prompt.max())):
            pos = state.pos.clone()
            step_logits, state = decode_step(model, ids[torch.arange(3), pos], state)
            torch.testing.assert_close(step_logits, full[torch.arange(3), pos], atol=1e-4, rtol=0)


# ---- state bytes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["attamba", "transformer", "sliding", "pseudo"])
@pytest.mark.parametrize("n", [1, 5, 17, 40])
def test_state_bytes_equal_held_tensors(kind: str, n: int) -> None:
    cfg = tiny(kind, 4, 3)
    model = build_model(cfg, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, n + 6))
    _, state = prefill(model, ids[:, :n])
    assert state.cache_nbytes() == state_bytes(cfg, n, kv_dtype=torch.float32)
    for t in range(n, n + 6):
        decode_step(model, ids[:, t], state)
        assert state.cache_nbytes() == state_bytes(cfg, t + 1, kv_dtype=torch.float32)


def test_default_sizes_match_design_table() -> None:
    cfg = ModelConfig(vocab_size=32000)
    mib = 2**20
    for n, full, att in [(1024, 16.0, 4.2), (4096, 64.0, 10.2), (16384, 256.0, 34.2)]:
        assert full_kv_bytes(cfg, n) / mib == full
        assert abs(state_bytes(cfg, n) / mib - att) < 0.05
    assert state_bytes(cfg.replace(kind="transformer"), 4096) == full_kv_bytes(cfg, 4096)


# ---- checkpoints ---------------------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path) -> None:
    cfg = tiny("attamba")
    model = build_model(cfg, seed=0).eval()
    sd = model.state_dict()
    assert len({t.data_ptr() for t in sd.values()}) == len(sd)  # no tensor registered twice
    save_checkpoint(model, tmp_path / "ck")
    loaded = load_model(tmp_path / "ck")
    assert loaded.config == cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))


def test_pickles_are_rejected(tmp_path) -> None:
    cfg = tiny("transformer")
    cfg.save(tmp_path)
    torch.save(build_model(cfg).state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "nowhere")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and mamba-ssm")
def test_mamba_cuda_path_matches_pytorch() -> None:
    from models import mamba_cuda

    if not mamba_cuda.available(torch.zeros(1, device="cuda")):
        pytest.skip("mamba-ssm is not installed")
    torch.manual_seed(5)
    ssm = ChunkSSM(64, 64, 16, 4, 4).cuda()
    ssm.reset_parameters()
    u, pos = torch.randn(2, 300, 64, device="cuda"), torch.arange(300, device="cuda")
    with torch.no_grad():
        fast, _ = ssm(u, pos, 8, 3, mamba=True)  # mamba-ssm kernels
        ref, _ = ssm(u, pos, 8, 3)  # our path
    torch.testing.assert_close(fast, ref, atol=2e-3, rtol=2e-3)


def test_mamba_path_is_an_explicit_option() -> None:
    """The mamba-ssm kernels run only when asked for, and asking where they cannot run is an error."""
    model = build_model(tiny("attamba"), seed=0)
    ids = torch.randint(0, 61, (1, 12))
    with pytest.raises(ValueError, match="mamba-ssm"):
        model(ids, mamba=True)
    with pytest.raises(ValueError, match="fresh sequences"):
        model.blocks[0].attn.ssm_k(torch.randn(1, 4, 32), torch.arange(4), 4, 0, None, torch.tensor([3]), mamba=True)
