"""load_tokenizer(): the released tokenizer files on the `tokenizers` library, and chat templates.

Reads `tokenizer.json` (required), `tokenizer_config.json` (special tokens, BOS policy, maybe the
chat template) and `chat_template.jinja` (the template, preferred when present). The template is
rendered with jinja2 in a sandbox: it is data from a checkpoint, and must not reach Python.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["Tokenizer", "load_tokenizer", "TokenizerError"]


class TokenizerError(ValueError):
    """Missing or malformed tokenizer files."""


def _special(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # AddedToken serialisation
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """encode / decode / apply_chat_template over a `tokenizers.Tokenizer`."""

    def __init__(self, backend: Any, config: dict[str, Any], chat_template: str | None,
                 source: str = "tokenizer"):
        self.backend = backend
        self.config = config
        self.chat_template = chat_template
        self.source = source
        self.bos_token = _special(config, "bos_token")
        self.eos_token = _special(config, "eos_token")
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.bos_token_id = self._id(self.bos_token)
        self.eos_token_id = self._id(self.eos_token)

    def _id(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.source}: special token {token!r} is not in the vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids (BOS prepended when the tokenizer config asks for it)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[dict[str, str]], *, enable_thinking: bool = False,
                    add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages` ([{"role": ..., "content": ...}]), as text."""
        if self.chat_template is None:
            raise TokenizerError(f"{self.source}: no chat template (chat_template.jinja or "
                                 "tokenizer_config.json's chat_template)")
        from jinja2 import StrictUndefined
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TokenizerError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            undefined=StrictUndefined)
        env.globals["raise_exception"] = raise_exception
        template = env.from_string(self.chat_template)
        return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               enable_thinking=enable_thinking, bos_token=self.bos_token or "",
                               eos_token=self.eos_token or "")

    def apply_chat_template(self, messages: Sequence[dict[str, str]], enable_thinking: bool = False,
                            add_generation_prompt: bool = True) -> list[int]:
        """The chat template applied and tokenized (the template places any BOS itself)."""
        text = self.render_chat(messages, enable_thinking=enable_thinking,
                                add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Reads a released tokenizer directory.

    Args:
      path: a directory with tokenizer.json and optionally tokenizer_config.json and
        chat_template.jinja.
    Returns:
      A Tokenizer.
    """
    from tokenizers import Tokenizer as Backend

    directory = os.fspath(path)
    tokenizer_file = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
        raise TokenizerError(f"{tokenizer_file}: missing")
    try:
        backend = Backend.from_file(tokenizer_file)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{tokenizer_file}: not a valid tokenizer ({e})") from None
    config: dict[str, Any] = {}
    config_file = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_file):
        try:
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{config_file}: not valid JSON ({e})") from None
    template = config.get("chat_template")
    template_file = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(template_file):
        with open(template_file, encoding="utf-8") as f:
            template = f.read()
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{config_file}: chat_template must be a string (named templates "
                             "are not supported)")
    return Tokenizer(backend, config, template, source=directory)
