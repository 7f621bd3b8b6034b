"""The chunk-resetting Mamba-2 (SSD) state-space model that produces Attamba's keys and values.

One SSM runs over chunks of at most P tokens and is reset (state and conv history zeroed) at the
first token of every chunk. Because no state crosses a chunk, the whole-sequence pass needs no
scan: inside a chunk the recurrence equals its quadratic form over at most P tokens, computed
for every position at once over a band of width P (`ssd_banded`). `ssd_recurrent_ref` is the
token-by-token recurrence it must equal, and `ChunkSSM.step` the one-token decode update.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import mamba_cuda
from .kv_spec import chunk_start
from .layers import RMSNorm, trunc_normal_


@dataclass
class SSMState:
    """Decode state of one SSM for a batch of sequences."""

    conv: Tensor  # [B, C, W-1] raw conv inputs of the last W-1 tokens (C = E + 2N)
    ssm: Tensor  # [B, h, E/h, N] fp32 recurrent state

    def nbytes(self) -> int:
        return self.conv.nelement() * self.conv.element_size() + self.ssm.nelement() * self.ssm.element_size()


def chunk_ids(pos: Tensor, chunk_size: int, offset: int | Tensor) -> Tensor:
    """Ids that are equal exactly for positions of one chunk; negative positions get unique ids.
    offset: an int or a 0-d tensor (what a compiled prefill passes: one graph for every layer's offset)."""
    starts = chunk_start(pos.clamp(min=0), chunk_size, offset) | (pos < 0)
    return torch.cumsum(starts.long(), -1)


def _window(x: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """The last `size` steps up to each t along dim 1, oldest first: out[:, t, ..., k] = x[:, t - size + 1 + k]
    (`fill` before the start): [B, T, ...] -> [B, T, ..., size]. Stacked slices of a padded copy (unfold's
    shape check would make a compiled graph assume T >= size)."""
    T = x.shape[1]
    padded = F.pad(x, [0, 0] * (x.dim() - 2) + [size - 1, 0], value=fill)
    return torch.stack([padded[:, k : k + T] for k in range(size)], -1)


def causal_conv_reset(xh: Tensor, weight: Tensor, cid: Tensor) -> Tensor:
    """Depthwise causal conv that sees only inputs of the output position's own chunk.

    xh: [B, W-1+T, C] (history then new inputs), weight: [C, W], cid: [W-1+T] or [B, W-1+T] chunk ids.
    Returns [B, T, C].
    """
    width = weight.shape[1]
    T = xh.shape[1] - width + 1
    weight = weight.to(xh.dtype)
    out = xh[:, width - 1 :] * weight[:, width - 1]
    for k in range(width - 1):  # tap k reads input t - (W-1-k), if it is in t's chunk
        same = (cid[..., k : k + T] == cid[..., width - 1 :]).to(xh.dtype)[..., None]
        out = out + xh[:, k : k + T] * weight[:, k] * same
    return out


def ssd_banded(
    x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, cid: Tensor, chunk_size: int,
    init_state: Tensor | None = None, cont: Tensor | None = None, last: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """SSD with per-chunk resets as a band of width P (no D skip).

    x: [B, T, h, p], dt: [B, T, h] (after softplus), A: [h] (negative), Bm, Cm: [B, T, N],
    cid: [T] or [B, T] chunk ids (>= 0). init_state [B, h, p, N] feeds positions with cont [T] or [B, T]
    True (the chunk the previous call ended in). last: [B] index of each row's last valid token; when given,
    the state after that token is returned too.
    Returns y [B, T, h, p] and the final state [B, h, p, N] (or None).

    Within a chunk y_t = sum_s C_t.B_s exp(sum_{r in (s, t]} dt_r A) dt_s x_s over the at most P sources
    s = t - P + 1 + k, k < P: each position's band is a window of the last P steps (`_window`),
    and the sum is one product over it.
    """
    bsz, T, h, p = x.shape
    P = chunk_size  # also when T < P (the window's padding covers it): no branch on T in a compiled graph
    dA = dt * A  # [B, T, h]
    cid = cid.expand(bsz, T)
    same = (_window(cid, P, -1) == cid[..., None]).to(x.dtype)  # [B, T, P]: the source is in t's chunk
    dA_w = _window(dA, P)  # [B, T, h, P]
    seg = dA_w.flip(-1).cumsum(-1).flip(-1) - dA_w  # log-decay from source k to t: dA over k+1 .. P-1
    decay = torch.exp(seg) * _window(dt, P) * same[:, :, None]  # [B, T, h, P]
    x_w, B_w = _window(x, P), _window(Bm, P)  # [B, T, h, p, P], [B, T, N, P]
    cb = torch.einsum("btn,btnk->btk", Cm, B_w)  # C_t . B_s
    y = torch.einsum("bthk,bthpk->bthp", decay * cb[:, :, None], x_w)
    final = None
    if last is not None:
        rows = torch.arange(bsz, device=x.device)
        final = torch.einsum("bhk,bhpk,bnk->bhpn", decay[rows, last], x_w[rows, last], B_w[rows, last])
    if init_state is not None:
        decay0 = torch.exp(torch.cumsum(dA, 1)) * cont.to(x.dtype).expand(bsz, T)[..., None]  # [B, T, h]
        # C_t applied to the state as a batched product (einsum here made a compiled graph compare T with N)
        y = y + (init_state.flatten(1, 2) @ Cm.transpose(1, 2)).transpose(1, 2).view(bsz, T, h, p) * decay0[..., None]
        if last is not None:
            final = final + init_state * (decay0[rows, last])[:, :, None, None]
    return y, final


def ssd_recurrent_ref(
    x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, reset: Tensor, init_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token-by-token reference of `ssd_banded`: S_t = exp(dt A) S_{t-1} + dt x B^T, y = S C.

    reset: [T] bool, True where the state is zeroed before the token. Returns y and final state.
    """
    bsz, T, h, p = x.shape
    S = x.new_zeros(bsz, h, p, Bm.shape[-1]) if init_state is None else init_state.clone()
    ys = []
    for t in range(T):
        if reset[t]:
            S = torch.zeros_like(S)
        S = S * torch.exp(dt[:, t] * A)[:, :, None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * Bm[:, t, None, None, :]
        ys.append(torch.einsum("bhpn,bn->bhp", S, Cm[:, t]))
    return torch.stack(ys, 1), S


class ChunkSSM(nn.Module):
    """Mamba-2 style SSM (one group, scalar A per head) whose state resets at every chunk start."""

    def __init__(self, d_model: int, d_inner: int, d_state: int, n_heads: int, conv_width: int, eps: float = 1e-5,
                 d_out: int | None = None) -> None:
        """d_out: width of the output projection (default d_model)."""
        super().__init__()
        self.d_inner, self.d_state, self.n_heads, self.conv_width = d_inner, d_state, n_heads, conv_width
        self.head_dim = d_inner // n_heads
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * d_state + n_heads, bias=False)  # [z | xs | B | C | dt]
        self.conv_weight = nn.Parameter(torch.empty(d_inner + 2 * d_state, conv_width))  # over [xs | B | C]
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.D = nn.Parameter(torch.ones(n_heads))
        self.norm = RMSNorm(d_inner, eps)
        self.out_proj = nn.Linear(d_inner, d_out or d_model, bias=False)

    def reset_parameters(self) -> None:
        trunc_normal_(self.in_proj.weight, self.in_proj.in_features**-0.5)
        trunc_normal_(self.out_proj.weight, self.out_proj.in_features**-0.5)
        trunc_normal_(self.conv_weight, 0.5)
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0.01, 2.0).log())
            self.D.fill_(1.0)
            self.norm.weight.fill_(1.0)

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        E, N = self.d_inner, self.d_state
        return zxbcdt[..., :E], zxbcdt[..., E : 2 * E + 2 * N], zxbcdt[..., 2 * E + 2 * N :]

    def _output(self, y: Tensor, z: Tensor) -> Tensor:
        return self.out_proj(self.norm(y * F.silu(z)))

    def empty_state(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> SSMState:
        return SSMState(
            conv=torch.zeros(batch, self.d_inner + 2 * self.d_state, self.conv_width - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch, self.n_heads, self.head_dim, self.d_state, device=device, dtype=torch.float32),
        )

    def forward(
        self, u: Tensor, pos: Tensor, chunk_size: int, offset: int | Tensor,
        state: SSMState | None = None, last: Tensor | None = None, mamba: bool = False,
    ) -> tuple[Tensor, SSMState | None]:
        """Whole-sequence pass. u: [B, T, d] at consecutive positions pos: [T] (shared by the rows)
        or [B, T] (each row its own run, e.g. prefill chunks of several sequences).

        state: the decode state before each row's first position (rows starting at 0 ignore it:
        nothing before a sequence's start is in its chunk). last: [B] index of each row's last
        valid token; when given, the state after it is returned for decoding.
        mamba: run mamba-ssm's CUDA/Triton kernels instead (fresh sequences, no state returned).
        """
        bsz, T, _ = u.shape
        E, N, h, p, W = self.d_inner, self.d_state, self.n_heads, self.head_dim, self.conv_width
        z, xbc, dt = self._split(self.in_proj(u))
        if mamba:
            if state is not None or last is not None:
                raise ValueError("the mamba-ssm path runs fresh sequences only (no state in or out)")
            if not mamba_cuda.available(u):
                raise ValueError(f"the mamba-ssm path is not available here: {mamba_cuda.describe()}")
            return self._forward_mamba(z, xbc, dt, pos, chunk_size, offset), None
        start = pos[..., :1] if pos.dim() == 2 else pos[:1]
        ext_pos = torch.arange(-(W - 1), T, device=u.device) + start  # history positions, then pos
        cid = chunk_ids(ext_pos, chunk_size, offset)  # [W-1+T] or [B, W-1+T]; negative positions: unique ids
        hist = state.conv.transpose(1, 2).to(xbc.dtype) if state is not None else xbc.new_zeros(bsz, W - 1, xbc.shape[-1])
        xh = torch.cat([hist, xbc], 1)  # [B, W-1+T, C]
        xbc = F.silu(causal_conv_reset(xh, self.conv_weight, cid))
        xs, Bm, Cm = xbc[..., :E], xbc[..., E : E + N], xbc[..., E + N :]
        dt = F.softplus(dt.float())  # [B, T, h]
        A = -torch.exp(self.A_log.float())
        cont = None
        if state is not None:
            cont = cid[..., W - 1 :] == cid[..., W - 2 : W - 1]  # still in the chunk the previous call ended in
        x = xs.float().view(bsz, T, h, p)
        y, final = ssd_banded(
            x, dt, A, Bm.float(), Cm.float(), cid[..., W - 1 :], chunk_size,
            init_state=state.ssm if cont is not None else None, cont=cont, last=last,
        )
        y = (y + x * self.D.float()[:, None]).reshape(bsz, T, E).to(u.dtype)
        new_state = None
        if last is not None:
            idx = last[:, None] + torch.arange(W - 1, device=u.device) + 1  # ext index of the last W-1 tokens
            conv = torch.gather(xh, 1, idx[..., None].expand(-1, -1, xh.shape[-1]))  # [B, W-1, C]
            cid = cid.expand(bsz, -1)
            own = torch.gather(cid, 1, idx) == torch.gather(cid, 1, last[:, None] + W - 1)  # own chunk only
            conv = conv * own.to(conv.dtype)[..., None]
            conv = conv.transpose(1, 2)
            new_state = SSMState(conv=conv.contiguous(), ssm=final)
        return self._output(y, z), new_state

    def _forward_mamba(self, z: Tensor, xbc: Tensor, dt: Tensor, pos: Tensor, chunk_size: int,
                       offset: int | Tensor) -> Tensor:
        """The same pass through mamba-ssm's CUDA kernels (whole sequences, no state returned)."""
        bsz, T, _ = xbc.shape
        E, N = self.d_inner, self.d_state
        seq_idx = chunk_ids(pos, chunk_size, offset).to(torch.int32).expand(bsz, T).contiguous()
        xbc = mamba_cuda.conv_silu(xbc, self.conv_weight, seq_idx)
        x = xbc[..., :E].float().unflatten(-1, (self.n_heads, self.head_dim))
        A = -torch.exp(self.A_log.float())
        y = mamba_cuda.ssd(x, F.softplus(dt.float()), A, xbc[..., E : E + N].float(), xbc[..., E + N :].float(), seq_idx)
        y = (y + x * self.D.float()[:, None]).reshape(bsz, T, E).to(z.dtype)
        return self._output(y, z)

    def step(self, u: Tensor, reset: Tensor, state: SSMState) -> tuple[Tensor, SSMState]:
        """One token per row. u: [B, d]; reset: [B] bool (zero the state first). Returns y [B, d]."""
        bsz = u.shape[0]
        E, N, h, p = self.d_inner, self.d_state, self.n_heads, self.head_dim
        z, xbc, dt = self._split(self.in_proj(u))
        conv_prev = torch.where(reset[:, None, None], 0.0, state.conv.to(u.dtype))
        win = torch.cat([conv_prev, xbc[:, :, None]], -1)  # [B, C, W]
        conv = win[:, :, 1:]
        xbc = F.silu((win * self.conv_weight.to(u.dtype)).sum(-1))
        xs, Bm, Cm = xbc[:, :E].float().view(bsz, h, p), xbc[:, E : E + N].float(), xbc[:, E + N :].float()
        dt = F.softplus(dt.float())  # [B, h]
        dA = torch.exp(dt * -torch.exp(self.A_log.float()))
        S_prev = torch.where(reset[:, None, None, None], 0.0, state.ssm)
        S = S_prev * dA[:, :, None, None] + (dt[:, :, None] * xs)[..., None] * Bm[:, None, None, :]
        y = torch.einsum("bhpn,bn->bhp", S, Cm) + xs * self.D.float()[:, None]
        return self._output(y.reshape(bsz, E).to(u.dtype), z), SSMState(conv=conv.to(state.conv.dtype), ssm=S)

