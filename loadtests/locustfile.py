"""Load test for /v1/completions: streaming users with a prompt / output length distribution.

    locust -f loadtests/locustfile.py --headless -u 16 -r 4 -t 60s --host http://127.0.0.1:8000 \\
        --prompt-tokens uniform:16:256 --output-tokens fixed:64

(or `make loadtest`, which starts the server too). Lengths are drawn per request from
`fixed:N`, `uniform:LOW:HIGH` or `normal:MEAN:SD` (clipped to >= 1); a prompt of N tokens is N
words of WikiText-style text (about one token each for the shipped tokenizer), and the output
length is forced with `max_tokens` and `ignore_eos`. With `--prompt-ids LOW:HIGH` a prompt is
instead a list of N random token ids in [LOW, HIGH): exact lengths whatever the tokenizer, and the
same requests for any OpenAI-compatible server of the same vocabulary (llama.cpp's accepts
token-id prompts too). Besides the request itself, every stream records custom events, request
type "SSE": `time_to_first_token` (ms), `inter_token_latency` (ms between text chunks, which hold
one token each unless text was held back at a stop string or a split character) and, once a
stream has ended with all of its `max_tokens`, `time_per_output_token` (ms from the first to the
last token over max_tokens - 1: vLLM's TPOT, which does not depend on how the server groups its
writes), so the CSV and JSON reports carry their percentiles. A stream counts as failed unless it
ends with `data: [DONE]`; 429s count as failures too. Set ATTAMBA_API_KEY if the server has --api-key.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from locust import HttpUser, between, events, task
from locust.argument_parser import LocustArgumentParser

WORDS = (Path(__file__).parent.parent / "tests" / "data" / "wikitext_sample.txt").read_text().split()


@events.init_command_line_parser.add_listener
def _options(parser: LocustArgumentParser) -> None:
    parser.add_argument("--prompt-tokens", default="uniform:16:256", help="prompt length distribution")
    parser.add_argument("--output-tokens", default="uniform:16:128", help="output length distribution")
    parser.add_argument("--prompt-ids", default="", metavar="LOW:HIGH",
                        help="send prompts as random token ids in [LOW, HIGH) instead of text")
    parser.add_argument("--non-streaming-share", type=float, default=0.0,
                        help="fraction of requests sent without streaming")


def draw(spec: str) -> int:
    """One length from `fixed:N`, `uniform:LOW:HIGH` or `normal:MEAN:SD`."""
    kind, *args = spec.split(":")
    values = [float(a) for a in args]
    if kind == "fixed" and len(values) == 1:
        return max(1, int(values[0]))
    if kind == "uniform" and len(values) == 2:
        return max(1, random.randint(int(values[0]), int(values[1])))
    if kind == "normal" and len(values) == 2:
        return max(1, round(random.gauss(*values)))
    raise ValueError(f"length distribution {spec!r}: use fixed:N, uniform:LOW:HIGH or normal:MEAN:SD")


class StreamingUser(HttpUser):
    host = "http://127.0.0.1:8000"
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        key = os.environ.get("ATTAMBA_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"

    def _body(self, stream: bool) -> dict:
        options = self.environment.parsed_options
        n = draw(options.prompt_tokens)
        if options.prompt_ids:
            low, high = (int(v) for v in options.prompt_ids.split(":"))
            prompt: str | list[int] = [random.randrange(low, high) for _ in range(n)]
        else:
            start = random.randrange(len(WORDS))
            prompt = " ".join((WORDS[start:] + WORDS)[:n])
        return {"prompt": prompt, "max_tokens": draw(options.output_tokens), "ignore_eos": True,
                "temperature": 0.8, "stream": stream}

    def _record(self, name: str, milliseconds: float) -> None:
        self.environment.events.request.fire(request_type="SSE", name=name, response_time=milliseconds,
                                             response_length=0, exception=None, context={})

    @task
    def complete(self) -> None:
        if random.random() < self.environment.parsed_options.non_streaming_share:
            self.client.post("/v1/completions", json=self._body(False), name="completions")
            return
        body = self._body(True)
        sent = time.perf_counter()
        with self.client.post("/v1/completions", json=body, name="completions [stream]", stream=True,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                return
            last_line, first_token, last_token = "", None, None
            for line in response.iter_lines(decode_unicode=True):
                if not line:
                    continue
                last_line = line
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                if not json.loads(line[6:])["choices"][0]["text"]:
                    continue
                if last_token is None:
                    first_token = now
                    self._record("time_to_first_token", (now - sent) * 1000)
                else:
                    self._record("inter_token_latency", (now - last_token) * 1000)
                last_token = now
            if last_line != "data: [DONE]":
                response.failure(f"stream ended without [DONE] (last line {last_line[:80]!r})")
            else:
                response.success()
                if body["max_tokens"] > 1 and first_token is not None:
                    self._record("time_per_output_token", (last_token - first_token) * 1000 / (body["max_tokens"] - 1))
