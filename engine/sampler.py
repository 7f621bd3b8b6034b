"""Batched token sampling: logit adjustments, grammar masks, temperature, top-k, top-p, min-p, greedy, logprobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from engine.guided import GuideFactory
from engine.logits_processors import apply_logit_bias, apply_min_tokens, apply_penalties
from engine.sampling_params import SamplingParams
from models.tokenizer import Tokenizer


class SequenceView(Protocol):
    """What the sampler reads from a sequence (and the structured-output matcher it keeps there)."""

    prompt_ids: list[int]
    output_ids: list[int]
    guide: Any


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with ``seed`` (any int, taken mod 2**64) on ``device``, or None."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2**64)
    return generator


@dataclass(slots=True)
class SamplerOutput:
    """Result of one sampling step for a batch of B rows."""

    token_ids: Tensor
    """[B] int64 chosen tokens."""
    logprobs: Tensor
    """[B] float32 log-softmax of the unmodified logits at the chosen tokens."""
    top_logprobs: list[list[tuple[int, float]] | None]
    """Per row, the top ``params.logprobs`` (token, logprob) pairs, or None if not requested."""


class Sampler:
    """Samples one token per row of a logits batch, each row with its own parameters.

    With a tokenizer it can also constrain rows to a grammar (``SamplingParams.guided``).
    """

    def __init__(self, tokenizer: Tokenizer | None = None, eos_token_id: int | None = None) -> None:
        self.tokenizer, self.eos_token_id = tokenizer, eos_token_id
        self._guides: GuideFactory | None = None

    def __call__(
        self,
        logits: Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        seqs: list[SequenceView] | None = None,
    ) -> SamplerOutput:
        """Sample from ``logits`` [B, V]; row i uses ``params[i]`` and ``generators[i]``.

        ``seqs[i]`` (the row's sequence) is needed by penalties, min_tokens and structured
        output; it may be left out when no row uses them. Rows with a generator draw only
        from it (V exponentials per step), so their tokens do not depend on the rest of the
        batch; rows without one use the global RNG. Greedy rows take the argmax of the
        adjusted logits; logprobs are always those of the raw logits.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
        batch = logits.shape[0]
        if len(params) != batch or len(generators) != batch or (seqs is not None and len(seqs) != batch):
            raise ValueError(
                f"got {batch} logits rows, {len(params)} params and {len(generators)} generators"
            )
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._adjust(logits, params, seqs)
        token_ids = logits.argmax(dim=-1)

        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            probs = _filtered_probs(logits[rows], [params[i] for i in sampled_rows])
            token_ids[rows] = _race(probs, [generators[i] for i in sampled_rows])

        if seqs is not None:
            for i, seq in enumerate(seqs):
                if seq.guide is not None:
                    GuideFactory.advance(seq.guide, int(token_ids[i]))
        chosen = raw_logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
        return SamplerOutput(token_ids, chosen, _top_logprobs(raw_logprobs, params))

    def _adjust(self, logits: Tensor, params: list[SamplingParams], seqs: list[SequenceView] | None) -> Tensor:
        """logit_bias, penalties, min_tokens and grammar masks, on a copy of ``logits``."""
        needs_seqs = any(p.penalized or p.min_tokens or p.guided for p in params)
        if not needs_seqs and not any(p.logit_bias for p in params):
            return logits
        if needs_seqs and seqs is None:
            raise ValueError("penalties, min_tokens and structured output need the rows' sequences")
        logits = logits.clone()
        apply_logit_bias(logits, params)
        if needs_seqs:
            outputs = [s.output_ids for s in seqs]
            apply_penalties(logits, params, [s.prompt_ids for s in seqs], outputs)
            apply_min_tokens(logits, params, outputs, self.eos_token_id)
            self._mask_grammar(logits, params, seqs)
        return logits

    def _mask_grammar(self, logits: Tensor, params: list[SamplingParams], seqs: list[SequenceView]) -> None:
        """Set the logits the rows' grammars forbid to -inf (one matcher per sequence, made on first use)."""
        rows = [i for i, p in enumerate(params) if p.guided is not None]
        if not rows:
            return
        if self._guides is None:
            if self.tokenizer is None or self.eos_token_id is None:
                raise ValueError("structured output needs a sampler with a tokenizer and an EOS token")
            self._guides = GuideFactory(self.tokenizer, logits.shape[-1], self.eos_token_id)
        for i in rows:
            if seqs[i].guide is None:
                seqs[i].guide = self._guides.matcher(params[i].guided)
        allowed = self._guides.allowed([seqs[i].guide for i in rows]).to(logits.device)
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def _filtered_probs(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """Per-row sampling weights after temperature, top-k, top-p and min-p filtering.

    Rows are proportional to the filtered distribution but not renormalised after
    min-p, so each row's values do not depend on the other rows' parameters.
    """
    device = logits.device
    vocab = logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    logits = logits / temperature.unsqueeze(-1)

    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
    top_k = top_k.clamp(max=vocab)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    use_top_k = top_k < vocab
    use_top_p = top_p < 1.0
    if bool(use_top_k.any() or use_top_p.any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        rank = torch.arange(vocab, device=device)
        drop = rank.unsqueeze(0) >= top_k.unsqueeze(-1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_p = (mass_before >= top_p.unsqueeze(-1)) & use_top_p.unsqueeze(-1)
        drop_p[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)

    probs = logits.softmax(dim=-1)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    if bool((min_p > 0).any()):
        threshold = min_p.unsqueeze(-1) * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _race(probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """Sample one token per row as argmax(probs / Exp(1)) (exponential race)."""
    noise = torch.empty_like(probs)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        noise[shared] = torch.empty_like(probs[shared]).exponential_()
    for i, generator in enumerate(generators):
        if generator is not None:
            noise[i].exponential_(generator=generator)
    # Exponential draws of exactly 0 would turn masked (0-probability) tokens into NaN.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def _top_logprobs(
    raw_logprobs: Tensor, params: list[SamplingParams]
) -> list[list[tuple[int, float]] | None]:
    """Per row, the top ``params.logprobs`` (token, logprob) pairs, or None."""
    requested = [p.logprobs for p in params]
    most = max((k for k in requested if k is not None), default=0)
    if most == 0:
        return [None if k is None else [] for k in requested]
    values, indices = raw_logprobs.topk(min(most, raw_logprobs.shape[-1]), dim=-1)
    values, indices = values.tolist(), indices.tolist()
    return [
        None if k is None else list(zip(indices[i][:k], values[i][:k]))
        for i, k in enumerate(requested)
    ]
