"""big_vision SigLIP ``.npz`` checkpoints: names, architecture, conversion to our Flax params.

The names are big_vision's SigLIP checkpoint names (the ones open_clip's
``load_big_vision_weights`` reads), with an optional ``params/`` prefix and scanned blocks
(``encoderblock/...`` with a leading layer axis) unstacked on reading. big_vision is Flax too, so
kernels keep their layout: only the scope names change, plus three reshapes (the ``(1, N, D)``
positional tables and the ``(1,)`` scalars ``t`` and ``b``).

What a SigLIP tower is, in our model's switches: ``configs/common.py:siglip_towers`` (no class
token, no ln_pre, biased patch embedding, MAP pooling, bidirectional text pooled at the last
position with a biased head, pad id 1, LayerNorm eps 1e-6, tanh GELU, pixels mapped to [-1, 1]).
"""

from __future__ import annotations

import math
import re

import ml_collections as mlc
import numpy as np

from umg_jax.configs import common
from umg_jax.interop.mapping import InteropError

_BLOCK = (  # big_vision encoderblock scope -> our resblocks scope
    ("LayerNorm_0/", "ln_1/"),
    ("LayerNorm_1/", "ln_2/"),
    ("MultiHeadDotProductAttention_0/", "attn/"),
    ("MlpBlock_0/Dense_0/", "mlp/c_fc/"),
    ("MlpBlock_0/Dense_1/", "mlp/c_proj/"),
)
_MAP_HEAD = (
    ("probe", "probe"),
    ("MultiHeadDotProductAttention_0/", "attn/"),
    ("LayerNorm_0/", "ln/"),
    ("MlpBlock_0/Dense_0/", "mlp/c_fc/"),
    ("MlpBlock_0/Dense_1/", "mlp/c_proj/"),
)
_TOP = (
    ("img/embedding/", "visual/conv1/"),
    ("img/pos_embedding", "visual/positional_embedding"),
    ("img/Transformer/encoder_norm/", "visual/ln_post/"),
    ("img/head/", "visual/proj/"),
    ("txt/Embed_0/", "text/token_embedding/"),
    ("txt/pos_embedding", "text/positional_embedding"),
    ("txt/Encoder_0/encoder_norm/", "text/ln_final/"),
    ("txt/head/", "text/text_projection/"),
    ("t", "logit_scale"),
    ("b", "logit_bias"),
)
_TOWER_BLOCKS = (("img/Transformer/", "visual/transformer/"),
                 ("txt/Encoder_0/", "text/transformer/"))
_SCANNED = re.compile(r"^(.*/)encoderblock/(.*)$")


def is_big_vision(keys) -> bool:
    """A big_vision image-text checkpoint (``img/embedding/kernel``, optional ``params/``)."""
    return any(re.match(r"^(params/)?img/embedding/kernel$", k) for k in keys)


def read_npz(path: str) -> dict[str, np.ndarray]:
    """The ``.npz`` as ``{big_vision name: float32 array}``: ``params/`` stripped, scanned
    ``encoderblock/`` leaves unstacked into ``encoderblock_{i}/``. Raises InteropError."""
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = {k: np.asarray(z[k]) for k in z.files}
    except Exception as e:  # truncated zip, bad header, pickled objects
        raise InteropError(f"cannot read {path}: truncated or not a .npz file "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    out: dict[str, np.ndarray] = {}
    for k, v in raw.items():
        k = k.removeprefix("params/")
        v = v.astype(np.float32) if v.dtype.kind == "f" or v.dtype.name == "bfloat16" else v
        m = _SCANNED.match(k)
        if m:
            for i in range(v.shape[0]):
                out[f"{m.group(1)}encoderblock_{i}/{m.group(2)}"] = v[i]
        else:
            out[k] = v
    return out


def flax_name(key: str) -> str | None:
    """Our canonical Flax name of a big_vision leaf, ``None`` when it has no place here."""
    for src, dst in _TOWER_BLOCKS:
        m = re.match(rf"^{re.escape(src)}encoderblock_(\d+)/(.*)$", key)
        if m:
            for a, b in _BLOCK:
                if m.group(2).startswith(a):
                    return f"{dst}resblocks_{m.group(1)}/{b}{m.group(2)[len(a):]}"
            return None
    if key.startswith("img/MAPHead_0/"):
        rest = key[len("img/MAPHead_0/"):]
        for a, b in _MAP_HEAD:
            if rest.startswith(a):
                return f"visual/map_head/{b}{rest[len(a):]}"
        return None
    for a, b in _TOP:
        if key == a or (a.endswith("/") and key.startswith(a)):
            return b + key[len(a):]
    return None


def _count(w: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in w if (m := re.match(rf"^{re.escape(prefix)}(\d+)/", k))}
    if idx != set(range(len(idx))):
        raise InteropError(f"block indices under {prefix} are not contiguous: {sorted(idx)}")
    return len(idx)


def model_config(w: dict[str, np.ndarray], act: str) -> mlc.ConfigDict:
    """The ``config.model`` section of the SigLIP in ``w`` (:func:`read_npz`), from shapes.
    Raises InteropError for big_vision towers our model cannot represent."""
    if "img/cls" in w:
        raise InteropError("img/cls: big_vision class tokens get no position embedding, which our "
                           "ViT cannot represent; only SigLIP towers (MAP pooling) can be imported")
    if "img/MAPHead_0/probe" not in w:
        raise InteropError("no img/MAPHead_0: only MAP-pooled big_vision towers (SigLIP) can be "
                           "imported, not 'gap' / 'tok' pooling")
    if "txt/head/kernel" not in w or "txt/head/bias" not in w:
        raise InteropError("txt/head/{kernel,bias} missing: a SigLIP text tower has a biased head")
    try:
        kernel = w["img/embedding/kernel"]  # [p, p, 3, D]
        vpos = w["img/pos_embedding"]  # [1, G*G, D]
        tok = w["txt/Embed_0/embedding"]  # [V, W]
        tpos = w["txt/pos_embedding"]  # [1, L, W]
        vq = w["img/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"]
        tq = w["txt/Encoder_0/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"]
        vfc = w["img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"]
        tfc = w["txt/Encoder_0/encoderblock_0/MlpBlock_0/Dense_0/kernel"]
        embed = w["txt/head/kernel"].shape[1]
    except KeyError as e:
        raise InteropError(f"cannot infer the architecture: missing {e.args[0]}") from None
    patch, width = kernel.shape[0], kernel.shape[-1]
    grid = math.isqrt(vpos.shape[-2])
    if grid * grid != vpos.shape[-2]:
        raise InteropError(f"img/pos_embedding has {vpos.shape[-2]} rows: not a square grid")
    if "img/head/kernel" in w:
        if w["img/head/kernel"].shape[1] != embed:
            raise InteropError(f"img/head/kernel {w['img/head/kernel'].shape} and txt/head/kernel "
                               f"{w['txt/head/kernel'].shape} project to different sizes")
    elif width != embed:
        raise InteropError(f"no img/head and the image width {width} differs from the text "
                           f"embedding {embed}")
    m = common.model_config(
        image_size=grid * patch, patch_size=patch, vision_width=width,
        vision_layers=_count(w, "img/Transformer/encoderblock_"), vision_heads=vq.shape[1],
        text_width=tok.shape[1], text_layers=_count(w, "txt/Encoder_0/encoderblock_"),
        text_heads=tq.shape[1], embed_dim=embed, context_length=tpos.shape[-2],
        vocab_size=tok.shape[0])
    common.siglip_towers(m, "bias" if "img/head/kernel" in w else "none")
    m.act = act
    m.logit_bias_init = float(np.asarray(w.get("b", -10.0)).reshape(-1)[0])
    v, t = m.vision, m.text
    v.mlp_dim, v.mlp_ratio = int(vfc.shape[1]), vfc.shape[1] / width
    t.mlp_dim, t.mlp_ratio = int(tfc.shape[1]), tfc.shape[1] / tok.shape[1]
    return m


def to_flax(w: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]
            ) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """``(canonical flat Flax params, unknown big_vision keys, missing Flax params)`` for the
    model's canonical ``shapes``. Raises InteropError naming the first key whose shape does not
    fit (both shapes)."""
    out: dict[str, np.ndarray] = {}
    unknown = []
    for k, v in w.items():
        name = flax_name(k)
        if name is None or name not in shapes:
            unknown.append(k)
            continue
        want = shapes[name]
        # Positional tables are (1, N, D) and t / b are (1,) in big_vision; nothing else differs.
        squeeze = v.shape[0] == 1 and tuple(v.shape[1:]) == tuple(want)
        if tuple(v.shape) != tuple(want) and not squeeze and not (v.size == 1 and want == ()):
            raise InteropError(f"shape mismatch at {k}: checkpoint {tuple(v.shape)}, config "
                               f"expects {tuple(want)} ({name})")
        out[name] = np.array(v.reshape(want), np.float32)
    missing = sorted(k for k in shapes if k not in out)
    return out, sorted(unknown), missing
