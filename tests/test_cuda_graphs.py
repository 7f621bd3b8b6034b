"""The CUDA-graph bookkeeping of engine/cuda_graphs.py on CPU: capture sizes, padding rows, widened block
tables and the eager fallback, with the capture replaced by the PyTorch step on the same static buffers."""
from __future__ import annotations

import pytest
import torch

from engine import EngineArgs, LLMEngine, SamplingParams, model_runner
from engine.cuda_graphs import DecodeGraphs, padded_size
from models.paged import pad_decode_metadata
from conftest import ENGINE


class EagerGraphs(DecodeGraphs):
    """DecodeGraphs whose "graph" runs the decode step eagerly on its static inputs and output:
    everything but torch.cuda.CUDAGraph. Records the batch size of every replay."""

    def __init__(self, *args, **kwargs) -> None:
        self.replays: list[int] = []
        super().__init__(*args, **kwargs)

    def _capture(self, tokens, meta):
        out = self.model.decode(tokens, meta, self.caches)

        def replay() -> None:
            self.replays.append(len(tokens))
            out.copy_(self.model.decode(tokens, meta, self.caches))

        return replay, out


@pytest.fixture
def eager_graphs(monkeypatch) -> None:
    """ModelRunner.capture_graphs builds EagerGraphs, as it builds DecodeGraphs on CUDA with triton."""
    monkeypatch.setattr(model_runner, "DecodeGraphs", EagerGraphs)
    monkeypatch.setattr(model_runner, "use_triton", lambda t: True)


def cache_tensors(engine: LLMEngine) -> list[torch.Tensor]:
    """Every tensor a decode step writes: the runner's pools and state slots."""
    r = engine.runner
    return [r.k_pool, r.v_pool, r.win_k, r.win_v, r.ssm, r.conv]


def snapshot(engine: LLMEngine) -> list[torch.Tensor]:
    return [t.clone() for t in cache_tensors(engine)]


@pytest.mark.parametrize("max_batch,sizes,replays", [
    (4, (1, 2, 4), [4, 4, 2, 1, 1, 1]),  # decode batches of 3 rows (padded to 4), then 2, then 1
    (2, (1, 2), [2, 1, 1, 1]),  # 3 rows, above the largest size, run eagerly
])
def test_graph_replays_equal_the_eager_decode(tiny_ckpt, eager_graphs, max_batch: int, sizes: tuple,
                                              replays: list) -> None:
    args = EngineArgs(model=str(tiny_ckpt), **ENGINE, block_size=2, max_model_len=40, enable_prefix_caching=False)
    eager, graphed = LLMEngine(args), LLMEngine(args)
    before = snapshot(graphed)
    assert graphed.runner.capture_graphs(graphed.max_model_len, max_batch)
    graphs = graphed.runner.graphs
    assert graphs.sizes == sizes and graphs.max_blocks == graphed.cache.layout.blocks(40)
    for a, b in zip(before, cache_tensors(graphed)):  # capturing (all padding rows) stores nothing
        assert torch.equal(a, b)
    outs = []
    for engine in (eager, graphed):
        seqs = [seq for i, (n, max_tokens) in enumerate([(9, 3), (2, 4), (17, 7)])
                for seq in engine.add_request(f"r{i}", list(range(3, 3 + n)),
                                              SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))]
        while engine.has_unfinished():
            engine.step()
        outs.append(([s.output_ids for s in seqs], snapshot(engine)))
    assert graphs.replays == replays
    assert outs[0][0] == outs[1][0]
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b)


def test_block_tables_wider_than_captured_run_eagerly(tiny_ckpt, eager_graphs) -> None:
    engine = LLMEngine(EngineArgs(model=str(tiny_ckpt), **ENGINE, block_size=2, max_model_len=40))
    engine.runner.capture_graphs(engine.max_model_len, 2)
    graphs = engine.runner.graphs
    engine.add_request("r", list(range(3, 12)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    engine.step()
    (seq,) = engine.requests["r"]
    engine.cache.allocate(seq, seq.num_computed + 1)
    meta = engine.runner._metadata([seq])
    wide = pad_decode_metadata(meta, 1, graphs.max_blocks + 1)
    tokens = torch.tensor([seq.last_token])
    before = snapshot(engine)
    assert padded_size(1, graphs.sizes) == 1 and padded_size(3, graphs.sizes) is None
    got = graphs(tokens, wide)
    assert graphs.replays == []
    after = snapshot(engine)
    for t, saved in zip(cache_tensors(engine), before):
        t.copy_(saved)  # the same step again, now replayed
    torch.testing.assert_close(graphs(tokens, meta), got)
    assert graphs.replays == [1]
    for a, b in zip(after, cache_tensors(engine)):
        torch.testing.assert_close(a, b)
