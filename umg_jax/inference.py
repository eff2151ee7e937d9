"""Inference API: ``umg_jax.load(workdir_or_checkpoint)`` -> :class:`UMGModel`.

    import umg_jax
    m = umg_jax.load("/tmp/umg_tiny")
    m.classify(image, ["circle", "star", "grass"])      # {label: probability}
    label_map = m.segment(image, ["circle", "star", "grass", "sky"])   # [H, W] int32

    s = umg_jax.load_segmenter("/tmp/umg_seg")          # a configs/seg_*.py run
    m = umg_jax.load("gs://bucket/runs/umg_tiny")      # a run on a bucket (also s3://)
    out = s.predict(image, ["circle", "star", "grass", "sky"], isthing=[1, 1, 0, 0])
    out["semantic"], out["panoptic"], out["segments"]   # [H, W], [H, W] ids, {id: (label, score)}

Images are ``uint8 [H, W, 3]`` RGB arrays (or paths); they are resized to the model's resolution
and normalised here. Boxes are absolute pixel ``[x0, y0, x1, y1]`` in the given image.
All embeddings returned are L2-normalised float32 numpy arrays.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from umg_jax.data.transforms import CLIP_MEAN, CLIP_STD
from umg_jax.models import clip
from umg_jax.ops.mask_pool import mask_pool
from umg_jax.ops.roi_align import roi_pool_embed

# CLIP's normalisation constants (OpenAI); the data pipeline uses the same.
MEAN = np.array(CLIP_MEAN, np.float32)  # CLIP's; a model config may name others (SigLIP)
STD = np.array(CLIP_STD, np.float32)
DEFAULT_TEMPLATES = ("a photo of a {}.", "a {} in the scene.", "an image of a {}.")


class InputError(ValueError):
    """Bad input to the inference API (one clear line; CLIs exit with status 2)."""


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def read_image(image) -> np.ndarray:
    """A path (local, ``gs://`` or ``s3://``) or an array -> ``uint8 [H, W, 3]``; raises
    :class:`InputError` if unreadable."""
    if isinstance(image, str | os.PathLike):
        from PIL import Image, UnidentifiedImageError

        from umg_jax import storage

        try:
            with storage.local_file(image) as local, Image.open(local) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, storage.StorageError) as e:
            raise InputError(f"cannot read image {os.fspath(image)!r}: {e}") from None
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise InputError(f"image must be [H, W, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


class UMGModel:
    """A trained model plus its preprocessing; implements the evaluators' encoder protocol."""

    def __init__(self, params, model_cfg: mlc.ConfigDict):
        from umg_jax.data import tokenizer

        self.params = params
        self.config = model_cfg
        v = model_cfg.vision
        if v.get("merge_after", -1) >= 0 and not v.get("merge_at_inference", False):
            # Token merging is a training-cost measure: inference runs every token.
            model_cfg = mlc.ConfigDict(model_cfg.to_dict())
            model_cfg.vision.merge_after = -1
        self.model = clip.build_model(model_cfg)
        self.image_size = model_cfg.vision.image_size
        self._tokenizer = tokenizer.for_model(model_cfg.text)
        # [3] float32 pixel normalisation of this model's weights (``preprocess``).
        self.pixel_mean = np.asarray(model_cfg.vision.get("pixel_mean", MEAN), np.float32)
        self.pixel_std = np.asarray(model_cfg.vision.get("pixel_std", STD), np.float32)
        self._enc_img = jax.jit(lambda p, x: self.model.apply(
            {"params": p}, x, method=clip.CLIP.encode_image))
        self._enc_txt = jax.jit(lambda p, t: self.model.apply(
            {"params": p}, t, method=clip.CLIP.encode_text))

    # ----------------------------------------------------------------- encoder protocol
    def tokenize(self, texts: list[str]) -> np.ndarray:
        """``[N, L] int32``."""
        return np.asarray(self._tokenizer(list(texts)), np.int32)

    def encode_image(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Normalised ``images [B, S, S, 3] float32`` -> ``(img [B, E], dense [B, gh, gw, E])``,
        unnormalised."""
        out = self._enc_img(self.params, jnp.asarray(images, jnp.float32))
        return np.asarray(out["img"]), np.asarray(out["dense"])

    def encode_text(self, tokens) -> np.ndarray:
        """``tokens [N, L] int32`` -> ``[N, E]`` unnormalised."""
        return np.asarray(self._enc_txt(self.params, jnp.asarray(tokens, jnp.int32)))

    # ----------------------------------------------------------------- user API
    def preprocess(self, image) -> np.ndarray:
        """``uint8 [H, W, 3]`` (or a path) -> ``float32 [S, S, 3]`` resized + normalised."""
        img = read_image(image)
        x = jax.image.resize(jnp.asarray(img, jnp.float32) / 255.0,
                             (self.image_size, self.image_size, 3), "bilinear", antialias=True)
        return (np.asarray(x) - self.pixel_mean) / self.pixel_std

    @functools.lru_cache(maxsize=64)  # noqa: B019  (labels are re-used across calls)
    def _label_embeddings(self, labels: tuple[str, ...], templates: tuple[str, ...]):
        if not labels:
            raise InputError("the label list is empty")
        if any(not lab.strip() for lab in labels):
            raise InputError(f"empty label in {list(labels)}")
        toks = self.tokenize([t.format(lab) for lab in labels for t in templates])
        emb = _normalize(self.encode_text(toks)).reshape(len(labels), len(templates), -1)
        return _normalize(emb.mean(1))

    def encode_text_labels(self, labels, templates=DEFAULT_TEMPLATES) -> np.ndarray:
        """Prompt-ensembled label embeddings ``[C, E]``."""
        return self._label_embeddings(tuple(labels), tuple(templates))

    def embed_image(self, image) -> np.ndarray:
        """Global embedding ``[E]``."""
        return _normalize(self.encode_image(self.preprocess(image)[None])[0][0])

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """``[N, E]``."""
        return _normalize(self.encode_text(self.tokenize(texts)))

    def encode_dense(self, image) -> np.ndarray:
        """Patch embeddings in the joint space ``[gh, gw, E]``."""
        return _normalize(self.encode_image(self.preprocess(image)[None])[1][0])

    def encode_boxes(self, image, boxes) -> np.ndarray:
        """RoIAlign-pooled embeddings ``[R, E]`` of absolute-pixel boxes ``[R, 4]``."""
        img = read_image(image)
        h, w = img.shape[:2]
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        bad = (boxes[:, 0] >= boxes[:, 2]) | (boxes[:, 1] >= boxes[:, 3]) | \
              (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > w) | (boxes[:, 3] > h)
        if bad.any():
            i = int(np.argmax(bad))
            raise InputError(f"box {i} {boxes[i].tolist()} is empty or outside the {w}x{h} image")
        dense = self.encode_image(self.preprocess(img)[None])[1]
        norm = boxes / np.array([w, h, w, h], np.float32)
        return _normalize(np.asarray(roi_pool_embed(jnp.asarray(dense), jnp.asarray(norm[None]),
                                                    2, 2))[0])

    def encode_masks(self, image, masks) -> np.ndarray:
        """Mask-pooled embeddings ``[M, E]`` of binary masks ``[M, H, W]`` of the image."""
        img = read_image(image)
        masks = np.asarray(masks).astype(np.float32)
        if masks.ndim == 2:
            masks = masks[None]
        if masks.shape[1:] != img.shape[:2]:
            raise InputError(f"masks are {masks.shape[1:]}, the image is {img.shape[:2]}")
        dense = self.encode_image(self.preprocess(img)[None])[1]
        g = dense.shape[1:3]
        area = np.asarray(jax.image.resize(jnp.asarray(masks), (masks.shape[0], *g), "linear",
                                           antialias=True))
        return _normalize(np.asarray(mask_pool(jnp.asarray(dense), jnp.asarray(area[None])))[0])

    def classify(self, image, labels, templates=DEFAULT_TEMPLATES) -> dict[str, float]:
        """Zero-shot probabilities over ``labels`` (softmax at the learned temperature)."""
        t = self.encode_text_labels(labels, templates)
        logits = self.logit_scale * (self.embed_image(image) @ t.T)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        return dict(zip(labels, p.tolist(), strict=True))

    def segment(self, image, labels, templates=DEFAULT_TEMPLATES) -> np.ndarray:
        """Open-vocabulary semantic segmentation: ``[H, W] int32`` indices into ``labels``."""
        img = read_image(image)
        t = self.encode_text_labels(labels, templates)
        dense = self.encode_dense(img)
        logits = np.einsum("hwe,ce->hwc", dense, t)
        up = jax.image.resize(jnp.asarray(logits), (*img.shape[:2], len(labels)), "bilinear")
        return np.asarray(jnp.argmax(up, -1), np.int32)

    @property
    def logit_scale(self) -> float:
        return float(np.exp(min(float(self.params["logit_scale"]), self.config.logit_scale_max)))


def load(workdir_or_checkpoint: str | os.PathLike, step: int | None = None) -> UMGModel:
    """Loads params + model config from a training workdir (latest or given checkpoint step) or
    from an import directory written by ``umg_jax.interop.import_torch``; a local path or a
    ``gs://`` / ``s3://`` directory. :class:`InputError` for a directory that holds no model;
    ``umg_jax.storage.StorageError`` for a bucket that cannot be read (missing, no
    credentials)."""
    from umg_jax import checkpoint, storage

    storage.check_bucket_source(workdir_or_checkpoint)
    try:
        ckpt, cfg_file = checkpoint.locate(workdir_or_checkpoint, step)
        if cfg_file is None:
            raise InputError(f"{workdir_or_checkpoint!r} has neither config.json (training "
                             "workdir) nor model_config.json (import directory)")
        model_cfg = checkpoint.read_model_config(cfg_file)
        params = checkpoint.load_params(ckpt, model_cfg, checkpoint.read_peft_config(cfg_file),
                                        nested=checkpoint.read_seg_config(cfg_file) is not None)
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(str(e)) from None
    return UMGModel(params, model_cfg)


class Segmenter:
    """The open-vocabulary segmentation head (``configs/seg_*.py``) on its frozen backbone."""

    def __init__(self, backbone: UMGModel, seg_params, config: mlc.ConfigDict,
                 train_labels: list[str] | None = None):
        from umg_jax.evaluators.segmentation import make_decode

        self.backbone, self.seg_params, self.config = backbone, seg_params, config
        self.train_labels = set(train_labels or ())
        self.decode = make_decode(config)

    def predict(self, image, labels, isthing=None, templates=DEFAULT_TEMPLATES,
                ensemble: bool | None = None) -> dict:
        """Semantic and panoptic segmentation of one image over ``labels``.

        ``isthing``: per label, True for countable things (instances kept apart), False for
        stuff (one segment per label); default all things. ``ensemble``: FC-CLIP ensemble with
        the frozen backbone (default ``config.seg.ensemble``); labels outside the head's
        training vocabulary get the unseen-class weight. Returns ``{"semantic": [H, W] int32
        label index, "panoptic": [H, W] int32 segment id (-1 none), "segments": {id: (label,
        score)}}``.
        """
        from umg_jax.evaluators import segmentation as se

        img = read_image(image)
        labels = list(labels)
        thing = np.ones(len(labels), bool) if isthing is None else np.asarray(isthing, bool)
        if thing.shape != (len(labels),):
            raise InputError(f"isthing has {thing.size} entries for {len(labels)} labels")
        text = self.backbone.encode_text_labels(labels, templates)
        dense = _normalize(self.backbone.encode_image(self.backbone.preprocess(img)[None])[1])
        seen = np.array([lab in self.train_labels for lab in labels])
        use = self.config.seg.ensemble if ensemble is None else ensemble
        mask_prob, probs = se.head_predictions(
            lambda *a: self.decode(self.seg_params, *a), self.backbone.preprocess(img)[None],
            dense, text, img.shape[:2], seen, self.config.seg,
            se.mask_logit_scale(self.backbone), ensemble=use)
        p = probs["ensemble" if use else "head"][0]
        seg, cls = se.panoptic_inference(p, mask_prob[0], thing, self.config.seg.object_threshold,
                                         self.config.seg.overlap_threshold)
        score = p[:, :-1].max(-1)
        segments = {sid: (labels[c], float(score[sid])) for sid, c in cls.items()}
        weight = se.pixel_weight(self.config.seg, use)
        logp = (se.pixel_log_probs(dense, text, se.mask_logit_scale(self.backbone),
                                   img.shape[:2])[0] if weight else None)
        return {"semantic": se.semantic_inference(p, mask_prob[0], logp, weight),
                "panoptic": seg, "segments": segments}


def load_segmenter(workdir: str | os.PathLike, step: int | None = None) -> Segmenter:
    """The segmentation head of a ``configs/seg_*.py`` training workdir (local or ``gs://`` /
    ``s3://``), on its backbone."""
    from umg_jax import checkpoint, storage

    storage.check_bucket_source(workdir)
    try:
        ckpt, cfg_file = checkpoint.locate(workdir, step)
        config = checkpoint.read_seg_config(cfg_file)
        if config is None:
            raise InputError(f"{workdir!r} is not a segmentation-head run (its config.json has "
                             "no seg.enabled=True)")
        seg_params = checkpoint.load_seg_params(ckpt, config)
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(str(e)) from None
    vocab_file = storage.path(workdir) / "seg_vocab.json"
    names = storage.read_json(vocab_file)["names"] if vocab_file.exists() else None
    return Segmenter(load(workdir, step), seg_params, config, names)
