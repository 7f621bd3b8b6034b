"""The CPU decode step compiled by torch.compile (engine/compiled_decode.py) and the prefill's compiled layers
(engine/compiled_prefill.py) against the eager engine: the same greedy tokens and log-probabilities, padding rows
that store nothing outside the pools' sinks, one graph per batch size. The rest of the suite runs these paths with
torch.compile off (tests/conftest.py)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from engine import LLM, SamplingParams
from engine import saved_graphs
from engine.compiled_decode import CompiledDecode
from engine.compiled_prefill import runs_compiled
from engine.cuda_graphs import sizes_up_to
from models.upcast import GEMV_ROWS
from conftest import ENGINE

PROMPTS = ["the cat sat on the mat and", "a", "in the beginning there was the word and the word was with the cat"]


@pytest.fixture
def compile_on(tmp_path, monkeypatch) -> Iterator[None]:
    """torch.compile on, compiled graphs saved in (and loaded from) a directory of this test's own."""
    monkeypatch.setattr(saved_graphs, "artifact_dir", lambda: tmp_path / "graphs")
    with torch._dynamo.config.patch(disable=False):
        yield


def _generate(llm: LLM, prompts: list[str]) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    return [(list(c.token_ids), list(c.logprobs))
            for out in llm.generate(prompts, params) for c in out.outputs]


def test_the_compiled_step_generates_what_the_eager_step_does(tiny_ckpt, compile_on, tmp_path) -> None:
    # prefill chunks of at most 6 tokens: chunks of several rows and of one, fresh and continuing a sequence
    kw = dict(**ENGINE, block_size=2, max_model_len=64, max_num_seqs=4, enable_prefix_caching=False,
              max_num_batched_tokens=6)
    eager, compiled = LLM(tiny_ckpt, enforce_eager=True, **kw), LLM(tiny_ckpt, **kw)
    step = compiled.engine.runner.graphs
    assert eager.engine.runner.graphs is None and isinstance(step, CompiledDecode)
    assert eager.engine.runner.halves is None and compiled.engine.runner.halves is not None
    assert step.sizes == sizes_up_to(4) == (1, 2, 4) and set(step.compile_s) == {1, 2, 4}
    assert step.loaded == {1: False, 2: False, 4: False}
    r = compiled.engine.runner  # warming every size up ran padding rows only: nothing outside the sinks
    assert not r.k_pool[:, :-1].any() and not r.v_pool[:, :-1].any()
    assert not r.win_k[:, :-1].any() and not r.ssm[:, :, :-1].any() and bool((r.win_pos == -1).all())
    halves = compiled.engine.runner.halves
    assert halves.project.loaded == halves.finish.loaded == {"rows1": False, "rows": False}
    # a second engine loads each decode size's and prefill variant's saved graph instead of tracing it
    assert len(list((tmp_path / "graphs").glob("decode-*.bin"))) == 3
    assert len(list((tmp_path / "graphs").glob("prefill-*.bin"))) == 4
    loaded = LLM(tiny_ckpt, **kw)
    assert loaded.engine.runner.graphs.loaded == {1: True, 2: True, 4: True}
    halves = loaded.engine.runner.halves
    assert halves.project.loaded == halves.finish.loaded == {"rows1": True, "rows": True}
    for prompts in (PROMPTS, PROMPTS[:1]):  # 3 rows padded to 4, then 1
        want = _generate(eager, prompts)
        for llm in (compiled, loaded):
            for (want_ids, want_lp), (got_ids, got_lp) in zip(want, _generate(llm, prompts)):
                assert got_ids == want_ids
                torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(want_lp), atol=1e-4, rtol=1e-4)
    for llm in (compiled, loaded):  # every prefill chunk ran a compiled variant
        halves = llm.engine.runner.halves
        assert halves.project.eager_calls == halves.finish.eager_calls == 0


def test_a_saved_graph_that_does_not_load_is_compiled_again(tiny_ckpt, compile_on, tmp_path) -> None:
    r = LLM(tiny_ckpt, enforce_eager=True, **ENGINE, max_num_seqs=1).engine.runner
    assert CompiledDecode(r.model, r.caches, r._metadata([]), (1,)).loaded == {1: False}
    (saved,) = (tmp_path / "graphs").glob("decode-*.bin")
    assert CompiledDecode(r.model, r.caches, r._metadata([]), (1,)).loaded == {1: True}
    saved.write_bytes(b"cut short")
    assert CompiledDecode(r.model, r.caches, r._metadata([]), (1,)).loaded == {1: False}
    assert CompiledDecode(r.model, r.caches, r._metadata([]), (1,)).loaded == {1: True}  # saved again
    # an engine with pools of another size (their sizes are constants of the graph) keeps a file of its own
    other = LLM(tiny_ckpt, enforce_eager=True, **ENGINE, max_num_seqs=2).engine.runner
    assert other.caches[0].ssm.shape != r.caches[0].ssm.shape
    assert CompiledDecode(other.model, other.caches, other._metadata([]), (1,)).loaded == {1: False}
    assert len(list((tmp_path / "graphs").glob("decode-*.bin"))) == 2
    assert CompiledDecode(r.model, r.caches, r._metadata([]), (1,)).loaded == {1: True}


def test_a_layer_unlike_the_first_is_refused(tiny_ckpt, compile_on) -> None:
    """Each size's graph is checked against every layer once, at start-up (its guards are off after)."""
    r = LLM(tiny_ckpt, enforce_eager=True, **ENGINE, max_num_seqs=1).engine.runner
    norm = r.model.blocks[1].ffn_norm
    norm.weight = torch.nn.Parameter(norm.weight.double())
    with pytest.raises(RuntimeError, match="layer 1 differs from layer 0"):
        CompiledDecode(r.model, r.caches, r._metadata([]), (1,))


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="the kernel needs AVX2")
def test_a_short_chunk_of_a_bf16_model_runs_its_own_variant(tiny_ckpt, compile_on) -> None:
    """A bf16 model's products of up to GEMV_ROWS rows take kernels/cpu_gemv.py's path, so a short one-row prefill
    chunk has a compiled variant of its own (short1); chunks of several rows that short run eagerly."""
    kw = dict(cache_memory=4 << 20, dtype="bfloat16", max_model_len=64, max_num_seqs=1, enable_prefix_caching=False)
    eager, compiled = LLM(tiny_ckpt, enforce_eager=True, **kw), LLM(tiny_ckpt, **kw)
    runner = compiled.engine.runner
    assert runner.matvec_rows == GEMV_ROWS  # upcast_linears loaded the kernel
    assert set(runner.halves.project.loaded) == {"rows1", "short1"}  # one row at most
    assert runs_compiled(1, 2, GEMV_ROWS) and not runs_compiled(2, 16, GEMV_ROWS) and runs_compiled(2, 17, GEMV_ROWS)
    prompt = PROMPTS[2]  # one row of fewer than GEMV_ROWS tokens
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)
    want, got = (llm.generate([prompt], params)[0].outputs[0] for llm in (eager, compiled))
    assert runner.halves.project.eager_calls == runner.halves.finish.eager_calls == 0
    # bf16 (fused in one graph, rounded op by op eagerly): the same top candidates, log-probabilities close
    top_want, top_got = dict(want.top_logprobs[0]), dict(got.top_logprobs[0])
    assert set(top_got) == set(top_want)
    for token, lp in top_want.items():
        assert abs(top_got[token] - lp) < 0.05
