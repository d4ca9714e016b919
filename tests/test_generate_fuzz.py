"""Random argument combinations for generate(): each call ends in a result or a named error.

A seeded generator draws every argument of generate() from a pool of valid values and values
wrong in type, range or shape (each argument is wrong in about one call of six). Every call
must either return a GenerationOutput that fits the request (one row per prompt, ids in the
vocabulary, at most the budget per row, in whole blocks for diffusion) or raise ValueError or
TypeError (TokenizerError and the resource limits' errors are ValueErrors) whose message names
the argument at fault; never another exception, such as numpy's or Python's own from deep
inside.
"""

from __future__ import annotations

import numpy as np
import pytest

import nld_jax
from nld_jax import tiny

SEED = 1206
CALLS = 200
BAD_EVERY = 6  # each argument is drawn from its bad pool one time in this many

_PROMPT = tiny.encode("<s> sort 3 9 1 4 =")
TINY_BLOCK = nld_jax.NLDConfig.from_json(tiny.TINY_MODEL_DIR).block_size
# Argument -> (valid values, bad values). The valid pools hold no two values that need two
# programs (batch size, budget bucket, block, top_k, streaming...): one program per mode, so
# the test spends its time on arguments rather than compiling (~7 s a program on 2 cores).
POOLS: dict[str, tuple[list, list]] = {
    "prompts": (
        [[_PROMPT], ["<s> reverse 1 2 3 4 ="], np.array([_PROMPT]), (tuple(_PROMPT),)],
        [[], [[]], [[1, 2], [3, [4]]], [[1, [2, 3]]], [[1.5, 2.0]], [[1, -2]], [[1, 17]],
         "<s> sort 1 2 3 4 =", [None], [["<s>", "sort"]], [[2**70]], ["<s> sort 12 ="],
         np.zeros((2, 0), np.int32), np.zeros((2, 2, 2), np.int32), 5, [{"a": 1}],
         [np.array([1.5])], [[True, False]]]),
    "mode": (list(nld_jax.MODES), ["beam", "", None, 3, "AR"]),
    "max_new_tokens": ([4, 8], [0, -1, 1.5, "8", None, True, 2**70, 10**6, float("nan")]),
    "temperature": ([0.0, 0.7, 1], [-1.0, float("nan"), float("inf"), "1", None, [1.0],
                                    1e309, True]),
    "top_k": ([0], [-1, 1.5, "3", 10**6, None, True]),
    "top_p": ([1.0, 0.9], [0.0, -0.1, 1.5, float("nan"), "0.9", None, True]),
    "block_size": ([None], [0, 1, -4, 2.5, "8", 10**6, True]),
    "threshold": ([0.9, 1.0], [0.0, -0.5, 1.5, float("nan"), "0.9", True]),
    "seed": ([0, 7, 2**31 - 1], [2**70, -2**70, 1.5, "0", None, [1], float("nan")]),
    "max_cache_len": ([None], [0, -1, 8, 1.5, "64", 10**9, True]),
    "denoise_steps": ([None, 2], [0, -1, 1.5, "2", True]),
    "all_mask_init": ([False], ["yes", None, 2]),
    "accept_rule": (["exact", "match"], ["fast", None, 1]),
    "eos_token_ids": ([None, [tiny.EOS], (tiny.EOS, tiny.PAD)],
                      [[], [17], [-1], [1.5], "2", [None], 2, [[2]], [2**70]]),
    "stream": ([None], [1, "print"]),  # streaming runs: tests/test_concurrency.py
}


def _draw(rng: np.random.Generator) -> tuple[dict, list[str]]:
    """One call's arguments and the names of those drawn from the bad pools."""
    kwargs, bad = {}, []
    for name, (good, wrong) in POOLS.items():
        if rng.integers(BAD_EVERY) == 0:
            kwargs[name] = wrong[rng.integers(len(wrong))]
            bad.append(name)
        else:
            kwargs[name] = good[rng.integers(len(good))]
    return kwargs, bad


def _fits(out: object, kwargs: dict) -> bool:
    if not isinstance(out, nld_jax.GenerationOutput):
        return False
    rows, budget = len(kwargs["prompts"]), kwargs["max_new_tokens"]
    if kwargs["mode"] == "diffusion":  # emits whole blocks: the budget rounds up to one
        block = kwargs["block_size"] or TINY_BLOCK
        budget = -(-budget // block) * block
    return (len(out.tokens) == rows and all(
        len(row) <= budget and all(0 <= t < len(tiny.VOCAB) for t in row)
        for row in out.tokens) and (out.texts is None or len(out.texts) == rows))


@pytest.mark.slow
def test_random_argument_combinations_end_in_a_result_or_a_named_error():
    model = nld_jax.load_model(tiny.TINY_MODEL_DIR, dtype="float32")
    rng = np.random.default_rng(SEED)
    outcomes = {"result": 0, "named": 0}
    failures = []
    for call in range(CALLS):
        kwargs, bad = _draw(rng)
        try:
            out = nld_jax.generate(model, **kwargs)
        except (ValueError, TypeError) as e:
            message = str(e)
            # The message names an argument (or, for prompts, the prompt or token at fault).
            names = [*POOLS, "prompt", "token", "vocabulary", "block", "cache", "memory"]
            if any(name in message for name in names):
                outcomes["named"] += 1
                continue
            failures.append((call, bad, f"{type(e).__name__}: {message}"))
            continue
        except Exception as e:  # noqa: BLE001 (what the test is looking for)
            failures.append((call, bad, f"{type(e).__name__}: {e}"))
            continue
        if not _fits(out, kwargs):
            failures.append((call, bad, f"a result that does not fit: {out}"))
        elif bad and not _accepted_as_valid(bad, kwargs):
            failures.append((call, bad, "accepted a bad argument"))
        else:
            outcomes["result"] += 1
    assert not failures, f"{len(failures)} of {CALLS} calls:\n" + "\n".join(
        map(str, failures[:15]))
    print(outcomes)  # for RELIABILITY.md
    assert outcomes["result"] >= 10 and outcomes["named"] >= CALLS // 2, outcomes


def _accepted_as_valid(bad: list[str], kwargs: dict) -> bool:
    """Only a mode's own options may go unchecked by a call in another mode (each mode's
    Settings validates what it uses); the common arguments are always checked."""
    used = {"ar": set(), "diffusion": {"block_size", "threshold", "denoise_steps",
                                       "all_mask_init"},
            "self_spec": {"block_size", "accept_rule"},
            "self_spec_quadratic": {"block_size", "accept_rule"}}[kwargs["mode"]]
    mode_options = {"block_size", "threshold", "denoise_steps", "all_mask_init", "accept_rule"}
    return all(name in mode_options and name not in used for name in bad)
