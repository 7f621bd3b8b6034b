"""`attamba uptrain`: a pretrained transformer turned into Attamba by distillation (docs/uptrain.md).

The student keeps every teacher weight (embeddings, norms, Wq, Wk, Wv, Wo, FFN) and adds a K- and
a V-SSM per layer whose outputs add to Wk u and Wv u (kv_skip "proj"). Their output projections
start at zero, so the student starts as the teacher restricted to the Attamba pattern.
  stage 1  attention transfer, layer-local: on the teacher's own (detached) hidden states, each
           layer's SSMs learn to make its attention output under the Attamba pattern match the
           teacher's full-causal one (MSE normalised by the target's mean square)
  stage 2  end-to-end distillation: KL to the teacher's logits plus ce_weight x cross-entropy, on a
           mixture of text, chats and recall tasks (training/mixture.py) whose answer tokens
           weigh more; low-rank adapters (training/lora.py) join the SSMs on the projections
           named by lora_targets, at their own learning rate
Only the SSMs (and in stage 2 the adapters) train; init_from starts the SSMs from an earlier
student (e.g. one trained with another window). The run directory holds train_state.pt (SSM weights, optimizer, stage, step,
RNG; a later run with --resume auto continues from it), log.jsonl, and after each stage (or when
--max-minutes stops it) the exported student: a delta checkpoint of the SSM tensors (bf16) whose
config names the teacher as base_model, the adapter factors (merged into the weights at load), plus
the teacher's tokenizer.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from models.attention import block_attention
from models.config import ModelConfig
from models.lm import LM
from models.loading import load_model, save_checkpoint
from models.registry import NAMED_MODELS, resolve_model
from models.tokenizer import Tokenizer

from engine.settings import add_flags, check_fields, from_args, read_json, setting
from server.chat import load_chat_template

from .corpus import SOURCES, summaries, training_ids
from .data import batches
from .entry_readout import READOUT_TARGETS, EntryReadout, entry_kv, forward_with_kv
from .lora import add_lora, load_lora_factors, lora_factors, parse_targets
from .loop import Loop, RunDir, WarmupCosine, restore_rngs
from .mixture import Mixture, MixtureConfig
from .run_flags import RunFlags
from .teacher_chats import teacher_chats

STAGES = (1, 2)
# a resumed run may change these: the schedule's length, the machine's side, and the stage-2 data mixture
RESCHEDULABLE = ("stage1_steps", "stage2_steps", "ckpt_interval", "threads", "init_from", "chat_frac", "recall_frac",
                 "recall_weight", "recall_target", "chunk_sizes", "teacher_chats")
RECALL_TARGETS = ("teacher", "corrected")


def comma_items(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated setting."""
    return [item.strip() for item in text.split(",") if item.strip()]


@dataclass(frozen=True)
class UptrainConfig:
    """Everything a run depends on (also a JSON file for --config; flags override it)."""

    teacher: str = setting("smollm2-135m", "named model or checkpoint directory of a transformer")
    chunk_size: int = setting(8, "the student's chunk size P")
    chunk_sizes: str = setting("", "comma-separated chunk sizes, one drawn at random for every stage-2 step (one "
                               "checkpoint for several P); empty: chunk_size only")
    window: int = setting(8, "the student's window L")
    ssm_state: int = setting(16, "SSM state size N")
    ssm_inner: int = setting(64, "SSM inner width E")
    ssm_heads: int = setting(4, "SSM heads h")
    conv_width: int = setting(4, "the SSMs' causal conv width (an entry holds the last conv_width tokens of its chunk "
                              "sharply: training/entry_capacity.py)")
    seq_len: int = setting(256, "tokens per training row")
    batch_size: int = setting(4, "rows per step")
    stage1_steps: int = setting(200, "attention-transfer steps")
    stage2_steps: int = setting(100, "distillation steps")
    lr1: float = setting(3e-3, "stage-1 peak learning rate")
    lr2: float = setting(1e-3, "stage-2 peak learning rate of the SSMs")
    warmup_steps: int = setting(10, "linear warmup steps of each stage")
    ce_weight: float = setting(0.1, "stage-2 loss = KL(teacher || student) + ce_weight x cross-entropy")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    grad_clip: float = setting(1.0, "gradient norm clip")
    ckpt_interval: int = setting(25, "steps between saved states")
    threads: int = setting(1, "torch CPU threads")
    seed: int = setting(0, "seed of the new weights and the data order")
    corpus: str = setting("wikitext2", f"comma-separated training sources among {', '.join(SOURCES)}")
    train_text: str | None = setting(None, "a UTF-8 text file to train on instead of the corpus", metavar="FILE")
    init_from: str | None = setting(None, "a student checkpoint whose SSM weights start this run", metavar="DIR")
    lora_rank: int = setting(0, "rank of the stage-2 low-rank adapters (0: none)")
    lora_alpha: float = setting(16.0, "adapter scale numerator (the update is alpha / rank x B A)")
    lora_targets: str = setting("wq,wo", "comma-separated projections that get adapters (wq wk wv wo w1 w2 w3)")
    lr_lora: float = setting(2e-4, "stage-2 peak learning rate of the adapters")
    chat_frac: float = setting(0.0, "stage-2 rows that are packed chats (needs the wiki-summaries source)")
    teacher_chats: bool = setting(False, "half the chats are the teacher's own answers to training/teacher_chats.py's "
                                  "questions (generated once, cached)")
    recall_frac: float = setting(0.0, "stage-2 rows that are recall tasks")
    recall_weight: float = setting(10.0, "loss weight of a recall answer's tokens")
    recall_target: str = setting("teacher", "a recall answer's target: the teacher's distribution, or 'corrected': "
                                 "the stated value wherever the teacher's argmax misses it", choices=RECALL_TARGETS)
    autocast: bool = setting(False, "bf16 autocast for teacher and student (CPU with native bf16)")
    readout_weight: float = setting(0.0, "weight of the entry read-out loss in both stages (training/entry_readout.py: each "
                                    "cached chunk entry must give back what its chunk held); 0: off")
    readout_target: str = setting("kv", "what the read-out gives back: the teacher's K and V at the chunk's "
                                  "positions, or the tokens' embeddings there", choices=READOUT_TARGETS)

    def __post_init__(self) -> None:
        positive = ("chunk_size", "ssm_state", "ssm_inner", "ssm_heads", "seq_len", "batch_size", "ckpt_interval",
                    "threads")
        bad = [n for n in positive if getattr(self, n) < 1]
        bad += [n for n in ("window", "stage1_steps", "stage2_steps", "warmup_steps", "ce_weight", "weight_decay",
                            "lora_rank", "chat_frac", "recall_frac", "readout_weight") if getattr(self, n) < 0]
        bad += [n for n in ("lr1", "lr2", "grad_clip", "lr_lora", "lora_alpha", "recall_weight")
                if getattr(self, n) <= 0]
        if self.conv_width < 2:
            bad.append("conv_width (at least 2)")
        if self.chat_frac + self.recall_frac > 1:
            bad.append("chat_frac + recall_frac")
        if self.recall_target not in RECALL_TARGETS:
            bad.append("recall_target")
        if self.readout_target not in READOUT_TARGETS:
            bad.append("readout_target")
        sizes = comma_items(self.chunk_sizes)
        if sizes and not (all(p.isdigit() and int(p) > 0 for p in sizes) and self.chunk_size in map(int, sizes)):
            bad.append("chunk_sizes (positive integers, chunk_size among them)")
        if bad:
            raise ValueError(f"uptrain config: invalid values for {bad}")
        unknown = [name for name in self.sources if name not in SOURCES]
        if unknown or not self.sources:
            raise ValueError(f"uptrain config: corpus sources must be among {', '.join(SOURCES)}, got {self.corpus!r}")
        parse_targets(self.lora_targets)

    @property
    def random_chunk_sizes(self) -> tuple[int, ...]:
        return tuple(map(int, comma_items(self.chunk_sizes)))

    @property
    def sources(self) -> list[str]:
        return comma_items(self.corpus)


def student_config(teacher: ModelConfig, uc: UptrainConfig, base_model: str) -> ModelConfig:
    """The Attamba student of a transformer teacher (same dims, kv_skip "proj", delta over base_model)."""
    if teacher.kind != "transformer":
        raise ValueError(f"the teacher must be a full-attention transformer, got kind {teacher.kind!r}")
    return teacher.replace(kind="attamba", chunk_size=uc.chunk_size, window=uc.window, ssm_state=uc.ssm_state,
                           ssm_inner=uc.ssm_inner, ssm_heads=uc.ssm_heads, conv_width=uc.conv_width, kv_skip="proj",
                           base_model=base_model)


def build_student(teacher: LM, cfg: ModelConfig, seed: int) -> LM:
    """Teacher weights everywhere, fresh SSMs with zero output projections; only the SSMs train."""
    torch.manual_seed(seed)
    student = LM(cfg)
    for blk in student.blocks:
        for ssm in (blk.attn.ssm_k, blk.attn.ssm_v):
            ssm.reset_parameters()
            torch.nn.init.zeros_(ssm.out_proj.weight)
    missing, _ = student.load_state_dict(teacher.state_dict(), strict=False)
    if any(not is_trainable(name) for name in missing):
        raise ValueError(f"teacher lacks student weights: {[n for n in missing if not is_trainable(n)][:3]}")
    for name, p in student.named_parameters():
        p.requires_grad_(is_trainable(name))
    return student


def is_ssm(name: str) -> bool:
    """Whether a student state-dict entry is one of the new SSMs (stored as they are in the delta)."""
    return ".attn.ssm_k." in name or ".attn.ssm_v." in name


def is_trainable(name: str) -> bool:
    """Whether a student state-dict entry trains: a new SSM or an adapter factor."""
    return is_ssm(name) or name.endswith((".lora_a", ".lora_b"))


def widen_conv(weight: Tensor, fresh: Tensor) -> Tensor:
    """A causal conv's taps [C, W] for a wider conv whose fresh taps are `fresh` [C, W']: the newest W taps are
    `weight` (the last tap reads the current token), the older W' - W keep their fresh initialisation (taps that
    start at zero barely move: ~0.005 after 40 steps against ~0.4 for the trained ones). Other shapes as they are."""
    extra = fresh.shape[-1] - weight.shape[-1]
    if weight.dim() != 2 or extra <= 0 or weight.shape[0] != fresh.shape[0]:
        return weight
    return torch.cat([fresh[:, :extra].to(weight.dtype), weight], 1)


def trainable_state(model: LM) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if is_trainable(k)}


# ---- losses ---------------------------------------------------------------------------------------
def attention_transfer_loss(teacher: LM, student: LM, ids: Tensor, readout: EntryReadout | None = None,
                            readout_weight: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """Stage 1: mean over layers of ||attn_student - attn_teacher||^2 / ||attn_teacher||^2, every layer
    fed the teacher's own hidden state (no gradient crosses layers); returns (loss, stats: transfer). With a
    `readout`, readout_weight x its loss on the layers' entries joins (stats: readout), layer-local as well."""
    pos = torch.arange(ids.shape[1], device=ids.device)
    with torch.no_grad():
        x = teacher.embed(ids)
    total = ids.new_zeros((), dtype=torch.float32)
    s_kv, t_kv = [], []
    for t_blk, s_blk in zip(teacher.blocks, student.blocks):
        with torch.no_grad():
            u = t_blk.attn_norm(x)
            q, k, v, _ = t_blk.attn.project(u, pos, None, None)
            o_t = block_attention(q, k, v, pos, pos, torch.ones_like(pos, dtype=torch.bool), 0)
            target = t_blk.attn.wo(o_t.flatten(-2))
        _, ks, vs, _ = s_blk.attn.project(u, pos, None, None)
        out = s_blk.attn.wo(s_blk.attn.attend(q, ks, vs, pos).flatten(-2))
        total = total + (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
        if readout is not None:
            s_kv.append(entry_kv(student, ks, vs, pos))
            if readout.reads_teacher_kv:
                t_kv.append(entry_kv(teacher, k, v, pos))
        with torch.no_grad():
            x = t_blk.finish(x, o_t)
    loss = total / len(student.blocks)
    stats = {"transfer": loss.item()}
    if readout is not None:
        aux = readout.loss(student, s_kv, readout.wanted(teacher, ids, t_kv))
        stats["readout"] = aux.item()
        loss = loss + readout_weight * aux
    return loss, stats


def distillation_loss(teacher: LM, student: LM, batch: Tensor, ce_weight: float, weights: Tensor | None = None,
                      answers: Tensor | None = None, corrected: bool = False, readout: EntryReadout | None = None,
                      readout_weight: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """Stage 2 on a [B, T+1] batch: KL(teacher || student) per token + ce_weight * CE, averaged with the
    per-token weights [B, T] (default all 1); returns (loss, stats). The bool mask `answers` [B, T] marks recall
    answers, targets known to be right: with `corrected`, where the teacher's argmax there is another token, the
    teacher's distribution gives way to the target itself (KL to a one-hot target is the cross-entropy). stats
    holds kl and ce and, when the batch has answers, how many of their tokens the student's and the teacher's
    argmax get right (recall_acc, teacher_recall_acc): each row's facts are new, so this is a held-out score.
    With a `readout`, readout_weight x its loss joins (stats: readout)."""
    inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].flatten()
    w = torch.ones(targets.shape, device=batch.device) if weights is None else weights.flatten()
    w = w / w.sum()
    keep = readout is not None  # the layers' K and V only feed the read-out
    with torch.no_grad():
        t_hidden, t_kv = forward_with_kv(teacher, inputs, keep and readout.reads_teacher_kv)
        t_logp = F.log_softmax(teacher.logits(t_hidden).flatten(0, 1), -1)
    s_hidden, s_kv = forward_with_kv(student, inputs, keep)
    s_logp = F.log_softmax(student.logits(s_hidden).flatten(0, 1), -1)
    nll = F.nll_loss(s_logp, targets, reduction="none")
    per_token = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1)
    teacher_right = t_logp.argmax(-1) == targets
    if corrected and answers is not None:
        per_token = torch.where(answers.flatten() & ~teacher_right, nll, per_token)
    kl, ce = (per_token * w).sum(), (nll * w).sum()
    stats = {"kl": kl.item(), "ce": ce.item()}
    loss = kl + ce_weight * ce
    if readout is not None:
        aux = readout.loss(student, s_kv, readout.wanted(teacher, inputs, t_kv))
        stats["readout"] = aux.item()
        loss = loss + readout_weight * aux
    if answers is not None and answers.any():
        mask = answers.flatten()
        stats["recall_acc"] = (s_logp.detach().argmax(-1) == targets)[mask].float().mean().item()
        stats["teacher_recall_acc"] = teacher_right[mask].float().mean().item()
    return loss, stats


# ---- the run ------------------------------------------------------------------------------------------
def teacher_reference(teacher: str) -> str:
    """How the exported student names its base: the model name, or the directory's absolute path."""
    return teacher if teacher in NAMED_MODELS else str(Path(teacher).resolve())


class Run:
    """One resumable uptraining run in `run_dir`."""

    def __init__(self, uc: UptrainConfig, run_dir: RunDir, deadline: float = math.inf) -> None:
        self.uc, self.run_dir, self.deadline = uc, run_dir, deadline
        self.teacher_dir = resolve_model(uc.teacher)
        self.teacher = load_model(self.teacher_dir).requires_grad_(False)
        self.cfg = student_config(self.teacher.config, uc, teacher_reference(uc.teacher))
        if uc.seq_len > self.cfg.max_seq_len:
            raise ValueError(f"seq_len {uc.seq_len} exceeds the teacher's max_seq_len {self.cfg.max_seq_len}")
        self.student = build_student(self.teacher, self.cfg, uc.seed)
        self.init_lora: dict[str, Tensor] = {}
        if uc.init_from:
            self._init_ssms(Path(uc.init_from))
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.lora_params: list[torch.nn.Parameter] = []
        self.readout = (EntryReadout(self.cfg.n_layers, self.cfg.kv_dim, max(uc.random_chunk_sizes or (uc.chunk_size,)),
                                     uc.readout_target, self.cfg.d_model) if uc.readout_weight else None)
        self.tokenizer = Tokenizer.from_file(self.teacher_dir / "tokenizer.json")
        self.gen = torch.Generator().manual_seed(uc.seed)
        self.stage, self.step = 1, 0
        self.opt = self._optimizer()

    def _init_ssms(self, path: Path) -> None:
        """Start from the SSM weights of an earlier student checkpoint (same teacher and SSM sizes, a conv as
        wide or narrower: see widen_conv), and its adapter factors, if it has them, once stage 2 adds adapters
        (see _add_adapters)."""
        from safetensors.torch import load_file

        if not (path / "model.safetensors").is_file():
            raise ValueError(f"init_from: {path} holds no model.safetensors")
        own = self.student.state_dict()
        stored = load_file(str(path / "model.safetensors"))
        ssm = {k: widen_conv(v, own[k]) if k in own and k.endswith("conv_weight") else v
               for k, v in stored.items() if is_ssm(k)}
        bad = [k for k, v in ssm.items() if k not in own or own[k].shape != v.shape]
        if not ssm or bad or set(ssm) != {k for k in own if is_ssm(k)}:
            raise ValueError(f"init_from: {path} does not hold this student's SSMs (mismatched: {bad[:3]})")
        self.student.load_state_dict({k: v.float() for k, v in ssm.items()}, strict=False)
        self.init_lora = {k: v.float() for k, v in stored.items() if ".lora_" in k}

    def _add_adapters(self) -> None:
        """Stage 2's low-rank adapters (idempotent)."""
        if self.uc.lora_rank and not self.lora_params:
            self.lora_params = add_lora(self.student, parse_targets(self.uc.lora_targets), self.uc.lora_rank,
                                        self.uc.lora_alpha)
            if self.init_lora:  # init_from's adapters (same rank, its targets among ours), the scale in B
                load_lora_factors(self.student, self.init_lora)

    def _optimizer(self) -> torch.optim.AdamW:
        groups = [{"params": self.params, "peak": self.uc.lr1 if self.stage == 1 else self.uc.lr2}]
        if self.stage == 2 and self.lora_params:
            groups.append({"params": self.lora_params, "peak": self.uc.lr_lora})
        if self.readout is not None:
            groups.append({"params": list(self.readout.parameters()), "peak": groups[0]["peak"]})
        for g in groups:
            g["lr"] = g["peak"]
        return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=self.uc.weight_decay)

    def steps(self, stage: int) -> int:
        return self.uc.stage1_steps if stage == 1 else self.uc.stage2_steps

    # ---- state ---------------------------------------------------------------------------------------
    def save_state(self) -> None:
        state = {"ssm": trainable_state(self.student), "optimizer": self.opt.state_dict(), "stage": self.stage,
                 "step": self.step, "config": dataclasses.asdict(self.uc)}
        if self.readout is not None:
            state["readout"] = self.readout.state_dict()
        self.run_dir.save(state, self.gen)

    def load_state(self) -> None:
        state = self.run_dir.load()
        saved = {**dataclasses.asdict(UptrainConfig()), **state["config"]}  # fields added since take their defaults
        differ = [k for k, v in dataclasses.asdict(self.uc).items() if k not in RESCHEDULABLE and saved[k] != v]
        if differ:
            raise ValueError(f"{self.run_dir.path} was written with a different uptrain config ({', '.join(differ)}); "
                             "use another --out directory")
        self.stage, self.step = int(state["stage"]), int(state["step"])
        if self.stage == 2:
            self._add_adapters()
        self.student.load_state_dict(state["ssm"], strict=False)
        if self.readout is not None and "readout" in state:
            self.readout.load_state_dict(state["readout"])
        self.opt = self._optimizer()
        self.opt.load_state_dict(state["optimizer"])
        restore_rngs(state, self.gen)
        self.run_dir.trim_log(stage=self.stage, step=self.step)

    def export(self) -> None:
        """Write the student as a delta checkpoint (SSM tensors and adapter factors in bf16) over the teacher."""
        save_checkpoint(self.student, self.run_dir.path, self.teacher_dir / "tokenizer.json", dtype=torch.bfloat16,
                        only={k for k in self.student.state_dict() if is_ssm(k)}, extra=lora_factors(self.student))

    # ---- training ------------------------------------------------------------------------------------
    def _stream(self, ids: Tensor) -> Iterator[tuple[Tensor, Tensor | None, Tensor | None]]:
        """Stage 1: text windows; stage 2: the mixture (text, chats, recall) with per-token weights and answers."""
        uc = self.uc
        if self.stage == 1 or not (uc.chat_frac or uc.recall_frac):
            return ((b, None, None) for b in batches(ids, uc.batch_size, uc.seq_len, self.gen))
        chat = load_chat_template(self.teacher.config, self.tokenizer)
        render = lambda msgs: chat.render(msgs, add_generation_prompt=False)  # noqa: E731
        answered = teacher_chats(self.teacher_dir) if uc.chat_frac and uc.teacher_chats else []
        mix = Mixture(MixtureConfig(uc.seq_len, uc.chat_frac, uc.recall_frac, uc.recall_weight), self.tokenizer, ids,
                      summaries() if uc.chat_frac else [], render, self.gen, answered)
        return mix.batches(uc.batch_size)

    def train(self) -> bool:
        """Run the remaining steps of both stages; False when stopped by the deadline (state saved)."""
        ids = training_ids(self.tokenizer, self.uc.sources, self.uc.train_text)
        self.student.train()
        while True:
            if not self._stage(self._stream(ids)):
                return False
            self.export()
            if self.stage == STAGES[-1]:  # stays at its end: a resume with more stage-2 steps continues it
                return True
            self.stage, self.step = self.stage + 1, 0
            self._add_adapters()
            self.opt = self._optimizer()
            self.save_state()

    def _stage(self, stream: Iterator[tuple[Tensor, Tensor | None, Tensor | None]]) -> bool:
        """The rest of the current stage; False when the deadline stopped it (state saved, student exported)."""
        uc, total = self.uc, self.steps(self.stage)

        def update(step: int) -> dict:
            batch, weights, answers = next(stream)
            record: dict = {"stage": self.stage}
            sizes = uc.random_chunk_sizes if self.stage == 2 else ()
            if sizes:  # drawn after the batch, from the same generator: a resumed run draws the same
                record["chunk_size"] = sizes[int(torch.randint(len(sizes), (1,), generator=self.gen))]
                self.student.set_chunk_size(record["chunk_size"])
            with torch.autocast("cpu", torch.bfloat16, enabled=uc.autocast):
                if self.stage == 1:
                    loss, stats = attention_transfer_loss(self.teacher, self.student, batch[:, :-1], self.readout,
                                                          uc.readout_weight)
                else:
                    loss, stats = distillation_loss(self.teacher, self.student, batch, uc.ce_weight, weights,
                                                    answers, uc.recall_target == "corrected", self.readout,
                                                    uc.readout_weight)
            record.update(stats)
            loss.backward()
            if sizes:
                self.student.set_chunk_size(uc.chunk_size)  # what the export and every check between steps see
            torch.nn.utils.clip_grad_norm_(self.params + self.lora_params, uc.grad_clip)
            if self.readout is not None:  # on its own: the maps' gradients would otherwise shrink the SSMs' steps
                torch.nn.utils.clip_grad_norm_(self.readout.parameters(), uc.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            record["loss"] = loss.item()
            return record

        def save(step: int) -> None:
            self.step = step
            self.save_state()

        loop = Loop(self.opt, WarmupCosine(total, uc.warmup_steps, 0.1), self.run_dir, uc.ckpt_interval,
                    self.deadline, uc.batch_size * uc.seq_len, desc=f"stage {self.stage}")
        self.step = loop.run(self.step, update, save)
        if self.step < total:
            self.export()
            return False
        return True


# ---- command line ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UptrainFlags:
    """Uptraining: an optional config file (the UptrainConfig flags go over its values)."""

    config: str | None = setting(None, "JSON object of uptrain settings (the flags below override it)",
                                 metavar="FILE")


def configure(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, RunFlags)
    add_flags(parser, UptrainFlags)
    add_flags(parser, UptrainConfig, overrides=True)


def load_uptrain_config(args: argparse.Namespace) -> UptrainConfig:
    """Defaults, then the --config file, then the flags given."""
    path = from_args(UptrainFlags, args).config
    return from_args(UptrainConfig, args, check_fields(UptrainConfig, read_json(path), path) if path else None)


def run(args: argparse.Namespace) -> int:
    started = time.time()
    uc, run_flags = load_uptrain_config(args), from_args(RunFlags, args)
    run_dir = RunDir(Path(run_flags.out))
    resuming = run_dir.resumes(run_flags.resume, "an uptraining run")
    torch.set_num_threads(uc.threads)
    job = Run(uc, run_dir, run_flags.deadline(started))
    if resuming:
        job.load_state()
    else:
        run_dir.create()
    (run_dir.path / "uptrain_config.json").write_text(json.dumps(dataclasses.asdict(uc), indent=2) + "\n")
    if not job.train():
        print(f"time budget reached; state saved in {run_dir.state_file} and the student so far exported "
              "(continue with --resume auto)", file=sys.stderr)
        return 0
    print(f"done: the student is exported to {run_dir.path} (a delta over {job.cfg.base_model})", file=sys.stderr)
    return 0
