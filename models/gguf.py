"""GGUF Llama models (e.g. SmolLM2 as llama.cpp ships it) to our checkpoint layout.

`convert_gguf(path, out)` reads the file with the `gguf` package, dequantizes every tensor to fp32,
undoes the row permutation llama.cpp's converter applies to Wq and Wk (it interleaves the two
rotary halves of each head; our RoPE rotates halves, as Hugging Face's Llama does), and writes
config.json (kind "transformer", grouped-query heads, tied embeddings, the chat template),
model.safetensors and tokenizer.json, built with `tokenizers` from the file's vocabulary, merges,
pre-tokenizer and special tokens. `attamba convert-gguf PATH --out DIR` runs it.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tokenizers
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, decoders, pre_tokenizers

from .config import ModelConfig
from .lm import LM
from .loading import WEIGHTS, tied_weights

if TYPE_CHECKING:
    from gguf import GGUFReader

GLOBAL_TENSORS = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight", "output.weight": "head.weight"}
LAYER_TENSORS = {
    "attn_norm": "attn_norm", "attn_q": "attn.wq", "attn_k": "attn.wk", "attn_v": "attn.wv", "attn_output": "attn.wo",
    "ffn_norm": "ffn_norm", "ffn_gate": "ffn.w1", "ffn_up": "ffn.w3", "ffn_down": "ffn.w2",
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_level(add_prefix_space: bool) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)


def _smollm(add_prefix_space: bool) -> pre_tokenizers.PreTokenizer:
    """SmolLM's tokenizer.json: every digit on its own, then GPT-2's byte-level split."""
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level(add_prefix_space)])


# tokenizer.ggml.pre (llama.cpp's name of the pre-tokenizer) -> the same split in `tokenizers`
PRE_TOKENIZERS = {"smollm": _smollm, "gpt-2": _byte_level}


def read_gguf(path: str | Path) -> GGUFReader:
    """Open a GGUF file (memory-mapped); errors name the file."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise RuntimeError("reading GGUF needs the gguf package: pip install 'attamba-serve[smollm2]'") from exc
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path)
    except ValueError as exc:
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc


def _field(reader: GGUFReader, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"GGUF metadata lacks {key}")
        return default
    return field.contents()


def gguf_config(reader: GGUFReader) -> ModelConfig:
    """Our config of a llama-architecture GGUF."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only GGUF architecture 'llama' converts, this file is {arch!r}")
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"RoPE scaling {scaling!r} is not supported")
    d, heads = _field(reader, "llama.embedding_length"), _field(reader, "llama.attention.head_count")
    if _field(reader, "llama.rope.dimension_count", d // heads) != d // heads:
        raise ValueError("only RoPE over the whole head (rope.dimension_count == head dim) is supported")
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        kind="transformer",
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
        d_model=d,
        n_layers=_field(reader, "llama.block_count"),
        n_heads=heads,
        n_kv_heads=_field(reader, "llama.attention.head_count_kv", heads),
        ffn_hidden=_field(reader, "llama.feed_forward_length"),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        max_seq_len=_field(reader, "llama.context_length"),
        context_length=_field(reader, "llama.context_length"),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", None),
        chat_template=_field(reader, "tokenizer.chat_template", ""),
        tie_embeddings="output.weight" not in names,
    )


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert llama.cpp's `permute` of Wq / Wk rows: per head, rows (i, half) -> (half, i)."""
    out, d_in = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(out, d_in)


def gguf_state_dict(reader: GGUFReader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32 under our names, Wq / Wk rows in Hugging Face's order (shapes checked)."""
    from gguf.quants import dequantize

    state = {}
    for t in reader.tensors:
        if t.name in GLOBAL_TENSORS:
            name = GLOBAL_TENSORS[t.name]
        else:
            parts = t.name.split(".")
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in LAYER_TENSORS or parts[3] != "weight":
                raise ValueError(f"unexpected GGUF tensor {t.name}")
            name = f"blocks.{parts[1]}.{LAYER_TENSORS[parts[2]]}.weight"
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        if name.endswith("attn.wq.weight"):
            w = unpermute_rotary(w, cfg.n_heads)
        elif name.endswith("attn.wk.weight"):
            w = unpermute_rotary(w, cfg.num_kv_heads)
        state[name] = w.contiguous()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LM(cfg).state_dict().items() if k not in tied_weights(cfg)}
    wrong = sorted(set(shapes) ^ set(state)) or sorted(k for k in shapes if state[k].shape != shapes[k])
    if wrong:
        raise ValueError(f"GGUF tensors do not match a {cfg.n_layers}-layer Llama: {wrong[:5]}")
    return state


def gguf_tokenizer(reader: GGUFReader) -> tokenizers.Tokenizer:
    """The byte-level BPE tokenizer a GGUF describes, its control tokens as special added tokens."""
    model = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "gpt-2")
    if model != "gpt2":
        raise ValueError(f"only byte-level BPE ('gpt2') GGUF tokenizers convert, this file has {model!r}")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(PRE_TOKENIZERS)})")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [])
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre](bool(_field(reader, "tokenizer.ggml.add_space_prefix", False)))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    return tok


def convert_gguf(path: str | Path, out: str | Path) -> ModelConfig:
    """Write the checkpoint directory `out` (created) from the GGUF at `path`; returns its config."""
    reader = read_gguf(path)
    cfg = gguf_config(reader)
    state = gguf_state_dict(reader, cfg)
    tok = gguf_tokenizer(reader)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    cfg.save(out / "config.json")  # last: a directory with config.json is complete
    return cfg


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a GGUF file of a Llama-architecture model")
    parser.add_argument("--out", required=True, help="checkpoint directory to create (must not exist or be empty)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory")
    cfg = convert_gguf(args.path, out)
    print(f"{out}: {cfg.n_layers} layers, d {cfg.d_model}, {cfg.n_heads} heads ({cfg.num_kv_heads} KV), "
          f"vocabulary {cfg.vocab_size}")
    return 0
