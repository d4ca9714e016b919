"""The decoding modes, by name: one module each (see nld_jax.decode.common for the interface).

Adding a mode is one new module defining `MODE` and one line in REGISTRY.
"""

from nld_jax.decode import ar, diffusion, self_spec, self_spec_quadratic
from nld_jax.decode.common import Mode

__all__ = ["REGISTRY", "DEFAULT_MODE", "Mode"]

REGISTRY: dict[str, Mode] = {mode.name: mode for mode in (
    ar.MODE,
    diffusion.MODE,
    self_spec.MODE,
    self_spec_quadratic.MODE,
)}
DEFAULT_MODE = ar.MODE.name
