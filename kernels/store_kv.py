"""Write this step's K/V into a pool: the paged boundary entries or the window ring.

A pool is viewed flat as [num_entries, Hkv, D]; slot_mapping[b] is the flat entry of row b's
K/V, or -1 when the row stores nothing there (not a boundary of this layer, or a padding row),
as in vLLM's reshape_and_cache and nano-vllm's store kernel.
`store_kv_ref` is the PyTorch reference and the CPU path, `store_kv_triton` the kernel (one
program per row); `store_kv` picks one (kernels/_triton.py).
"""
from __future__ import annotations

from torch import Tensor

from ._rows import cast, live_rows
from ._triton import check, jit, next_pow2, tl, use_triton


def store_kv_ref(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """k, v [B, Hkv, D] -> k_cache, v_cache [num_entries, Hkv, D] at slot_mapping [B] (-1 skipped)."""
    keep = live_rows(slot_mapping)
    if keep is not None:
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache[slot_mapping] = cast(k, k_cache.dtype)
    v_cache[slot_mapping] = cast(v, v_cache.dtype)


@jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_kb, stride_kh, stride_vb, stride_vh, stride_ce, stride_ch,
    Hkv: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    if slot >= 0:  # slot -1: nothing is read or written
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < Hkv) & (d < D)
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + d, mask=mask)
        dst = slot * stride_ce + h * stride_ch + d
        tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """`store_kv_ref` as one Triton launch (same arguments)."""
    B, Hkv, D = k.shape
    check(v.shape == k.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    check(k_cache.dim() == 3 and k_cache.shape[1:] == (Hkv, D) and v_cache.shape == k_cache.shape,
          f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} are not [entries, {Hkv}, {D}]")
    check(k_cache.stride() == v_cache.stride() and k_cache.stride(2) == 1,
          "k_cache and v_cache need equal strides and contiguous heads")
    check(slot_mapping.shape == (B,) and not slot_mapping.is_floating_point(), "slot_mapping must be [B] integers")
    if B == 0:
        return
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    _store_kv_kernel[(B,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), Hkv=Hkv, D=D, BLOCK_H=next_pow2(Hkv), BLOCK_D=next_pow2(D),
    )


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """The kernel on CUDA (or when forced), else the reference."""
    (store_kv_triton if use_triton(k) else store_kv_ref)(k, v, k_cache, v_cache, slot_mapping)
