"""Zero-shot image tagging with a dual encoder, as the ``tag`` backends ``"clip"`` (``CLIPModel`` +
``CLIPProcessor``) and ``"siglip"`` (``SiglipModel`` / ``Siglip2Model`` + their processors).

The architecture comes from the model directory's ``model_type`` (``clip``, ``siglip`` or
``siglip2``; anything else is refused), so both recipe names share this class. Every vocabulary
entry is encoded once per template; the unit-normalised embeddings are averaged over templates
and normalised again (CLIP's prompt ensembling), and the result is cached per vocabulary. Scores
follow how each model was trained:

  clip    softmax over the vocabulary of ``exp(logit_scale) * cos(image, text)``: the entries
          compete, so a score is a share of the image (a one-word vocabulary always scores 1).
  siglip  ``sigmoid(exp(logit_scale) * cos(image, text) + logit_bias)``: an independent
          probability per entry.

``captions`` are not used.

Options:
  ``templates`` (list of str with one ``{}``, default ``["a photo of a {}."]``): prompts.
  ``batch_size`` (int, default 32): images (and 8x as many texts) per forward pass.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

import numpy as np

from umg_jax.labeling.annotate.backend import AnnotateError, Tagger
from umg_jax.labeling.annotate.families import hf

MODEL_TYPES = ("clip", "siglip", "siglip2")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def _model_type(path: str | None) -> str | None:
    """``model_type`` of ``path/config.json``, or None when unreadable (the real check, with its
    error, is :func:`hf.check_model_dir`)."""
    try:
        return json.loads((pathlib.Path(path) / "config.json").read_text()).get("model_type")
    except (TypeError, OSError, ValueError, AttributeError):
        return None


def _features(out):
    """The embedding from ``get_*_features``: a tensor, or (transformers 5) the projected
    ``pooler_output`` of a model output."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


class ClipTagger(Tagger):
    """Dual-encoder tagger. ``model``: a local CLIP, SigLIP or SigLIP 2 directory."""

    family = "clip"

    def __init__(self, model: str | None, device: str = "cpu",
                 templates: list[str] | tuple[str, ...] = DEFAULT_TEMPLATES, batch_size: int = 32,
                 **options: Any):
        # name errors after the family the directory holds ("siglip" recipes use this class too)
        if _model_type(model) in ("siglip", "siglip2"):
            self.family = "siglip"
        super().__init__(model, device, **options)
        if isinstance(templates, str) or not templates or not all(
                isinstance(t, str) and t.count("{}") == 1 for t in templates):
            raise AnnotateError(f"{self.family}: templates must be a non-empty list of strings "
                                f"with one '{{}}' each, got {templates!r}")
        hf.positive_int(self.family, "batch_size", batch_size)
        self.templates, self.batch_size = list(templates), int(batch_size)
        self.torch = hf.import_torch()
        import transformers as tf

        kind = hf.check_model_dir(model, self.family, MODEL_TYPES)["model_type"]
        self.kind = kind
        classes = {"clip": (tf.CLIPModel, tf.CLIPProcessor),
                   "siglip": (tf.SiglipModel, tf.SiglipProcessor),
                   "siglip2": (tf.Siglip2Model, tf.Siglip2Processor)}
        self.dev = hf.device(device)
        self.model, self.processor = hf.load(*classes[kind], model, self.dev, self.family,
                                             MODEL_TYPES)
        # SigLIP pools the last token and was trained on texts padded to the full length
        self.text_kwargs = (dict(padding=True) if kind == "clip"
                            else dict(padding="max_length"))
        self._cache: tuple[tuple[str, ...], Any] | None = None

    def tag(self, images: list[np.ndarray], vocab: list[str],
            captions: list[list[str]] | None = None) -> np.ndarray:
        """``[N, V] float32`` in [0, 1]: softmax over ``vocab`` (clip) or independent sigmoid
        (siglip) of each image's similarity with each entry."""
        if not vocab:
            return np.zeros((len(images), 0), np.float32)
        torch = self.torch
        text = self.text_embeddings(vocab)  # [V, D]
        with torch.inference_mode():
            scale = self.model.logit_scale.exp().float()
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [np.asarray(im) for im in images[start:start + self.batch_size]]
            # channels_last: an image 3 px high or wide must not pass for channels-first
            inputs = self.processor(images=batch, return_tensors="pt",
                                    input_data_format="channels_last")
            inputs = {k: v.to(self.dev) for k, v in inputs.items()}
            with torch.inference_mode():
                img = _features(self.model.get_image_features(**inputs)).float()
                img = img / img.norm(dim=-1, keepdim=True)
                logits = scale * img @ text.T  # [B, V]
                if self.kind == "clip":
                    probs = logits.softmax(-1)
                else:
                    probs = torch.sigmoid(logits + self.model.logit_bias.float())
            out.append(probs.cpu().numpy().astype(np.float32))
        if not out:
            return np.zeros((0, len(vocab)), np.float32)
        return np.concatenate(out)

    def text_embeddings(self, vocab: list[str]):
        """``[V, D]`` unit text embeddings of ``vocab``, averaged over the templates (cached for
        the last vocabulary: the stage asks with the same one for every batch)."""
        key = tuple(vocab)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        torch = self.torch
        texts = [t.format(v) for v in vocab for t in self.templates]  # [V * T]
        feats = []
        step = 8 * self.batch_size
        for start in range(0, len(texts), step):
            inputs = self.processor(text=texts[start:start + step], return_tensors="pt",
                                    truncation=True, **self.text_kwargs)
            inputs = {k: v.to(self.dev) for k, v in inputs.items()}
            with torch.inference_mode():
                feats.append(_features(self.model.get_text_features(**inputs)).float())
        emb = torch.cat(feats).reshape(len(vocab), len(self.templates), -1)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        emb = emb.mean(1)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        self._cache = (key, emb)
        return emb


# ---------------------------------------------------------------------------------------------
# tiny random models (tests, demo, install check)

_WORDS = ["a", "photo", "of", "the", "cat", "dog", "car", "red", "tree", "person"]


def _siglip_tokenizer(max_length: int):
    """A ``SiglipTokenizer`` on a SentencePiece unigram model trained here on a few words and
    every letter (ids as in SigLIP: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2)."""
    import io
    import string

    import sentencepiece as spm
    from transformers import SiglipTokenizer

    corpus = [" ".join(_WORDS)] * 4 + list(string.ascii_lowercase + string.digits) + [
        f"a photo of a {w}." for w in _WORDS]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=64, model_type="unigram",
        character_coverage=1.0, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        minloglevel=2)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "spiece.model")
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        return SiglipTokenizer(vocab_file=path, model_max_length=max_length)


def _siglip2_tokenizer():
    """A byte-fallback BPE ``Siglip2Tokenizer`` (Gemma layout): specials, the 256 byte tokens,
    ``▁`` and the letters, no merges."""
    import string

    from transformers import Siglip2Tokenizer

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    pieces += [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + list(string.ascii_lowercase)
    return Siglip2Tokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[])


def write_tiny(directory: str, kind: str = "clip", **kw: Any) -> None:
    """A randomly initialised dual encoder of ``kind`` ``"clip"``, ``"siglip"`` or ``"siglip2"``
    with its processor in ``directory``: 2 + 2 layers of width 32, 32 px images in 8 px patches
    (SigLIP 2: at most 256 patches of 16 px), 16-token texts (SigLIP 2: 64) (under 0.5 MB). ``kw``
    overrides fields of the top-level config."""
    torch = hf.import_torch()
    import transformers as tf

    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    vision = dict(image_size=32, patch_size=8, **layers)
    if kind == "clip":
        from umg_jax.labeling.annotate.families.owlv2 import byte_clip_tokenizer

        tokenizer = byte_clip_tokenizer(16)
        eos = tokenizer.eos_token_id
        text = dict(vocab_size=len(tokenizer), max_position_embeddings=16,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=eos)
        config = tf.CLIPConfig(text_config={**text, **layers}, vision_config=vision,
                               projection_dim=32, **kw)
        model_cls = tf.CLIPModel
        processor = tf.CLIPProcessor(
            image_processor=tf.CLIPImageProcessor(size={"shortest_edge": 32},
                                                  crop_size={"height": 32, "width": 32}),
            tokenizer=tokenizer)
    elif kind == "siglip":
        tokenizer = _siglip_tokenizer(16)
        text = dict(vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=None,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        config = tf.SiglipConfig(text_config={**text, **layers}, vision_config=vision, **kw)
        model_cls = tf.SiglipModel
        processor = tf.SiglipProcessor(
            image_processor=tf.SiglipImageProcessor(size={"height": 32, "width": 32}),
            tokenizer=tokenizer)
    elif kind == "siglip2":
        tokenizer = _siglip2_tokenizer()
        text = dict(vocab_size=len(tokenizer), max_position_embeddings=64,
                    bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id)
        # Siglip2Processor's own defaults (16 px patches, at most 256) override the image
        # processor's, so the tiny model keeps them
        vision = dict(patch_size=16, num_patches=256, **layers)
        config = tf.Siglip2Config(text_config={**text, **layers}, vision_config=vision, **kw)
        model_cls = tf.Siglip2Model
        processor = tf.Siglip2Processor(
            image_processor=tf.Siglip2ImageProcessor(patch_size=16, max_num_patches=256),
            tokenizer=tokenizer)
    else:
        raise ValueError(f"kind must be 'clip', 'siglip' or 'siglip2', got {kind!r}")
    torch.manual_seed(0)
    os.makedirs(directory, exist_ok=True)
    model_cls(config).save_pretrained(directory)
    processor.save_pretrained(directory)
