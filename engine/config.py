"""Engine settings: one frozen dataclass whose fields are the CLI flags (engine/settings.py), named as in vLLM."""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.quant import QUANTIZATIONS

from .settings import setting

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
AUTO = "auto"


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere PyTorch emulates bf16
    matrix-matrix products, and the engine runs them in fp32 (models/upcast.py)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtype(name: str, device: str, model_dtype: torch.dtype | None = None) -> torch.dtype:
    """A --dtype name -> torch dtype; "auto": the model's own dtype on CUDA (bf16 when unknown); on a CPU bf16
    where bf16 matrix-vector products are vectorised (AVX2 or better: decode reads half the bytes of fp32),
    else fp32."""
    if name != AUTO:
        return DTYPES[name]
    if device.startswith("cuda"):
        return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    return torch.bfloat16 if native_bf16() or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") \
        else torch.float32


def parse_bytes(text: str | int) -> int:
    """'2GiB', '512MB', '1e9' or an int -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse a byte size from {text!r} (try 2GiB or 500MB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"byte size must be positive, got {text!r}")
    return int(value)


@dataclass(frozen=True)
class EngineArgs:
    """Engine settings: how the engine sizes its cache and batches (flags of serve, generate and bench)."""

    model: str = setting("checkpoints/attamba-wt2", "checkpoint directory or named model, e.g. smollm2-135m")
    max_num_seqs: int = setting(32, "most sequences running at once")
    # llama.cpp's default batch (-b); a 1k prompt in one step prefilled ~17 % faster than in two of 512 (docs/cpu.md)
    max_num_batched_tokens: int = setting(2048, "tokens one engine step computes: prefill chunks plus decodes")
    cache_memory: int = setting(1 << 30, "bytes for the whole cache (boundary blocks + state slots), e.g. 2GiB "
                                "or 500MB", parse=parse_bytes, shown="1GiB")
    max_model_len: int | None = setting(None, "longest prompt + output in tokens",
                                        shown="8x the training length, reduced to what the cache holds")
    block_size: int = setting(16, "boundary (or KV) entries per cache block")
    device: str = setting("cpu", "where the model runs", choices=("cpu", "cuda"))
    dtype: str = setting(AUTO, "weights and cached K/V; auto: bf16 on a CPU with AVX2 or better (without native "
                         "bf16 its matrix-matrix products run in fp32), else fp32; on CUDA the model's dtype",
                         choices=(AUTO, *sorted(DTYPES)))
    quantization: str | None = setting(None, "weight-only quantization of the linear layers",
                                       choices=QUANTIZATIONS, shown="none")
    enforce_eager: bool = setting(False, "run eagerly: no compiled decode step and prefill layers on a CPU "
                                  "(torch.compile at start-up), no captured CUDA graphs on CUDA")
    max_waiting: int = setting(256, "sequences the waiting queue holds; more get 429")
    chunk_size: int | None = setting(None, "Attamba chunk size P for the whole engine (attamba checkpoints only)",
                                     shown="the checkpoint's")
    threads: int = setting(0, "torch CPU threads (0: the cores this process may use)")
    enable_prefix_caching: bool = setting(True, "reuse the cache of shared prompt prefixes: boundary blocks plus "
                                          "state snapshots")
    prefix_snapshot_interval: int = setting(8, "with prefix caching, also save a prompt's recurrent state every "
                                            "N blocks")

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError("threads must be >= 0")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_waiting", "prefix_snapshot_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.dtype != AUTO and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device cuda requested but no CUDA device is available")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype of weights and cached K/V (auto resolved for this device; on CUDA bf16)."""
        return resolve_dtype(self.dtype, self.device)

    @property
    def num_threads(self) -> int:
        """CPU threads for torch: as asked, else the cores this process may use (its affinity)."""
        return self.threads or len(os.sched_getaffinity(0))


log = logging.getLogger("attamba.engine")


def fit_max_model_len(requested: int | None, default: int, fits: Callable[[int], bool]) -> int:
    """The longest sequence the engine serves, as vLLM resolves it against the cache at start-up.

    An explicit `requested` length the cache cannot hold is refused (ValueError naming the most
    that fits); the default is reduced to the most that fits, with a warning."""
    wanted = requested or default
    if fits(wanted):
        return wanted
    low, high = 0, wanted  # fits(low) holds (or low is 0), fits(high) does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    if low == 0:
        raise ValueError("the cache cannot hold even one token: raise --cache-memory")
    if requested is not None:
        raise ValueError(f"--max-model-len {requested} does not fit the cache: at most {low} tokens do "
                         "(raise --cache-memory or lower --max-model-len)")
    log.warning("max_model_len reduced from %d to %d, the most one sequence can hold in the cache "
                "(raise --cache-memory for more)", default, low)
    return low
