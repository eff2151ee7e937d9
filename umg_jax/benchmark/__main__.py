"""``python -m umg_jax.benchmark``: forwards to ``python -m umg_jax.downstream`` (one release)."""

import sys

from umg_jax import deprecated

if __name__ == "__main__":
    sys.exit(deprecated.forward("umg_jax.benchmark", "umg_jax.downstream.cli"))
