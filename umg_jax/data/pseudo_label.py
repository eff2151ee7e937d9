"""Deprecated name of :mod:`umg_jax.labeling.pseudo_label`: ``python -m umg_jax.data.pseudo_label``
forwards there, with a warning, until the next release."""

import sys

from umg_jax import deprecated

if __name__ == "__main__":
    sys.exit(deprecated.forward("umg_jax.data.pseudo_label", "umg_jax.labeling.pseudo_label"))
