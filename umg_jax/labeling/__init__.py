"""Pseudo-labelling tools: they turn images (with or without captions) into the data contract's
records. ``pseudo_label`` labels with a trained UMG-CLIP; ``annotate`` runs a recipe of teacher
models (captioner, tagger, detector, region captioner, segmenter). Both write through
:mod:`umg_jax.data.records`; ``data`` never imports this package."""
