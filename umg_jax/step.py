"""The training step: model forward on a batch, the multi-granularity loss, the update.

One place builds the jitted step and its shardings, so that ``umg_jax.train`` (real run) and
``umg_jax.dryrun`` (ahead-of-time compile for a pod) use the same code path.

Train state (an explicit pytree, checkpointed whole):
  ``step`` int32, ``params``, ``opt_state``, ``nonfinite`` int32 (consecutive skipped updates),
  ``skipped`` int32 (total skipped updates).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from umg_jax import sharding
from umg_jax.losses import umg as umg_losses
from umg_jax.models import clip


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite: jax.Array
    skipped: jax.Array


# Text fields of the batch, the model output key they become, and the loss weight that needs them.
TEXT_FIELDS = (
    ("text", "txt", ("w_image",)),
    ("tags", "tags_txt", ("w_tags",)),
    ("region_text", "region_txt", ("w_region",)),
    ("mask_text", "mask_txt", ("w_mask", "w_pixel")),
)


def needed_text_fields(loss_cfg: mlc.ConfigDict) -> list[tuple[str, str]]:
    """Text fields whose loss term has a non-zero weight; only those go through the text tower.
    The caption is always encoded (image-level loss and logging)."""
    return [(f, o) for f, o, ws in TEXT_FIELDS
            if f == "text" or any(loss_cfg.get(w, 0.0) for w in ws)]


def texts_per_example(config: mlc.ConfigDict, lengths: tuple[int, int] | None = None,
                      element_rows: int | None = None) -> float:
    """Full-context text-tower passes per example: the caption, plus the weighted tag / region /
    mask texts scaled by their shorter context ``Le / L`` (for FLOP counts; a last-token text
    tower pads every text to ``L``). ``lengths``: the ``(caption, element)`` token lengths of a
    trimmed batch (:func:`trim_text`) instead of the configured ones. ``element_rows``: the
    element texts the step encodes in all (the id path: ``K + shards * Kf``), instead of one per
    slot, so that FLOPs count the texts the step needs."""
    length = config.model.text.context_length
    cap, short = 1.0, min(config.data.get("element_context_length") or length, length) / length
    if lengths is not None:
        cap, short = lengths[0] / length, lengths[1] / length
    if clip.tower_switches(config.model, "text")["pool"] == "last":
        cap = short = 1.0
    sizes = {"text": cap, "tags": config.data.max_tags * short,
             "region_text": config.data.max_regions * short,
             "mask_text": config.data.max_masks * short}
    if element_rows is not None and element_text_fields(config.loss):
        return cap + element_rows / config.batch_size * short
    return sum(sizes[f] for f, _ in needed_text_fields(config.loss))


def trim_enabled(config: mlc.ConfigDict) -> bool:
    """Text columns that are padding in the whole batch can be cut exactly: the CLIP text tower is
    causal and pools its end-of-text token (not so for a last-token tower, which pads back)."""
    t = clip.tower_switches(config.model, "text")
    return bool(config.data.get("trim_text", False)) and t["causal"] and t["pool"] == "eot"


def text_lengths(batch: dict[str, np.ndarray]) -> tuple[int, int]:
    """``(caption, element)`` token lengths a host batch needs: past its last non-padding
    column, rounded up to the next of 8, 12, 16, 24, 32, 48, ... (two buckets per octave: at most
    a third of the kept columns is padding, and few distinct shapes, so few compiles), capped at
    the arrays' lengths. Elements: the longest of the tag / region / mask texts."""
    def need(tokens: np.ndarray) -> int:
        used = np.flatnonzero(tokens.reshape(-1, tokens.shape[-1]).any(0))  # CLIP pads with 0
        n = int(used[-1]) + 1 if used.size else 1
        octave = 8 << max(0, (n - 1) // 8).bit_length()  # smallest 8 * 2^k >= n
        bucket = octave * 3 // 4 if n <= octave * 3 // 4 and octave > 8 else octave
        return min(tokens.shape[-1], bucket)

    elements = [batch[f] for f, _, _ in TEXT_FIELDS[1:] if f in batch]
    return need(batch["text"]), max((need(t) for t in elements), default=1)


def trim_text(batch: dict[str, np.ndarray], lengths: tuple[int, int]) -> dict[str, np.ndarray]:
    """The batch with its caption / element token arrays cut to ``lengths`` (:func:`text_lengths`,
    agreed over hosts). Exact for the causal CLIP tower: every end-of-text token is kept and no
    kept position attends to a cut one."""
    out = dict(batch)
    out["text"] = batch["text"][..., :lengths[0]]
    for f, _, _ in TEXT_FIELDS[1:]:
        if f in batch:
            out[f] = batch[f][..., :lengths[1]]
    return out


def step_flops(config: mlc.ConfigDict, lengths: tuple[int, int] | None = None,
               element_rows: int | None = None) -> float:
    """Analytic model FLOPs of one train step (for MFU and the dry run). UMG training: 3 x the
    forward of both towers (``metrics.clip_train_flops``). Segmentation head: the backbone's
    image forward once (3x with LoRA / adapters, whose backward runs through it); the decoder's
    own FLOPs are not counted (a lower bound)."""
    from umg_jax import metrics

    if seg_enabled(config):
        fwd = metrics.clip_forward_flops(config.model, 0.0) * config.batch_size
        return fwd * (3.0 if peft_enabled(config) else 1.0)
    return metrics.clip_train_flops(config.model, config.batch_size,
                                    texts_per_example(config, lengths, element_rows))


# The id and valid keys of each element text field (schema.py).
TEXT_IDS = {"tags": ("tags_id", "tags_valid"), "region_text": ("region_text_id", "region_valid"),
            "mask_text": ("mask_text_id", "mask_valid")}


def text_ids_enabled(loss_cfg: mlc.ConfigDict) -> bool:
    """Element texts are encoded per distinct text (``models.text_slots``) when the step has
    the data set's vocabulary: free-form texts have a budget below every slot."""
    return float(loss_cfg.get("free_text_frac", 1.0)) < 1.0


def element_text_fields(loss_cfg: mlc.ConfigDict) -> list[str]:
    """The tag / region / mask token fields the text tower encodes (in their concatenation
    order)."""
    return [f for f, _ in needed_text_fields(loss_cfg) if f != "text"]


def element_slots(config: mlc.ConfigDict) -> int:
    """Tag / region / mask text slots per example that go through the text tower."""
    per_field = {"tags": config.data.max_tags, "region_text": config.data.max_regions,
                 "mask_text": config.data.max_masks}
    return sum(per_field[f] for f in element_text_fields(config.loss))


def text_needs(batch: dict[str, np.ndarray], loss_cfg: mlc.ConfigDict, vocab_size: int,
               shards: int) -> tuple[int, ...]:
    """A host batch's text needs as one int tuple, ``(free_max, *present)``, for an
    element-wise max over hosts (``models.text_slots.needs``); ``shards``: the batch shards
    this host's rows make."""
    from umg_jax.models import text_slots

    fields = element_text_fields(loss_cfg)
    ids = np.concatenate([batch[TEXT_IDS[f][0]] for f in fields], axis=1)
    valid = np.concatenate([batch[TEXT_IDS[f][1]] for f in fields], axis=1)
    present, free_max = text_slots.needs(ids, valid, vocab_size, shards)
    return (free_max, *present.astype(int).tolist())


def text_budgets(config: mlc.ConfigDict, vocab_size: int, shards: int,
                 needs: tuple[int, ...] | None = None) -> tuple[int, int]:
    """``(K, Kf)`` for the step: the configured budgets (``loss.text_vocab_budget``,
    ``loss.free_text_frac``), or with ``needs`` (:func:`text_needs`, agreed over hosts) the
    smallest ones that hold the batch."""
    from umg_jax.models import text_slots

    slots = config.batch_size // shards * element_slots(config)
    configured = text_slots.budgets(slots, vocab_size, shards,
                                    int(config.loss.get("text_vocab_budget", 0)),
                                    float(config.loss.free_text_frac))
    if needs is None:
        return configured
    return text_slots.fit(sum(needs[1:]), needs[0], configured, vocab_size, slots, shards)


# Model parts as ``jax.named_scope`` names in the step's ops (``hlo_stats.breakdown``).
PARTS = ("image_tower", "caption_text", "element_text", "loss", "optimizer")


def model_outputs(model: clip.CLIP, params, batch: dict, loss_cfg: mlc.ConfigDict,
                  text_vocab: jax.Array | None = None, shards: int = 1,
                  text_budgets: tuple[int, int] | None = None) -> dict:
    """Runs both towers on a batch: the captions in one text-tower call, every other text field
    (tags / region / mask texts, shorter context ``Le``) in a second one, which encodes each
    distinct vocabulary text once when ``text_vocab`` (``[V, Le] int32``, the data set's; see
    :func:`text_ids_enabled`) and ``text_budgets`` (:func:`text_budgets`) are given, over
    ``shards`` batch shards.

    Returns ``img [B, E]``, ``dense [B, gh, gw, E]``, ``txt [B, E]``, ``tags_txt [B, T, E]``,
    ``region_txt [B, R, E]``, ``mask_txt [B, M, E]`` (those with a weight), ``scales``, ``biases``,
    and ``text_stats`` (``models.text_slots.encode_slots``'s) on the id path.
    """
    v = {"params": params}
    # Named scopes label the compiled program's ops by model part (``dryrun --breakdown``).
    with jax.named_scope(PARTS[0]):
        out = dict(model.apply(v, batch["image"], method=clip.CLIP.encode_image))
    with jax.named_scope(PARTS[1]):
        out["txt"] = model.apply(v, batch["text"], method=clip.CLIP.encode_text)
    fields = [(f, o) for f, o in needed_text_fields(loss_cfg) if f != "text"]
    if fields:
        with jax.named_scope(PARTS[2]):
            out.update(_element_outputs(model, v, batch, loss_cfg, fields, text_vocab, shards,
                                        text_budgets))
    out.update(model.apply(v, method=clip.CLIP.temperatures))
    return out


def _element_outputs(model, v, batch, loss_cfg, fields, text_vocab, shards, text_budgets
                     ) -> dict:
    """``{output key: [B, n, E]}`` of the tag / region / mask ``fields`` of
    :func:`model_outputs` (plus ``text_stats`` on the id path)."""
    from umg_jax.models import text_slots

    out = {}
    toks = [batch[f] for f, _ in fields]  # each [B, n, Le]
    sizes = [t.shape[1] for t in toks]
    encode = lambda t: model.apply(v, t, method=clip.CLIP.encode_text)  # noqa: E731
    tokens = jnp.concatenate(toks, axis=1)
    if text_vocab is not None and text_budgets is not None:
        ids = jnp.concatenate([batch[TEXT_IDS[f][0]] for f, _ in fields], axis=1)
        valid = jnp.concatenate([batch[TEXT_IDS[f][1]] for f, _ in fields], axis=1)
        emb, out["text_stats"] = text_slots.encode_slots(
            encode, tokens, ids, valid, jnp.asarray(text_vocab), shards=shards,
            k=text_budgets[0], kf=text_budgets[1])
    else:
        emb = encode_deduplicated(encode, tokens,
                                  float(loss_cfg.get("text_dedup_frac", 0.0) or 0.0))
    start = 0
    for (_, name), n in zip(fields, sizes, strict=True):
        out[name] = emb[:, start:start + n]
        start += n
    return out


def encode_deduplicated(encode, tokens: jax.Array, frac: float) -> jax.Array:
    """``encode(tokens [B, n, Le]) -> [B, n, E]``, running the text tower once per *distinct*
    token row when ``frac > 0``.

    Tag / region / mask texts repeat a lot (every "a photo of a cat." in the batch). With
    ``K = frac * B * n`` slots (rounded up to a multiple of 128 so the rows split over any
    device count), the distinct rows are encoded and gathered back; the gather's transpose sums
    the gradients of repeated texts, so values and gradients equal the plain path (up to float
    summation order). A batch with more than ``K`` distinct rows takes the plain path (a
    ``lax.cond``): never a wrong answer, only no saving. Padded (all-zero) rows count as one.
    """
    b, n, le = tokens.shape
    total = b * n
    k = min(total, -(-int(np.ceil(frac * total)) // 128) * 128) if frac > 0 else total
    if k >= total:
        return encode(tokens)
    flat = tokens.reshape(total, le)
    # Full-size unique (one sort): the count is exact even when it exceeds K.
    uniq, inverse = jnp.unique(flat, axis=0, size=total, fill_value=0, return_inverse=True)
    inverse = inverse.reshape(total)
    n_unique = jnp.max(inverse) + 1

    def dedup(_):
        emb = encode(uniq[None, :k])[0]  # [K, E]
        return jnp.take(emb, inverse, axis=0).reshape(b, n, -1)

    # Under autodiff a cond's forward returns the residuals of *both* branches (the untaken
    # one's zero-filled): the plain branch's activations for every text, written each step.
    # Rematerialised branches save only their inputs; the backward re-runs the taken one.
    return jax.lax.cond(n_unique <= k, jax.checkpoint(dedup),
                        jax.checkpoint(lambda _: encode(tokens)), None)


def peft_enabled(config: mlc.ConfigDict) -> bool:
    """The backbone is adapted by PEFT (LoRA factors or bottleneck adapters)."""
    return bool(config.get("peft", {}).get("enabled", False))


def lora_enabled(config: mlc.ConfigDict) -> bool:
    return peft_enabled(config) and config.peft.get("method", "lora") == "lora"


def adapters_enabled(config: mlc.ConfigDict) -> bool:
    return peft_enabled(config) and config.peft.get("method", "lora") == "adapter"


# Under peft.method="adapter": every backbone param except the adapters' (and the decoder's).
ADAPTER_FROZEN = r"(base/)?(?!.*/adapter/)(visual|text|logit_).*"


def without_adapters(tree):
    """``tree`` (nested dicts) with every ``adapter`` sub-tree removed: what a plain CLIP
    checkpoint holds."""
    if not isinstance(tree, dict):
        return tree
    return {k: without_adapters(v) for k, v in tree.items() if k != "adapter"}


def fill(restored, fresh):
    """``fresh`` with every leaf that ``restored`` has replaced by the restored one (adapters
    missing from a pretrained checkpoint keep their fresh, identity init)."""
    if not isinstance(fresh, dict):
        return restored
    return {k: fill(restored[k], v) if k in restored else v for k, v in fresh.items()}


def seg_enabled(config: mlc.ConfigDict) -> bool:
    return bool(config.get("seg", {}).get("enabled", False))


def nested_params(config: mlc.ConfigDict) -> bool:
    """True when the train state's params are ``{"base": CLIP, ...}`` (frozen backbone)."""
    return lora_enabled(config) or seg_enabled(config)


def init_params(config: mlc.ConfigDict, rng: jax.Array, base=None):
    """The trainable parameter tree: CLIP params, or with a frozen backbone ``{"base": CLIP,
    "lora": LoRA factors (PEFT on), "seg": mask decoder (seg on)}`` (``base``: given backbone
    params, e.g. imported; else initialised from ``rng``)."""
    k_base, k_lora = jax.random.split(rng)
    if base is None:
        base = clip.init_params(config.model, k_base)
    elif config.model.vision.get("adapter_dim", 0) or config.model.text.get("adapter_dim", 0):
        base = fill(base, clip.init_params(config.model, k_base))  # imported: no adapters yet
    if not nested_params(config):
        return base
    out = {"base": base}
    if lora_enabled(config):
        from umg_jax.peft import lora

        out["lora"] = lora.init(base, config.peft, k_lora)
    if seg_enabled(config):
        from umg_jax.models import mask_decoder

        out["seg"] = mask_decoder.init_params(config, jax.random.fold_in(rng, 2))
    return out


def effective_params(params, config: mlc.ConfigDict):
    """The CLIP params the model runs with (LoRA deltas applied when PEFT is on)."""
    if not nested_params(config):
        return params
    if not lora_enabled(config):
        return params["base"]
    from umg_jax.peft import lora

    return lora.apply(params["base"], params["lora"], config.peft)


def frozen_regexes(config: mlc.ConfigDict) -> tuple[str, ...]:
    """Param-path regexes the optimizer must not update (the backbone under PEFT / seg)."""
    own = tuple(config.optim.get("freeze", ()) or ())
    if adapters_enabled(config):
        return own + (ADAPTER_FROZEN,)
    return own + (("base/.*",) if nested_params(config) else ())


def make_loss_fn(model: clip.CLIP, config: mlc.ConfigDict, mesh: Mesh,
                 seg_vocab: dict | None = None, text_vocab: np.ndarray | None = None):
    """``loss_fn(params, batch) -> (total, metrics)``; ``seg_vocab`` (:func:`train_vocabulary`)
    is required by segmentation-head configs and unused otherwise; ``text_vocab`` ``[V, Le]``
    int32: the tokens of the data set's text vocabulary (:func:`model_outputs`)."""
    if seg_enabled(config):
        if seg_vocab is None:
            raise ValueError("a segmentation-head config needs its training vocabulary: pass "
                             "seg_vocab=train_vocabulary(config, categories)")
        return make_seg_loss_fn(model, config, seg_vocab)
    shards = sharding.batch_size_divisor(mesh)
    if text_vocab is not None and not text_ids_enabled(config.loss):
        text_vocab = None

    def loss_fn(params, batch, budgets: tuple[int, int] | None = None):
        """``budgets``: static ``(K, Kf)`` of the id path (default: as configured)."""
        if text_vocab is not None and budgets is None:
            budgets = text_budgets(config, len(text_vocab), shards)
        outputs = model_outputs(model, effective_params(params, config), batch, config.loss,
                                text_vocab, shards, budgets)
        with jax.named_scope("loss"):
            total, metrics = umg_losses.umg_loss(outputs, batch, config.loss, mesh)
        return total, {**metrics, **outputs.get("text_stats", {})}

    return loss_fn


def make_seg_loss_fn(model: clip.CLIP, config: mlc.ConfigDict, vocab: dict):
    """Loss of the segmentation head on the frozen backbone: the backbone (with LoRA, if on)
    gives normalised dense features and the training vocabulary's (``vocab``,
    :func:`train_vocabulary`) text embeddings; without LoRA they are ``stop_gradient``-ed so no
    backward pass runs through the backbone at all."""
    from umg_jax.losses import segmentation as seg_losses
    from umg_jax.models.mask_decoder import MaskDecoder

    tokens = jnp.asarray(vocab["tokens"])  # [C, K, L]
    class_map = jnp.asarray(vocab["class_map"])
    decoder = MaskDecoder(config.seg, config.model.embed_dim)
    norm = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)  # noqa

    def loss_fn(params, batch):
        cp = effective_params(params, config)
        if not peft_enabled(config):
            cp = jax.lax.stop_gradient(cp)
        v = {"params": cp}
        dense = norm(model.apply(v, batch["image"], method=clip.CLIP.encode_image)["dense"])
        text = norm(norm(model.apply(v, tokens, method=clip.CLIP.encode_text)).mean(1))
        out = decoder.apply({"params": params["seg"]}, batch["image"], dense)
        return seg_losses.seg_loss(out, text, batch, class_map, config.seg)

    return loss_fn


def train_vocabulary(config: mlc.ConfigDict, categories: list[dict]) -> dict:
    """The segmentation head's training vocabulary: ``categories`` (the training data's
    ``meta.json`` list, ``{"name": ...}`` each) minus ``seg.holdout``. Returns ``names [C]``,
    ``seen [K]`` bool per data-set category, ``class_map [K]`` int32 (data-set category ->
    vocabulary index, -1 held out), ``tokens [C, T, L]`` int32 (prompt templates of
    ``evaluators.common.DEFAULT_TEMPLATES``). Pure: it reads and writes nothing."""
    from umg_jax.data import tokenizer
    from umg_jax.evaluators.common import DEFAULT_TEMPLATES

    names = [c["name"] for c in categories]
    unknown = sorted(set(config.seg.holdout) - set(names))
    if unknown:
        raise ValueError(f"seg.holdout names {unknown} are not categories of the training data "
                         f"({', '.join(names)})")
    seen = np.array([n not in set(config.seg.holdout) for n in names])
    if not seen.any():
        raise ValueError("seg.holdout removes every category: nothing to train on")
    class_map = np.where(seen, np.cumsum(seen) - 1, -1).astype(np.int32)
    train_names = [n for n, s in zip(names, seen, strict=True) if s]
    tok = tokenizer.for_model(config.model.text)
    tokens = np.stack([tok([t.format(n) for t in DEFAULT_TEMPLATES]) for n in train_names])
    return {"names": train_names, "seen": seen, "class_map": class_map, "tokens": tokens}


def vocabulary_shapes(config: mlc.ConfigDict, num_classes: int) -> dict:
    """A :func:`train_vocabulary` of ``num_classes`` placeholder classes (zero tokens): what a
    compile-only caller (``dryrun``) hands the step, whose shapes alone it needs."""
    from umg_jax.evaluators.common import DEFAULT_TEMPLATES

    shape = (num_classes, len(DEFAULT_TEMPLATES), config.model.text.context_length)
    return {"names": [f"class {i}" for i in range(num_classes)],
            "seen": np.ones(num_classes, bool), "class_map": np.arange(num_classes, dtype=np.int32),
            "tokens": np.zeros(shape, np.int32)}


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
    # Three separate scalars: one shared buffer would be donated three times by the train step.
    def zero():
        return jnp.zeros((), jnp.int32)

    return TrainState(step=zero(), params=params, opt_state=tx.init(params), nonfinite=zero(),
                      skipped=zero())


def abstract_state(config: mlc.ConfigDict, tx: optax.GradientTransformation) -> TrainState:
    """Shapes of the whole train state, nothing allocated."""
    return jax.eval_shape(lambda: init_state(init_params(config, jax.random.key(0)), tx))


def state_shardings(abstract: TrainState, mesh: Mesh, rules=None) -> TrainState:
    """Param rules (regex over paths) applied to params and, by the same paths, to the optimizer
    moments; scalars are replicated."""
    rules = sharding.DEFAULT_RULES if rules is None else rules
    return sharding.param_shardings(abstract, mesh, rules)


def make_train_step(model: clip.CLIP, tx: optax.GradientTransformation, config: mlc.ConfigDict,
                    mesh: Mesh, state_sharding: TrainState, batch_shapes: dict,
                    seg_vocab: dict | None = None, text_vocab: np.ndarray | None = None):
    """Jitted ``train_step(state, batch) -> (state, metrics)`` with the state donated.
    ``seg_vocab``: the head's :func:`train_vocabulary` (segmentation-head configs only);
    ``text_vocab``: ``[V, Le] int32`` tokens of the data set's text vocabulary
    (``data.pipeline.text_vocab_tokens``), for :func:`model_outputs`.

    A non-finite loss or gradient norm skips the update (params and optimizer state unchanged),
    increments ``nonfinite`` (reset to 0 by the next good step) and ``skipped``; the host loop
    stops the run after ``config.train.max_nonfinite`` consecutive skips.
    """
    loss_fn = make_loss_fn(model, config, mesh, seg_vocab, text_vocab)
    cap = config.model.logit_scale_max

    def step_fn(state: TrainState, batch: dict, text_budgets: tuple[int, int] | None = None):
        # The abstract mesh lets the model pin its activations to the batch axes
        # (sharding.constrain_batch); the shard_map losses name the mesh explicitly.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, batch, **({"budgets": text_budgets} if text_budgets else {}))
        gnorm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        with jax.named_scope("optimizer"):
            updates, new_opt = tx.update(grads, state.opt_state, state.params)
            new_params = optax.apply_updates(state.params, updates)
            # CLIP clamps the learned temperature to <= ln(100) after each step.
            new_params = clamp_logit_scales(new_params, cap)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
            new_state = TrainState(
                step=state.step + 1,
                params=keep(new_params, state.params),
                opt_state=keep(new_opt, state.opt_state),
                nonfinite=jnp.where(ok, 0, state.nonfinite + 1),
                skipped=state.skipped + (~ok).astype(jnp.int32),
            )
        metrics = dict(metrics, loss=loss, grad_norm=gnorm, skipped=new_state.skipped,
                       nonfinite=new_state.nonfinite)
        return new_state, metrics

    batch_sharding = {k: NamedSharding(mesh, P(sharding.BATCH_AXES)) for k in batch_shapes}
    # ``text_budgets`` (static): a batch whose texts need larger budgets than configured gets
    # its own compile (step.text_budgets); seg-head loss functions take no budgets.
    return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, NamedSharding(mesh, P())),
                   donate_argnums=(0,), static_argnums=(2,))


def clamp_logit_scales(params, cap: float):
    """Clamps every ``logit_scale*`` top-level CLIP param to ``<= cap``."""
    if "base" in params:  # frozen-backbone tree: the scales live in the base
        return dict(params, base=clamp_logit_scales(params["base"], cap))
    return {k: (jnp.minimum(v, cap) if k.startswith("logit_scale") else v)
            for k, v in params.items()}
