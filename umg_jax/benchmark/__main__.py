"""``python -m umg_jax.benchmark``: see :mod:`umg_jax.benchmark.cli`."""

import sys

from umg_jax.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
