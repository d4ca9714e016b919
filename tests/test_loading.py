"""load_model: both checkpoint layouts load, and every malformed input fails with a named error."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import stat

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import nld_jax
from nld_jax.loading import save_model
from tests.conftest import GOLDEN_DIR

SINGLE = GOLDEN_DIR / "gqa4_theta1e6"
SHARDED = GOLDEN_DIR / "gqa3_theta1e9_sharded"


def _copy(src: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: pathlib.Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _expect(path: pathlib.Path, *fragments: str, **kwargs) -> None:
    with pytest.raises(nld_jax.LoadError) as info:
        nld_jax.load_model(path, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_single_and_sharded_load_with_lora():
    model = nld_jax.load_model(SINGLE, dtype="float32")
    assert model.has_lora and model.config.num_key_value_heads == 1
    assert nld_jax.load_model(SINGLE, lora=False).has_lora is False
    sharded = nld_jax.load_model(SHARDED, dtype="bfloat16")
    assert sharded.embed_vd.dtype == jnp.bfloat16 and not sharded.has_lora
    assert sharded.config.rope_theta == 1e9  # read from the older rope_scaling spelling


def test_lora_weights_are_peft_layout():
    model = nld_jax.load_model(SINGLE, dtype="float32")
    tensors = load_file(str(SINGLE / "linear_spec_lora" / "adapter_model.safetensors"))
    a = tensors["base_model.model.encoder.layers.1.self_attn.o_proj.lora_A.weight"]
    b = tensors["base_model.model.encoder.layers.1.self_attn.o_proj.lora_B.weight"]
    lora = model.layer(1).attn.lora
    assert lora.scale == 32 / 8
    x = np.random.default_rng(0).normal(size=(1, 1, 4, 32)).astype(np.float32)
    want = 4.0 * (x.reshape(1, 128) @ a.astype(np.float32).T @ b.astype(np.float32).T)
    np.testing.assert_allclose(np.asarray(lora(jnp.asarray(x)))[0], want, rtol=1e-5, atol=1e-6)


def test_save_load_roundtrip(tmp_path):
    model = nld_jax.load_model(SINGLE, dtype="float32")
    save_model(model, tmp_path / "out")
    again = nld_jax.load_model(tmp_path / "out", dtype="float32")
    ids = jnp.arange(12, dtype=jnp.int32)[None]
    np.testing.assert_array_equal(model(ids), again(ids))
    assert again.has_lora


def test_fused_projections_save_back_to_the_released_tensors_bitwise(tmp_path):
    """q/k/v and gate/up are fused at load and split at save: the saved file holds exactly the
    input's tensor names, shapes, dtypes and bits (two kv heads, three query heads each)."""
    model = nld_jax.load_model(SHARDED, dtype="bfloat16")
    assert model.layers.attn.qkv_kghd.shape == (3, 2, 3 + 2, 16, 48)
    assert model.layers.mlp.gate_up_d2f.shape == (3, 48, 2, 80)
    save_model(model, tmp_path / "out", dtype="bfloat16")
    source = {}
    for shard in sorted(SHARDED.glob("*.safetensors")):
        source.update(load_file(str(shard)))
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(saved) == sorted(source)
    for name, tensor in source.items():
        assert saved[name].dtype == tensor.dtype and saved[name].shape == tensor.shape, name
        assert saved[name].tobytes() == tensor.tobytes(), name
    again = nld_jax.load_model(tmp_path / "out", dtype="bfloat16")
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again)),
                    strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_save_replaces_the_whole_directory(tmp_path):
    """Saving a model without the adapter over one with it leaves no stale adapter behind."""
    out = tmp_path / "out"
    with_lora = nld_jax.load_model(SINGLE, dtype="float32")
    save_model(with_lora, out)
    assert (out / "linear_spec_lora").is_dir()
    without = nld_jax.load_model(SINGLE, dtype="float32", lora=False)
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(without, out)
    assert nld_jax.load_model(out).has_lora  # the refused save changed nothing
    save_model(without, out, overwrite=True, extra_files={"notes/log.csv": "step,loss\n"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes"]
    assert (out / "notes" / "log.csv").read_text() == "step,loss\n"
    assert nld_jax.load_model(out).has_lora is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary siblings
    umask = os.umask(0)
    os.umask(umask)
    for path in out.rglob("*"):
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_save_writes_the_tokenizer(tmp_path):
    from nld_jax import tiny

    model = nld_jax.load_model(tiny.TINY_MODEL_DIR, dtype="float32")
    save_model(model, tmp_path / "copy")  # the model's own tokenizer, chat template included
    again = nld_jax.load_model(tmp_path / "copy", dtype="float32")
    assert again.tokenizer == model.tokenizer and again.tokenizer.chat_template is not None
    assert again.tokenizer.encode("<s> sort 3 1 2 4 =") == tiny.encode("<s> sort 3 1 2 4 =")
    for bad in ("../escape.txt", "/abs.txt", "."):
        with pytest.raises(ValueError, match="not a file name inside"):
            save_model(model, tmp_path / "bad", extra_files={bad: "x"})
        assert not (tmp_path / "bad").exists() and not (tmp_path / "escape.txt").exists()
    with pytest.raises(ValueError, match="dtype="):
        save_model(model, tmp_path / "bad", dtype="float16")


def test_missing_tensor(tmp_path):
    path = _copy(SINGLE, tmp_path)
    _rewrite(path / "model.safetensors", lambda t: t.pop("encoder.layers.1.mlp.up_proj.weight"))
    _expect(path, "missing", "encoder.layers.1.mlp.up_proj.weight")


def test_unexpected_tensor(tmp_path):
    path = _copy(SINGLE, tmp_path)
    _rewrite(path / "model.safetensors",
             lambda t: t.update({"lm_head.weight": np.zeros((4, 4), np.float32)}))
    _expect(path, "unexpected", "lm_head.weight", "model.safetensors")


def test_wrong_shape(tmp_path):
    path = _copy(SINGLE, tmp_path)
    _rewrite(path / "model.safetensors", lambda t: t.update(
        {"encoder.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), ml_dtypes.bfloat16)}))
    _expect(path, "encoder.layers.0.self_attn.k_proj.weight", "[64, 64]", "expected [32, 64]")


def test_wrong_dtype(tmp_path):
    path = _copy(SINGLE, tmp_path)
    _rewrite(path / "model.safetensors",
             lambda t: t.update({"encoder.norm.weight": np.ones((64,), np.int32)}))
    _expect(path, "encoder.norm.weight", "I32")


def test_truncated_file(tmp_path):
    path = _copy(SINGLE, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 1000])
    _expect(path, "model.safetensors", "not a readable safetensors file")


def test_not_safetensors(tmp_path):
    path = _copy(SINGLE, tmp_path)
    (path / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    _expect(path, "model.safetensors", "not a readable safetensors file")


def test_index_points_at_missing_shard(tmp_path):
    path = _copy(SHARDED, tmp_path)
    (path / "model-00002-of-00002.safetensors").unlink()
    _expect(path, "missing shard", "model-00002-of-00002.safetensors")


def test_index_disagrees_with_shards(tmp_path):
    path = _copy(SHARDED, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["encoder.norm.weight"] = "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect(path, "encoder.norm.weight", "lacks it")


def test_no_weights_at_all(tmp_path):
    path = _copy(SINGLE, tmp_path)
    (path / "model.safetensors").unlink()
    _expect(path, "neither model.safetensors nor model.safetensors.index.json")


def test_config_does_not_match_tensors(tmp_path):
    path = _copy(SINGLE, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(config))
    _expect(path, "missing", "encoder.layers.2.")
    config["num_hidden_layers"], config["intermediate_size"] = 2, 100
    (path / "config.json").write_text(json.dumps(config))
    _expect(path, "mlp", "from the config", "100]")


def test_bad_config_field(tmp_path):
    path = _copy(SINGLE, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (path / "config.json").write_text(json.dumps(config))
    _expect(path, "config.json", "num_key_value_heads=3")
    del config["vocab_size"]
    (path / "config.json").write_text(json.dumps(config))
    _expect(path, "config.json", "vocab_size")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_is_refused_by_default(tmp_path, bad):
    path = _copy(SINGLE, tmp_path)

    def poison(t):
        weight = t["encoder.layers.0.mlp.down_proj.weight"].astype(np.float32)
        weight[3, 5] = bad
        t["encoder.layers.0.mlp.down_proj.weight"] = weight.astype(ml_dtypes.bfloat16)

    _rewrite(path / "model.safetensors", poison)
    _expect(path, "model.safetensors", "encoder.layers.0.mlp.down_proj.weight", "NaN or Inf",
            lora=False)
    model = nld_jax.load_model(path, lora=False, check_finite=False)  # the switch
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert sum(int((~np.isfinite(np.asarray(leaf, np.float32))).sum()) for leaf in leaves) == 1


def test_nan_in_the_adapter_is_refused(tmp_path):
    path = _copy(SINGLE, tmp_path)
    name = "base_model.model.encoder.layers.1.self_attn.o_proj.lora_A.weight"

    def poison(t):
        t[name] = t[name].copy()
        t[name].flat[-1] = np.nan

    _rewrite(path / "linear_spec_lora" / "adapter_model.safetensors", poison)
    _expect(path, "adapter_model.safetensors", name, "NaN or Inf")
    nld_jax.load_model(path, lora=False)  # the base weights are fine


def test_bad_lora(tmp_path):
    path = _copy(SINGLE, tmp_path)
    lora_file = path / "linear_spec_lora" / "adapter_model.safetensors"
    _rewrite(lora_file, lambda t: t.pop(
        "base_model.model.encoder.layers.0.self_attn.o_proj.lora_B.weight"))
    _expect(path, "missing", "lora_B")
    nld_jax.load_model(path, lora=False)  # the base model is still fine without it
    config_file = path / "linear_spec_lora" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = ["q_proj", "o_proj"]
    config_file.write_text(json.dumps(config))
    _expect(path, "adapter_config.json", "target_modules")
    _expect(tmp_path / "nowhere", "not a directory")
    _expect(path, "does not exist", lora=tmp_path / "no_adapter")


def test_bad_dtype_argument():
    _expect(SINGLE, "dtype", dtype="float16")


class _FakeHub:
    """Stands in for huggingface_hub: snapshot_download 'downloads' the bundled tiny model."""

    def __init__(self, error: Exception | None = None):
        self.calls: list[tuple[str, list[str]]] = []
        self.error = error

    def snapshot_download(self, repo_id: str, allow_patterns: list[str]) -> str:
        self.calls.append((repo_id, allow_patterns))
        if self.error is not None:
            raise self.error
        from nld_jax import tiny

        return str(tiny.TINY_MODEL_DIR)


def test_hub_repo_id_is_downloaded(monkeypatch):
    import sys

    hub = _FakeHub()
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    model = nld_jax.load_model("nvidia/NLD-tiny-test", dtype="float32")
    assert hub.calls and hub.calls[0][0] == "nvidia/NLD-tiny-test"
    assert "*.safetensors" in hub.calls[0][1] and model.has_lora and model.tokenizer is not None


def test_local_paths_never_touch_the_hub(monkeypatch, tmp_path):
    import sys

    from nld_jax import tiny

    hub = _FakeHub(error=AssertionError("the network was used"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    shutil.copytree(tiny.TINY_MODEL_DIR, tmp_path / "owner" / "name")
    monkeypatch.chdir(tmp_path)
    assert nld_jax.load_model("owner/name").config.vocab_size == 17  # shaped like a repo id
    _expect(tmp_path / "owner" / "missing", "not a directory")  # absolute: never a repo id
    with pytest.raises(nld_jax.LoadError, match="not a directory"):
        nld_jax.load_model("./owner/missing")
    with pytest.raises(nld_jax.LoadError, match="not a directory"):
        nld_jax.load_model("owner/name/extra")
    assert not hub.calls


def test_hub_errors_are_clear(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(nld_jax.LoadError, match=r"install huggingface_hub .*nld-jax\[hub\]"):
        nld_jax.load_model("nvidia/NLD-tiny-test")
    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        _FakeHub(error=OSError("offline: cannot reach huggingface.co")))
    with pytest.raises(nld_jax.LoadError, match="downloading it from the Hugging Face Hub "
                                                "failed .*offline"):
        nld_jax.load_model("nvidia/NLD-tiny-test")


def test_the_real_hub_client_fails_offline_with_a_load_error(monkeypatch, tmp_path):
    """With huggingface_hub itself (the test extra installs it) and no network allowed, an
    unknown repo id ends in one LoadError naming it, not the client's own exception."""
    import huggingface_hub  # noqa: F401  (no importorskip: the test extra must provide it)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.chdir(tmp_path)  # "nobody/no-such-model" must not exist locally
    with pytest.raises(nld_jax.LoadError, match=r"nobody/no-such-model: no such directory, and "
                                                r"downloading it from the Hugging Face Hub "
                                                r"failed"):
        nld_jax.load_model("nobody/no-such-model")
