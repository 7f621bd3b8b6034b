"""The playground in a real browser: Debian's headless chromium, driven by selenium, against `attamba serve` with
an API key and CORS on (`make test-browser` installs both). Skipped where either is missing."""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from models import load_model, save_checkpoint
from models.tokenizer import SPECIAL_TOKENS, Tokenizer

from conftest import serve_process

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("needs chromium and chromedriver on PATH (make test-browser installs Debian's chromium and "
                "chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (make test-browser installs .[browser])")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

KEY = "browser-key"
CONTEXT = 16384
# headless on a machine without network: no first-run, sync, component or QUIC traffic to wait for
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,800")


@pytest.fixture(scope="module")
def endless_ckpt(tiny_ckpt: Path, tmp_path_factory) -> Path:
    """tiny_ckpt with the rows of its output head for EOS and the chat markers zeroed: a greedy reply never ends by
    itself, so Stop lands mid-stream however fast the machine is."""
    model = load_model(tiny_ckpt)
    tok = Tokenizer.from_file(tiny_ckpt / "tokenizer.json")
    with torch.no_grad():
        for token in SPECIAL_TOKENS:
            (token_id,) = tok.encode(token)
            model.head.weight[token_id] = 0
    path = tmp_path_factory.mktemp("endless")
    save_checkpoint(model, path, tiny_ckpt / "tokenizer.json")
    return path


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def scrape(url: str) -> dict[str, float]:
    """/metrics as {name: value}, one label of each sample folded into its name ("name:label=value")."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            values[s.name] = values.get(s.name, 0.0) + s.value
            for label, value in s.labels.items():
                values[f"{s.name}:{label}={value}"] = s.value
    return values


def test_chat_streams_stops_and_shows_the_cache(endless_ckpt: Path, browser: WebDriver) -> None:
    wait = WebDriverWait(browser, 60)

    def el(id_: str):
        return browser.find_element(By.ID, id_)

    def fill(id_: str, text: str) -> None:
        el(id_).clear()
        el(id_).send_keys(text)

    def shown(*ids: str) -> list[float | None]:
        """Numbers as the page shows them (their data-value), read at one instant."""
        script = "return arguments[0].map((id) => document.getElementById(id).dataset.value)"
        return [float(v) if v else None for v in browser.execute_script(script, ids)]

    flags = ("--model", str(endless_ckpt), "--cache-memory", "16MiB", "--max-num-seqs", "4",
             "--max-model-len", str(CONTEXT), "--api-key", KEY, "--allowed-origins", "https://elsewhere.example",
             "--grace-period", "0")
    with serve_process(*flags, "--log-level", "warning", stdout=subprocess.DEVNULL) as (_, url):
        browser.get(url)
        # the page asks for the key (the API answered 401) and connects once it has it
        wait.until(lambda _: el("key-form").is_displayed() and "incorrect API key" in el("model").text)
        fill("key", KEY + Keys.ENTER)
        wait.until(lambda _: f"context {CONTEXT} tokens" in el("model").text)
        assert not el("key-form").is_displayed()

        # settings, and the token count of the prompt the chat template renders
        fill("system", "You are terse.")
        fill("temperature", "0")
        el("max-tokens").clear()  # blank: up to the context
        fill("input", "Tell me about the tower")
        messages = [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Tell me about the tower"}]
        count = httpx.post(f"{url}/tokenize", json={"messages": messages},
                           headers={"Authorization": f"Bearer {KEY}"}).json()["count"]
        wait.until(lambda _: shown("count") == [count])

        # send: the reply streams in, and the cache panel shows the running sequence
        el("send").click()
        reply = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant"))[0]
        wait.until(lambda _: len(reply.text) > 10)
        first = reply.text
        wait.until(lambda _: len(reply.text) > len(first) and el("stop").is_enabled())
        panel = ("cache-used", "cache-full", "cache-ratio", "running")
        used, full, ratio, running = wait.until(lambda _: (values := shown(*panel))[0] and values)
        assert full > used > 0 and ratio == pytest.approx(full / used) and running == 1

        # Stop aborts the stream; the server frees the sequence's cache
        el("stop").click()
        wait.until(lambda _: el("send").is_enabled() and not el("stop").is_enabled())
        assert "stopped" in reply.text
        wait.until(lambda _: (m := scrape(url))["attamba_cache_bytes_used"] == m["attamba_num_requests_running"] == 0)
        after = scrape(url)
        assert after["attamba_request_success_total:finish_reason=abort"] == after["attamba_request_success_total"] == 1
        assert after["attamba_generation_tokens_total"] < CONTEXT
        wait.until(lambda _: shown("cache-used", "running") == [0, 0])
        assert all(ttft > 0 for ttft in shown("ttft-mean", "ttft-last"))

        # an API error is a message in the page, and the text stays in the box to retry
        fill("max-tokens", str(10 * CONTEXT))
        fill("input", "Once more")
        el("send").click()
        error = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))[0]
        assert "maximum context length" in error.text
        assert el("input").get_attribute("value") == "Once more"

    # so is a server that is gone
    el("send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.error")) == 2)
    assert "network error" in browser.find_elements(By.CSS_SELECTOR, ".msg.error")[1].text
    wait.until(lambda _: "unavailable" in el("metrics-status").text)
