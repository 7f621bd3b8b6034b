"""Optional CUDA path through mamba-ssm (`pip install .[cuda]`): the fused causal conv and the
chunked SSD scan, both with `seq_idx` resets at every Attamba chunk start.

Used only for whole sequences from position 0 on CUDA tensors, when the package imports; the
project's own PyTorch path (models/ssm.py) runs everywhere else and is the reference.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor


@lru_cache(maxsize=1)
def _kernels():
    """(causal_conv1d_fn, mamba_chunk_scan_combined), or None when mamba-ssm is unusable here."""
    if not torch.cuda.is_available():
        return None
    try:  # its package init needs the CUDA extensions, so any failure means "not available"
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:
        return None
    return causal_conv1d_fn, mamba_chunk_scan_combined


def available(t: Tensor) -> bool:
    return t.is_cuda and _kernels() is not None


def conv_silu(xbc: Tensor, weight: Tensor, seq_idx: Tensor) -> Tensor:
    """Causal depthwise conv + SiLU with resets. xbc: [B, T, C]; weight [C, W]; seq_idx [B, T] int32."""
    conv_fn, _ = _kernels()
    x = xbc.transpose(1, 2)  # [B, C, T] with channels contiguous, as seq_idx requires
    return conv_fn(x, weight.to(xbc.dtype), None, seq_idx=seq_idx, activation="silu").transpose(1, 2)


def ssd(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, seq_idx: Tensor) -> Tensor:
    """Chunked SSD with resets where seq_idx changes. x [B, T, h, p], dt [B, T, h] (after softplus),
    Bm, Cm [B, T, N] -> y [B, T, h, p] (no D skip)."""
    _, scan = _kernels()
    return scan(x, dt, A, Bm.unsqueeze(2), Cm.unsqueeze(2), chunk_size=256, seq_idx=seq_idx)
