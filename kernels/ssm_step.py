"""Decode update of the K and V SSMs of one layer, in place on the slot pools.

Per row b (one token of one sequence, state slot s = slots[b]; -1 marks a padding row, skipped)
and per SSM g (K, V), exactly `ChunkSSM.step`:
    reset at a chunk start: conv history and recurrent state of slot s read as zero
    conv:  window = [history | xbc];  xbc' = silu(sum_w window * conv_weight);  history <- window[1:]
    SSD:   dt = softplus(dt);  S <- exp(dt * -exp(A_log)) * S + dt * x B^T;  y = S C + D * x
The gate, norm and output projection stay outside (they are matrix products).
`ssm_step_ref` is the PyTorch reference and the CPU path. `ssm_step_triton` is two launches
(as mamba's causal_conv1d_update then selective_state_update): the conv over disjoint channel
blocks, then the state update per (row, SSM, head). One launch cannot do both, because every head
reads the B and C channels' conv history that the update overwrites. They mutate the pools, so
block sizes come from the shapes, never from autotuning (which would rerun them).
`ssm_step` picks one (kernels/_triton.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._rows import cast, live_rows
from ._triton import cdiv, check, jit, next_pow2, tl, use_triton

MAX_BLOCK_C = 256  # conv channels per program


MAX_STATE_TILE = 4096  # state elements (BLOCK_P x BLOCK_N) per program


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


@jit
def _conv_step_kernel(
    xbc_ptr, conv_ptr, w_ptr, slot_ptr, reset_ptr, act_ptr,
    stride_xb, stride_xg, stride_cg, stride_cs, stride_cc, stride_wg, stride_wc, stride_ab, stride_ag,
    C: tl.constexpr, W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One (row, SSM, channel block): act = silu(conv([history | x])) in fp32; history <- window[1:]."""
    b, g, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    if slot >= 0:
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        j = tl.arange(0, BLOCK_W)[None, :]  # tap: history 0 .. W-2, then the new input at W-1
        cm = c < C
        n_hist = (W - 1) * (1 - tl.load(reset_ptr + b).to(tl.int32))  # taps read from history: 0 at a chunk start
        x = tl.load(xbc_ptr + b * stride_xb + g * stride_xg + c, mask=cm, other=0.0)
        hist = conv_ptr + g * stride_cg + slot * stride_cs + c[:, None] * stride_cc
        win = tl.load(hist + j, mask=cm[:, None] & (j < n_hist), other=0.0)
        win = tl.where(j == W - 1, x[:, None], win).to(xbc_ptr.dtype.element_ty)
        w = tl.load(w_ptr + g * stride_wg + c[:, None] * stride_wc + j, mask=cm[:, None] & (j < W), other=0.0)
        out = tl.sum(win.to(tl.float32) * w.to(tl.float32), 1)
        act = out * tl.sigmoid(out)
        # round as the reference does (its conv runs in xbc's dtype)
        act = act.to(xbc_ptr.dtype.element_ty).to(tl.float32)
        tl.store(act_ptr + b * stride_ab + g * stride_ag + c, act, mask=cm)
        nxt = tl.load(hist + j + 1, mask=cm[:, None] & (j < n_hist - 1), other=0.0)  # window[1:]
        nxt = tl.where(j == W - 2, x[:, None], nxt)
        tl.store(hist + j, nxt.to(conv_ptr.dtype.element_ty), mask=cm[:, None] & (j < W - 1))


@jit


def _ssd_step_kernel(
    act_ptr, dt_ptr, state_ptr, A_log_ptr, D_ptr, slot_ptr, reset_ptr, y_ptr,
    stride_ab, stride_ag, stride_db, stride_dg, stride_sg, stride_ss, stride_sh, stride_sp,
    stride_yb, stride_yg, nheads,
    P: tl.constexpr, N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One (row, SSM, head, block of head channels): S <- decay S + dt x B^T; y = S C + D x."""
    b, gh, pb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g, h = gh // nheads, gh % nheads
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    pm, nm = p < P, n < N
    y_out = y_ptr + b * stride_yb + g * stride_yg + h * P + p
    slot = tl.load(slot_ptr + b).to(tl.int64)
    if slot >= 0:
        act = act_ptr + b * stride_ab + g * stride_ag
        x = tl.load(act + h * P + p, mask=pm, other=0.0)
        Bv = tl.load(act + nheads * P + n, mask=nm, other=0.0)
        Cv = tl.load(act + nheads * P + N + n, mask=nm, other=0.0)
        dt = tl.load(dt_ptr + b * stride_db + g * stride_dg + h).to(tl.float32)
        # softplus as torch's (threshold 20), log1p(e) as log(u) e / (u - 1) with u = 1 + e (accurate for small e)
        e = tl.exp(tl.minimum(dt, 20.0))
        u = 1.0 + e
        dt = tl.where(dt > 20.0, dt, tl.where(u == 1.0, e, tl.log(u) * e / (u - 1.0)))
        decay = tl.exp(-dt * tl.exp(tl.load(A_log_ptr + gh).to(tl.float32)))
        n_live = N * (1 - tl.load(reset_ptr + b).to(tl.int32))  # state columns read: none at a chunk start
        s_ptr = state_ptr + g * stride_sg + slot * stride_ss + h * stride_sh + p[:, None] * stride_sp + n[None, :]
        smask = pm[:, None] & nm[None, :]
        S = tl.load(s_ptr, mask=pm[:, None] & (n[None, :] < n_live), other=0.0)
        S = S * decay + (dt * x)[:, None] * Bv[None, :]
        tl.store(s_ptr, S, mask=smask)
        y = tl.sum(S * Cv[None, :], 1) + x * tl.load(D_ptr + gh).to(tl.float32)
        tl.store(y_out, y.to(y_ptr.dtype.element_ty), mask=pm)
    else:
        tl.store(y_out, tl.zeros([BLOCK_P], dtype=y_ptr.dtype.element_ty), mask=pm)


def ssm_step_triton(
    xbc: Tensor, dt: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor, A_log: Tensor, D: Tensor,
    slots: Tensor, reset: Tensor,
) -> Tensor:
    """`ssm_step_ref` as two Triton launches (same arguments)."""
    B, G, C = xbc.shape
    _, S, h, p, N = ssm_state.shape
    W = conv_weight.shape[-1]
    E = h * p
    check(C == E + 2 * N, f"xbc has {C} channels, expected E + 2N = {E + 2 * N}")
    check(dt.shape == (B, G, h), f"dt {tuple(dt.shape)} is not [{B}, {G}, {h}]")
    check(conv_state.shape == (G, S, C, W - 1), f"conv_state {tuple(conv_state.shape)} is not [{G}, {S}, {C}, {W - 1}]")
    check(ssm_state.shape[0] == G and ssm_state.dtype == torch.float32, "ssm_state must be [G, S, h, p, N] fp32")
    check(conv_weight.shape == (G, C, W) and W >= 2, f"conv_weight {tuple(conv_weight.shape)} is not [{G}, {C}, W>=2]")
    check(A_log.shape == (G, h) and D.shape == (G, h), "A_log and D must be [G, h]")
    check(slots.shape == (B,) and reset.shape == (B,) and reset.dtype == torch.bool, "slots [B] int, reset [B] bool")
    check(conv_state.stride(-1) == 1 and ssm_state.stride(-1) == 1, "the pools' last dimension must be contiguous")
    y = xbc.new_empty(B, G, E)
    if B == 0:
        return y
    xbc, dt = (t if t.stride(-1) == 1 else t.contiguous() for t in (xbc, dt))
    conv_weight, A_log, D = conv_weight.contiguous(), A_log.contiguous(), D.contiguous()
    reset = reset.view(torch.uint8)
    act = torch.empty(B, G, C, device=xbc.device, dtype=torch.float32)
    BLOCK_C = min(next_pow2(C), MAX_BLOCK_C)
    _conv_step_kernel[(B, G, cdiv(C, BLOCK_C))](
        xbc, conv_state, conv_weight, slots, reset, act,
        xbc.stride(0), xbc.stride(1), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        conv_weight.stride(0), conv_weight.stride(1), act.stride(0), act.stride(1),
        C=C, W=W, BLOCK_C=BLOCK_C, BLOCK_W=next_pow2(W),
    )
    BLOCK_N = next_pow2(N)
    BLOCK_P = min(next_pow2(p), max(1, MAX_STATE_TILE // BLOCK_N))
    _ssd_step_kernel[(B, G * h, cdiv(p, BLOCK_P))](
        act, dt, ssm_state, A_log, D, slots, reset, y,
        act.stride(0), act.stride(1), dt.stride(0), dt.stride(1),
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), ssm_state.stride(3),
        y.stride(0), y.stride(1), h,
        P=p, N=N, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
    )
    return y


def ssm_step(
    xbc: Tensor, dt: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor, A_log: Tensor, D: Tensor,
    slots: Tensor, reset: Tensor,
) -> Tensor:
    """The kernels on CUDA (or when forced), else the reference."""
    fn = ssm_step_triton if use_triton(xbc) else ssm_step_ref
    return fn(xbc, dt, conv_state, ssm_state, conv_weight, A_log, D, slots, reset)
