"""``python -m umg_jax.downstream``: see :mod:`umg_jax.downstream.cli`."""

import sys

from umg_jax.downstream.cli import main

if __name__ == "__main__":
    sys.exit(main())
