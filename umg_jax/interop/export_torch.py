r"""Exports our params to PyTorch: open_clip or Hugging Face ``CLIPModel``.

    python -m umg_jax.interop.export_torch WORKDIR_OR_CKPT --format {open_clip,hf} --out PATH \
        [--config configs/x.py] [--step N]

Input: an import directory (``import_torch`` output: ``params/`` + ``model_config.json``), a
training workdir (``checkpoints/<step>/state`` holding ``{"params", "opt_state", "step"}``, latest
step unless ``--step``; model config from ``config.json``), or an orbax checkpoint directory
holding ``{"params": ...}`` (give ``--config``). Scanned (stacked) layers are unstacked. Python
API: ``export_params(params, model_cfg, fmt, out)`` takes a param tree directly.

Output:
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
Errors: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
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

# A param transform maps the restored param tree to plain CLIP params before conversion. This is
# the hook for merging PEFT / LoRA deltas into the base weights; PEFT does not exist yet, so the
# default is the identity.
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
                  param_transform: ParamTransform | None = None) -> dict:
    """Writes ``params`` (the model's tree, stacked or not) in ``fmt`` (``"open_clip"`` or
    ``"hf"``) to ``out``. ``param_transform``: applied first (LoRA-merge hook). Returns
    ``{"files": [...], "extras": [names], "extras_file": path | None}``."""
    from safetensors.numpy import save_file

    if fmt not in ("open_clip", "hf"):
        raise InteropError(f"unknown format {fmt!r}; expected open_clip or hf")
    if param_transform is not None:
        params = param_transform(params)
    flat = flatten(params)
    adapters = [k for k in flat if "/adapter/" in k]
    if adapters:
        raise InteropError(f"{len(adapters)} bottleneck-adapter params (e.g. {adapters[0]}) "
                           "have no place in a CLIP state dict and cannot be merged into its "
                           "weights; export a LoRA run instead, or use the model with umg_jax")
    outp = pathlib.Path(out)
    if hf_siglip.is_siglip(model_cfg):
        return _export_siglip(flat, model_cfg, fmt, outp)
    check_clip_towers(model_cfg, fmt)
    canonical = to_canonical(flat)
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
        extras_path = outp / EXTRAS_FILE
    if extras:
        save_file({k: np.asarray(v, np.float32) for k, v in extras.items()}, str(extras_path),
                  metadata={"format": "umg-extras"})
        files.append(extras_path)
    arch = "hf_clip" if fmt == "hf" else "open_clip"
    files += write_umg_config(model_cfg, canonical, arch, extras,
                              outp.parent if torch_file else outp,
                              f"{outp.stem}_" if torch_file else "")
    return {"files": [str(f) for f in files], "extras": sorted(extras),
            "extras_file": str(extras_path) if extras else None}


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
    encoder, ranks, _ = tk._load_tables(tk.DEFAULT_VOCAB_PATH)
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
               extras: dict[str, np.ndarray], tokenizer: dict) -> dict:
    """The ``umg_config.json`` dict: how to run the exported weights as umg_jax does."""
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
    }


def write_umg_config(m: mlc.ConfigDict, canonical: dict[str, np.ndarray], arch: str,
                     extras: dict[str, np.ndarray], out: pathlib.Path,
                     prefix: str = "") -> list[pathlib.Path]:
    """Writes ``out/<prefix>umg_config.json`` (and the tokenizer files it names); returns the
    paths written."""
    tokenizer, files = write_tokenizer_files(m, out, arch)
    path = out / f"{prefix}{UMG_CONFIG_FILE}"
    path.write_text(json.dumps(umg_config(m, canonical, arch, extras, tokenizer), indent=2))
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m umg_jax.interop.export_torch",
        description="Export umg-jax params to open_clip or Hugging Face CLIPModel.")
    ap.add_argument("src", help="import dir, training workdir or orbax checkpoint dir")
    ap.add_argument("--format", required=True, choices=("open_clip", "hf"))
    ap.add_argument("--out", required=True,
                    help="output directory (or a .pt file for --format open_clip)")
    ap.add_argument("--config", help="configs/x.py or model_config.json (default: from SRC)")
    ap.add_argument("--step", type=int, help="training step to export (default: latest)")
    args = ap.parse_args(argv)
    try:
        ckpt, cfg_path = locate(args.src, args.step)
        if args.config:
            from umg_jax.interop.import_torch import load_model_config

            model_cfg = load_model_config(args.config)
        elif cfg_path is not None:
            model_cfg = read_model_config(cfg_path)
        else:
            raise InteropError(f"no model config found with {args.src}; pass --config")
        from umg_jax.checkpoint import read_peft_config, read_seg_config

        params = restore_params(ckpt, model_cfg, read_peft_config(cfg_path),
                                read_seg_config(cfg_path) is not None)
        info = export_params(params, model_cfg, args.format, args.out)
    except InteropError as e:
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
