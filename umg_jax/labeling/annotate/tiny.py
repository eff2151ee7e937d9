"""``--write_tiny_teachers DIR``: one tiny, randomly initialised model directory of every
backend family, a vocabulary, and recipes that run every stage with them.

The models are plumbing, not teachers: their captions are random tokens and their scores
near-uniform, so the recipes use permissive thresholds (and no phrase agreement, which random
phrases would always fail). They exist so that the tests, the README demo and anyone checking an
install can run the whole tool offline in seconds.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import time

from umg_jax.data.synthetic import SHAPES, STUFF

# (directory, family module, write_tiny keyword arguments)
MODELS = (("blip2", "blip2", {}), ("florence2", "florence2", {}),
          ("clip", "clip_tagger", {"kind": "clip"}), ("siglip", "clip_tagger", {"kind": "siglip"}),
          ("owlv2", "owlv2", {}), ("grounding_dino", "grounding_dino", {}),
          ("sam", "sam", {"kind": "sam"}), ("sam2", "sam", {"kind": "sam2"}),
          ("sam3", "sam3", {}))

_FILTER = {"stage": "filter", "min_box_area": 0.0005, "phrase_agreement": "off"}
RECIPES = {
    # one backend per stage, every stage
    "recipe.json": [
        {"stage": "caption", "backend": "florence2", "model": "florence2", "when": "always"},
        {"stage": "tag", "backend": "clip", "model": "clip", "threshold": 0.0, "max_tags": 3},
        {"stage": "tag", "backend": "noun_phrases"},
        {"stage": "detect", "backend": "owlv2", "model": "owlv2", "threshold": 0.0,
         "max_boxes": 3, "queries": "tags"},
        {"stage": "region_caption", "backend": "florence2", "model": "florence2"},
        {"stage": "segment", "backend": "sam", "model": "sam"},
        {"stage": "segment", "backend": "sam3", "model": "sam3", "prompts": "stuff",
         "threshold": 0.0},
        _FILTER],
    # the other backend of each stage
    "recipe_alt.json": [
        {"stage": "caption", "backend": "blip2", "model": "blip2", "when": "always"},
        {"stage": "tag", "backend": "siglip", "model": "siglip", "threshold": 0.0,
         "max_tags": 3},
        {"stage": "detect", "backend": "grounding_dino", "model": "grounding_dino",
         "threshold": 0.0, "max_boxes": 3, "queries": "tags", "options": {"text_threshold": 0.0}},
        {"stage": "region_caption", "backend": "blip2", "model": "blip2"},
        {"stage": "segment", "backend": "sam2", "model": "sam2"},
        _FILTER],
}


def write_tiny_teachers(directory: str, log=print) -> dict[str, float]:
    """Writes the models, ``vocab.txt`` and the recipes; returns seconds per model."""
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    took = {}
    for name, module, kw in MODELS:
        t = time.perf_counter()
        fam = importlib.import_module(f"umg_jax.labeling.annotate.families.{module}")
        fam.write_tiny(str(out / name), **kw)
        took[name] = time.perf_counter() - t
        log(f"wrote {out / name} ({took[name]:.1f} s)")
    (out / "vocab.txt").write_text("\n".join(SHAPES + STUFF) + "\n")
    for fname, stages in RECIPES.items():
        (out / fname).write_text(json.dumps(
            {"description": "tiny random teachers (plumbing check, not a labeller)",
             "vocab": "vocab.txt", "stages": stages}, indent=1))
    return took
