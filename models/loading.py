"""Checkpoint directories: config.json + model.safetensors + tokenizer.json.

A checkpoint whose config names a `base_model` stores only what differs from it (e.g. an uptrained
student's SSMs); loading takes every other tensor from the base checkpoint. A checkpoint may also hold
low-rank adapters (`<name>.lora_a` [r, in], `<name>.lora_b` [out, r]): they are merged into
`<name>.weight` (W + B A) at load, so the loaded model is a plain model of its kind.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .lm import LM

WEIGHTS = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "model.pth", "model.bin")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded."""


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               **overrides) -> LM:
    """Load a checkpoint directory (safetensors only; pickled weights are rejected).

    overrides replace config fields that do not change the weights (e.g. chunk_size for attamba).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no config.json)")
    weights = path / WEIGHTS
    if not weights.is_file():
        if any((path / name).exists() for name in PICKLE_NAMES):
            raise CheckpointError(f"{path}: pickled weights are not loaded for safety; convert them to {WEIGHTS}")
        raise CheckpointError(f"{path}: missing {WEIGHTS}")
    cfg = ModelConfig.load(path).replace(**overrides)
    model = LM(cfg)  # default init is overwritten below (assign=True); the meta device costs seconds to import
    tensors = load_file(str(weights), device=str(device))
    if cfg.base_model:
        tensors = {**_base_tensors(path, cfg, device), **tensors}
    tensors = merge_adapters(tensors, path)
    expected = set(model.state_dict()) - tied_weights(cfg)
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match config (missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    else:
        tensors = {k: v.float() for k, v in tensors.items()}
    model.load_state_dict(tensors, assign=True, strict=False)  # the names were checked above
    if cfg.tie_embeddings:
        model.tie_weights()  # assign=True replaced the embedding's Parameter: tie it again
    return model.eval()


def merge_adapters(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Every `<name>.lora_a` / `<name>.lora_b` pair folded into `<name>.weight` (computed in fp32)."""
    out = dict(tensors)
    for a_name in [k for k in tensors if k.endswith(".lora_a")]:
        stem = a_name.removesuffix(".lora_a")
        a, b, w = out.pop(a_name), out.pop(stem + ".lora_b", None), out.get(stem + ".weight")
        if b is None or w is None or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != w.shape:
            raise CheckpointError(f"{path}: adapter {stem} does not fit its weight")
        out[stem + ".weight"] = (w.float() + b.float() @ a.float()).to(w.dtype)
    if stray := [k for k in out if k.endswith(".lora_b")]:
        raise CheckpointError(f"{path}: adapter factors without their pair: {stray[:3]}")
    return out


_BASE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "num_kv_heads", "head_dim", "ffn_dim", "tie_embeddings")


def _base_tensors(path: Path, cfg: ModelConfig, device: str | torch.device) -> dict[str, torch.Tensor]:
    """The tensors of cfg.base_model (a named model or a directory, relative to `path`)."""
    from .registry import NAMED_MODELS, resolve_model

    base = cfg.base_model if cfg.base_model in NAMED_MODELS else path / cfg.base_model
    try:
        base_dir = resolve_model(base)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: base model {cfg.base_model!r} unavailable: {exc}") from exc
    base_cfg = ModelConfig.load(base_dir)
    differ = [f for f in _BASE_FIELDS if getattr(base_cfg, f) != getattr(cfg, f)]
    if differ or base_cfg.base_model:
        raise CheckpointError(f"{path}: base model {base_dir} does not fit (differs in {differ or ['base_model']})")
    if not (base_dir / WEIGHTS).is_file():
        raise CheckpointError(f"{base_dir}: missing {WEIGHTS}")
    return load_file(str(base_dir / WEIGHTS), device=str(device))


def tied_weights(cfg: ModelConfig) -> set[str]:
    """State-dict names that alias another tensor and are not stored in a checkpoint."""
    return {"head.weight"} if cfg.tie_embeddings else set()


def save_checkpoint(model: LM, path: str | Path, tokenizer_file: str | Path | None = None,
                    dtype: torch.dtype | None = None, only: set[str] | None = None,
                    extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json, model.safetensors (optionally cast, e.g. to bf16) and tokenizer.json.

    only: the state-dict names to store (a delta over the config's base_model); default all.
    extra: more tensors to store beside them (e.g. adapter factors, merged at load).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save(path / "config.json")
    state = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in model.state_dict().items()
             if k not in tied_weights(model.config) and (only is None or k in only)}
    state.update({k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in (extra or {}).items()})
    save_file(state, str(path / WEIGHTS), metadata={"format": "pt"})
    if tokenizer_file is not None and Path(tokenizer_file).resolve() != (path / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer_file, path / "tokenizer.json")
