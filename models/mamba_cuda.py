"""Optional CUDA path through mamba-ssm's Triton SSD (`pip install .[cuda]`): the chunked scan
`mamba_chunk_scan_combined`, and causal-conv1d's fused conv when that imports too, both with
`seq_idx` resets at every Attamba chunk start.

Used only for whole sequences from position 0 on CUDA tensors, when the SSD imports; the
project's own PyTorch path (models/ssm.py) runs everywhere else and is the reference.
mamba-ssm's package __init__ imports its CUDA extension (selective_scan_cuda), which the Triton
SSD does not need, so the SSD's modules are imported without running that __init__.
`describe()` says which path prefill takes here.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _import_ssd() -> tuple[Callable | None, str]:
    """(mamba_chunk_scan_combined or None, why not)."""
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        return None, "mamba-ssm is not installed"
    stub = "mamba_ssm" not in sys.modules
    if stub:  # the package as an empty module, so its submodules import without its __init__
        sys.modules["mamba_ssm"] = importlib.util.module_from_spec(spec)
    try:
        return importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined, ""
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        return None, f"mamba-ssm's Triton SSD does not import ({type(exc).__name__}: {exc})"
    finally:
        if stub:  # a later `import mamba_ssm` runs the real __init__; the submodules stay loaded
            del sys.modules["mamba_ssm"]


@lru_cache(maxsize=1)
def _kernels() -> tuple[Callable | None, Callable | None, str]:
    """(causal_conv1d_fn or None, mamba_chunk_scan_combined or None, why the SSD is unavailable)."""
    if not torch.cuda.is_available():
        return None, None, "no CUDA device"
    scan, why = _import_ssd()
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # noqa: BLE001 - the conv then runs in PyTorch
        causal_conv1d_fn = None
    return causal_conv1d_fn, scan, why


def available(t: Tensor) -> bool:
    return t.is_cuda and _kernels()[1] is not None


def describe() -> str:
    """Which path a whole-sequence CUDA prefill takes in this process, and why."""
    conv, scan, why = _kernels()
    if scan is None:
        return f"PyTorch SSD ({why})"
    return "mamba-ssm Triton SSD with " + ("causal-conv1d's conv" if conv is not None else "a PyTorch conv")


def _conv_silu_torch(xbc: Tensor, weight: Tensor, seq_idx: Tensor) -> Tensor:
    """The conv below in PyTorch: tap k reads input t - (W-1-k) when it has t's seq_idx."""
    W, T = weight.shape[1], xbc.shape[1]
    weight = weight.to(xbc.dtype)
    out = xbc * weight[:, W - 1]
    for k in range(W - 1):
        j = W - 1 - k  # how far back tap k reads
        same = (seq_idx[:, j:] == seq_idx[:, : T - j]).to(xbc.dtype)[..., None]  # [B, T-j, 1]
        out[:, j:] = out[:, j:] + xbc[:, : T - j] * weight[:, k] * same
    return F.silu(out)


def conv_silu(xbc: Tensor, weight: Tensor, seq_idx: Tensor) -> Tensor:
    """Causal depthwise conv + SiLU with resets. xbc: [B, T, C]; weight [C, W]; seq_idx [B, T] int32."""
    conv_fn = _kernels()[0]
    if conv_fn is None:
        return _conv_silu_torch(xbc, weight, seq_idx)
    x = xbc.transpose(1, 2)  # [B, C, T] with channels contiguous, as seq_idx requires
    return conv_fn(x, weight.to(xbc.dtype), None, seq_idx=seq_idx, activation="silu").transpose(1, 2)


def ssd(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, seq_idx: Tensor) -> Tensor:
    """Chunked SSD with resets where seq_idx changes. x [B, T, h, p], dt [B, T, h] (after softplus),
    Bm, Cm [B, T, N] -> y [B, T, h, p] (no D skip)."""
    scan = _kernels()[1]
    return scan(x, dt, A, Bm.unsqueeze(2), Cm.unsqueeze(2), chunk_size=256, seq_idx=seq_idx)
