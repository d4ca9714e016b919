"""nld_jax: Nemotron-Labs-Diffusion language models in JAX (Flax NNX)."""

import nld_jax._no_gpu  # noqa: F401  (first: before JAX starts its backends)
from nld_jax.config import ConfigError, NLDConfig
from nld_jax.generate import MODES, GenerationOutput, generate
from nld_jax.image import ImageError, load_image
from nld_jax.loading import LoadError, load_model
from nld_jax.model import NLDModel
from nld_jax.tokenizer import Tokenizer, load_tokenizer

__all__ = ["NLDConfig", "NLDModel", "ConfigError", "LoadError", "load_model", "generate",
           "GenerationOutput", "MODES", "Tokenizer", "load_tokenizer", "load_image", "ImageError"]
__version__ = "0.1.0"
