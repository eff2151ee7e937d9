"""SAM 3 as the text-prompted ("promptable concept segmentation") segmenter of the ``segment``
stage.

Family ``"sam3"``: ``Sam3Model`` + ``Sam3Processor`` (``facebook/sam3``; a ``sam3_video``
directory's detector is what ``Sam3Model`` loads from it). Given a noun phrase, SAM 3's DETR-like
detector returns every instance of that concept in the image, each with a mask and a score
(query logit times the image-level presence score). :meth:`Sam3Segmenter.segment_concepts`
runs it: the vision encoder once per image (``batch_size`` images per call), then the
text-conditioned detector and mask head for each (image, concept) pair (``batch_size`` pairs
per call), with the processor's ``post_process_instance_segmentation`` (masks resized to the
original image size, ``sigmoid > mask_threshold``).

Box prompts: ``Sam3Model`` reads boxes only as *exemplars* of a concept ("find everything like
this box"), not as one-box-one-mask instance prompts, so :meth:`Sam3Segmenter.segment` raises
:class:`AnnotateError`; use the ``sam`` or ``sam2`` backend for box-prompted masks.

Options:
  batch_size      images per vision-encoder call and (image, concept) pairs per detector call
                  (default 4).
  mask_threshold  probability above which a mask pixel is on (default 0.5).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from umg_jax.labeling.annotate.backend import AnnotateError, Segmenter
from umg_jax.labeling.annotate.families import hf


class Sam3Segmenter(Segmenter):
    """SAM 3 (``Sam3Model``): text concept -> all its instance masks. Options: ``batch_size``
    (4), ``mask_threshold`` (0.5)."""

    family = "sam3"
    model_types = ("sam3", "sam3_video")

    def __init__(self, model: str | None, device: str = "cpu", batch_size: int = 4,
                 mask_threshold: float = 0.5, **options: Any):
        super().__init__(model, device, **options)  # unknown options fail before any loading
        hf.positive_int("sam3", "batch_size", batch_size)
        if (isinstance(mask_threshold, bool) or not isinstance(mask_threshold, (int, float))
                or not 0.0 <= mask_threshold <= 1.0):
            raise AnnotateError(f"sam3: mask_threshold must be a number in [0, 1], got "
                                f"{mask_threshold!r}")
        self.batch_size, self.mask_threshold = batch_size, float(mask_threshold)
        hf.import_torch()
        import transformers

        self.torch_device = hf.device(device)
        self.model, self.processor = hf.load(transformers.Sam3Model, transformers.Sam3Processor,
                                             model, self.torch_device, self.family,
                                             self.model_types)

    def segment(self, images: list[np.ndarray], boxes: list[np.ndarray]
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Not supported: SAM 3's boxes are concept exemplars, not per-box instance prompts."""
        raise AnnotateError(
            "sam3: Sam3Model takes boxes only as exemplars of a concept (it returns every object "
            "like the box), not as one-mask-per-box prompts; use the sam or sam2 backend for "
            "box-prompted masks, and sam3 for text concepts (segment_concepts)")

    def segment_concepts(self, images: list[np.ndarray], concepts: list[list[str]],
                         threshold: float) -> list[list[tuple[int, np.ndarray, float]]]:
        """Per image a list of ``(concept index j into concepts[i], mask [H, W] bool at the
        image's size, score in [0, 1])`` for every instance SAM 3 finds with score above
        ``threshold``, grouped by concept, in the model's query order."""
        torch = hf.import_torch()
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        if len(concepts) != len(images):
            raise AnnotateError(f"sam3: {len(images)} images but {len(concepts)} concept lists")
        for i, (img, names) in enumerate(zip(images, concepts, strict=True)):
            if np.ndim(img) != 3 or np.shape(img)[2] != 3:
                raise AnnotateError(f"sam3: image {i} has shape {np.shape(img)}, want [H, W, 3]")
            # A bare string would otherwise be iterated as one concept per character.
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
                raise AnnotateError(f"sam3: concepts of image {i} must be a list of strings, got "
                                    f"{names!r}")
        out: list[list[tuple[int, np.ndarray, float]]] = [[] for _ in images]
        todo = [i for i in range(len(images)) if len(concepts[i])]  # no concept: no vision call
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start:start + self.batch_size]
            inputs = self.processor(images=[np.ascontiguousarray(images[i], np.uint8) for i in idx],
                                    return_tensors="pt", input_data_format="channels_last")
            sizes = [tuple(int(v) for v in s) for s in inputs["original_sizes"]]
            pairs = [(j, i, c) for j, i in enumerate(idx) for c in range(len(concepts[i]))]
            with torch.inference_mode():
                vision = self.model.get_vision_features(
                    inputs["pixel_values"].to(self.torch_device))
                for p0 in range(0, len(pairs), self.batch_size):
                    part = pairs[p0:p0 + self.batch_size]
                    rows = torch.tensor([j for j, _, _ in part], device=self.torch_device)
                    # Each pair reuses its image's features (gathered, not recomputed).
                    embeds = Sam3VisionEncoderOutput(
                        fpn_hidden_states=_rows(vision.fpn_hidden_states, rows),
                        fpn_position_encoding=_rows(vision.fpn_position_encoding, rows))
                    text = self.processor(text=[concepts[i][c] for _, i, c in part],
                                          return_tensors="pt")
                    res = self.model(vision_embeds=embeds,
                                     input_ids=text["input_ids"].to(self.torch_device),
                                     attention_mask=text["attention_mask"].to(self.torch_device))
                    found = self.processor.post_process_instance_segmentation(
                        res, threshold=threshold, mask_threshold=self.mask_threshold,
                        target_sizes=[sizes[j] for j, _, _ in part])
                    for (_, i, c), f in zip(part, found, strict=True):
                        masks = f["masks"].bool().cpu().numpy()
                        scores = f["scores"].float().clamp(0.0, 1.0).cpu().numpy()
                        out[i].extend((c, m, float(s))
                                      for m, s in zip(masks, scores, strict=True)
                                      if s >= threshold)
        return out


def _rows(tensors, rows) -> tuple:
    """Each ``[B, ...]`` tensor of ``tensors`` at batch rows ``rows`` (``[P]`` long): the
    ``[P, ...]`` features of P (image, concept) pairs."""
    return tuple(t[rows] for t in tensors)


def _tiny_tokenizer():
    """A CLIP BPE tokenizer over the 256 byte-level symbols and no merges (a word becomes its
    characters): 514 ids, built locally."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:  # a word's last symbol carries CLIP's end-of-word suffix
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def write_tiny(directory: str) -> None:
    """Write a tiny randomly initialised (``torch.manual_seed(0)``) SAM 3 model directory
    (config, safetensors weights, image processor and a local byte-level CLIP tokenizer; 56 px
    input) that :class:`Sam3Segmenter` loads offline."""
    torch = hf.import_torch()
    import transformers as tf

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer()
    # 56 px / patch 14 -> 4x4 ViT grid (2x2 windows, layer 1 global); FPN at 16, 8, 4 (and 2,
    # unused by the detector): the detector reads the 4x4 level, the masks come out at 16x16.
    backbone = tf.Sam3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, image_size=56, patch_size=14,
                                window_size=2, global_attn_indexes=[1], pretrain_image_size=56)
    small = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    config = tf.Sam3Config(
        vision_config=tf.Sam3VisionConfig(backbone_config=backbone, fpn_hidden_size=32,
                                          backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]]),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         projection_dim=32, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        geometry_encoder_config=dict(num_layers=1, **small),
        detr_encoder_config=dict(num_layers=1, **small),
        detr_decoder_config=dict(num_layers=1, num_queries=8, **small),
        mask_decoder_config=dict(hidden_size=32, num_attention_heads=2, num_upsampling_stages=2))
    model = tf.Sam3Model(config)
    processor = tf.Sam3Processor(
        image_processor=tf.Sam3ImageProcessor(size={"height": 56, "width": 56},
                                              mask_size={"height": 16, "width": 16}),
        tokenizer=tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
