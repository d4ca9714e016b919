"""benchmarks/kv_capacity.py: its arithmetic, and BENCHMARKS.md holding exactly its output."""

from __future__ import annotations

import pathlib

from benchmarks import kv_capacity as kc
from nld_jax.config import NLDConfig

BENCHMARKS_MD = pathlib.Path(__file__).parents[1] / "BENCHMARKS.md"


def test_benchmarks_md_holds_the_scripts_table():
    text = BENCHMARKS_MD.read_text()
    assert kc.table() in text
    for gpu, total in kc.GPUS.items():
        assert f"{total} B {gpu}" in text
    assert f"{kc.MEMORY_FRACTION} x the" in text and f"{kc.RESERVE_GIB} GiB reserve" in text


def test_kv_bytes_from_the_spec_shapes():
    # spec/model.md: 8B has 34 layers, 8 kv heads of head_dim 128; K and V, bf16.
    row = kc.capacity("8B", 1)
    assert row.kv_bytes_per_token == 2 * 34 * 8 * 128 * 2
    assert kc.capacity("8B", 4).kv_bytes_per_token_per_device == 2 * 34 * 2 * 128 * 2
    # spec/model.md: 8.49B parameters in bf16.
    assert abs(row.weight_bytes_per_device - 8.49e9 * 2) < 0.01 * 8.49e9 * 2


def test_capacity_is_what_memory_leaves_for_the_cache():
    row = kc.capacity("14B", 2)
    for gpu, total in kc.GPUS.items():
        usable = int(total * kc.MEMORY_FRACTION) - kc.RESERVE_GIB * kc.GIB
        tokens = row.tokens_per_device[gpu]
        assert tokens * row.kv_bytes_per_token_per_device + row.weight_bytes_per_device <= usable
        assert (tokens + 1) * row.kv_bytes_per_token_per_device \
            + row.weight_bytes_per_device > usable
        assert row.longest(gpu) == min(tokens, 262144)


def test_kv_heads_replicate_when_tp_does_not_divide_them():
    config = NLDConfig.preset("8B")
    assert [kc.kv_heads_per_device(config, tp) for tp in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert kc.kv_heads_per_device(config, 16) == 8
    assert kc.kv_heads_per_device(NLDConfig.preset("8B", num_key_value_heads=2), 8) == 2
