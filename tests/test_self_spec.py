"""Self-speculation (linear and quadratic): greedy equals AR, speculative sampling keeps the AR
distribution."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nld_jax
from nld_jax.cache import KVCache
from tests.conftest import GOLDEN_DIR


def _model(eos: int, lora: bool = False, head_scale: float = 1.0):
    model = nld_jax.load_model(GOLDEN_DIR / "gqa4_theta1e6", dtype="float32",
                               lora=None if lora else False)
    model.config = dataclasses.replace(model.config, eos_token_ids=(eos,))
    if head_scale != 1.0:
        model.head_dv[...] = model.head_dv[...] * head_scale
    return model


SPEC_MODES = ("self_spec", "self_spec_quadratic")


@pytest.mark.parametrize("mode", SPEC_MODES)
@pytest.mark.parametrize("block_size,budget", [(4, 13), (8, 19)])
def test_greedy_equals_ar_on_random_prompts(mode, block_size, budget):
    """60 random prompts in ragged batches of 20; budgets end mid-block; EOS stops mid-block."""
    rng = np.random.default_rng(block_size)
    model = _model(eos=127, lora=True)
    prompts = [rng.integers(0, 128, rng.integers(1, 30)).tolist() for _ in range(60)]
    free = []
    for start in range(0, 60, 20):
        batch = prompts[start:start + 20]
        ar = nld_jax.generate(model, batch, mode="ar", max_new_tokens=budget)
        spec = nld_jax.generate(model, batch, mode=mode, max_new_tokens=budget,
                                block_size=block_size)
        assert spec.tokens == ar.tokens
        assert sum(len(t) == budget for t in ar.tokens) >= 15  # most run to the budget
        free += ar.tokens
    # Now with an EOS that the rows emit at various depths (mid-block and mid-cycle).
    counts = np.bincount([t for row in free for t in row[1:]], minlength=128)
    eos = [int(np.argmax(counts))]
    stopped = 0
    for start in range(0, 60, 20):
        batch = prompts[start:start + 20]
        ar = nld_jax.generate(model, batch, mode="ar", max_new_tokens=budget, eos_token_ids=eos)
        spec = nld_jax.generate(model, batch, mode=mode, max_new_tokens=budget,
                                block_size=block_size, eos_token_ids=eos)
        assert spec.tokens == ar.tokens
        stopped += sum(len(t) < budget for t in ar.tokens)
    assert stopped >= 10  # the EOS path was exercised


def test_forward_counts_and_stats():
    model = _model(eos=127)
    out = nld_jax.generate(model, [[1, 2, 3]], mode="self_spec", max_new_tokens=10,
                           block_size=4)
    cycles = out.stats["cycles"]
    assert out.num_forwards == 2 * cycles
    assert sum(out.stats["accepted_histogram"]) == cycles
    emitted = 1 + sum((c + 1) * n for c, n in enumerate(out.stats["accepted_histogram"]))
    assert emitted >= len(out.tokens[0]) == 10
    # Quadratic: one forward a cycle, plus the bootstrap draft.
    quadratic = nld_jax.generate(model, [[1, 2, 3]], mode="self_spec_quadratic",
                                 max_new_tokens=10, block_size=4)
    assert quadratic.tokens == out.tokens
    assert quadratic.num_forwards == quadratic.stats["cycles"] + 1
    # The prefill's token used the whole budget: no bootstrap forward runs or is counted.
    only_prefill = nld_jax.generate(model, [[1, 2, 3]], mode="self_spec_quadratic",
                                    max_new_tokens=1, block_size=4)
    assert only_prefill.num_forwards == 0 and only_prefill.tokens == [out.tokens[0][:1]]


def test_quadratic_block_layout():
    """The attention pattern of spec/decoding.md section 4, built independently, for T=3."""
    from nld_jax.decode.self_spec_quadratic import block_layout

    t = 3
    offsets, is_mask, visible = block_layout(t)
    names = [("d", i, 0) for i in range(t)] + [("m", i, j) for i in range(t)
                                                for j in range(1, t + 1)]
    for q, (kind_q, i_q, j_q) in enumerate(names):
        assert offsets[q] == i_q + j_q  # d_i at L+i, group i's masks at L+i+1..L+i+T
        assert is_mask[q] == (kind_q == "m")
        for k, (kind_k, i_k, _) in enumerate(names):
            sees_chain = kind_k == "d" and i_k <= i_q
            own_group = kind_q == "m" and kind_k == "m" and i_k == i_q
            assert visible[q, k] == (sees_chain or own_group), (names[q], names[k])


def _first_two_token_marginals(model, prompt: list[int], temperature: float, lora_on: bool):
    """Exact marginals of the 2nd generated token under AR sampling and under the draft.

    p(t2) = sum_t1 p(t1) p(t2 | t1) with the causal network; q(t2) likewise with the draft
    pass (bidirectional [t1, MASK, ...] against the cache, the adapter on).
    """
    c, v = model.config, model.config.vocab_size
    first = jax.nn.softmax(model(jnp.asarray([prompt]))[0, -1] / temperature)
    # Rows whose first token is EOS end there: the 2nd token's law is conditional on not.
    first = first.at[jnp.asarray(c.eos_token_ids)].set(0.0)
    first = first / first.sum()
    cache = KVCache.empty(num_layers=c.num_hidden_layers, batch=v, capacity=64,
                          num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                          dtype=jnp.float32)
    prompts = jnp.tile(jnp.asarray(prompt)[None], (v, 1))
    _, block_kv = model.forward(prompts, cache, causal=True)
    cache = cache.write(block_kv, cache.lengths).advance(jnp.full((v,), len(prompt)))
    seeds = jnp.arange(v)[:, None]
    causal = model.logits(model.forward(seeds, cache, causal=True)[0])
    block = jnp.concatenate([seeds, jnp.full((v, 3), c.mask_token_id)], axis=1)
    draft = model.logits(model.forward(block, cache, causal=False, lora_on=lora_on)[0])
    p = first @ jax.nn.softmax(causal[:, 0] / temperature)
    q = first @ jax.nn.softmax(draft[:, 1] / temperature)
    return np.asarray(p, np.float64), np.asarray(q, np.float64)


def _chi_square_rejects(samples: np.ndarray, probs: np.ndarray, alpha_z: float = 3.09) -> bool:
    """Pearson chi-square goodness of fit; True if rejected at alpha = 1e-3 (z = 3.09)."""
    counts = np.bincount(samples, minlength=probs.size)
    expected = probs / probs.sum() * samples.size
    keep = expected >= 5
    observed, wanted = counts[keep], expected[keep]
    if expected[~keep].sum() > 0:
        observed = np.append(observed, counts[~keep].sum())
        wanted = np.append(wanted, expected[~keep].sum())
    chi2 = ((observed - wanted) ** 2 / wanted).sum()
    dof = observed.size - 1
    critical = dof * (1 - 2 / (9 * dof) + alpha_z * (2 / (9 * dof)) ** 0.5) ** 3
    return bool(chi2 > critical)


SAMPLED_PROMPT = [3, 14, 15, 92]


def _check_sampled_token(model, mode: str, position: int, p: np.ndarray, q: np.ndarray,
                         seed: int, accept_rule: str) -> nld_jax.GenerationOutput:
    """Power first (6000 draws of the draft marginal q are told apart from p), then the mode's
    token at `position`, sampled at temperature 1 for 6000 copies of the prompt, follows p."""
    draft_like = np.random.default_rng(0).choice(p.size, 6000, p=q / q.sum())
    assert _chi_square_rejects(draft_like, p), "the test cannot tell drafts from AR samples"
    out = nld_jax.generate(model, [SAMPLED_PROMPT] * 6000, mode=mode,
                           max_new_tokens=position + 1, temperature=1.0, block_size=4,
                           seed=seed, accept_rule=accept_rule)
    samples = np.array([t[position] for t in out.tokens if len(t) > position])
    assert samples.size > 5000  # few rows ended on EOS before `position`
    assert not _chi_square_rejects(samples, p)
    return out


@pytest.mark.parametrize("accept_rule", ["exact", "match"])
def test_speculative_sampling_keeps_the_ar_distribution(accept_rule):
    """The 2nd token (the first one a spec cycle decides) follows the AR marginal.

    A sharpened head (logits x 8) makes the draft and AR distributions far apart, so a sampler
    that emitted drafts would be rejected: the test checks that it would (power), then that
    self-spec is not (significance 1e-3, 6000 samples, fixed seed).
    """
    model = _model(eos=127, lora=True, head_scale=8.0)
    p, q = _first_two_token_marginals(model, SAMPLED_PROMPT, 1.0, lora_on=True)
    out = _check_sampled_token(model, "self_spec", 1, p, q, seed=5, accept_rule=accept_rule)
    if accept_rule == "exact":
        assert out.stats["mean_accepted"] > 0.2  # drafts were really accepted along the way


def _third_token_marginals(model, prompt: list[int], temperature: float):
    """Exact marginal of the 3rd generated token under AR sampling, and under the first draft.

    p(t3) = sum_{t1,t2} p(t1) p(t2 | t1) p(t3 | t1, t2) over every (t1, t2) pair that is not
    EOS (rows that end early have no 3rd token); q(t3) = sum_t1 p(t1) q(t3 | t1) with the draft
    pass [t1, MASK, MASK, MASK] at block position 2.
    """
    c, v = model.config, model.config.vocab_size
    eos = jnp.asarray(c.eos_token_ids)

    def probs(logits):
        return jax.nn.softmax(logits / temperature, axis=-1).at[..., eos].set(0.0)

    first = probs(model(jnp.asarray([prompt]))[0, -1])  # [V]
    t1 = jnp.arange(v)[:, None]
    ones = jnp.tile(jnp.asarray(prompt)[None], (v, 1))
    second = probs(model(jnp.concatenate([ones, t1], axis=1))[:, -1])  # [V(t1), V(t2)]
    pairs = jnp.stack(jnp.meshgrid(jnp.arange(v), jnp.arange(v), indexing="ij"), -1)
    pairs = pairs.reshape(v * v, 2)
    prefix = jnp.concatenate([jnp.tile(jnp.asarray(prompt)[None], (v * v, 1)), pairs], axis=1)
    third = jax.nn.softmax(model(prefix)[:, -1] / temperature, axis=-1)  # [V*V, V]
    weight = (first[:, None] * second).reshape(v * v)
    p = weight @ third
    cache = KVCache.empty(num_layers=c.num_hidden_layers, batch=v, capacity=64,
                          num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                          dtype=jnp.float32)
    _, block_kv = model.forward(ones, cache, causal=True)
    cache = cache.write(block_kv, cache.lengths).advance(jnp.full((v,), len(prompt)))
    block = jnp.concatenate([t1, jnp.full((v, 3), c.mask_token_id)], axis=1)
    draft = model.logits(model.forward(block, cache, causal=False, lora_on=True)[0])
    q = first @ jax.nn.softmax(draft[:, 2] / temperature)
    return np.asarray(p, np.float64), np.asarray(q, np.float64)


@pytest.mark.parametrize("accept_rule", ["exact", "match"])
def test_quadratic_sampling_keeps_the_ar_distribution(accept_rule):
    """The 3rd token follows the AR marginal in quadratic self-speculation.

    With block 4, the 3rd token is decided by the first cycle (drafts from the bootstrap pass)
    when a draft is accepted, and by the second cycle (drafts from group 0 of the first cycle's
    forward) otherwise, so both sources of drafts are exercised. Power: samples of the draft
    marginal are rejected. Significance 1e-3, 6000 samples, fixed seed.
    """
    model = _model(eos=127, lora=True, head_scale=8.0)
    p, q = _third_token_marginals(model, SAMPLED_PROMPT, 1.0)
    out = _check_sampled_token(model, "self_spec_quadratic", 2, p, q, seed=7,
                               accept_rule=accept_rule)
    histogram = out.stats["accepted_histogram"]
    assert histogram[0] > 0 and sum(histogram[1:]) > 0  # both draft sources decided some rows
