"""UMG-CLIP's open-vocabulary segmentation head in PyTorch, from an ``export_torch --format hf``
directory of a ``configs/seg_*.py`` run, without JAX.

Same import rules as ``torch_model.py`` (torch, torchvision, safetensors, transformers, numpy,
PIL, the standard library); copy both files side by side into a serving codebase.

    from torch_seg import UMGTorchSegmenter
    s = UMGTorchSegmenter.from_export("/tmp/umg_seg_hf")   # + umg_seg_head.safetensors
    out = s.predict("scene.png", ["circle", "grass", "sky"], isthing=[True, False, False])
    out["semantic"], out["panoptic"], out["segments"]  # [H, W] int32, [H, W] int32, {id: (label,
                                                       # score)}: umg_jax.load_segmenter's output

What it runs (equal to ``umg_jax.inference.Segmenter.predict``): the backbone's normalised dense
map and prompt-ensembled label embeddings (``UMGTorch``, adapters and all), the mask decoder
(``umg_jax/models/mask_decoder.py``: pixel features from the upsampled dense map and a strided
conv stem, queries that cross-attend to the dense map, masks and class embeddings per query),
the FC-CLIP geometric ensemble with the frozen backbone's mask-pooled logits, Mask2Former's
semantic and panoptic inference. The decoder keeps flax.linen's conventions: LayerNorm epsilon
1e-6, tanh GELU, ``SAME`` conv padding.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

try:  # inside the umg_jax package
    from .torch_model import (
        CONFIG_FILE,
        ImageInput,
        UMGTorch,
        _normalize,
        read_safetensors,
        resize2d,
    )
except ImportError:  # copied beside torch_model.py into a serving codebase
    from torch_model import (
        CONFIG_FILE,
        ImageInput,
        UMGTorch,
        _normalize,
        read_safetensors,
        resize2d,
    )


# ------------------------------------------------------------------------------ the decoder
def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")  # flax.linen.gelu's default


def _conv_same(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """``conv`` on ``x [B, C, H, W]`` with TensorFlow / Flax ``SAME`` padding (for stride 2 on an
    even size: one row / column after, none before, unlike torch's symmetric padding)."""
    pads = []
    for size, k, s in zip(x.shape[:-3:-1], conv.kernel_size[::-1], conv.stride[::-1],
                          strict=True):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return conv(F.pad(x, pads))


class _Attention(torch.nn.Module):
    """flax ``MultiHeadDotProductAttention`` (biased ``query / key / value / out``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (torch.nn.Linear(width, width)
                                                      for _ in range(4))

    def forward(self, xq: torch.Tensor, xkv: torch.Tensor) -> torch.Tensor:
        """``xq [B, Nq, D]``, ``xkv [B, Nk, D]`` -> ``[B, Nq, D]``."""
        b, nq, d = xq.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.query(xq)), split(self.key(xkv)),
                                           split(self.value(xkv)))
        return self.out(o.transpose(1, 2).reshape(b, nq, d))


class _Block(torch.nn.Module):
    """Pre-norm decoder layer: cross-attention to the memory, self-attention, MLP."""

    def __init__(self, width: int, heads: int, eps: float):
        super().__init__()
        for name in ("ln_cross", "ln_self", "ln_mlp"):
            self.add_module(name, torch.nn.LayerNorm(width, eps=eps))
        self.cross = _Attention(width, heads)
        self.add_module("self", _Attention(width, heads))  # the Flax scope name
        self.fc = torch.nn.Linear(width, 4 * width)
        self.proj = torch.nn.Linear(4 * width, width)

    def forward(self, q: torch.Tensor, qpos: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        q = q + self.cross(self.ln_cross(q) + qpos, mem)
        h = self.ln_self(q) + qpos
        q = q + self._modules["self"](h, h)
        return q + self.proj(_gelu(self.fc(self.ln_mlp(q))))


class MaskDecoder(torch.nn.Module):
    """``umg_jax.models.mask_decoder.MaskDecoder``: ``(image [B, S, S, 3], dense [B, gh, gw, E]
    L2-normalised) -> {"mask_logits": [B, N, S/s, S/s], "class_emb": [B, N, E] (normalised),
    "void_emb": [E], "log_scale": []}``, float32. Parameter names are the Flax ones (``/`` ->
    ``.``, ``kernel`` / ``scale`` -> ``weight``), so the exported state dict loads strictly."""

    def __init__(self, c: dict, grid: tuple[int, int]):
        super().__init__()
        d, e, eps = int(c["width"]), int(c["embed_dim"]), float(c["ln_eps"])
        self.c, self.width = c, d
        lin = torch.nn.Linear
        self.pix_in, self.mem_in = lin(e, d), lin(e, d)
        self.stem = int(math.log2(int(c["mask_stride"]))) if c["stem_channels"] else 0
        ch = int(c["stem_channels"])
        for i in range(self.stem):
            self.add_module(f"stem_{i}", torch.nn.Conv2d(3 if i == 0 else ch, ch, 3, stride=2))
        if self.stem:
            self.stem_out = lin(ch, d)
        self.ln_pix = torch.nn.LayerNorm(d, eps=eps)
        self.pix_mix = torch.nn.Conv2d(d, d, 3)
        self.ln_pix_out = torch.nn.LayerNorm(d, eps=eps)
        n = int(c["num_queries"])
        self.mem_pos = torch.nn.Parameter(torch.zeros(grid[0] * grid[1], d))
        self.queries = torch.nn.Parameter(torch.zeros(n, d))
        self.query_pos = torch.nn.Parameter(torch.zeros(n, d))
        for i in range(int(c["layers"])):
            self.add_module(f"layer_{i}", _Block(d, int(c["heads"]), eps))
        self.ln_out = torch.nn.LayerNorm(d, eps=eps)
        self.mask_mlp_0, self.mask_mlp_1 = lin(d, d), lin(d, d)
        if c["pool_pixels"]:
            self.pool_proj = lin(d, d)
        self.class_proj = lin(d, e)
        self.void_emb = torch.nn.Parameter(torch.zeros(e))
        self.log_scale = torch.nn.Parameter(torch.zeros(()))

    def forward(self, image: torch.Tensor, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        b, hh, ww, _ = image.shape
        _, gh, gw, _ = dense.shape
        s, d = int(self.c["mask_stride"]), self.width
        h, w = hh // s, ww // s
        # ---- pixel features at 1/s: upsampled frozen dense map + a conv stem on the pixels
        pix = resize2d(self.pix_in(dense), (h, w), (1, 2))
        if self.stem:
            x = image.permute(0, 3, 1, 2)
            for i in range(self.stem):
                x = _gelu(_conv_same(x, self._modules[f"stem_{i}"]))
            pix = pix + self.stem_out(x.permute(0, 2, 3, 1))
        mixed = _conv_same(_gelu(self.ln_pix(pix)).permute(0, 3, 1, 2), self.pix_mix)
        pix = self.ln_pix_out(pix + mixed.permute(0, 2, 3, 1))
        # ---- queries attend to the frozen dense map at grid resolution
        mem = self.mem_in(dense).reshape(b, gh * gw, d) + self.mem_pos
        q = self.queries.expand(b, -1, -1)
        for i in range(int(self.c["layers"])):
            q = self._modules[f"layer_{i}"](q, self.query_pos, mem)
        q = self.ln_out(q)
        # ---- heads
        m = self.mask_mlp_1(_gelu(self.mask_mlp_0(q)))
        mask_logits = torch.einsum("bnd,bhwd->bnhw", m, pix) / math.sqrt(d)
        if self.c["pool_pixels"]:
            wgt = torch.sigmoid(mask_logits)
            pooled = torch.einsum("bnhw,bhwd->bnd", wgt, pix) / (wgt.sum((2, 3))[..., None] + 1)
            q = q + self.pool_proj(pooled)
        unit = lambda x: x / torch.clamp(  # noqa: E731  (the decoder's own eps)
            torch.linalg.vector_norm(x, dim=-1, keepdim=True), min=1e-6)
        return {"mask_logits": mask_logits, "class_emb": unit(self.class_proj(q)),
                "void_emb": unit(self.void_emb),
                "log_scale": torch.clamp(self.log_scale, max=math.log(100.0))}


def class_logits(out: dict[str, torch.Tensor], text: torch.Tensor) -> torch.Tensor:
    """``[B, N, C + 1]``: scaled cosine similarity of each query with ``text [C, E]`` and, last,
    with the void embedding."""
    t = torch.cat([text, out["void_emb"][None]], 0)
    return torch.exp(out["log_scale"]) * torch.einsum("bne,ce->bnc", out["class_emb"], t)


# ------------------------------------------------------------------------------ inference maths
def ensemble_probs(head_logits: torch.Tensor, frozen_logits: torch.Tensor, seen: torch.Tensor,
                   alpha: float, beta: float) -> torch.Tensor:
    """FC-CLIP: ``head_logits [..., C + 1]`` (last = void), ``frozen_logits [..., C]``, ``seen
    [C]`` bool -> ``[..., C + 1]``: ``p_in^(1-a) p_out^a`` renormalised over the classes
    (``a = alpha`` on seen classes, ``beta`` on unseen ones), times ``1 - p(void)``."""
    p_void = torch.softmax(head_logits, -1)[..., -1:]
    p_in = torch.softmax(head_logits[..., :-1], -1)
    p_out = torch.softmax(frozen_logits, -1)
    a = torch.where(seen, alpha, beta).to(head_logits)
    log = (1 - a) * torch.log(p_in + 1e-8) + a * torch.log(p_out + 1e-8)
    return torch.cat([torch.softmax(log, -1) * (1 - p_void), p_void], -1)


def semantic_inference(probs: torch.Tensor, mask_prob: torch.Tensor,
                       pixel_logp: torch.Tensor | None = None, weight: float = 0.0
                       ) -> torch.Tensor:
    """``probs [N, C + 1]``, ``mask_prob [N, H, W]`` -> ``[H, W]`` int32: argmax over classes of
    ``sum_q p(q, c) mask(q)`` (void excluded); with ``weight`` > 0, of ``(1 - w) log`` of those
    scores normalised over classes ``+ w pixel_logp [H, W, C]`` (the frozen backbone's
    per-pixel log-probabilities)."""
    scores = torch.einsum("nc,nhw->hwc", probs[:, :-1], mask_prob)
    if weight and pixel_logp is not None:
        total = scores.sum(-1, keepdim=True).clamp_min(1e-12)
        scores = (1.0 - weight) * torch.log(scores / total + 1e-8) + weight * pixel_logp
    return scores.argmax(-1).to(torch.int32)


def panoptic_inference(probs: torch.Tensor, mask_prob: torch.Tensor, isthing: torch.Tensor,
                       object_threshold: float, overlap_threshold: float
                       ) -> tuple[torch.Tensor, dict[int, int]]:
    """Mask2Former's panoptic merge (as ``umg_jax.evaluators.segmentation``): queries whose best
    non-void class beats ``object_threshold`` compete per pixel by ``score * mask``; a query
    keeps the pixels it wins if they are at least ``overlap_threshold`` of its own mask; stuff
    of one class is one segment. ``(seg [H, W]`` int32 ids, -1 = none, ``{id: class})``."""
    score, label = probs[:, :-1].max(-1)
    keep = (probs.argmax(-1) < probs.shape[-1] - 1) & (score > object_threshold)
    seg = torch.full(mask_prob.shape[1:], -1, dtype=torch.int32, device=probs.device)
    classes: dict[int, int] = {}
    if not bool(keep.any()):
        return seg, classes
    qs = torch.nonzero(keep)[:, 0]
    winner = qs[(score[qs, None, None] * mask_prob[qs]).argmax(0)]
    stuff_id: dict[int, int] = {}
    for q in qs.tolist():
        own = mask_prob[q] >= 0.5
        region = (winner == q) & own
        n_own, n_region = int(own.sum()), int(region.sum())
        if not n_own or not n_region or n_region / n_own < overlap_threshold:
            continue
        c = int(label[q])
        sid = q if bool(isthing[c]) else stuff_id.setdefault(c, q)
        seg[region] = sid
        classes[sid] = c
    return seg, classes


# ------------------------------------------------------------------------------ the segmenter
class UMGTorchSegmenter:
    """The segmentation head of an exported ``configs/seg_*.py`` run on its backbone."""

    def __init__(self, backbone: UMGTorch, decoder: MaskDecoder, config: dict):
        self.backbone = backbone
        self.decoder = decoder.eval().to(backbone.device)
        self.config = config  # the "seg_head" entry of umg_config.json
        self.train_labels = set(config.get("train_labels") or ())

    @classmethod
    def from_export(cls, directory: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> UMGTorchSegmenter:
        """Loads ``directory`` (``export_torch --format hf`` of a segmentation-head run)."""
        d = pathlib.Path(directory)
        backbone = UMGTorch.from_export(d, device)
        c = backbone.config.get("seg_head")
        if not c:
            raise ValueError(f"{d} has no segmentation head ({CONFIG_FILE} lists none): export "
                             "a configs/seg_*.py run, or use UMGTorch for the backbone")
        if int(c["embed_dim"]) != int(backbone.config["embed_dim"]) or \
                c.get("act") != "gelu_tanh" or c.get("conv_padding") != "SAME":
            raise ValueError(f"the seg_head entry of {CONFIG_FILE} does not fit this reader or "
                             f"the backbone: {c}")
        path = d / c["file"]
        if not path.is_file():
            raise ValueError(f"{CONFIG_FILE} lists a segmentation head but {path} is missing")
        sd = read_safetensors(path)
        decoder = MaskDecoder(c, (backbone.grid, backbone.grid))
        want = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in sd.items()}
        if want != got:
            odd = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            raise ValueError(f"{path} does not match the seg_head entry of {CONFIG_FILE}: "
                             f"{odd[0]} is {got.get(odd[0], 'missing')}, expected "
                             f"{want.get(odd[0], 'nothing')} ({len(odd)} entries differ)")
        decoder.load_state_dict({k: v.float() for k, v in sd.items()})
        return cls(backbone, decoder, c)

    @torch.no_grad()
    def head_outputs(self, image: ImageInput, labels: Sequence[str],
                     templates: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The decoder on one image, before the panoptic merge: ``{"mask_logits": [N, h, w],
        "class_logits": [N, C + 1], "mask_prob": [N, H, W]`` (sigmoid, at the image's size),
        ``"frozen_logits": [N, C]`` (the backbone's mask-pooled logits at its mask
        temperature), ``"pixel_logp": [H, W, C]`` (its per-pixel class log-probabilities at
        that temperature, logits resized to the image), ``"head": [N, C + 1]``, ``"ensemble":
        [N, C + 1]`` probabilities}."""
        b = self.backbone
        labels = list(labels)
        text = b.encode_text_labels(labels, templates)
        pv, _, size = b.pixel_values(image)
        if pv.shape[0] != 1:
            raise ValueError(f"the segmenter takes one image, got a batch of {pv.shape[0]}")
        dense = _normalize(b.vision_features(pv)[1])  # [1, g, g, E]
        out = self.decoder(pv.permute(0, 2, 3, 1), dense)
        logits = class_logits(out, text)[0]
        mask_prob = torch.sigmoid(resize2d(out["mask_logits"], size, (2, 3)))  # [1, N, H, W]
        area = resize2d(mask_prob, tuple(dense.shape[1:3]), (2, 3))
        total = area.sum((2, 3))
        ok = total >= 1e-6
        summed = torch.einsum("bmhw,bhwe->bme", area, dense)
        pooled = _normalize(torch.where(ok[..., None], summed / torch.where(
            ok, total, 1.0)[..., None], 0.0))[0]
        frozen = b.logit_scales["mask"] * pooled @ text.T
        pixel = resize2d(b.logit_scales["mask"] * dense[0] @ text.T, size, (0, 1))  # [H, W, C]
        seen = torch.tensor([lab in self.train_labels for lab in labels], device=b.device)
        c = self.config
        return {"mask_logits": out["mask_logits"][0], "class_logits": logits,
                "mask_prob": mask_prob[0], "frozen_logits": frozen,
                "pixel_logp": torch.log_softmax(pixel, -1),
                "head": torch.softmax(logits, -1),
                "ensemble": ensemble_probs(logits, frozen, seen, c["ensemble_alpha"],
                                           c["ensemble_beta"])}

    def predict(self, image: ImageInput, labels: Sequence[str], isthing=None,
                templates: Sequence[str] | None = None, ensemble: bool | None = None) -> dict:
        """Semantic and panoptic segmentation of one image over ``labels`` (as
        ``umg_jax.inference.Segmenter.predict``).

        ``isthing``: per label, True for countable things, False for stuff (default all
        things). ``ensemble``: FC-CLIP ensemble with the frozen backbone (default: the run's
        ``seg.ensemble``); labels outside the head's training vocabulary get the unseen-class
        exponent. Returns ``{"semantic": [H, W] int32 label index, "panoptic": [H, W] int32
        segment id (-1 none), "segments": {id: (label, score)}}``."""
        labels = list(labels)
        thing = (np.ones(len(labels), bool) if isthing is None
                 else np.asarray(isthing, bool).reshape(-1))
        if thing.shape != (len(labels),):
            raise ValueError(f"isthing has {thing.size} entries for {len(labels)} labels")
        out = self.head_outputs(image, labels, templates)
        c = self.config
        use = c["ensemble"] if ensemble is None else ensemble
        p, mask_prob = out["ensemble" if use else "head"], out["mask_prob"]
        seg, cls = panoptic_inference(p, mask_prob, torch.from_numpy(thing),
                                      c["object_threshold"], c["overlap_threshold"])
        score = p[:, :-1].max(-1).values
        segments = {sid: (labels[k], float(score[sid])) for sid, k in cls.items()}
        weight = float(c.get("pixel_weight", 0.0)) if use else 0.0
        return {"semantic": semantic_inference(p, mask_prob, out["pixel_logp"], weight),
                "panoptic": seg, "segments": segments}

