"""``python -m umg_jax.data.annotate``: forwards to ``python -m umg_jax.labeling.annotate``."""

import sys

from umg_jax import deprecated

if __name__ == "__main__":
    sys.exit(deprecated.forward("umg_jax.data.annotate", "umg_jax.labeling.annotate.__main__"))
