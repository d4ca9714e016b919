"""Fine-tuning with the joint AR + block-diffusion objective (NLD's `block_diff` paradigm) on optax.

The input is two streams `[x_t | x_0]` of length 2L: a noisy copy (each answer token masked with
probability p = (1 - 1e-3) t + 1e-3, t ~ U(0, 1) per sequence; prompt tokens never) and the
clean sequence, both at RoPE positions 0..L-1. The three-part mask lets a noisy block see itself
and the clean keys of strictly earlier blocks, and the clean stream only itself, causally.
Loss = AR cross-entropy on the clean stream + 0.3 x the diffusion cross-entropy of the masked
noisy positions (unshifted targets), each weighted by 1/p.

`Trainer` holds the train state (params, optax state, step), a jitted step, gradient clipping,
AdamW with warmup + cosine decay, and Orbax checkpoints. With `lora_only=True` only the o_proj
draft adapter trains (base frozen), and the adapter is applied to the noisy stream alone, as it
is used in the draft pass alone.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx

from nld_jax.model import NLDModel

__all__ = ["TrainConfig", "Trainer", "two_stream_mask", "joint_loss", "noise"]

_MIN_MASK_PROB = 1e-3


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser and objective settings."""

    learning_rate: float = 1e-3
    warmup_steps: int = 100
    total_steps: int = 1000
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    diffusion_weight: float = 0.3
    block_size: int | None = None  # default: the model's config.block_size
    lora_only: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"need 0 <= {self.warmup_steps=} < {self.total_steps=}")
        if self.learning_rate <= 0 or self.clip_norm <= 0:
            raise ValueError(f"{self.learning_rate=} and {self.clip_norm=} must be positive")


def two_stream_mask(length: int, block_size: int) -> jax.Array:
    """bool [2L, 2L] (query, key) over [x_t | x_0], as specified for block diffusion.

    Allowed iff noisy-noisy in the same block, noisy query to clean keys of strictly earlier
    blocks, or clean-clean causal.
    """
    q = jnp.arange(2 * length)[:, None]
    k = jnp.arange(2 * length)[None, :]
    q_block, k_block = (q % length) // block_size, (k % length) // block_size
    q_noisy, k_noisy = q < length, k < length
    same_block = q_noisy & k_noisy & (q_block == k_block)
    earlier_clean = q_noisy & ~k_noisy & (q_block > k_block)
    clean_causal = ~q_noisy & ~k_noisy & (q >= k)
    return same_block | earlier_clean | clean_causal


def noise(rng: jax.Array, tokens: jax.Array, loss_mask: jax.Array,
          mask_token_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Masks answer tokens at a per-sequence rate. Returns (x_t [B, L], masked [B, L], p [B])."""
    t_key, u_key = jax.random.split(rng)
    t = jax.random.uniform(t_key, (tokens.shape[0],))
    p = (1 - _MIN_MASK_PROB) * t + _MIN_MASK_PROB
    masked = (jax.random.uniform(u_key, tokens.shape) < p[:, None]) & (loss_mask > 0)
    return jnp.where(masked, mask_token_id, tokens), masked, p


def joint_loss(model: NLDModel, tokens: jax.Array, loss_mask: jax.Array, rng: jax.Array, *,
               block_size: int, diffusion_weight: float = 0.3,
               lora_on_noisy: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The joint objective on a batch.

    Args:
      model: the network.
      tokens: int32 [B, L] clean sequences.
      loss_mask: int/bool [B, L]: 1 on answer tokens (trained, maskable), 0 on prompt/padding.
      rng: PRNG key for the noise.
      block_size: diffusion block size.
      diffusion_weight: weight of the diffusion term (0.3 in NLD).
      lora_on_noisy: apply the draft adapter to the noisy stream.
    Returns:
      (scalar loss, metrics).
    """
    b, length = tokens.shape
    noisy, masked, p = noise(rng, tokens, loss_mask, model.config.mask_token_id)
    stream = jnp.concatenate([noisy, tokens], axis=1)
    positions = jnp.tile(jnp.arange(length, dtype=jnp.int32), 2)[None, :].repeat(b, axis=0)
    lora_on = jnp.broadcast_to(jnp.arange(2 * length)[None, :] < length, (b, 2 * length))
    hidden, _ = model.forward(stream, None, causal=True, positions=positions,
                              block_mask=two_stream_mask(length, block_size),
                              lora_on=lora_on if lora_on_noisy else False)
    logits = model.logits(hidden)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    noisy_lp, clean_lp = log_probs[:, :length], log_probs[:, length:]
    # AR: clean position i predicts token i+1, on answer targets.
    ar_nll = -jnp.take_along_axis(clean_lp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    ar_weight = loss_mask[:, 1:].astype(jnp.float32)
    ar_loss = jnp.sum(ar_nll * ar_weight) / jnp.maximum(jnp.sum(ar_weight), 1.0)
    # Diffusion: masked noisy position i predicts token i itself, weighted by 1/p.
    diff_nll = -jnp.take_along_axis(noisy_lp, tokens[..., None], axis=-1)[..., 0]
    diff_weight = masked.astype(jnp.float32) / p[:, None]
    diff_loss = jnp.sum(diff_nll * diff_weight) / jnp.maximum(
        jnp.sum(loss_mask.astype(jnp.float32)), 1.0)
    loss = ar_loss + diffusion_weight * diff_loss
    return loss, {"loss": loss, "ar_loss": ar_loss, "diffusion_loss": diff_loss,
                  "masked_fraction": jnp.mean(masked.astype(jnp.float32))}


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay, after global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps, end_value=config.learning_rate * 0.1)
    return optax.chain(optax.clip_by_global_norm(config.clip_norm),
                       optax.adamw(schedule, weight_decay=config.weight_decay))


class Trainer:
    """Train state + jitted step + Orbax checkpoints for an NLDModel."""

    def __init__(self, model: NLDModel, config: TrainConfig):
        if config.lora_only and not model.has_lora:
            raise ValueError("lora_only=True needs an adapter: call model.attach_lora first")
        self.config = config
        self.block_size = config.block_size or model.config.block_size
        trainable = (nnx.All(nnx.Param, nnx.PathContains("lora")) if config.lora_only
                     else nnx.Param)
        self.graphdef, self.params, self.frozen = nnx.split(model, trainable, ...)
        self.optimizer = make_optimizer(config)
        self.opt_state = self.optimizer.init(self.params)
        self.step_count = 0
        self._step = jax.jit(self._train_step, donate_argnums=(0, 1))

    def _train_step(self, params: nnx.State, opt_state: Any, frozen: nnx.State,
                    tokens: jax.Array, loss_mask: jax.Array, rng: jax.Array
                    ) -> tuple[nnx.State, Any, dict[str, jax.Array]]:
        def loss_fn(params: nnx.State) -> tuple[jax.Array, dict[str, jax.Array]]:
            model = nnx.merge(self.graphdef, params, frozen)
            return joint_loss(model, tokens, loss_mask, rng, block_size=self.block_size,
                              diffusion_weight=self.config.diffusion_weight,
                              lora_on_noisy=self.config.lora_only)

        grads, metrics = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return optax.apply_updates(params, updates), opt_state, metrics

    def step(self, tokens: jax.Array, loss_mask: jax.Array, rng: jax.Array
             ) -> dict[str, float]:
        """One optimiser step on a batch ([B, L] tokens and loss mask)."""
        self.params, self.opt_state, metrics = self._step(
            self.params, self.opt_state, self.frozen, jnp.asarray(tokens, jnp.int32),
            jnp.asarray(loss_mask, jnp.int32), rng)
        self.step_count += 1
        return {k: float(v) for k, v in metrics.items()}

    @property
    def model(self) -> NLDModel:
        """The current network (a fresh module sharing the train state's arrays)."""
        return nnx.merge(self.graphdef, self.params, self.frozen)

    def _state(self) -> dict[str, Any]:
        return {"step": jnp.asarray(self.step_count, jnp.int32),
                "params": nnx.to_pure_dict(self.params), "opt_state": self.opt_state}

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the train state to an Orbax checkpoint at `directory`/<step>."""
        with ocp.CheckpointManager(os.path.abspath(os.fspath(directory))) as manager:
            manager.save(self.step_count, args=ocp.args.StandardSave(self._state()))
            manager.wait_until_finished()

    def restore(self, directory: str | os.PathLike, step: int | None = None) -> None:
        """Loads the latest (or given) train state written by save()."""
        with ocp.CheckpointManager(os.path.abspath(os.fspath(directory))) as manager:
            step = manager.latest_step() if step is None else step
            if step is None:
                raise FileNotFoundError(f"{directory}: no train-state checkpoint")
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self._state())
            restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        nnx.replace_by_pure_dict(self.params, restored["params"])
        self.opt_state = restored["opt_state"]
        self.step_count = int(restored["step"])
