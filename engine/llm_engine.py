"""The engine: requests in, one scheduled model step at a time, token deltas out."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from models.config import ModelConfig
from models.loading import load_model
from models.quant import INT8_LINEARS, quantize_linears
from models.registry import NAMED_MODELS, resolve_model
from models.tokenizer import Tokenizer
from models.upcast import upcast_linears

from .admission import AdmissionGate, PreparedRequest
from .cache_layout import CacheLayout
from .cache_manager import CacheManager
from .config import EngineArgs, native_bf16
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .outputs import EngineStats, StreamDelta
from .sampler import Sampler, make_generator
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence


log = logging.getLogger("attamba.engine")


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
        torch.set_num_threads(args.num_threads)
        self.model = load_model(path, self.device, args.torch_dtype, **overrides)
        if args.quantization == "int8":
            quantize_linears(self.model, INT8_LINEARS)
        elif self.device.type == "cpu" and args.torch_dtype == torch.bfloat16 and not native_bf16():
            upcast_linears(self.model)  # bf16 matrix-matrix products in fp32 (models/upcast.py)
        self.config = self.model.config
        self.tokenizer = Tokenizer.from_file(path / "tokenizer.json")
        self.model_name = args.model if args.model in NAMED_MODELS else path.resolve().name
        layout = CacheLayout.for_model(self.config, args.block_size, args.torch_dtype)
        self.cache = CacheManager.from_budget(layout, args.cache_memory, args.max_num_seqs,
                                              args.enable_prefix_caching, args.prefix_snapshot_interval)
        self.gate = AdmissionGate(self.tokenizer, self.config, args.max_waiting, args.max_model_len, self.cache.fits_alone)
        self.max_model_len = self.gate.max_model_len
        self.runner = ModelRunner(self.model, layout, self.cache.num_blocks, self.cache.num_slots, self.device)
        max_running = min(args.max_num_seqs, self.cache.num_slots)
        if self.device.type == "cuda" and not args.enforce_eager:
            if not self.runner.capture_graphs(self.max_model_len, max_running):
                log.warning("decode runs eagerly: CUDA graphs need the Triton kernels (install triton)")
        elif not args.enforce_eager:
            self.runner.compile_decode(max_running)
            self.runner.compile_prefill(max_running)
        self.scheduler = Scheduler(self.cache, max_running, args.max_num_batched_tokens)
        self.requests: dict[str, list[Sequence]] = {}
        self.eos_token_id = self.config.eos_token_id if self.config.eos_token_id is not None else self.tokenizer.eos_token_id
        self.sampler = Sampler(self.tokenizer, self.eos_token_id)
        self.outputs = OutputProcessor(self.eos_token_id, self.max_model_len)
        self.prompt_tokens = 0
        self.generation_tokens = 0

    @staticmethod
    def _check_chunk_override(path: Path, chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError("--chunk-size must be >= 1")
        if ModelConfig.load(path).kind != "attamba":
            raise ValueError("--chunk-size applies to attamba checkpoints only")

    # ---- requests -----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int] | PreparedRequest,
                    params: SamplingParams | None = None) -> list[Sequence]:
        """Queue a request (params.n sequences); a raw prompt is prepared by the gate first. Raises
        InvalidRequest or QueueFull (engine/errors.py) before anything is queued."""
        req = prompt if isinstance(prompt, PreparedRequest) else self.gate.prepare(prompt, params)
        self.add_requests({request_id: req})
        return self.requests[request_id]

    def add_requests(self, requests: dict[str, PreparedRequest]) -> None:
        """Queue prepared requests together: all of them, or none (QueueFull, counted against the
        waiting queue as it is now)."""
        taken = [rid for rid in requests if rid in self.requests]
        if taken:
            raise ValueError(f"duplicate request id {taken[0]!r}")
        self.gate.admit(len(self.scheduler.waiting), sum(req.params.n for req in requests.values()))
        for request_id, req in requests.items():
            p = req.params
            seqs = []
            for i in range(p.n):
                seed = None if p.seed is None else p.seed + i
                seq = Sequence(request_id, i, req.prompt_ids, p, req.max_tokens,
                               self.tokenizer.incremental_decoder(skip_special_tokens=True),
                               make_generator(seed, self.device))
                self.scheduler.add(seq)
                seqs.append(seq)
            self.requests[request_id] = seqs
            self.prompt_tokens += len(req.prompt_ids)

    def has_room(self, sequences: int) -> bool:
        """Whether the waiting queue takes `sequences` more now."""
        return self.gate.has_room(len(self.scheduler.waiting), sequences)

    def abort_request(self, request_id: str) -> list[StreamDelta]:
        """Stop a request now; its cache is returned at once. Returns the final deltas."""
        deltas = []
        for seq in self.requests.pop(request_id, []):
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
                deltas.append(self.outputs.delta(seq))
        return deltas

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step -----------------------------------------------------------------------------------------
    def step(self) -> list[StreamDelta]:
        """Run one scheduled batch; return the deltas of sequences that produced output."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self.runner.load_snapshots(batch.loads)
        seqs, logits = self.runner.run(batch.work)
        self.runner.save_snapshots(batch.saves)
        self.scheduler.advance(batch)
        if not seqs:
            return []
        out = self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs], seqs)
        now = time.monotonic()
        deltas = []
        for i, seq in enumerate(seqs):
            reason = self.outputs.append(seq, int(out.token_ids[i]), float(out.logprobs[i]), out.top_logprobs[i], now)
            self.generation_tokens += 1
            if reason is not None:
                self.scheduler.finish(seq, reason)
                self._retire(seq)
            deltas.append(self.outputs.delta(seq))
        return deltas

    def _retire(self, seq: Sequence) -> None:
        seqs = self.requests.get(seq.request_id, [])
        if all(s.is_finished for s in seqs):
            self.requests.pop(seq.request_id, None)

    # ---- observability ---------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        live = self.scheduler.running
        return EngineStats(
            num_running=len(live), num_waiting=len(self.scheduler.waiting),
            cache_bytes_total=self.cache.total_bytes, cache_bytes_used=self.cache.used_bytes(),
            cache_bytes_full_kv_equivalent=self.cache.full_kv_equivalent(live),
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens, generation_tokens=self.generation_tokens,
            prefix_cache_queries=self.cache.prefix.queries if self.cache.prefix else 0,
            prefix_cache_hits=self.cache.prefix.hits if self.cache.prefix else 0,
            prefix_cache_bytes=self.cache.prefix_cache_bytes(),
        )
