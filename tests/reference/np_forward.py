"""An independent float64 NumPy forward of the NLD network with an arbitrary attention mask.

Written from spec/model.md, reading the released files directly (no nld_jax code), so tests can
check patterns the transformers oracle does not produce (bidirectional attention). It is itself
checked against the transformers golden logits with the causal mask.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
from safetensors.numpy import load_file


def load_released(path: pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config dict, tensors in float64) of a released checkpoint directory."""
    config = json.loads((path / "config.json").read_text())
    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.exists() else ["model.safetensors"])
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(load_file(str(path / name)))
    return config, {k: v.astype(np.float64) for k, v in tensors.items()}


def _inv_freq(d: int, rope: dict) -> np.ndarray:
    theta, factor = rope["rope_theta"], rope["factor"]
    orig = rope["original_max_position_embeddings"]
    pos_freqs = theta ** (np.arange(0, d, 2) / d)

    def dim(r: float) -> float:
        return d * math.log(orig / (2 * math.pi * r)) / (2 * math.log(theta))

    low = max(math.floor(dim(rope["beta_fast"])), 0)
    high = min(math.ceil(dim(rope["beta_slow"])), d - 1)
    ramp = np.clip((np.arange(d // 2) - low) / max(high - low, 1e-3), 0, 1)
    return (1 / (factor * pos_freqs)) * ramp + (1 / pos_freqs) * (1 - ramp)


def forward(config: dict, w: dict[str, np.ndarray], ids: np.ndarray,
            mask: np.ndarray) -> np.ndarray:
    """Logits [T, V] of one sequence at positions 0..T-1; mask[q, k] True = q may attend k."""
    rope = config.get("rope_parameters") or {**config["rope_scaling"],
                                             "rope_theta": config["rope_theta"]}
    n, kv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    eps, t = config["rms_norm_eps"], len(ids)
    angles = np.arange(t)[:, None] * _inv_freq(hd, rope)[None, :]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
    q_scale = 1 + rope["llama_4_scaling_beta"] * np.log1p(
        np.floor(np.arange(t) / rope["original_max_position_embeddings"]))

    def norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * weight

    def rotate(x: np.ndarray) -> np.ndarray:  # x [heads, T, hd]
        half = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos + half * sin

    h = w["encoder.embed_tokens.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        x = norm(h, w[p + "input_layernorm.weight"])
        q = (x @ w[p + "self_attn.q_proj.weight"].T).reshape(t, n, hd).transpose(1, 0, 2)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).reshape(t, kv, hd).transpose(1, 0, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).reshape(t, kv, hd).transpose(1, 0, 2)
        q, k = rotate(q) * q_scale[None, :, None], rotate(k)
        k, v = np.repeat(k, n // kv, 0), np.repeat(v, n // kv, 0)
        scores = np.where(mask[None], q @ k.transpose(0, 2, 1) / math.sqrt(hd), -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(1, 0, 2).reshape(t, n * hd)
        h = h + attn @ w[p + "self_attn.o_proj.weight"].T
        x = norm(h, w[p + "post_attention_layernorm.weight"])
        gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        h = h + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    return norm(h, w["encoder.norm.weight"]) @ w["diffusion_head.weight"].T
