"""Shared config sections; every model config (tiny.py, vit_b16.py, ...) composes these.

Each function returns one ``ml_collections.ConfigDict`` section with every knob commented. A model
config calls them and overrides what differs. Imported by the configs (``from umg_jax.configs
import common``) and by the inference API, so this file must stay import-light.
"""

import math

import ml_collections as mlc


def model_config(
    *,
    image_size: int,
    patch_size: int,
    vision_width: int,
    vision_layers: int,
    vision_heads: int,
    text_width: int,
    text_layers: int,
    text_heads: int,
    embed_dim: int,
    context_length: int = 77,
    vocab_size: int = 49408,
    act: str = "quick_gelu",
) -> mlc.ConfigDict:
    """The two towers (OpenAI CLIP / open_clip layout) and the dense-feature head."""
    m = mlc.ConfigDict()
    m.embed_dim = embed_dim  # joint embedding size E
    m.act = act  # "quick_gelu" (OpenAI weights) or "gelu" (exact erf; open_clip/LAION, EVA)
    m.ln_eps = 1e-5  # LayerNorm epsilon; PyTorch CLIP uses 1e-5 (Flax default 1e-6 breaks parity)
    m.dtype = "float32"  # activation / matmul dtype ("float32" or "bfloat16"); params stay float32
    m.remat = False  # nn.remat around every residual block (memory for recompute)
    m.remat_policy = "nothing_saveable"  # jax.checkpoint_policies name used when remat=True
    m.scan = False  # nn.scan over blocks: params get a leading layer axis, compile time O(1)
    # Attention implementation: "auto" = the fastest the compile target offers for each shape
    # (Pallas flash on TPU, cuDNN on GPU, a custom VJP on CPU; umg_jax/ops/attention.py), or
    # "xla" = plain XLA everywhere (e.g. a node whose cuDNN misbehaves, or to compare).
    m.attention = "auto"
    m.logit_scale_init = math.log(1 / 0.07)  # log-space temperature at init (CLIP)
    m.logit_scale_max = math.log(100.0)  # clamp for the log scale (CLIP clamps at 100)
    m.logit_bias_init = None  # float -> learn a logit bias (sigmoid loss; SigLIP uses -10)
    # Own learned temperature (and bias) for tags / region / mask / pixel terms (FG-CLIP style);
    # off = all granularities share CLIP's logit_scale (keeps the exact CLIP parameter count).
    m.granularity_scales = False
    # Dense (patch) features in the joint space, consumed by the region / pixel losses:
    # "maskclip": the last block's attention is replaced by its value path for the patch tokens
    # (MaskCLIP / CLIPSelf); "plain": the last block as is. Global embedding is unaffected.
    # With vision.pool="map" (SigLIP) it must be "maskclip": the MAP head's value path per token.
    m.dense_mode = "maskclip"
    m.vision = mlc.ConfigDict()
    m.vision.image_size = image_size  # input resolution (square)
    m.vision.patch_size = patch_size  # patch (conv stride) size
    m.vision.merge_after = -1  # token merging (ToMe) after this block; -1 = off (needs scan off)
    m.vision.merge_ratio = 0.0  # fraction of patch tokens merged away (<= 0.5), grid restored
    m.vision.merge_at_inference = False  # False: inference / evaluation run all tokens
    m.vision.merge_proportional = True  # ToMe proportional attention (log-size key bias)
    m.vision.width = vision_width  # transformer width D
    m.vision.layers = vision_layers  # number of residual blocks
    m.vision.heads = vision_heads  # attention heads (head dim = width / heads)
    m.vision.mlp_ratio = 4.0  # MLP hidden = mlp_ratio * width
    m.vision.mlp_dim = 0  # explicit MLP hidden width, overrides mlp_ratio (SigLIP So400m: 4304)
    m.vision.adapter_dim = 0  # bottleneck adapter after every block (peft.method="adapter")
    # Tower family switches (CLIP defaults; a SigLIP import sets class_token=False, ln_pre=False,
    # patch_bias=True, pool="map", proj="bias" or "none"):
    m.vision.class_token = True  # prepend a class token (its row leads the positional table)
    m.vision.ln_pre = True  # LayerNorm before the blocks
    m.vision.patch_bias = False  # bias in the patch embedding
    m.vision.pool = "cls"  # global embedding: "cls" token or "map" attention-pooling head
    m.vision.proj = "plain"  # joint-space projection: "plain" (no bias), "bias", "none"
    # Pixel normalisation the weights expect: CLIP's constants; SigLIP maps to [-1, 1] (0.5s).
    m.vision.pixel_mean = (0.48145466, 0.4578275, 0.40821073)
    m.vision.pixel_std = (0.26862954, 0.26130258, 0.27577711)  # (SigLIP: 0.5, 0.5, 0.5)
    m.text = mlc.ConfigDict()
    m.text.context_length = context_length  # token sequence length L
    m.text.vocab_size = vocab_size  # CLIP BPE vocabulary (49408)
    m.text.width = text_width  # transformer width W
    m.text.layers = text_layers  # number of residual blocks
    m.text.heads = text_heads  # attention heads
    m.text.mlp_ratio = 4.0  # MLP hidden = mlp_ratio * width
    m.text.mlp_dim = 0  # explicit MLP hidden width, overrides mlp_ratio
    m.text.adapter_dim = 0  # bottleneck adapter after every block (peft.method="adapter")
    m.text.causal = True  # causal mask (CLIP); False: bidirectional (SigLIP)
    m.text.pool = "eot"  # "eot": end-of-text token = largest id (CLIP); "last": last position
    m.text.proj_bias = False  # bias in text_projection (SigLIP: True)
    m.text.pad_id = 0  # padding id (CLIP 0; SigLIP 1, rows padded to the full context)
    # "clip": the embedded CLIP BPE; else a SentencePiece .model file (SigLIP; eos appended, kept
    # when truncating, rows padded with pad_id; text lower-cased without punctuation).
    m.text.tokenizer = "clip"
    return m


def siglip_towers(m: mlc.ConfigDict, vision_proj: str = "none") -> mlc.ConfigDict:
    """Switches a ``model_config`` section to big_vision SigLIP towers (what a SigLIP ``.npz``
    import writes, umg_jax/interop/big_vision.py); ``vision_proj``: "none" (SigLIP has no image
    head) or "bias" (an ``img/head``). The SentencePiece file goes in ``m.text.tokenizer``."""
    m.act = "gelu_tanh"  # big_vision's nn.gelu is the tanh approximation
    m.ln_eps = 1e-6  # flax LayerNorm default
    m.logit_scale_init = math.log(10.0)  # SigLIP's init t' = log 10
    m.logit_bias_init = -10.0  # SigLIP's init b
    v, t = m.vision, m.text
    v.class_token, v.ln_pre, v.patch_bias, v.pool, v.proj = False, False, True, "map", vision_proj
    v.pixel_mean, v.pixel_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    t.causal, t.pool, t.proj_bias, t.pad_id = False, "last", True, 1
    t.tokenizer = ""  # SentencePiece .model of the checkpoint (required before use)
    return m


def data_config() -> mlc.ConfigDict:
    """Input pipeline (owner: umg_jax/data)."""
    d = mlc.ConfigDict()
    d.path = ""  # directory of ArrayRecord shards + meta.json; "" -> embedded synthetic world
    d.eval_path = ""  # held-out shards for evaluation; "" -> synthetic held-out split
    d.val_path = ""  # validation shards (inference thresholds are chosen here); "" -> synthetic
    d.synthetic_num_train = 2048  # examples generated on first use when path == ""
    d.synthetic_num_eval = 256  # held-out synthetic examples
    d.synthetic_seed = 0  # seed of the generated world
    d.synthetic_image_size = 80  # side of the generated scenes (crops then resize to the model's)
    d.synthetic_num_shards = 4  # ArrayRecord shards of the generated splits
    # Le: token context of tag / region / mask texts (short phrases; the caption keeps the full
    # context). The text tower is causal, so texts that fit embed exactly as at full length, and
    # the text tower's cost for those 20 texts per example drops by L / Le.
    d.element_context_length = 32
    # Cut the token columns that are padding in the whole global batch (lengths rounded up to
    # 8, 12, 16, 24, 32, 48, ...: a handful of compiled shapes): exact for the causal CLIP tower.
    d.trim_text = True
    d.max_tags = 4  # T: image tags per example (padded)
    d.text_vocab_size = 0  # dry run only: size of the text vocabulary the data would carry
    d.max_regions = 8  # R: regions per example (padded)
    d.max_masks = 8  # M: masks per example (padded)
    d.min_region_frac = 0.02  # train: drop regions whose box covers less of the final image
    d.min_mask_frac = 0.002  # train: drop masks covering less of the final image (eval keeps >0)
    d.crop_scale = (0.6, 1.0)  # random-resized-crop area range (train only)
    d.crop_ratio = (3 / 4, 4 / 3)  # random-resized-crop aspect-ratio (w / h) range (train only)
    d.flip = True  # random horizontal flip (train only)
    d.prompt_template = "a photo of a {}."  # text of a tag (image tags; uncaptioned regions/masks)
    d.tag_text_prob = 0.5  # train: chance that a captioned region / mask gets a tag prompt
    d.shuffle_seed = 0  # added to the run seed for the Grain shuffle / augmentation seed
    d.num_workers = 0  # Grain worker processes for decode + augment (0 = in-process)
    d.read_threads = 2  # in-process (or per-worker) decode threads of Grain's ReadOptions
    d.prefetch_buffer = 16  # examples decoded ahead per reading pipeline
    d.worker_buffer = 2  # examples buffered per worker process (num_workers > 0)
    d.strict = False  # raise at the first bad record instead of dropping + counting it
    return d


def loss_config() -> mlc.ConfigDict:
    """Multi-granularity losses (owner: umg_jax/losses). Equal texts are always positives of each
    other (multi-positive targets); padded entries are neither anchors nor negatives."""
    lo = mlc.ConfigDict()
    lo.kind = "softmax"  # "softmax" (symmetric CLIP InfoNCE) or "sigmoid" (SigLIP; needs
    #                      model.logit_bias_init); temperatures: model.granularity_scales
    lo.w_image = 1.0  # image <-> caption
    lo.w_tags = 0.5  # image <-> tag prompts of the global batch
    lo.w_region = 1.0  # RoIAlign region embedding <-> region texts of the global batch
    lo.w_mask = 1.0  # mask-pooled embedding <-> mask texts of the global batch
    lo.w_pixel = 0.5  # per-patch classification against the same image's mask texts
    # How devices see the other devices' texts: "all_gather" (one collective; [N, E] texts + their
    # cotangent per device) or "ring" (sigmoid only: D ppermute steps with a custom backward ring,
    # one [N / D, E] block in flight; memory independent of the device count).
    lo.exchange = "all_gather"
    # dtype of the texts all-gathered by the loss and of their cotangent ("bfloat16" halves the
    # loss's largest buffers at pod scale: global region / mask texts x E; logits stay float32)
    lo.exchange_dtype = "float32"
    lo.chunk_size = 512  # gathered text rows per scan step of the sharded loss (memory knob;
    #                      benchmarks/loss_memory.py: 512 -> 311 MiB/device at B=64k, E=512)
    # Encode each distinct tag / region / mask text of the batch once: room for this fraction of
    # them (0 = off); a batch with more distinct texts falls back to encoding all (exact either
    # way, step.encode_deduplicated). Pays off when texts repeat (tag prompts, small vocabularies).
    lo.text_dedup_frac = 0.0
    # Tag prompts of the data set's vocabulary (meta.json text_vocab) travel as ids; with a budget
    # for free-form texts below 1, the step encodes each distinct vocabulary text once and each
    # batch shard packs its free-form texts (models/text_slots.py; exact, no global sort; a batch
    # over a budget encodes every slot and is reported once).
    lo.free_text_frac = 1.0  # free-form element texts per batch shard / its slots (1.0 = off)
    lo.text_vocab_budget = 0  # distinct vocabulary texts encoded per step (0 = whole vocabulary)
    lo.roi_size = 2  # RoIAlign output bins per side (averaged to one embedding)
    lo.roi_sampling_ratio = 2  # bilinear samples per bin per side
    return lo


def optim_config() -> mlc.ConfigDict:
    """Optimizer and schedule (owner: umg_jax/optim.py)."""
    o = mlc.ConfigDict()
    o.lr = 5e-4  # peak learning rate
    o.warmup_steps = 50  # linear warmup
    o.end_lr_frac = 0.0  # cosine decays to lr * end_lr_frac
    o.b1 = 0.9  # AdamW beta1
    o.b2 = 0.98  # AdamW beta2 (CLIP)
    o.eps = 1e-6  # AdamW epsilon (CLIP)
    o.weight_decay = 0.1  # decoupled decay; masked off for norms, biases, embeddings, scales
    o.grad_clip = 1.0  # global-norm clip (0 = off)
    o.layer_decay = 1.0  # layer-wise lr decay factor (1.0 = off)
    o.grad_accum = 1  # micro-batches per optimizer step (optax.MultiSteps; 1 = off)
    o.freeze = ()  # fullmatch regexes over param paths to freeze, e.g. ("text/.*",) for LiT
    o.no_decay_extra = ()  # extra fullmatch regexes exempt from weight decay (umg_jax/optim.py)
    return o


def ckpt_config() -> mlc.ConfigDict:
    """Checkpointing (owner: umg_jax/checkpoint.py)."""
    c = mlc.ConfigDict()
    c.every_steps = 100  # save every N steps (plus a forced save at the end of the run)
    c.keep = 2  # keep the K most recent checkpoints
    c.keep_best_metric = ""  # metric (e.g. "eval/retrieval_r1") whose best step is kept; ""=off
    c.best_mode = "max"  # "max" or "min" for keep_best_metric
    c.async_save = True  # save in a background thread (device->host copy is still blocking)
    return c


def log_config() -> mlc.ConfigDict:
    """Metrics and console logging (owner: umg_jax/metrics.py)."""
    lg = mlc.ConfigDict()
    lg.every_steps = 10  # write metrics / progress line every N steps (<= 16 on fake devices)
    lg.tensorboard = True  # also write TensorBoard event files (tensorboardX) into the workdir
    # Peak FLOP/s of all the run's devices together, for MFU: > 0 as given, 0 = no MFU, -1 = the
    # spec bf16 peak of the device kind on TPU / GPU (umg_jax/accelerators.toml), measured once
    # at start on CPU (a matmul in model.dtype on every device, < 1 s).
    lg.peak_flops = -1.0
    return lg


def mesh_config() -> mlc.ConfigDict:
    """Device mesh and parameter sharding (owner: umg_jax/sharding.py). The product of the three
    sizes must equal the device count; the batch is split over data x fsdp."""
    me = mlc.ConfigDict()
    me.data = -1  # data-parallel axis size (-1 = all remaining devices)
    me.fsdp = 1  # fully-sharded data-parallel axis size (params split, batch also split over it)
    me.tensor = 1  # tensor-parallel axis size (attention heads / MLP hidden)
    return me


def train_config() -> mlc.ConfigDict:
    """Training-loop behaviour (owner: umg_jax/train.py)."""
    t = mlc.ConfigDict()
    t.max_nonfinite = 5  # stop after this many non-finite losses in a row (updates are skipped)
    t.time_budget_s = 0.0  # > 0: stop (with a checkpoint) after this many seconds of training
    return t


def init_config() -> mlc.ConfigDict:
    """Where the parameters start from."""
    i = mlc.ConfigDict()
    # A pretrained CLIP to start from: an import dir (interop.import_torch), a training workdir
    # (its latest step) or a params checkpoint; "" = random init. (Not "init.from": `from` is a
    # Python keyword, so --config.init.from=... cannot be parsed.)
    i.checkpoint = ""
    return i


def peft_config() -> mlc.ConfigDict:
    """Parameter-efficient tuning (owner: umg_jax/peft). On: the backbone is frozen; only LoRA
    factors (checkpoints hold {"base", "lora"}; export / inference merge them) or bottleneck
    adapters (model.{vision,text}.adapter_dim > 0; cannot merge into plain CLIP weights) train."""
    p = mlc.ConfigDict()
    p.enabled = False  # PEFT on: the backbone frozen except what `method` adds
    p.method = "lora"  # "lora" (kernels matched by targets) or "adapter" (bottleneck adapters)
    p.rank = 8  # LoRA rank r
    p.alpha = 16.0  # LoRA scale numerator: delta = (alpha / rank) * A @ B
    p.targets = (r"attn/(query|key|value|out)/kernel$", r"mlp/c_(fc|proj)/kernel$")  # regexes
    return p


def seg_config() -> mlc.ConfigDict:
    """Open-vocabulary segmentation head on the frozen backbone (owner: umg_jax/models/
    mask_decoder.py, losses/segmentation.py, evaluators/segmentation.py). On: the train step
    trains only the decoder (plus LoRA factors if peft.enabled); checkpoints hold
    {"base", "seg"}."""
    s = mlc.ConfigDict()
    s.enabled = False  # train / evaluate the mask decoder instead of the UMG-CLIP losses
    s.num_queries = 16  # N learned queries (>= segments per image)
    s.width = 128  # decoder width D
    s.layers = 2  # decoder layers (cross-attention, self-attention, MLP)
    s.heads = 4  # attention heads of the decoder
    s.mask_stride = 4  # masks predicted at image_size / mask_stride (power of two)
    s.stem_channels = 32  # conv stem on the raw image for sharp mask boundaries (0 = off)
    s.pool_pixels = True  # classify queries also from pixel features pooled under their masks
    s.holdout = ()  # category names kept out of training (zero-shot evaluation on them)
    s.w_class = 2.0  # class cross-entropy weight (also in the matching cost)
    s.w_bce = 5.0  # mask sigmoid-BCE weight
    s.w_dice = 5.0  # mask dice weight
    s.void_weight = 0.1  # class-loss weight of unmatched queries (target "void")
    s.unlabeled_not_void = True  # no "void" target for unmatched queries on unlabeled pixels
    s.ensemble = True  # classify masks with the head x frozen mask-pooled geometric ensemble
    s.ensemble_alpha = 0.4  # frozen-backbone exponent on seen classes (FC-CLIP)
    s.ensemble_beta = 0.8  # frozen-backbone exponent on unseen classes (FC-CLIP)
    s.pixel_weight = 0.0  # ensemble semantic map: weight of the frozen per-pixel log-probs
    s.object_threshold = 0.8  # panoptic: min class probability of a kept query (Mask2Former)
    s.overlap_threshold = 0.8  # panoptic: min fraction of its own mask a query must keep
    s.calibrate = True  # at training's end, choose thresholds and pixel_weight on data.val_path
    return s


def eval_config() -> mlc.ConfigDict:
    """Periodic evaluation during training (owner: umg_jax/evaluate.py)."""
    e = mlc.ConfigDict()
    e.every_steps = 0  # run the evaluators every N steps (0 = only via umg_jax.evaluate)
    e.num_examples = 256  # held-out examples per evaluation
    e.batch_size = 64  # evaluation batch (global)
    return e


TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e")  # slice names of config arguments (GEN-CHIPS)
GPU_CARDS = ("a100", "h100", "h200", "b200")  # GPU names of config arguments (CARD-GPUS)


def slice_batch(arg: str | None, batch_size: int, per_chip_max: dict[str, int]) -> int:
    """The global batch for the TPU slice or GPU node(s) named by the config argument
    ``GEN-CHIPS`` (e.g. ``configs/vit_l.py:v5e-256``; chips, not Cloud's core counts for v4 /
    v5p) or ``CARD-GPUS`` (``configs/vit_l.py:h100-8``: one 8-GPU host, ``h100-16`` two):
    ``batch_size`` when it fits, else the largest per-chip batch the compiler fitted times the
    chips.

    ``per_chip_max``: generation or card -> largest per-chip (per-GPU) batch that fits, measured
    with ``benchmarks/pod_recipes.py`` (memory per chip depends on the per-chip batch, not the
    slice size). No argument: ``batch_size`` unchanged.
    """
    if not arg:
        return batch_size
    gen, _, chips = arg.partition("-")
    known = TPU_GENERATIONS + GPU_CARDS
    if gen not in known or not chips.isdigit() or int(chips) < 1:
        raise ValueError(f"config argument {arg!r}: expected GEN-CHIPS with GEN one of "
                         f"{', '.join(known)}, e.g. v5e-256 or h100-8")
    if gen not in per_chip_max:
        raise ValueError(f"config argument {arg!r}: this config has not been compiled for {gen} "
                         "(python benchmarks/pod_recipes.py --configs NAME --topologies ...); "
                         "set --config.batch_size instead")
    return min(batch_size, per_chip_max[gen] * int(chips))
