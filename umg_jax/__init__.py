"""umg-jax: UMG-CLIP (multi-granularity CLIP: image, region and pixel alignment) in JAX/Flax.

Nothing heavy is imported here; ``umg_jax.load`` (the inference API) imports on first use.
"""

import os

__version__ = "0.1.0"


def load(workdir_or_checkpoint: str | os.PathLike, **kwargs):
    """Loads a trained model for inference from a local or ``gs://`` / ``s3://`` run or import
    directory; see ``umg_jax.inference.load``."""
    from umg_jax import inference

    return inference.load(workdir_or_checkpoint, **kwargs)


def load_segmenter(workdir: str | os.PathLike, **kwargs):
    """Loads a trained segmentation head + backbone from a local or ``gs://`` / ``s3://`` run;
    see ``umg_jax.inference.load_segmenter``."""
    from umg_jax import inference

    return inference.load_segmenter(workdir, **kwargs)
