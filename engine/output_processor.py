"""Output: each sampled token is recorded, detokenized and checked against the stop conditions
and the one length rule here (as vLLM v1's output processor); what to stream is cut here too."""
from __future__ import annotations

from .outputs import StreamDelta
from .sequence import Sequence
from .stop import check_stop, stop_holdback


class OutputProcessor:
    def __init__(self, eos_token_id: int | None, max_model_len: int) -> None:
        self.eos_token_id, self.max_model_len = eos_token_id, max_model_len

    def append(self, seq: Sequence, token: int, logprob: float, top: list | None, now: float) -> str | None:
        """Record a sampled token; returns the finish reason ("stop" | "length") or None."""
        seq.output_ids.append(token)
        seq.first_token_time = seq.first_token_time or now
        if seq.params.logprobs is not None:
            seq.logprobs.append(logprob)
            seq.top_logprobs.append(top or [])
        start = len(seq.text)
        seq.text += seq.decoder.push(token)
        reason, cut = check_stop(seq.text, start, token, len(seq.output_ids), seq.params, self.eos_token_id)
        if reason is None and (len(seq.output_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            seq.text = seq.text + seq.decoder.flush() if cut is None else seq.text[:cut]
        return reason

    def delta(self, seq: Sequence) -> StreamDelta:
        """Everything seq produced since its last delta; text that may begin a stop string is held
        back until the sequence finishes or the text resolves."""
        held = 0 if seq.is_finished else stop_holdback(seq.text, seq.params)
        end = len(seq.text) - held
        tok0 = seq.num_emitted_tokens
        want = seq.params.logprobs is not None
        delta = StreamDelta(
            request_id=seq.request_id, index=seq.index, text=seq.text[seq.num_emitted_chars:end],
            token_ids=seq.output_ids[tok0:], logprobs=seq.logprobs[tok0:] if want else None,
            top_logprobs=seq.top_logprobs[tok0:] if want else None, finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids),
            first_token_time=seq.first_token_time,
        )
        seq.num_emitted_chars = max(seq.num_emitted_chars, end)
        seq.num_emitted_tokens = len(seq.output_ids)
        return delta
