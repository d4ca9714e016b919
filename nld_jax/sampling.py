"""Token selection: greedy, temperature, top-k and top-p, all inside jit.

Temperature and top-p are traced (changing them does not recompile); top-k is static because
`lax.top_k` needs a static k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["filter_logits", "nucleus_cutoff", "sample_tokens", "is_eos", "leading_run"]


# Digit widths of the radix select in nucleus_cutoff. A round costs one small all-reduce on a
# vocab-sharded mesh (latency, ~10-20 us on NVLink) plus 2**bits compare-and-adds per logit
# (plain XLA reductions cannot scatter into buckets), which run on the CUDA cores, not the
# tensor cores. 8-bit digits (4 rounds) while the rows are few: at T=1 256 compares per logit
# are cheap. 4-bit digits (8 rounds) beyond WIDE_DIGITS_MAX_LOGITS logits: for [1, 32, 131072]
# on one H100, nld_jax.aot's cost model gives 12.9 GFLOP (~0.4 ms) with 8-bit digits against
# 1.65 GFLOP with 4-bit ones (and 319 vs 394 MB); at TP=8, 1.6 vs 0.2 GFLOP a device, where the
# four more all-reduces cost about what the arithmetic saves.
WIDE_DIGITS_MAX_LOGITS = 1 << 19


def _order_key(x: jax.Array) -> jax.Array:
    """uint32 keys ordered as the float32 values are (-0.0 and +0.0 share one key)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    negative = (bits >> 31) == 1
    return bits ^ jnp.where(negative, jnp.uint32(0xFFFFFFFF), jnp.uint32(0x80000000))


def nucleus_cutoff(scaled: jax.Array, key: jax.Array, top_p: jax.Array | float, *,
                   digit_bits: int | None = None) -> jax.Array:
    """uint32 [..., 1]: the order key (see _order_key) of the lowest value top-p keeps.

    A token x is kept iff M(x) = sum of softmax(scaled) over the tokens y > x is < top_p (ties
    of the cutoff all stay; the top-1 always stays). The cutoff is the smallest key k with
    mass(key > k) < top_p (that mass only falls as k grows), selected digit_bits at a time from
    the top: in a round with the higher digits fixed, bucket b holds the keys whose next digit
    is b, and the digit is the lowest b whose mass above the bucket is short of top_p. Each
    round's sums over V are plain reductions (no sort, no gather of the vocabulary), so a
    vocab-sharded input is reduced per shard and all-reduced.

    Args:
      scaled: float32 [..., V], the logits over the temperature.
      key: uint32 [..., V], _order_key(scaled).
      top_p: float scalar in (0, 1].
      digit_bits: bits fixed a round: 1, 2, 4, 8 or 16 (None: 8 up to WIDE_DIGITS_MAX_LOGITS
        logits, else 4).
    """
    if digit_bits is None:
        digit_bits = 8 if scaled.size <= WIDE_DIGITS_MAX_LOGITS else 4
    if digit_bits not in (1, 2, 4, 8, 16):
        raise ValueError(f"{digit_bits=} must be one of 1, 2, 4, 8, 16 (dividing 32)")
    # exp(scaled - max), unnormalised: a bucket's mass is compared with top_p * the total.
    weight = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))
    buckets = jnp.arange(1 << digit_bits, dtype=jnp.uint32)
    cutoff = jnp.zeros(key.shape[:-1] + (1,), jnp.uint32)  # the key's digits found so far
    total = None
    for shift in range(32 - digit_bits, -1, -digit_bits):
        lowest = cutoff | (buckets << shift)  # [..., buckets]: each bucket's lowest key
        # [..., V, buckets], fused into the sum; buckets minor: each logit is read once.
        in_or_above = key[..., :, None] >= lowest[..., None, :]
        at_or_above = jnp.sum(jnp.where(in_or_above, weight[..., None], 0.0), axis=-2)
        if total is None:  # the first round's bucket 0 starts at key 0: every token
            total = at_or_above[..., :1]
        # mass above bucket b = at_or_above[b + 1]; the digit is the lowest b where it is short
        # of top_p: the count of buckets 1.. whose mass at or above still reaches it.
        digit = jnp.sum(at_or_above[..., 1:] >= top_p * total, axis=-1, keepdims=True)
        cutoff = cutoff | (digit.astype(jnp.uint32) << shift)
    return cutoff


def filter_logits(logits: jax.Array, temperature: jax.Array, *, top_k: int = 0,
                  top_p: jax.Array | float = 1.0) -> jax.Array:
    """The sampling distribution's logits: logits / temperature, with top-k/top-p cut to -inf.

    Args:
      logits: float [..., V].
      temperature: float scalar > 0 (a 0 is treated as a tiny temperature).
      top_k: keep the k most likely tokens (0: off).
      top_p: keep the smallest set of tokens whose probability reaches top_p (1.0: off); see
        nucleus_cutoff.
    Returns:
      float32 [..., V]; softmax of it is the distribution tokens are drawn from.
    """
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    if top_k > 0:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    key = _order_key(scaled)
    # The cond picks only the [..., 1] cutoff (0: keep all): a [..., V] result of a cond loses
    # the vocab sharding on a mesh (XLA all-gathers both branches' outputs).
    cutoff = jax.lax.cond(jnp.asarray(top_p) < 1.0, nucleus_cutoff,
                          lambda *_: jnp.zeros(key.shape[:-1] + (1,), jnp.uint32),
                          scaled, key, top_p)
    return jnp.where(key >= cutoff, scaled, -jnp.inf)


def sample_tokens(logits: jax.Array, rng: jax.Array, temperature: jax.Array, *, top_k: int = 0,
                  top_p: jax.Array | float = 1.0) -> jax.Array:
    """Picks one token per row: argmax at temperature 0, else a draw from filter_logits().

    Args:
      logits: float32 [..., V].
      rng: a PRNG key.
      temperature: float scalar; 0 means argmax (greedy).
      top_k, top_p: see filter_logits.
    Returns:
      int32 [...].
    """
    def sampled() -> jax.Array:
        filtered = filter_logits(logits, temperature, top_k=top_k, top_p=top_p)
        return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)

    def greedy() -> jax.Array:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    # A cond, not a where: greedy decoding skips the T x V gumbel draw and the filter.
    return jax.lax.cond(temperature > 0, sampled, greedy)


def is_eos(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
    """bool, same shape as tokens: the token is one of the EOS ids (int32 [E])."""
    return jnp.any(tokens[..., None] == eos_ids, axis=-1)


def leading_run(flags: jax.Array) -> jax.Array:
    """int32 [...]: how many leading entries along the last axis are True."""
    return jnp.sum(jnp.cumprod(flags.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)
