"""llama.cpp (through llama-cpp-python) as a reference: GGUF export of our Llama-kind models, and timings.

- `write_gguf(source, path, dtype="f16")` writes a llama-architecture GGUF of a transformer-kind model
  (a ModelConfig with random weights, an LM, or a checkpoint directory) with the `gguf` package:
  llama.cpp's tensor names and metadata, Wq / Wk rows permuted to its interleaved rotary layout, and a
  tokenizer (a minimal byte-level BPE one, or via `vocab_from` the tokenizer of an existing GGUF or a
  byte-level BPE `tokenizer.json`, e.g. the checkpoint's own, so llama.cpp's text is the model's).
- `llamacpp_logits(path, ids)` the logits of every position of one sequence (to check a conversion).
- `llamacpp_decode(path, context, steps, threads, batch)` prefill tok/s, TTFT and decode tok/s after
  `context` tokens, flash attention on, through llama.cpp's C API (llama-cpp-python's low-level binding);
  batch > 1 decodes parallel sequences (one KV stream each) in one llama_decode per step.
  `llamacpp_decode_batches` does several batch sizes after one prefill.
A GGUF's context_length is the model's max_seq_len unless given; llama.cpp only warns when asked for more
(RoPE is unscaled), but llama-server caps its slots to it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from models import LM, ModelConfig, build_model, load_model

GGUF_TYPES = ("f32", "f16")
# our parameter names -> llama.cpp's (layer tensors under blk.N.)
_GLOBAL = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "head.weight": "output.weight"}
_LAYER = {
    "attn_norm": "attn_norm", "attn.wq": "attn_q", "attn.wk": "attn_k", "attn.wv": "attn_v", "attn.wo": "attn_output",
    "ffn_norm": "ffn_norm", "ffn.w1": "ffn_gate", "ffn.w3": "ffn_up", "ffn.w2": "ffn_down",
}
_NORMAL, _CONTROL = 1, 3  # llama.cpp token types


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's `permute` of Wq / Wk rows (its converter's): per head, rows (half, i) -> (i, half)."""
    out, d_in = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, d_in).transpose(1, 2).reshape(out, d_in)


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _minimal_vocab(writer, vocab_size: int) -> None:
    """A byte-level BPE vocabulary of `vocab_size` tokens: the 256 bytes, <|endoftext|> (BOS/EOS), then pairs."""
    if vocab_size < 257:
        raise ValueError(f"a GGUF vocabulary needs at least 257 tokens, the model has {vocab_size}")
    chars = _byte_chars()
    pairs = [(a, b) for a in chars for b in chars][: vocab_size - 257]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(chars + ["<|endoftext|>"] + [a + b for a, b in pairs])
    writer.add_token_types([_NORMAL] * 256 + [_CONTROL] + [_NORMAL] * len(pairs))
    writer.add_token_merges([f"{a} {b}" for a, b in pairs] or [f"{chars[0]} {chars[1]}"])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(256)
    writer.add_add_bos_token(False)


def _copy_vocab(writer, gguf_path: str | Path, vocab_size: int) -> None:
    """Every tokenizer.* field of another GGUF (whose vocabulary must have `vocab_size` tokens)."""
    from gguf import GGUFValueType

    from models.gguf import read_gguf

    reader = read_gguf(gguf_path)
    n = len(reader.fields["tokenizer.ggml.tokens"].contents())
    if n != vocab_size:
        raise ValueError(f"{gguf_path} has {n} tokens, the model's vocabulary has {vocab_size}")
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            array = field.types[0] == GGUFValueType.ARRAY
            writer.add_key_value(key, field.contents(), field.types[0], field.types[-1] if array else None)


def _vocab_from_tokenizer_json(writer, path: str | Path, vocab_size: int, eos_token_id: int | None) -> None:
    """The vocabulary of a Hugging Face byte-level BPE tokenizer.json (GPT-2 style, as ours), its special tokens
    as control tokens and `eos_token_id` as BOS and EOS (no BOS added)."""
    spec = json.loads(Path(path).read_text())
    model = spec["model"]
    if model.get("type") != "BPE" or (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{path}: only byte-level BPE tokenizers convert to a GGUF vocabulary")
    vocab = model["vocab"]
    if len(vocab) != vocab_size or sorted(vocab.values()) != list(range(vocab_size)):
        raise ValueError(f"{path} has {len(vocab)} tokens, the model's vocabulary has {vocab_size}")
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex, which the ByteLevel pre-tokenizer uses
    writer.add_token_list(tokens)
    writer.add_token_types([_CONTROL if i in special else _NORMAL for i in range(vocab_size)])
    # tokenizers writes merges as "a b" (older files) or ["a", "b"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    eos = eos_token_id if eos_token_id is not None else min(special, default=0)
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)


def _source_model(source: ModelConfig | LM | str | Path) -> LM:
    if isinstance(source, ModelConfig):
        return build_model(source, seed=0)
    if isinstance(source, LM):
        return source
    return load_model(source)


@torch.no_grad()
def write_gguf(source: ModelConfig | LM | str | Path, path: str | Path, dtype: str = "f16",
               vocab_from: str | Path | None = None, context_length: int | None = None) -> Path:
    """Write a llama-architecture GGUF of a transformer-kind model; returns `path`.

    source: a ModelConfig (random weights, seed 0), an LM, or a checkpoint directory.
    dtype: "f16" or "f32" for the matrices and the embedding (norm weights stay f32, as llama.cpp's converter does).
    vocab_from: copy the tokenizer of this GGUF, or convert this byte-level BPE tokenizer.json (same vocabulary
    size); default, a minimal byte-level BPE tokenizer that llama.cpp loads (for benchmarks fed token ids).
    context_length: the training context llama.cpp reads (it caps a server slot's context to it); default, the
    model's max_seq_len.
    """
    from gguf import GGUFWriter, LlamaFileType

    if dtype not in GGUF_TYPES:
        raise ValueError(f"dtype must be one of {GGUF_TYPES}, got {dtype!r}")
    model = _source_model(source)
    cfg = model.config
    if cfg.kind != "transformer":
        raise ValueError(f"only transformer-kind models export to a llama GGUF, this one is {cfg.kind!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, "llama")
    writer.add_name(f"attamba-serve transformer d{cfg.d_model} x{cfg.n_layers}")
    writer.add_file_type(LlamaFileType.MOSTLY_F16 if dtype == "f16" else LlamaFileType.ALL_F32)
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(context_length or cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if vocab_from is None:
        _minimal_vocab(writer, cfg.vocab_size)
    elif str(vocab_from).endswith(".json"):
        _vocab_from_tokenizer_json(writer, vocab_from, cfg.vocab_size, cfg.eos_token_id)
    else:
        _copy_vocab(writer, vocab_from, cfg.vocab_size)
    np_dtype = np.float16 if dtype == "f16" else np.float32
    for name, w in model.state_dict().items():
        if cfg.tie_embeddings and name == "head.weight":
            continue  # llama.cpp ties the output to token_embd when output.weight is absent
        if name in _GLOBAL:
            gguf_name = _GLOBAL[name]
        else:
            _, layer, rest = name.split(".", 2)
            gguf_name = f"blk.{layer}.{_LAYER[rest.removesuffix('.weight')]}.weight"
        w = w.float()
        if name.endswith("attn.wq.weight"):
            w = permute_rotary(w, cfg.num_attn_heads)
        elif name.endswith("attn.wk.weight"):
            w = permute_rotary(w, cfg.num_kv_heads)
        writer.add_tensor(gguf_name, w.numpy().astype(np.float32 if w.dim() == 1 else np_dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class _Llama:
    """A llama.cpp model and context (CPU, flash attention on), freed on exit."""

    def __init__(self, gguf_path: str | Path, n_ctx: int, threads: int, n_seq: int = 1, n_batch: int = 512) -> None:
        import llama_cpp
        from llama_cpp import _logger

        _logger.set_verbose(False)
        llama_cpp.llama_backend_init()
        self.lib = llama_cpp
        if not Path(gguf_path).is_file():
            raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.kv_unified = False  # one KV stream per sequence: copies of the context are real copies
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens for {gguf_path}")
        self.n_batch = n_batch
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(max(n_batch, n_seq), 0, 1)

    def __enter__(self) -> "_Llama":
        return self

    def __exit__(self, *exc: object) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def decode(self, tokens: list[int], positions: list[int], seqs: list[int], logits: list[bool]) -> None:
        """One llama_decode of a batch of tokens (at most n_batch)."""
        b = self.batch
        b.n_tokens = len(tokens)
        for i, (t, p, s, out) in enumerate(zip(tokens, positions, seqs, logits)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = t, p, 1, s, out
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def prefill(self, ids: list[int], seq: int = 0, all_logits: bool = False) -> None:
        """Evaluate a sequence's tokens from position 0, in chunks of n_batch (logits of the last token only)."""
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            last = start + len(chunk) == len(ids)
            self.decode(chunk, list(range(start, start + len(chunk))), [seq] * len(chunk),
                        [all_logits or (last and i == len(chunk) - 1) for i in range(len(chunk))])

    def logits(self, rows: int) -> np.ndarray:
        """The logits of the last decode's `rows` output tokens, float32 [rows, n_vocab] (a copy)."""
        ptr = self.lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(rows, self.n_vocab)).copy()


def llamacpp_logits(gguf_path: str | Path, ids: list[int], threads: int = 1) -> np.ndarray:
    """llama.cpp's logits at every position of one sequence of token ids, float32 [len(ids), vocab]."""
    with _Llama(gguf_path, n_ctx=max(256, len(ids)), threads=threads, n_batch=max(32, len(ids))) as llm:
        llm.prefill(ids, all_logits=True)
        return llm.logits(len(ids))


def llamacpp_decode(gguf_path: str | Path, context: int, steps: int, threads: int, batch: int = 1) -> dict:
    """llama.cpp's prefill tokens/s, TTFT and decode tokens/s (total over `batch` sequences) after `context` tokens.

    Returns {"context", "batch", "steps", "threads", "prefill_tokens_per_s", "ttft_s", "decode_tokens_per_s"};
    see llamacpp_decode_batches for the method.
    """
    return llamacpp_decode_batches(gguf_path, context, steps, threads, [batch])[0]


def llamacpp_decode_batches(gguf_path: str | Path, context: int, steps: int, threads: int,
                            batches: list[int]) -> list[dict]:
    """llamacpp_decode at several batch sizes, prefilling the context once.

    After a 32-token warm-up (then removed), the context (seeded random ids) is prefilled as sequence 0 in
    chunks of 512 tokens; its wall time up to the first token's logits is the TTFT. The context is copied into
    sequences 1..max(batches)-1 (one KV stream per sequence, so real copies). For each batch size b: one untimed
    decode step, then `steps` timed steps of one token for each of sequences 0..b-1 (one llama_decode per step,
    logits read and argmax'd), then the decoded tokens are removed again.
    """
    if context < 1 or steps < 1 or threads < 1 or not batches or min(batches) < 1:
        raise ValueError("context, steps, threads and batch sizes must be positive")
    n_seq = max(batches)
    per_seq = -(-(context + steps + 8) // 256) * 256
    with _Llama(gguf_path, n_ctx=n_seq * per_seq, threads=threads, n_seq=n_seq) as llm:
        ids = np.random.default_rng(0).integers(0, llm.n_vocab, context).tolist()
        mem = llm.lib.llama_get_memory(llm.ctx)
        llm.prefill(ids[:32])
        llm.lib.llama_memory_seq_rm(mem, 0, -1, -1)
        t0 = time.perf_counter()
        llm.prefill(ids)
        first = int(llm.logits(1)[0].argmax())
        ttft = time.perf_counter() - t0
        for s in range(1, n_seq):
            llm.lib.llama_memory_seq_cp(mem, 0, s, -1, -1)
        results = []
        for batch in batches:
            tokens, seqs = [first] * batch, list(range(batch))
            t1 = 0.0
            for step in range(steps + 1):
                if step == 1:
                    t1 = time.perf_counter()  # the first step (and any stream copies it triggers) is a warm-up
                llm.decode(tokens, [context + step] * batch, seqs, [True] * batch)
                tokens = llm.logits(batch).argmax(-1).tolist()
            decode_s = time.perf_counter() - t1
            for s in seqs:
                llm.lib.llama_memory_seq_rm(mem, s, context, -1)
            results.append({"context": context, "batch": batch, "steps": steps, "threads": threads,
                            "prefill_tokens_per_s": round(context / ttft, 1), "ttft_s": round(ttft, 4),
                            "decode_tokens_per_s": round(batch * steps / decode_s, 2)})
    return results
