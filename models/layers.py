"""Small building blocks shared by every architecture: RMSNorm, RoPE, SwiGLU, chunk boundaries."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def trunc_normal_(weight: Tensor, std: float) -> Tensor:
    """Truncated normal at 3 sigma, the init of every projection."""
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back, then scaled by a learnable weight."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def reset_parameters(self) -> None:
        trunc_normal_(self.w1.weight, self.w1.in_features**-0.5)
        trunc_normal_(self.w3.weight, self.w3.in_features**-0.5)
        trunc_normal_(self.w2.weight, self.w2.in_features**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def apply_rope(x: Tensor, pos: Tensor, theta: float) -> Tensor:
    """Rotate-half RoPE. x: [..., T, H, D] (or [B, H, D] with pos [B]); pos broadcast to x[..., :-2]."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d // 2, device=x.device, dtype=torch.float32) * 2 / d)
    ang = pos.to(torch.float32)[..., None] * inv_freq  # [..., D/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1).unsqueeze(-2)  # [..., 1, D]
    sin = torch.cat([ang.sin(), ang.sin()], -1).unsqueeze(-2)
    xf = x.float()
    rot = torch.cat([-xf[..., d // 2 :], xf[..., : d // 2]], -1)
    return (xf * cos + rot * sin).to(x.dtype)


def is_boundary(pos: Tensor, chunk_size: int, offset: int) -> Tensor:
    """Membership in B_l = {0} U {(k+1)P - 1 - o_l}: the last token of each chunk."""
    return (pos == 0) | ((pos + 1 + offset) % chunk_size == 0)


def chunk_start(pos: Tensor, chunk_size: int, offset: int) -> Tensor:
    """True where a new chunk starts (SSM state and conv history are reset): t = 0 or t-1 in B_l."""
    return (pos == 0) | ((pos >= 1) & is_boundary(pos - 1, chunk_size, offset))


def num_boundaries(n, chunk_size: int, offset: int):
    """|{b in B_l : b < n}|, the boundary entries a sequence of n tokens keeps (int or Tensor n)."""
    # boundaries (k+1)P - 1 - o for k >= 0, below n; the one at 0 (o = P-1) is the {0} itself
    count = 1 + (n + offset) // chunk_size - (1 if offset == chunk_size - 1 else 0)
    return count * (n > 0)
