"""Load test for /v1/completions, streaming and not, with small max_tokens.

    locust -f loadtests/locustfile.py --headless -u 16 -r 4 -t 60s --host http://127.0.0.1:8000

(--host defaults to http://127.0.0.1:8000; set ATTAMBA_API_KEY if the server has --api-key.)
A streamed request counts as failed unless it ends with `data: [DONE]`; 429s count as failures too.
"""
from __future__ import annotations

import os
import random

from locust import HttpUser, between, task

PROMPTS = [
    "The history of",
    "In 1914 , the",
    "The lighthouse was built",
    "= Harrowmere Lighthouse =",
    "The album was released",
    "During the war , the",
]


class CompletionUser(HttpUser):
    host = "http://127.0.0.1:8000"
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        key = os.environ.get("ATTAMBA_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"

    def _body(self, stream: bool) -> dict:
        return {"prompt": random.choice(PROMPTS), "max_tokens": random.randint(8, 32), "temperature": 0.8,
                "stream": stream}

    @task(1)
    def complete(self) -> None:
        self.client.post("/v1/completions", json=self._body(False), name="completions")

    @task(2)
    def complete_streaming(self) -> None:
        with self.client.post("/v1/completions", json=self._body(True), name="completions [stream]", stream=True,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                return
            last = ""
            for line in response.iter_lines(decode_unicode=True):
                if line:
                    last = line
            if last != "data: [DONE]":
                response.failure(f"stream ended without [DONE] (last line {last[:80]!r})")
            else:
                response.success()
