"""llama.cpp (through llama-cpp-python) as a reference, on GGUFs that models.gguf.write_gguf writes.

- `llamacpp_logits(path, ids)` the logits of every position of one sequence (to check a conversion).
- `llamacpp_decode(path, context, steps, threads, batch)` prefill tok/s, TTFT and decode tok/s after
  `context` tokens, flash attention on, through llama.cpp's C API (llama-cpp-python's low-level binding);
  batch > 1 decodes parallel sequences (one KV stream each) in one llama_decode per step.
  `llamacpp_decode_batches` does several batch sizes after one prefill.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


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
