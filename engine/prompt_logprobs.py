"""Logprobs of a prompt's own tokens (for `echo` with `logprobs`), from one full forward pass."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PromptLogprobs:
    """Per prompt token: its logprob given the tokens before it and the `top` most likely alternatives;
    None for the first token, which has no context."""

    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


@torch.inference_mode()
def prompt_logprobs(model: nn.Module, prompt_ids: list[int], top: int, device: torch.device) -> PromptLogprobs:
    """Score `prompt_ids` with the model's uncached forward (LongTensor [1, T] -> logits [1, T, V])."""
    ids = torch.tensor([prompt_ids], device=device)
    logprobs = torch.log_softmax(model(ids)[0, :-1].float(), dim=-1)  # [T - 1, V]: predicts tokens 1..T-1
    chosen = logprobs.gather(-1, ids[0, 1:, None])[:, 0].tolist()
    if top:
        values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        alternatives = [[] for _ in chosen]
    return PromptLogprobs([None, *chosen], [None, *alternatives])
