"""Tensor and data parallelism on a JAX mesh: logical axes, one rules table, shardings.

Every parameter's dimensions carry logical names (`param_axes`): embed, vocab, q_heads, kv_heads,
head_dim, mlp, lora_rank, layers (the stacked [L] axis); activations and the KV cache add batch.
One rules table (`DEFAULT_RULES`) maps each logical name to a mesh axis (or None: replicated);
users pass their own entries to override it. The defaults are Megatron-style tensor parallelism
over "model" (attention heads, the MLP's hidden units, the vocabulary of the embedding and head)
and data parallelism over "data" (the batch rows). XLA's SPMD partitioner inserts the
collectives the math needs (after o_proj and down_proj, the head's softmax statistics); the
decode loops run unchanged. The vision tower of a VLM is small and stays replicated.

    mesh = nld_jax.sharding.make_mesh(data=2, model=4)
    model = nld_jax.load_model(path, mesh=mesh)      # every weight placed on its shards
    nld_jax.generate(model, prompts)                  # the same program, partitioned
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = ["DEFAULT_RULES", "LOGICAL_AXES", "Layout", "embed_lookup", "heads_on_shards",
           "heads_on_shards_unsupported_reason", "make_mesh", "param_axes", "shard_model"]

LOGICAL_AXES = ("batch", "layers", "embed", "vocab", "q_heads", "kv_heads", "head_dim", "mlp",
                "lora_rank")

# logical axis -> mesh axis (None: replicated over the mesh).
DEFAULT_RULES: Mapping[str, str | None] = {
    "batch": "data",
    "layers": None,
    "embed": None,
    "vocab": "model",
    "q_heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "mlp": "model",
    "lora_rank": None,
}

# A parameter's name (its path below the stacked `layers`, or at the top) -> its axes.
_PARAM_AXES: dict[tuple[str, ...], tuple[str | None, ...]] = {
    ("embed_vd",): ("vocab", "embed"),
    ("head_dv",): ("embed", "vocab"),
    ("final_norm", "weight"): ("embed",),
    ("input_norm", "weight"): ("embed",),
    ("post_attn_norm", "weight"): ("embed",),
    # q/k/v grouped by kv head: sharding kv heads shards their query heads with them (a rules
    # override that replicates kv_heads replicates the query projection too).
    ("attn", "qkv_kghd"): ("kv_heads", None, "head_dim", "embed"),
    ("attn", "o_nhd"): ("q_heads", "head_dim", "embed"),
    ("attn", "lora", "a_nhr"): ("q_heads", "head_dim", "lora_rank"),
    ("attn", "lora", "b_rd"): ("lora_rank", "embed"),
    ("mlp", "gate_up_d2f"): ("embed", None, "mlp"),
    ("mlp", "down_fd"): ("mlp", "embed"),
}

# The KV cache [L, B, S, K, H] and its lengths [B].
CACHE_AXES = ("layers", "batch", None, "kv_heads", "head_dim")


def param_axes(path: tuple[Any, ...], ndim: int) -> tuple[str | None, ...]:
    """The logical axes of the parameter at `path` (a path in nnx.to_pure_dict(state)).

    Raises ValueError for a parameter the table does not know (a new parameter must be named
    here, not silently replicated).
    """
    names = tuple(str(p) for p in path)
    if names[:1] == ("vision",):
        return (None,) * ndim  # the vision tower is replicated
    stacked = names[:1] == ("layers",)
    axes = _PARAM_AXES.get(names[1:] if stacked else names)
    if axes is None:
        raise ValueError(f"parameter {'.'.join(names)} has no logical axes in "
                         f"nld_jax.sharding._PARAM_AXES")
    axes = (("layers",) + axes) if stacked else axes
    if len(axes) != ndim:
        raise ValueError(f"parameter {'.'.join(names)} has {ndim} dimensions, its logical axes "
                         f"{axes} name {len(axes)}")
    return axes


def make_mesh(data: int = 1, model: int = 1, devices: Any = None) -> Mesh:
    """A ("data", "model") mesh of data * model devices (default: the first ones available)."""
    if data < 1 or model < 1:
        raise ValueError(f"mesh sizes must be positive, got data={data}, model={model}")
    available = jax.devices() if devices is None else list(devices)
    if data * model > len(available):
        raise ValueError(f"a {data}x{model} mesh needs {data * model} devices, "
                         f"{len(available)} available")
    return jax.make_mesh((data, model), ("data", "model"), devices=available[:data * model],
                         axis_types=(AxisType.Auto, AxisType.Auto))


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the rules that place logical axes on it (hashable: a jit static)."""

    mesh: Mesh
    rules: tuple[tuple[str, str | None], ...]

    @classmethod
    def create(cls, mesh: Mesh, rules: Mapping[str, str | None] | None = None) -> Layout:
        """The layout for `mesh` with DEFAULT_RULES overridden by `rules`, checked."""
        if not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        if any(t != AxisType.Auto for t in mesh.axis_types):
            raise ValueError(f"mesh axis types {mesh.axis_types}: the decode programs are "
                             f"partitioned by XLA (GSPMD), which needs Auto axes "
                             f"(jax.make_mesh(..., axis_types=(AxisType.Auto,) * n) or make_mesh)")
        merged = {**DEFAULT_RULES, **(rules or {})}
        unknown = sorted(set(merged) - set(LOGICAL_AXES))
        if unknown:
            raise ValueError(f"sharding rules name unknown logical axes {unknown}; "
                             f"expected some of {LOGICAL_AXES}")
        for logical, mesh_axis in merged.items():
            if mesh_axis is not None and mesh_axis not in mesh.axis_names:
                raise ValueError(f"sharding rule {logical!r} -> {mesh_axis!r}: the mesh has axes "
                                 f"{mesh.axis_names}")
        return cls(mesh=mesh, rules=tuple(sorted(merged.items())))

    def spec(self, axes: tuple[str | None, ...]) -> PartitionSpec:
        """The PartitionSpec of an array with these logical axes."""
        rules = dict(self.rules)
        return PartitionSpec(*(None if a is None else rules[a] for a in axes))

    def sharding(self, axes: tuple[str | None, ...], shape: tuple[int, ...] | None = None,
                 name: str = "array") -> NamedSharding:
        """The NamedSharding of an array with these logical axes; with `shape`, checks that
        every sharded dimension divides evenly over its mesh axis."""
        spec = self.spec(axes)
        if shape is not None:
            for dim, (size, mesh_axis) in enumerate(zip(shape, spec, strict=True)):
                if mesh_axis is not None and size % self.mesh.shape[mesh_axis]:
                    raise ValueError(
                        f"{name}: dimension {dim} ({axes[dim]}, size {size}) does not divide over "
                        f"mesh axis {mesh_axis!r} of size {self.mesh.shape[mesh_axis]}; "
                        f"pass rules={{{axes[dim]!r}: None}} to replicate it")
        return NamedSharding(self.mesh, spec)

    def param_shardings(self, params: Any) -> Any:
        """A pure dict of parameters (arrays or ShapeDtypeStructs) -> the same tree of their
        NamedShardings."""
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: self.sharding(
                param_axes(tuple(_key(p) for p in path), len(leaf.shape)), tuple(leaf.shape),
                ".".join(str(_key(p)) for p in path)),
            params)


def _key(entry: Any) -> Any:
    return getattr(entry, "key", getattr(entry, "idx", entry))


def shard_model(model: Any, mesh: Mesh, rules: Mapping[str, str | None] | None = None) -> Any:
    """Places every parameter of `model` (an NLDModel) on `mesh` by its logical axes (in place)
    and records the layout, so generate partitions its programs (the KV cache over kv heads
    and batch). Returns the model."""
    layout = Layout.create(mesh, rules)
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)
    placed = jax.device_put(pure, layout.param_shardings(pure))
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(model, state)
    model.layout = nnx.static(layout)
    return model


def embed_lookup(table: jax.Array, tokens: jax.Array, layout: Layout | None) -> jax.Array:
    """The rows of `table` [V, D] for `tokens` int [B, T] -> [B, T, D].

    With the vocabulary split over a mesh axis, each device looks up the tokens its slice of
    the table holds (zeros for the others) and one all-reduce over that axis sums the rows.
    Left to XLA, a lookup of one token (T=1 decode, batch 1) becomes a dynamic slice, which
    the SPMD partitioner serves by all-gathering the whole table: 1 GiB per step at 8B.
    """
    rules = {} if layout is None else dict(layout.rules)
    vocab_axis = rules.get("vocab")
    if vocab_axis is None or layout.mesh.shape[vocab_axis] == 1:
        return jnp.take(table, tokens, axis=0)
    batch_axis = rules["batch"]
    if batch_axis is not None and tokens.shape[0] % layout.mesh.shape[batch_axis]:
        batch_axis = None  # a batch that does not divide: every row on every data shard
    embed_axis = rules["embed"]

    def local(table_slice: jax.Array, tokens: jax.Array) -> jax.Array:
        rows = table_slice.shape[0]
        index = tokens - jax.lax.axis_index(vocab_axis) * rows
        mine = (index >= 0) & (index < rows)
        found = jnp.take(table_slice, jnp.where(mine, index, 0), axis=0)
        return jax.lax.psum(jnp.where(mine[..., None], found, 0), vocab_axis)

    return jax.shard_map(local, mesh=layout.mesh, in_specs=(PartitionSpec(vocab_axis, embed_axis),
                                                            PartitionSpec(batch_axis, None)),
                         out_specs=PartitionSpec(batch_axis, None, embed_axis))(table, tokens)


def heads_on_shards_unsupported_reason(layout: Layout, batch: int) -> str | None:
    """Why `heads_on_shards` cannot split an attention of `batch` rows this way (None if it
    can): each device needs whole heads, every layer, and the query heads of its kv heads."""
    rules = dict(layout.rules)
    if rules["q_heads"] != rules["kv_heads"]:
        return (f"query heads go to mesh axis {rules['q_heads']!r} and kv heads to "
                f"{rules['kv_heads']!r}: a device would lack the kv heads of its query heads")
    for logical in ("head_dim", "layers"):
        if rules[logical] is not None:
            return f"{logical} is split over mesh axis {rules[logical]!r}"
    if rules["batch"] is not None and batch % layout.mesh.shape[rules["batch"]]:
        return (f"{batch} rows do not divide over mesh axis {rules['batch']!r} of size "
                f"{layout.mesh.shape[rules['batch']]}")
    return None


def heads_on_shards(layout: Layout, attention: Callable[..., jax.Array], q: jax.Array,
                    k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                    k_block: jax.Array, v_block: jax.Array, causal: jax.Array | bool,
                    layer: jax.Array | int) -> jax.Array:
    """`attention(q, k_cache, v_cache, lengths, k_block, v_block, causal, layer)` (a
    single-device kernel, e.g. pallas_kernels.block_attention) run by every device on its own
    query heads, kv heads and batch rows (shard_map): q [B, T, N, H], the stacked cache
    [L, B, S, K, H], lengths [B], the block's k/v [B, T, K, H]. Heads are split in contiguous
    ranges, so with N and K over the same axis a device holds its query heads' kv heads.
    Attention needs no communication; check `heads_on_shards_unsupported_reason` first."""
    query = layout.spec(("batch", None, "q_heads", None))
    block = layout.spec(("batch", None, "kv_heads", None))
    cache = layout.spec(CACHE_AXES)
    # Pallas calls carry no varying-axes annotations for shard_map to check.
    run = jax.shard_map(attention, mesh=layout.mesh, check_vma=False,
                        in_specs=(query, cache, cache, layout.spec(("batch",)), block, block,
                                  PartitionSpec(), PartitionSpec()), out_specs=query)
    return run(q, k_cache, v_cache, lengths, k_block, v_block, jnp.asarray(causal),
               jnp.asarray(layer, jnp.int32))
