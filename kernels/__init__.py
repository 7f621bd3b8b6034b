"""The decode step's fused ops. Each has a PyTorch `_ref` (the reference and the CPU path) and a
Triton kernel with the exact same signature (`_triton`, a wrapper that checks shapes and dtypes);
the names below are what the model calls: the kernel for CUDA tensors when triton imports, else
the `_ref` (`set_backend` / ATTAMBA_KERNELS force either; kernels/_triton.py).

  ssm_step          K/V SSM update, in place on the conv and SSM slot pools
  store_kv          this step's K/V into the boundary blocks or the window ring
  decode_attention  one query per row over paged boundary entries plus the window ring
"""
from ._triton import backend, get_backend, set_backend
from .decode_attention import decode_attention, decode_attention_ref, decode_attention_triton
from .ssm_step import ssm_step, ssm_step_ref, ssm_step_triton
from .store_kv import store_kv, store_kv_ref, store_kv_triton

__all__ = ["backend", "decode_attention", "decode_attention_ref", "decode_attention_triton", "get_backend",
           "set_backend", "ssm_step", "ssm_step_ref", "ssm_step_triton", "store_kv", "store_kv_ref", "store_kv_triton"]
