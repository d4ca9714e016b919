"""Modelled H100 cost of the VLM vision encoder (tower + projector) per image, from the preset.

Arithmetic, not a measurement: FLOPs counted from the VLM-8B preset's shapes (2 per
multiply-add), a roofline time max(FLOPs / peak, bytes / bandwidth) at the H100 SXM's dense
peaks, so BENCHMARKS.md's table is this script's output (tests check they agree, and check the
FLOP count against XLA's own cost analysis of the compiled encoder at a small size).

- A square image of `side` pixels becomes ceil(side / 28) tokens a side (spec section 5), so
  (2 * tokens_per_side)^2 patches; each image is encoded alone (full attention over its patches).
- Tower per patch and layer: q, k, v, o (4 D^2) and the SwiGLU MLP (3 D F) multiply-adds, plus
  attention QK^T and PV (2 T D); the patch embedding (3 * 14^2 * D); the projector per merged
  token: merge (4 D * D), linear_1 (D E), linear_2 (E E). Norms, RoPE and softmax are ignored
  (element-wise, < 1% of the FLOPs).
- Bytes: the encoder's weights once (float32 tower by default) plus the tower's activations
  read and written once per layer; the f32 attention scores are counted too (T^2 N per layer),
  which XLA materialises without a fused attention kernel.
- float32 matmuls on an H100 run as TF32 on the tensor cores under JAX's default precision
  ("highest" would run them ~3x slower); bf16 is the `vision_dtype="bfloat16"` option.

    python benchmarks/vision_cost.py
"""

from __future__ import annotations

import dataclasses

from nld_jax.config import NLDConfig

SIDES = (560, 1000, 1400)
# H100 SXM dense tensor-core peaks and HBM3 bandwidth (NVIDIA datasheet).
PEAK_FLOPS = {"tf32": 494.7e12, "bf16": 989.4e12}
HBM_BYTES_PER_S = 3.35e12
F32, BF16 = 4, 2


@dataclasses.dataclass(frozen=True)
class Cost:
    """One image's encoder cost."""

    side: int  # pixels a side (square source image, <= max_image_size)
    tokens: int  # image tokens in the prompt (merged 2x2 patches)
    patches: int  # tower sequence length T
    tower_flops: float
    projector_flops: float
    bytes_f32: float  # weights + activations + scores, float32 tower
    bytes_bf16: float

    @property
    def flops(self) -> float:
        return self.tower_flops + self.projector_flops

    def milliseconds(self, precision: str) -> float:
        """Roofline time on one H100 at `precision` ("tf32": the float32 default, "bf16")."""
        moved = self.bytes_f32 if precision == "tf32" else self.bytes_bf16
        return 1e3 * max(self.flops / PEAK_FLOPS[precision], moved / HBM_BYTES_PER_S)


def cost(side: int, config: NLDConfig | None = None) -> Cost:
    """The encoder's cost for one square image of `side` pixels."""
    config = config or NLDConfig.preset("VLM-8B")
    mm = config.multimodal
    assert mm is not None
    v = mm.vision
    per_side = -(-min(side, mm.max_image_size) // mm.token_pixels)
    tokens = per_side ** 2
    t = tokens * mm.spatial_merge_size ** 2
    d, f, e = v.hidden_size, v.intermediate_size, config.hidden_size
    width = v.num_attention_heads * v.head_dim
    patch_vector = v.num_channels * v.patch_size ** 2
    layers = mm.vision_layers_run
    per_layer = 2 * t * (4 * d * width + 3 * d * f) + 2 * 2 * t * t * width
    tower = 2 * t * patch_vector * d + layers * per_layer
    projector = 2 * tokens * (4 * d * d + d * e + e * e)
    params = mm.num_parameters(e)

    def moved(width_bytes: int) -> float:
        activations = layers * t * (6 * d + 3 * f) * width_bytes  # written and read once
        scores = layers * t * t * v.num_attention_heads * F32
        return params * width_bytes + activations + scores

    return Cost(side, tokens, t, float(tower), float(projector), moved(F32), moved(BF16))


def table() -> str:
    """The markdown table of BENCHMARKS.md."""
    lines = ["| image side px | image tokens | tower patches | GFLOP | share in attention | "
             "ms at TF32 peak (float32 tower) | ms at bf16 peak | f32 scores / layer GiB | "
             "modelled ms, float32 tower, XLA attention | modelled ms, bf16, XLA attention |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    config = NLDConfig.preset("VLM-8B")
    v = config.multimodal.vision
    for side in SIDES:
        c = cost(side, config)
        attention = config.multimodal.vision_layers_run * 4 * c.patches ** 2 * (
            v.num_attention_heads * v.head_dim)
        scores = c.patches ** 2 * v.num_attention_heads * F32 / 2 ** 30
        lines.append(
            f"| {side} | {c.tokens:,} | {c.patches:,} | {c.flops / 1e9:,.0f} | "
            f"{attention / c.flops:.0%} | {1e3 * c.flops / PEAK_FLOPS['tf32']:.1f} | "
            f"{1e3 * c.flops / PEAK_FLOPS['bf16']:.1f} | {scores:.2f} | "
            f"{c.milliseconds('tf32'):.1f} | {c.milliseconds('bf16'):.1f} |")
    return "\n".join(lines)


def main() -> None:
    print(table())


if __name__ == "__main__":
    main()
