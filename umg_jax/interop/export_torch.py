r"""Exports our params to PyTorch: open_clip or Hugging Face ``CLIPModel``.

    python -m umg_jax.interop.export_torch WORKDIR_OR_CKPT --format {open_clip,hf} --out PATH \
        [--config configs/x.py] [--step N]

Input (local or on a bucket, ``gs://`` / ``s3://``): an import directory (``import_torch``
output: ``params/`` + ``model_config.json``), a training workdir (``checkpoints/<step>/state``
holding ``{"params", "opt_state", "step"}``, latest step unless ``--step``; model config from
``config.json``), or an orbax checkpoint directory holding ``{"params": ...}`` (give
``--config``). Scanned (stacked) layers are unstacked. Python
API: ``export_params(params, model_cfg, fmt, out)`` takes a param tree directly.

Output (``PATH`` local or ``gs://`` / ``s3://``: written to a local folder, then uploaded):
  ``hf``: ``PATH/config.json`` + ``PATH/model.safetensors`` for
      ``transformers.CLIPModel.from_pretrained(PATH)`` (no torch needed to write it).
  ``open_clip`` (PATH a directory): ``open_clip_model.safetensors``, ``open_clip_config.json``
      (``open_clip.create_model("local-dir:PATH")``) and ``umg-clip.json`` (the bare model config:
      ``open_clip.add_model_config(PATH/"umg-clip.json"); open_clip.create_model("umg-clip")``).
  ``open_clip`` (PATH ending in ``.pt`` / ``.pth`` / ``.bin``): a torch state dict (needs torch)
      with its model config beside it as ``PATH.with_suffix(".json")``.
  UMG extras (per-granularity ``logit_scale_*`` / ``logit_bias*``, which plain CLIP has no slot
  for) go to ``umg_extras.safetensors`` in the directory (``<stem>_umg_extras.safetensors``
  beside a ``.pt``), named in the CLI output; the CLIP part still loads strictly.
  ``umg_config.json`` (``<stem>_umg_config.json`` beside a ``.pt``): everything a reader needs so
  that nothing is guessed (dense mode, per-granularity temperatures, image size, normalisation,
  tokenizer, context length, box / mask pooling, prompt templates); ``umg_jax/interop/
  torch_model.py`` (``UMGTorch.from_export``) reads it with the HF directory. ``--format hf`` of
  a CLIP-BPE model also writes the tokenizer as ``vocab.json`` + ``merges.txt`` (HF
  ``CLIPTokenizer``); a SentencePiece file is copied in as ``tokenizer.model``.
  Bottleneck adapters (``peft.method="adapter"`` runs, which cannot be merged into CLIP weights):
  ``--format hf`` writes them to ``umg_adapters.safetensors`` (HF layer names, torch ``Linear``
  layout) and lists their widths in ``umg_config.json``; ``--format open_clip`` refuses them.
  Segmentation-head runs (``configs/seg_*.py``): the mask decoder goes to
  ``umg_seg_head.safetensors`` (``<stem>_umg_seg_head.safetensors`` beside a ``.pt``; torch layout
  of ``umg_jax/interop/torch_seg.py``'s ``MaskDecoder``), its config, thresholds and training
  vocabulary (``seg_vocab.json``) to ``umg_config.json``'s ``seg_head``.
Errors: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import sys
import warnings
from collections.abc import Callable

import ml_collections as mlc
import numpy as np

from umg_jax.interop import hf_siglip
from umg_jax.interop.mapping import (
    EXTRA_RE,
    EXTRAS_FILE,
    HF_ACTS,
    InteropError,
    flatten,
    flax_to_torch,
    to_canonical,
)

OC_NAME = "umg-clip"
BOS_ID, EOS_ID, PAD_ID = 49406, 49407, 0  # CLIP BPE <start>/<end>; our tokeniser pads with 0
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# A param transform maps the restored param tree to plain CLIP params before conversion (a hook;
# LoRA runs are merged when they are read, checkpoint.load_params). Default: the identity.
ParamTransform = Callable[[dict], dict]


def check_clip_towers(m: mlc.ConfigDict, fmt: str) -> None:
    """Refuses models that open_clip's CLIP / HF's CLIPModel cannot hold (SigLIP towers, an MLP
    width that is not ``mlp_ratio * width``, tanh GELU for open_clip)."""
    from umg_jax.models.clip import CLIP_TOWERS, tower_switches

    odd = [f"{tower}.{k}={v!r}" for tower in CLIP_TOWERS
           for k, v in tower_switches(m, tower).items() if v != CLIP_TOWERS[tower][k]]
    if odd:
        raise InteropError(f"this model has SigLIP-style towers ({', '.join(odd)}); open_clip's "
                           "CLIP and HF's CLIPModel have no place for them (complete SigLIP "
                           "towers export to --format hf as a SiglipModel)")
    for tower in ("vision", "text"):
        t = m[tower]
        if t.get("mlp_dim", 0) and t.mlp_dim != int(t.width * t.mlp_ratio):
            raise InteropError(f"model.{tower}.mlp_dim {t.mlp_dim} != width * mlp_ratio "
                               f"{int(t.width * t.mlp_ratio)}; set mlp_ratio to match")
    if fmt == "open_clip" and m.act == "gelu_tanh":
        raise InteropError("open_clip's CLIP has no tanh GELU (act=gelu_tanh); export --format hf "
                           "(hidden_act gelu_pytorch_tanh)")


# ------------------------------------------------------------------------------ configs
def open_clip_config(m: mlc.ConfigDict, with_logit_bias: bool = False) -> dict:
    """open_clip's model-config schema (``embed_dim``, ``vision_cfg``, ``text_cfg``,
    ``quick_gelu``) for our ``config.model``."""
    v, t = m.vision, m.text
    vision = dict(image_size=v.image_size, layers=v.layers, width=v.width,
                  patch_size=v.patch_size, head_width=v.width // v.heads)
    text = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                heads=t.heads, layers=t.layers)
    if v.mlp_ratio != 4.0:
        vision["mlp_ratio"] = v.mlp_ratio
    if t.mlp_ratio != 4.0:
        text["mlp_ratio"] = t.mlp_ratio
    if float(m.ln_eps) != 1e-5:  # torch LayerNorm's default
        vision["norm_kwargs"] = text["norm_kwargs"] = {"eps": float(m.ln_eps)}
    cfg = dict(embed_dim=m.embed_dim, quick_gelu=m.act == "quick_gelu", vision_cfg=vision,
               text_cfg=text)
    if with_logit_bias:
        cfg["init_logit_bias"] = float(m.logit_bias_init)
    return cfg


def hf_config(m: mlc.ConfigDict) -> dict:
    """``transformers.CLIPConfig`` dict for our ``config.model``."""
    v, t = m.vision, m.text
    common = dict(hidden_act=HF_ACTS[m.act], layer_norm_eps=float(m.ln_eps), attention_dropout=0.0)
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": m.embed_dim,
        "logit_scale_init_value": 2.6592,
        "dtype": "float32",
        "text_config": dict(
            model_type="clip_text_model", vocab_size=t.vocab_size, hidden_size=t.width,
            intermediate_size=int(t.width * t.mlp_ratio), num_attention_heads=t.heads,
            num_hidden_layers=t.layers, max_position_embeddings=t.context_length,
            projection_dim=m.embed_dim, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
            pad_token_id=PAD_ID, **common),
        "vision_config": dict(
            model_type="clip_vision_model", hidden_size=v.width,
            intermediate_size=int(v.width * v.mlp_ratio), num_attention_heads=v.heads,
            num_hidden_layers=v.layers, image_size=v.image_size, patch_size=v.patch_size,
            num_channels=3, projection_dim=m.embed_dim, **common),
    }


# ------------------------------------------------------------------------------ export
def export_params(params: dict, model_cfg: mlc.ConfigDict, fmt: str, out: str,
                  param_transform: ParamTransform | None = None,
                  seg: SegHead | None = None) -> dict:
    """Writes ``params`` (the model's tree, stacked or not) in ``fmt`` (``"open_clip"`` or
    ``"hf"``) to ``out`` (local, or ``gs://`` / ``s3://``: written locally, then uploaded;
    the paths returned are the uploaded ones). ``param_transform``: applied first (LoRA-merge
    hook). Bottleneck
    adapters (``--format hf`` only) go to ``umg_adapters.safetensors``; ``seg``: a segmentation
    head, written to ``umg_seg_head.safetensors`` and described in ``umg_config.json``. Returns
    ``{"files": [...], "extras": [names], "extras_file": path | None}``."""
    from safetensors.numpy import save_file

    from umg_jax import storage

    if fmt not in ("open_clip", "hf"):
        raise InteropError(f"unknown format {fmt!r}; expected open_clip or hf")
    if storage.is_remote(out):
        return _export_remote(params, model_cfg, fmt, out, param_transform, seg)
    if param_transform is not None:
        params = param_transform(params)
    flat = flatten(params)
    adapter_keys = [k for k in flat if "/adapter/" in k]
    outp = pathlib.Path(out)
    if adapter_keys and (fmt != "hf" or hf_siglip.is_siglip(model_cfg)):
        raise InteropError(f"{len(adapter_keys)} bottleneck-adapter params (e.g. "
                           f"{adapter_keys[0]}) cannot be merged into CLIP weights; --format hf "
                           "of a CLIP model writes them to umg_adapters.safetensors for "
                           "umg_jax/interop/torch_model.py (open_clip and SigLIP exports have "
                           "no reader for them)")
    if hf_siglip.is_siglip(model_cfg):
        if seg is not None:
            warnings.warn("the segmentation head of a SigLIP backbone has no PyTorch reader "
                          "(torch_seg runs on a CLIPModel): exporting the backbone only",
                          stacklevel=2)
        return _export_siglip(flat, model_cfg, fmt, outp)
    check_clip_towers(model_cfg, fmt)
    canonical = to_canonical(flat)
    adapters = {k: canonical.pop(k) for k in [k for k in canonical if "/adapter/" in k]}
    _check_config(canonical, model_cfg)
    sd, extras = flax_to_torch(canonical, "classic" if fmt == "open_clip" else "hf")
    files = []
    torch_file = fmt == "open_clip" and outp.suffix in (".pt", ".pth", ".bin")
    if torch_file:
        torch = _torch()
        outp.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: torch.from_numpy(np.array(v, order="C")) for k, v in sd.items()}, outp)
        cfg_path = outp.with_suffix(".json")
        cfg_path.write_text(json.dumps(open_clip_config(model_cfg, "logit_bias" in sd), indent=2))
        files += [outp, cfg_path]
        extras_path = outp.parent / f"{outp.stem}_{EXTRAS_FILE}"
    else:
        outp.mkdir(parents=True, exist_ok=True)
        if fmt == "open_clip":
            oc = open_clip_config(model_cfg, "logit_bias" in sd)
            save_file(sd, str(outp / "open_clip_model.safetensors"), metadata={"format": "pt"})
            pre = {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}
            (outp / "open_clip_config.json").write_text(
                json.dumps({"model_cfg": oc, "preprocess_cfg": pre}, indent=2))
            (outp / f"{OC_NAME}.json").write_text(json.dumps(oc, indent=2))
            files += [outp / "open_clip_model.safetensors", outp / "open_clip_config.json",
                      outp / f"{OC_NAME}.json"]
        else:
            save_file(sd, str(outp / "model.safetensors"), metadata={"format": "pt"})
            (outp / "config.json").write_text(json.dumps(hf_config(model_cfg), indent=2))
            files += [outp / "model.safetensors", outp / "config.json"]
            if model_cfg.text.get("tokenizer", "clip") == "clip":  # the CLIPTokenizer files
                files += write_hf_processor_files(model_cfg, outp)
        extras_path = outp / EXTRAS_FILE
    if extras:
        save_file({k: np.asarray(v, np.float32) for k, v in extras.items()}, str(extras_path),
                  metadata={"format": "umg-extras"})
        files.append(extras_path)
    side = dict(adapters=None, seg_head=None)
    if adapters:
        ad_sd, side["adapters"] = adapter_state_dict(adapters, model_cfg)
        save_file(ad_sd, str(outp / ADAPTERS_FILE), metadata={"format": "umg-adapters"})
        files.append(outp / ADAPTERS_FILE)
    if seg is not None:
        seg_path = (outp.parent / f"{outp.stem}_{SEG_HEAD_FILE}" if torch_file
                    else outp / SEG_HEAD_FILE)
        save_file(seg_head_state_dict(seg.params), str(seg_path),
                  metadata={"format": "umg-seg-head"})
        files.append(seg_path)
        side["seg_head"] = seg_head_config(seg, model_cfg, seg_path.name)
    arch = "hf_clip" if fmt == "hf" else "open_clip"
    files += write_umg_config(model_cfg, canonical, arch, extras,
                              outp.parent if torch_file else outp,
                              f"{outp.stem}_" if torch_file else "", **side)
    return {"files": [str(f) for f in files], "extras": sorted(extras),
            "extras_file": str(extras_path) if extras else None}


def _missing_local_dirs(folder) -> list[str]:
    """The local folders from ``folder`` up that do not exist yet, deepest first (what the
    output check will create); none for a bucket."""
    from umg_jax import storage

    if storage.is_remote(folder):
        return []
    missing, p = [], pathlib.Path(folder)
    while not p.exists() and p != p.parent:
        missing.append(str(p))
        p = p.parent
    return missing


def output_folder(fmt: str, out: str):
    """The folder an export to ``out`` writes into (``epath.Path``, local or remote): ``out``
    itself, or its parent for an open_clip ``.pt`` / ``.pth`` / ``.bin`` file."""
    from umg_jax import storage

    p = storage.path(out)
    return p.parent if fmt == "open_clip" and p.suffix in (".pt", ".pth", ".bin") else p


def _export_remote(params: dict, model_cfg: mlc.ConfigDict, fmt: str, out: str,
                   param_transform: ParamTransform | None, seg: SegHead | None) -> dict:
    """:func:`export_params` to a bucket: the files are written into a local folder that
    ``storage.output_dir`` uploads to the output folder on success."""
    from umg_jax import storage

    target = output_folder(fmt, out)
    with storage.output_dir(target) as local:
        local_out = local if target == storage.path(out) else local / storage.path(out).name
        info = export_params(params, model_cfg, fmt, str(local_out), param_transform, seg)

        def remote(f: str | None) -> str | None:
            return None if f is None else str(target / pathlib.Path(f).relative_to(local))

        return {**info, "files": [remote(f) for f in info["files"]],
                "extras_file": remote(info["extras_file"])}


# ------------------------------------------------------------------------------ adapters, head
ADAPTERS_FILE = "umg_adapters.safetensors"
SEG_HEAD_FILE = "umg_seg_head.safetensors"
HF_LAYERS = {"visual": ("vision", "vision_model.encoder.layers"),
             "text": ("text", "text_model.encoder.layers")}
_ADAPTER_KEY = re.compile(r"^(visual|text)/transformer/resblocks_(\d+)/adapter/(down|up)/"
                          r"(kernel|bias)$")


def adapter_state_dict(adapters: dict[str, np.ndarray], m: mlc.ConfigDict
                       ) -> tuple[dict[str, np.ndarray], dict]:
    """Canonical flat adapter params (``<tower>/transformer/resblocks_<i>/adapter/{down,up}/
    {kernel [in, out], bias}``) -> ``(state dict, umg_config entry)``: keys
    ``<HF tower layers>.<i>.adapter.{down,up}.{weight [out, in], bias}`` float32, the entry
    ``{"act": "gelu_tanh", "dims": {"vision" | "text": bottleneck}}``. Every block of a tower
    with ``adapter_dim > 0`` must have its adapter."""
    sd, dims = {}, {}
    for k, v in adapters.items():
        mt = _ADAPTER_KEY.match(k)
        if mt is None:
            raise InteropError(f"unexpected adapter param {k}")
        tower, i, part, leaf = mt.groups()
        name, prefix = HF_LAYERS[tower]
        v = np.asarray(v, np.float32)
        sd[f"{prefix}.{i}.adapter.{part}.{'weight' if leaf == 'kernel' else 'bias'}"] = (
            np.ascontiguousarray(v.T) if leaf == "kernel" else v)
        if part == "down" and leaf == "kernel":
            dims[name] = int(v.shape[1])
    for name, prefix in HF_LAYERS.values():  # name: the model config's tower section
        dim, n = int(m[name].get("adapter_dim", 0)), int(m[name].layers)
        have = sum(f"{prefix}.{i}.adapter.down.weight" in sd for i in range(n))
        if dims.get(name, 0) != dim or have != (n if dim else 0) or \
                len([k for k in sd if k.startswith(prefix + ".")]) != 4 * have:
            raise InteropError(f"the {name} tower's adapters ({have} of {n} blocks, width "
                               f"{dims.get(name, 0)}) do not match model.{name}.adapter_dim "
                               f"{dim}")
    return sd, {"act": "gelu_tanh", "dims": dims}


@dataclasses.dataclass(frozen=True)
class SegHead:
    """A segmentation head to export: ``params`` (the ``MaskDecoder`` tree), ``config`` (the
    run's ``config.seg`` section) and ``train_labels`` (its training vocabulary, ``None`` if
    unknown: every label then counts as unseen, as in ``umg_jax.inference.Segmenter``)."""

    params: dict
    config: mlc.ConfigDict
    train_labels: list[str] | None = None


def seg_head_state_dict(params: dict) -> dict[str, np.ndarray]:
    """The mask decoder's Flax tree -> the torch state dict of ``torch_seg.MaskDecoder``:
    ``/`` -> ``.``; Dense ``kernel [in, out]`` -> ``weight [out, in]``; attention ``query / key /
    value`` ``kernel [D, H, Dh]`` -> ``[H * Dh, D]`` and ``bias [H, Dh]`` -> ``[H * Dh]``,
    ``out/kernel [H, Dh, D]`` -> ``[D, H * Dh]``; Conv ``kernel [kh, kw, in, out]`` -> ``[out,
    in, kh, kw]``; LayerNorm ``scale`` -> ``weight``; bare params as they are. float32."""
    sd = {}
    for k, v in flatten(params).items():
        v = np.asarray(v, np.float32)
        scope, leaf = k.rsplit("/", 1) if "/" in k else ("", k)
        if leaf == "kernel":
            if v.ndim == 4:
                v = v.transpose(3, 2, 0, 1)
            elif scope.endswith("/out"):
                v = v.reshape(-1, v.shape[-1]).T
            else:
                v = v.reshape(v.shape[0], -1).T
            leaf = "weight"
        elif leaf == "bias":
            v = v.reshape(-1)
        elif leaf == "scale":
            leaf = "weight"
        sd[f"{scope.replace('/', '.')}.{leaf}" if scope else leaf] = np.array(v, order="C")
    return sd


def seg_head_config(seg: SegHead, m: mlc.ConfigDict, file: str) -> dict:
    """The ``seg_head`` entry of ``umg_config.json``: the decoder's sizes and switches, the
    inference thresholds and ensemble exponents, the training vocabulary."""
    from umg_jax.models.mask_decoder import check_config

    c = seg.config
    keys = ("num_queries", "width", "layers", "heads", "mask_stride", "stem_channels",
            "pool_pixels", "ensemble", "ensemble_alpha", "ensemble_beta", "object_threshold",
            "overlap_threshold")
    missing = [k for k in keys if k not in c and k != "pool_pixels"]
    if missing:
        raise InteropError(f"the seg config has no {missing}: not a segmentation-head run")
    try:
        check_config(c, int(m.vision.image_size))
    except ValueError as e:
        raise InteropError(str(e)) from None
    entry = {k: c.get(k, True) if k == "pool_pixels" else c[k] for k in keys}
    entry["pixel_weight"] = float(c.get("pixel_weight", 0.0))  # runs before it: masks only
    entry = {k: v if isinstance(v, bool) else (int(v) if isinstance(v, int) else float(v))
             for k, v in entry.items()}
    return {"file": file, "embed_dim": int(m.embed_dim), **entry,
            # flax.linen defaults of the decoder (LayerNorm epsilon, nn.gelu, Conv padding)
            "ln_eps": 1e-6, "act": "gelu_tanh", "conv_padding": "SAME",
            "train_labels": None if seg.train_labels is None else list(seg.train_labels),
            "holdout": list(c.get("holdout", ()))}


def _export_siglip(flat: dict, model_cfg: mlc.ConfigDict, fmt: str, outp: pathlib.Path) -> dict:
    """SigLIP towers -> an HF ``SiglipModel`` directory (``hf_siglip.py``); UMG's own
    per-granularity temperatures go to the side file as for CLIP."""
    from safetensors.numpy import save_file

    if fmt != "hf":
        raise InteropError("SigLIP towers export to --format hf (transformers SiglipModel) only; "
                           "open_clip's SigLIP is a timm tower, not written")
    canonical = to_canonical(flat)
    extras = {k: np.asarray(v, np.float32) for k, v in canonical.items()
              if "/" not in k and EXTRA_RE.match(k)}
    sd = hf_siglip.to_hf_siglip({k: v for k, v in canonical.items() if k not in extras})
    outp.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(outp / "model.safetensors"), metadata={"format": "pt"})
    (outp / "config.json").write_text(json.dumps(hf_siglip.hf_siglip_config(model_cfg),
                                                 indent=2))
    files = [outp / "model.safetensors", outp / "config.json"]
    if extras:
        save_file(extras, str(outp / EXTRAS_FILE), metadata={"format": "umg-extras"})
        files.append(outp / EXTRAS_FILE)
    files += write_umg_config(model_cfg, canonical, "hf_siglip", extras, outp)
    return {"files": [str(f) for f in files], "extras": sorted(extras),
            "extras_file": str(outp / EXTRAS_FILE) if extras else None}


# ------------------------------------------------------------------------------ umg_config.json
UMG_CONFIG_FILE = "umg_config.json"
UMG_CONFIG_VERSION = 1
# Region / mask pooling of the inference API (umg_jax/inference.py: roi_pool_embed(.., 2, 2),
# mask_pool's eps), written out so that a reader does not have to copy the constants.
ROI_OUTPUT_SIZE, ROI_SAMPLING_RATIO, MASK_EPS = 2, 2, 1e-6


def temperatures(canonical: dict[str, np.ndarray], m: mlc.ConfigDict) -> dict:
    """``{"log_logit_scales": {g: clamped log scale}, "logit_biases": {g: bias} | None}`` for
    every granularity, as ``CLIP.temperatures`` computes them (shared params where a granularity
    has no own one)."""
    from umg_jax.models.clip import GRANULARITIES

    cap = float(m.logit_scale_max)

    def own(name: str, g: str) -> float:
        return float(np.asarray(canonical.get(f"{name}_{g}", canonical[name])).reshape(()))

    scales = {g: min(own("logit_scale", g), cap) for g in GRANULARITIES}
    biases = ({g: own("logit_bias", g) for g in GRANULARITIES}
              if "logit_bias" in canonical else None)
    return {"log_logit_scales": scales, "logit_biases": biases}


def write_hf_processor_files(m: mlc.ConfigDict, out: pathlib.Path) -> list[pathlib.Path]:
    """``preprocessor_config.json`` + ``tokenizer_config.json``: with ``vocab.json`` /
    ``merges.txt`` they make the directory load with ``CLIPProcessor.from_pretrained`` (the
    form every HF pipeline and teacher tool expects). The image processor does what
    ``umg_jax.load(...).preprocess`` does: resize to the model's square input (bilinear, no
    crop), scale to [0, 1], normalise with the config's mean / std."""
    from umg_jax.data import tokenizer as tk
    from umg_jax.inference import MEAN, STD

    size = int(m.vision.image_size)
    pre = {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
           "do_resize": True, "size": {"height": size, "width": size}, "resample": 2,
           "do_center_crop": False, "crop_size": {"height": size, "width": size},
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": [float(v) for v in m.vision.get("pixel_mean", MEAN)],
           "image_std": [float(v) for v in m.vision.get("pixel_std", STD)],
           "do_convert_rgb": True}
    # umg_jax pads with id 0 after <|endoftext|>; HF's CLIP text model pools at the first
    # <|endoftext|>, so what follows it (the pad token) does not change the embedding.
    tok = {"tokenizer_class": "CLIPTokenizer", "processor_class": "CLIPProcessor",
           "model_max_length": int(m.text.context_length), "bos_token": "<|startoftext|>",
           "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
           "pad_token": "<|endoftext|>", "do_lower_case": True,
           "sot_id": tk.SOT_ID, "eot_id": tk.EOT_ID}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    return [out / "preprocessor_config.json", out / "tokenizer_config.json"]


def write_tokenizer_files(m: mlc.ConfigDict, out: pathlib.Path, arch: str) -> tuple[dict, list]:
    """The tokenizer entry of ``umg_config.json`` and the files written for it into ``out``.

    CLIP BPE (``model.text.tokenizer == "clip"``) + HF format: ``vocab.json`` / ``merges.txt``,
    the files of ``transformers.CLIPTokenizer``, built from the merge table umg_jax ships (a
    reader needs no umg_jax). A SentencePiece file is copied in (``bundle_model_files``) and
    named relative to ``out``."""
    from umg_jax import checkpoint
    from umg_jax.data import tokenizer as tk

    t = m.text
    spec = t.get("tokenizer", "clip")
    entry = {"kind": "clip_bpe" if spec == "clip" else "sentencepiece",
             "context_length": int(t.context_length), "pad_id": int(t.get("pad_id", 0)),
             "pool": t.get("pool", "eot"), "sot_id": tk.SOT_ID, "eot_id": tk.EOT_ID}
    if spec != "clip":
        model = {"text": {"tokenizer": spec}}
        checkpoint.bundle_model_files(model, out)
        entry["file"] = model["text"]["tokenizer"]
        return entry, ([out / entry["file"]] if entry["file"] == checkpoint.TOKENIZER_FILE
                       else [])
    if arch != "hf_clip":
        return entry, []
    encoder, ranks, _ = tk.load_tables(tk.DEFAULT_VOCAB_PATH)
    # HF / OpenAI spell the two special symbols <|startoftext|> / <|endoftext|>; same ids.
    names = {tk.SOT_TOKEN: "<|startoftext|>", tk.EOT_TOKEN: "<|endoftext|>"}
    vocab = {names.get(s, s): i for s, i in encoder.items()}
    merges = sorted(ranks, key=ranks.get)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    entry.update(vocab="vocab.json", merges="merges.txt")
    return entry, [out / "vocab.json", out / "merges.txt"]


def umg_config(m: mlc.ConfigDict, canonical: dict[str, np.ndarray], arch: str,
               extras: dict[str, np.ndarray], tokenizer: dict, adapters: dict | None = None,
               seg_head: dict | None = None) -> dict:
    """The ``umg_config.json`` dict: how to run the exported weights as umg_jax does
    (``adapters`` / ``seg_head``: the entries of :func:`adapter_state_dict` /
    :func:`seg_head_config`, ``None`` without)."""
    from umg_jax.inference import DEFAULT_TEMPLATES, MEAN, STD
    from umg_jax.models.clip import tower_switches

    v = m.vision
    return {
        "format": "umg-jax-export", "version": UMG_CONFIG_VERSION, "architecture": arch,
        "dense_mode": m.dense_mode, "embed_dim": int(m.embed_dim), "act": m.act,
        "dtype": m.dtype, "image_size": int(v.image_size), "patch_size": int(v.patch_size),
        "vision": tower_switches(m, "vision"), "text": tower_switches(m, "text"),
        "token_merge_at_inference": bool(v.get("merge_after", -1) >= 0
                                         and v.get("merge_at_inference", False)),
        # umg_jax.inference.preprocess: RGB uint8 / 255, resized (no crop, aspect not kept) to
        # image_size with jax.image.resize(bilinear, antialias=True), then (x - mean) / std.
        "preprocess": {"resize": "bilinear_antialias", "crop": None, "rescale": 1 / 255,
                       "mean": [float(x) for x in v.get("pixel_mean", MEAN)],
                       "std": [float(x) for x in v.get("pixel_std", STD)]},
        "tokenizer": tokenizer, "context_length": int(m.text.context_length),
        "logit_scale_max": float(m.logit_scale_max),
        "granularity_scales": bool(m.get("granularity_scales", False)),
        **temperatures(canonical, m),
        "extras": {k: float(np.asarray(x).reshape(())) for k, x in sorted(extras.items())},
        # umg_jax.inference: boxes are absolute pixels (x0, y0, x1, y1) of the given image,
        # RoIAlign aligned=True on the dense map, mean over the bins; masks are resized to the
        # grid (bilinear, antialias) and area-weighted means; segmentation is the argmax of the
        # bilinearly upsampled cosine logits against prompt-ensembled label embeddings.
        "boxes": {"format": "xyxy_pixels", "output_size": ROI_OUTPUT_SIZE,
                  "sampling_ratio": ROI_SAMPLING_RATIO, "aligned": True},
        "masks": {"resize": "bilinear_antialias", "eps": MASK_EPS},
        "segment": {"templates": list(DEFAULT_TEMPLATES), "upsample": "bilinear"},
        "adapters": adapters, "seg_head": seg_head,
    }


def write_umg_config(m: mlc.ConfigDict, canonical: dict[str, np.ndarray], arch: str,
                     extras: dict[str, np.ndarray], out: pathlib.Path,
                     prefix: str = "", adapters: dict | None = None,
                     seg_head: dict | None = None) -> list[pathlib.Path]:
    """Writes ``out/<prefix>umg_config.json`` (and the tokenizer files it names); returns the
    paths written."""
    tokenizer, files = write_tokenizer_files(m, out, arch)
    path = out / f"{prefix}{UMG_CONFIG_FILE}"
    path.write_text(json.dumps(umg_config(m, canonical, arch, extras, tokenizer, adapters,
                                          seg_head), indent=2))
    return [*files, path]


def _check_config(canonical: dict[str, np.ndarray], m: mlc.ConfigDict) -> None:
    """The config written beside the weights must describe them: compare the shapes it fixes."""
    v, t = m.vision, m.text
    g = v.image_size // v.patch_size
    want = {
        "visual/conv1/kernel": (v.patch_size, v.patch_size, 3, v.width),
        "visual/positional_embedding": (g * g + 1, v.width),
        "visual/proj/kernel": (v.width, m.embed_dim),
        "visual/transformer/resblocks_0/attn/query/kernel": (v.width, v.heads,
                                                             v.width // v.heads),
        "text/token_embedding/embedding": (t.vocab_size, t.width),
        "text/positional_embedding": (t.context_length, t.width),
        "text/text_projection/kernel": (t.width, m.embed_dim),
        "text/transformer/resblocks_0/attn/query/kernel": (t.width, t.heads, t.width // t.heads),
    }
    for k, shape in want.items():
        if k not in canonical:
            raise InteropError(f"param {k} is missing")
        if tuple(canonical[k].shape) != shape:
            raise InteropError(f"param {k} has shape {tuple(canonical[k].shape)}, the model "
                               f"config implies {shape}")
    for tower, n in (("visual", v.layers), ("text", t.layers)):
        if f"{tower}/transformer/resblocks_{n - 1}/ln_1/scale" not in canonical or \
                f"{tower}/transformer/resblocks_{n}/ln_1/scale" in canonical:
            raise InteropError(f"the params do not have {n} {tower} layers as the config says")


def _torch():
    try:
        import torch
    except ImportError:
        raise InteropError("writing a .pt state dict needs PyTorch; give a directory as --out "
                           "to write open_clip_model.safetensors without it") from None
    return torch


# ------------------------------------------------------------------------------ reading
def restore_params(path: str | pathlib.Path, model_cfg: mlc.ConfigDict, peft_cfg=None,
                   nested: bool = False) -> dict:
    """``umg_jax.checkpoint.load_params`` (LoRA merged for a PEFT run; the backbone of a
    segmentation-head run) with its errors as :class:`InteropError`."""
    from umg_jax import checkpoint

    try:
        return checkpoint.load_params(path, model_cfg, peft_cfg, nested)
    except (OSError, ValueError) as e:
        raise InteropError(str(e)) from None


def locate(path: str, step: int | None = None) -> tuple[pathlib.Path, pathlib.Path | None]:
    """``umg_jax.checkpoint.locate`` with its errors as :class:`InteropError`."""
    from umg_jax import checkpoint

    try:
        return checkpoint.locate(path, step)
    except FileNotFoundError as e:
        raise InteropError(str(e)) from None


def read_model_config(path: pathlib.Path) -> mlc.ConfigDict:
    """``umg_jax.checkpoint.read_model_config`` with its errors as :class:`InteropError`."""
    from umg_jax import checkpoint

    try:
        return checkpoint.read_model_config(path)
    except ValueError as e:
        raise InteropError(str(e)) from None


def read_seg_head(ckpt, config: mlc.ConfigDict, workdir) -> SegHead:
    """The segmentation head of a ``configs/seg_*.py`` run (``config``: its full config) with its
    training vocabulary (``seg_vocab.json`` of the workdir, if there); paths local or on a
    bucket."""
    from umg_jax import checkpoint, storage

    try:
        params = checkpoint.load_seg_params(ckpt, config)
    except (OSError, ValueError) as e:
        raise InteropError(str(e)) from None
    vocab = storage.path(workdir) / "seg_vocab.json"
    names = storage.read_json(vocab)["names"] if vocab.is_file() else None
    return SegHead(params, config.seg, names)


def main(argv: list[str] | None = None) -> None:
    from umg_jax import host_platforms

    host_platforms.pin()  # the platforms this host has, before JAX's backends start
    ap = argparse.ArgumentParser(
        prog="python -m umg_jax.interop.export_torch",
        description="Export umg-jax params to open_clip or Hugging Face CLIPModel.")
    ap.add_argument("src", help="import dir, training workdir or orbax checkpoint dir (local, "
                    "gs:// or s3://)")
    ap.add_argument("--format", required=True, choices=("open_clip", "hf"))
    ap.add_argument("--out", required=True,
                    help="output directory (or a .pt file for --format open_clip); local, "
                    "gs:// or s3://")
    ap.add_argument("--config", help="configs/x.py or model_config.json (default: from SRC)")
    ap.add_argument("--step", type=int, help="training step to export (default: latest)")
    args = ap.parse_args(argv)
    from umg_jax import storage

    out_dir = output_folder(args.format, args.out)
    made = _missing_local_dirs(out_dir)
    try:
        storage.check_bucket_source(args.src)
        ckpt, cfg_path = locate(args.src, args.step)
        storage.check_writable_dir(out_dir)  # before restoring
        if args.config:
            from umg_jax.interop.import_torch import load_model_config

            model_cfg = load_model_config(args.config)
        elif cfg_path is not None:
            model_cfg = read_model_config(cfg_path)
        else:
            raise InteropError(f"no model config found with {args.src}; pass --config")
        from umg_jax.checkpoint import read_peft_config, read_seg_config

        seg_cfg = read_seg_config(cfg_path)
        params = restore_params(ckpt, model_cfg, read_peft_config(cfg_path),
                                seg_cfg is not None)
        seg = None if seg_cfg is None else read_seg_head(ckpt, seg_cfg, cfg_path.parent)
        info = export_params(params, model_cfg, args.format, args.out, seg=seg)
    except (InteropError, storage.StorageError) as e:
        for d in made:  # a refused export leaves no folder behind (only empty ones it made)
            with contextlib.suppress(OSError):
                os.rmdir(d)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {ckpt} as {args.format}:")
    for f in info["files"]:
        print(f"  {f}")
    if info["extras"]:
        print(f"  UMG extras with no {args.format} slot -> {info['extras_file']}: "
              f"{', '.join(info['extras'])}")


if __name__ == "__main__":
    main()
