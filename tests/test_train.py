"""The joint AR + diffusion objective, the train step, LoRA training and Orbax resume."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nld_jax
from nld_jax import tiny
from nld_jax.loading import save_model
from nld_jax.model import NLDModel
from nld_jax.train import TrainConfig, Trainer, joint_loss, noise, two_stream_mask

CONFIG = nld_jax.NLDConfig.preset("tiny", vocab_size=len(tiny.VOCAB), bos_token_id=tiny.BOS,
                                  eos_token_ids=(tiny.EOS,), mask_token_id=tiny.MASK,
                                  block_size=8)


def _batch(seed: int = 0, size: int = 8):
    return tiny.make_batch(np.random.default_rng(seed), size)


def _model(seed: int = 0) -> NLDModel:
    return NLDModel(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("length,block", [(32, 8), (12, 4), (10, 4)])
def test_two_stream_mask_equals_the_spec_rules(length, block):
    mask = np.asarray(two_stream_mask(length, block))
    expected = np.zeros((2 * length, 2 * length), bool)
    for q in range(2 * length):
        for k in range(2 * length):
            q_noisy, k_noisy = q < length, k < length
            q_block, k_block = (q % length) // block, (k % length) // block
            if q_noisy and k_noisy:
                expected[q, k] = q_block == k_block
            elif q_noisy:
                expected[q, k] = q_block > k_block
            elif not k_noisy:
                expected[q, k] = q >= k
    np.testing.assert_array_equal(mask, expected)


def test_noise_never_masks_prompt_tokens():
    tokens, loss_mask = _batch(size=256)
    noisy, masked, p = noise(jax.random.key(0), jnp.asarray(tokens), jnp.asarray(loss_mask),
                             tiny.MASK)
    noisy, masked, p = np.asarray(noisy), np.asarray(masked), np.asarray(p)
    assert not masked[loss_mask == 0].any()
    np.testing.assert_array_equal(noisy[~masked], tokens[~masked])
    assert (noisy[masked] == tiny.MASK).all()
    assert 1e-3 <= p.min() and p.max() <= 1.0
    # The masking rate follows p: answer tokens masked about p of the time.
    rate = masked.sum(1) / np.maximum(loss_mask.sum(1), 1)
    assert abs(np.mean(rate - p)) < 0.03


def test_ar_term_equals_plain_causal_cross_entropy():
    """The clean stream sees only itself, causally, at positions 0..L-1: the AR loss is the
    ordinary next-token loss of model(tokens)."""
    model = _model()
    tokens, loss_mask = _batch()
    _, metrics = joint_loss(model, jnp.asarray(tokens), jnp.asarray(loss_mask),
                            jax.random.key(1), block_size=8)
    log_probs = jax.nn.log_softmax(model(jnp.asarray(tokens)), axis=-1)
    nll = -np.take_along_axis(np.asarray(log_probs)[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    weight = loss_mask[:, 1:]
    np.testing.assert_allclose(metrics["ar_loss"], (nll * weight).sum() / weight.sum(),
                               rtol=1e-5)


def test_loss_decreases_on_a_fixed_batch():
    trainer = Trainer(_model(), TrainConfig(learning_rate=3e-3, warmup_steps=5, total_steps=60,
                                            block_size=8))
    tokens, loss_mask = _batch(size=16)
    losses = [trainer.step(tokens, loss_mask, jax.random.key(0))["loss"] for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0]
    assert all(np.isfinite(losses))


def test_resume_from_orbax_checkpoint_gives_the_same_state(tmp_path):
    config = TrainConfig(learning_rate=3e-3, warmup_steps=2, total_steps=20, block_size=8)
    batches = [_batch(seed) for seed in range(8)]

    def run(trainer: Trainer, steps: range) -> None:
        for i in steps:
            trainer.step(*batches[i], jax.random.key(i))

    straight = Trainer(_model(), config)
    run(straight, range(8))

    first = Trainer(_model(), config)
    run(first, range(5))
    first.save(tmp_path / "ckpt")
    resumed = Trainer(_model(seed=99), config)  # different init: everything must come back
    resumed.restore(tmp_path / "ckpt")
    assert resumed.step_count == 5
    run(resumed, range(5, 8))
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                        nnx.to_pure_dict(straight.params), nnx.to_pure_dict(resumed.params))
    assert all(jax.tree.leaves(same))
    opt_same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), straight.opt_state,
                            resumed.opt_state)
    assert all(jax.tree.leaves(opt_same))
    with pytest.raises(FileNotFoundError):
        Trainer(_model(), config).restore(tmp_path / "empty")


def test_lora_training_freezes_the_base_and_exports_peft(tmp_path):
    model = _model()
    base_before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    model.attach_lora(rank=4, scale=2.0, rngs=nnx.Rngs(3))
    trainer = Trainer(model, TrainConfig(learning_rate=1e-2, warmup_steps=1, total_steps=20,
                                         block_size=8, lora_only=True))
    tokens, loss_mask = _batch(size=16)
    losses = [trainer.step(tokens, loss_mask, jax.random.key(0))["diffusion_loss"]
              for _ in range(15)]
    assert losses[-1] < losses[0]
    trained = trainer.model
    after = nnx.to_pure_dict(nnx.state(trained, nnx.Param))
    lora = after["layers"]["attn"].pop("lora")
    for i in range(CONFIG.num_hidden_layers):
        assert np.abs(lora["b_rd"][i]).max() > 0  # B starts at zero and moved
    unchanged = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), base_before, after)
    assert all(jax.tree.leaves(unchanged))
    # Exported in the released PEFT layout and read back by load_model.
    save_model(trained, tmp_path / "out", dtype="float32")
    assert (tmp_path / "out" / "linear_spec_lora" / "adapter_config.json").exists()
    loaded = nld_jax.load_model(tmp_path / "out", dtype="float32")
    ids = jnp.asarray(tokens[:2])
    for on in (False, True):
        want = trained.logits(trained.forward(ids, None, causal=False, lora_on=on)[0])
        got = loaded.logits(loaded.forward(ids, None, causal=False, lora_on=on)[0])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attach_lora"):
        Trainer(_model(), TrainConfig(lora_only=True, warmup_steps=1, total_steps=2))
