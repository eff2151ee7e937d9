"""Deprecated name of :mod:`umg_jax.labeling.annotate`: ``python -m umg_jax.data.annotate``
forwards there, with a warning, until the next release."""
