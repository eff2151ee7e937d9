"""Deprecated name of :mod:`umg_jax.downstream` (renamed so that it is not one letter from the
repository's ``benchmarks/`` speed scripts). ``python -m umg_jax.benchmark`` still runs, with a
warning, until the next release; import :mod:`umg_jax.downstream` instead."""
