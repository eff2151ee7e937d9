"""LoRA as a transformation of the parameter tree (Hu et al., 2021), not as new Flax modules.

The base model code is untouched: the trainable tree is ``{"base": <CLIP params>, "lora": {key:
{"a", "b"}}}`` and :func:`apply` returns the effective CLIP params ``W + (alpha / rank) A @ B`` for
every targeted kernel, inside the jitted loss. The optimizer freezes ``base/.*`` with optax
masking, so Adam moments exist only for the LoRA factors. :func:`apply` is also the merge used for
export and inference (the result is a plain CLIP tree).

Kernel layouts handled (``lead`` = the layer axis of an ``nn.scan``-ed stack, if any):
  ``attn/{query,key,value}/kernel [*lead, D, H, Dh]``  in = D,       out = H * Dh
  ``attn/out/kernel [*lead, H, Dh, D]``                in = H * Dh,  out = D
  ``mlp/c_fc/kernel [*lead, D, 4D]``, ``mlp/c_proj/kernel [*lead, 4D, D]``, other Dense kernels.
Factors: ``a [*lead, in, r]`` (normal, std ``1 / r``), ``b [*lead, r, out]`` (zeros), so training
starts exactly at the base model.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from umg_jax.sharding import SCAN_PATTERN, path_str

PyTree = Any
SEP = "."  # flat LoRA keys are param paths joined by "." (orbax-safe)


def _flat(params: PyTree) -> dict[str, jax.Array]:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {path_str(p): v for p, v in leaves}


def _in_dims(path: str) -> int:
    """Number of input dimensions of a kernel (after the layer axis)."""
    return 2 if re.search(r"attn/out/kernel$", path) else 1


def target_paths(params: PyTree, targets: list[str] | tuple[str, ...]) -> list[str]:
    """Kernel paths (``a/b/kernel``) that ``re.search`` one of ``targets``."""
    if not targets:
        raise ValueError("peft.targets is empty: name the kernels LoRA adapts (regexes)")
    paths = [p for p, v in _flat(params).items()
             if p.endswith("kernel") and getattr(v, "ndim", 0) >= 2
             and any(re.search(t, p) for t in targets)]
    if not paths:
        raise ValueError(f"peft.targets {list(targets)} match no kernel (paths look like "
                         "'visual/transformer/resblocks_0/attn/query/kernel')")
    return sorted(paths)


def _split(path: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
    lead = shape[:1] if SCAN_PATTERN.search(path) else ()
    core = shape[len(lead):]
    k = _in_dims(path)
    return lead, int(np.prod(core[:k])), int(np.prod(core[k:]))


def init(params: PyTree, peft_cfg, rng: jax.Array) -> dict[str, dict[str, jax.Array]]:
    """LoRA factors for every targeted kernel of ``params`` (arrays or ShapeDtypeStructs)."""
    r = int(peft_cfg.rank)
    if r < 1:
        raise ValueError(f"peft.rank must be >= 1, got {r}")
    flat = _flat(params)
    out = {}
    for i, path in enumerate(target_paths(params, tuple(peft_cfg.targets))):
        lead, n_in, n_out = _split(path, tuple(flat[path].shape))
        key = jax.random.fold_in(rng, i)
        out[path.replace("/", SEP)] = {
            "a": jax.random.normal(key, (*lead, n_in, r), jnp.float32) / r,
            "b": jnp.zeros((*lead, r, n_out), jnp.float32),
        }
    return out


def apply(params: PyTree, lora: dict[str, dict[str, jax.Array]], peft_cfg) -> PyTree:
    """Effective params: each targeted kernel ``W + (alpha / rank) * (a @ b)`` (reshaped)."""
    scale = float(peft_cfg.alpha) / float(peft_cfg.rank)

    def one(path, w):
        p = path_str(path)
        f = lora.get(p.replace("/", SEP))
        if f is None:
            return w
        delta = jnp.matmul(f["a"], f["b"]) * scale  # [*lead, in, out]
        return w + delta.reshape(w.shape).astype(w.dtype)

    known = {path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    missing = [k for k in lora if k.replace(SEP, "/") not in known]
    if missing:
        raise ValueError(f"LoRA factors for unknown params {missing[:3]}")
    return jax.tree_util.tree_map_with_path(one, params)


def merge(params: PyTree, lora: dict, peft_cfg) -> PyTree:
    """Plain CLIP params with the LoRA deltas folded in (for export and inference), numpy."""
    return jax.tree.map(np.asarray, apply(params, lora, peft_cfg))
