"""Florence-2 (Xiao et al. 2023, ``Florence2ForConditionalGeneration``): a DaViT image encoder
whose tokens prefix a BART encoder-decoder; every task is a text prompt, and boxes are written
as 1000-bin location tokens ``<loc_0>`` ... ``<loc_999>``. Checkpoints in the transformers
format: ``florence-community/Florence-2-base`` / ``-large`` (``-ft`` variants).

Backends (recipe ``"backend": "florence2"``):
  caption         :class:`Florence2Captioner`, one caption per image.
  region_caption  :class:`Florence2RegionCaptioner`, one phrase per box with the whole image in
                  view: ``<REGION_TO_DESCRIPTION>`` followed by the box's four location tokens.

Options (all optional):
  task            captions: ``"<CAPTION>"`` (default), ``"<DETAILED_CAPTION>"`` or
                  ``"<MORE_DETAILED_CAPTION>"``; regions: ``"<REGION_TO_DESCRIPTION>"``
                  (default) or ``"<REGION_TO_CATEGORY>"`` (a category name).
  max_new_tokens  generated tokens per text (default 64 for captions, 20 for regions).
  num_beams       beam width (default 3, as in the Florence-2 examples; 1 = greedy).
  batch_size      images (or image-box pairs) per ``generate`` call (default 8, 16 for regions).
  dtype           ``"float32"`` (default), ``"float16"`` or ``"bfloat16"`` (GPU).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from umg_jax.labeling.annotate.backend import AnnotateError, Captioner, RegionCaptioner
from umg_jax.labeling.annotate.families import hf

FAMILY = "florence2"
MODEL_TYPES = ("florence2",)
CAPTION_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
REGION_TASKS = ("<REGION_TO_DESCRIPTION>", "<REGION_TO_CATEGORY>")
_DTYPES = ("float32", "float16", "bfloat16")
# Region answers end with the box's location tokens ("a red car<loc_52>...<loc_774>"); they are
# special tokens in the Florence-2 tokenizer, but a tokenizer that lists them as plain added
# tokens would leave them in the phrase.
_LOC = re.compile(r"<loc_\d+>")


class _Florence2Generator:
    """The shared part of both backends: load, then (image, prompt) batches -> answers."""

    def _setup(self, model: str | None, device: str, *, task: str, tasks: tuple[str, ...],
               max_new_tokens: int, num_beams: int, batch_size: int, dtype: str) -> None:
        if task not in tasks:
            raise AnnotateError(f"{FAMILY}: option 'task' must be one of {tasks}, got {task!r}")
        if dtype not in _DTYPES:
            raise AnnotateError(f"{FAMILY}: option 'dtype' must be one of {_DTYPES}, got {dtype!r}")
        self.task = task
        self.max_new_tokens = hf.positive_int(FAMILY, "max_new_tokens", max_new_tokens)
        self.num_beams = hf.positive_int(FAMILY, "num_beams", num_beams)
        self.batch_size = hf.positive_int(FAMILY, "batch_size", batch_size)
        self.torch = hf.import_torch()
        from transformers import Florence2ForConditionalGeneration, Florence2Processor

        self._dev = hf.device(device)
        self.model, self.processor = hf.load(Florence2ForConditionalGeneration, Florence2Processor,
                                             model, self._dev, FAMILY, MODEL_TYPES)
        self.model.to(getattr(self.torch, dtype))

    def _answer(self, text: str, size: tuple[int, int]) -> str:
        """The task's answer in ``text`` (decoded without special tokens) for an image of
        ``size = (width, height)``: the processor's own post-processing when its config has the
        task's parser (all caption and region-text tasks are ``pure_text``), then any location
        tokens left over removed."""
        post = getattr(self.processor, "post_processor", None)
        kind = self.processor.tasks_answer_post_processing_type.get(self.task, "pure_text")
        if post is not None and kind in post.parse_task_config:
            text = self.processor.post_process_generation(text=text, task=self.task,
                                                          image_size=size)[self.task]
        return _LOC.sub("", text).strip()

    def _generate(self, images: list[np.ndarray], prompts: list[str]) -> list[str]:
        """``images[i]`` (``[H, W, 3] uint8``) with task prompt ``prompts[i]`` -> answer i."""
        torch, out = self.torch, []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            # The prompts of one task have the same token count, but padding keeps mixed
            # lengths valid; the encoder masks the padding, so it does not change the answer.
            inputs = self.processor(images=chunk, text=prompts[start:start + self.batch_size],
                                    padding=True, return_tensors="pt",
                                    input_data_format="channels_last").to(self._dev)
            with torch.inference_mode():
                ids = self.model.generate(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    pixel_values=inputs["pixel_values"].to(self.model.dtype),
                    max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                    do_sample=False)
            texts = self.processor.batch_decode(ids, skip_special_tokens=True)
            out += [self._answer(t, (im.shape[1], im.shape[0]))
                    for t, im in zip(texts, chunk, strict=True)]
        return out


class Florence2Captioner(_Florence2Generator, Captioner):
    """One Florence-2 caption per image (options: module docstring)."""

    family = FAMILY

    def __init__(self, model: str | None, device: str = "cpu", *, task: str = "<CAPTION>",
                 max_new_tokens: int = 64, num_beams: int = 3, batch_size: int = 8,
                 dtype: str = "float32", **options: Any):
        super().__init__(model, device, **options)  # unknown options fail before loading
        self._setup(model, device, task=task, tasks=CAPTION_TASKS, max_new_tokens=max_new_tokens,
                    num_beams=num_beams, batch_size=batch_size, dtype=dtype)

    def caption(self, images: list[np.ndarray]) -> list[list[str]]:
        """``images``: N ``[H, W, 3] uint8`` -> N one-element lists ``[caption]``."""
        images = list(images)
        return [[t] for t in self._generate(images, [self.task] * len(images))]


class Florence2RegionCaptioner(_Florence2Generator, RegionCaptioner):
    """A phrase per box from Florence-2's region tasks (options: module docstring)."""

    family = FAMILY

    def __init__(self, model: str | None, device: str = "cpu", *,
                 task: str = "<REGION_TO_DESCRIPTION>", max_new_tokens: int = 20,
                 num_beams: int = 3, batch_size: int = 16, dtype: str = "float32",
                 **options: Any):
        super().__init__(model, device, **options)
        self._setup(model, device, task=task, tasks=REGION_TASKS, max_new_tokens=max_new_tokens,
                    num_beams=num_beams, batch_size=batch_size, dtype=dtype)

    def region_prompt(self, box: np.ndarray, width: int, height: int) -> str:
        """``task + "<loc_x0><loc_y0><loc_x1><loc_y1>"`` for ``box`` (px) in a ``width`` x
        ``height`` image, quantised by the processor's own rule (the paper's): bin
        ``floor(x / (width / 1000))`` clipped to 0..999, likewise for y."""
        torch = self.torch
        loc = torch.as_tensor(np.asarray(box, np.float64).reshape(1, 4))
        bins = self.processor.post_processor.quantize(loc, size=(width, height))[0].tolist()
        return self.task + "".join(f"<loc_{b}>" for b in bins)

    def describe(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[list[str]]:
        """``images``: N ``[H, W, 3] uint8``; ``boxes``: N ``[K_i, 4]`` px -> N lists of K_i
        phrases. Each (image, box) pair is one generation; pairs of all images are batched."""
        if len(images) != len(boxes):
            raise AnnotateError(f"{FAMILY}: {len(images)} images but {len(boxes)} box arrays")
        pair_images, prompts, counts = [], [], []
        for im, bx in zip(images, boxes, strict=True):
            bx = np.asarray(bx).reshape(-1, 4)
            counts.append(len(bx))
            for b in bx:
                pair_images.append(im)
                prompts.append(self.region_prompt(b, im.shape[1], im.shape[0]))
        texts = self._generate(pair_images, prompts) if prompts else []
        out, at = [], 0
        for k in counts:
            out.append(texts[at:at + k])
            at += k
        return out


# Florence-2's added tokens, in its tokenizer's order (after BART's vocabulary): task markers,
# the 1000 location bins, then more markers; "<image>" is the placeholder the processor repeats
# for the image features.
_EXTRA_TOKENS = (["<od>", "</od>", "<ocr>", "</ocr>"] + [f"<loc_{i}>" for i in range(1000)]
                 + ["<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>",
                    "</grounding>", "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>",
                    "<region_to_desciption>", "</region_to_desciption>", "<proposal>",
                    "</proposal>", "<poly>", "</poly>", "<and>"])
# The processor's answer parsers (the checkpoints' processor_config.json lists these keys).
_POST_PROCESSOR_CONFIG = {k: {} for k in (
    "pure_text", "ocr", "phrase_grounding", "description_with_bboxes", "description_with_polygons",
    "polygons", "bboxes", "description_with_bboxes_or_polygons")}


def write_tiny(directory: str, *, image_size: int = 64, seed: int = 0) -> None:
    """A randomly initialised Florence-2 (3-stage DaViT of width 8-16, one-layer BART of width
    16, ~50k parameters, ~0.25 MB of weights) with its processor in ``directory``, loadable
    offline. ``image_size`` (a multiple of 16) is the square input; the DaViT downsamples by 16,
    so the encoder sees ``(image_size / 16)**2 + 1`` image tokens (the +1: the pooled token).

    The tokenizer is a small byte-level BPE in BART's layout (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2,
    ``<unk>`` 3, ``<mask>`` 4) plus Florence-2's special tokens (``<loc_0>`` ... ``<loc_999>``,
    task markers, ``<image>``), so region prompts tokenize as in the real checkpoints."""
    torch = hf.import_torch()
    from transformers import (
        BartTokenizer,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    if image_size % 16:
        raise ValueError(f"image_size must be a multiple of 16, got {image_size}")
    words = ("What does the image describe? Describe in detail what is shown in the image. "
             "Describe with a paragraph. What does the region describe? What is the region? "
             "Locate the objects with category name in the image. a cat dog car tree sky road")
    vocab, merges = hf.tiny_bpe(words, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], 200)
    tokenizer = BartTokenizer(vocab=vocab, merges=merges, image_token="<image>")
    tokenizer.add_special_tokens({"extra_special_tokens": _EXTRA_TOKENS})
    num_image_tokens = (image_size // 16) ** 2 + 1
    image_processor = CLIPImageProcessor(size={"height": image_size, "width": image_size},
                                         do_center_crop=False, image_seq_length=num_image_tokens)
    processor = Florence2Processor(image_processor, tokenizer,
                                   post_processor_config=_POST_PROCESSOR_CONFIG)
    # Init scale 1 (instead of 0.02): a 16-wide random model with small weights emits the same
    # tokens whatever the image, and tests could not tell images (or a batching mix-up) apart.
    init = 1.0
    config = Florence2Config(
        text_config=dict(model_type="bart", vocab_size=len(tokenizer), d_model=16,
                         encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                         max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         decoder_start_token_id=tokenizer.eos_token_id, init_std=init),
        vision_config=dict(depths=[1, 1, 1], patch_size=[7, 3, 3], patch_stride=[4, 2, 2],
                           patch_padding=[3, 1, 1], patch_prenorm=[False, True, True],
                           embed_dim=[8, 16, 16], num_heads=[1, 1, 1], num_groups=[1, 1, 1],
                           window_size=4, projection_dim=16,
                           max_position_embeddings=max(16, image_size // 16),
                           drop_path_rate=0.0, initializer_range=init),
        image_token_id=tokenizer.image_token_id, initializer_range=init)
    torch.manual_seed(seed)
    Florence2ForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
