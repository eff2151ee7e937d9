"""The UMG-CLIP objective: weighted sum of the image, tag, region, mask and pixel terms.

Called inside the jitted train step on globally split arrays (batch over the mesh's batch axes).
A term whose weight is 0 is not computed at all (static under jit). The paper does not give its
loss formulas or weights (Shi et al., ECCV 2024, arXiv 2401.06397); the choices here
(symmetric InfoNCE or SigLIP per ``loss.kind``, multi-positive targets for equal texts, per-image
pixel classification) are documented in each module and switchable in ``configs.loss``.
``batch["example_weight"]`` is not used by the losses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from umg_jax.losses.contrastive import KINDS
from umg_jax.losses.image import image_tags_loss, image_text_loss
from umg_jax.losses.pixel import mask_loss, pixel_loss
from umg_jax.losses.region import region_loss

TERMS = ("image", "tags", "region", "mask", "pixel")
NEEDS = {"image": ("img", "txt"), "tags": ("img", "tags_txt"), "region": ("dense", "region_txt"),
         "mask": ("dense", "mask_txt"), "pixel": ("dense", "mask_txt")}


def _need(outputs: dict, key: str, term: str) -> jax.Array:
    if key not in outputs:
        raise KeyError(f"loss term {term!r} has a non-zero weight but the model outputs have no "
                       f"{key!r} (have {sorted(outputs)})")
    return outputs[key]


def umg_loss(outputs: dict, batch: dict, loss_cfg, mesh: Mesh) -> tuple[jax.Array, dict]:
    """Total loss and metrics.

    Args:
      outputs: ``img [B, E]``, ``dense [B, gh, gw, E]``, ``txt [B, E]``, ``tags_txt [B, T, E]``,
        ``region_txt [B, R, E]``, ``mask_txt [B, M, E]`` (unnormalised; those a weighted term
        needs), ``scales {term: log scale}``, ``biases {term: bias} | None``.
      batch: the schema batch (``umg_jax.data.schema``).
      loss_cfg: ``config.loss`` (configs/common.py:loss_config).
      mesh: the device mesh (the contrastive terms run under ``shard_map`` over its batch axes).

    Returns:
      ``(total, metrics)``: ``total = sum_t w_t * loss_t``; metrics hold ``loss_<t>``,
      ``acc_<t>`` for every computed term and ``scale_<t>`` (= exp(log scale)) / ``bias_<t>``
      for every term.
    """
    kind = loss_cfg.kind
    if kind not in KINDS:
        raise ValueError(f"loss.kind {kind!r} is not one of {KINDS}")
    biases = outputs.get("biases")
    if kind == "sigmoid" and biases is None:
        raise ValueError("loss.kind='sigmoid' needs learned logit biases: set "
                         "model.logit_bias_init (SigLIP uses -10)")
    scales = outputs["scales"]
    common = dict(kind=kind, chunk_size=int(loss_cfg.chunk_size), mesh=mesh,
                  exchange=loss_cfg.get("exchange", "all_gather"),
                  exchange_dtype=loss_cfg.get("exchange_dtype", "float32"))
    bias = (lambda t: biases[t] if kind == "sigmoid" else None)

    terms: dict[str, tuple[jax.Array, jax.Array]] = {}
    w = {t: float(loss_cfg.get(f"w_{t}", 0.0)) for t in TERMS}
    for t, keys in NEEDS.items():  # fail before tracing anything
        for key in keys if w[t] else ():
            _need(outputs, key, t)
    if w["image"]:
        terms["image"] = image_text_loss(
            _need(outputs, "img", "image"), _need(outputs, "txt", "image"), batch["text"],
            batch["text_valid"], scales["image"], bias("image"), **common)
    if w["tags"]:
        terms["tags"] = image_tags_loss(
            _need(outputs, "img", "tags"), _need(outputs, "tags_txt", "tags"), batch["tags"],
            batch["tags_valid"], scales["tags"], bias("tags"), **common)
    if w["region"]:
        terms["region"] = region_loss(
            _need(outputs, "dense", "region"), batch["region_boxes"],
            _need(outputs, "region_txt", "region"), batch["region_text"], batch["region_valid"],
            scales["region"], bias("region"), roi_size=int(loss_cfg.roi_size),
            sampling_ratio=int(loss_cfg.roi_sampling_ratio), **common)
    if w["mask"]:
        terms["mask"] = mask_loss(
            _need(outputs, "dense", "mask"), batch["mask_area"],
            _need(outputs, "mask_txt", "mask"), batch["mask_text"], batch["mask_valid"],
            scales["mask"], bias("mask"), **common)
    if w["pixel"]:
        terms["pixel"] = pixel_loss(
            _need(outputs, "dense", "pixel"), _need(outputs, "mask_txt", "pixel"),
            batch["mask_text"], batch["mask_valid"], batch["pixel_target"], scales["pixel"],
            bias("pixel"), kind=kind)

    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {}
    for t, (loss, acc) in terms.items():
        total = total + w[t] * loss
        metrics[f"loss_{t}"] = loss
        metrics[f"acc_{t}"] = acc
    for t in TERMS:
        if t in scales:
            metrics[f"scale_{t}"] = jnp.exp(scales[t])
        if kind == "sigmoid" and t in biases:
            metrics[f"bias_{t}"] = jnp.asarray(biases[t], jnp.float32)
    return total, metrics
