"""``python -m umg_jax.downstream``: the paper's evaluation table on the benchmarks' own files
(zero-shot classification, retrieval, region classification, semantic and panoptic
segmentation). Tasks live in one module per family; ``common`` holds what they share."""
