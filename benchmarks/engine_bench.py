"""`attamba bench engine`: Attamba against the full-KV transformer inside this engine, and against
Hugging Face transformers' decoding of a Llama with the same dims.

- capacity: how many sequences of a given context the allocator admits in a fixed budget;
- decode throughput at batch 1/8/32 and 1k/4k context. Contexts are filled synthetically
  (blocks allocated, cache contents left zero): a decode step costs the same whatever the
  cached values, and this keeps the benchmark from spending minutes in prefill;
- cache bytes per sequence against context length.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from engine import EngineArgs, LLMEngine, SamplingParams
from engine.cache_layout import CacheLayout
from engine.cache_manager import CacheManager
from engine.sequence import Sequence, SeqStatus
from engine.config import DTYPES
from models import ModelConfig, build_model, save_checkpoint
from models.kv_spec import CacheSpec
from models.tokenizer import Tokenizer, train_tokenizer

from .model_bench import paper_config


def capacity(kind: str, contexts: list[int], budget: int, dtype: torch.dtype, block_size: int = 16) -> dict[int, int]:
    """Sequences of each context length the cache manager admits within `budget` bytes."""
    layout = CacheLayout.for_model(paper_config(kind), block_size, dtype)
    result = {}
    for n in contexts:
        per_seq = layout.slot_bytes + layout.blocks(n) * layout.block_bytes
        cache = CacheManager.from_budget(layout, budget, max_num_seqs=max(1, budget // per_seq))
        count = 0
        while True:
            seq = Sequence("cap", 0, [0], SamplingParams(), 1, decoder=None)
            if not cache.can_allocate(seq, n):
                break
            cache.allocate(seq, n)
            count += 1
        result[n] = count
    return result


def _checkpoint(root: Path, kind: str) -> Path:
    """A random-weight checkpoint with the paper's dims and a throwaway tokenizer."""
    tok = root / "tokenizer.json"
    if not tok.exists():
        Tokenizer(train_tokenizer(" ".join(f"word{i % 997}" for i in range(5000)), vocab_size=512)).save(tok)
    path = root / kind
    save_checkpoint(build_model(paper_config(kind), seed=0), path, tok)
    return path


def _fill(engine: LLMEngine, batch: int, ctx: int, steps: int) -> None:
    """Put `batch` running sequences with `ctx` cached tokens into the engine, ready to decode. They decode
    greedily, as the references do (transformers takes the argmax; llama-bench samples nothing)."""
    spec = engine.runner.spec
    W = spec.window_slots
    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
    for i in range(batch):
        seq = Sequence(f"fill{i}", 0, [5] * ctx, params, steps + 2,
                       engine.tokenizer.incremental_decoder())
        engine.cache.allocate(seq, ctx + steps + 1)
        seq.num_computed = ctx
        seq.output_ids = [7]
        seq.status = SeqStatus.RUNNING
        engine.scheduler.running.append(seq)
        engine.requests[seq.request_id] = [seq]
        if W:
            pos = torch.arange(ctx - W, ctx, device=engine.device)
            engine.runner.win_pos[seq.slot, spec.ring_slot(pos)] = pos


def sized_engine(path: Path, batch: int, tokens: int, dtype: str, threads: int | None = None,
                 device: str = "cpu", quantization: str | None = None, enforce_eager: bool = False) -> LLMEngine:
    """An engine whose cache holds exactly `batch` sequences of `tokens` tokens (plus a block each),
    prefix caching off (the decode benchmarks fill contexts synthetically)."""
    args = EngineArgs(dtype=dtype)
    layout = CacheLayout.for_model(ModelConfig.load(path), args.block_size, args.torch_dtype)
    per_seq = layout.slot_bytes + (layout.blocks(tokens) + 1) * layout.block_bytes
    return LLMEngine(EngineArgs(model=str(path), max_num_seqs=batch,
                                max_num_batched_tokens=max(args.max_num_batched_tokens, batch),
                                cache_memory=batch * per_seq, max_model_len=tokens + 8, dtype=dtype,
                                threads=threads or torch.get_num_threads(), device=device, quantization=quantization,
                                enable_prefix_caching=False, enforce_eager=enforce_eager))  # _fill places sequences by hand


def filled_engine(path: Path, batch: int, ctx: int, steps: int, dtype: str, device: str = "cpu",
                  quantization: str | None = None, enforce_eager: bool = False) -> LLMEngine:
    """An engine holding `batch` running sequences of `ctx` cached tokens, warmed up by one step."""
    engine = sized_engine(path, batch, ctx + steps + 1, dtype, device=device, quantization=quantization,
                          enforce_eager=enforce_eager)
    _fill(engine, batch, ctx, steps)
    engine.step()
    return engine


def timed_decode(engine: LLMEngine, steps: int) -> float:
    """Decode tokens/s (the whole batch) of a filled engine over `steps` steps."""
    batch = len(engine.scheduler.running)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return batch * steps / (time.perf_counter() - t0)


def engine_decode(path: Path, batch: int, ctx: int, steps: int, dtype: str) -> float:
    """Decode tokens/s of this engine at a batch and context."""
    return timed_decode(filled_engine(path, batch, ctx, steps, dtype), steps)


def decode_step_ops(path: Path, ctx: int = 1024, enforce_eager: bool = True) -> dict:
    """aten ops one batch-1 decode step dispatches (torch.profiler): every aten event, and the
    top-level ones (those Python called, not the ops they decompose into); the compiled step
    (enforce_eager False) dispatches only what Inductor did not fuse into its own code."""
    from torch.profiler import ProfilerActivity, profile

    engine = filled_engine(path, 1, ctx, 4, "float32", enforce_eager=enforce_eager)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.step()
    ops = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return {"aten_ops": len(ops), "top_level_aten_ops": len(top)}


@torch.no_grad()
def hf_decode(batch: int, ctx: int, steps: int) -> float | None:
    """Decode tokens/s of Hugging Face transformers' Llama (same dims, default dynamic cache, fp32)."""
    try:
        from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    c = paper_config("transformer")
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
                      num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads,
                      max_position_embeddings=ctx + steps + 8)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    cache = DynamicCache(config=cfg)
    for layer in range(c.n_layers):
        kv = torch.randn(batch, c.n_heads, ctx, c.head_dim)
        cache.update(kv, kv.clone(), layer)
    ids = torch.randint(0, c.vocab_size, (batch, 1))
    t0 = None
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()  # the first step is a warm-up
        out = model(input_ids=ids, past_key_values=cache, use_cache=True,
                    position_ids=torch.full((batch, 1), ctx + i))
        ids = out.logits[:, -1].argmax(-1, keepdim=True)
    return batch * steps / (time.perf_counter() - t0)


def llamacpp_row(root: Path, ctx: int, steps: int, threads: int) -> float | None:
    """Batch-1 decode tokens/s of llama.cpp (llama-cpp-python, f16 GGUF) on a Llama of the same dims."""
    try:
        from models.gguf import write_gguf

        from .llamacpp import llamacpp_decode
    except ImportError:
        return None
    gguf = root / "llama-f16.gguf"
    if not gguf.exists():
        write_gguf(paper_config("transformer"), gguf, dtype="f16")
    return llamacpp_decode(gguf, ctx, steps, threads)["decode_tokens_per_s"]


def bench_engine(batches: list[int], contexts: list[int], capacity_contexts: list[int], budget: int, steps: int,
                 dtypes: list[str], threads: list[int], hf: bool = True, llamacpp: bool = False) -> dict:
    """Capacity, cache bytes, aten ops per step, and decode tok/s of both kinds (each dtype) at
    each thread count, next to HF transformers (and llama.cpp at batch 1) in the same run."""
    fp = DTYPES[dtypes[0]]
    result: dict = {"benchmark": "engine", "dims": paper_config("attamba").to_dict(), "dtypes": dtypes,
                    "threads": threads, "budget_bytes": budget, "steps": steps, "machine": machine()}
    caps = {kind: capacity(kind, capacity_contexts, budget, fp) for kind in ("attamba", "transformer")}
    result["capacity"] = {str(n): {k: caps[k][n] for k in caps} | {
        "ratio": round(caps["attamba"][n] / max(1, caps["transformer"][n]), 2)} for n in capacity_contexts}
    lengths = [256, 512, 1024, 2048, 4096, 8192, 16384]
    spec = CacheSpec.from_config(paper_config("attamba"))
    result["cache_bytes_per_sequence"] = [{"context": n, "attamba": spec.seq_bytes(n, fp),
                                           "transformer": spec.full_kv_bytes(n, fp)} for n in lengths]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {kind: _checkpoint(Path(tmp), kind) for kind in ("attamba", "transformer")}
        result["decode_step_ops_1x1k"] = {kind: decode_step_ops(path) for kind, path in paths.items()}
        print(result["decode_step_ops_1x1k"], flush=True)
        for t in threads:
            torch.set_num_threads(t)
            for ctx in contexts:
                for b in batches:
                    row = {"threads": t, "context": ctx, "batch": b}
                    for kind, path in paths.items():
                        for dtype in dtypes:
                            row[f"{kind}_{dtype}"] = round(engine_decode(path, b, ctx, steps, dtype), 1)
                    if hf:
                        tps = hf_decode(b, ctx, steps)
                        row["hf_transformers"] = None if tps is None else round(tps, 1)
                    if llamacpp and b == 1:
                        tps = llamacpp_row(Path(tmp), ctx, 4 * steps, t)
                        row["llamacpp_f16"] = None if tps is None else round(tps, 1)
                    best = max(row[f"attamba_{d}"] for d in dtypes)
                    row["attamba_best_vs_transformer"] = round(best / max(row[f"transformer_{d}"] for d in dtypes), 2)
                    if row.get("hf_transformers"):
                        row["attamba_best_vs_hf"] = round(best / row["hf_transformers"], 2)
                    if row.get("llamacpp_f16"):
                        row["attamba_best_vs_llamacpp"] = round(best / row["llamacpp_f16"], 2)
                    rows.append(row)
                    print(row, flush=True)
    result["decode_tokens_per_s"] = rows
    return result


def machine() -> dict:
    """What the numbers were measured on."""
    import os
    import platform

    return {"cpu": platform.processor() or platform.machine(), "cores_usable": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "python": platform.python_version()}


def plot_engine(result: dict, path: Path) -> None:
    """Cache bytes per sequence vs context, and decode throughput, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    per = result["cache_bytes_per_sequence"]
    ctx = [r["context"] for r in per]
    for kind in ("transformer", "attamba"):
        ax1.plot(ctx, [r[kind] / 2**20 for r in per], marker="o", label=kind)
    ax1.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="cache MiB per sequence",
            title="Cache per sequence")
    ax1.legend()
    rows = [r for r in result["decode_tokens_per_s"] if r["threads"] == max(result["threads"])]
    labels = [f"{r['batch']}x{r['context']}" for r in rows]
    kinds = [k for k in rows[0] if k.startswith(("attamba_float", "attamba_bfloat", "transformer_", "hf_"))] if rows else []
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        ax2.bar([x + i * width for x in range(len(rows))], [r[kind] for r in rows], width, label=kind)
    ax2.set_xticks([x + width * (len(kinds) - 1) / 2 for x in range(len(rows))], labels, rotation=30)
    ax2.set(ylabel="decode tokens/s", title=f"Decode throughput (batch x context), {max(result['threads'])} threads")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
