"""Config validation before anything is compiled: one clear line per problem."""

from __future__ import annotations

import filecmp
import os

import jax
import ml_collections as mlc

from umg_jax import storage


class ConfigError(ValueError):
    """A config that cannot run; the message is the one line the user sees."""


# Grain reads ArrayRecord shards through local paths: on Cloud TPU / GPU clusters the bucket is
# mounted (Cloud Storage FUSE, as MaxText and grain's docs do; Mountpoint for Amazon S3).
_MOUNT_HINT = {
    "gs": "the data pipeline reads local paths; mount the bucket with Cloud Storage FUSE "
          "(gcsfuse --implicit-dirs {bucket} /mnt/{bucket}) and pass "
          "--config.data.{key}=/mnt/{bucket}/...",
    "s3": "the data pipeline reads local paths; mount the bucket with Mountpoint for Amazon S3 "
          "(mount-s3 {bucket} /mnt/{bucket}) and pass --config.data.{key}=/mnt/{bucket}/...",
}


def validate(config: mlc.ConfigDict, num_devices: int | None = None) -> None:
    """Checks what would otherwise fail deep inside compilation or hours into a run."""
    n = jax.device_count() if num_devices is None else num_devices
    m = config.model
    if m.vision.image_size % m.vision.patch_size:
        raise ConfigError(f"model.vision.image_size {m.vision.image_size} is not a multiple of "
                          f"model.vision.patch_size {m.vision.patch_size}")
    if m.get("attention", "auto") not in ("auto", "xla"):
        raise ConfigError(f"model.attention={m.attention!r}: expected 'auto' (the fastest "
                          "implementation the compile target offers) or 'xla'")
    for tower in ("vision", "text"):
        t = m[tower]
        if t.width % t.heads:
            raise ConfigError(f"model.{tower}.width {t.width} is not divisible by "
                              f"model.{tower}.heads {t.heads}")
    sizes = {a: config.mesh[a] for a in ("data", "fsdp", "tensor")}
    fixed = 1
    for a, s in sizes.items():
        if s == 0 or s < -1:
            raise ConfigError(f"mesh.{a}={s}: axis sizes are positive, or -1 to fill")
        if s != -1:
            fixed *= s
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError("only one mesh axis may be -1")
    if n % fixed:
        raise ConfigError(f"mesh {sizes} does not fit {n} devices ({n} is not a multiple of "
                          f"{fixed})")
    if -1 not in sizes.values() and fixed != n:
        raise ConfigError(f"mesh {sizes} uses {fixed} devices but {n} are present")
    resolved = {a: (n // fixed if s == -1 else s) for a, s in sizes.items()}
    data_par = resolved["data"] * resolved["fsdp"]
    if config.batch_size % data_par:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the data-parallel "
                          f"size {data_par} (mesh data x fsdp)")
    if config.batch_size % jax.process_count():
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the "
                          f"{jax.process_count()} processes")
    if config.loss.kind not in ("softmax", "sigmoid"):
        raise ConfigError(f"loss.kind must be 'softmax' or 'sigmoid', got {config.loss.kind!r}")
    if config.loss.kind == "sigmoid" and m.logit_bias_init is None:
        raise ConfigError("loss.kind='sigmoid' needs model.logit_bias_init (e.g. -10.0)")
    tok = m.text.get("tokenizer", "clip")
    if tok != "clip" and not (tok and storage.path(tok).is_file()):
        raise ConfigError("model.text.tokenizer is empty: this model (SigLIP towers) needs its "
                          "SentencePiece .model file" if not tok else
                          f"model.text.tokenizer {tok!r} does not exist (a SentencePiece .model "
                          "file, or 'clip' for the embedded CLIP BPE)")
    for key in ("path", "eval_path"):
        path = config.data.get(key, "")
        if path and storage.is_remote(path):
            raise ConfigError(f"data.{key} {path} is a bucket path: " + _MOUNT_HINT[path[:2]]
                              .format(bucket=path[5:].split("/")[0], key=key))
        if path and not os.path.isdir(path):
            raise ConfigError(f"data.{key} {path!r} does not exist")
    peft = config.get("peft")
    if peft is not None and peft.get("enabled", False):
        method = peft.get("method", "lora")
        if method not in ("lora", "adapter"):
            raise ConfigError(f"peft.method must be 'lora' or 'adapter', got {method!r}")
        if method == "adapter" and not (m.vision.get("adapter_dim", 0)
                                        or m.text.get("adapter_dim", 0)):
            raise ConfigError("peft.method='adapter' needs model.vision.adapter_dim and/or "
                              "model.text.adapter_dim > 0")
    seg = config.get("seg")
    if seg is not None and seg.get("enabled", False):
        from umg_jax.models.mask_decoder import check_config

        try:
            check_config(seg, m.vision.image_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    init_from = config.get("init", {}).get("checkpoint", "")
    if init_from:
        try:
            storage.check_readable(init_from, "init.checkpoint")
        except storage.StorageError as e:
            raise ConfigError(str(e)) from None
    if init_from:
        check_same_model(m, init_from)
    if config.total_steps <= 0:
        raise ConfigError(f"total_steps must be positive, got {config.total_steps}")
    if config.optim.warmup_steps >= config.total_steps:
        raise ConfigError(f"optim.warmup_steps {config.optim.warmup_steps} must be below "
                          f"total_steps {config.total_steps}")


def _weight_knobs() -> dict:
    """Model knobs that change what the weights compute (shapes, activation, tower switches,
    preprocessing), with their defaults for model configs written before the knob existed.
    Runtime knobs (dtype, remat, scan, merging, adapters, image_size: import resizes) may
    differ."""
    from umg_jax.data.transforms import CLIP_MEAN, CLIP_STD
    from umg_jax.models.clip import CLIP_TOWERS

    knobs = {"act": None, "ln_eps": None, "embed_dim": None, "vision.pixel_mean": CLIP_MEAN,
             "vision.pixel_std": CLIP_STD, "text.pad_id": 0, "text.tokenizer": "clip",
             "text.context_length": None, "text.vocab_size": None}
    for tower in ("vision", "text"):
        knobs.update({f"{tower}.{k}": None for k in ("width", "layers", "heads")})
        knobs[f"{tower}.mlp_dim"] = 0
        knobs.update({f"{tower}.{k}": d for k, d in CLIP_TOWERS[tower].items()})
    knobs["vision.patch_size"] = None
    return knobs


def _knob(m: mlc.ConfigDict, path: str, default):
    *scopes, leaf = path.split(".")
    for s in scopes:
        m = m.get(s, {})
    v = m.get(leaf, default)
    return tuple(v) if isinstance(v, list | tuple) else v


def _same_file(a: str, b: str) -> bool:
    """Two tokenizer specs name the same SentencePiece model: the same file, or equal bytes (a
    workdir or import dir holds its own copy, ``checkpoint.bundle_model_files``)."""
    if "clip" in (a, b):
        return a == b
    if storage.is_remote(a) or storage.is_remote(b):  # compare the bytes
        try:
            return a == b or storage.read_bytes(a) == storage.read_bytes(b)
        except FileNotFoundError:
            return False
    if not (os.path.isfile(a) and os.path.isfile(b)):
        return os.path.realpath(a) == os.path.realpath(b)
    return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)


def check_same_model(m: mlc.ConfigDict, init_from: str) -> None:
    """``config.model`` must compute what the weights in ``init_from`` were made for: compares the
    model config stored beside them (an import's ``model_config.json`` or a workdir's
    ``config.json``; nothing to compare for a bare params checkpoint)."""
    from umg_jax import checkpoint

    try:
        _, cfg_file = checkpoint.locate(init_from)
        if cfg_file is None:
            return
        theirs = checkpoint.read_model_config(cfg_file)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"init.checkpoint: {e}") from None
    for path, default in _weight_knobs().items():
        ours, stored = _knob(m, path, default), _knob(theirs, path, default)
        if path == "text.tokenizer":
            if stored == "" or _same_file(ours, stored):  # "": imported without --tokenizer
                continue
        if ours != stored:
            raise ConfigError(f"model.{path} is {ours!r} but init.checkpoint was made with "
                              f"{stored!r} ({cfg_file}); pass --config.model.{path}=... or "
                              "use the matching config")
