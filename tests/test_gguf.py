"""Grouped-query attention, tied embeddings, GGUF conversion (a tiny GGUF written here), named models, Jinja chats."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors import safe_open

from engine import LLM, EngineArgs, LLMEngine, SamplingParams
from engine.cache_layout import CacheLayout
from entrypoints.cli import main
from models import ModelConfig, build_model, decode_step, load_model, prefill, registry, save_checkpoint, state_bytes
from models.gguf import write_gguf
from models.loading import WEIGHTS
from models.tokenizer import Tokenizer
from server.chat import ChatTemplate, JinjaChatTemplate, load_chat_template

from conftest import ENGINE, make_checkpoint, serve_engine


CHATML = ("{% for message in messages %}{{'<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def gqa(kind: str = "transformer", **kw) -> ModelConfig:
    base = dict(kind=kind, vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, sliding_window=6,
                tie_embeddings=True)
    return ModelConfig(**{**base, **kw})


# ---- config, GQA and tied embeddings in the model ------------------------------------------------------
def test_config_checks_kv_heads_and_old_configs_load(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_kv_heads"):
        gqa(n_kv_heads=3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(kind="attamba", n_kv_heads=2)
    assert (gqa().num_kv_heads, gqa().kv_dim, gqa(n_kv_heads=0).kv_dim) == (2, 16, 32)
    old = {k: v for k, v in ModelConfig().to_dict().items() if k not in ("n_kv_heads", "tie_embeddings")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert ModelConfig.load(tmp_path) == ModelConfig()


def test_gqa_equals_attention_with_repeated_kv_heads() -> None:
    """Query head h reads KV head h // 2: the same model with Wk/Wv rows repeated per head gives the same logits."""
    cfg = gqa()
    model = build_model(cfg, seed=0).eval()
    full = build_model(cfg.replace(n_kv_heads=0), seed=1).eval()
    state = model.state_dict()
    for name, t in state.items():
        if name.endswith(("wk.weight", "wv.weight")):
            t = t.unflatten(0, (cfg.num_kv_heads, cfg.head_dim)).repeat_interleave(2, 0).flatten(0, 1)
        full.state_dict()[name].copy_(t)
    ids = torch.randint(0, cfg.vocab_size, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), full(ids))


@pytest.mark.parametrize("kind", ["transformer", "sliding"])
def test_gqa_prefill_and_decode_equal_forward_and_state_bytes(kind: str) -> None:
    cfg = gqa(kind)
    model = build_model(cfg, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        full = model(ids)
        logits, state = prefill(model, ids[:, :9])
        torch.testing.assert_close(logits, full[:, :9], atol=1e-4, rtol=0)
        assert state.cache_nbytes() == 2 * state_bytes(cfg, 9, kv_dtype=torch.float32)  # two rows
        for t in range(9, 30):
            step, state = decode_step(model, ids[:, t], state)
            torch.testing.assert_close(step, full[:, t], atol=1e-4, rtol=0)
        assert state.cache_nbytes() == 2 * state_bytes(cfg, 30, kv_dtype=torch.float32)


def test_tied_checkpoint_stores_the_embedding_once(tmp_path: Path) -> None:
    model = build_model(gqa(), seed=0).eval()
    save_checkpoint(model, tmp_path)
    with safe_open(str(tmp_path / WEIGHTS), "pt") as f:
        assert "head.weight" not in f.keys() and "embed.weight" in f.keys()
    loaded = load_model(tmp_path)
    assert loaded.head.weight is loaded.embed.weight
    ids = torch.randint(0, 61, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))


def test_engine_with_gqa_matches_forward_under_preemption(tmp_path: Path, tokenizer_file: Path) -> None:
    path = make_checkpoint(tmp_path, tokenizer_file, "transformer", n_kv_heads=2, tie_embeddings=True)
    model = load_model(path)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, model.config.vocab_size, (n,), generator=g).tolist() for n in (12, 20, 28)]
    layout = CacheLayout.for_model(model.config, 4, torch.float32)
    # 12 blocks: the first two prompts fit together, and their decodes outgrow the cache
    llm = LLM(str(path), max_num_batched_tokens=16, block_size=4, max_num_seqs=3,
              dtype="float32", cache_memory=layout.block_bytes * (layout.blocks(44) + 1))
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(16):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert out.token_ids == ids[len(prompt):]
    assert llm.engine.scheduler.num_preemptions > 0
    engine = LLMEngine(EngineArgs(model=str(path), **ENGINE, block_size=1))
    engine.add_request("a", prompts[2], SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    assert engine.stats().cache_bytes_used == state_bytes(engine.config, len(prompts[2]), torch.float32)


# ---- GGUF read and write ------------------------------------------------------------------------------------
# Outside references: transformers reads SmolLM2's GGUF (tests/test_smollm2.py), llama.cpp runs what write_gguf
# writes (tests/test_llamacpp.py). Here, without either: llama.cpp's Llama graph written out from its definitions
# runs the written file, and convert-gguf reads back what write_gguf wrote.
def tiny_llama(tokenizer_file: Path) -> torch.nn.Module:
    """A grouped-query, tied-embedding Llama with 8-dim heads (so the rotary permutation is not its own inverse)."""
    cfg = ModelConfig(kind="transformer", vocab_size=Tokenizer.from_file(tokenizer_file).vocab_size, d_model=32,
                      n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=64, rope_theta=5000.0,
                      tie_embeddings=True, eos_token_id=0)
    return build_model(cfg, seed=0).eval()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizer_file: Path) -> tuple[Path, torch.nn.Module]:
    pytest.importorskip("gguf")
    model = tiny_llama(tokenizer_file)
    path = write_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny.gguf", "f32", vocab_from=tokenizer_file)
    return path, model


def rope_adjacent_pairs(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's RoPE for Llama (ggml's normal mode): each pair (x[2i], x[2i+1]) turns by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    angle = pos[:, None, None].float() * theta ** (-torch.arange(0, d, 2).float() / d)  # [T, 1, d/2]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * angle.cos() - x1 * angle.sin(), x0 * angle.sin() + x1 * angle.cos()], -1).flatten(-2)


def llama_cpp_logits(t: dict[str, torch.Tensor], ids: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Logits [T, V] of GGUF tensors `t` as llama.cpp's Llama graph computes them, written from its definitions."""
    def norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    n, group, pos = len(ids), cfg.n_heads // cfg.num_kv_heads, torch.arange(len(ids))
    x = t["token_embd.weight"][ids]
    for b in range(cfg.n_layers):
        w = {k.split(".")[2]: v for k, v in t.items() if k.startswith(f"blk.{b}.")}
        h = norm(x, w["attn_norm"])
        q = rope_adjacent_pairs((h @ w["attn_q"].T).unflatten(-1, (cfg.n_heads, -1)), pos, cfg.rope_theta)
        k = rope_adjacent_pairs((h @ w["attn_k"].T).unflatten(-1, (cfg.num_kv_heads, -1)), pos, cfg.rope_theta)
        v = (h @ w["attn_v"].T).unflatten(-1, (cfg.num_kv_heads, -1))
        scores = torch.einsum("thd,shd->hts", q, k.repeat_interleave(group, 1)) / q.shape[-1] ** 0.5
        p = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + torch.einsum("hts,shd->thd", p, v.repeat_interleave(group, 1)).flatten(1) @ w["attn_output"].T
        h = norm(x, w["ffn_norm"])
        x = x + (torch.nn.functional.silu(h @ w["ffn_gate"].T) * (h @ w["ffn_up"].T)) @ w["ffn_down"].T
    return norm(x, t["output_norm.weight"]) @ t.get("output.weight", t["token_embd.weight"]).T


def test_written_gguf_computes_our_logits_the_llama_cpp_way(tiny_gguf) -> None:
    """The file holds gguf's own Llama tensor names, and llama.cpp's graph on its tensors gives our logits."""
    from gguf import GGUFReader
    from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES

    path, model = tiny_gguf
    cfg = model.config
    llama_names = {TENSOR_NAMES[t].format(bid=b) + ".weight" for t in MODEL_TENSORS[MODEL_ARCH.LLAMA]
                   for b in range(cfg.n_layers)}
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in GGUFReader(path).tensors}
    assert set(tensors) <= llama_names and len(tensors) == len(model.state_dict()) - 1  # the tied head left out
    ids = torch.randint(0, cfg.vocab_size, (12,))
    with torch.no_grad():
        torch.testing.assert_close(llama_cpp_logits(tensors, ids, cfg), model(ids[None])[0], atol=1e-4, rtol=1e-4)


def test_convert_reads_back_what_write_wrote(tmp_path: Path, tiny_gguf, tokenizer_file: Path, sample: str) -> None:
    path, model = tiny_gguf
    assert main(["convert-gguf", str(path), "--out", str(tmp_path / "ck")]) == 0
    loaded = load_model(tmp_path / "ck")
    cfg = loaded.config
    assert (cfg.n_kv_heads, cfg.tie_embeddings, cfg.rope_theta, cfg.eos_token_id) == (2, True, 5000.0, 0)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, w in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], w, atol=0, rtol=0)  # f32 both ways
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=1e-5, rtol=1e-5)  # eps went through fp32
    ours, ref = Tokenizer.from_file(tmp_path / "ck" / "tokenizer.json"), Tokenizer.from_file(tokenizer_file)
    text = sample[:2000] + " 12345 <|user|> café\t\t  end"
    assert ours.encode(text) == ref.encode(text) and ours.decode(ours.encode(text)) == text


@pytest.mark.parametrize("case", ["missing", "not-gguf", "truncated", "out-not-empty"])
def test_convert_gguf_rejects_bad_input_in_one_line(tmp_path: Path, tiny_gguf, tokenizer_file: Path, capsys,
                                                    case: str) -> None:
    src, out = tiny_gguf[0], tmp_path / "out"
    if case == "missing":
        src = tmp_path / "nope.gguf"
    elif case == "not-gguf":
        src = tmp_path / "x.gguf"
        src.write_bytes(b"not a gguf file at all")
    elif case == "truncated":
        model = tiny_llama(tokenizer_file)
        del model.blocks[1].ffn.w2  # a GGUF without blk.1.ffn_down
        src = write_gguf(model, tmp_path / "t.gguf", "f32", vocab_from=tokenizer_file)
    else:
        out.mkdir()
        (out / "keep").write_text("x")
    assert main(["convert-gguf", str(src), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("attamba convert-gguf: error:") and len(err.strip().splitlines()) == 1


# ---- named models ---------------------------------------------------------------------------------------------
def test_named_model_converts_once_into_the_cache(tmp_path: Path, tiny_gguf, monkeypatch) -> None:
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(registry.NAMED_MODELS, "tiny-gguf", registry.NamedModel("no-such-dist", "x.gguf", "x"))
    monkeypatch.setattr(registry, "named_model_gguf", lambda name: tiny_gguf[0])
    path = registry.resolve_model("tiny-gguf")
    assert path == tmp_path / "cache" / f"tiny-gguf-v{registry.CONVERTER_VERSION}" and (path / "config.json").is_file()
    stamp = (path / WEIGHTS).stat().st_mtime_ns
    assert registry.resolve_model("tiny-gguf") == path and (path / WEIGHTS).stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"tiny-gguf-v{registry.CONVERTER_VERSION}"]  # no temporary left behind


def test_named_model_without_its_wheel_and_unknown_dirs_are_one_line_errors(monkeypatch) -> None:
    monkeypatch.setitem(registry.NAMED_MODELS, "ghost", registry.NamedModel("no-such-dist-xyz", "x.gguf", "ghost"))
    with pytest.raises(FileNotFoundError, match=r"no-such-dist-xyz wheel: pip install 'attamba-serve\[ghost\]'"):
        registry.resolve_model("ghost")
    with pytest.raises(FileNotFoundError, match="named models: smollm2-135m"):
        registry.resolve_model("/no/such/dir")


# ---- chat templates -------------------------------------------------------------------------------------------
def test_jinja_chat_template_renders_and_stops_at_eos(tmp_path: Path, tokenizer_file: Path) -> None:
    tok = Tokenizer.from_file(tokenizer_file)
    ModelConfig(eos_token_id=0).save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(CHATML)  # Hugging Face's file, used when config.json has none
    tpl = load_chat_template(ModelConfig.load(tmp_path), tok)
    assert isinstance(tpl, JinjaChatTemplate) and tpl.stop_token_ids == [0] and tpl.stop == []
    assert tpl.render([("user", "Hi {x}")]) == "<|user|>\nHi {x}<|endoftext|>\n<|assistant|>\n"
    assert tpl.render([("user", "Hi")], add_generation_prompt=False) == "<|user|>\nHi<|endoftext|>\n"
    assert isinstance(load_chat_template(ModelConfig(), tok), ChatTemplate)  # str.format templates stay
    strict = JinjaChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}",
                               tok, None, 0)
    with pytest.raises(ValueError, match="user first"):
        strict.render([("assistant", "Hi")])
    with pytest.raises(ValueError, match="Jinja2"):
        JinjaChatTemplate("{% for %}", tok, None, 0)


def test_chat_request_a_jinja_template_rejects_is_a_400(tmp_path: Path, tokenizer_file: Path) -> None:
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be a user turn') }}" \
             "{% endif %}" + CHATML
    path = make_checkpoint(tmp_path, tokenizer_file, "transformer", n_kv_heads=2, chat_template=strict, eos_token_id=0)
    with serve_engine(path, max_num_seqs=2) as url:
        chat = {"max_tokens": 3, "messages": [{"role": "assistant", "content": "Hi"}]}
        bad = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30)
        chat["messages"][0]["role"] = "user"
        good = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    assert "user turn" in bad.json()["error"]["message"]
    assert good.status_code == 200 and good.json()["usage"]["prompt_tokens"] > 0
