"""nld-convert and the Orbax branch of load_model: equal to the safetensors, atomic, strict."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import nld_jax
from convert import hf_to_orbax
from nld_jax import tiny
from nld_jax.loading import ORBAX_MARKER, ORBAX_VERSION, save_model
from tests.conftest import GOLDEN_DIR

SINGLE = GOLDEN_DIR / "gqa4_theta1e6"  # has linear_spec_lora/
SHARDED = GOLDEN_DIR / "gqa3_theta1e9_sharded"
ROOT = pathlib.Path(__file__).resolve().parents[1]
IDS = jnp.asarray(np.arange(40, dtype=np.int32).reshape(2, 20) % 100)


def _params(model: nld_jax.NLDModel) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model)))
    return {jax.tree_util.keystr(p): np.asarray(leaf) for p, leaf in leaves}


def _assert_same_model(a: nld_jax.NLDModel, b: nld_jax.NLDModel) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)
    assert a.has_lora == b.has_lora
    if a.has_lora:
        assert a.layers.attn.lora.scale == b.layers.attn.lora.scale
    assert a.config == b.config
    np.testing.assert_array_equal(a(IDS), b(IDS))
    np.testing.assert_array_equal(a(IDS, causal=False), b(IDS, causal=False))


def _siblings(dst: pathlib.Path) -> list[str]:
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}."))


@pytest.mark.parametrize("src", [SINGLE, SHARDED], ids=["single_lora", "sharded"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_copy_loads_identically(tmp_path, src, dtype):
    dst = tmp_path / "orbax"
    hf_to_orbax.convert(src, dst, dtype=dtype, progress=False)
    marker = json.loads((dst / ORBAX_MARKER).read_text())
    assert marker["dtype"] == dtype and marker["has_lora"] == (src == SINGLE)
    assert (dst / "config.json").read_bytes() == (src / "config.json").read_bytes()
    _assert_same_model(nld_jax.load_model(src, dtype=dtype), nld_jax.load_model(dst, dtype=dtype))
    assert _siblings(dst) == []


def test_dtype_is_cast_on_restore(tmp_path):
    dst = tmp_path / "orbax"
    hf_to_orbax.convert(SINGLE, dst, dtype="bfloat16", progress=False)
    # The released tensors are bf16, so an f32 model restored from the bf16 copy is exact.
    _assert_same_model(nld_jax.load_model(SINGLE, dtype="float32"),
                       nld_jax.load_model(dst, dtype="float32"))


def test_lora_options(tmp_path):
    with_lora, without = tmp_path / "with", tmp_path / "without"
    hf_to_orbax.convert(SINGLE, with_lora, dtype="float32", progress=False)
    assert hf_to_orbax.main([str(SINGLE), str(without), "--dtype", "float32", "--no-lora"]) == 0
    assert not (without / "linear_spec_lora").exists()
    assert nld_jax.load_model(without).has_lora is False
    _assert_same_model(nld_jax.load_model(SINGLE, dtype="float32", lora=False),
                       nld_jax.load_model(with_lora, dtype="float32", lora=False))
    adapter = SINGLE / "linear_spec_lora"
    _assert_same_model(nld_jax.load_model(SINGLE, dtype="float32"),
                       nld_jax.load_model(without, dtype="float32", lora=adapter))


def test_tiny_model_copy_generates_the_same(tmp_path):
    dst = tmp_path / "tiny_orbax"
    assert hf_to_orbax.main([str(tiny.TINY_MODEL_DIR), str(dst), "--dtype", "float32"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (dst / name).read_bytes() == (tiny.TINY_MODEL_DIR / name).read_bytes()
    a = nld_jax.load_model(tiny.TINY_MODEL_DIR, dtype="float32")
    b = nld_jax.load_model(dst, dtype="float32")
    _assert_same_model(a, b)
    for mode in ("ar", "self_spec"):
        out_a = nld_jax.generate(a, ["<s> sort 3 9 1 4 ="], mode=mode, max_new_tokens=8)
        out_b = nld_jax.generate(b, ["<s> sort 3 9 1 4 ="], mode=mode, max_new_tokens=8)
        assert out_a.tokens == out_b.tokens and out_b.texts == ["1 3 4 9"]


def test_progress_bar_and_summary(tmp_path, capsys):
    assert hf_to_orbax.main([str(SHARDED), str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "tensor" in captured.err and "100%" in captured.err
    assert captured.out.strip() == f"wrote {tmp_path / 'out'}"


def test_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert hf_to_orbax.main([str(SHARDED), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    assert os.listdir(dst) == ["keep.txt"]
    assert hf_to_orbax.main([str(SHARDED), str(dst), "--overwrite"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / ORBAX_MARKER).is_file()
    assert _siblings(dst) == []


def test_invalid_source_writes_nothing(tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(SINGLE, src)
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] += 1  # the tensors no longer match
    (src / "config.json").write_text(json.dumps(config))
    dst = tmp_path / "out"
    assert hf_to_orbax.main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "nld-convert: error:" in err and "shape" in err and "Traceback" not in err
    assert not dst.exists() and _siblings(dst) == []
    assert hf_to_orbax.main([str(src), str(dst), "--dtype", "float16"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    for nested in (tmp_path, src, src / "inside"):  # replacing one would delete the other
        assert hf_to_orbax.main([str(src), str(nested), "--overwrite"]) == 2
        assert "must not contain each other" in capsys.readouterr().err
        assert src.is_dir() and not (src / "inside").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_failure_midway_leaves_no_checkpoint(tmp_path, monkeypatch, existing):
    dst = tmp_path / "out"
    if existing:  # an earlier good copy must survive a failed --overwrite
        hf_to_orbax.convert(SHARDED, dst, dtype="float32", progress=False)
    calls = []

    def failing_copy(src: str, dst: str) -> None:
        calls.append(src)  # the parameters are already written by then
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(hf_to_orbax.shutil, "copy2", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        hf_to_orbax.convert(SINGLE, dst, dtype="float32", overwrite=existing, progress=False)
    assert calls and _siblings(dst) == []
    if existing:
        _assert_same_model(nld_jax.load_model(SHARDED, dtype="float32"),
                           nld_jax.load_model(dst, dtype="float32"))
    else:
        assert not dst.exists()
        with pytest.raises(nld_jax.LoadError):
            nld_jax.load_model(dst)


def _converted(tmp_path: pathlib.Path) -> pathlib.Path:
    dst = tmp_path / "orbax"
    hf_to_orbax.convert(SINGLE, dst, dtype="float32", progress=False)
    return dst


def _edit_json(path: pathlib.Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_bad_orbax_directories_raise_load_error(tmp_path):
    dst = _converted(tmp_path)
    _edit_json(dst / ORBAX_MARKER, version=99)
    with pytest.raises(nld_jax.LoadError, match=r"nld_orbax.json: version=99"):
        nld_jax.load_model(dst)
    _edit_json(dst / ORBAX_MARKER, version=ORBAX_VERSION, lora_rank=4)
    with pytest.raises(nld_jax.LoadError, match=r"params: parameter .*lora.* has shape"):
        nld_jax.load_model(dst)
    _edit_json(dst / ORBAX_MARKER, lora_rank=8)
    _edit_json(dst / "config.json", num_hidden_layers=1)  # layers are stacked: [2, ...] stored
    with pytest.raises(nld_jax.LoadError,
                       match=r"params: parameter 'layers\..*' has shape \[2, .*expected \[1, "):
        nld_jax.load_model(dst)
    shutil.copy(SINGLE / "config.json", dst / "config.json")
    assert nld_jax.load_model(dst).has_lora  # repaired
    shutil.rmtree(dst / "params")
    with pytest.raises(nld_jax.LoadError, match=r"params: missing"):
        nld_jax.load_model(dst)


def test_corrupt_orbax_arrays_raise_load_error(tmp_path):
    dst = _converted(tmp_path)
    for path in (dst / "params" / "ocdbt.process_0" / "d").iterdir():  # the array data
        path.write_bytes(path.read_bytes()[:16])
    # In a subprocess: after a failed read Orbax's worker threads print "Event loop is closed"
    # noise at exit, which would otherwise land in this session's warnings.
    code = ("import sys, nld_jax\n"
            "try:\n    nld_jax.load_model(sys.argv[1])\n"
            "except nld_jax.LoadError as e:\n    print('LoadError:', e)\n")
    result = subprocess.run([sys.executable, "-c", code, str(dst)], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)
    assert f"LoadError: {dst / 'params'}: cannot restore the parameters" in result.stdout, \
        result.stdout + result.stderr
    # Metadata that names no parameters (an emptied store) is caught before any read.
    (dst / "params" / "_METADATA").write_text("{}")
    with pytest.raises(nld_jax.LoadError, match=r"params: "):
        nld_jax.load_model(dst)


def test_check_finite_on_the_orbax_copy(tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(SHARDED, src)
    shard = next(src.glob("model-*.safetensors"))
    tensors = load_file(str(shard))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = np.nan
    save_file(tensors, str(shard))
    dst = tmp_path / "orbax"
    with pytest.raises(nld_jax.LoadError, match=r"model-00001-of-00002.safetensors: tensor .* "
                                                r"contains NaN or Inf"):
        hf_to_orbax.convert(src, dst, progress=False)  # the source is checked by default
    assert not dst.exists() and _siblings(dst) == []
    # An Orbax copy holding NaN (written with the check off) is refused on load by default.
    monkeypatch.setattr(nld_jax, "load_model",
                        functools.partial(nld_jax.load_model, check_finite=False))
    hf_to_orbax.convert(src, dst, dtype="float32", progress=False)
    monkeypatch.undo()
    nld_jax.load_model(dst, check_finite=False)
    with pytest.raises(nld_jax.LoadError, match=r"params: parameter .* contains NaN or Inf"):
        nld_jax.load_model(dst)


def test_converts_a_hub_repo_id(monkeypatch, tmp_path):
    """The source may be a Hub repo id: downloaded first, then converted with its files."""
    calls = []

    class FakeHub:
        @staticmethod
        def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
            calls.append(repo_id)
            return str(tiny.TINY_MODEL_DIR)

    monkeypatch.setitem(sys.modules, "huggingface_hub", FakeHub)
    hf_to_orbax.convert("nvidia/NLD-tiny-test", tmp_path / "out", progress=False)
    assert calls == ["nvidia/NLD-tiny-test"]
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert nld_jax.load_model(tmp_path / "out").config.vocab_size == 17


def test_keeps_the_source_dtype_unless_told(tmp_path):
    """A float32 source converts to float32 (not bf16), so the copy loads exactly equal."""
    src = tmp_path / "f32"
    save_model(nld_jax.load_model(SINGLE, dtype="float32"), src, dtype="float32")
    rng = np.random.default_rng(0)  # values bf16 cannot hold, as a trained f32 model has
    tensors = {name: (t + rng.normal(size=t.shape) * 1e-3).astype(np.float32)
               for name, t in load_file(str(src / "model.safetensors")).items()}
    save_file(tensors, str(src / "model.safetensors"))
    assert hf_to_orbax.main([str(src), str(tmp_path / "kept")]) == 0
    assert json.loads((tmp_path / "kept" / ORBAX_MARKER).read_text())["dtype"] == "float32"
    _assert_same_model(nld_jax.load_model(src, dtype="float32"),
                       nld_jax.load_model(tmp_path / "kept", dtype="float32"))
    assert hf_to_orbax.main([str(src), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "bf16" / ORBAX_MARKER).read_text())["dtype"] == "bfloat16"
    hf_to_orbax.convert(SINGLE, tmp_path / "from_bf16", progress=False)  # bf16 stays bf16
    assert json.loads((tmp_path / "from_bf16" / ORBAX_MARKER).read_text())["dtype"] == "bfloat16"


# Runs nld-convert with a pause (printing "ready") in the read or the write phase, so that a
# signal surely arrives in the middle of that phase.
_PAUSED_CONVERT = """
import sys, time
import nld_jax
from convert import hf_to_orbax

def pause():
    print("ready", flush=True)
    time.sleep(120)

if sys.argv[1] == "read":
    real_load = nld_jax.load_model
    def load_model(*args, **kwargs):
        pause()
        return real_load(*args, **kwargs)
    nld_jax.load_model = load_model
else:
    real_write = hf_to_orbax._write
    def write(*args):
        real_write(*args)  # the parameters are on disk in the temporary directory
        pause()
    hf_to_orbax._write = write
sys.exit(hf_to_orbax.main(sys.argv[2:]))
"""


def _paused_convert(phase: str, *args: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", _PAUSED_CONVERT, phase, *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT,  # SIGINT may be ignored by a background job's shell
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert process.stdout.readline() == "ready\n", process.communicate(timeout=60)
    return process


@pytest.mark.parametrize("phase", ["read", "write"])
def test_ctrl_c_is_one_line_status_130_and_keeps_the_old_copy(tmp_path, phase):
    dst = tmp_path / "out"
    hf_to_orbax.convert(SHARDED, dst, dtype="float32", progress=False)
    before = sorted(str(p.relative_to(dst)) for p in dst.rglob("*"))
    process = _paused_convert(phase, str(SINGLE), str(dst), "--overwrite")
    if phase == "write":
        assert len(_siblings(dst)) == 1  # the new copy, written beside dst
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.endswith("nld-convert: interrupted\n"), err
    assert "Traceback" not in err and "wrote" not in out
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == before
    assert _siblings(dst) == []
    _assert_same_model(nld_jax.load_model(SHARDED, dtype="float32"),
                       nld_jax.load_model(dst, dtype="float32"))


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path):
    dst = tmp_path / "out"
    process = _paused_convert("write", str(SINGLE), str(dst))
    process.kill()  # kill -9: no chance to clean up
    process.communicate(timeout=60)
    leftovers = _siblings(dst)
    assert len(leftovers) == 1 and leftovers[0].startswith(f".out.tmp-{process.pid}-")
    assert not dst.exists()
    assert hf_to_orbax.main([str(SINGLE), str(dst)]) == 0
    assert _siblings(dst) == [] and nld_jax.load_model(dst).has_lora
