"""Per-sequence stop conditions: EOS, stop token ids, stop strings."""

from __future__ import annotations

from engine.sampling_params import SamplingParams


def check_stop(
    text: str,
    new_text_start: int,
    token_id: int,
    num_generated: int,
    params: SamplingParams,
    eos_token_id: int | None,
) -> tuple[str | None, int | None]:
    """Decide whether a sequence finishes after emitting ``token_id``.

    ``text`` is the full output text so far, of which ``text[new_text_start:]`` was
    added by this token. Returns ``(finish_reason, truncate_at)``: finish_reason is
    "stop" or None (the length limit is the output processor's); truncate_at is the index at which ``text`` must be cut
    when a stop matched, else None. A stop string counts only if it overlaps the new
    text; the earliest such match wins. The matched stop string, or the text of a stop
    token, is cut unless ``params.include_stop_str_in_output``. Before ``min_tokens``
    tokens exist nothing stops.
    """
    keep = params.include_stop_str_in_output
    if num_generated >= params.min_tokens:
        if (eos_token_id is not None and token_id == eos_token_id and not params.ignore_eos) or (
            token_id in params.stop_token_ids
        ):
            return "stop", None if keep else new_text_start
        matches = [
            (index, len(s))
            for s in params.stop
            if (index := text.find(s, max(0, new_text_start - len(s) + 1))) != -1
        ]
        if matches:
            index, length = min(matches)
            return "stop", index + length if keep else index
    return None, None


def stop_holdback(text: str, params: SamplingParams) -> int:
    """How many trailing characters of ``text`` could begin a stop string.

    The largest k such that ``text`` ends with a proper prefix of length k of some
    stop string; a streamer must not emit those characters yet.
    """
    best = 0
    for s in params.stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
