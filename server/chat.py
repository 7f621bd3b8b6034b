"""Chat messages -> one prompt text, plus the stops that end the assistant's turn.

A chat template is a Python `str.format` template for ONE message with exactly the fields
{role} and {content}; literal braces are doubled. The prompt is every message rendered in
turn, then the generation prompt: the template rendered for role "assistant" up to where
its {content} would go. The assistant's turn ends at the header (the text before {content},
trailing whitespace stripped) of any role, so the reply stops before a new turn begins.
A checkpoint sets it in config.json as `chat_template`; when empty, DEFAULT_TEMPLATE is used:

    <|system|>\\nYou are terse.\\n<|user|>\\nHi\\n<|assistant|>\\n
"""
from __future__ import annotations

import string

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

    def render(self, messages: list[tuple[str, str]]) -> str:
        """(role, content) pairs -> the prompt text that asks for the assistant's reply."""
        turns = "".join(self.template.format(role=role, content=content) for role, content in messages)
        return turns + self.generation_prompt
