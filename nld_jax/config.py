"""NLDConfig: the released `config.json`, read strictly and validated.

Both RoPE spellings of the released files are accepted: the current `rope_parameters` dict and the
older top-level `rope_theta` + `rope_scaling`. Every value the network uses is read from the file;
nothing model-specific is hard-coded outside the presets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

__all__ = ["NLDConfig", "ConfigError", "VisionConfig", "MultimodalConfig"]


class ConfigError(ValueError):
    """A config.json that is missing a field, has one out of range, or describes another model."""


_ROPE_TYPES = ("yarn", "default")
_DLM_PARADIGMS = ("bidirectional", "autoregressive", "block_diff")
VLM_ARCHITECTURE = "NemotronLabsDiffusionVLMModel"
# The projector's activation: transformers' "gelu" is the exact (erf) GELU; the spec assumes it
# (open question 5), "gelu_pytorch_tanh" is the tanh approximation.
_PROJECTOR_ACTS = ("gelu", "gelu_pytorch_tanh")


def _positive_ints(obj: Any, names: tuple[str, ...], fail: Any) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            fail(f"{name}={value!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The Pixtral vision tower (the checkpoint's `vision_config`)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    head_dim: int = 64
    patch_size: int = 14
    num_channels: int = 3
    image_size: int = 1540
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(f"vision_config: {msg}")

        _positive_ints(self, ("hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "head_dim", "patch_size", "num_channels",
                              "image_size"), fail)
        if self.head_dim % 4:
            fail(f"head_dim={self.head_dim} must be a multiple of 4 (2D RoPE: rows and columns)")
        if not self.rope_theta > 1.0:
            fail(f"rope_theta={self.rope_theta} must be > 1")


@dataclasses.dataclass(frozen=True)
class MultimodalConfig:
    """The VLM's vision tower, projector and image tokens (spec/vlm.md sections 1, 5, 6).

    Values the spec marks as guesses are fields with the guess as default: the image token ids,
    `max_image_size`, the RGBA background, the projector's GELU, `vision_feature_layer`.
    """

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    spatial_merge_size: int = 2
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -1
    image_token_id: int = 19
    image_start_token_id: int = 18
    image_break_token_id: int = 20
    image_end_token_id: int = 21
    max_image_size: int = 1400
    image_background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(f"multimodal config: {msg}")

        if self.spatial_merge_size != 2:
            fail(f"spatial_merge_size={self.spatial_merge_size} is not supported (expected 2)")
        if self.projector_hidden_act not in _PROJECTOR_ACTS:
            fail(f"projector_hidden_act={self.projector_hidden_act!r} is not one of "
                 f"{_PROJECTOR_ACTS}")
        layers = self.vision.num_hidden_layers
        if not -(layers + 1) <= self.vision_feature_layer <= layers:
            fail(f"vision_feature_layer={self.vision_feature_layer} is outside "
                 f"[-{layers + 1}, {layers}] (hidden states of {layers} layers)")
        ids = [self.image_token_id, self.image_start_token_id, self.image_break_token_id,
               self.image_end_token_id]
        if len(set(ids)) != 4:
            fail(f"image token ids {ids} (pad, start, break, end) must be distinct")
        bg = self.image_background
        if len(bg) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in bg):
            fail(f"image_background={bg!r} must be three integers in [0, 255]")
        if self.max_image_size < self.token_pixels:
            fail(f"max_image_size={self.max_image_size} must be >= {self.token_pixels}")

    @property
    def token_pixels(self) -> int:
        """Side in pixels of one image token: patch x merge (28)."""
        return self.vision.patch_size * self.spatial_merge_size

    def num_parameters(self, text_hidden_size: int) -> int:
        """Tower + projector parameter count (the projector ends at the text width)."""
        v = self.vision
        dv, patch = v.hidden_size, v.num_channels * v.patch_size ** 2
        per_layer = 4 * dv * v.num_attention_heads * v.head_dim + 3 * dv * v.intermediate_size \
            + 2 * dv
        tower = patch * dv + dv + v.num_hidden_layers * per_layer
        merge = self.spatial_merge_size ** 2
        projector = dv + merge * dv * dv + dv * text_hidden_size + text_hidden_size ** 2
        return tower + projector

    @property
    def vision_layers_run(self) -> int:
        """How many tower layers produce hidden_states[vision_feature_layer]."""
        layers = self.vision.num_hidden_layers
        k = self.vision_feature_layer
        return k if k >= 0 else layers + 1 + k


@dataclasses.dataclass(frozen=True)
class NLDConfig:
    """The network's hyper-parameters. Field names follow the Hugging Face `config.json`."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 262144
    # RoPE (YaRN) parameters; `rope_type="default"` ignores every field below rope_theta.
    rope_type: str = "yarn"
    rope_theta: float = 1e6
    rope_factor: float = 16.0
    original_max_position_embeddings: int = 16384
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = 1.0
    mscale_all_dim: float | None = 1.0
    attention_factor: float | None = None
    rope_truncate: bool = True
    # Llama-4 query scaling by absolute position; None switches it off.
    llama_4_scaling_beta: float | None = 0.1
    bos_token_id: int = 1
    eos_token_ids: tuple[int, ...] = (11,)
    mask_token_id: int = 100
    block_size: int = 32
    dlm_paradigm: str = "bidirectional"
    # The VLM's vision tower and projector; None for a text-only model.
    multimodal: MultimodalConfig | None = None
    # Where the values came from, for error messages (from_dict passes the file); not a field.
    source: dataclasses.InitVar[str] = "NLDConfig"

    def __post_init__(self, source: str) -> None:
        self.validate(source)

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "NLDConfig") -> None:
        """Raises ConfigError naming the first field that is out of range."""

        def fail(msg: str) -> None:
            raise ConfigError(f"{source}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size",
                     "max_position_embeddings", "block_size", "original_max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(f"{name}={value!r} must be a positive integer")
        for name in ("rms_norm_eps", "rope_theta", "rope_factor", "beta_fast", "beta_slow",
                     "mscale", "mscale_all_dim", "attention_factor", "llama_4_scaling_beta"):
            value = getattr(self, name)
            optional = name in ("mscale", "mscale_all_dim", "attention_factor",
                                "llama_4_scaling_beta")
            if value is None and optional:
                continue
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value)):
                fail(f"{name}={value!r} must be a finite number" + (" or null" if optional else ""))
        if not isinstance(self.rope_truncate, bool):
            fail(f"rope truncate={self.rope_truncate!r} must be true or false")
        if self.num_attention_heads % self.num_key_value_heads:
            fail(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                 f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            fail(f"head_dim={self.head_dim} must be even (RoPE rotates two halves)")
        if not (0.0 < self.rms_norm_eps < 1.0):
            fail(f"rms_norm_eps={self.rms_norm_eps} must be in (0, 1)")
        if self.rope_type not in _ROPE_TYPES:
            fail(f"rope_type={self.rope_type!r} is not supported (expected one of {_ROPE_TYPES})")
        if not self.rope_theta > 1.0:
            fail(f"rope_theta={self.rope_theta} must be > 1")
        if self.rope_type == "yarn":
            if not self.rope_factor >= 1.0:
                fail(f"rope factor={self.rope_factor} must be >= 1")
            if not self.beta_fast > self.beta_slow > 0:
                fail(f"need beta_fast > beta_slow > 0, got {self.beta_fast=}, {self.beta_slow=}")
        if self.llama_4_scaling_beta is not None and self.llama_4_scaling_beta < 0:
            fail(f"llama_4_scaling_beta={self.llama_4_scaling_beta} must be >= 0")
        if not self.eos_token_ids:
            fail("eos_token_id must name at least one token")
        special = (("bos_token_id", (self.bos_token_id,)), ("eos_token_id", self.eos_token_ids),
                   ("mask_token_id", (self.mask_token_id,)))
        for name, ids in special:
            for token in ids:
                if (isinstance(token, bool) or not isinstance(token, int)
                        or not 0 <= token < self.vocab_size):
                    fail(f"{name}={token!r} must be a token id in "
                         f"[0, vocab_size={self.vocab_size})")
        if self.dlm_paradigm not in _DLM_PARADIGMS:
            fail(f"dlm_paradigm={self.dlm_paradigm!r} is not one of {_DLM_PARADIGMS}")
        if self.multimodal is not None:
            mm = self.multimodal
            for name in ("image_token_id", "image_start_token_id", "image_break_token_id",
                         "image_end_token_id"):
                token = getattr(mm, name)
                if not 0 <= token < self.vocab_size:
                    fail(f"{name}={token} must be a token id in [0, vocab_size={self.vocab_size})")

    # ------------------------------------------------------------------ derived
    @property
    def num_query_groups(self) -> int:
        """G: query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_id(self) -> int:
        """The first EOS id (the one a tokenizer appends)."""
        return self.eos_token_ids[0]

    @property
    def rope_attention_factor(self) -> float:
        """Scale of cos/sin (YaRN's attention factor), derived as transformers derives it."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor

        def yarn_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.rope_factor, self.mscale) / yarn_mscale(
                self.rope_factor, self.mscale_all_dim)
        return yarn_mscale(self.rope_factor)

    @property
    def num_parameters(self) -> int:
        """Parameter count (untied head, no LoRA)."""
        d, n, k, h, f, v = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads,
                            self.head_dim, self.intermediate_size, self.vocab_size)
        per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f + 2 * d
        text = self.num_hidden_layers * per_layer + 2 * v * d + d
        return text + (0 if self.multimodal is None else self.multimodal.num_parameters(d))

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_json(cls, path: str | os.PathLike) -> NLDConfig:
        """Reads and validates `config.json` (a file, or a directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such config file")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> NLDConfig:
        """Builds a config from a Hugging Face config dict, with errors naming `source`."""

        def fail(msg: str) -> None:
            raise ConfigError(f"{source}: {msg}")

        def required(key: str, container: dict[str, Any] = raw, where: str = "") -> Any:
            if key not in container or container[key] is None:
                fail(f"missing required field {where}{key!r}")
            return container[key]

        def number(value: Any, name: str) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                fail(f"{name}={value!r} must be a number")
            return float(value)

        if raw.get("tie_word_embeddings", False):
            fail("tie_word_embeddings=true: NLD checkpoints have an untied diffusion_head")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            fail(f"hidden_act={act!r} is not supported (NLD uses 'silu')")
        for key in ("attention_bias", "mlp_bias"):
            if raw.get(key):
                fail(f"{key}=true is not supported (NLD has no biases)")
        if raw.get("sliding_window") is not None:
            fail(f"sliding_window={raw['sliding_window']!r} is not supported "
                 "(NLD uses full attention)")

        # RoPE: the new spelling wins when both are present.
        if isinstance(raw.get("rope_parameters"), dict):
            rope, where = raw["rope_parameters"], "rope_parameters."
            theta = required("rope_theta", rope, where)
        else:
            rope = raw.get("rope_scaling") or {}
            where = "rope_scaling."
            if not isinstance(rope, dict):
                fail(f"rope_scaling must be an object, got {rope!r}")
            theta = required("rope_theta")
        # An unsupported rope_type is named by validate() (no yarn fields are read for it).
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        yarn: dict[str, Any] = {}
        if rope_type == "yarn":
            yarn = dict(
                rope_factor=number(required("factor", rope, where), where + "factor"),
                original_max_position_embeddings=required("original_max_position_embeddings",
                                                          rope, where),
                beta_fast=number(rope.get("beta_fast") or 32.0, where + "beta_fast"),
                beta_slow=number(rope.get("beta_slow") or 1.0, where + "beta_slow"),
                mscale=rope.get("mscale"),
                mscale_all_dim=rope.get("mscale_all_dim"),
                attention_factor=rope.get("attention_factor"),
                rope_truncate=rope.get("truncate", True),
            )
        llama4_beta = rope.get("llama_4_scaling_beta")
        if llama4_beta is not None and rope_type == "default":
            fail("llama_4_scaling_beta needs original_max_position_embeddings (a yarn rope)")

        multimodal = _multimodal_from_dict(raw, fail) if _is_vlm(raw) else None
        eos = required("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
        hidden = required("hidden_size")
        heads = required("num_attention_heads")
        try:
            return cls(
                vocab_size=required("vocab_size"),
                hidden_size=hidden,
                num_hidden_layers=required("num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=raw.get("num_key_value_heads", heads),
                head_dim=raw.get("head_dim") or (hidden // heads if isinstance(hidden, int)
                                                 and isinstance(heads, int) and heads else 0),
                intermediate_size=required("intermediate_size"),
                rms_norm_eps=number(raw.get("rms_norm_eps", 1e-5), "rms_norm_eps"),
                max_position_embeddings=raw.get("max_position_embeddings", 262144),
                rope_type=rope_type,
                rope_theta=number(theta, where + "rope_theta"),
                llama_4_scaling_beta=None if llama4_beta is None else number(
                    llama4_beta, where + "llama_4_scaling_beta"),
                bos_token_id=raw.get("bos_token_id", 1),
                eos_token_ids=eos_ids,
                mask_token_id=required("mask_token_id"),
                block_size=raw.get("block_size", 32),
                dlm_paradigm=raw.get("dlm_paradigm", "bidirectional"),
                multimodal=multimodal,
                source=source,
                **yarn,
            )
        except (TypeError, ValueError) as e:
            fail(f"bad field value ({e})")
            raise  # unreachable; keeps type checkers quiet

    def to_hf_dict(self) -> dict[str, Any]:
        """The released `config.json` layout (rope_parameters spelling)."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "yarn":
            rope.update(factor=self.rope_factor,
                        original_max_position_embeddings=self.original_max_position_embeddings,
                        beta_fast=self.beta_fast, beta_slow=self.beta_slow, mscale=self.mscale,
                        mscale_all_dim=self.mscale_all_dim, truncate=self.rope_truncate)
            if self.attention_factor is not None:
                rope["attention_factor"] = self.attention_factor
        if self.llama_4_scaling_beta is not None:
            rope["llama_4_scaling_beta"] = self.llama_4_scaling_beta
        out = {
            "architectures": ["NemotronLabsDiffusionModel"],
            "model_type": "nemotron_labs_diffusion",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1
            else list(self.eos_token_ids),
            "mask_token_id": self.mask_token_id,
            "block_size": self.block_size,
            "dlm_paradigm": self.dlm_paradigm,
            "torch_dtype": "bfloat16",
            "rope_parameters": rope,
        }
        if self.multimodal is not None:
            out.update(_multimodal_to_dict(self.multimodal))
        return out

    def save_json(self, path: str | os.PathLike) -> None:
        """Writes the released `config.json` layout to `path`."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(), f, indent=2)
            f.write("\n")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> NLDConfig:
        """A released size ("3B", "8B", "14B", "VLM-8B") or "tiny" (a test-sized network)."""
        if name not in _PRESETS:
            raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(_PRESETS)}")
        return dataclasses.replace(_PRESETS[name], **overrides)


def _is_vlm(raw: dict[str, Any]) -> bool:
    return (VLM_ARCHITECTURE in (raw.get("architectures") or [])
            or raw.get("model_type") == "nemotron_labs_diffusion_vlm" or "vision_config" in raw)


def _multimodal_from_dict(raw: dict[str, Any], fail: Any) -> MultimodalConfig:
    """The VLM fields: the nested `vision_config` and the projector/image-token fields at the root.

    The released model code uses the class constant IMAGE_TOKEN_ID = 19, so a config's
    `image_token_index` (Mistral3's name, possibly 10) is ignored; our own `image_token_id`,
    `image_*_token_id` and `max_image_size` fields override the defaults.
    """
    vision = raw.get("vision_config")
    if not isinstance(vision, dict):
        fail("a VLM config needs a 'vision_config' object")
    if vision.get("hidden_act", "silu") != "silu":
        fail(f"vision_config.hidden_act={vision['hidden_act']!r} is not supported (Pixtral: silu)")
    rope = vision.get("rope_parameters") or {}
    if rope.get("rope_type", "default") not in ("default", "axial"):
        fail(f"vision_config.rope_parameters.rope_type={rope['rope_type']!r}: the tower's 2D "
             "RoPE is 'default' (transformers calls it 'axial')")
    if raw.get("multimodal_projector_bias"):
        fail("multimodal_projector_bias=true is not supported (the projector has no biases)")
    feature_layer = raw.get("vision_feature_layer", -1)
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        fail(f"vision_feature_layer={feature_layer!r} must be one integer")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "patch_size"):
        if key not in vision:
            fail(f"missing required field 'vision_config.{key}'")
    try:
        heads = vision["num_attention_heads"]
        tower = VisionConfig(
            hidden_size=vision["hidden_size"],
            intermediate_size=vision["intermediate_size"],
            num_hidden_layers=vision["num_hidden_layers"],
            num_attention_heads=heads,
            head_dim=vision.get("head_dim") or vision["hidden_size"] // max(heads, 1),
            patch_size=vision["patch_size"],
            num_channels=vision.get("num_channels", 3),
            image_size=vision.get("image_size", 1540),
            rope_theta=float(rope.get("rope_theta", vision.get("rope_theta", 10000.0))),
        )
        defaults = MultimodalConfig()
        return MultimodalConfig(
            vision=tower,
            spatial_merge_size=raw.get("spatial_merge_size", 2),
            projector_hidden_act=raw.get("projector_hidden_act", "gelu"),
            vision_feature_layer=feature_layer,
            image_token_id=raw.get("image_token_id", defaults.image_token_id),
            image_start_token_id=raw.get("image_start_token_id", defaults.image_start_token_id),
            image_break_token_id=raw.get("image_break_token_id", defaults.image_break_token_id),
            image_end_token_id=raw.get("image_end_token_id", defaults.image_end_token_id),
            max_image_size=raw.get("max_image_size", defaults.max_image_size),
            image_background=tuple(raw.get("image_background", defaults.image_background)),
        )
    except ConfigError as e:
        fail(str(e))
        raise  # unreachable
    except (TypeError, ValueError) as e:
        fail(f"bad vision field value ({e})")
        raise  # unreachable


def _multimodal_to_dict(mm: MultimodalConfig) -> dict[str, Any]:
    v = mm.vision
    return {
        "architectures": [VLM_ARCHITECTURE],
        "model_type": "nemotron_labs_diffusion_vlm",
        "vision_config": {
            "model_type": "pixtral", "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads, "head_dim": v.head_dim,
            "patch_size": v.patch_size, "num_channels": v.num_channels,
            "image_size": v.image_size, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": v.rope_theta},
        },
        "spatial_merge_size": mm.spatial_merge_size,
        "projector_hidden_act": mm.projector_hidden_act,
        "multimodal_projector_bias": False,
        "vision_feature_layer": mm.vision_feature_layer,
        "image_token_id": mm.image_token_id,
        "image_start_token_id": mm.image_start_token_id,
        "image_break_token_id": mm.image_break_token_id,
        "image_end_token_id": mm.image_end_token_id,
        "max_image_size": mm.max_image_size,
        "image_background": list(mm.image_background),
    }


_COMMON: dict[str, Any] = dict(vocab_size=131072, num_attention_heads=32, num_key_value_heads=8,
                               head_dim=128)
_PRESETS: dict[str, NLDConfig] = {
    "3B": NLDConfig(hidden_size=3072, num_hidden_layers=26, intermediate_size=9216, **_COMMON),
    "8B": NLDConfig(hidden_size=4096, num_hidden_layers=34, intermediate_size=14336, **_COMMON),
    "14B": NLDConfig(hidden_size=5120, num_hidden_layers=40, intermediate_size=16384,
                     rope_theta=1e9, **_COMMON),
    "VLM-8B": NLDConfig(hidden_size=4096, num_hidden_layers=34, intermediate_size=14336,
                        multimodal=MultimodalConfig(), **_COMMON),
    "tiny": NLDConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=128,
                      max_position_embeddings=4096, original_max_position_embeddings=256,
                      block_size=8),
}
