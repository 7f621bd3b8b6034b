"""The serving step's attention and cache ops. Each decode op has a PyTorch `_ref` (the reference
and the CPU path) and a Triton kernel with the exact same signature (`_triton`, a wrapper that
checks shapes and dtypes); the names below are what the model calls: the kernel for CUDA tensors
when triton imports, else the `_ref` (`set_backend` / ATTAMBA_KERNELS force either;
kernels/_triton.py). The prefill op is PyTorch on every device (blocks of queries through
scaled_dot_product_attention), with its naive `_ref` of the same signature.

  ssm_step           K/V SSM update, in place on the conv and SSM slot pools
  store_kv           K/V into the boundary blocks or the window ring (decode and prefill)
  decode_attention   one query per row over paged boundary entries plus the window ring
  prefill_attention  prefill chunks over paged boundary entries, the window ring and the chunk
"""
from ._triton import backend, get_backend, set_backend
from .decode_attention import decode_attention, decode_attention_ref, decode_attention_triton
from .prefill_attention import prefill_attention, prefill_attention_ref
from .ssm_step import ssm_step, ssm_step_ref, ssm_step_triton
from .store_kv import store_kv, store_kv_ref, store_kv_triton

__all__ = ["backend", "decode_attention", "decode_attention_ref", "decode_attention_triton", "get_backend",
           "prefill_attention", "prefill_attention_ref", "set_backend", "ssm_step", "ssm_step_ref", "ssm_step_triton",
           "store_kv", "store_kv_ref", "store_kv_triton"]
