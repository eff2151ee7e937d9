"""Readers that turn public annotation formats into records of ``umg_jax/data/schema.py``.

Each source module exposes ``records(..., report) -> (iterator of record dicts, categories)``;
``umg_jax.data.build`` writes them as shards. ``report`` (:class:`common.Report`) collects every
dropped input with its source id and reason.
"""
