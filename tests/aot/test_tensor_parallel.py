"""A tensor-parallel 8B forward and sampling step compiled for eight H100s (a deviceless 1x1x8
topology)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest

import nld_jax
from nld_jax import aot
from nld_jax.sampling import sample_tokens

CONFIG = nld_jax.NLDConfig.preset("8B")
TP = 8
SLOTS = 1344


@pytest.fixture(scope="module")
def forward():
    layout = aot.target_layout("h100", model=TP)
    # The layers scanned: the body (and its collectives) appears once, and it compiles fast.
    return aot.compile_forward(CONFIG, 1, SLOTS, 1024, mesh=layout.mesh, attention="xla",
                               layout=layout, layer_loop="scan")


def test_each_device_holds_an_eighth_of_the_weights_and_cache(forward):
    _, state = aot.abstract_model(CONFIG, aot.target_mesh("h100"))
    weights = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
    c = CONFIG
    cache = 2 * c.num_hidden_layers * SLOTS * c.num_key_value_heads * c.head_dim * 2
    per_device = forward.program.argument_bytes
    # Every weight matrix is split 8 ways; the norms (a few hundred kB) are replicated.
    assert (weights + cache) / TP <= per_device <= (weights + cache) / TP + 4e6, per_device


def test_all_reduces_only_where_the_math_needs_them(forward):
    """One all-reduce of the [B, T, D] hidden state for the embedding lookup (vocab-parallel:
    no all-gather of the table), one after o_proj and one after down_proj in the layer body;
    the logits stay split over the vocabulary."""
    collectives = forward.program.collectives
    assert set(collectives) == {"all-reduce"}, collectives
    assert collectives["all-reduce"] == aot.Collective(3, 3 * CONFIG.hidden_size * 2)
    # No gathered table and no copy of a weight: the embedding's all-gather was 1.07 GB, and
    # the fused q/k/v weight stored D-major was transposed whole on every forward (214 MB a
    # device, benchmarks/NOTES_h100.md). What is left is activations and the attention scores.
    assert forward.program.temp_bytes < 64e6, forward.program.temp_bytes


def test_attention_kernel_runs_on_each_devices_heads():
    """The Pallas kernel under TP=8 (shard_map: 4 query heads and their kv head per device):
    it compiles for sm_90a without spills and adds no collective."""
    layout = aot.target_layout("h100", model=TP)
    forward = aot.compile_forward(CONFIG, 1, SLOTS, 1024, mesh=layout.mesh, attention="pallas",
                                  layout=layout, layer_loop="scan")
    assert forward.program.kernel_calls == 1  # the scanned layer body
    assert [r.spill_bytes for r in forward.program.ptxas] == [0], forward.program.ptxas
    assert forward.program.collectives == {"all-reduce": aot.Collective(3, 3 * 4096 * 2)}


def test_top_p_sampling_of_vocab_sharded_logits_gathers_no_vocabulary():
    """A T=32 sampling step (top-p filter and draw) on f32 logits split over the vocabulary, as
    the head leaves them: the radix select's rounds are small all-reduces ([1, 32, buckets]
    partial sums, and the max), the draw's argmax all-gathers each shard's (max, index) pairs.
    The sort-based top-p gathered the whole logits (16.8 MB a gather) and all-to-all'ed them."""
    layout = aot.target_layout("h100", model=TP)
    logits = jax.ShapeDtypeStruct((1, 32, CONFIG.vocab_size), jnp.float32,
                                  sharding=layout.sharding((None, None, "vocab")))
    scalars = aot.abstract((jax.random.key(0), jnp.float32(1), jnp.float32(0.9)), layout.mesh)
    program = aot.compile_program(lambda x, key, temperature, top_p: sample_tokens(
        x, key, temperature, top_p=top_p), logits, *scalars)
    collectives = program.collectives
    assert set(collectives) == {"all-reduce", "all-gather"}, collectives
    assert collectives["all-reduce"].count <= 1 + 32 // 4, collectives  # max + 8 rounds
    assert collectives["all-reduce"].bytes < 64e3, collectives
    assert collectives["all-gather"].bytes < 8e3, collectives  # 32 rows x 8 shards x pairs
    logits_per_device = 32 * CONFIG.vocab_size * 4 / TP
    assert program.temp_bytes < 4 * logits_per_device, program.temp_bytes
