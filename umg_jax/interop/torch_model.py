"""UMG-CLIP inference in PyTorch from an ``export_torch --format hf`` directory, without JAX.

This file imports only torch, torchvision, safetensors, transformers, numpy, PIL and the standard
library, so it can be copied into a serving codebase as it is.

    from torch_model import UMGTorch
    m = UMGTorch.from_export("/tmp/umg_hf")  # config.json, model.safetensors,
                                             # umg_extras.safetensors, umg_config.json
    # each equals the umg_jax.load(...) method in brackets:
    m.encode_image("cat.jpg")                        # [E]          (embed_image)
    m.dense("cat.jpg")                               # [gh, gw, E]  (encode_dense)
    m.encode_boxes("cat.jpg", [[10, 20, 200, 180]])  # [R, E]       (encode_boxes)
    m.encode_masks("cat.jpg", masks)                 # [M, E]       (encode_masks)
    m.segment("cat.jpg", ["cat", "grass", "sky"])    # [H, W] int32 (segment)
    m.logit_scales["region"]                         # exp of the clamped learned log scale

A segmentation-head run's export adds the mask decoder: ``torch_seg.UMGTorchSegmenter`` (the file
beside this one) runs it on this backbone.

Inputs. ``images`` is either one image -- a path, a ``PIL.Image`` or a ``uint8 [H, W, 3]`` RGB
numpy array -- preprocessed exactly as ``umg_jax.inference.UMGModel.preprocess`` does (RGB / 255,
stretched to ``image_size`` by an antialiased bilinear resize, no crop, then ``(x - mean) / std``),
with boxes in absolute pixels ``(x0, y0, x1, y1)`` and masks ``[M, H, W]`` of that image, and
outputs without a batch axis; or a ``torch.Tensor`` of pixel values ``[B, 3, S, S]`` float32,
already preprocessed (``[3, S, S]`` is a batch of one), with boxes / masks in pixels of the
``S x S`` input and outputs with the batch axis. All embeddings are float32; ``normalize=True``
(the default, as in umg_jax's API) L2-normalises them.

What ``umg_config.json`` fixes (written by ``umg_jax.interop.export_torch``): the dense
construction (``dense_mode``: ``"maskclip"`` -- the last block's patch tokens take the value path
``out_proj(v_proj(ln_1(x)))`` instead of attention, the class token attends as usual -- or
``"plain"``), the per-granularity temperatures, the image size and normalisation, the tokenizer
and context length, the box / mask pooling, the prompt templates, and the bottleneck adapters
of a PEFT adapter run (``adapters``: their widths; the weights in ``umg_adapters.safetensors``,
added after every block of both towers as umg_jax does, which is why the towers' forward passes
are written out here). A plain HF CLIP directory (no ``umg_config.json``) loads with a warning
and these defaults: MaskCLIP dense map, OpenAI normalisation (or the directory's
``preprocessor_config.json``), one shared temperature, no adapters.
"""

from __future__ import annotations

import html
import json
import math
import os
import pathlib
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

GRANULARITIES = ("image", "tags", "region", "mask", "pixel")
CONFIG_FILE = "umg_config.json"
EXTRAS_FILE = "umg_extras.safetensors"
ADAPTERS_FILE = "umg_adapters.safetensors"
CONFIG_VERSION = 1
DEFAULT_TEMPLATES = ("a photo of a {}.", "a {} in the scene.", "an image of a {}.")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SOT_ID, EOT_ID = 49406, 49407
# HF CLIPModel prefixes of the two towers' encoder layers (adapter keys extend them).
TOWER_LAYERS = {"vision": "vision_model.encoder.layers", "text": "text_model.encoder.layers"}
# What the HF CLIPModel layout can hold; anything else in umg_config.json is refused.
CLIP_SWITCHES = {
    "vision": {"class_token": True, "ln_pre": True, "patch_bias": False, "pool": "cls",
               "proj": "plain"},
    "text": {"causal": True, "pool": "eot", "proj_bias": False},
}

ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


# ------------------------------------------------------------------------------ config
def default_config(hf: dict, directory: pathlib.Path) -> dict:
    """The ``umg_config.json`` a plain HF CLIP directory implies: MaskCLIP dense map, no own
    temperatures, OpenAI normalisation unless ``preprocessor_config.json`` names another."""
    v, t = hf["vision_config"], hf["text_config"]
    mean, std = OPENAI_MEAN, OPENAI_STD
    pre = directory / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        mean, std = p.get("image_mean", mean), p.get("image_std", std)
    tok = {"kind": "clip_bpe", "context_length": t.get("max_position_embeddings", 77),
           "pad_id": 0, "pool": "eot", "sot_id": SOT_ID, "eot_id": EOT_ID,
           "vocab": "vocab.json", "merges": "merges.txt"}
    return {
        "format": "umg-jax-export", "version": CONFIG_VERSION, "architecture": "hf_clip",
        "dense_mode": "maskclip", "embed_dim": hf.get("projection_dim", 512),
        "image_size": v.get("image_size", 224), "patch_size": v.get("patch_size", 32),
        "vision": dict(CLIP_SWITCHES["vision"]), "text": dict(CLIP_SWITCHES["text"]),
        "token_merge_at_inference": False,
        "preprocess": {"resize": "bilinear_antialias", "crop": None, "rescale": 1 / 255,
                       "mean": list(mean), "std": list(std)},
        "tokenizer": tok, "context_length": tok["context_length"],
        "logit_scale_max": math.log(100.0), "granularity_scales": False,
        "log_logit_scales": None, "logit_biases": None, "extras": None, "adapters": None,
        "boxes": {"format": "xyxy_pixels", "output_size": 2, "sampling_ratio": 2,
                  "aligned": True},
        "masks": {"resize": "bilinear_antialias", "eps": 1e-6},
        "segment": {"templates": list(DEFAULT_TEMPLATES), "upsample": "bilinear"},
    }


def check_config(cfg: dict, hf: dict) -> None:
    """Refuses what this reader cannot run exactly (a clear ValueError, never a wrong answer)."""
    if hf.get("model_type") != "clip":
        raise ValueError(f"UMGTorch runs a transformers CLIPModel export; config.json has "
                         f"model_type={hf.get('model_type')!r} (a SigLIP export needs "
                         "umg_jax itself)")
    if cfg.get("version", 0) > CONFIG_VERSION:
        raise ValueError(f"{CONFIG_FILE} version {cfg['version']} is newer than this reader "
                         f"({CONFIG_VERSION})")
    if cfg.get("architecture") != "hf_clip":
        raise ValueError(f"{CONFIG_FILE} describes a {cfg.get('architecture')!r} export; "
                         "UMGTorch reads --format hf exports")
    for tower, want in CLIP_SWITCHES.items():
        odd = {k: cfg[tower].get(k) for k, w in want.items() if cfg[tower].get(k) != w}
        if odd:
            raise ValueError(f"{tower} tower switches {odd} have no place in a CLIPModel")
    if cfg["dense_mode"] not in ("maskclip", "plain"):
        raise ValueError(f"unknown dense_mode {cfg['dense_mode']!r}")
    if cfg.get("token_merge_at_inference"):
        raise ValueError("this model merges tokens at inference (vision.merge_at_inference); "
                         "UMGTorch runs every token and would not match umg_jax")
    if cfg["preprocess"].get("resize") != "bilinear_antialias" or cfg["preprocess"].get("crop"):
        raise ValueError(f"unknown preprocessing {cfg['preprocess']}")
    ad = cfg.get("adapters")
    if ad is not None and (ad.get("act") != "gelu_tanh" or not set(ad.get("dims", {}))
                           <= set(TOWER_LAYERS)):
        raise ValueError(f"unknown adapter description {ad} in {CONFIG_FILE}")
    v, t = hf["vision_config"], hf["text_config"]
    got = (v.get("image_size"), v.get("patch_size"), hf.get("projection_dim"),
           t.get("max_position_embeddings"))
    want = (cfg["image_size"], cfg["patch_size"], cfg["embed_dim"], cfg["context_length"])
    if got != want:
        raise ValueError(f"config.json (image_size, patch_size, projection_dim, text context) "
                         f"{got} does not match {CONFIG_FILE} {want}: the files come from "
                         "different exports")


def read_safetensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """A safetensors file as torch tensors; ``ValueError`` naming a damaged file."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"cannot read {path}: {e}") from None


def read_extras(path: pathlib.Path, cfg: dict) -> dict[str, float]:
    """``{name: value}`` of ``umg_extras.safetensors``, checked against the values
    ``umg_config.json`` lists (a file from another export is refused)."""
    from safetensors.numpy import load_file

    listed = cfg.get("extras")
    if not path.is_file():
        if listed:
            raise ValueError(f"{CONFIG_FILE} lists UMG extras {sorted(listed)} but {path} is "
                             "missing")
        return {}
    try:
        raw = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"cannot read {path}: {e}") from None
    bad = [k for k, x in raw.items() if x.size != 1 or not k.startswith("logit_")]
    if bad:
        raise ValueError(f"{path} is not a UMG extras file (unexpected entries {bad})")
    extras = {k: float(np.asarray(x, np.float32).reshape(())) for k, x in raw.items()}
    if listed is not None:
        if set(extras) != set(listed) or any(
                np.float32(extras[k]) != np.float32(listed[k]) for k in listed):
            raise ValueError(f"{path} does not match {CONFIG_FILE}: it holds {extras}, the "
                             f"config lists {listed} (extras from another export?)")
    return extras


class Adapter(torch.nn.Module):
    """umg_jax's bottleneck adapter (``umg_jax.models.layers.Adapter``): ``x + up(gelu_tanh(
    down(x)))`` after a block, ``x [..., D]`` float32 (the residual add is the caller's)."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = torch.nn.Linear(width, bottleneck)
        self.up = torch.nn.Linear(bottleneck, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Flax's nn.gelu is the tanh approximation
        return self.up(F.gelu(self.down(x), approximate="tanh"))


def read_adapters(path: pathlib.Path, cfg: dict, hf: dict) -> dict[str, list[Adapter]]:
    """``{"vision" | "text": [Adapter per layer]}`` from ``umg_adapters.safetensors`` (keys
    ``<tower layers>.<i>.adapter.{down,up}.{weight,bias}``, torch ``Linear`` layout), checked
    against the widths ``umg_config.json`` lists and the towers of ``config.json``; ``{}`` for a
    model without adapters (an adapters file the config does not list is refused)."""
    listed = cfg.get("adapters")
    if not listed:
        if path.is_file():
            raise ValueError(f"{path} holds adapters but {CONFIG_FILE} lists none (files from "
                             "different exports?)")
        return {}
    if not path.is_file():
        raise ValueError(f"{CONFIG_FILE} lists adapters {listed['dims']} but {path} is missing")
    sd = read_safetensors(path)
    out, used = {}, set()
    for tower, dim in listed["dims"].items():
        tc = hf[f"{tower}_config"]
        width, n = int(tc["hidden_size"]), int(tc["num_hidden_layers"])
        out[tower] = []
        for i in range(n):
            a = Adapter(width, int(dim))
            want = {f"{TOWER_LAYERS[tower]}.{i}.adapter.{k}": v
                    for k, v in a.state_dict().items()}
            for key, ref in want.items():
                if key not in sd or tuple(sd[key].shape) != tuple(ref.shape):
                    got = tuple(sd[key].shape) if key in sd else "missing"
                    raise ValueError(f"{path} does not match {CONFIG_FILE} and config.json: "
                                     f"{key} is {got}, expected {tuple(ref.shape)}")
            a.load_state_dict({k.rsplit(".adapter.", 1)[1]: sd[k].float() for k in want})
            used |= set(want)
            out[tower].append(a.eval())
    extra = sorted(set(sd) - used)
    if extra:
        raise ValueError(f"{path} has entries no listed adapter uses (e.g. {extra[0]}): it "
                         f"does not match {CONFIG_FILE}")
    return out


def temperatures(cfg: dict, logit_scale: float, extras: dict[str, float]
                 ) -> tuple[dict[str, float], dict[str, float] | None]:
    """``({g: clamped log scale}, {g: bias} | None)`` from CLIP's ``logit_scale`` and the extras,
    as ``umg_jax.models.clip.CLIP.temperatures`` computes them."""
    cap = cfg["logit_scale_max"]
    scales = {g: min(extras.get(f"logit_scale_{g}", logit_scale), cap) for g in GRANULARITIES}
    biases = None
    if "logit_bias" in extras:
        biases = {g: extras.get(f"logit_bias_{g}", extras["logit_bias"]) for g in GRANULARITIES}
    want = cfg.get("log_logit_scales")
    if want is not None and any(not math.isclose(scales[g], want[g], rel_tol=1e-6,
                                                 abs_tol=1e-6) for g in GRANULARITIES):
        raise ValueError(f"the temperatures of the weights {scales} do not match {CONFIG_FILE} "
                         f"{want}: the files come from different exports")
    return scales, biases


# ------------------------------------------------------------------------------ resizing
def resize_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """``[out_size, in_size]`` float32 weights of ``jax.image.resize(..., "linear",
    antialias=True)`` along one axis: a triangle kernel widened by the down-scale factor,
    normalised per output sample, zero for samples outside the input."""
    if in_size == out_size:  # jax.image.resize skips axes whose size does not change
        return torch.eye(in_size)
    inv = 1.0 / (out_size / in_size)
    sample = (torch.arange(out_size, dtype=torch.float32) + 0.5) * inv - 0.5
    x = (sample[None, :] - torch.arange(in_size, dtype=torch.float32)[:, None]).abs()
    w = torch.clamp(1.0 - x / max(inv, 1.0), min=0.0)  # [in, out]
    total = w.sum(0, keepdim=True)
    eps = 1000.0 * float(np.finfo(np.float32).eps)
    w = torch.where(total.abs() > eps, w / torch.where(total != 0, total, 1.0), 0.0)
    inside = (sample >= -0.5) & (sample <= in_size - 0.5)
    return torch.where(inside[None, :], w, 0.0).T.contiguous()


def resize2d(x: torch.Tensor, size: tuple[int, int], axes: tuple[int, int]) -> torch.Tensor:
    """``x`` resized along ``axes`` (rows, columns) to ``size`` as ``jax.image.resize`` with
    ``"linear"``, ``antialias=True``; float32."""
    for axis, n in zip(axes, size, strict=True):
        w = resize_matrix(x.shape[axis], n).to(x.device)
        x = torch.movedim(torch.tensordot(torch.movedim(x, axis, -1), w, dims=([-1], [1])),
                          -1, axis)
    return x


# ------------------------------------------------------------------------------ images
def read_image(image) -> np.ndarray:
    """A path, a PIL image or an array -> ``uint8 [H, W, 3]`` RGB (as umg_jax's
    ``read_image``)."""
    if isinstance(image, str | os.PathLike):
        try:
            with Image.open(image) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as e:
            raise ValueError(f"cannot read image {os.fspath(image)!r}: {e}") from None
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / torch.clamp(torch.linalg.vector_norm(x, dim=-1, keepdim=True), min=1e-8)


def _attention(attn: torch.nn.Module, xq: torch.Tensor, xkv: torch.Tensor,
               heads: int, causal: bool = False) -> torch.Tensor:
    """HF ``CLIPAttention``'s maths from its four projections: ``xq [B, Nq, D]``,
    ``xkv [B, Nk, D]`` -> ``[B, Nq, D]``; ``causal``: query ``i`` sees keys ``0..i``. Written out
    so that a query subset (the class token) can attend and adapters can follow each block,
    which transformers' own forward (its signature differs across versions) cannot."""
    b, nq, d = xq.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)

    o = F.scaled_dot_product_attention(split(attn.q_proj(xq)), split(attn.k_proj(xkv)),
                                       split(attn.v_proj(xkv)), is_causal=causal)
    return attn.out_proj(o.transpose(1, 2).reshape(b, nq, d))


# ------------------------------------------------------------------------------ the model
class UMGTorch:
    """An exported UMG-CLIP: HF ``CLIPModel`` + temperatures + umg_jax's inference maths."""

    def __init__(self, model: torch.nn.Module, config: dict, extras: dict[str, float],
                 tokenizer: tuple = (None, "no tokenizer given"),
                 adapters: dict[str, list[Adapter]] | None = None):
        self.model = model.eval()
        dev = next(model.parameters()).device
        # {"vision" | "text": [Adapter after block i]}: umg_jax's PEFT adapters, if any
        self.adapters = {t: [a.to(dev) for a in layers] for t, layers in (adapters or {}).items()}
        self.config = config
        hf = model.config
        self.image_size = int(config["image_size"])
        self.grid = self.image_size // int(config["patch_size"])
        self.dense_mode = config["dense_mode"]
        self.context_length = int(config["context_length"])
        self.templates = tuple(config["segment"]["templates"])
        self._heads = int(hf.vision_config.num_attention_heads)
        self._text_heads = int(hf.text_config.num_attention_heads)
        self._mean = torch.tensor(config["preprocess"]["mean"], dtype=torch.float32)
        self._std = torch.tensor(config["preprocess"]["std"], dtype=torch.float32)
        self._tokenizer, self._no_tokenizer = tokenizer
        log_scales, self.logit_biases = temperatures(
            config, float(model.logit_scale.detach().reshape(())), extras)
        self.log_logit_scales = log_scales
        # {granularity: exp(clamped log scale)}, the multiplier of cosine logits.
        self.logit_scales = {g: math.exp(s) for g, s in log_scales.items()}
        self._label_cache: dict[tuple, torch.Tensor] = {}

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_export(cls, directory: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> UMGTorch:
        """Loads ``directory`` (``export_torch --format hf`` output, or any HF CLIP directory,
        which loads with a warning and the default construction)."""
        from transformers import CLIPModel

        d = pathlib.Path(directory)
        if (d / "open_clip_config.json").is_file():
            raise ValueError(f"{d} is an open_clip export; UMGTorch reads --format hf exports")
        if not (d / "config.json").is_file():
            raise ValueError(f"{d} has no config.json (not a Hugging Face model directory)")
        hf = json.loads((d / "config.json").read_text())
        if (d / CONFIG_FILE).is_file():
            cfg = json.loads((d / CONFIG_FILE).read_text())
        else:
            warnings.warn(f"{d} has no {CONFIG_FILE}: loading it as a plain CLIP; dense outputs "
                          "use the default MaskCLIP construction, images umg_jax's "
                          "preprocessing, and every granularity CLIP's logit_scale",
                          stacklevel=2)
            cfg = default_config(hf, d)
        check_config(cfg, hf)
        if cfg.get("dtype", "float32") != "float32":
            warnings.warn(f"umg_jax runs this model in {cfg['dtype']}; UMGTorch computes in "
                          "float32, so outputs differ from umg_jax's by that rounding",
                          stacklevel=2)
        extras = read_extras(d / EXTRAS_FILE, cfg)
        adapters = read_adapters(d / ADAPTERS_FILE, cfg, hf)
        model, info = CLIPModel.from_pretrained(d, output_loading_info=True)
        if info.get("missing_keys") or info.get("mismatched_keys"):
            raise ValueError(f"{d} is not a complete CLIPModel: {info}")
        model = model.to(device=device, dtype=torch.float32)
        return cls(model, cfg, extras, _load_tokenizer(d, cfg["tokenizer"]), adapters)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----------------------------------------------------------------- preprocessing
    def preprocess(self, image) -> torch.Tensor:
        """One image (path, PIL, ``uint8 [H, W, 3]``) -> ``[3, S, S]`` float32 pixel values."""
        x = torch.from_numpy(read_image(image).astype(np.float32)) / 255.0
        x = resize2d(x, (self.image_size, self.image_size), (0, 1))
        return ((x - self._mean) / self._std).permute(2, 0, 1).contiguous()

    def pixel_values(self, images: ImageInput) -> tuple[torch.Tensor, bool, tuple[int, int]]:
        """``(pixel_values [B, 3, S, S], single image?, (H, W) of the pixel grid boxes and masks
        refer to)``."""
        if isinstance(images, torch.Tensor):
            pv = images[None] if images.ndim == 3 else images
            s = self.image_size
            if pv.ndim != 4 or tuple(pv.shape[1:]) != (3, s, s):
                raise ValueError(f"pixel_values must be [B, 3, {s}, {s}], got "
                                 f"{tuple(images.shape)}")
            return pv.to(self.device, torch.float32), False, (s, s)
        img = read_image(images)
        return self.preprocess(img)[None].to(self.device), True, img.shape[:2]

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """``[N, L] int64`` rows as umg_jax's tokenizer writes them: SOT, the text's ids cut to
        ``L - 2``, EOT, then ``pad_id``."""
        if self._tokenizer is None:
            raise ValueError(f"cannot tokenize text: {self._no_tokenizer}; pass token ids")
        if isinstance(texts, str):
            texts = [texts]
        pad = int(self.config["tokenizer"].get("pad_id", 0))
        out = torch.full((len(texts), self.context_length), pad, dtype=torch.long)
        for row, text in enumerate(texts):
            # open_clip's cleaning (HTML-unescape twice, collapse whitespace, lower-case); the
            # HF tokenizer then applies its own normalisation, the same on ordinary text.
            clean = " ".join(html.unescape(html.unescape(text)).split()).lower()
            ids = self._tokenizer(clean, add_special_tokens=False)["input_ids"]
            ids = [SOT_ID, *ids][:self.context_length - 1] + [EOT_ID]
            out[row, :len(ids)] = torch.tensor(ids)
        return out

    # ----------------------------------------------------------------- towers
    @torch.no_grad()
    def vision_features(self, pv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_values [B, 3, S, S]`` -> ``(img [B, E], dense [B, g, g, E])`` unnormalised,
        as umg_jax's ``VisionTransformer``."""
        vm, heads = self.model.vision_model, self._heads
        x = vm.pre_layrnorm(vm.embeddings(pv))
        layers = vm.encoder.layers
        for i, layer in enumerate(layers[:-1]):
            h = layer.layer_norm1(x)
            x = x + _attention(layer.self_attn, h, h, heads)
            x = self._adapt("vision", i, x + layer.mlp(layer.layer_norm2(x)))
        last = layers[-1]
        h = last.layer_norm1(x)
        cls = x[:, :1] + _attention(last.self_attn, h[:, :1], h, heads)
        if self.dense_mode == "maskclip":  # MaskCLIP: the value path keeps patches local
            patches = x[:, 1:] + last.self_attn.out_proj(last.self_attn.v_proj(h[:, 1:]))
        else:
            patches = x[:, 1:] + _attention(last.self_attn, h[:, 1:], h, heads)
        x = torch.cat([cls, patches], dim=1)
        x = self._adapt("vision", len(layers) - 1, x + last.mlp(last.layer_norm2(x)))
        x = self.model.visual_projection(vm.post_layernorm(x))
        return x[:, 0], x[:, 1:].reshape(x.shape[0], self.grid, self.grid, -1)

    def _adapt(self, tower: str, i: int, x: torch.Tensor) -> torch.Tensor:
        """``x`` after block ``i`` of ``tower``, plus its adapter's output if it has one."""
        layers = self.adapters.get(tower)
        return x + layers[i](x) if layers else x

    @torch.no_grad()
    def _text(self, ids: torch.Tensor) -> torch.Tensor:
        """``[N, L]`` ids -> ``[N, E]`` unnormalised; pooled at the largest id (EOT), as
        umg_jax (HF pools at the first ``eos_token_id``, the same on well-formed rows)."""
        if ids.ndim != 2 or ids.shape[1] > self.context_length:
            raise ValueError(f"token ids must be [N, L<={self.context_length}], got "
                             f"{tuple(ids.shape)}")
        ids = ids.to(self.device, torch.long)
        tm = self.model.text_model
        x = tm.embeddings(input_ids=ids)
        for i, layer in enumerate(tm.encoder.layers):  # HF's CLIPTextTransformer, + adapters
            h = layer.layer_norm1(x)
            x = x + _attention(layer.self_attn, h, h, self._text_heads, causal=True)
            x = self._adapt("text", i, x + layer.mlp(layer.layer_norm2(x)))
        h = tm.final_layer_norm(x)
        pooled = h[torch.arange(ids.shape[0], device=ids.device), ids.argmax(-1)]
        return self.model.text_projection(pooled)

    # ----------------------------------------------------------------- embeddings
    def encode_image(self, images: ImageInput, normalize: bool = True) -> torch.Tensor:
        """Global embeddings ``[B, E]`` (``[E]`` for one image) float32."""
        pv, single, _ = self.pixel_values(images)
        img = self.vision_features(pv)[0]
        img = _normalize(img) if normalize else img
        return img[0] if single else img

    def encode_text(self, texts: str | Sequence[str] | torch.Tensor | np.ndarray,
                    normalize: bool = True) -> torch.Tensor:
        """Text embeddings ``[N, E]`` float32 of strings or token ids ``[N, L]`` int."""
        if isinstance(texts, torch.Tensor | np.ndarray):
            ids = torch.as_tensor(np.asarray(texts) if isinstance(texts, np.ndarray) else texts)
        else:
            ids = self.tokenize(texts)
        out = self._text(ids)
        return _normalize(out) if normalize else out

    def dense(self, images: ImageInput, normalize: bool = True) -> torch.Tensor:
        """Patch embeddings in the joint space ``[B, g, g, E]`` (``[g, g, E]`` for one image),
        float32, built as ``dense_mode`` says."""
        pv, single, _ = self.pixel_values(images)
        d = self.vision_features(pv)[1]
        d = _normalize(d) if normalize else d
        return d[0] if single else d

    def encode_boxes(self, images: ImageInput, boxes) -> torch.Tensor:
        """RoIAlign-pooled embeddings ``[B, R, E]`` (``[R, E]`` for one image), L2-normalised.

        ``boxes``: absolute pixels ``(x0, y0, x1, y1)``, ``[R, 4]`` (or ``[B, R, 4]`` with pixel
        values). torchvision ``roi_align(aligned=True)`` on the dense map with the box scaled to
        grid units, ``output_size x output_size`` bins of ``sampling_ratio^2`` samples, averaged:
        umg_jax's ``roi_pool_embed``."""
        from torchvision.ops import roi_align

        pv, single, (h, w) = self.pixel_values(images)
        b = pv.shape[0]
        bx = torch.as_tensor(np.asarray(boxes, np.float32)).to(self.device)
        if bx.ndim == 2 and bx.shape[-1] == 4:
            bx = bx[None].expand(b, -1, -1)
        if bx.ndim != 3 or bx.shape[0] != b or bx.shape[-1] != 4:
            raise ValueError(f"boxes must be [R, 4] or [{b}, R, 4], got {tuple(bx.shape)}")
        _check_boxes(bx.reshape(-1, 4), w, h)
        dense = self.vision_features(pv)[1]  # unnormalised, as umg_jax pools it
        g = self.grid
        scale = torch.tensor([g / w, g / h, g / w, g / h], device=self.device)
        cfg = self.config["boxes"]
        n = cfg["output_size"]
        pooled = roi_align(dense.permute(0, 3, 1, 2), list(bx * scale), (n, n),
                           spatial_scale=1.0, sampling_ratio=cfg["sampling_ratio"],
                           aligned=cfg["aligned"])  # [B * R, E, n, n]
        out = _normalize(pooled.mean((2, 3)).reshape(b, bx.shape[1], -1))
        return out[0] if single else out

    def encode_masks(self, images: ImageInput, masks) -> torch.Tensor:
        """Mask-pooled embeddings ``[B, M, E]`` (``[M, E]`` for one image), L2-normalised.

        ``masks``: ``[M, H, W]`` (or ``[H, W]``) of the image; ``[B, M, S, S]`` with pixel
        values. Each mask is resized to the grid (bilinear, antialiased: the covered fraction of
        each cell) and the dense map averaged under it; an empty mask gives zeros."""
        pv, single, (h, w) = self.pixel_values(images)
        m = torch.as_tensor(np.asarray(masks)).to(self.device, torch.float32)
        if m.ndim == 2:
            m = m[None]
        if m.ndim == 3:
            m = m[None]
        if m.ndim != 4 or m.shape[0] != pv.shape[0] or tuple(m.shape[2:]) != (h, w):
            raise ValueError(f"masks are {tuple(m.shape)}, expected [M, {h}, {w}]"
                             + ("" if single else f" or [{pv.shape[0]}, M, {h}, {w}]"))
        dense = self.vision_features(pv)[1]
        area = resize2d(m, (self.grid, self.grid), (2, 3))  # [B, M, g, g]
        total = area.sum((2, 3))
        summed = torch.einsum("bmhw,bhwe->bme", area, dense)
        ok = total >= self.config["masks"]["eps"]
        pooled = torch.where(ok[..., None], summed / torch.where(ok, total, 1.0)[..., None], 0.0)
        out = _normalize(pooled)
        return out[0] if single else out

    # ----------------------------------------------------------------- labels, segmentation
    def encode_text_labels(self, labels: Sequence[str],
                           templates: Sequence[str] | None = None) -> torch.Tensor:
        """Prompt-ensembled label embeddings ``[C, E]``: each template's embedding normalised,
        averaged over the templates, normalised again."""
        labels = tuple(labels)
        templates = tuple(self.templates if templates is None else templates)
        if not labels:
            raise ValueError("the label list is empty")
        if any(not isinstance(lab, str) or not lab.strip() for lab in labels):
            raise ValueError(f"empty label in {list(labels)}")
        if not templates:
            raise ValueError("the template list is empty")
        key = (labels, templates)
        if key not in self._label_cache:
            emb = self.encode_text([t.format(lab) for lab in labels for t in templates])
            emb = emb.reshape(len(labels), len(templates), -1).mean(1)
            self._label_cache[key] = _normalize(emb)
        return self._label_cache[key]

    def segment_logits(self, images: ImageInput, labels: Sequence[str],
                       templates: Sequence[str] | None = None) -> torch.Tensor:
        """Cosine logits ``[B, H, W, C]`` (``[H, W, C]`` for one image, at its own size):
        normalised dense map against the label embeddings, bilinearly upsampled."""
        text = self.encode_text_labels(labels, templates)
        pv, single, (h, w) = self.pixel_values(images)
        logits = torch.einsum("bhwe,ce->bhwc", _normalize(self.vision_features(pv)[1]), text)
        up = resize2d(logits, (h, w), (1, 2))
        return up[0] if single else up

    def segment(self, images: ImageInput, labels: Sequence[str],
                templates: Sequence[str] | None = None) -> torch.Tensor:
        """Open-vocabulary semantic segmentation: ``[B, H, W]`` (``[H, W]``) int32 indices into
        ``labels``."""
        return self.segment_logits(images, labels, templates).argmax(-1).to(torch.int32)

    def classify(self, image: ImageInput, labels: Sequence[str],
                 templates: Sequence[str] | None = None) -> dict[str, float]:
        """Zero-shot probabilities of one image over ``labels`` (softmax at the image-level
        temperature)."""
        img = self.encode_image(image)
        if img.ndim != 1:
            raise ValueError("classify takes one image")
        p = torch.softmax(self.logit_scales["image"] * (self.encode_text_labels(labels, templates)
                                                        @ img), -1)
        return dict(zip(labels, p.tolist(), strict=True))


def _check_boxes(boxes: torch.Tensor, w: int, h: int) -> None:
    """Boxes ``[R, 4]`` must be non-empty and inside the ``w x h`` image (as umg_jax)."""
    bad = ((boxes[:, 0] >= boxes[:, 2]) | (boxes[:, 1] >= boxes[:, 3]) | (boxes[:, 0] < 0)
           | (boxes[:, 1] < 0) | (boxes[:, 2] > w) | (boxes[:, 3] > h))
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"box {i} {boxes[i].tolist()} is empty or outside the {w}x{h} image")


def _load_tokenizer(directory: pathlib.Path, entry: dict) -> tuple:
    """``(HF CLIPTokenizer over the export's vocab.json / merges.txt, None)``, or ``(None,
    why not)``: text is then refused, token ids still work."""
    if entry.get("kind") != "clip_bpe":
        return None, (f"the model's tokenizer is {entry.get('kind')!r} "
                      f"({entry.get('file')}); UMGTorch tokenizes CLIP BPE only")
    files = [directory / entry.get("vocab", "vocab.json"),
             directory / entry.get("merges", "merges.txt")]
    if not all(f.is_file() for f in files):
        return None, f"{directory} has no CLIP BPE files ({', '.join(f.name for f in files)})"
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(directory)), None
