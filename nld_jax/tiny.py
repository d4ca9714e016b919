"""The bundled tiny NLD model: its synthetic tasks, tokenizer and location.

The model (about 1.5M parameters, `nld_jax/assets/tiny/`) is trained from scratch by
`examples/train_tiny.py` with the joint AR + diffusion objective on two tasks over digit
strings, each fully determined by its prompt so that a model that has learnt it can predict a
whole answer block at once (what diffusion and self-speculation exploit):

    <s> sort 3 9 1 4 = 1 3 4 9 </s>        the digits in ascending order
    <s> reverse 3 9 1 4 = 4 1 9 3 </s>     the digits in reverse order

Those two tasks are all it knows: prompts outside them (other words, digit strings shorter
than 4 or longer than 10, numbers of several digits) get arbitrary answers, and words outside
its 17-token vocabulary are refused by the tokenizer. Digit strings are 4 to 10 long;
sequences are padded to 32 tokens with </s>, and the padding is trained on too, so that the
model keeps predicting </s> after the end (diffusion blocks run past it).
"""

from __future__ import annotations

import pathlib

import numpy as np

__all__ = ["TINY_MODEL_DIR", "VOCAB", "TASKS", "SEQ_LEN", "CHAT_TEMPLATE", "encode", "decode",
           "make_example", "make_batch", "answer", "build_tokenizer"]

TINY_MODEL_DIR = pathlib.Path(__file__).parent / "assets" / "tiny"
SEQ_LEN = 32
TASKS = ("sort", "reverse")
# Ids 0-3 are the special tokens the config names (bos 1, eos 2, mask 3).
VOCAB = ["<pad>", "<s>", "</s>", "<mask>", "sort", "reverse", "="] + [str(d) for d in range(10)]
_ID = {token: i for i, token in enumerate(VOCAB)}
PAD, BOS, EOS, MASK = 0, 1, 2, 3
MIN_DIGITS, MAX_DIGITS = 4, 10
# The model knows no chat markers: a conversation becomes the last user turn in task format
# ("sort 3 1 2 4" -> "<s> sort 3 1 2 4 ="); chat_template.jinja beside the weights holds it.
CHAT_TEMPLATE = ("{%- for message in messages if message.role == 'user' %}"
                 "{%- if loop.last %}<s> {{ message.content }} ={%- endif %}{%- endfor %}\n")


def encode(text: str) -> list[int]:
    """Space-separated tokens -> ids (the tokenizer.json does the same)."""
    return [_ID[token] for token in text.split()]


def decode(ids: list[int]) -> str:
    """Ids -> space-separated tokens."""
    return " ".join(VOCAB[i] if 0 <= i < len(VOCAB) else f"<{i}>" for i in ids)


def answer(task: str, digits: list[int]) -> list[int]:
    """The correct answer digits."""
    return sorted(digits) if task == "sort" else digits[::-1]


def make_example(rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(prompt ids ending in '=', answer ids ending in </s>)."""
    task = TASKS[rng.integers(len(TASKS))]
    digits = rng.integers(0, 10, rng.integers(MIN_DIGITS, MAX_DIGITS + 1)).tolist()
    prompt = [BOS, _ID[task]] + [_ID[str(d)] for d in digits] + [_ID["="]]
    return prompt, [_ID[str(d)] for d in answer(task, digits)] + [EOS]


def make_batch(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [batch, SEQ_LEN], loss mask [batch, SEQ_LEN]: 1 on answer and padding)."""
    tokens = np.full((batch, SEQ_LEN), EOS, np.int32)
    loss_mask = np.ones((batch, SEQ_LEN), np.int32)
    for row in range(batch):
        prompt, target = make_example(rng)
        tokens[row, :len(prompt) + len(target)] = prompt + target
        loss_mask[row, :len(prompt)] = 0
    return tokens, loss_mask


def build_tokenizer():  # -> tokenizers.Tokenizer
    """A word-level `tokenizers` tokenizer over VOCAB (whitespace pre-tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab=dict(_ID), unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<pad>", "<s>", "</s>", "<mask>"])
    return tokenizer
