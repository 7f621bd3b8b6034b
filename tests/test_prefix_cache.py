"""Prefix caching: shared blocks and state snapshots give the same tokens as computing everything."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import LLM, EngineArgs, LLMEngine, SamplingParams
from engine.block_pool import BlockPool
from engine.cache_layout import CacheLayout
from engine.prefix_index import PrefixIndex
from models import ModelConfig
from conftest import ENGINE

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(4, 290, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(path, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    llm = LLM(str(path), **ENGINE, block_size=2, max_num_batched_tokens=16, enable_prefix_caching=False)
    return [o.token_ids for o in llm.generate(prompts, params)]


def assert_released(engine: LLMEngine) -> None:
    """Nothing held once every request ended; after a reset nothing is cached either."""
    cache = engine.cache
    assert cache.all_free() and engine.stats().cache_bytes_used == 0 and not any(cache.pool.ref)
    cache.pool.reset()
    assert engine.stats().prefix_cache_bytes == 0 and len(cache.pool.free) == cache.num_blocks


@pytest.mark.parametrize("chunk_size,n_layers,block_size", [(4, 2, 2), (8, 8, 16), (8, 3, 1), (3, 8, 4), (1, 2, 2)])
def test_block_end_is_where_every_layer_has_the_whole_block(chunk_size: int, n_layers: int, block_size: int) -> None:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=n_layers, n_heads=4, chunk_size=chunk_size, window=3,
                      ssm_state=8, ssm_inner=16, ssm_heads=2)
    layout = CacheLayout.for_model(cfg, block_size, torch.float32)
    for i in range(12):
        end, need = layout.block_end(i), (i + 1) * block_size
        counts = [int(layer.num_entries(end)) for layer in layout.spec.layers]
        assert counts == [need] * n_layers  # resuming at end writes nothing into shared blocks
        assert min(int(layer.num_entries(end - 1)) for layer in layout.spec.layers) < need
        assert layout.end_index(end) == i


@pytest.mark.parametrize("kind", ["attamba", "transformer", "pseudo"])
def test_shared_prefixes_at_every_offset_give_the_same_tokens(ckpt_factory, kind: str) -> None:
    """Prefixes of a cached prompt ending at every offset inside a chunk and a block (P = 4, 2
    entries per block: a block spans 8 tokens), resumed from blocks and snapshots."""
    path = ckpt_factory(kind)
    base = tokens(40, 0)
    prompts = [base[:cut] + tokens(5, cut) for cut in range(22, 40)]
    llm = LLM(str(path), **ENGINE, block_size=2, max_num_batched_tokens=16, prefix_snapshot_interval=2)
    llm.generate([base], GREEDY)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == reference(path, prompts)
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits > 0.5 * sum(len(p) for p in prompts)
    assert stats.prefix_cache_queries == 40 + sum(len(p) for p in prompts)
    assert_released(llm.engine)


@pytest.mark.parametrize("kind", ["attamba", "transformer"])
def test_preemption_resumes_from_the_cache(ckpt_factory, kind: str) -> None:
    path = ckpt_factory(kind)
    system = tokens(30, 1)
    prompts = [system + tokens(3 + i, 10 + i) for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)  # decodes outgrow the cache
    layout = CacheLayout.for_model(LLM(str(path), **ENGINE).engine.config, 2, torch.float32)
    budget = 3 * layout.slot_bytes + layout.block_bytes * (layout.blocks(68) + layout.snapshot_blocks + 2)
    llm = LLM(str(path), block_size=2, max_num_batched_tokens=16, cache_memory=budget, dtype="float32", max_num_seqs=3,
              prefix_snapshot_interval=2)
    assert [o.token_ids for o in llm.generate(prompts, params)] == reference(path, prompts, params)
    engine = llm.engine
    assert engine.scheduler.num_preemptions > 0 and engine.stats().prefix_cache_hits > 0
    assert_released(engine)


def test_n_choices_share_the_prompt(tiny_ckpt) -> None:
    prompt = tokens(37, 3)
    llm = LLM(str(tiny_ckpt), **ENGINE, block_size=2, max_num_batched_tokens=16)
    out = llm.generate([prompt], SamplingParams(n=3, temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    ref = reference(tiny_ckpt, [prompt], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    assert [o.token_ids for o in out.outputs] == [ref] * 3
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits >= 2 * 24  # the two later choices resume after the prompt's full blocks
    assert_released(llm.engine)


def test_different_chunk_sizes_never_share() -> None:
    a, b = (CacheLayout.for_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, chunk_size=p), 2,
                                  torch.float32) for p in (4, 2))
    assert PrefixIndex(a, BlockPool(0), 8).seed != PrefixIndex(b, BlockPool(0), 8).seed  # the seed of every hash chain covers P


def test_snapshots_round_trip_through_blocks(tiny_ckpt) -> None:
    engine = LLMEngine(EngineArgs(model=str(tiny_ckpt), **ENGINE, block_size=2))
    runner, layout = engine.runner, engine.cache.layout
    for part in runner._slot_state(0):
        part.copy_(torch.randn(part.shape).to(part.dtype) if part.is_floating_point() else torch.arange(part.numel()).view(part.shape))
    blocks = list(range(3, 3 + layout.snapshot_blocks))
    runner.save_snapshots([(0, blocks)])
    runner.load_snapshots([(1, blocks)])
    assert all(torch.equal(a, b) for a, b in zip(runner._slot_state(0), runner._slot_state(1)))


_REFS: dict[tuple[int, ...], list[int]] = {}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "add", "step", "abort"]), st.integers(0, 30), st.integers(0, 3)),
                    min_size=1, max_size=20))
def test_eviction_under_a_small_budget_never_corrupts_a_sequence(tiny_ckpt, ops) -> None:
    """Random adds (prompts sharing prefixes), steps and aborts under a budget that forces eviction
    and preemption: every completed sequence equals its reference, and nothing leaks."""
    base = tokens(40, 7)
    layout = CacheLayout.for_model(LLM(str(tiny_ckpt), **ENGINE).engine.config, 2, torch.float32)
    budget = 3 * layout.slot_bytes + layout.block_bytes * (layout.blocks(48) + 3 * layout.snapshot_blocks)
    engine = LLMEngine(EngineArgs(model=str(tiny_ckpt), block_size=2, max_num_batched_tokens=12, max_num_seqs=3,
                                  cache_memory=budget, dtype="float32", max_waiting=100, prefix_snapshot_interval=1))
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    prompts: dict[str, list[int]] = {}
    live: list[str] = []
    outputs: dict[str, list[int]] = {}

    def collect(deltas) -> None:
        for d in deltas:
            outputs.setdefault(d.request_id, []).extend(d.token_ids)
            if d.finish_reason == "abort":
                prompts.pop(d.request_id, None)

    for i, (op, cut, suffix) in enumerate(ops):
        if op == "add":
            rid = f"r{i}"
            prompts[rid] = base[: 8 + cut] + tokens(suffix, i)
            engine.add_request(rid, prompts[rid], params)
            live.append(rid)
        elif op == "step":
            collect(engine.step())
        elif live:
            collect(engine.abort_request(live.pop(cut % len(live))))
    for _ in range(500):
        if not engine.has_unfinished():
            break
        collect(engine.step())
    assert not engine.has_unfinished()
    missing = [p for p in prompts.values() if tuple(p) not in _REFS]
    for p, ref in zip(missing, reference(tiny_ckpt, missing, params)):
        _REFS[tuple(p)] = ref
    for rid, p in prompts.items():
        assert outputs[rid] == _REFS[tuple(p)], rid
    assert_released(engine)
