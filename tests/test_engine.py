"""The engine end to end: batched cached generation == argmax of the full forward pass."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import LLM, ContextLengthExceeded, EngineArgs, LLMEngine, QueueFull, SamplingParams
from engine.cache_layout import CacheLayout
from models import load_model, state_bytes
from conftest import ENGINE


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Repeated argmax of the full forward pass (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def prompts_of(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("prefix_caching", [False, True])
@pytest.mark.parametrize("kind", ["attamba", "transformer", "sliding", "pseudo"])
def test_greedy_generation_equals_full_forward(ckpt_factory, kind: str, prefix_caching: bool) -> None:
    path = ckpt_factory(kind)
    model = load_model(path)
    prompts = prompts_of([1, 3, 9, 31, 70], model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    # small chunks, small budget: chunked prefill mixed with decodes, and preemption when the running
    # sequences outgrow the cache (prompts are admitted only whole, so the decodes must force it)
    layout = CacheLayout.for_model(model.config, 4, torch.float32)
    budget = 4 * layout.slot_bytes + layout.block_bytes * (layout.blocks(94) + 1)  # one long sequence and a bit
    llm = LLM(str(path), max_num_batched_tokens=16, block_size=4, cache_memory=budget, dtype="float32", max_num_seqs=4,
              enable_prefix_caching=prefix_caching)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == greedy_reference(model, prompt, 24)
        assert out.finish_reason == "length"
    if kind != "sliding" and not prefix_caching:  # a sliding window needs no blocks, so it never runs out
        assert llm.engine.scheduler.num_preemptions > 0  # the budget really forced recomputation
    assert llm.engine.cache.all_free()


def test_chunk_size_override_matches_reference(tiny_ckpt) -> None:
    model = load_model(tiny_ckpt, chunk_size=2)
    prompts = prompts_of([5, 17], model.config.vocab_size, seed=1)
    llm = LLM(str(tiny_ckpt), **ENGINE, chunk_size=2, max_num_batched_tokens=8)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [o.token_ids for o in outs] == [greedy_reference(model, p, 6) for p in prompts]


def test_cache_accounting_matches_state_bytes(tiny_ckpt) -> None:
    engine = LLMEngine(EngineArgs(model=str(tiny_ckpt), **ENGINE, block_size=1, enable_prefix_caching=False))
    engine.add_request("a", list(range(5, 45)), SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()  # prefill of 40 tokens -> the first token is sampled, 40 computed
    stats = engine.stats()
    assert stats.cache_bytes_used == state_bytes(engine.config, 40, torch.float32)
    assert stats.cache_bytes_full_kv_equivalent > stats.cache_bytes_used


def test_sampling_is_seeded_and_top_k1_is_greedy(tiny_ckpt) -> None:
    llm = LLM(str(tiny_ckpt), **ENGINE)
    prompt = "The history of"
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    topk1 = llm.generate([prompt], SamplingParams(temperature=1.0, top_k=1, max_tokens=10, ignore_eos=True))[0]
    assert topk1.token_ids == greedy.token_ids
    p = SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    a = llm.generate([prompt, "other prompt"], p)[0]
    b = llm.generate(["x", prompt], p)[1]
    assert a.token_ids == b.token_ids
    n3 = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True))[0]
    assert len(n3.outputs) == 3 and len({tuple(o.token_ids) for o in n3.outputs}) > 1


def test_stop_strings_and_logprobs(tiny_ckpt) -> None:
    llm = LLM(str(tiny_ckpt), **ENGINE)
    base = llm.generate(["In 1914"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    stop = base.text[5:8]
    assert stop and stop not in base.text[:5]
    cut = llm.generate(["In 1914"], SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True))[0]
    assert cut.finish_reason == "stop" and cut.text == base.text[: base.text.index(stop)]
    lp = llm.generate(["In 1914"], SamplingParams(temperature=0, max_tokens=4, logprobs=2, ignore_eos=True))[0]
    assert len(lp.outputs[0].logprobs) == 4 and all(v <= 0 for v in lp.outputs[0].logprobs)
    assert all(len(t) == 2 for t in lp.outputs[0].top_logprobs)
    stop_tok = llm.generate(["In 1914"], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[base.token_ids[3]]))[0]
    assert stop_tok.token_ids == base.token_ids[:4] and stop_tok.finish_reason == "stop"


def test_bad_requests_are_rejected_before_queuing(tiny_ckpt) -> None:
    engine = LLMEngine(EngineArgs(model=str(tiny_ckpt), **ENGINE, max_model_len=64, max_waiting=2))
    with pytest.raises(ContextLengthExceeded):
        engine.add_request("a", list(range(10, 60)), SamplingParams(max_tokens=20))
    with pytest.raises(ValueError):
        engine.add_request("b", [], SamplingParams())
    with pytest.raises(ValueError):
        engine.add_request("c", [10**6], SamplingParams())
    with pytest.raises(ValueError, match="never be admitted"):  # more than the queue can ever hold
        engine.add_request("e", "hello", SamplingParams(n=3))
    engine.add_request("d", "hello", SamplingParams(n=2))
    assert len(engine.scheduler.waiting) == 2


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "step", "abort"]), st.integers(1, 40), st.integers(1, 8)),
                    min_size=1, max_size=25))
def test_random_add_step_abort_frees_everything(tiny_ckpt, ops) -> None:
    engine = LLMEngine(EngineArgs(model=str(tiny_ckpt), block_size=2, max_num_batched_tokens=12, max_num_seqs=3,
                                  cache_memory=60_000, dtype="float32", max_waiting=100))
    live: list[str] = []
    for i, (op, length, max_tokens) in enumerate(ops):
        if op == "add":
            rid = f"r{i}"
            engine.add_request(rid, list(range(4, 4 + length)), SamplingParams(max_tokens=max_tokens, n=1 + length % 2))
            live.append(rid)
        elif op == "step":
            engine.step()
        elif live:
            engine.abort_request(live.pop(length % len(live)))
    for _ in range(400):
        if not engine.has_unfinished():
            break
        engine.step()
    assert not engine.has_unfinished()
    assert engine.cache.all_free() and engine.stats().cache_bytes_used == 0


def test_async_engine_streams_and_aborts(tiny_ckpt) -> None:
    import asyncio

    from engine import AsyncEngine

    eng = AsyncEngine(EngineArgs(model=str(tiny_ckpt), **ENGINE))
    eng.start()
    try:
        async def collect(rid: str, params: SamplingParams) -> list:
            return [d async for d in eng.generate(rid, eng.gate.prepare("The history of", params))]

        async def abort_early() -> None:
            stream = eng.generate("b", eng.gate.prepare("In 1914", SamplingParams(max_tokens=500, ignore_eos=True)))
            async for _ in stream:
                break
            await stream.aclose()

        async def main() -> None:
            deltas = await collect("a", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
            assert deltas[-1].finish_reason == "length" and sum(len(d.token_ids) for d in deltas) == 8
            await abort_early()
            for _ in range(100):
                stats = eng.stats()
                if stats.num_running + stats.num_waiting == 0 and stats.cache_bytes_used == 0:
                    break
                await asyncio.sleep(0.01)
            assert eng.stats().cache_bytes_used == 0
            full = eng.gate.prepare("x", SamplingParams(n=eng.gate.max_waiting))
            one = eng.gate.prepare("x", SamplingParams())
            for stream in eng.submit({"d": full, "e": one}):  # admitted together: one more than the queue holds
                with pytest.raises(QueueFull):
                    await anext(stream)
                await stream.aclose()
            assert not {"d", "e"} & set(eng.engine.requests)  # all or none

        asyncio.run(main())
        greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        llm_text = LLM(str(tiny_ckpt), **ENGINE).generate("The history of", greedy)[0].text
        deltas = asyncio.run(collect("c", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)))
        assert "".join(d.text for d in deltas) == llm_text
    finally:
        eng.shutdown()
    assert not eng.is_alive


def test_max_model_len_is_fitted_to_the_cache_at_start_up(tiny_ckpt) -> None:
    """As vLLM: an explicit --max-model-len the cache cannot hold is refused at start-up; the default
    is reduced to what one sequence can hold, so every request within it fits the cache."""
    small = dict(model=str(tiny_ckpt), block_size=1, cache_memory=200_000, dtype="float32")
    with pytest.raises(ValueError, match=r"--max-model-len 4096 does not fit the cache: at most \d+ tokens"):
        LLMEngine(EngineArgs(max_model_len=4096, **small))
    engine = LLMEngine(EngineArgs(**small))
    assert engine.max_model_len < 8 * engine.config.max_seq_len
    assert engine.cache.fits_alone(engine.max_model_len) and not engine.cache.fits_alone(engine.max_model_len + 1)
    engine.add_request("a", "hello", SamplingParams(max_tokens=None))
    with pytest.raises(ContextLengthExceeded):
        engine.add_request("b", [5] * engine.max_model_len, SamplingParams(max_tokens=1))
    assert LLMEngine(EngineArgs(max_model_len=engine.max_model_len, **small)).max_model_len == engine.max_model_len


def test_prefill_chunks_of_several_sequences_run_in_one_forward(tiny_ckpt, monkeypatch) -> None:
    engine = LLMEngine(EngineArgs(model=str(tiny_ckpt), **ENGINE, max_num_batched_tokens=20, block_size=2,
                                  enable_prefix_caching=False))  # no chunk ends at a snapshot point
    calls = []
    extend = engine.model.extend
    monkeypatch.setattr(engine.model, "extend", lambda ids, start, *a, **k: calls.append(ids.shape) or extend(ids, start, *a, **k))
    for i, n in enumerate((9, 4, 13)):
        engine.add_request(f"r{i}", list(range(5, 5 + n)), SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()  # 9 + 4 + the first 7 of 13: one forward of 3 right-padded rows
    assert calls == [(3, 9)]
    engine.step()  # two decodes and the last 6 prompt tokens, a continuing chunk
    assert calls[1:] == [(1, 6)]
