"""GGUF Llama models, read and written with the `gguf` package; one tensor-name map and one rotary
permutation serve both directions.

llama.cpp's converter permutes the rows of Wq and Wk so that each head's two rotary halves are
interleaved (its RoPE rotates adjacent pairs; ours rotates halves, as Hugging Face's Llama does).
- read: `convert_gguf(path, out)` dequantizes every tensor to fp32, undoes the permutation and writes
  config.json (kind "transformer", grouped-query heads, tied embeddings, the chat template),
  model.safetensors and tokenizer.json, built with `tokenizers` from the file's vocabulary, merges,
  pre-tokenizer and special tokens. `attamba convert-gguf PATH --out DIR` runs it.
- write: `write_gguf(source, path, dtype="f16")` writes a transformer-kind model (a ModelConfig with
  random weights, an LM, or a checkpoint directory) as llama.cpp reads it: its tensor names and
  metadata, Wq / Wk permuted, and a tokenizer (a minimal byte-level BPE one, or via `vocab_from` the
  tokenizer of an existing GGUF or of a byte-level BPE `tokenizer.json`, e.g. the checkpoint's own).
  A GGUF's context_length is the model's max_seq_len unless given; llama.cpp only warns when asked for
  more (RoPE is unscaled), but llama-server caps its slots to it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tokenizers
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, decoders, pre_tokenizers

from .config import ModelConfig
from .lm import LM, build_model
from .loading import WEIGHTS, load_model, tied_weights

if TYPE_CHECKING:
    from gguf import GGUFReader, GGUFWriter

# our parameter names -> llama.cpp's; layer tensors under blocks.N. and blk.N.
GLOBAL_TENSORS = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                  "head.weight": "output.weight"}
LAYER_TENSORS = {
    "attn_norm": "attn_norm", "attn.wq": "attn_q", "attn.wk": "attn_k", "attn.wv": "attn_v", "attn.wo": "attn_output",
    "ffn_norm": "ffn_norm", "ffn.w1": "ffn_gate", "ffn.w3": "ffn_up", "ffn.w2": "ffn_down",
}
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # llama.cpp token types
GGUF_TYPES = ("f32", "f16")


def gguf_name(name: str) -> str:
    """llama.cpp's name of one of our parameters."""
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{LAYER_TENSORS[rest.removesuffix('.weight')]}.weight"


def our_name(gguf: str) -> str:
    """Our name of one of llama.cpp's tensors; a ValueError for a tensor a Llama has not."""
    ours = {v: k for k, v in GLOBAL_TENSORS.items()}
    if gguf in ours:
        return ours[gguf]
    layer_ours = {v: k for k, v in LAYER_TENSORS.items()}
    parts = gguf.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in layer_ours or parts[3] != "weight":
        raise ValueError(f"unexpected GGUF tensor {gguf}")
    return f"blocks.{parts[1]}.{layer_ours[parts[2]]}.weight"


def permute_rotary(w: torch.Tensor, n_heads: int, inverse: bool = False) -> torch.Tensor:
    """Wq / Wk rows in llama.cpp's order (its converter's `permute`): per head, rows (half, i) -> (i, half);
    inverse=True goes back. n_heads: the query heads for Wq, the KV heads for Wk."""
    out, d_in = w.shape
    pairs = out // n_heads // 2
    return w.reshape(n_heads, *((pairs, 2) if inverse else (2, pairs)), d_in).transpose(1, 2).reshape(out, d_in)


def _rotary_heads(name: str, cfg: ModelConfig) -> int | None:
    """How many heads permute_rotary splits this parameter into (None: not Wq / Wk)."""
    if name.endswith("attn.wq.weight"):
        return cfg.num_attn_heads
    if name.endswith("attn.wk.weight"):
        return cfg.num_kv_heads
    return None


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


def gguf_state_dict(reader: GGUFReader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32 under our names, Wq / Wk rows in Hugging Face's order (shapes checked)."""
    from gguf.quants import dequantize

    state = {}
    for t in reader.tensors:
        name = our_name(t.name)
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        if heads := _rotary_heads(name, cfg):
            w = permute_rotary(w, heads, inverse=True)
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


# ---- write ------------------------------------------------------------------------------------------------
def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _minimal_vocab(writer: GGUFWriter, vocab_size: int) -> None:
    """A byte-level BPE vocabulary of `vocab_size` tokens: the 256 bytes, <|endoftext|> (BOS/EOS), then pairs."""
    if vocab_size < 257:
        raise ValueError(f"a GGUF vocabulary needs at least 257 tokens, the model has {vocab_size}")
    chars = _byte_chars()
    pairs = [(a, b) for a in chars for b in chars][: vocab_size - 257]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(chars + ["<|endoftext|>"] + [a + b for a, b in pairs])
    writer.add_token_types([NORMAL] * 256 + [CONTROL] + [NORMAL] * len(pairs))
    writer.add_token_merges([f"{a} {b}" for a, b in pairs] or [f"{chars[0]} {chars[1]}"])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(256)
    writer.add_add_bos_token(False)


def _copy_vocab(writer: GGUFWriter, gguf_path: str | Path, vocab_size: int) -> None:
    """Every tokenizer.* field of another GGUF (whose vocabulary must have `vocab_size` tokens)."""
    from gguf import GGUFValueType

    reader = read_gguf(gguf_path)
    n = len(reader.fields["tokenizer.ggml.tokens"].contents())
    if n != vocab_size:
        raise ValueError(f"{gguf_path} has {n} tokens, the model's vocabulary has {vocab_size}")
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            array = field.types[0] == GGUFValueType.ARRAY
            writer.add_key_value(key, field.contents(), field.types[0], field.types[-1] if array else None)


def _vocab_from_tokenizer_json(writer: GGUFWriter, path: str | Path, vocab_size: int,
                               eos_token_id: int | None) -> None:
    """The vocabulary of a Hugging Face byte-level BPE tokenizer.json (GPT-2 style, as ours), its special tokens
    as control tokens and `eos_token_id` as BOS and EOS (no BOS added)."""
    spec = json.loads(Path(path).read_text())
    model = spec["model"]
    if model.get("type") != "BPE" or (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{path}: only byte-level BPE tokenizers convert to a GGUF vocabulary")
    vocab = model["vocab"]
    if len(vocab) != vocab_size or sorted(vocab.values()) != list(range(vocab_size)):
        raise ValueError(f"{path} has {len(vocab)} tokens, the model's vocabulary has {vocab_size}")
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex, which the ByteLevel pre-tokenizer uses
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL if i in special else NORMAL for i in range(vocab_size)])
    # tokenizers writes merges as "a b" (older files) or ["a", "b"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    eos = eos_token_id if eos_token_id is not None else min(special, default=0)
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)


def _source_model(source: ModelConfig | LM | str | Path) -> LM:
    if isinstance(source, ModelConfig):
        return build_model(source, seed=0)
    if isinstance(source, LM):
        return source
    return load_model(source)


@torch.no_grad()
def write_gguf(source: ModelConfig | LM | str | Path, path: str | Path, dtype: str = "f16",
               vocab_from: str | Path | None = None, context_length: int | None = None) -> Path:
    """Write a llama-architecture GGUF of a transformer-kind model; returns `path`.

    source: a ModelConfig (random weights, seed 0), an LM, or a checkpoint directory.
    dtype: "f16" or "f32" for the matrices and the embedding (norm weights stay f32, as llama.cpp's converter does).
    vocab_from: copy the tokenizer of this GGUF, or convert this byte-level BPE tokenizer.json (same vocabulary
    size); default, a minimal byte-level BPE tokenizer that llama.cpp loads (for benchmarks fed token ids).
    context_length: the training context llama.cpp reads (it caps a server slot's context to it); default, the
    model's max_seq_len.
    """
    from gguf import GGUFWriter, LlamaFileType

    if dtype not in GGUF_TYPES:
        raise ValueError(f"dtype must be one of {GGUF_TYPES}, got {dtype!r}")
    model = _source_model(source)
    cfg = model.config
    if cfg.kind != "transformer":
        raise ValueError(f"only transformer-kind models export to a llama GGUF, this one is {cfg.kind!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, "llama")
    writer.add_name(f"attamba-serve transformer d{cfg.d_model} x{cfg.n_layers}")
    writer.add_file_type(LlamaFileType.MOSTLY_F16 if dtype == "f16" else LlamaFileType.ALL_F32)
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(context_length or cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if vocab_from is None:
        _minimal_vocab(writer, cfg.vocab_size)
    elif str(vocab_from).endswith(".json"):
        _vocab_from_tokenizer_json(writer, vocab_from, cfg.vocab_size, cfg.eos_token_id)
    else:
        _copy_vocab(writer, vocab_from, cfg.vocab_size)
    np_dtype = np.float16 if dtype == "f16" else np.float32
    for name, w in model.state_dict().items():
        if cfg.tie_embeddings and name == "head.weight":
            continue  # llama.cpp ties the output to token_embd when output.weight is absent
        w = w.float()
        if heads := _rotary_heads(name, cfg):
            w = permute_rotary(w, heads)
        writer.add_tensor(gguf_name(name), w.numpy().astype(np.float32 if w.dim() == 1 else np_dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- command line -----------------------------------------------------------------------------------------
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
