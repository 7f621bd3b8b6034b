"""Chat messages -> one prompt text, plus the stops that end the assistant's turn.

A chat template is a Python `str.format` template for ONE message with exactly the fields
{role} and {content}; literal braces are doubled. The prompt is every message rendered in
turn, then the generation prompt: the template rendered for role "assistant" up to where
its {content} would go. The assistant's turn ends at the header (the text before {content},
trailing whitespace stripped) of any role, so the reply stops before a new turn begins.
A checkpoint sets it in config.json as `chat_template`; when empty, DEFAULT_TEMPLATE is used:

    <|system|>\\nYou are terse.\\n<|user|>\\nHi\\n<|assistant|>\\n

A `chat_template` holding a Jinja2 statement (`{%`), as Hugging Face checkpoints (config.json or
a chat_template.jinja file next to it) and GGUF files carry, is rendered the way transformers' `apply_chat_template` does (JinjaChatTemplate); the reply
then ends at the model's EOS token or `<|im_end|>`.
"""
from __future__ import annotations

import json
import string
from datetime import datetime
from typing import NoReturn

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from models.config import ModelConfig
from models.tokenizer import Tokenizer

DEFAULT_TEMPLATE = "<|{role}|>\n{content}\n"
ROLES = ("system", "user", "assistant")
_CUT = "\x00content\x00"


class ChatTemplate:
    """Renders messages and knows which strings / token ids end a reply."""

    def __init__(self, template: str, tokenizer: Tokenizer) -> None:
        template = template or DEFAULT_TEMPLATE
        fields = sorted({name for _, name, _, _ in string.Formatter().parse(template) if name is not None})
        if fields != ["content", "role"]:
            raise ValueError(f"chat template must use exactly {{role}} and {{content}}, it uses {fields}")
        self.template = template
        self.generation_prompt = self._header("assistant")
        markers = [self._header(role).rstrip() for role in ROLES]
        self.stop = [m for m in markers if m]
        # A marker that is one (special) token never shows up in the text, so stop on its id too.
        ids = [tokenizer.encode(m) for m in self.stop]
        self.stop_token_ids = [t[0] for t in ids if len(t) == 1]

    def _header(self, role: str) -> str:
        return self.template.format(role=role, content=_CUT).split(_CUT)[0]

    def render(self, messages: list[tuple[str, str]], add_generation_prompt: bool = True) -> str:
        """(role, content) pairs -> the prompt text (asking for the assistant's reply unless told not to)."""
        turns = "".join(self.template.format(role=role, content=content) for role, content in messages)
        return turns + self.generation_prompt if add_generation_prompt else turns


class JinjaChatTemplate:
    """A Jinja2 chat template rendered with transformers' conventions: `messages` as dicts,
    `add_generation_prompt`, `bos_token` / `eos_token`, `raise_exception`, `tojson`, `strftime_now`,
    trim_blocks and lstrip_blocks, in a sandbox. The reply stops at the EOS or `<|im_end|>` token."""

    END_OF_TURN = "<|im_end|>"

    def __init__(self, template: str, tokenizer: Tokenizer, bos_token_id: int | None, eos_token_id: int | None) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(template)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"chat template is not valid Jinja2: {exc}") from exc
        self.special = {name: tokenizer.hf.id_to_token(i) for name, i in
                        (("bos_token", bos_token_id), ("eos_token", eos_token_id)) if i is not None}
        ids = [eos_token_id, tokenizer.token_to_id(self.END_OF_TURN)]
        self.stop: list[str] = []
        self.stop_token_ids = list(dict.fromkeys(i for i in ids if i is not None))

    def render(self, messages: list[tuple[str, str]], add_generation_prompt: bool = True) -> str:
        """(role, content) pairs -> the prompt text; ValueError when the template rejects them."""
        try:
            return self.template.render(messages=[{"role": r, "content": c} for r, c in messages],
                                        add_generation_prompt=add_generation_prompt, **self.special)
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template: {exc}") from exc


def _tojson(x: object, ensure_ascii: bool = False, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson`: plain json.dumps (Jinja's own escapes HTML characters)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def load_chat_template(config: ModelConfig, tokenizer: Tokenizer) -> ChatTemplate | JinjaChatTemplate:
    """The chat template of a checkpoint: Jinja2 when its `chat_template` has a `{%` statement."""
    if "{%" in config.chat_template:
        return JinjaChatTemplate(config.chat_template, tokenizer, config.bos_token_id, config.eos_token_id)
    return ChatTemplate(config.chat_template, tokenizer)
