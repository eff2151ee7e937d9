"""The one name table between our Flax params and PyTorch CLIP state dicts, used both ways.

Two PyTorch layouts:

* ``classic``: OpenAI CLIP / open_clip (non-timm) key names, e.g.
  ``visual.transformer.resblocks.{i}.attn.in_proj_weight`` (q, k, v fused along axis 0).
* ``hf``: ``transformers.CLIPModel`` key names, e.g.
  ``vision_model.encoder.layers.{i}.self_attn.q_proj.weight``.

Every row of ``TOP_ROWS`` / ``BLOCK_ROWS`` names one Flax leaf, its key in each layout and the
transform kind per layout. A kind is a pair of inverse functions (``to_flax`` / ``to_torch``), so
import and export cannot drift apart. Arrays are numpy float32; torch tensors never appear here.

Flax params are handled as flat ``{"a/b/c": array}`` dicts. The *canonical* flat layout has one
``resblocks_{i}`` scope per layer; the model's own layout may stack layers ``0..n-1`` under
``resblocks`` with a leading axis (``config.model.scan``): ``to_canonical`` / ``to_model_layout``
convert between the two.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

FORMATS = ("classic", "hf")
# Side file of the UMG params plain CLIP has no slot for (written on export, read on import).
EXTRAS_FILE = "umg_extras.safetensors"
# Our activation names -> HF ``hidden_act``.
HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# Top-level UMG params that plain CLIP has no slot for; they go to a side file on export.
EXTRA_RE = re.compile(r"^logit_(scale|bias)_[a-z]+$")


class InteropError(Exception):
    """Any bad input to import / export; the CLIs print it as one line and exit with status 2."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One Flax leaf. ``chunk``: index of this leaf in a classic key fused along axis 0 (q/k/v in
    ``in_proj_weight`` / ``in_proj_bias``). ``hf=None``: HF's CLIPModel has no slot for it."""

    flax: str
    classic: str
    classic_kind: str
    hf: str | None
    hf_kind: str
    chunk: int | None = None


TOP_ROWS = (
    Row("visual/conv1/kernel", "visual.conv1.weight", "conv",
        "vision_model.embeddings.patch_embedding.weight", "conv"),
    Row("visual/class_embedding", "visual.class_embedding", "copy",
        "vision_model.embeddings.class_embedding", "copy"),
    Row("visual/positional_embedding", "visual.positional_embedding", "copy",
        "vision_model.embeddings.position_embedding.weight", "copy"),
    Row("visual/ln_pre/scale", "visual.ln_pre.weight", "copy",
        "vision_model.pre_layrnorm.weight", "copy"),  # the HF typo is real
    Row("visual/ln_pre/bias", "visual.ln_pre.bias", "copy",
        "vision_model.pre_layrnorm.bias", "copy"),
    Row("visual/ln_post/scale", "visual.ln_post.weight", "copy",
        "vision_model.post_layernorm.weight", "copy"),
    Row("visual/ln_post/bias", "visual.ln_post.bias", "copy",
        "vision_model.post_layernorm.bias", "copy"),
    # OpenAI stores the projections in x out (used as x @ proj); HF stores nn.Linear out x in.
    Row("visual/proj/kernel", "visual.proj", "copy", "visual_projection.weight", "linear"),
    Row("text/token_embedding/embedding", "token_embedding.weight", "copy",
        "text_model.embeddings.token_embedding.weight", "copy"),
    Row("text/positional_embedding", "positional_embedding", "copy",
        "text_model.embeddings.position_embedding.weight", "copy"),
    Row("text/ln_final/scale", "ln_final.weight", "copy",
        "text_model.final_layer_norm.weight", "copy"),
    Row("text/ln_final/bias", "ln_final.bias", "copy", "text_model.final_layer_norm.bias", "copy"),
    Row("text/text_projection/kernel", "text_projection", "copy", "text_projection.weight",
        "linear"),
    Row("logit_scale", "logit_scale", "scalar", "logit_scale", "scalar"),
    # open_clip's CLIP has a logit_bias when built with init_logit_bias; HF's CLIPModel has none.
    Row("logit_bias", "logit_bias", "scalar", None, "scalar"),
)

# Relative to a block: Flax ``<tower>/transformer/resblocks_{i}/``, classic
# ``<prefix>resblocks.{i}.``, HF ``<prefix>layers.{i}.``.
BLOCK_ROWS = (
    Row("ln_1/scale", "ln_1.weight", "copy", "layer_norm1.weight", "copy"),
    Row("ln_1/bias", "ln_1.bias", "copy", "layer_norm1.bias", "copy"),
    Row("attn/query/kernel", "attn.in_proj_weight", "heads_in", "self_attn.q_proj.weight",
        "heads_in", chunk=0),
    Row("attn/key/kernel", "attn.in_proj_weight", "heads_in", "self_attn.k_proj.weight",
        "heads_in", chunk=1),
    Row("attn/value/kernel", "attn.in_proj_weight", "heads_in", "self_attn.v_proj.weight",
        "heads_in", chunk=2),
    Row("attn/query/bias", "attn.in_proj_bias", "heads_bias", "self_attn.q_proj.bias",
        "heads_bias", chunk=0),
    Row("attn/key/bias", "attn.in_proj_bias", "heads_bias", "self_attn.k_proj.bias",
        "heads_bias", chunk=1),
    Row("attn/value/bias", "attn.in_proj_bias", "heads_bias", "self_attn.v_proj.bias",
        "heads_bias", chunk=2),
    Row("attn/out/kernel", "attn.out_proj.weight", "heads_out", "self_attn.out_proj.weight",
        "heads_out"),
    Row("attn/out/bias", "attn.out_proj.bias", "copy", "self_attn.out_proj.bias", "copy"),
    Row("ln_2/scale", "ln_2.weight", "copy", "layer_norm2.weight", "copy"),
    Row("ln_2/bias", "ln_2.bias", "copy", "layer_norm2.bias", "copy"),
    Row("mlp/c_fc/kernel", "mlp.c_fc.weight", "linear", "mlp.fc1.weight", "linear"),
    Row("mlp/c_fc/bias", "mlp.c_fc.bias", "copy", "mlp.fc1.bias", "copy"),
    Row("mlp/c_proj/kernel", "mlp.c_proj.weight", "linear", "mlp.fc2.weight", "linear"),
    Row("mlp/c_proj/bias", "mlp.c_proj.bias", "copy", "mlp.fc2.bias", "copy"),
)

# tower -> (classic block prefix, HF block prefix)
TOWER_PREFIX = {
    "visual": ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    "text": ("transformer.resblocks.", "text_model.encoder.layers."),
}

# Keys that carry no weights: OpenAI JIT metadata, HF position-id buffers, the causal-mask buffer
# that old open_clip versions saved. Dropped on import (and reported as such).
IGNORED_KEYS = re.compile(
    r"^(input_resolution|context_length|vocab_size|attn_mask"
    r"|(text|vision)_model\.embeddings\.position_ids)$")


# ------------------------------------------------------------------------------ transforms
def to_flax(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch tensor ``w`` (already un-fused) -> Flax leaf of ``shape``. Raises InteropError
    when ``w`` cannot take that shape."""
    if kind == "copy":
        x = w
    elif kind == "scalar":  # 0-D in OpenAI/HF, (1,) in some open_clip / big_vision checkpoints
        x = w.reshape(()) if w.size == 1 else w
    elif kind == "linear":  # nn.Linear [out, in] -> Dense [in, out]
        x = w.T
    elif kind == "conv":  # [D, C, p, p] -> [p, p, C, D]
        x = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w
    elif kind == "heads_in":  # [H*Dh, D] -> [D, H, Dh]
        x = w.T.reshape(shape) if w.ndim == 2 and w.size == np.prod(shape) else w
    elif kind == "heads_bias":  # [H*Dh] -> [H, Dh]
        x = w.reshape(shape) if w.ndim == 1 and w.size == np.prod(shape) else w
    elif kind == "heads_out":  # [D, H*Dh] -> [H, Dh, D]
        x = w.T.reshape(shape) if w.ndim == 2 and w.size == np.prod(shape) else w
    else:
        raise ValueError(f"unknown transform kind {kind!r}")
    if tuple(x.shape) != tuple(shape):
        raise InteropError(f"cannot map shape {tuple(w.shape)} to {tuple(shape)}")
    return np.array(x, dtype=np.float32, order="C")  # (ascontiguousarray makes 0-D 1-D)


def to_torch(kind: str, x: np.ndarray) -> np.ndarray:
    """Flax leaf -> PyTorch tensor (before fusing q/k/v), the inverse of ``to_flax``."""
    x = np.asarray(x, dtype=np.float32)
    if kind in ("copy", "scalar"):
        y = x
    elif kind == "linear":
        y = x.T
    elif kind == "conv":
        y = x.transpose(3, 2, 0, 1)
    elif kind == "heads_in":
        y = x.reshape(x.shape[0], -1).T
    elif kind == "heads_bias":
        y = x.reshape(-1)
    elif kind == "heads_out":
        y = x.reshape(-1, x.shape[-1]).T
    else:
        raise ValueError(f"unknown transform kind {kind!r}")
    return np.array(y, dtype=np.float32, order="C")


def torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape that maps to the Flax ``shape`` (for error messages and checks)."""
    return tuple(to_torch(kind, np.empty(shape, np.float32)).shape)


# ------------------------------------------------------------------------------ row expansion
def expand_rows(n_visual: int, n_text: int) -> list[Row]:
    """All rows with concrete block indices, for towers of ``n_visual`` / ``n_text`` layers."""
    rows = list(TOP_ROWS)
    for tower, n in (("visual", n_visual), ("text", n_text)):
        cp, hp = TOWER_PREFIX[tower]
        for i in range(n):
            for r in BLOCK_ROWS:
                rows.append(dataclasses.replace(
                    r, flax=f"{tower}/transformer/resblocks_{i}/{r.flax}",
                    classic=f"{cp}{i}.{r.classic}", hf=f"{hp}{i}.{r.hf}"))
    return rows


def key_of(row: Row, fmt: str) -> str | None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    return row.classic if fmt == "classic" else row.hf


def kind_of(row: Row, fmt: str) -> str:
    return row.classic_kind if fmt == "classic" else row.hf_kind


def chunk_of(row: Row, fmt: str) -> int | None:
    return row.chunk if fmt == "classic" else None


def count_layers(flat: dict[str, object], tower: str) -> int:
    """Number of blocks of ``tower`` in a canonical flat Flax dict."""
    pat = re.compile(rf"^{tower}/transformer/resblocks_(\d+)/")
    idx = {int(m.group(1)) for k in flat if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


# ------------------------------------------------------------------------------ flat <-> tree
def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested dict -> ``{"a/b": leaf}``."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) or hasattr(v, "items") and not hasattr(v, "shape"):
            out.update(flatten(dict(v.items()), name + "/"))
        else:
            out[name] = v
    return out


def unflatten(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for k, v in flat.items():
        *scopes, leaf = k.split("/")
        node = tree
        for s in scopes:
            node = node.setdefault(s, {})
        node[leaf] = v
    return tree


_STACKED = re.compile(r"^(.*/)resblocks/(.*)$")
_SINGLE = re.compile(r"^(.*/)resblocks_(\d+)/(.*)$")


def to_canonical(flat: dict[str, object]) -> dict[str, np.ndarray]:
    """Unstacks scanned layers: ``.../resblocks/x`` with leading axis n -> ``.../resblocks_{i}/x``
    for i < n (stacked ``resblocks`` always hold layers ``0..n-1``)."""
    out = {}
    for k, v in flat.items():
        m = _STACKED.match(k)
        if m:
            v = np.asarray(v)
            for i in range(v.shape[0]):
                out[f"{m.group(1)}resblocks_{i}/{m.group(2)}"] = v[i]
        else:
            out[k] = np.asarray(v)
    return out


def to_model_layout(canonical: dict[str, np.ndarray],
                    abstract_flat: dict[str, object]) -> dict[str, np.ndarray]:
    """Stacks ``resblocks_{i}`` leaves into the model's ``resblocks`` leaves where the model (its
    abstract flat params, leaves with ``.shape``) is scanned. Keys the model does not have are
    left out; the caller checks coverage."""
    out = {}
    for k, a in abstract_flat.items():
        m = _STACKED.match(k)
        if m:
            n = a.shape[0]
            parts = [canonical.get(f"{m.group(1)}resblocks_{i}/{m.group(2)}") for i in range(n)]
            if any(p is None for p in parts):
                continue
            out[k] = np.stack(parts)
        elif k in canonical:
            out[k] = canonical[k]
    return out


def abstract_canonical_shapes(abstract_flat: dict[str, object]) -> dict[str, tuple[int, ...]]:
    """Shapes of the canonical (unstacked) leaves of a model's abstract flat params."""
    shapes = {}
    for k, a in abstract_flat.items():
        m = _STACKED.match(k)
        if m:
            for i in range(a.shape[0]):
                shapes[f"{m.group(1)}resblocks_{i}/{m.group(2)}"] = tuple(a.shape[1:])
        else:
            shapes[k] = tuple(a.shape)
    return shapes


# ------------------------------------------------------------------------------ conversions
def flax_to_torch(canonical: dict[str, np.ndarray], fmt: str
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Canonical flat Flax params -> ``(state_dict, extras)``, numpy float32.

    ``extras``: top-level leaves the format has no slot for (UMG per-granularity temperatures and
    biases, and ``logit_bias`` for HF), keyed by their Flax name. Any other leaf without a row is
    an error, so nothing is dropped silently."""
    rows = expand_rows(count_layers(canonical, "visual"), count_layers(canonical, "text"))
    sd: dict[str, np.ndarray] = {}
    fused: dict[str, list] = {}
    used = set()
    for r in rows:
        if r.flax not in canonical:
            continue
        key = key_of(r, fmt)
        if key is None:
            continue
        used.add(r.flax)
        y = to_torch(kind_of(r, fmt), canonical[r.flax])
        c = chunk_of(r, fmt)
        if c is None:
            sd[key] = y
        else:
            fused.setdefault(key, [None, None, None])[c] = y
    for key, parts in fused.items():
        if any(p is None for p in parts):
            raise InteropError(f"incomplete q/k/v set for {key}")
        sd[key] = np.concatenate(parts, axis=0)
    extras = {}
    for k, v in canonical.items():
        if k in used:
            continue
        if "/" not in k and (EXTRA_RE.match(k) or k == "logit_bias"):
            extras[k] = np.asarray(v, np.float32)
        else:
            raise InteropError(f"param {k} {tuple(np.shape(v))} has no {fmt} name")
    return sd, extras


def torch_to_flax(sd: dict[str, np.ndarray], fmt: str, shapes: dict[str, tuple[int, ...]]
                  ) -> tuple[dict[str, np.ndarray], set[str], list[str]]:
    """State dict -> canonical flat Flax params for the canonical ``shapes`` (from the model).

    Returns ``(canonical, used_keys, missing_keys)``; leaves without a row in this format (UMG
    extras) are not produced. Raises InteropError naming the first key whose shape does not fit.
    """
    rows = expand_rows(count_layers(shapes, "visual"), count_layers(shapes, "text"))
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    missing: list[str] = []
    for r in rows:
        key = key_of(r, fmt)
        if r.flax not in shapes or key is None:
            continue
        if key not in sd:
            if key not in missing:
                missing.append(key)
            continue
        used.add(key)
        kind, shape, c = kind_of(r, fmt), shapes[r.flax], chunk_of(r, fmt)
        w = np.asarray(sd[key])
        if c is not None:
            tshape = torch_shape(kind, shape)
            full = (3 * tshape[0],) + tshape[1:]
            if tuple(w.shape) != full:
                raise InteropError(f"shape mismatch at {key}: checkpoint {tuple(w.shape)}, "
                                   f"config expects {full}")
            w = w[c * tshape[0]:(c + 1) * tshape[0]]
        try:
            out[r.flax] = to_flax(kind, w.astype(np.float32), shape)
        except InteropError:
            raise InteropError(f"shape mismatch at {key}: checkpoint {tuple(w.shape)}, "
                               f"config expects {torch_shape(kind, shape)}") from None
    return out, used, missing

