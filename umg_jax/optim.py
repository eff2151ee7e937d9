"""The optimizer: AdamW + weight-decay mask, warmup-cosine schedule, global-norm clipping,
layer-wise lr decay, gradient accumulation and freezing by regex.

Parameter paths are the ``/``-joined keys of the params pytree, e.g.
``visual/transformer/resblocks_0/attn/query/kernel``, ``text/ln_final/scale``, ``logit_scale``.
Regexes are matched with ``re.fullmatch`` against these paths. Scanned stacks (``resblocks`` with
a leading layer axis, see ``umg_jax.models.layers.Transformer``) have the same leaf names, so every
regex rule works for both layouts; only layer-wise lr decay needs the layer axis (a per-layer
multiplier array broadcast on the leading axis).

Composition (the order matters)::

    chain(
      partition({"train": MultiSteps?(chain(clip_by_global_norm?, adamw(schedule, mask))),
                 "frozen": set_to_zero()}),
      scale_by_layer_decay?)

* Frozen leaves get zero updates and *no* optimizer state (``optax.partition`` hands the inner
  transform ``MaskedNode`` placeholders for them).
* Clipping runs on the accumulated (mean) gradient, inside ``MultiSteps``.
* Layer decay multiplies the final update ``-lr * (adam + wd * p)``, i.e. it scales the lr of each
  block (weight decay included, as PyTorch param groups do in BEiT / EVA-CLIP).

With ``grad_accum = k`` the caller calls ``tx.update`` once per micro-batch; every k-th call applies
the mean gradient. ``schedule_fn`` is indexed by the *optimizer* step (``micro_step // k``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax

PyTree = Any

# No weight decay on: temperatures / logit biases, LayerNorm scale+bias, every bias, embeddings.
NO_DECAY_REGEXES: tuple[str, ...] = (
    r"(.*/)?logit_scale(_[^/]*)?",
    r"(.*/)?logit_bias(_[^/]*)?",
    r"(.*/)?ln_[^/]*/(scale|bias)",
    r"(.*/)?bias",
    r"(.*/)?class_embedding",
    r"(.*/)?positional_embedding",
    r"(.*/)?token_embedding/embedding",
)

TOWERS = ("visual", "text")  # top-level param groups that get layer-wise lr decay
# Tower leaves below the first block (layer id 0); any other non-block tower leaf is "head"
# (layer id L + 1, multiplier 1), so unknown new params are never silently slowed down.
_STEM_RE = re.compile(
    r"(conv1|class_embedding|positional_embedding|ln_pre|token_embedding)(/.*)?")
_BLOCK_RE = re.compile(r"transformer/resblocks(_(\d+))?(/.*)?")


def path_str(path: tuple) -> str:
    """``/``-joined names of a ``jax.tree_util`` key path."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


def flat_paths(tree: PyTree) -> list[str]:
    """Paths of all leaves of ``tree`` in flatten order."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def param_labels(params: PyTree, regexes: Sequence[str]) -> PyTree:
    """Tree of bools (same structure as ``params``): True where the leaf path fullmatches any of
    ``regexes``. Works on abstract trees and on trees holding ``optax.MaskedNode`` placeholders."""
    compiled = [re.compile(r) for r in regexes]
    return jax.tree_util.tree_map_with_path(
        lambda p, _: any(c.fullmatch(path_str(p)) for c in compiled), params)


def decay_mask(params: PyTree, extra_no_decay: Sequence[str] = ()) -> PyTree:
    """Tree of bools: True = weight decay (kernels); False = norms, biases, embeddings, scales."""
    no = param_labels(params, tuple(NO_DECAY_REGEXES) + tuple(extra_no_decay))
    return jax.tree.map(lambda x: not x, no)


def count_params(tree: PyTree) -> int:
    """Total number of elements over all array leaves (arrays or ``ShapeDtypeStruct``)."""
    return int(sum(math.prod(getattr(x, "shape", ())) for x in jax.tree.leaves(tree)))


def trainable_report(params: PyTree, freeze: Sequence[str]) -> str:
    """Frozen vs trainable parameter counts per module (``base/visual``, ``lora/text``,
    ``seg/layer_0``, ...; LoRA keys are ``.``-joined paths) as a printable table."""
    frozen = jax.tree.leaves(param_labels(params, freeze))
    groups: dict[str, list[int]] = {}
    for (p, leaf), is_frozen in zip(jax.tree_util.tree_flatten_with_path(params)[0], frozen,
                                    strict=True):
        parts = path_str(p).split("/")
        g = "/".join([parts[0], parts[1].split(".")[0]] if len(parts) > 1 else parts[:1])
        groups.setdefault(g, [0, 0])[0 if is_frozen else 1] += math.prod(
            getattr(leaf, "shape", ()))
    total_f = sum(v[0] for v in groups.values())
    total_t = sum(v[1] for v in groups.values())
    lines = [f"{'module':<32}{'frozen':>14}{'trainable':>14}"]
    lines += [f"{g:<32}{f:>14,}{t:>14,}" for g, (f, t) in sorted(groups.items())]
    pct = 100 * total_t / max(total_f + total_t, 1)
    lines.append(f"{'total':<32}{total_f:>14,}{total_t:>14,}  ({pct:.2f} % trainable)")
    return "\n".join(lines)


def count_float_elements(tree: PyTree) -> int:
    """Elements over the floating-point leaves only (optimizer moments, not step counters)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)
                   if jnp.issubdtype(x.dtype, jnp.floating)))


def warmup_cosine(lr: float, warmup_steps: int, total_steps: int,
                  end_lr_frac: float = 0.0) -> Callable[[Any], jax.Array]:
    """open_clip's schedule: ``lr * (s + 1) / warmup`` for ``s < warmup`` (the first step already
    learns), then cosine from ``lr`` at ``s = warmup`` to ``lr * end_lr_frac`` at ``s = total``;
    held at the end value past ``total``. ``s`` is the optimizer step (int32 scalar)."""
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    end = lr * end_lr_frac

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = lr * (s + 1.0) / max(warmup_steps, 1)
        frac = jnp.clip((s - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
        cos = end + 0.5 * (1.0 + jnp.cos(jnp.pi * frac)) * (lr - end)
        return jnp.where(s < warmup_steps, warm, cos)

    return schedule


def _tower_depths(paths: Sequence[str], shapes: Sequence[tuple]) -> dict[str, int]:
    """Number of residual blocks per tower, from ``resblocks_{i}`` names and the leading axis of a
    scanned ``resblocks`` stack (which covers blocks ``0 .. n-1``)."""
    depth: dict[str, int] = {}
    for path, shape in zip(paths, shapes, strict=True):
        tower, _, rest = path.partition("/")
        m = _BLOCK_RE.fullmatch(rest)
        if tower not in TOWERS or not m:
            continue
        n = int(m.group(2)) + 1 if m.group(2) is not None else shape[0]
        depth[tower] = max(depth.get(tower, 0), n)
    return depth


def layer_decay_multipliers(params: PyTree, decay: float) -> PyTree:
    """Per-leaf lr multipliers (same structure as ``params``) for layer-wise lr decay.

    Within each tower of ``L`` blocks: the stem (patch / token embedding, class and positional
    embeddings, ``ln_pre``) is layer 0, ``resblocks_i`` is layer ``i + 1`` and anything after the
    blocks (``ln_post``, ``proj``, ``ln_final``, ``text_projection``) is layer ``L + 1``;
    multiplier = ``decay ** (L + 1 - layer)``. Leaves outside the towers (temperatures, heads)
    get 1.0. Leaves are python floats, except a scanned ``resblocks`` leaf ``[n, ...]``, which
    gets a float32 numpy array ``[n, 1, ..., 1]`` (one value per layer slice).
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {decay}")
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in leaves_with_path]
    shapes = [tuple(x.shape) for _, x in leaves_with_path]
    depth = _tower_depths(paths, shapes)
    out = []
    for path, shape in zip(paths, shapes, strict=True):
        tower, _, rest = path.partition("/")
        if tower not in TOWERS or tower not in depth:
            out.append(1.0)
            continue
        top = depth[tower] + 1
        m = _BLOCK_RE.fullmatch(rest)
        if m and m.group(2) is not None:
            out.append(float(decay ** (top - (int(m.group(2)) + 1))))
        elif m:  # scanned stack: layer ids 1..n along the leading axis
            ids = np.arange(1, shape[0] + 1)
            mult = (decay ** (top - ids)).astype(np.float32)
            out.append(mult.reshape((shape[0],) + (1,) * (len(shape) - 1)))
        elif _STEM_RE.fullmatch(rest):
            out.append(float(decay ** top))
        else:
            out.append(1.0)
    return jax.tree_util.tree_unflatten(treedef, out)


def scale_by_tree(multipliers: PyTree) -> optax.GradientTransformation:
    """Stateless: ``update * multiplier`` leaf by leaf (multipliers: floats / broadcastable
    arrays with the params' structure)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        new = jax.tree.map(lambda u, m: u if isinstance(m, float) and m == 1.0
                           else u * jnp.asarray(m, u.dtype), updates, multipliers)
        return new, state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(optim_cfg: mlc.ConfigDict, params_or_abstract: PyTree, total_steps: int,
                   freeze: Sequence[str] | None = None
                   ) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """Builds the optimizer from ``config.optim`` (configs/common.py:optim_config).

    ``params_or_abstract``: the params tree (arrays or ``ShapeDtypeStruct``), only its structure,
    paths and shapes are used. ``total_steps``: optimizer steps of the run (schedule length).
    ``freeze``: regexes of frozen param paths (default ``optim_cfg.freeze``; the trainer passes
    ``step.frozen_regexes(config)``, which adds the PEFT backbone). Returns
    ``(tx, schedule_fn)``; ``schedule_fn(optimizer_step) -> lr`` for logging (the base lr,
    before layer-decay multipliers).
    """
    o = optim_cfg
    schedule = warmup_cosine(o.lr, o.warmup_steps, total_steps, o.end_lr_frac)
    extra_no_decay = tuple(o.get("no_decay_extra", ()))
    inner = optax.adamw(
        learning_rate=schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
        mask=lambda p: decay_mask(p, extra_no_decay))
    if o.grad_clip and o.grad_clip > 0:
        inner = optax.chain(optax.clip_by_global_norm(o.grad_clip), inner)
    if o.grad_accum < 1:
        raise ValueError(f"optim.grad_accum must be >= 1, got {o.grad_accum}")
    if o.grad_accum > 1:
        inner = optax.MultiSteps(inner, every_k_schedule=o.grad_accum).gradient_transformation()

    freeze = tuple(o.freeze or ()) if freeze is None else tuple(freeze)
    frozen = param_labels(params_or_abstract, freeze)
    for rx in freeze:
        if not any(re.fullmatch(rx, p) for p in flat_paths(params_or_abstract)):
            raise ValueError(f"optim.freeze regex {rx!r} matches no parameter path "
                             "(paths look like 'visual/transformer/resblocks_0/attn/query/kernel')")
    n_frozen = sum(jax.tree.leaves(frozen))
    if n_frozen == len(jax.tree.leaves(frozen)):
        raise ValueError(f"optim.freeze {freeze} freezes every parameter")
    if n_frozen:
        labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
        tx = optax.partition({"train": inner, "frozen": optax.set_to_zero()}, labels)
    else:
        tx = inner

    if o.layer_decay != 1.0:
        tx = optax.chain(tx, scale_by_tree(layer_decay_multipliers(params_or_abstract,
                                                                   o.layer_decay)))
    return tx, schedule
