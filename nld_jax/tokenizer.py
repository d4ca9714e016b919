"""load_tokenizer(): the released tokenizer files on the `tokenizers` library, and chat templates.

Reads `tokenizer.json` (required), `tokenizer_config.json` (special tokens, BOS policy, maybe the
chat template) and `chat_template.jinja` (the template, preferred when present). The template is
rendered with jinja2 in a sandbox: it is data from a checkpoint, and must not reach Python.

The environment matches what transformers gives a template (so released templates render the
same): trim_blocks and lstrip_blocks, lenient undefined values (templates test `{% if tools %}`
without it being passed), `{% break %}`/`{% continue %}`, a `{% generation %}` block, a JSON
`tojson` that keeps non-ASCII text, and the `raise_exception` and `strftime_now` globals. Unlike
transformers, touching an unsafe attribute (`''.__class__`) fails at once instead of rendering
as an empty string.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["Tokenizer", "load_tokenizer", "TokenizerError", "TOKENIZER_FILE", "TOKENIZER_FILES",
           "CHAT_TEMPLATE_FILE"]

TOKENIZER_FILE = "tokenizer.json"
# Every file of a released tokenizer directory (the converter copies those present).
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", CHAT_TEMPLATE_FILE,
                   "special_tokens_map.json")
_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class TokenizerError(ValueError):
    """Missing or malformed tokenizer files, or a chat template that fails."""


def _special(config: dict[str, Any], key: str, source: str) -> str | None:
    value = config.get(key)
    token = value.get("content") if isinstance(value, dict) else value  # AddedToken form
    if token is not None and not isinstance(token, str):
        raise TokenizerError(f"{source}: {key}={value!r} must be a token string, "
                             '{"content": token} or null')
    return token


def _optional_bool(config: dict[str, Any], key: str, source: str) -> bool | None:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise TokenizerError(f"{source}: {key}={value!r} must be true or false")
    return value


def _template_environment() -> Any:
    """The sandboxed jinja2 environment chat templates are rendered in."""
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class Sandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            # The default returns an Undefined that renders as "" when printed: fail instead.
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} "
                                "object is unsafe")

    class GenerationBlock(Extension):
        # transformers marks assistant text with {% generation %}; here it renders its body.
        tags = {"generation"}

        def parse(self, parser: Any) -> list[nodes.Node]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"chat template: {message}")

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.datetime.now().strftime(format)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True,
                  extensions=[loopcontrols, GenerationBlock])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


class Tokenizer:
    """encode / decode / apply_chat_template over a `tokenizers.Tokenizer`.

    BOS/EOS policy of encode(text) (add_special_tokens=True), as transformers' fast tokenizers:
    if tokenizer_config.json sets add_bos_token or add_eos_token, those decide (and the
    tokenizer.json post-processor is not applied); otherwise the post-processor in
    tokenizer.json decides (it is what adds BOS to the released files, if anything does).
    """

    def __init__(self, backend: Any, config: dict[str, Any], chat_template: str | None,
                 source: str = "tokenizer"):
        self.backend = backend
        self.config = config
        self.chat_template = chat_template
        self.source = source
        self.special_tokens = {key: _special(config, key, source) for key in _SPECIAL_KEYS}
        self.bos_token = self.special_tokens["bos_token"]
        self.eos_token = self.special_tokens["eos_token"]
        self.add_bos_token = _optional_bool(config, "add_bos_token", source)
        self.add_eos_token = _optional_bool(config, "add_eos_token", source)
        self.bos_token_id = self._id(self.bos_token)
        self.eos_token_id = self._id(self.eos_token)
        self._template: Any = None  # compiled on first use
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        """A digest of the vocabulary, config and template (computed once)."""
        if self._fingerprint is None:
            content = json.dumps([self.backend.to_str(), self.config, self.chat_template],
                                 sort_keys=True, default=str)
            self._fingerprint = hashlib.sha256(content.encode("utf-8")).hexdigest()
        return self._fingerprint

    # Equal content compares equal: a model carries its tokenizer in its NNX graphdef (a jit
    # static argument), so two loads of one checkpoint must still share compiled programs.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return other is self or other.fingerprint() == self.fingerprint()

    def __hash__(self) -> int:
        return hash(self.fingerprint())

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
        """Text -> ids; add_special_tokens applies the BOS/EOS policy (see the class).

        Text the vocabulary cannot represent (a word a word-level vocabulary lacks, with no
        byte fallback) raises TokenizerError naming it, instead of becoming the unknown token.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        if add_special_tokens and self.add_bos_token is None and self.add_eos_token is None:
            return self._checked(text, self.backend.encode(text, add_special_tokens=True))
        ids = self._checked(text, self.backend.encode(text, add_special_tokens=False))
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        if add_special_tokens and self.add_eos_token and self.eos_token_id is not None:
            ids = ids + [self.eos_token_id]
        return ids

    def _checked(self, text: str, encoding: Any) -> list[int]:
        """The encoding's ids, after checking no piece of `text` became the unknown token."""
        unk_token = getattr(self.backend.model, "unk_token", None)
        unk_id = self.backend.token_to_id(unk_token) if isinstance(unk_token, str) else None
        if unk_id is not None:
            for token_id, (begin, end) in zip(encoding.ids, encoding.offsets, strict=True):
                if token_id == unk_id and text[begin:end] != unk_token:
                    raise TokenizerError(
                        f"{self.source}: {text[begin:end]!r} (at character {begin}) is not in "
                        f"the vocabulary of {self.vocab_size} tokens")
        return encoding.ids

    def save(self, directory: str | os.PathLike) -> None:
        """Writes tokenizer.json, and tokenizer_config.json and chat_template.jinja if any."""
        directory = os.fspath(directory)
        self.backend.save(os.path.join(directory, TOKENIZER_FILE))
        if self.config:
            with open(os.path.join(directory, "tokenizer_config.json"), "w",
                      encoding="utf-8") as f:
                f.write(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")
        if self.chat_template is not None:
            with open(os.path.join(directory, CHAT_TEMPLATE_FILE), "w", encoding="utf-8") as f:
                f.write(self.chat_template)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[dict[str, Any]], *, enable_thinking: bool = False,
                    add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        """The chat template applied to `messages` ([{"role": ..., "content": ...}]), as text.

        Args:
          messages: the conversation, oldest first.
          enable_thinking: the template's thinking switch (NLD: `<think>\\n` vs `<think></think>`).
          add_generation_prompt: end with the assistant header, ready to generate.
          template_kwargs: more template variables (e.g. tools).
        """
        from jinja2 import TemplateError

        if self.chat_template is None:
            raise TokenizerError(f"{self.source}: no chat template (chat_template.jinja or "
                                 "tokenizer_config.json's chat_template)")
        messages = _checked_messages(messages, self.source)
        variables = {key: value or "" for key, value in self.special_tokens.items()}
        variables.update(tools=None, documents=None, **template_kwargs)
        try:
            if self._template is None:
                self._template = _template_environment().from_string(self.chat_template)
            return self._template.render(messages=list(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking, **variables)
        except TokenizerError:  # the template's own raise_exception()
            raise
        except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError,
                AttributeError, RecursionError) as e:
            # The template is data from the checkpoint: whatever its code trips over at render
            # time ({{ 1 / 0 }}, a missing index, a bad filter argument) is its failure.
            raise TokenizerError(f"{self.source}: chat template failed: "
                                 f"{type(e).__name__}: {e}") from None

    def apply_chat_template(self, messages: Sequence[dict[str, Any]],
                            enable_thinking: bool = False, add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> list[int]:
        """The chat template applied and tokenized (the template places any BOS itself)."""
        text = self.render_chat(messages, enable_thinking=enable_thinking,
                                add_generation_prompt=add_generation_prompt, **template_kwargs)
        return self.encode(text, add_special_tokens=False)


def _checked_messages(messages: Any, source: str) -> list[dict[str, Any]]:
    """A list of {"role": str, "content": str, ...} dicts, or TokenizerError naming the fault.

    The tokenizer is text-only: content that is None or a list of parts (images, tool calls)
    is refused here rather than rendered as "None" or a Python list by the template.
    """
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
        raise TokenizerError(f"{source}: messages must be a list of dicts, got "
                             f"{type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TokenizerError(f"{source}: messages[{i}] must be a dict, got "
                                 f"{type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise TokenizerError(f"{source}: messages[{i}]['role']={role!r} must be a "
                                 "non-empty string")
        if not isinstance(content, str):
            raise TokenizerError(f"{source}: messages[{i}]['content'] must be a string, got "
                                 f"{type(content).__name__} (this tokenizer is text-only)")
    return list(messages)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not a readable UTF-8 file ({e})") from None


def _chat_template(config: dict[str, Any], config_file: str) -> str | None:
    """tokenizer_config.json's chat_template: a string, or named templates (the "default")."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise TokenizerError(f"{config_file}: chat_template lists {sorted(map(str, named))} "
                                 "but no 'default' template")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{config_file}: chat_template must be a string, got "
                             f"{type(template).__name__}")
    return template


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
    tokenizer_file = os.path.join(directory, TOKENIZER_FILE)
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
            config = json.loads(_read_text(config_file))
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{config_file}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_file}: expected a JSON object")
    template = _chat_template(config, config_file)
    template_file = os.path.join(directory, CHAT_TEMPLATE_FILE)
    if os.path.isfile(template_file):
        template = _read_text(template_file)
    return Tokenizer(backend, config, template, source=directory)
