"""OWLv2 (Minderer et al., 2023): open-vocabulary detection queried by text, as the ``detect``
backend ``"owlv2"`` (``Owlv2ForObjectDetection`` + ``Owlv2Processor``, e.g.
``google/owlv2-base-patch16-ensemble``).

Every image gets its own query list. The processor pads each image with zeros to a square (bottom
and right) before resizing it to the model's input size, so the predicted boxes are normalised to
that padded square; the processor's post-processing scales them by ``max(h, w)``, which gives
pixels of the original image, and we clip them to the image.

Options:
  ``batch_size`` (int, default 8): images per forward pass.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from umg_jax.labeling.annotate.backend import AnnotateError, Detector
from umg_jax.labeling.annotate.families import hf

MODEL_TYPES = ("owlv2",)


def empty_detections() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(boxes [0, 4] float32, labels [0] int32, scores [0] float32)``."""
    return (np.zeros((0, 4), np.float32), np.zeros((0,), np.int32), np.zeros((0,), np.float32))


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[K, 4]`` x0, y0, x1, y1 clipped to a ``height`` x ``width`` image (float32)."""
    out = np.asarray(boxes, np.float32).copy()
    out[:, 0::2] = out[:, 0::2].clip(0, width)
    out[:, 1::2] = out[:, 1::2].clip(0, height)
    return out


class Owlv2Detector(Detector):
    """Text-queried detector. ``model``: a local OWLv2 directory (``model_type`` ``owlv2``)."""

    family = "owlv2"

    def __init__(self, model: str | None, device: str = "cpu", batch_size: int = 8,
                 **options: Any):
        super().__init__(model, device, **options)
        hf.positive_int(self.family, "batch_size", batch_size)
        self.batch_size = int(batch_size)
        self.torch = hf.import_torch()
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        self.dev = hf.device(device)
        self.model, self.processor = hf.load(Owlv2ForObjectDetection, Owlv2Processor, model,
                                             self.dev, self.family, MODEL_TYPES)

    def detect(self, images: list[np.ndarray], queries: list[list[str]], threshold: float
               ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image ``(boxes [K, 4] float32 px, labels [K] int32, scores [K] float32)``, one
        candidate per image patch whose best query scores above ``threshold`` (the
        processor keeps ``score > threshold``), label = that query's index in ``queries[i]``."""
        if len(images) != len(queries):
            raise AnnotateError(f"{self.family}: {len(images)} images but {len(queries)} "
                                "query lists")
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [empty_detections() for _ in images]
        # images without queries never reach the model
        todo = [i for i, q in enumerate(queries) if len(q)]
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start:start + self.batch_size]
            res = self._run([images[i] for i in idx], [list(queries[i]) for i in idx], threshold)
            for i, r in zip(idx, res, strict=True):
                out[i] = r
        return out

    def _run(self, images: list[np.ndarray], queries: list[list[str]], threshold: float
             ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        torch = self.torch
        n_max = max(len(q) for q in queries)
        # the processor pads the shorter query lists with " ", which the model's own query mask
        # (input_ids[..., 0] > 0) does not catch: zero those rows' ids so it masks them out
        # channels_last: an image 3 px high or wide must not pass for channels-first
        inputs = self.processor(images=list(images), text=queries, return_tensors="pt",
                                truncation=True, input_data_format="channels_last")
        ids = inputs["input_ids"].reshape(len(images), n_max, -1)
        for b, q in enumerate(queries):
            ids[b, len(q):] = 0
        inputs["input_ids"] = ids.reshape(len(images) * n_max, -1)
        inputs = {k: v.to(self.dev) for k, v in inputs.items()}
        with torch.inference_mode():
            outputs = self.model(**inputs)
        sizes = [tuple(im.shape[:2]) for im in images]
        res = self.processor.post_process_grounded_object_detection(
            outputs, threshold=float(threshold), target_sizes=sizes)
        out = []
        for (h, w), r in zip(sizes, res, strict=True):
            boxes = r["boxes"].float().cpu().numpy().reshape(-1, 4)
            out.append((clip_boxes(boxes, h, w), r["labels"].cpu().numpy().astype(np.int32),
                        r["scores"].float().cpu().numpy().astype(np.float32)))
        return out


def byte_clip_tokenizer(max_length: int):
    """A byte-level BPE ``CLIPTokenizer`` without merges: every byte is a token, so any text
    tokenizes, and ``bos``/``eos`` have the largest ids as in CLIP (OWLv2 masks queries whose
    first id is 0)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def write_tiny(directory: str, image_size: int = 32, patch_size: int = 8, **kw: Any) -> None:
    """A randomly initialised OWLv2 (2 + 2 layers of width 32, ``image_size`` px input, one box
    per ``patch_size`` patch) with its processor in ``directory`` (about 0.3 MB). ``kw``
    overrides fields of the top-level config."""
    torch = hf.import_torch()
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    tokenizer = byte_clip_tokenizer(16)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = Owlv2Config(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=bos,
                         eos_token_id=eos, pad_token_id=eos, **layers),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **layers),
        projection_dim=32, **kw)
    os.makedirs(directory, exist_ok=True)
    Owlv2ForObjectDetection(config).save_pretrained(directory)
    image_processor = Owlv2ImageProcessor(size={"height": image_size, "width": image_size})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
