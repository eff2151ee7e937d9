"""Grounding DINO (Liu et al., 2023) and MM-Grounding-DINO (Zhao et al., 2024): open-set detection
grounded in a text prompt, as the ``detect`` backend ``"grounding_dino"``
(``GroundingDinoForObjectDetection`` or ``MMGroundingDinoForObjectDetection``, chosen by the model
directory's ``model_type``, + ``GroundingDinoProcessor``; e.g. ``IDEA-Research/grounding-dino-base``
or ``openmmlab-community/mm_grounding_dino_base_all``).

An image's queries become one prompt ``"q0. q1. q2."`` (lowercased; ``.`` and ``?`` inside a
query become spaces, since the model splits phrases at those tokens). Each of the model's
``num_queries`` boxes gets a probability per prompt token; we keep the processor's box and score
(the largest token probability) and label the box with the query owning its most probable token
among those above ``text_threshold`` -- the tokens the processor's own phrase is made of. A box
whose phrase holds no query token (only ``[CLS]``/``[SEP]``/``.``, or nothing above
``text_threshold``) is dropped. Prompts longer than the model's ``max_text_len`` tokens are split
into several prompts (runs of whole queries) and the image is run once per prompt.

Images of different sizes in one forward pass are padded to the largest (with the processor's
pixel mask, as in training), which changes the backbone's features near the padding slightly:
results equal single-image runs exactly only for equal image sizes.

Options:
  ``batch_size`` (int, default 8): prompts (image, query run) per forward pass.
  ``text_threshold`` (float, default 0.25): a token belongs to a box's phrase above this.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from umg_jax.labeling.annotate.backend import AnnotateError, Detector
from umg_jax.labeling.annotate.families import hf
from umg_jax.labeling.annotate.families.owlv2 import clip_boxes, empty_detections

MODEL_TYPES = ("grounding-dino", "mm-grounding-dino")


def clean_query(query: str) -> str:
    """A query as it goes into the prompt: lowercased, ``.``/``?`` (phrase separators for the
    model) replaced by spaces, whitespace collapsed."""
    return " ".join(re.sub(r"[.?]", " ", query.lower()).split())


class GroundingDinoDetector(Detector):
    """Text-grounded detector. ``model``: a local Grounding DINO or MM-Grounding-DINO directory."""

    family = "grounding_dino"

    def __init__(self, model: str | None, device: str = "cpu", batch_size: int = 8,
                 text_threshold: float = 0.25, **options: Any):
        super().__init__(model, device, **options)
        hf.positive_int(self.family, "batch_size", batch_size)
        if not 0.0 <= float(text_threshold) <= 1.0:
            raise AnnotateError(f"{self.family}: text_threshold must be in [0, 1], got "
                                f"{text_threshold}")
        self.batch_size, self.text_threshold = int(batch_size), float(text_threshold)
        self.torch = hf.import_torch()
        from transformers import (
            GroundingDinoForObjectDetection,
            GroundingDinoProcessor,
            MMGroundingDinoForObjectDetection,
        )

        cfg = hf.check_model_dir(model, self.family, MODEL_TYPES)
        model_cls = (MMGroundingDinoForObjectDetection if cfg["model_type"] == "mm-grounding-dino"
                     else GroundingDinoForObjectDetection)
        self.dev = hf.device(device)
        self.model, self.processor = hf.load(model_cls, GroundingDinoProcessor, model, self.dev,
                                             self.family, MODEL_TYPES)
        self.max_text_len = int(min(self.model.config.max_text_len,
                                    self.processor.tokenizer.model_max_length))

    def detect(self, images: list[np.ndarray], queries: list[list[str]], threshold: float
               ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image ``(boxes [K, 4] float32 px, labels [K] int32, scores [K] float32)`` with
        ``score >= threshold``; ``K <= num_queries`` per prompt."""
        if len(images) != len(queries):
            raise AnnotateError(f"{self.family}: {len(images)} images but {len(queries)} "
                                "query lists")
        # work items: (image index, [(query index, cleaned query), ...]) fitting one prompt
        items = [(i, run) for i, q in enumerate(queries) for run in self._runs(q)]
        parts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in images]
        for start in range(0, len(items), self.batch_size):
            batch = items[start:start + self.batch_size]
            res = self._run([images[i] for i, _ in batch], [run for _, run in batch],
                            float(threshold))
            for (i, _), r in zip(batch, res, strict=True):
                parts[i].append(r)
        out = []
        for p in parts:
            if not p:
                out.append(empty_detections())
            else:
                out.append(tuple(np.concatenate(a) for a in zip(*p, strict=True)))
        return out

    def _runs(self, queries: list[str]) -> list[list[tuple[int, str]]]:
        """Queries split into runs whose prompt ``[CLS] q0 . q1 . ... [SEP]`` fits
        ``max_text_len`` tokens (a single query longer than that is truncated)."""
        kept = [(j, clean_query(q)) for j, q in enumerate(queries)]
        kept = [(j, q) for j, q in kept if q]
        if not kept:
            return []
        lengths = self.processor.tokenizer([q for _, q in kept],
                                           add_special_tokens=False)["input_ids"]
        runs: list[list[tuple[int, str]]] = [[]]
        used = 2  # [CLS] and [SEP]
        for jq, ids in zip(kept, lengths, strict=True):
            need = len(ids) + 1  # the query and its "."
            if runs[-1] and used + need > self.max_text_len:
                runs.append([])
                used = 2
            runs[-1].append(jq)
            used += need
        return runs

    def _run(self, images: list[np.ndarray], runs: list[list[tuple[int, str]]],
             threshold: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        torch = self.torch
        prompts, spans = [], []
        for run in runs:
            text, span = "", []
            for _, q in run:
                span.append((len(text), len(text) + len(q)))  # character range of the query
                text += q + ". "
            prompts.append(text.strip())
            spans.append(span)
        # each prompt holds a ".", so the processor takes the list as one prompt per image
        inputs = self.processor(images=list(images), text=prompts, return_tensors="pt",
                                padding="longest", truncation=True, max_length=self.max_text_len,
                                return_offsets_mapping=True, input_data_format="channels_last")
        offsets = inputs.pop("offset_mapping").numpy()
        inputs = {k: v.to(self.dev) for k, v in inputs.items()}
        with torch.inference_mode():
            outputs = self.model(**inputs)
        sizes = [tuple(im.shape[:2]) for im in images]
        # threshold -1: every box in model order, so rows line up with the logits below
        res = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=-1.0, text_threshold=self.text_threshold,
            target_sizes=sizes)
        probs = torch.sigmoid(outputs.logits.float()).cpu().numpy()  # [B, Q, max_text_len]
        out = []
        for b, ((h, w), r, run) in enumerate(zip(sizes, res, runs, strict=True)):
            seq = offsets.shape[1]
            owner = np.full(seq, -1, np.int64)  # position in `run` of each token's query
            for t, (s, e) in enumerate(offsets[b]):
                if e > s:  # special and padding tokens have empty offsets
                    for k, (qs, qe) in enumerate(spans[b]):
                        if qs <= s and e <= qe:
                            owner[t] = k
            p = probs[b, :, :seq]  # [Q, seq]
            # per box and query: its best token above text_threshold (-1: none)
            per_query = np.full((p.shape[0], len(run)), -1.0, np.float32)
            for k in range(len(run)):
                tok = (owner == k)
                if tok.any():
                    pk = p[:, tok].max(1)
                    per_query[:, k] = np.where(pk > self.text_threshold, pk, -1.0)
            best = per_query.argmax(1)
            scores = r["scores"].float().cpu().numpy().astype(np.float32)
            keep = (per_query.max(1) >= 0) & (scores >= threshold)
            boxes = r["boxes"].float().cpu().numpy().reshape(-1, 4)[keep]
            labels = np.array([j for j, _ in run], np.int32)[best[keep]]
            out.append((clip_boxes(boxes, h, w), labels, scores[keep]))
        return out


def _bert_tokenizer(words: list[str]):
    """A WordPiece ``BertTokenizer`` over ``words`` plus single letters/digits (so any word
    tokenizes). Grounding DINO hard-codes BERT's ids of ``[CLS]`` 101, ``[SEP]`` 102, ``.`` 1012
    and ``?`` 1029 as phrase separators, so the vocabulary keeps them (1030 entries)."""
    import string

    from transformers import BertTokenizer

    fixed = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".",
             1029: "?"}
    chars = list(string.ascii_lowercase + string.digits)
    extra = list(dict.fromkeys(words + chars + ["##" + c for c in chars] + list(",;:!'\"-()")))
    free = (i for i in range(1030) if i not in fixed)
    fixed.update({next(free): w for w in extra if w not in fixed.values()})
    vocab = {fixed.get(i, f"[unused{i}]"): i for i in range(1030)}
    return BertTokenizer(vocab=vocab, model_max_length=64)


def write_tiny(directory: str, kind: str = "grounding-dino", **kw: Any) -> None:
    """A randomly initialised Grounding DINO (``kind="grounding-dino"``) or MM-Grounding-DINO
    (``"mm-grounding-dino"``) in ``directory``: tiny ResNet backbone, 1-layer BERT of width 32,
    1 encoder + 2 decoder layers of width 32, 10 queries, 64-token texts, images resized to
    64..128 px (about 0.6 MB). ``kw`` overrides fields of the top-level config."""
    torch = hf.import_torch()
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        MMGroundingDinoConfig,
        MMGroundingDinoForObjectDetection,
    )

    classes = {"grounding-dino": (GroundingDinoConfig, GroundingDinoForObjectDetection),
               "mm-grounding-dino": (MMGroundingDinoConfig, MMGroundingDinoForObjectDetection)}
    if kind not in classes:
        raise ValueError(f"kind must be one of {sorted(classes)}, got {kind!r}")
    config_cls, model_cls = classes[kind]
    tokenizer = _bert_tokenizer(["a", "photo", "of", "cat", "dog", "car", "red", "person",
                                 "tree"])
    torch.manual_seed(0)
    fields = dict(
        backbone_config=dict(model_type="resnet", embedding_size=8, hidden_sizes=[8, 16, 16, 16],
                             depths=[1, 1, 1, 1], layer_type="basic",
                             out_features=["stage2", "stage3", "stage4"]),
        text_config=dict(model_type="bert", vocab_size=1030, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=64),
        # decoder_layers >= 2: the tied per-layer heads need a layer to tie to
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10,
        encoder_n_points=2, decoder_n_points=2, max_text_len=64,
        # 3 levels (strides 8, 16, 32) from >= 64 px inputs: every map has >= 2 x 2 cells
        # (GroupNorm of the input projections refuses a single value per group)
        num_feature_levels=3)
    fields.update(kw)
    os.makedirs(directory, exist_ok=True)
    model_cls(config_cls(**fields)).save_pretrained(directory)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(
        directory)
