"""The engine: requests in, one scheduled model step at a time, token deltas out."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from models.config import ModelConfig
from models.loading import load_model
from models.registry import resolve_model
from models.tokenizer import Tokenizer

from .cache_manager import CacheLayout, CacheManager
from .config import EngineArgs
from .model_runner import ModelRunner
from .outputs import ContextLengthExceeded, EngineStats, QueueFull, StreamDelta
from .sampler import Sampler, make_generator
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .stop import check_stop, stop_holdback


class LLMEngine:
    """Owns the model runner, cache manager, scheduler and sampler; `step()` advances every request."""

    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        path = resolve_model(args.model)  # a checkpoint directory or a named model (models/registry.py)
        overrides = {}
        if args.chunk_size is not None:
            self._check_chunk_override(path, args.chunk_size)
            overrides["chunk_size"] = args.chunk_size
        self.device = torch.device(args.device)
        self.model = load_model(path, self.device, args.torch_dtype, **overrides)
        self.config = self.model.config
        self.tokenizer = Tokenizer.from_file(path / "tokenizer.json")
        self.model_name = path.resolve().name
        self.max_model_len = args.max_model_len or 8 * self.config.max_seq_len
        layout = CacheLayout(self.config, args.block_size, args.torch_dtype)
        self.cache = CacheManager.from_budget(layout, args.cache_memory, args.max_num_seqs)
        self.runner = ModelRunner(self.model, layout, self.cache.num_blocks, self.cache.num_slots, self.device)
        self.scheduler = Scheduler(self.cache, min(args.max_num_seqs, self.cache.num_slots), args.max_num_batched_tokens)
        self.sampler = Sampler()
        self.requests: dict[str, list[Sequence]] = {}
        self.eos_token_id = self.config.eos_token_id if self.config.eos_token_id is not None else self.tokenizer.eos_token_id
        self.prompt_tokens = 0
        self.generation_tokens = 0

    @staticmethod
    def _check_chunk_override(path: Path, chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError("--chunk-size must be >= 1")
        if ModelConfig.load(path).kind != "attamba":
            raise ValueError("--chunk-size applies to attamba checkpoints only")

    # ---- requests -----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a text or token-id prompt; ValueError when empty or out of vocabulary."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.config.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.config.vocab_size})")
        return ids

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ContextLengthExceeded (a ValueError) for a request that can never run."""
        if params.chunk_size is not None and params.chunk_size != self.config.chunk_size:
            raise ValueError(f"chunk_size {params.chunk_size} is not served here: this engine runs P = "
                             f"{self.config.chunk_size} (per-request P is not supported; start with --chunk-size)")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt_ids)
        total = len(prompt_ids) + max_tokens
        if max_tokens < 1 or total > self.max_model_len:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.max_model_len} tokens; the request asks for "
                f"{len(prompt_ids)} prompt + {max(max_tokens, 1)} completion tokens")
        if not self.cache.fits_alone(total):
            raise ContextLengthExceeded(f"{total} tokens do not fit the cache ({self.cache.total_bytes} bytes)")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> list[Sequence]:
        """Queue a request (params.n sequences). Raises ValueError/QueueFull before queuing anything."""
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        ids = self.encode_prompt(prompt)
        self.check_request(ids, params)
        if len(self.scheduler.waiting) + params.n > self.args.max_waiting:
            raise QueueFull("the waiting queue is full")
        max_tokens = params.max_tokens or self.max_model_len - len(ids)
        seqs = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            seq = Sequence(request_id, i, ids, params, max_tokens, self.tokenizer.incremental_decoder(skip_special_tokens=True),
                           make_generator(seed, self.device))
            self.scheduler.add(seq)
            seqs.append(seq)
        self.requests[request_id] = seqs
        self.prompt_tokens += len(ids)
        return seqs

    def abort_request(self, request_id: str) -> list[StreamDelta]:
        """Stop a request now; its cache is returned at once. Returns the final deltas."""
        deltas = []
        for seq in self.requests.pop(request_id, []):
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
                deltas.append(self._delta(seq))
        return deltas

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step -----------------------------------------------------------------------------------------
    def step(self) -> list[StreamDelta]:
        """Run one scheduled batch; return the deltas of sequences that produced output."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        # one new token after cached ones is a decode; everything else is a prefill chunk
        decodes, prefills = [], []
        for seq, n in batch.work:
            if n == 1 and seq.num_computed > 0:
                decodes.append(seq)
            else:
                prefills.append((seq, n))
        sample_seqs, logits = [], []
        for seq, n in prefills:
            done = seq.num_computed + n == seq.num_tokens
            row = self.runner.prefill(seq, n, want_logits=done)
            if done:
                sample_seqs.append(seq)
                logits.append(row[None])
        if decodes:
            sample_seqs += decodes
            logits.append(self.runner.decode(decodes))
        for seq, n in batch.work:
            seq.num_computed += n
        if not sample_seqs:
            return []
        out = self.sampler(torch.cat(logits), [s.params for s in sample_seqs], [s.generator for s in sample_seqs])
        now = time.monotonic()
        return [self._append(seq, int(out.token_ids[i]), float(out.logprobs[i]), out.top_logprobs[i], now)
                for i, seq in enumerate(sample_seqs)]

    def _append(self, seq: Sequence, token: int, logprob: float, top, now: float) -> StreamDelta:
        """Record a sampled token, detokenize, check stop conditions; the delta to stream."""
        seq.output_ids.append(token)
        self.generation_tokens += 1
        seq.first_token_time = seq.first_token_time or now
        if seq.params.logprobs is not None:
            seq.logprobs.append(logprob)
            seq.top_logprobs.append(top or [])
        start = len(seq.text)
        seq.text += seq.decoder.push(token)
        reason, cut = check_stop(seq.text, start, token, len(seq.output_ids), seq.params, self.eos_token_id)
        if reason is None and (len(seq.output_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if cut is None:
                seq.text += seq.decoder.flush()
            else:
                seq.text = seq.text[:cut]
            self.scheduler.finish(seq, reason)
            self._retire(seq)
            return self._delta(seq)
        return self._delta(seq, stop_holdback(seq.text, seq.params))

    def _retire(self, seq: Sequence) -> None:
        seqs = self.requests.get(seq.request_id, [])
        if all(s.is_finished for s in seqs):
            self.requests.pop(seq.request_id, None)

    def _delta(self, seq: Sequence, held: int = 0) -> StreamDelta:
        """Everything seq produced since its last delta (text minus `held` trailing characters)."""
        end = len(seq.text) - held
        tok0 = seq.num_emitted_tokens
        delta = StreamDelta(
            request_id=seq.request_id, index=seq.index, text=seq.text[seq.num_emitted_chars:end],
            token_ids=seq.output_ids[tok0:],
            logprobs=seq.logprobs[tok0:] if seq.params.logprobs is not None else None,
            top_logprobs=seq.top_logprobs[tok0:] if seq.params.logprobs is not None else None,
            finish_reason=seq.finish_reason, prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids), first_token_time=seq.first_token_time,
        )
        seq.num_emitted_chars = max(seq.num_emitted_chars, end)
        seq.num_emitted_tokens = len(seq.output_ids)
        return delta

    # ---- observability ---------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        live = self.scheduler.running
        return EngineStats(
            num_running=len(live), num_waiting=len(self.scheduler.waiting),
            cache_bytes_total=self.cache.total_bytes, cache_bytes_used=self.cache.used_bytes(),
            cache_bytes_full_kv_equivalent=self.cache.full_kv_equivalent(live),
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens, generation_tokens=self.generation_tokens,
        )
