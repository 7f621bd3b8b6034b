"""The decode step's fused ops. Each has a PyTorch `_ref` (the reference and the CPU path) with
the exact signature of its Triton kernel; the names below are what the model calls.

  ssm_step          K/V SSM update, in place on the conv and SSM slot pools
  store_kv          this step's K/V into the boundary blocks or the window ring
  decode_attention  one query per row over paged boundary entries plus the window ring
"""
from .decode_attention import decode_attention_ref
from .ssm_step import ssm_step_ref
from .store_kv import store_kv_ref

# The PyTorch references serve every device until Triton kernels are registered for CUDA.
ssm_step = ssm_step_ref
store_kv = store_kv_ref
decode_attention = decode_attention_ref

__all__ = ["decode_attention", "decode_attention_ref", "ssm_step", "ssm_step_ref", "store_kv", "store_kv_ref"]
