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

__all__ = ["NLDConfig", "ConfigError"]


class ConfigError(ValueError):
    """A config.json that is missing a field, has one out of range, or describes another model."""


_ROPE_TYPES = ("yarn", "default")
_DLM_PARADIGMS = ("bidirectional", "autoregressive", "block_diff")


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

    def __post_init__(self) -> None:
        self.validate()

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
        return self.num_hidden_layers * per_layer + 2 * v * d + d

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
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            fail(f"rope_type={rope_type!r} is not supported (expected one of {_ROPE_TYPES})")
        yarn: dict[str, Any] = {}
        if rope_type == "yarn":
            yarn = dict(
                rope_factor=float(required("factor", rope, where)),
                original_max_position_embeddings=required("original_max_position_embeddings",
                                                          rope, where),
                beta_fast=float(rope.get("beta_fast") or 32.0),
                beta_slow=float(rope.get("beta_slow") or 1.0),
                mscale=rope.get("mscale"),
                mscale_all_dim=rope.get("mscale_all_dim"),
                attention_factor=rope.get("attention_factor"),
                rope_truncate=bool(rope.get("truncate", True)),
            )
        llama4_beta = rope.get("llama_4_scaling_beta")
        if llama4_beta is not None and rope_type != "yarn":
            fail("llama_4_scaling_beta needs original_max_position_embeddings (a yarn rope)")

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
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                max_position_embeddings=raw.get("max_position_embeddings", 262144),
                rope_type=rope_type,
                rope_theta=float(theta),
                llama_4_scaling_beta=None if llama4_beta is None else float(llama4_beta),
                bos_token_id=raw.get("bos_token_id", 1),
                eos_token_ids=eos_ids,
                mask_token_id=required("mask_token_id"),
                block_size=raw.get("block_size", 32),
                dlm_paradigm=raw.get("dlm_paradigm", "bidirectional"),
                **yarn,
            )
        except ConfigError as e:
            raise ConfigError(str(e).replace("NLDConfig:", f"{source}:", 1)) from None
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
        return {
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

    def save_json(self, path: str | os.PathLike) -> None:
        """Writes the released `config.json` layout to `path`."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(), f, indent=2)
            f.write("\n")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> NLDConfig:
        """A released size ("3B", "8B", "14B") or "tiny" (a test-sized network)."""
        if name not in _PRESETS:
            raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(_PRESETS)}")
        return dataclasses.replace(_PRESETS[name], **overrides)


_COMMON: dict[str, Any] = dict(vocab_size=131072, num_attention_heads=32, num_key_value_heads=8,
                               head_dim=128)
_PRESETS: dict[str, NLDConfig] = {
    "3B": NLDConfig(hidden_size=3072, num_hidden_layers=26, intermediate_size=9216, **_COMMON),
    "8B": NLDConfig(hidden_size=4096, num_hidden_layers=34, intermediate_size=14336, **_COMMON),
    "14B": NLDConfig(hidden_size=5120, num_hidden_layers=40, intermediate_size=16384,
                     rope_theta=1e9, **_COMMON),
    "tiny": NLDConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=128,
                      max_position_embeddings=4096, original_max_position_embeddings=256,
                      block_size=8),
}
