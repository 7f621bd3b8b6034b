"""Scheduler and cache manager as units: admission order, preemption, budgets, no leaks."""
from __future__ import annotations

import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.cache_layout import CacheLayout
from engine.cache_manager import CacheManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SeqStatus
from models import ModelConfig

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, chunk_size=4, window=3, ssm_state=8,
                  ssm_inner=16, ssm_heads=2)


def make_cache(num_blocks: int, num_slots: int, block_size: int = 2, kind: str = "attamba") -> CacheManager:
    cfg = dataclasses.replace(CFG, kind=kind)
    return CacheManager(CacheLayout.for_model(cfg, block_size, torch.float32), num_blocks, num_slots)


def seq(n_prompt: int, name: str = "r") -> Sequence:
    return Sequence(name, 0, list(range(n_prompt)), SamplingParams(), 100, decoder=None)


def sample(s: Sequence, token: int = 1) -> None:
    """What the engine does after the scheduler advanced a sequence to its end: a token is sampled."""
    s.output_ids.append(token)


def test_fcfs_admission_and_token_budget() -> None:
    sched = Scheduler(make_cache(64, 8), max_num_seqs=8, max_num_batched_tokens=10)
    a, b, c = seq(6, "a"), seq(6, "b"), seq(3, "c")
    for s in (a, b, c):
        sched.add(s)
    batch = sched.schedule()
    assert [(s.request_id, n) for s, n in batch.work] == [("a", 6), ("b", 4)]  # b's prefill is chunked
    assert batch.num_tokens == 10 and list(sched.waiting) == [c]  # c waits: nobody overtakes, budget spent
    sched.advance(batch)
    assert (a.num_computed, b.num_computed) == (6, 4)
    sample(a)
    batch = sched.schedule()  # running first, oldest first: a decodes, b finishes its prompt, then c
    assert [(s.request_id, n) for s, n in batch.work] == [("a", 1), ("b", 2), ("c", 3)]


def test_preemption_takes_the_newest_and_recomputes() -> None:
    cache = make_cache(num_blocks=4, num_slots=4)  # 2 entries per block
    sched = Scheduler(cache, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = seq(4, "a"), seq(4, "b")
    sched.add(a), sched.add(b)
    sched.advance(sched.schedule())
    for s in (a, b):
        sample(s)
    used = len(cache.pool.free)
    # grow a until the pool runs out: b (the newest) is preempted, queued first, and recomputes later
    while b.status is SeqStatus.RUNNING:
        batch = sched.schedule()
        sched.advance(batch)
        sample(a)
    assert sched.num_preemptions == 1 and b.num_computed == 0 and b.block_table == [] and b.slot == -1
    assert sched.waiting[0] is b and len(cache.pool.free) <= used
    sched.finish(a, "stop")
    batch = sched.schedule()
    assert [(s.request_id, n) for s, n in batch.work] == [("b", b.num_tokens)]  # prompt + output again


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["alloc", "grow", "free"]), st.integers(0, 7), st.integers(1, 30)),
                    max_size=40))
def test_cache_manager_never_leaks_or_double_allocates(ops) -> None:
    cache = make_cache(num_blocks=12, num_slots=3)
    seqs = [seq(1, f"s{i}") for i in range(8)]
    held: dict[int, int] = {}  # seq index -> tokens it holds
    for op, i, n in ops:
        s = seqs[i]
        if op == "free":
            cache.free(s)
            held.pop(i, None)
        else:
            want = n if op == "alloc" else held.get(i, 0) + n
            if cache.can_allocate(s, want):
                cache.allocate(s, want)
                held[i] = max(held.get(i, 0), want)
        blocks = [b for t in seqs for b in t.block_table]
        slots = [t.slot for t in seqs if t.slot >= 0]
        assert len(blocks) == len(set(blocks)) and len(slots) == len(set(slots))  # nothing handed out twice
        assert sorted(blocks + cache.pool.free) == list(range(12))  # nothing lost
        assert sorted(slots + cache.free_slots) == list(range(3))
        for j, t in held.items():
            assert len(seqs[j].block_table) == cache.layout.blocks(t)
    for s in seqs:
        cache.free(s)
    assert cache.all_free() and cache.used_bytes() == 0


def test_a_prompt_is_admitted_only_when_all_of_it_fits() -> None:
    cache = make_cache(num_blocks=6, num_slots=4, kind="transformer")  # 12 tokens
    sched = Scheduler(cache, max_num_seqs=4, max_num_batched_tokens=10)
    a, b = seq(8, "a"), seq(8, "b")
    sched.add(a), sched.add(b)
    batch = sched.schedule()
    # b's first 2 tokens would fit beside a, its 8 would not: it waits instead of being admitted and evicted later
    assert [(s.request_id, n) for s, n in batch.work] == [("a", 8)] and list(sched.waiting) == [b]
    sched.advance(batch)
    for _ in range(3):  # a grows to 11 tokens, 6 blocks: all the cache
        sample(a)
        sched.advance(sched.schedule())
        assert list(sched.waiting) == [b]
    sched.finish(a, "length")
    assert [(s.request_id, n) for s, n in sched.schedule().work] == [("b", 8)]
    assert sched.num_preemptions == 0


def test_no_admission_in_a_step_that_preempted() -> None:
    cache = make_cache(num_blocks=4, num_slots=4, kind="transformer")  # 8 tokens
    sched = Scheduler(cache, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = seq(4, "a"), seq(2, "b")
    sched.add(a), sched.add(b)
    sched.advance(sched.schedule())  # a: 2 blocks, b: 1 block
    sample(a), sample(b)
    sched.advance(sched.schedule())  # a 5 tokens (3 blocks), b 3 tokens (2 blocks): the cache is full
    sample(a), sample(b)
    batch = sched.schedule()  # a needs a 4th block: b is preempted, and not re-admitted in the same step
    assert sched.num_preemptions == 1 and [s.request_id for s, _ in batch.work] == ["a"]
    assert list(sched.waiting) == [b]
