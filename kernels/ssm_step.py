"""Decode update of the K and V SSMs of one layer, in place on the slot pools.

Per row b (one token of one sequence, state slot s = slots[b]; -1 marks a padding row, skipped)
and per SSM g (K, V), exactly `ChunkSSM.step`:
    reset at a chunk start: conv history and recurrent state of slot s read as zero
    conv:  window = [history | xbc];  xbc' = silu(sum_w window * conv_weight);  history <- window[1:]
    SSD:   dt = softplus(dt);  S <- exp(dt * -exp(A_log)) * S + dt * x B^T;  y = S C + D * x
The gate, norm and output projection stay outside (they are matrix products).
`ssm_step_ref` is the PyTorch reference and the CPU path; `ssm_step` picks the Triton kernel on CUDA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._rows import cast, live_rows


def ssm_step_ref(
    xbc: Tensor, dt: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor, A_log: Tensor, D: Tensor,
    slots: Tensor, reset: Tensor,
) -> Tensor:
    """One token per row through G stacked SSMs (G = 2: K and V), updating the pools in place.

    xbc [B, G, C] conv inputs [xs | B | C] (C = E + 2N); dt [B, G, h] raw;
    conv_state [G, S, C, W-1] (cache dtype); ssm_state [G, S, h, p, N] fp32;
    conv_weight [G, C, W]; A_log, D [G, h]; slots [B] int (-1: skip); reset [B] bool.
    Returns y [B, G, E] (E = h * p) in xbc's dtype; padding rows are zero.
    """
    G, _, h, p, N = ssm_state.shape
    E = h * p
    live = live_rows(slots)
    if live is not None:  # only padding rows are dropped; this path is for CUDA-graph batches
        y = xbc.new_zeros(xbc.shape[0], G, E)
        y[live] = ssm_step_ref(xbc[live], dt[live], conv_state, ssm_state, conv_weight, A_log, D, slots[live], reset[live])
        return y
    f32 = torch.float32
    keep = (~reset).to(xbc.dtype).view(1, -1, 1, 1)  # 0 zeroes a row's state at a chunk start
    xbc = xbc.transpose(0, 1)  # [G, B, C]: the pools' order
    window = torch.cat([cast(conv_state[:, slots], xbc.dtype) * keep, xbc[..., None]], -1)  # [G, B, C, W]
    conv_state[:, slots] = cast(window[..., 1:], conv_state.dtype)
    act = cast(F.silu((window * cast(conv_weight, xbc.dtype)[:, None]).sum(-1)), f32)  # [G, B, C]
    x = act[..., :E].unflatten(-1, (h, p))  # [G, B, h, p]
    Bm, Cm = act[..., E : E + N], act[..., E + N :]  # [G, B, N]
    dt = F.softplus(cast(dt, f32)).transpose(0, 1)  # [G, B, h]
    decay = torch.exp(dt * -torch.exp(cast(A_log, f32))[:, None])
    S = ssm_state[:, slots] * cast(keep, f32)[..., None]  # [G, B, h, p, N]
    S = S * decay[..., None, None] + (dt[..., None] * x)[..., None] * Bm[:, :, None, None, :]
    ssm_state[:, slots] = S
    y = (S @ Cm[:, :, None, :, None]).squeeze(-1) + x * cast(D, f32)[:, None, :, None]  # [G, B, h, p]
    return cast(y.flatten(-2).transpose(0, 1), xbc.dtype)
