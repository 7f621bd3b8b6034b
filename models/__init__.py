"""Attamba and its baseline language models."""
from .config import ModelConfig
from .lm import LM, LayerSSMState, build_model
from .loading import CheckpointError, load_model, save_checkpoint
from .state import DecodeState, decode_step, full_kv_bytes, prefill, state_bytes

__all__ = [
    "CheckpointError", "DecodeState", "LM", "LayerSSMState", "ModelConfig", "build_model", "decode_step",
    "full_kv_bytes", "load_model", "prefill", "save_checkpoint", "state_bytes",
]
