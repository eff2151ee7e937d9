"""BLIP-2 (Li et al. 2023, ``Blip2ForConditionalGeneration``): a frozen ViT, a Q-Former whose
``num_query_tokens`` outputs become soft image tokens, and a frozen language model (OPT or
Flan-T5) that writes the text. Checkpoints: ``Salesforce/blip2-opt-2.7b`` and relatives.

Backends (recipe ``"backend": "blip2"``):
  caption         :class:`Blip2Captioner`, one caption per image.
  region_caption  :class:`Blip2RegionCaptioner`, one phrase per box: the caption of the box crop
                  (BLIP-2 has no box input; the crop is what the model sees).

Options (all optional):
  prompt          text the language model continues (e.g. ``"a photo of"``); default None
                  (unconditional captioning). The prompt is not part of the returned text.
  max_new_tokens  generated tokens per caption (default 30, 12 for regions).
  num_beams       beam width (default 1: greedy, deterministic).
  batch_size      images (or crops) per ``generate`` call (default 8, 32 for regions).
  dtype           ``"float32"`` (default), ``"float16"`` or ``"bfloat16"`` (GPU).
  context         regions only: grow each box by this fraction of its width/height on every side
                  before cropping (default 0.0), so the model sees some surroundings.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from umg_jax.labeling.annotate.backend import AnnotateError, Captioner, RegionCaptioner
from umg_jax.labeling.annotate.families import hf

FAMILY = "blip2"
MODEL_TYPES = ("blip-2",)
_DTYPES = ("float32", "float16", "bfloat16")


class _Blip2Generator:
    """The shared part of both backends: load, then image batches -> stripped texts."""

    def _setup(self, model: str | None, device: str, *, prompt: str | None, max_new_tokens: int,
               num_beams: int, batch_size: int, dtype: str) -> None:
        if prompt is not None and not isinstance(prompt, str):
            raise AnnotateError(f"{FAMILY}: option 'prompt' must be a string, got {prompt!r}")
        if dtype not in _DTYPES:
            raise AnnotateError(f"{FAMILY}: option 'dtype' must be one of {_DTYPES}, got {dtype!r}")
        self.prompt = prompt or None
        self.max_new_tokens = hf.positive_int(FAMILY, "max_new_tokens", max_new_tokens)
        self.num_beams = hf.positive_int(FAMILY, "num_beams", num_beams)
        self.batch_size = hf.positive_int(FAMILY, "batch_size", batch_size)
        self.torch = hf.import_torch()
        from transformers import AddedToken, Blip2ForConditionalGeneration, Blip2Processor

        self._dev = hf.device(device)
        self.model, self.processor = hf.load(Blip2ForConditionalGeneration, Blip2Processor, model,
                                             self._dev, FAMILY, MODEL_TYPES)
        self.model.to(getattr(self.torch, dtype))
        # Older checkpoints have no num_query_tokens in their processor config; then the
        # processor inserts no image tokens and a prompted generate would silently drop the
        # image. The model config always knows the count.
        if self.processor.num_query_tokens is None:
            self.processor.num_query_tokens = self.model.config.num_query_tokens
        # Blip2Processor reads ``image_token.content`` when a prompt is given, but takes
        # ``tokenizer.image_token`` as is when the tokenizer defines one (a plain str there).
        if isinstance(self.processor.image_token, str):
            self.processor.image_token = AddedToken(self.processor.image_token, normalized=False,
                                                    special=True)
        # A decoder-only language model continues the prompt: rows must end where the text ends.
        self.processor.tokenizer.padding_side = "left"
        self._decoder_only = not self.model.config.text_config.is_encoder_decoder

    def _generate(self, images: list[np.ndarray]) -> list[str]:
        """``images``: ``[H, W, 3] uint8`` each -> one stripped text each (same order)."""
        torch, out = self.torch, []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            kw: dict[str, Any] = {"images": chunk, "return_tensors": "pt",
                                  # a 3-pixel-high crop would otherwise read as channels-first
                                  "input_data_format": "channels_last"}
            if self.prompt is not None:
                kw.update(text=[self.prompt] * len(chunk), padding=True)
            inputs = self.processor(**kw).to(self._dev)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                          num_beams=self.num_beams, do_sample=False)
            if self._decoder_only:
                # The decoder-only LM returns its input (image tokens, BOS, prompt) first; without
                # a prompt, generate() builds that input itself: num_query_tokens + BOS.
                n_in = (inputs["input_ids"].shape[1] if "input_ids" in inputs
                        else self.model.config.num_query_tokens + 1)
                ids = ids[:, n_in:]
            out += [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out


class Blip2Captioner(_Blip2Generator, Captioner):
    """One BLIP-2 caption per image (options: module docstring)."""

    family = FAMILY

    def __init__(self, model: str | None, device: str = "cpu", *, prompt: str | None = None,
                 max_new_tokens: int = 30, num_beams: int = 1, batch_size: int = 8,
                 dtype: str = "float32", **options: Any):
        super().__init__(model, device, **options)  # unknown options fail before loading
        self._setup(model, device, prompt=prompt, max_new_tokens=max_new_tokens,
                    num_beams=num_beams, batch_size=batch_size, dtype=dtype)

    def caption(self, images: list[np.ndarray]) -> list[list[str]]:
        """``images``: N ``[H, W, 3] uint8`` -> N one-element lists ``[caption]``."""
        return [[t] for t in self._generate(list(images))]


def crop_box(image: np.ndarray, box: np.ndarray, context: float = 0.0) -> np.ndarray:
    """The pixels of ``box`` (``x0, y0, x1, y1`` px) grown by ``context`` x its size on each side,
    clipped to the image: ``[h, w, 3]`` with ``h, w >= 1`` (a degenerate or outside box still
    gets one pixel, so every box gets a phrase)."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    pad_x, pad_y = context * max(x1 - x0, 0.0), context * max(y1 - y0, 0.0)
    # floor/ceil: the crop covers every pixel the box touches
    cx0 = min(max(math.floor(x0 - pad_x), 0), w - 1)
    cy0 = min(max(math.floor(y0 - pad_y), 0), h - 1)
    cx1 = max(min(math.ceil(x1 + pad_x), w), cx0 + 1)
    cy1 = max(min(math.ceil(y1 + pad_y), h), cy0 + 1)
    return image[cy0:cy1, cx0:cx1]


class Blip2RegionCaptioner(_Blip2Generator, RegionCaptioner):
    """A phrase per box: the BLIP-2 caption of the box crop (options: module docstring)."""

    family = FAMILY

    def __init__(self, model: str | None, device: str = "cpu", *, prompt: str | None = None,
                 max_new_tokens: int = 12, num_beams: int = 1, batch_size: int = 32,
                 dtype: str = "float32", context: float = 0.0, **options: Any):
        super().__init__(model, device, **options)
        if isinstance(context, bool) or not isinstance(context, int | float) or not context >= 0:
            raise AnnotateError(f"{FAMILY}: option 'context' must be a number >= 0, got "
                                f"{context!r}")
        self.context = float(context)
        self._setup(model, device, prompt=prompt, max_new_tokens=max_new_tokens,
                    num_beams=num_beams, batch_size=batch_size, dtype=dtype)

    def describe(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[list[str]]:
        """``images``: N ``[H, W, 3] uint8``; ``boxes``: N ``[K_i, 4]`` px -> N lists of K_i
        phrases. The crops of all images are batched together."""
        if len(images) != len(boxes):
            raise AnnotateError(f"{FAMILY}: {len(images)} images but {len(boxes)} box arrays")
        boxes = [np.asarray(bx, np.float64).reshape(-1, 4) for bx in boxes]
        crops = [crop_box(im, b, self.context)
                 for im, bx in zip(images, boxes, strict=True) for b in bx]
        texts = self._generate(crops) if crops else []
        out, at = [], 0
        for bx in boxes:
            out.append(texts[at:at + len(bx)])
            at += len(bx)
        return out


def write_tiny(directory: str, *, image_size: int = 32, num_query_tokens: int = 4,
               seed: int = 0) -> None:
    """A randomly initialised BLIP-2 (ViT + Q-Former + OPT, width 16, one layer each, ~16k
    parameters, ~80 kB on disk) with its processor in ``directory``, loadable offline.

    The tokenizer is a ~150-token byte-level BPE (OPT's special-token layout: ``<s>`` 0,
    ``<pad>`` 1, ``</s>`` 2 = BOS = EOS, ``<unk>`` 3) plus the ``<image>`` token that
    :class:`~transformers.Blip2Processor` adds; the processor repeats it ``num_query_tokens``
    times in front of the text, as ``Blip2Config.image_token_index`` expects."""
    torch = hf.import_torch()
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        GPT2Tokenizer,
    )

    vocab, merges = hf.tiny_bpe("a photo of a cat dog car tree sky on the road. Question: what is "
                              "this? Answer:", ["<s>", "<pad>", "</s>", "<unk>"], 160)
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>",
                              unk_token="<unk>", pad_token="<pad>", add_bos_token=True)
    processor = Blip2Processor(BlipImageProcessor(size={"height": image_size, "width": image_size}),
                               tokenizer, num_query_tokens=num_query_tokens)  # adds "<image>"
    # Init scale 1 (instead of 0.02, or the vision tower's 1e-10): a 16-wide random model with
    # small weights emits the same tokens whatever the image, and tests could not tell images
    # (or a batching mix-up) apart.
    init = 1.0
    config = Blip2Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=image_size, patch_size=8,
                           initializer_range=init),
        qformer_config=dict(vocab_size=8, hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=32,
                            max_position_embeddings=32, cross_attention_frequency=1,
                            initializer_range=init),
        text_config=dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=16,
                         word_embed_proj_dim=16, num_hidden_layers=1, ffn_dim=32,
                         num_attention_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, init_std=init),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=init)
    torch.manual_seed(seed)
    Blip2ForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
