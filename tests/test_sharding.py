"""Tensor and data parallelism on 8 CPU devices (nld_jax.sharding).

The mesh runs happen in tests/mesh_worker.py, a process started with 8 CPU devices (this one
keeps its single device). Every mode, greedy and sampled, must give the single-device tokens
under DP=8, DP=2 x TP=4 and TP=8 on a random checkpoint with 8 kv heads, and under TP=2 x DP=4
on a golden checkpoint (its one kv head replicated by a rules override); each device must hold
1/TP of each sharded weight. The eight prompts have different lengths (a ragged batch), split
over the data-parallel rows.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import nld_jax
from nld_jax.config import NLDConfig
from nld_jax.loading import save_model
from nld_jax.model import NLDModel
from nld_jax.sharding import DEFAULT_RULES, Layout, make_mesh, param_axes, shard_model
from tests.conftest import GOLDEN_DIR
from tests.mesh_cases import PROMPTS, RUNS

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run_worker(checkpoint: pathlib.Path, layouts: str, rules: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "tests.mesh_worker", str(checkpoint), layouts,
                           json.dumps(rules)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=580)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _random_k8(directory: pathlib.Path) -> pathlib.Path:
    raw = json.loads((GOLDEN_DIR / "gqa4_theta1e6" / "config.json").read_text())
    raw.update(num_attention_heads=16, num_key_value_heads=8, head_dim=16, intermediate_size=128)
    model = NLDModel(NLDConfig.from_dict(raw), dtype=jnp.float32, rngs=nnx.Rngs(0))
    save_model(model, directory / "k8", dtype="float32")
    return directory / "k8"


def _check(report: dict, tp_of: dict[str, int], rules: dict) -> None:
    assert report["devices"] == 8
    single = report["single"]
    assert len(single) == 2 * len(nld_jax.MODES)
    assert len({json.dumps(tokens) for tokens in single.values()}) > 1  # the runs differ
    placement = {**DEFAULT_RULES, **rules}
    for layout, result in report["layouts"].items():
        for run, tokens in single.items():
            assert result["tokens"][run] == tokens, (layout, run)
        assert result["params_equal"], layout
        tp = tp_of[layout]
        for name, shard in result["shards"].items():
            axes = param_axes(tuple(name.split(".")), len(shard["shape"]))
            # Each dimension placed on "model" is split TP ways; the rest are whole.
            expected = [size // tp if placement.get(axis) == "model" else size
                        for size, axis in zip(shard["shape"], axes, strict=True)]
            assert shard["devices"] == math.prod(int(n) for n in layout.split("x"))
            assert shard["shards"] == [expected], (layout, name, shard)


@pytest.mark.timeout(600)  # 3 layouts x 8 programs, compiled for 8 devices on 2 cores
def test_tp_dp_and_mixed_give_single_device_tokens(tmp_path):
    report = _run_worker(_random_k8(tmp_path), "8x1,2x4,1x8", {})
    _check(report, {"8x1": 1, "2x4": 4, "1x8": 8}, {})


def test_golden_checkpoint_tp2_dp4_with_replicated_kv_heads():
    rules = {"kv_heads": None}
    report = _run_worker(GOLDEN_DIR / "gqa4_theta1e6", "4x2", rules)
    _check(report, {"4x2": 2}, rules)


def test_every_parameter_has_logical_axes():
    model = nld_jax.load_model(GOLDEN_DIR / "gqa4_theta1e6", dtype="float32")
    assert model.has_lora
    pure = nnx.to_pure_dict(nnx.state(model))
    shardings = Layout.create(make_mesh()).param_shardings(pure)  # raises on an unnamed one
    assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(pure))
    assert param_axes(("layers", "attn", "qkv_kghd"), 5) == ("layers", "kv_heads", None,
                                                             "head_dim", "embed")
    with pytest.raises(ValueError, match="no logical axes"):
        param_axes(("layers", "attn", "mystery"), 2)
    with pytest.raises(ValueError, match="dimensions"):
        param_axes(("embed_vd",), 3)


def test_bad_rules_and_meshes_are_named_errors():
    path = GOLDEN_DIR / "gqa4_theta1e6"
    with pytest.raises(nld_jax.LoadError, match="unknown logical axes"):
        nld_jax.load_model(path, mesh=make_mesh(), rules={"heads": "model"})
    with pytest.raises(nld_jax.LoadError, match="mesh has axes"):
        nld_jax.load_model(path, mesh=make_mesh(), rules={"vocab": "tensor"})
    with pytest.raises(nld_jax.LoadError, match="pass mesh="):
        nld_jax.load_model(path, rules={"vocab": None})
    with pytest.raises(ValueError, match="needs 2 devices"):
        make_mesh(data=2)


def test_kernels_on_a_mesh_run_per_shard_where_heads_and_rows_split_evenly():
    """The attention kernel runs on shards when each device gets whole heads, its query
    heads' kv heads and whole rows; the step kernels stay off on a mesh."""
    from jax.sharding import AbstractMesh, AxisType

    from nld_jax.kernels import Kernels

    mesh = AbstractMesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

    def layout(**rules):  # Layout.create wants a concrete Mesh; the choice reads its shape
        return Layout(mesh, tuple(sorted({**DEFAULT_RULES, **rules}.items())))

    config = nld_jax.NLDConfig.preset("tiny", head_dim=64, num_attention_heads=8,
                                      num_key_value_heads=4)

    def choose(requested, *, block_size=None, batch=2, **rules):
        return Kernels.choose(requested, config=config, dtype=jnp.bfloat16, capacity=128,
                              block_size=block_size, layout=layout(**rules), batch=batch)

    assert choose("pallas") == Kernels(attention=True, step=False)
    with pytest.raises(NotImplementedError, match="kv heads to None"):
        choose("pallas", kv_heads=None)
    with pytest.raises(NotImplementedError, match="3 rows do not divide"):
        choose("pallas", batch=3)
    with pytest.raises(NotImplementedError, match="head_dim is split"):
        choose("pallas", head_dim="model", q_heads=None, kv_heads=None)
    with pytest.raises(NotImplementedError, match="step kernels read whole vocabulary"):
        choose("pallas", block_size=8)
    assert choose("auto", batch=3) == Kernels()  # not on this CPU, nor for 3 rows


def test_shard_model_on_one_device_keeps_tokens():
    model = nld_jax.load_model(GOLDEN_DIR / "gqa4_theta1e6", dtype="float32", lora=False)
    before = nld_jax.generate(model, [[1, 5, 9]], mode="ar", max_new_tokens=6).tokens
    shard_model(model, make_mesh())
    assert model.layout.mesh.size == 1
    assert nld_jax.generate(model, [[1, 5, 9]], mode="ar", max_new_tokens=6).tokens == before


def test_two_processes_give_single_process_tokens(tmp_path):
    """jax.distributed across two processes (4 CPU devices each, gloo), one 2 x 4 mesh."""
    checkpoint = _random_k8(tmp_path)
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    workers = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(rank),
                                 str(port), str(checkpoint)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for rank in (0, 1)]
    outputs = [worker.communicate(timeout=250) for worker in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]
    model = nld_jax.load_model(checkpoint, dtype="float32")
    expected = {name: nld_jax.generate(model, PROMPTS, max_new_tokens=16, block_size=8,
                                       eos_token_ids=[127], **run).tokens
                for name, run in RUNS.items()}
    for out, _ in outputs:
        assert json.loads(out.strip().splitlines()[-1]) == expected


# In one 8-device process: the Orbax copy restores sharded; the shard-local operations
# (the vocab-parallel embedding lookup, attention on each device's heads and rows) match
# their whole-array results.
MESH_CHECK = """
import sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
import numpy as np
from flax import nnx
import nld_jax
from nld_jax.sharding import embed_lookup, make_mesh
whole = nnx.to_pure_dict(nnx.state(nld_jax.load_model(sys.argv[1], dtype="float32")))
model = nld_jax.load_model(sys.argv[2], dtype="float32", mesh=make_mesh(data=2, model=4))
restored = nnx.to_pure_dict(nnx.state(model))
assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
                                 whole, restored))
q = restored["layers"]["attn"]["qkv_kghd"]
assert {s.data.shape for s in q.addressable_shards} == {(2, 2, 4, 16, 64)}, q.sharding
# The vocab-parallel embedding lookup (one row: XLA alone would all-gather the table), also for
# a batch that does not divide over the data axis.
lookup = jax.jit(lambda table, tokens: embed_lookup(table, tokens, model.layout))
for tokens in (np.array([[127]]), np.array([[0, 5], [64, 127], [63, 65]])):
    found = np.asarray(lookup(restored["embed_vd"], tokens))
    assert (found == np.asarray(whole["embed_vd"])[tokens]).all(), tokens
# Attention on shards: 2 rows over "data", 8 query / 4 kv heads over "model" (2 and 1 each).
# The per-device function is the kernel's jnp reference (the Mosaic-GPU interpreter keeps
# global state and cannot run eight devices' kernels at once).
import jax.numpy as jnp
from nld_jax.sharding import heads_on_shards
from pallas_kernels.block_attention_ref import block_attention_ref
keys = jax.random.split(jax.random.key(0), 5)
normal = lambda key, shape: jax.random.normal(key, shape, jnp.bfloat16)
q = normal(keys[0], (2, 8, 8, 64))
k_cache, v_cache = (normal(key, (2, 2, 128, 4, 64)) for key in keys[1:3])
k_block, v_block = (normal(key, (2, 8, 4, 64)) for key in keys[3:])
lengths = jnp.asarray([70, 0], jnp.int32)
on_shards = jax.jit(lambda *a: heads_on_shards(model.layout, block_attention_ref, *a))
for causal, layer in ((True, 1), (False, 0)):
    found = on_shards(q, k_cache, v_cache, lengths, k_block, v_block, causal, layer)
    assert tuple(found.sharding.spec)[:3] == ("data", None, "model"), found.sharding
    expected = block_attention_ref(q, k_cache, v_cache, lengths, k_block, v_block, causal, layer)
    assert (np.asarray(found) == np.asarray(expected)).all(), (causal, layer)
print("ok")
"""


def test_orbax_copy_and_shard_local_operations(tmp_path):
    from convert.hf_to_orbax import convert

    checkpoint = _random_k8(tmp_path)
    convert(checkpoint, tmp_path / "orbax")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", MESH_CHECK, str(checkpoint),
                           str(tmp_path / "orbax")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=250)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
