"""load_tokenizer: encode/decode, the BOS policy, the NLD chat format and the template sandbox.

The tokenizer is a byte-level BPE trained here on a few sentences, saved in the released layout
(tokenizer.json, tokenizer_config.json, chat_template.jinja); the chat template is
tests/fixtures/chat_template.jinja, a reconstruction of the released one.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import nld_jax
from nld_jax import tiny
from nld_jax.tokenizer import TokenizerError, load_tokenizer

TEMPLATE = pathlib.Path(__file__).parent / "fixtures" / "chat_template.jinja"
SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "sort the digits 3 9 1 4",
          "héllo wörld, what is 3+4? it is 7.", "system user assistant think"] * 20


def _backend(post_processor: bool) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    # As in Qwen-style vocabularies, the think markers are single tokens but not special.
    tokenizer.add_tokens([AddedToken("<think>", special=False),
                          AddedToken("</think>", special=False)])
    if post_processor:
        bos = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tokenizer


def _write(directory: pathlib.Path, *, post_processor: bool = True, template: bool = True,
           **config) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    _backend(post_processor).save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "</s>",
              "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast", **config}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if template:
        shutil.copy(TEMPLATE, directory / "chat_template.jinja")
    return directory


@pytest.fixture
def tokenizer(tmp_path):
    return load_tokenizer(_write(tmp_path / "tok"))


def _with_template(tmp_path: pathlib.Path, source: str):
    directory = _write(tmp_path / "custom", template=False)
    (directory / "chat_template.jinja").write_text(source)
    return load_tokenizer(directory)


def test_encode_decode_round_trip(tokenizer):
    text = "héllo wörld, what is 3+4? it is 7. Ünïcode ✓"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    # Special and added tokens are single ids; decode drops only the special ones.
    marked = tokenizer.encode("<|im_start|>user\n<think></think>hi<|im_end|>",
                              add_special_tokens=False)
    assert marked[0] == tokenizer.backend.token_to_id("<|im_start|>")
    assert tokenizer.backend.token_to_id("<think>") in marked
    assert tokenizer.decode(marked) == "user\n<think></think>hi"
    assert tokenizer.decode(marked, skip_special_tokens=False) == \
        "<|im_start|>user\n<think></think>hi<|im_end|>"
    assert tokenizer.eos_token_id == tokenizer.backend.token_to_id("<|im_end|>")


@pytest.mark.parametrize("post_processor, add_bos_token, bos_count", [
    (True, None, 1),  # no flag in tokenizer_config.json: tokenizer.json's post-processor decides
    (False, None, 0),
    (True, False, 0),  # the config's flag overrides the post-processor
    (True, True, 1),  # ... and never doubles the BOS
    (False, True, 1),
])
def test_bos_policy(tmp_path, post_processor, add_bos_token, bos_count):
    config = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    tokenizer = load_tokenizer(_write(tmp_path / "tok", post_processor=post_processor, **config))
    bos = tokenizer.bos_token_id
    ids = tokenizer.encode("the lazy dog")
    assert ids.count(bos) == bos_count and (bos_count == 0 or ids[0] == bos)
    assert ids[bos_count:] == tokenizer.encode("the lazy dog", add_special_tokens=False)
    # Chat prompts never get a BOS from encode: the template places any it wants.
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])[0] != bos


def test_chat_single_turn_thinking_off_is_the_spec_format(tokenizer):
    messages = [{"role": "user", "content": "What is 3+4?"}]
    text = tokenizer.render_chat(messages)
    assert text == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is 3+4?<|im_end|>\n"
                    "<|im_start|>assistant\n<think></think>")
    ids = tokenizer.apply_chat_template(messages)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(tokenizer.backend.token_to_id("<|im_start|>")) == 3
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_chat_thinking_on_ends_with_open_think(tokenizer):
    messages = [{"role": "user", "content": "What is 3+4?"}]
    text = tokenizer.render_chat(messages, enable_thinking=True)
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    assert text.replace("<think>\n", "<think></think>") == tokenizer.render_chat(messages)


def test_chat_multi_turn(tokenizer):
    first = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "What is 3+4?"}]
    answer = "7."
    second = first + [{"role": "assistant", "content": "<think>\nadd them\n</think>\n" + answer},
                      {"role": "user", "content": "And 3+5?"}]
    text = tokenizer.render_chat(second)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 3+4?<|im_end|>\n"
                    "<|im_start|>assistant\n<think></think>7.<|im_end|>\n"
                    "<|im_start|>user\nAnd 3+5?<|im_end|>\n"
                    "<|im_start|>assistant\n<think></think>")
    # The next prompt extends the previous one with the answer (reasoning dropped).
    assert text.startswith(tokenizer.render_chat(first) + answer + "<|im_end|>\n")
    closed = tokenizer.render_chat(second, add_generation_prompt=False)
    assert closed.endswith("And 3+5?<|im_end|>\n")


def test_template_errors_are_tokenizer_errors(tokenizer, tmp_path):
    with pytest.raises(TokenizerError, match="role 'tool' is not supported"):
        tokenizer.render_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(TokenizerError, match="chat template failed: TemplateSyntaxError"):
        _with_template(tmp_path, "{% if %}").render_chat([])
    no_template = load_tokenizer(_write(tmp_path / "plain", template=False))
    with pytest.raises(TokenizerError, match="no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("source, error", [
    ("{{ 1 / 0 }}", "ZeroDivisionError"), ("{{ messages[3].content }}", "UndefinedError"),
    ("{{ messages[0].content + 1 }}", "TypeError"),
    ("{{ messages[0].content.index('zzz') }}", "ValueError"),
    ("{{ range(10**9) | list }}", "OverflowError"),  # the sandbox's cap on range()
])
def test_template_runtime_failures_are_tokenizer_errors(tmp_path, source, error):
    with pytest.raises(TokenizerError, match=f"chat template failed: ({error})"):
        _with_template(tmp_path, source).render_chat([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",  # jinja's sandbox would render this as ''; ours refuses
    "{{ messages.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{% set _ = messages.append(1) %}",  # the immutable sandbox: no mutation of the input
])
def test_sandbox_blocks_python_internals(tmp_path, source):
    tokenizer = _with_template(tmp_path, source)
    with pytest.raises(TokenizerError, match="SecurityError: access to attribute .* is unsafe"):
        tokenizer.render_chat([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": None}], r"messages\[0\]\['content'\] must be a string, got "
                                          r"NoneType \(this tokenizer is text-only\)"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "text"}]}],
     r"messages\[1\]\['content'\] must be a string, got list"),
    ([{"role": "user"}], r"messages\[0\]\['content'\] must be a string, got NoneType"),
    ([{"content": "hi"}], r"messages\[0\]\['role'\]=None must be a non-empty string"),
    (["hi"], r"messages\[0\] must be a dict, got str"),
    ("hi", "messages must be a list of dicts, got str"),
    ({"role": "user", "content": "hi"}, "messages must be a list of dicts, got dict"),
])
def test_malformed_messages_are_named(tokenizer, messages, message):
    with pytest.raises(TokenizerError, match=message):
        tokenizer.apply_chat_template(messages)


def test_out_of_vocabulary_text_is_refused_not_padded():
    """The tiny model's word-level vocabulary has no byte fallback: unknown words are errors."""
    tokenizer = load_tokenizer(tiny.TINY_MODEL_DIR)
    assert tokenizer.encode("<s> sort 3 1 <pad> =") == tiny.encode("<s> sort 3 1 <pad> =")
    for text, piece in [("<s> sort 10 2 =", "'10' (at character 9)"),
                        ("add 1 2", "'add' (at character 0)"), ("sort 3 1 ", None)]:
        if piece is None:
            assert tokenizer.encode(text) == tiny.encode(text)
            continue
        with pytest.raises(TokenizerError, match=re.escape(f"{piece} is not in the vocabulary")):
            tokenizer.encode(text)
    with pytest.raises(TokenizerError, match="'Sort' .* is not in the vocabulary"):
        tokenizer.apply_chat_template([{"role": "user", "content": "Sort 3 1 2 4"}])


def test_byte_level_vocabulary_encodes_anything(tokenizer):
    """A byte-level BPE (as released) has no unknown text: nothing is refused."""
    text = "never seen: ζ∑ 漢字 \x00 🙂"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_the_tiny_model_chats_out_of_the_box():
    tokenizer = load_tokenizer(tiny.TINY_MODEL_DIR)
    assert tokenizer.chat_template == tiny.CHAT_TEMPLATE
    turns = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "sort 3 1"},
             {"role": "assistant", "content": "1 3"}, {"role": "user", "content": "reverse 1 2"}]
    assert tokenizer.render_chat(turns) == "<s> reverse 1 2 ="
    assert tokenizer.apply_chat_template(turns) == tiny.encode("<s> reverse 1 2 =")


def test_save_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again == tokenizer and again.chat_template == tokenizer.chat_template
    assert again.encode("the quick fox") == tokenizer.encode("the quick fox")


def test_template_environment_matches_transformers(tmp_path):
    # Lenient undefined values (tools is not passed), loop controls, tojson keeping non-ASCII,
    # {% generation %} blocks: what released templates rely on.
    source = ("{% if tools %}T{% endif %}{{ messages[0].missing }}"
              "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
              "{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}")
    tokenizer = _with_template(tmp_path, source)
    text = tokenizer.render_chat([{"role": "user", "content": "héllo"},
                                  {"role": "user", "content": "skipped"}])
    assert text == '{"role": "user", "content": "héllo"}'


def test_template_from_tokenizer_config(tmp_path):
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    tokenizer = load_tokenizer(_write(tmp_path / "a", template=False, chat_template=named))
    assert tokenizer.render_chat([]) == "plain"
    # chat_template.jinja wins over the config's.
    tokenizer = load_tokenizer(_write(tmp_path / "b", chat_template="from config"))
    assert tokenizer.render_chat([{"role": "user", "content": "x"}]).startswith("<|im_start|>")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json: not a valid tokenizer"):
        load_tokenizer(tmp_path)
    directory = _write(tmp_path / "bad_config")
    (directory / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: expected a JSON object"):
        load_tokenizer(directory)
    with pytest.raises(TokenizerError, match="'<nope>' is not in the vocabulary"):
        load_tokenizer(_write(tmp_path / "bad_bos", bos_token="<nope>"))
    with pytest.raises(TokenizerError, match="add_bos_token='yes' must be true or false"):
        load_tokenizer(_write(tmp_path / "bad_flag", add_bos_token="yes"))
    for value in ([], 0.5, {"content": 3}):  # not silently "no such token" (found by fuzzing)
        with pytest.raises(TokenizerError, match=r"pad_token=.* must be a token string"):
            load_tokenizer(_write(tmp_path / "bad_pad", pad_token=value))
    assert load_tokenizer(_write(tmp_path / "null_pad", pad_token=None)).special_tokens[
        "pad_token"] is None


def test_load_model_attaches_the_tokenizer(tmp_path):
    model = nld_jax.load_model(tiny.TINY_MODEL_DIR, dtype="float32")
    assert isinstance(model.tokenizer, nld_jax.Tokenizer)
    assert model.tokenizer.encode("<s> sort 3 9 1 4 =") == tiny.encode("<s> sort 3 9 1 4 =")
    broken = tmp_path / "tiny"
    shutil.copytree(tiny.TINY_MODEL_DIR, broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(nld_jax.LoadError, match="tokenizer.json"):
        nld_jax.load_model(broken)
