"""What every evaluator shares: encoding the batches once, the vocabulary's text embeddings."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

DEFAULT_TEMPLATES = ("a photo of a {}.", "a {} in the scene.", "an image of a {}.")


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def encode_batches(enc, batches: Iterable[dict]) -> list[dict]:
    """Adds ``img_emb [B, E]`` and ``dense_emb [B, gh, gw, E]`` (L2-normalised float32) to each
    batch, so that every evaluator reuses one image-tower pass. Batches already encoded are kept."""
    out = []
    for b in batches:
        if "img_emb" not in b:
            img, dense = enc.encode_image(b["image"])
            b = dict(b, img_emb=normalize(np.asarray(img, np.float32)),
                     dense_emb=normalize(np.asarray(dense, np.float32)))
        out.append(b)
    return out


def require(batch: dict, keys: Sequence[str], who: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"{who}: batch is missing {missing} (see umg_jax/data/schema.py)")


class Evaluator:
    """Base: ``run(enc, batches) -> {"<name>/<metric>": value}``."""

    name = "base"
    needs: tuple[str, ...] = ()

    def __init__(self, categories: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES):
        if not categories:
            raise ValueError(f"{self.name}: the vocabulary (category list) is empty")
        self.categories = list(categories)
        self.templates = tuple(templates)

    def class_embeddings(self, enc) -> np.ndarray:
        """``[C, E]`` prompt-ensembled, L2-normalised."""
        return np.asarray(enc.encode_text_labels(self.categories, self.templates), np.float32)

    def run(self, enc, batches: Iterable[dict]) -> dict[str, float]:
        batches = encode_batches(enc, batches)
        for b in batches:
            require(b, self.needs, self.name)
        return {f"{self.name}/{k}": v for k, v in self.compute(enc, batches).items()}

    def compute(self, enc, batches: list[dict]) -> dict[str, float]:
        raise NotImplementedError
