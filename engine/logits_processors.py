"""Per-row logit adjustments before sampling: logit_bias, penalties, min_tokens (vLLM semantics).

Each function takes the whole batch [B, V] and touches only the rows whose parameters ask for it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from engine.sampling_params import SamplingParams


def apply_logit_bias(logits: Tensor, params: list[SamplingParams]) -> None:
    """Add each row's logit_bias in place."""
    for row, p in enumerate(params):
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            logits[row, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device, dtype=logits.dtype)


def apply_penalties(logits: Tensor, params: list[SamplingParams], prompts: Sequence[list[int]],
                    outputs: Sequence[list[int]]) -> None:
    """Repetition (prompt and output tokens), frequency and presence (output tokens) penalties, in place."""
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return
    device, vocab = logits.device, logits.shape[-1]
    counts = torch.zeros(len(rows), vocab, device=device)
    seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
    for j, row in enumerate(rows):
        out = torch.tensor(outputs[row], dtype=torch.long, device=device)
        counts[j].index_add_(0, out, torch.ones(len(out), device=device))
        seen[j, torch.tensor(prompts[row], dtype=torch.long, device=device)] = True
    seen |= counts > 0
    index = torch.tensor(rows, device=device)
    sub = logits[index]
    rep = torch.tensor([params[i].repetition_penalty for i in rows], device=device).unsqueeze(-1)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = torch.tensor([params[i].frequency_penalty for i in rows], device=device).unsqueeze(-1)
    pres = torch.tensor([params[i].presence_penalty for i in rows], device=device).unsqueeze(-1)
    logits[index] = sub - freq * counts - pres * (counts > 0)


def apply_min_tokens(logits: Tensor, params: list[SamplingParams], outputs: Sequence[list[int]],
                     eos_token_id: int | None) -> None:
    """Ban EOS and the stop tokens of rows that have fewer than min_tokens outputs, in place."""
    for row, p in enumerate(params):
        if len(outputs[row]) < p.min_tokens:
            banned = list(p.stop_token_ids) + ([eos_token_id] if eos_token_id is not None else [])
            logits[row, banned] = float("-inf")
