"""Segment Anything (SAM, SAM 2) as box-prompted segmenters of the ``segment`` stage.

Family ``"sam"``: ``SamModel`` + ``SamProcessor`` (``facebook/sam-vit-*``); family ``"sam2"``:
``Sam2Model`` + ``Sam2Processor`` (``facebook/sam2*-hiera-*``; a ``sam2_video`` directory holds
the same image model, whose extra memory weights ``Sam2Model`` ignores).

Every box of an image is one prompt and gives one mask. The image embedding is computed once
per image (``batch_size`` images per vision call) and all boxes of that image are decoded
together in one mask-decoder call. With ``multimask`` the decoder proposes 3 candidates per box
and the one with the highest predicted IoU is kept (what SAM's automatic mask generator does);
without it the decoder's single-mask output is used. Masks are the processor's own
``post_process_masks`` (upsampled to the original image size, logits > 0); a mask's score is
its predicted IoU clipped to [0, 1]. No text prompts: :meth:`segment_concepts` is ``sam3``'s.

Options:
  batch_size  images per vision-encoder call (default 4).
  multimask   choose the best of the multimask candidates (default True).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from umg_jax.labeling.annotate.backend import AnnotateError, Segmenter
from umg_jax.labeling.annotate.families import hf


def _check_boxes(family: str, images: list[np.ndarray], boxes: list[np.ndarray]
                 ) -> list[np.ndarray]:
    """``boxes`` as ``[K, 4] float32`` arrays, one per image, after checking the shapes."""
    if len(boxes) != len(images):
        raise AnnotateError(f"{family}: {len(images)} images but {len(boxes)} box lists")
    out = []
    for i, (img, b) in enumerate(zip(images, boxes, strict=True)):
        if np.ndim(img) != 3 or np.shape(img)[2] != 3:
            raise AnnotateError(f"{family}: image {i} has shape {np.shape(img)}, want [H, W, 3]")
        b = np.asarray(b, np.float32)
        if b.size == 0:
            b = b.reshape(0, 4)
        if b.ndim != 2 or b.shape[1] != 4:
            raise AnnotateError(f"{family}: boxes of image {i} have shape {b.shape}, want [K, 4]")
        out.append(b)
    return out


def _empty(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    return np.zeros((0, h, w), bool), np.zeros((0,), np.float32)


class _BoxPromptSegmenter(Segmenter):
    """What SAM and SAM 2 share; subclasses say how to embed an image and decode its boxes."""

    model_class: ClassVar[str]
    processor_class: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]

    def __init__(self, model: str | None, device: str = "cpu", batch_size: int = 4,
                 multimask: bool = True, **options: Any):
        super().__init__(model, device, **options)  # unknown options fail before any loading
        self.batch_size = hf.positive_int(self.family, "batch_size", batch_size)
        if not isinstance(multimask, bool):
            raise AnnotateError(f"{self.family}: multimask must be true or false, got "
                                f"{multimask!r}")
        self.multimask = multimask
        hf.import_torch()
        import transformers

        self.torch_device = hf.device(device)
        self.model, self.processor = hf.load(
            getattr(transformers, self.model_class), getattr(transformers, self.processor_class),
            model, self.torch_device, self.family, self.model_types)

    # -- per-family pieces -------------------------------------------------------------------
    def _embed(self, pixel_values):
        """Image embeddings of a ``[B, 3, S, S]`` batch, in whatever form :meth:`_decode` takes."""
        raise NotImplementedError

    def _take(self, embeddings, j: int):
        """Embeddings of the ``j``-th image of the batch, batch dimension kept (size 1)."""
        raise NotImplementedError

    def _post_process(self, masks, inputs, j: int):
        """``[K, 1, h, w]`` low-res logits of image ``j`` -> ``[K, 1, H, W]`` bool at the image's
        original size."""
        raise NotImplementedError

    # -- the stage API -----------------------------------------------------------------------
    def segment(self, images: list[np.ndarray], boxes: list[np.ndarray]
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image ``(masks [K, H, W] bool, scores [K] float32 in [0, 1])``, one mask per
        box of ``boxes[i]`` (``[K, 4]`` absolute ``x0, y0, x1, y1`` pixels of image ``i``)."""
        torch = hf.import_torch()
        boxes = _check_boxes(self.family, images, boxes)
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(images)
        todo = []
        for i, (img, b) in enumerate(zip(images, boxes, strict=True)):
            if len(b):
                todo.append(i)
            else:
                out[i] = _empty(img)  # no box: no vision call either
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start:start + self.batch_size]
            kmax = max(len(boxes[i]) for i in idx)
            # The processors normalise boxes only as a rectangular [images, boxes, 4] batch: pad
            # with a dummy box, and decode each image's own K boxes only (the pads never run).
            pad = np.array([[0.0, 0.0, 1.0, 1.0]], np.float32)
            padded = [np.concatenate([boxes[i], np.repeat(pad, kmax - len(boxes[i]), 0)]).tolist()
                      for i in idx]
            inputs = self.processor(images=[np.ascontiguousarray(images[i], np.uint8) for i in idx],
                                    input_boxes=padded, return_tensors="pt",
                                    input_data_format="channels_last")
            with torch.inference_mode():
                emb = self._embed(inputs["pixel_values"].to(self.torch_device))
                for j, i in enumerate(idx):
                    k = len(boxes[i])
                    res = self.model(image_embeddings=self._take(emb, j),
                                     input_boxes=inputs["input_boxes"][j:j + 1, :k].to(
                                         self.torch_device),
                                     multimask_output=self.multimask)
                    # iou_scores [1, K, C], pred_masks [1, K, C, h, w]; C = 3 or 1.
                    best = res.iou_scores[0].argmax(-1)  # [K]
                    ar = torch.arange(k, device=best.device)
                    low = res.pred_masks[0, ar, best][:, None]  # [K, 1, h, w]
                    masks = self._post_process(low, inputs, j)[:, 0]
                    scores = res.iou_scores[0, ar, best].clamp(0.0, 1.0)
                    out[i] = (masks.cpu().numpy().astype(bool),
                              scores.float().cpu().numpy().astype(np.float32))
        return out  # type: ignore[return-value]


class SamSegmenter(_BoxPromptSegmenter):
    """SAM (``SamModel``): box prompts -> one mask per box. Options: ``batch_size`` (4),
    ``multimask`` (True)."""

    family = "sam"
    model_class, processor_class, model_types = "SamModel", "SamProcessor", ("sam",)

    def _embed(self, pixel_values):
        return self.model.get_image_embeddings(pixel_values)  # [B, C, h, w]

    def _take(self, embeddings, j):
        return embeddings[j:j + 1]

    def _post_process(self, masks, inputs, j):
        # SAM pads the resized image to a square: the processor crops the pad, then resizes.
        return self.processor.post_process_masks(
            [masks], inputs["original_sizes"][j:j + 1], inputs["reshaped_input_sizes"][j:j + 1])[0]


class Sam2Segmenter(_BoxPromptSegmenter):
    """SAM 2 (``Sam2Model``): box prompts -> one mask per box. Options: ``batch_size`` (4),
    ``multimask`` (True; without it SAM 2's own stability fallback picks the single mask)."""

    family = "sam2"
    model_class, processor_class = "Sam2Model", "Sam2Processor"
    model_types = ("sam2", "sam2_video")

    def _embed(self, pixel_values):
        # Multi-scale: [high-res s0, s1, image embedding], each [B, C_l, h_l, w_l].
        return self.model.get_image_embeddings(pixel_values)

    def _take(self, embeddings, j):
        return [e[j:j + 1] for e in embeddings]

    def _post_process(self, masks, inputs, j):
        return self.processor.post_process_masks([masks], inputs["original_sizes"][j:j + 1])[0]


def write_tiny(directory: str, kind: str = "sam") -> None:
    """Write a tiny randomly initialised (``torch.manual_seed(0)``) SAM (``kind="sam"``) or
    SAM 2 (``kind="sam2"``) model directory: config, safetensors weights and processor files,
    64 px input, that :class:`SamSegmenter` / :class:`Sam2Segmenter` load offline."""
    torch = hf.import_torch()
    import transformers as tf

    torch.manual_seed(0)
    if kind == "sam":
        # 64 px / patch 8 -> 8x8 embedding; 2 * num_pos_feats == output_channels == hidden 32.
        config = tf.SamConfig(
            vision_config=dict(hidden_size=32, output_channels=32, num_hidden_layers=2,
                               num_attention_heads=2, image_size=64, patch_size=8, window_size=4,
                               global_attn_indexes=[1], num_pos_feats=16, mlp_dim=64),
            prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=8,
                                       mask_input_channels=8),
            mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2,
                                     num_attention_heads=2, iou_head_hidden_dim=32))
        model = tf.SamModel(config)
        processor = tf.SamProcessor(tf.SamImageProcessor(
            size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
            mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16}))
    elif kind == "sam2":
        # Hiera stages at 16, 8, 4, 2 px grids; the FPN keeps the first three (16, 8, 4) and
        # the 4x4 one is the image embedding (64 / prompt patch 16).
        backbone = tf.Sam2HieraDetConfig(
            hidden_size=8, image_size=[64, 64], blocks_per_stage=[1, 1, 2, 1],
            embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 1, 2, 2],
            window_size_per_stage=[4, 4, 2, 2], global_attention_blocks=[3],
            window_positional_embedding_background_size=[2, 2])
        config = tf.Sam2Config(
            vision_config=tf.Sam2VisionConfig(
                backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8],
                backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]], fpn_hidden_size=32),
            prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16,
                                       mask_input_channels=8),
            mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2,
                                     num_attention_heads=2, iou_head_hidden_dim=32))
        model = tf.Sam2Model(config)
        processor = tf.Sam2Processor(tf.Sam2ImageProcessor(
            size={"height": 64, "width": 64}, mask_size={"height": 16, "width": 16}))
    else:
        raise AnnotateError(f"sam: write_tiny kind must be 'sam' or 'sam2', got {kind!r}")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
