"""Model configuration: one frozen dataclass for Attamba and its baselines, stored as config.json."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

KINDS = ("attamba", "pseudo", "transformer", "sliding", "reduced")
KV_SKIPS = ("input", "proj")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # Hugging Face's file, read when config.json has no chat_template


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and attention pattern of one model.

    kind:
      attamba     SSM keys/values, attention to chunk boundaries plus a window of L+1 tokens
      pseudo      SSM keys/values with full causal attention (the paper's upper bound)
      transformer Llama layout, Wk/Wv, full causal attention
      sliding     Llama layout, attention to the last `sliding_window` tokens only
      reduced     Llama layout with attention width d/P (heads of `reduced_head_dim`)

    kv_skip (SSM kinds): the residual added to the SSM output to form k and v:
      input  k = SSM_k(u) + u, v = SSM_v(u) + u (the paper's form; one K/V head per query head)
      proj   k = Wk u + SSM_k(u), v = Wv u + SSM_v(u) with the SSMs projecting to kv_dim
             (a pretrained transformer's Wk, Wv kept as the skip, grouped-query heads allowed)
    base_model: the checkpoint (directory or named model) whose weights this one's file omits;
      loading takes every tensor the file lacks from it (a delta over a teacher).
    """

    kind: str = "attamba"
    vocab_size: int = 8192
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 0  # grouped-query attention: key/value heads; 0 means one per query head
    chunk_size: int = 8  # P
    window: int = 8  # L: a query sees its own position and the L before it
    ssm_state: int = 128  # N
    ssm_inner: int = 256  # E
    ssm_heads: int = 8  # h
    conv_width: int = 4
    ffn_hidden: int = 0  # 0: 256 * ceil((2/3 * 4d) / 256)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 1024  # training length
    context_length: int = 0  # longest context a pretrained model supports; 0: not stated
    sliding_window: int = 0  # W_len for kind "sliding"
    reduced_head_dim: int = 16
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    chat_template: str = ""  # str.format template of one message, or a Jinja2 template ("{%")
    tie_embeddings: bool = False  # the output head shares the embedding matrix
    kv_skip: str = "input"  # SSM kinds: "input" (k = SSM(u) + u) or "proj" (k = Wk u + SSM(u))
    base_model: str = ""  # the checkpoint this one is a delta over ("" = self-contained)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.chunk_size < 1 or self.window < 0:
            raise ValueError("chunk_size must be >= 1 and window >= 0")
        if self.kv_skip not in KV_SKIPS:
            raise ValueError(f"kv_skip must be one of {KV_SKIPS}, got {self.kv_skip!r}")
        if self.kv_skip == "proj" and not self.has_ssm:
            raise ValueError(f"kv_skip 'proj' needs an SSM kind (attamba, pseudo), got {self.kind!r}")
        if self.has_ssm:
            if self.kv_skip == "input" and self.n_heads * self.head_dim != self.d_model:
                raise ValueError("SSM keys need n_heads * head_dim == d_model")
            if self.ssm_inner % self.ssm_heads:
                raise ValueError("ssm_inner must be divisible by ssm_heads")
            if self.conv_width < 2:
                raise ValueError("conv_width must be >= 2")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")
        if self.kind == "sliding" and self.sliding_window < 1:
            raise ValueError("kind 'sliding' needs sliding_window >= 1")
        if self.kind == "reduced" and self.attn_dim % self.reduced_head_dim:
            raise ValueError("d_model / chunk_size must be a multiple of reduced_head_dim")
        if self.n_kv_heads < 0 or self.num_attn_heads % self.num_kv_heads:
            raise ValueError(f"n_kv_heads must divide the {self.num_attn_heads} attention heads, got {self.n_kv_heads}")
        if self.has_ssm and self.kv_skip == "input" and self.num_kv_heads != self.num_attn_heads:
            raise ValueError(f"SSM keys/values with kv_skip 'input' have one head per query head: n_kv_heads must be 0 "
                             f"for kind {self.kind} (or use kv_skip 'proj')")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def has_ssm(self) -> bool:
        return self.kind in ("attamba", "pseudo")

    @property
    def has_kv_proj(self) -> bool:
        """Whether the model has Wk, Wv (every kind but the SSM kinds with kv_skip "input")."""
        return not self.has_ssm or self.kv_skip == "proj"

    @property
    def attn_dim(self) -> int:
        """Width of q, k and v (H * D)."""
        return self.d_model // self.chunk_size if self.kind == "reduced" else self.d_model

    @property
    def head_dim(self) -> int:
        return self.reduced_head_dim if self.kind == "reduced" else self.d_model // self.n_heads

    @property
    def num_attn_heads(self) -> int:
        return self.attn_dim // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads (fewer than the query heads with grouped-query attention)."""
        return self.n_kv_heads or self.num_attn_heads

    @property
    def kv_dim(self) -> int:
        """Width of k and v (num_kv_heads * D): what the cache stores per token and layer."""
        return self.num_kv_heads * self.head_dim

    @property
    def default_max_model_len(self) -> int:
        """The engine's max_model_len unless set: the stated context, else 8x the training length."""
        return self.context_length or 8 * self.max_seq_len

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return 256 * math.ceil((2 / 3 * 4 * self.d_model) / 256)

    @property
    def conv_channels(self) -> int:
        """Channels of the SSM's causal conv: [xs | B | C]."""
        return self.ssm_inner + 2 * self.ssm_state

    def layer_offset(self, layer: int) -> int:
        """o_l = min(P - 1, l * floor(P / n_layers)): where layer l cuts its chunks."""
        return min(self.chunk_size - 1, layer * (self.chunk_size // self.n_layers))

    # ---- (de)serialisation ---------------------------------------------------------------
    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"model_type", "architectures"})
        if unknown:
            raise ValueError(f"unknown config fields: {unknown}")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        data = json.loads(path.read_text())
        template = path.parent / CHAT_TEMPLATE_FILE
        if not data.get("chat_template") and template.is_file():
            data["chat_template"] = template.read_text(encoding="utf-8")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
