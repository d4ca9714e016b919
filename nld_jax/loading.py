"""load_model(): a released Hugging Face directory (or its Orbax copy) -> NLDModel, strictly.

Everything is checked before any weight is read: the config, the set of tensor names (one table
maps every released name to a parameter), every shape and dtype. Tensors are then read one at a
time with the numpy backend of safetensors (no torch), transposed to the Flax layout and cast.
The model is assembled only after every tensor has been read, so a failure never leaves a
partially loaded model behind.

An Orbax directory (written by `nld-convert`, recognised by its `nld_orbax.json` marker) holds
the parameters already in the Flax layout: the checkpoint's metadata is checked against the
abstract model, then Orbax restores every array straight into place (cast to `dtype`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from nld_jax.atomic import atomic_directory, file_mode
from nld_jax.config import ConfigError, NLDConfig
from nld_jax.model import NLDModel
from nld_jax.sharding import Layout
from nld_jax.tokenizer import TOKENIZER_FILE, Tokenizer, TokenizerError, load_tokenizer

__all__ = ["load_model", "save_model", "source_dtype", "resolve_checkpoint_dir", "LoadError",
           "LORA_DIR", "ORBAX_MARKER", "ORBAX_PARAMS", "ORBAX_FORMAT", "ORBAX_VERSION"]

LORA_DIR = "linear_spec_lora"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = {"BF16", "F16", "F32"}
# An Orbax directory: the marker (JSON: format, version, dtype, LoRA rank and scale), config.json,
# the tokenizer files, and the parameters (nnx.to_pure_dict of the model's state) in params/.
ORBAX_MARKER = "nld_orbax.json"
ORBAX_PARAMS = "params"
ORBAX_FORMAT = "nld_jax.orbax"
ORBAX_VERSION = 3  # 2: q/k/v and gate/up fused; 3: q/k/v fused D-minor (qkv_kghd)


class LoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


# What a released repository holds that load_model reads (weights, adapter, config, tokenizer).
HUB_PATTERNS = ("*.json", "*.safetensors", "*.jinja", f"{LORA_DIR}/*")
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def resolve_checkpoint_dir(path: str) -> str:
    """A local directory as given; a Hugging Face Hub repo id ("owner/name") downloaded first.

    Anything that exists locally, or is not shaped like a repo id, never touches the network.
    """
    if os.path.exists(path) or not _HUB_REPO_ID.fullmatch(path):
        if not os.path.isdir(path):
            raise LoadError(f"{path}: not a directory")
        return path
    try:
        import huggingface_hub
    except ImportError:
        raise LoadError(f"{path}: no such directory; to download it as a Hugging Face Hub repo "
                        f"install huggingface_hub (pip install 'nld-jax[hub]')") from None
    try:
        return huggingface_hub.snapshot_download(path, allow_patterns=list(HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated, ...: one clear line
        raise LoadError(f"{path}: no such directory, and downloading it from the Hugging Face "
                        f"Hub failed ({type(e).__name__}: {e})") from None


# A parameter's one name in this module: its keys in nnx.to_pure_dict(state), e.g.
# ("layers", "attn", "qkv_kghd") (layers are stacked, so no key is a layer index).
type _Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Rule:
    """How one released tensor becomes one parameter."""

    path: _Path
    hf_shape: tuple[int, ...]  # shape in the file ([out, in] for Linear)
    # Linear [out, in] -> [in, out] (then reshaped to the parameter's shape); a conv
    # [out, C, kh, kw] flattens its input axes first: [C * kh * kw, out]. Not transposed: the
    # file's order, reshaped ([out, in] -> [out dims..., in dims...]).
    transposed: bool
    layer: int | None = None  # the index in the parameter's leading [L] axis (stacked layers)
    # A fused parameter holds several tensors: this one is [start, stop) of the (per-layer)
    # parameter's axis `axis`, as (axis, start, stop); None: the whole parameter.
    part: tuple[int, int, int] | None = None

    def part_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape this tensor has in the Flax layout, given the (per-layer) parameter's."""
        if self.part is None:
            return shape
        axis, start, stop = self.part
        return (*shape[:axis], stop - start, *shape[axis + 1:])

    def take(self, value: np.ndarray) -> np.ndarray:
        """This tensor's part of the (per-layer) parameter value."""
        if self.part is None:
            return value
        axis, start, stop = self.part
        return value[(slice(None),) * axis + (slice(start, stop),)]

    def to_flax(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return (w.reshape(w.shape[0], -1).T if self.transposed else w).reshape(shape)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        if self.transposed:
            w = w.reshape(-1, self.hf_shape[0]).T
        return w.reshape(self.hf_shape)


def _base_rules(c: NLDConfig) -> dict[str, _Rule]:
    """The one table: released tensor name -> rule."""
    d, n, k, h, f, v = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                        c.intermediate_size, c.vocab_size)
    g = n // k
    qkv, gate_up = ("layers", "attn", "qkv_kghd"), ("layers", "mlp", "gate_up_d2f")
    rules = {
        "encoder.embed_tokens.weight": _Rule(("embed_vd",), (v, d), False),
        "encoder.norm.weight": _Rule(("final_norm", "weight"), (d,), False),
        "diffusion_head.weight": _Rule(("head_dv",), (v, d), True),
    }
    for i in range(c.num_hidden_layers):
        pre = f"encoder.layers.{i}."
        rules.update({
            pre + "input_layernorm.weight": _Rule(("layers", "input_norm", "weight"), (d,), False,
                                                  i),
            pre + "post_attention_layernorm.weight": _Rule(
                ("layers", "post_attn_norm", "weight"), (d,), False, i),
            # Query head j*G + i is slot i of kv head j (the heads that share its K/V).
            pre + "self_attn.q_proj.weight": _Rule(qkv, (n * h, d), False, i, (1, 0, g)),
            pre + "self_attn.k_proj.weight": _Rule(qkv, (k * h, d), False, i, (1, g, g + 1)),
            pre + "self_attn.v_proj.weight": _Rule(qkv, (k * h, d), False, i, (1, g + 1, g + 2)),
            pre + "self_attn.o_proj.weight": _Rule(("layers", "attn", "o_nhd"), (d, n * h), True,
                                                   i),
            pre + "mlp.gate_proj.weight": _Rule(gate_up, (f, d), True, i, (1, 0, 1)),
            pre + "mlp.up_proj.weight": _Rule(gate_up, (f, d), True, i, (1, 1, 2)),
            pre + "mlp.down_proj.weight": _Rule(("layers", "mlp", "down_fd"), (d, f), True, i),
        })
    if c.multimodal is not None:
        rules.update(_vision_rules(c))
    return rules


def _vision_rules(c: NLDConfig) -> dict[str, _Rule]:
    """The VLM's tower and projector tensors (spec/vlm.md section 2) -> rules."""
    assert c.multimodal is not None
    v, e = c.multimodal.vision, c.hidden_size
    d, n, h, f = v.hidden_size, v.num_attention_heads, v.head_dim, v.intermediate_size
    tower, proj = "encoder.vision_tower.", "encoder.multi_modal_projector."
    rules = {
        tower + "patch_conv.weight": _Rule(("vision", "patch_pd"),
                                           (d, v.num_channels, v.patch_size, v.patch_size), True),
        tower + "ln_pre.weight": _Rule(("vision", "ln_pre_d"), (d,), False),
        proj + "norm.weight": _Rule(("vision", "proj_norm_d"), (d,), False),
        proj + "patch_merger.merging_layer.weight": _Rule(("vision", "merge_kd"), (d, 4 * d),
                                                          True),
        proj + "linear_1.weight": _Rule(("vision", "linear_1_de"), (e, d), True),
        proj + "linear_2.weight": _Rule(("vision", "linear_2_ee"), (e, e), True),
    }
    per_layer = {
        "attention_norm.weight": ("attn_norm_ld", (d,), False),
        "ffn_norm.weight": ("ffn_norm_ld", (d,), False),
        "attention.q_proj.weight": ("q_ldnh", (n * h, d), True),
        "attention.k_proj.weight": ("k_ldnh", (n * h, d), True),
        "attention.v_proj.weight": ("v_ldnh", (n * h, d), True),
        "attention.o_proj.weight": ("o_lnhd", (d, n * h), True),
        "feed_forward.gate_proj.weight": ("gate_ldf", (f, d), True),
        "feed_forward.up_proj.weight": ("up_ldf", (f, d), True),
        "feed_forward.down_proj.weight": ("down_lfd", (d, f), True),
    }
    for i in range(v.num_hidden_layers):
        for name, (param, shape, transposed) in per_layer.items():
            rules[f"{tower}transformer.layers.{i}.{name}"] = _Rule(("vision", param), shape,
                                                                   transposed, i)
    return rules


def _lora_rules(c: NLDConfig, rank: int) -> dict[str, _Rule]:
    """PEFT keys of the o_proj adapter -> rules."""
    d, n, h = c.hidden_size, c.num_attention_heads, c.head_dim
    rules = {}
    for i in range(c.num_hidden_layers):
        pre = f"base_model.model.encoder.layers.{i}.self_attn.o_proj."
        path = ("layers", "attn", "lora")
        rules[pre + "lora_A.weight"] = _Rule((*path, "a_nhr"), (rank, n * h), True, i)
        rules[pre + "lora_B.weight"] = _Rule((*path, "b_rd"), (d, rank), True, i)
    return rules


def _open(path: str) -> Any:
    try:
        return safe_open(path, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise LoadError(f"{path}: not a readable safetensors file ({e})") from None


def _tensor_files(model_dir: str) -> dict[str, str]:
    """tensor name -> file, from the index or the single file; checks every file's header."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    single_path = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise LoadError(f"{index_path}: not a valid safetensors index ({e!r})") from None
        located = {name: os.path.join(model_dir, file) for name, file in weight_map.items()}
    elif os.path.isfile(single_path):
        located = None
    else:
        raise LoadError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} is present")

    files = sorted(set(located.values())) if located is not None else [single_path]
    found: dict[str, str] = {}
    for path in files:
        if not os.path.isfile(path):
            missing_for = sorted(n for n, p in located.items() if p == path)[:3]
            raise LoadError(f"{index_path}: points at missing shard {path} "
                            f"(for tensors such as {missing_for})")
        with _open(path) as handle:
            for name in handle.keys():
                if name in found:
                    raise LoadError(f"{path}: tensor {name!r} also appears in {found[name]}")
                found[name] = path
    if located is not None:
        for name, path in located.items():
            if found.get(name) != path:
                raise LoadError(f"{index_path}: maps tensor {name!r} to {path}, which lacks it")
        for name, path in found.items():
            if name not in located:
                raise LoadError(f"{path}: tensor {name!r} is not listed in {index_path}")
    return found


def _check_tensors(rules: dict[str, _Rule], files: dict[str, str], where: str) -> None:
    """Names, shapes and dtypes against the rules, from the headers alone."""
    missing = sorted(set(rules) - set(files))
    if missing:
        raise LoadError(f"{where}: missing {len(missing)} tensor(s), e.g. {missing[:5]}")
    unexpected = sorted(set(files) - set(rules))
    if unexpected:
        raise LoadError(f"{where}: unexpected tensor(s) {unexpected[:5]} in "
                        f"{files[unexpected[0]]} (config and checkpoint disagree?)")
    by_file: dict[str, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with _open(path) as handle:
            for name in names:
                meta = handle.get_slice(name)
                shape, dtype = tuple(meta.get_shape()), meta.get_dtype()
                if shape != rules[name].hf_shape:
                    raise LoadError(f"{path}: tensor {name!r} has shape {list(shape)}, expected "
                                    f"{list(rules[name].hf_shape)} from the config")
                if dtype not in _FLOAT_DTYPES:
                    raise LoadError(f"{path}: tensor {name!r} has dtype {dtype}, expected one of "
                                    f"{sorted(_FLOAT_DTYPES)}")


def _read(rules: dict[str, _Rule], files: dict[str, str], shapes: dict, check_finite: bool,
          on_tensor: Callable[[str, int], None] | None = None
          ) -> Iterator[tuple[_Path, jax.Array]]:
    """Yields (parameter path, array in the dtype of its struct in `shapes`) one parameter at a
    time; on_tensor(name, total) after each tensor. A stacked layer parameter (or a fused one)
    is yielded once all its tensors have been read (the files are read in order, so only the
    pieces of the parameters being assembled wait in host memory)."""
    counts: dict[_Path, int] = {}
    for name in files:
        counts[rules[name].path] = counts.get(rules[name].path, 0) + 1
    pending: dict[_Path, list[tuple[_Rule, np.ndarray]]] = {}
    for name in sorted(files, key=lambda n: (files[n], n)):
        with _open(files[name]) as handle:
            try:
                raw = handle.get_tensor(name)
            except SafetensorError as e:
                raise LoadError(f"{files[name]}: cannot read tensor {name!r} ({e})") from None
        # np.isfinite reads bf16 (ml_dtypes) in place: 6x faster than through an f32 copy.
        if check_finite and not np.isfinite(raw).all():
            raise LoadError(f"{files[name]}: tensor {name!r} contains NaN or Inf")
        rule = rules[name]
        struct = _get(shapes, rule.path)
        inner = struct.shape if rule.layer is None else struct.shape[1:]
        parts = pending.setdefault(rule.path, [])
        parts.append((rule, rule.to_flax(raw, rule.part_shape(inner))))
        if len(parts) == counts[rule.path]:
            del pending[rule.path]
            yield rule.path, jnp.asarray(_assemble(parts), dtype=struct.dtype)
        if on_tensor is not None:
            on_tensor(name, len(files))


def _join(parts: list[tuple[_Rule, np.ndarray]]) -> np.ndarray:
    """One layer's parameter from its tensors: the parts in order along their axis."""
    spans = sorted(((rule.part, array) for rule, array in parts if rule.part is not None),
                   key=lambda span: span[0][1])
    if not spans:  # a whole parameter: one tensor
        return parts[0][1]
    return np.concatenate([array for _, array in spans], axis=spans[0][0][0])


def _assemble(parts: list[tuple[_Rule, np.ndarray]]) -> np.ndarray:
    """A parameter from all its tensors: each layer's parts joined, the layers stacked."""
    by_layer: dict[int | None, list[tuple[_Rule, np.ndarray]]] = {}
    for rule, array in parts:
        by_layer.setdefault(rule.layer, []).append((rule, array))
    if None in by_layer:
        return _join(by_layer[None])
    return np.stack([_join(by_layer[i]) for i in range(len(by_layer))])


def _flat_range(dims: tuple[int, ...], index: tuple[slice, ...], name: str) -> slice:
    """The flat (row-major) range of `index` into `dims`: contiguous only when every dimension
    after the first sliced one is whole (heads split, head_dim whole: the rules' placements)."""
    starts = [sl.indices(size)[0] for sl, size in zip(index, dims, strict=True)]
    stops = [sl.indices(size)[1] for sl, size in zip(index, dims, strict=True)]
    sliced = [i for i, size in enumerate(dims) if (starts[i], stops[i]) != (0, size)]
    if len(sliced) > 1 or (sliced and any(dims[i] > 1 for i in range(sliced[0]))):
        raise LoadError(f"{name}: a shard {index} of dimensions {dims} is not one contiguous "
                        f"range of the file's tensor (shard one leading axis per group)")
    inner = math.prod(dims[sliced[0] + 1:]) if sliced else math.prod(dims)
    if not sliced:
        return slice(0, inner)
    return slice(starts[sliced[0]] * inner, stops[sliced[0]] * inner)


def _read_shard(handle: Any, name: str, rule: _Rule, shape: tuple[int, ...],
                index: tuple[slice, ...], check_finite: bool) -> np.ndarray:
    """The part `index` of parameter `shape` (one layer's) read from the file, sliced there."""
    local = tuple(len(range(*sl.indices(size))) for sl, size in zip(index, shape, strict=True))
    if local == shape:  # the whole tensor (replicated here)
        whole = handle.get_tensor(name)
        part = rule.to_flax(whole, shape)
    elif len(shape) == len(rule.hf_shape) and not rule.transposed:  # the file's dims
        part = handle.get_slice(name)[index]
    elif not rule.transposed:  # file [out, in] -> parameter [out dims..., in dims...]
        split = next(k for k in range(len(shape) + 1) if math.prod(shape[:k]) == rule.hf_shape[0])
        rows = _flat_range(shape[:split], index[:split], name)
        cols = _flat_range(shape[split:], index[split:], name)
        part = handle.get_slice(name)[rows, cols].reshape(local)
    else:  # file [out, in] -> parameter [in dims..., out dims...]
        in_size = rule.hf_shape[1]
        split = next(k for k in range(len(shape) + 1) if math.prod(shape[:k]) == in_size)
        rows = _flat_range(shape[split:], index[split:], name)
        cols = _flat_range(shape[:split], index[:split], name)
        part = handle.get_slice(name)[rows, cols].T.reshape(local)
    if check_finite and not np.isfinite(part).all():
        raise LoadError(f"tensor {name!r} contains NaN or Inf")
    return part


def _read_sharded(rules: dict[str, _Rule], files: dict[str, str], shapes: dict,
                  shardings: dict, check_finite: bool,
                  on_tensor: Callable[[str, int], None] | None = None
                  ) -> Iterator[tuple[_Path, jax.Array]]:
    """As `_read`, but each device's shard is read straight from the files (safetensors
    slicing) into that device: the host holds one shard at a time, never a whole tensor that
    is split over the mesh."""
    by_param: dict[_Path, dict[int | None, list[str]]] = {}
    for name, rule in rules.items():
        by_param.setdefault(rule.path, {}).setdefault(rule.layer, []).append(name)
    for path, names in by_param.items():
        struct, sharding = _get(shapes, path), _get(shardings, path)
        stacked = None not in names

        def shard(index: tuple[slice, ...], names: dict = names, struct: Any = struct,
                  stacked: bool = stacked) -> np.ndarray:
            layers = range(*index[0].indices(struct.shape[0])) if stacked else [None]
            inner_index = index[1:] if stacked else index
            inner_shape = struct.shape[1:] if stacked else struct.shape
            layer_parts = []
            for layer in layers:
                parts = []
                for name in names[layer]:
                    rule = rules[name]
                    index = inner_index
                    if rule.part is not None:  # the shard's overlap with this tensor's part
                        axis, start, stop = rule.part
                        lo, hi, _ = index[axis].indices(inner_shape[axis])
                        lo, hi = max(lo, start), min(hi, stop)
                        if lo >= hi:
                            continue
                        index = (*index[:axis], slice(lo - start, hi - start), *index[axis + 1:])
                    with _open(files[name]) as handle:
                        try:
                            parts.append((rule, _read_shard(handle, name, rule,
                                                            rule.part_shape(inner_shape), index,
                                                            check_finite)))
                        except SafetensorError as e:
                            raise LoadError(f"{files[name]}: cannot read tensor {name!r} "
                                            f"({e})") from None
                layer_parts.append(_join(parts))
            part = np.stack(layer_parts) if stacked else layer_parts[0]
            return part.astype(struct.dtype)

        yield path, jax.make_array_from_callback(struct.shape, sharding, shard)
        if on_tensor is not None:
            for layer_names in names.values():
                for name in layer_names:
                    on_tensor(name, len(files))


def _get(tree: dict, path: _Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: _Path, value: jax.Array) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _read_lora_config(lora_dir: str) -> tuple[int, float]:
    path = os.path.join(lora_dir, "adapter_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise LoadError(f"{path}: missing (a LoRA adapter directory needs it)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: not valid JSON ({e})") from None
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if targets != ["o_proj"]:
        raise LoadError(f"{path}: target_modules={targets!r}; only ['o_proj'] is supported")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(rank, int) or rank <= 0:
        raise LoadError(f"{path}: r={rank!r} must be a positive integer")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise LoadError(f"{path}: lora_alpha={alpha!r} must be a positive number")
    scale = alpha / (rank ** 0.5) if cfg.get("use_rslora") else alpha / rank
    return rank, float(scale)


def _lora_source(config: NLDConfig, lora_dir: str
                 ) -> tuple[tuple[int, float], dict[str, _Rule], dict[str, str]]:
    """A PEFT adapter directory, checked: ((rank, scale), rules, tensor name -> file)."""
    rank, scale = _read_lora_config(lora_dir)
    lora_file = os.path.join(lora_dir, "adapter_model.safetensors")
    if not os.path.isfile(lora_file):
        raise LoadError(f"{lora_file}: missing")
    with _open(lora_file) as handle:
        lora_files = {name: lora_file for name in handle.keys()}
    lora_rules = _lora_rules(config, rank)
    _check_tensors(lora_rules, lora_files, lora_dir)
    return (rank, scale), lora_rules, lora_files


def _abstract(config: NLDConfig, dtype: jnp.dtype, lora: tuple[int, float] | None,
              vision_dtype: jnp.dtype | str = "float32"
              ) -> tuple[nnx.GraphDef, nnx.State, dict]:
    """The model built with nnx.eval_shape: (graphdef, abstract state, pure dict of structs)."""

    def build() -> NLDModel:
        model = NLDModel(config, dtype=dtype, vision_dtype=vision_dtype, rngs=nnx.Rngs(0))
        if lora is not None:
            model.attach_lora(*lora, rngs=nnx.Rngs(0))
        return model

    graphdef, state = nnx.split(nnx.eval_shape(build))
    return graphdef, state, nnx.to_pure_dict(state)


def _leaves(tree: Any, prefix: _Path = ()) -> dict[_Path, Any]:
    """A nested dict (parameters, or Orbax's metadata of them) -> {path: leaf}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[_Path, Any] = {}
    for key, value in tree.items():
        flat.update(_leaves(value, (*prefix, str(key))))
    return flat


def _path_name(path: _Path) -> str:
    """A parameter path as error messages name it: "layers.attn.qkv_kghd"."""
    return ".".join(map(str, path))


def _read_marker(model_dir: str) -> dict[str, Any]:
    """The Orbax directory's nld_orbax.json, checked."""
    path = os.path.join(model_dir, ORBAX_MARKER)
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise LoadError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(marker, dict) or marker.get("format") != ORBAX_FORMAT:
        raise LoadError(f"{path}: format is not {ORBAX_FORMAT!r}")
    if marker.get("version") != ORBAX_VERSION:
        raise LoadError(f"{path}: version={marker.get('version')!r}; this nld_jax reads "
                        f"version {ORBAX_VERSION} (re-run nld-convert)")
    if not isinstance(marker.get("has_lora"), bool):
        raise LoadError(f"{path}: has_lora must be true or false")
    if marker["has_lora"]:
        rank, scale = marker.get("lora_rank"), marker.get("lora_scale")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise LoadError(f"{path}: lora_rank={rank!r} must be a positive integer")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
            raise LoadError(f"{path}: lora_scale={scale!r} must be a positive number")
    return marker


def _restore_orbax(model_dir: str, stored: dict, layout: Layout | None,
                   check_finite: bool) -> dict:
    """Restores params/ into the structs of `stored` (cast to their dtype), after checking the
    checkpoint's metadata names exactly those parameters with those shapes."""
    import orbax.checkpoint as ocp

    params_dir = os.path.abspath(os.path.join(model_dir, ORBAX_PARAMS))
    if not os.path.isdir(params_dir):
        raise LoadError(f"{params_dir}: missing (the Orbax directory holds no parameters)")
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            metadata = checkpointer.metadata(params_dir)
        except Exception as e:  # Orbax raises many types for unreadable metadata
            raise LoadError(f"{params_dir}: not a readable Orbax checkpoint ({e})") from None
        metadata = getattr(metadata, "item_metadata", metadata)
        found = _leaves(getattr(metadata, "tree", metadata))
        expected = _leaves(stored)
        missing = sorted(map(_path_name, set(expected) - set(found)))
        if missing:
            raise LoadError(f"{params_dir}: missing {len(missing)} parameter(s), "
                            f"e.g. {missing[:5]}")
        unexpected = sorted(map(_path_name, set(found) - set(expected)))
        if unexpected:
            raise LoadError(f"{params_dir}: unexpected parameter(s) {unexpected[:5]} (config.json "
                            f"or {ORBAX_MARKER} and the checkpoint disagree?)")
        for path, struct in expected.items():
            shape = tuple(getattr(found[path], "shape", ()))
            if shape != struct.shape:
                raise LoadError(f"{params_dir}: parameter {_path_name(path)!r} has shape "
                                f"{list(shape)}, expected {list(struct.shape)} from the config")
        # Each array restored straight into its shards (the layout's), else the default device.
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = (jax.tree.map(lambda _: single, stored) if layout is None
                     else layout.param_shardings(stored))
        target = jax.tree.map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            stored, shardings)
        try:
            values = checkpointer.restore(params_dir, target)
        except Exception as e:  # a truncated or corrupt array file
            raise LoadError(f"{params_dir}: cannot restore the parameters ({e})") from None
    if check_finite:
        for path, array in _leaves(values).items():
            if not bool(jnp.isfinite(array.astype(jnp.float32)).all()):
                raise LoadError(f"{params_dir}: parameter {_path_name(path)!r} contains NaN "
                                "or Inf")
    return values


def _attach_tokenizer(model: NLDModel, tokenizer: Tokenizer | None) -> NLDModel:
    # A static attribute travels in the graphdef through nnx.split/merge and jit (where the
    # graphdef is a static argument: Tokenizer compares by content, so reloads share programs).
    if tokenizer is not None:
        model.tokenizer = nnx.static(tokenizer)
    return model


def load_model(path: str | os.PathLike, dtype: str | jnp.dtype = "bfloat16",
               lora: bool | str | os.PathLike | None = None, mesh: jax.sharding.Mesh | None = None,
               *, check_finite: bool = True,
               on_tensor: Callable[[str, int], None] | None = None,
               vision_dtype: str | jnp.dtype = "float32",
               rules: Mapping[str, str | None] | None = None) -> NLDModel:
    """Loads a released checkpoint directory, or its Orbax copy, into an NLDModel.

    Args:
      path: a directory with config.json and model.safetensors (or an index and shards), or an
        Orbax directory written by nld-convert (it holds nld_orbax.json); or, when no such
        local path exists, a Hugging Face Hub repo id ("owner/name"), downloaded with
        huggingface_hub (the `hub` extra) into its cache.
      dtype: "bfloat16" or "float32", for parameters and activations.
      vision_dtype: a VLM's vision tower and projector: "float32" (default: its activations
        reach the thousands, spec/vlm.md 3.7) or "bfloat16".
      lora: None: the directory's adapter if present (linear_spec_lora/, or the one stored in
        the Orbax copy); False: no adapter; a path: that PEFT adapter directory.
      mesh: place every parameter on this mesh, sharded by its logical axes under `rules`
        (nld_jax.sharding; default: everything on the default device).
      rules: overrides of nld_jax.sharding.DEFAULT_RULES (logical axis -> mesh axis or None);
        only with a mesh.
      check_finite: reject tensors holding NaN or Inf, naming the first (on by default: about
        0.2 s per GB of bf16 weights on CPU, benchmarks/check_finite_cost.py). False skips it.
      on_tensor: called as on_tensor(name, total) after each safetensors tensor is read (for
        progress bars).
    Returns:
      The model, with `.config`, and `.tokenizer` when the directory has tokenizer.json.
    """
    model_dir = resolve_checkpoint_dir(os.fspath(path))
    try:
        config = NLDConfig.from_json(model_dir)
    except ConfigError as e:
        raise LoadError(str(e)) from None
    jdtype, jvision = jnp.dtype(dtype), jnp.dtype(vision_dtype)
    for name, value in (("dtype", jdtype), ("vision_dtype", jvision)):
        if value not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
            raise LoadError(f"{name}={value} is not supported; use 'bfloat16' or 'float32'")
    if lora is True:
        raise LoadError("lora=True is ambiguous: pass None (auto), False or a directory")
    lora_dir = None
    if lora not in (None, False):
        lora_dir = os.fspath(lora)  # type: ignore[arg-type]
        if not os.path.isdir(lora_dir):
            raise LoadError(f"{lora_dir}: LoRA adapter directory does not exist")
    if rules is not None and mesh is None:
        raise LoadError("rules= places parameters on a mesh: pass mesh= too")
    try:
        layout = None if mesh is None else Layout.create(mesh, rules)
    except (TypeError, ValueError) as e:
        raise LoadError(str(e)) from None
    orbax = os.path.isfile(os.path.join(model_dir, ORBAX_MARKER))
    if lora is None and not orbax and os.path.isdir(os.path.join(model_dir, LORA_DIR)):
        lora_dir = os.path.join(model_dir, LORA_DIR)

    # Every check (weights, adapter, tokenizer) happens before any array is read.
    rules: dict[str, _Rule] = {}
    files: dict[str, str] = {}
    stored_lora = None  # the adapter inside an Orbax copy: (rank, scale)
    if orbax:
        marker = _read_marker(model_dir)
        stored_lora = (marker["lora_rank"], float(marker["lora_scale"])) \
            if marker["has_lora"] else None
    else:
        rules, files = _base_rules(config), _tensor_files(model_dir)
        _check_tensors(rules, files, model_dir)
    lora_spec = None
    if lora_dir is not None:
        lora_spec, lora_rules, lora_files = _lora_source(config, lora_dir)
        rules, files = {**rules, **lora_rules}, {**files, **lora_files}
    elif orbax and lora is None:
        lora_spec = stored_lora
    tokenizer = None
    if os.path.isfile(os.path.join(model_dir, TOKENIZER_FILE)):
        try:
            tokenizer = load_tokenizer(model_dir)
        except TokenizerError as e:
            raise LoadError(str(e)) from None

    graphdef, abstract_state, values = _abstract(config, jdtype, lora_spec, jvision)
    # Shardings are checked (every sharded dimension divides its mesh axis) before any read.
    try:
        shardings = None if layout is None else layout.param_shardings(values)
    except ValueError as e:
        raise LoadError(f"{model_dir}: {e}") from None
    if orbax:
        stored = values if lora_spec == stored_lora else _abstract(config, jdtype, stored_lora,
                                                                   jvision)[2]
        restored = _restore_orbax(model_dir, stored, layout, check_finite)
        for path, array in _leaves(restored).items():
            if lora is None or "lora" not in path:  # lora=False or a path: not the stored one
                _set(values, path, array)
    reader = (_read(rules, files, values, check_finite, on_tensor) if shardings is None else
              _read_sharded(rules, files, values, shardings, check_finite, on_tensor))
    for param_path, array in reader:
        _set(values, param_path, array)
    # Every parameter must have come from the files: none may stay abstract.
    still_abstract = [_path_name(path) for path, leaf in _leaves(values).items()
                      if isinstance(leaf, jax.ShapeDtypeStruct)]
    if still_abstract:
        raise LoadError(f"{model_dir}: parameters not loaded: {still_abstract[:5]}")
    if shardings is not None:
        values = jax.device_put(values, shardings)
    nnx.replace_by_pure_dict(abstract_state, values)
    model = _attach_tokenizer(nnx.merge(graphdef, abstract_state), tokenizer)
    if layout is not None:
        model.layout = nnx.static(layout)
    return model


def source_dtype(path: str | os.PathLike, *, lora: bool = True) -> str:
    """The dtype that holds every stored tensor exactly: "bfloat16" if all are bf16, else
    "float32" (an Orbax copy: the dtype it was written in).

    Args:
      path: a checkpoint directory, as load_model takes it (no Hub download here).
      lora: count the directory's linear_spec_lora/ adapter too (if present).
    """
    model_dir = os.fspath(path)
    if os.path.isfile(os.path.join(model_dir, ORBAX_MARKER)):
        dtype = _read_marker(model_dir).get("dtype")
        if dtype not in ("bfloat16", "float32"):
            raise LoadError(f"{os.path.join(model_dir, ORBAX_MARKER)}: dtype={dtype!r} must be "
                            "'bfloat16' or 'float32'")
        return dtype
    files = _tensor_files(model_dir)
    lora_file = os.path.join(model_dir, LORA_DIR, "adapter_model.safetensors")
    if lora and os.path.isfile(lora_file):
        with _open(lora_file) as handle:
            files.update({f"{LORA_DIR}/{name}": lora_file for name in handle.keys()})
    dtypes = set()
    for file in sorted(set(files.values())):
        with _open(file) as handle:
            dtypes.update(handle.get_slice(name).get_dtype() for name in handle.keys())
    return "bfloat16" if dtypes == {"BF16"} else "float32"


def save_model(model: NLDModel, path: str | os.PathLike, *, dtype: str = "bfloat16",
               overwrite: bool = False, tokenizer: Tokenizer | None = None,
               extra_files: dict[str, str | bytes] | None = None) -> None:
    """Writes `model` in the released layout, replacing the directory as a whole.

    The directory gets config.json, model.safetensors, linear_spec_lora/ (when the model has the
    draft adapter), the tokenizer files (when there is a tokenizer) and `extra_files`. It is
    written beside `path` and renamed into place (nld_jax.atomic): an existing directory stays
    intact until the new one is complete, and nothing of it (such as an adapter the new model
    lacks) survives the replacement.

    Args:
      model: the network (with or without the draft adapter).
      path: the output directory.
      dtype: the tensors' dtype in the file.
      overwrite: replace an existing `path` (FileExistsError otherwise).
      tokenizer: written as tokenizer.json, tokenizer_config.json and chat_template.jinja;
        default: the model's own `.tokenizer`, if it carries one.
      extra_files: more files, {relative name: text or bytes} (e.g. a training log).
    """
    from safetensors.numpy import save_file

    np_dtype = jnp.dtype(dtype)
    if np_dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"{dtype=} is not supported; use 'bfloat16' or 'float32'")
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    values = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    config = model.config

    def tensor(rule: _Rule) -> np.ndarray:
        value = np.asarray(_get(values, rule.path))
        value = value if rule.layer is None else value[rule.layer]  # stacked layers: one slice
        return np.ascontiguousarray(rule.to_hf(rule.take(value)).astype(np_dtype))

    def write_tensors(rules: dict[str, _Rule], path: str) -> None:
        save_file({name: tensor(rule) for name, rule in rules.items()}, path)
        os.chmod(path, file_mode())  # save_file leaves 0600

    with atomic_directory(path, overwrite=overwrite) as out_dir:
        write_tensors(_base_rules(config), os.path.join(out_dir, SINGLE_FILE))
        config.save_json(os.path.join(out_dir, "config.json"))
        if model.has_lora:
            lora = model.layers.attn.lora
            rank = lora.a_nhr.shape[-1]
            lora_dir = os.path.join(out_dir, LORA_DIR)
            os.mkdir(lora_dir)
            write_tensors(_lora_rules(config, rank),
                          os.path.join(lora_dir, "adapter_model.safetensors"))
            _write_file(os.path.join(lora_dir, "adapter_config.json"), json.dumps(
                {"peft_type": "LORA", "r": rank, "lora_alpha": lora.scale * rank,
                 "target_modules": ["o_proj"], "lora_dropout": 0.0, "bias": "none",
                 "task_type": "CAUSAL_LM"}, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(out_dir)
        for name, content in (extra_files or {}).items():
            target = os.path.normpath(os.path.join(out_dir, name))
            if os.path.commonpath([out_dir, target]) != out_dir or target == out_dir:
                raise ValueError(f"extra_files: {name!r} is not a file name inside the directory")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            _write_file(target, content)


def _write_file(path: str, content: str | bytes) -> None:
    with open(path, "wb") as f:
        f.write(content.encode("utf-8") if isinstance(content, str) else content)
