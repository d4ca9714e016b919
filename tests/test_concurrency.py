"""generate() from 8 threads at once: every caller gets exactly what it gets alone.

Each thread runs its own request (mode, prompts, greedy or sampled with its own seed) on one
shared model, all released together by a barrier; with streaming, each caller's callback must
receive its own rows only, and their concatenation must equal its final tokens.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import nld_jax
from nld_jax import tiny

THREADS = 8
# (mode, prompts, temperature, seed): the four modes, greedy and sampled, ragged batches.
# (mode, prompts, temperature, seed): the four modes, greedy and sampled, ragged batches of 2
# (one batch size: the threads share each mode's program instead of compiling more).
REQUESTS = [
    ("ar", ["<s> sort 3 9 1 4 =", "<s> reverse 1 2 3 4 5 ="], 0.0, 0),
    ("diffusion", ["<s> reverse 5 6 7 8 9 =", "<s> sort 1 1 0 ="], 0.0, 0),
    ("self_spec", ["<s> sort 7 7 0 2 5 1 =", "<s> sort 2 1 4 3 ="], 0.0, 0),
    ("self_spec_quadratic", ["<s> reverse 1 2 3 4 =", "<s> sort 6 5 4 3 2 1 ="], 0.0, 0),
    ("ar", ["<s> sort 9 8 7 6 =", "<s> reverse 2 4 6 8 ="], 1.0, 11),
    ("diffusion", ["<s> sort 4 4 1 2 =", "<s> reverse 3 1 2 9 8 ="], 1.0, 12),
    ("self_spec", ["<s> reverse 9 0 9 0 =", "<s> sort 8 1 8 1 ="], 1.0, 13),
    ("self_spec_quadratic", ["<s> sort 5 3 1 4 2 =", "<s> reverse 7 5 3 1 ="], 1.0, 14),
]


@pytest.fixture(scope="module")
def model():
    return nld_jax.load_model(tiny.TINY_MODEL_DIR, dtype="float32")


@pytest.fixture(scope="module")
def solo(model):
    """Each request run alone, one after the other (compiling each mode's program)."""
    return [_call(model, request) for request in REQUESTS]


def _call(model, request, stream=None) -> nld_jax.GenerationOutput:
    mode, prompts, temperature, seed = request
    return nld_jax.generate(model, prompts, mode=mode, max_new_tokens=12,
                            temperature=temperature, seed=seed, stream=stream)


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "streaming"])
def test_eight_threads_each_get_their_solo_result(model, solo, streaming):
    assert len(REQUESTS) == THREADS
    barrier = threading.Barrier(THREADS)

    def worker(index: int) -> tuple[nld_jax.GenerationOutput, list[list[list[int]]]]:
        received: list[list[list[int]]] = []
        barrier.wait()  # all threads enter generate() together
        out = _call(model, REQUESTS[index], received.append if streaming else None)
        return out, received

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(worker, range(THREADS)))
    for request, alone, (out, received) in zip(REQUESTS, solo, results, strict=True):
        assert out.tokens == alone.tokens, request
        assert out.texts == alone.texts and out.num_forwards == alone.num_forwards, request
        if streaming:
            assert received and all(len(call) == len(request[1]) for call in received), request
            for row, tokens in enumerate(out.tokens):
                assert sum((call[row] for call in received), []) == tokens, (request, row)
    assert solo[0].texts == ["1 3 4 9", "5 4 3 2 1"]  # the greedy answers are right, too
    assert len({tuple(map(tuple, alone.tokens)) for alone in solo[4:]}) == 4  # sampled differ
