r"""Imports a pretrained PyTorch CLIP into an orbax checkpoint the trainer can start from.

    python -m umg_jax.interop.import_torch SRC [--config configs/vit_l.py] --out DIR \
        [--allow_resize] [--act quick_gelu|gelu]

SRC: an OpenAI / open_clip state dict (``.pt`` / ``.pth`` / ``.bin`` via torch, ``.safetensors``
without torch), an open_clip directory (``open_clip_config.json`` + weights), a Hugging Face
``CLIPModel`` directory (``config.json`` + ``model.safetensors``), or a big_vision SigLIP ``.npz``
(``big_vision.py``: the model config gets SigLIP's tower switches; activation tanh GELU as in
big_vision unless ``--act gelu``, which is what open_clip / timm run). A SigLIP needs its
SentencePiece model: ``--tokenizer FILE.model`` copies it into ``DIR/tokenizer.model`` and names
it in ``model.text.tokenizer`` (relative to ``DIR``, which can be moved).

Without ``--config`` the architecture is inferred from the weights (heads: HF ``config.json``,
else head dim 64). The activation comes from the source when it says (HF ``hidden_act``, open_clip
``quick_gelu``, OpenAI JIT archives are QuickGELU), else from ``--act``. Any disagreement between
source, flags and config is refused with the first offending key and both shapes / values.

Output (``DIR``, local or ``gs://`` / ``s3://``; written to a temp dir and renamed, so a
failure leaves nothing; on a bucket the temp dir is local and is uploaded with
``model_config.json`` last, so a directory without it is never taken for an import):
  ``DIR/params``             params checkpoint (``umg_jax.checkpoint.save_params``: orbax
                             ``{"params": params}``) in the model's own layout (stacked
                             ``resblocks`` when scan=True), read by ``restore_params_only``;
  ``DIR/model_config.json``  the ``config.model`` section used;
  ``DIR/import_report.json`` source, format, activation, resize, initialised / ignored keys;
  ``DIR/tokenizer.model``    the SentencePiece model given with ``--tokenizer`` (or named by
                             ``--config``), named ``tokenizer.model`` in the config.
Errors: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import warnings
import zipfile

import ml_collections as mlc
import numpy as np

from umg_jax.interop import big_vision, infer
from umg_jax.interop.mapping import (
    EXTRA_RE,
    EXTRAS_FILE,
    HF_ACTS,
    IGNORED_KEYS,
    InteropError,
    abstract_canonical_shapes,
    flatten,
    key_of,
    to_model_layout,
    torch_to_flax,
    unflatten,
)
from umg_jax.models import pos_embed

LOCAL_HINT = "copy it to local disk first (gcloud storage cp / aws s3 cp)"


@dataclasses.dataclass
class Source:
    """A loaded checkpoint: float32 numpy state dict plus what the source says about itself."""

    path: str
    sd: dict[str, np.ndarray]
    fmt: str
    act: str | None = None  # activation the source declares, None = it does not say
    act_why: str = ""
    ln_eps: float | None = None
    eps_why: str = ""
    hf_config: dict | None = None
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------ readers
def _as_f32(sd: dict) -> dict[str, np.ndarray]:
    """fp16 / bf16 / fp64 archives -> float32; integer metadata left as is."""
    out = {}
    for k, v in sd.items():
        a = np.asarray(v)
        out[k] = a.astype(np.float32) if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else a
    return out


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return _as_f32(load_file(path))
    except Exception as e:  # safetensors raises SafetensorError / OSError on bad files
        raise InteropError(f"cannot read {path}: truncated or not a safetensors file "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def _torch():
    try:
        import torch
    except ImportError:
        raise InteropError("reading .pt/.bin checkpoints needs PyTorch (pip install torch); "
                           "convert to .safetensors to import without it") from None
    return torch


def read_torch(path: str) -> tuple[dict[str, np.ndarray], bool]:
    """``(state_dict, is_jit)``; OpenAI archives are TorchScript, open_clip ones pickles."""
    torch = _torch()

    def to_np(sd):
        return {k: (v.float() if v.is_floating_point() else v).numpy()
                for k, v in sd.items() if isinstance(v, torch.Tensor)}

    err = None
    try:
        with warnings.catch_warnings():  # a TorchScript archive is read below, as it says
            warnings.filterwarnings("ignore", message=".*TorchScript archive")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        obj, err = None, e
    if obj is None and zipfile.is_zipfile(path):
        try:
            return to_np(torch.jit.load(path, map_location="cpu").state_dict()), True
        except Exception as e:
            err = e
    if obj is None:
        raise InteropError(f"cannot read {path}: truncated or not a PyTorch checkpoint "
                           f"({type(err).__name__}: {str(err).splitlines()[0][:120]})")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # open_clip training checkpoints
    if not isinstance(obj, dict):
        raise InteropError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return to_np(obj), False


def load_source(path: str) -> Source:
    """Reads ``path`` (file or directory) into a ``Source``; see the module docstring."""
    p = pathlib.Path(path)
    if not p.exists():
        raise InteropError(f"{path} does not exist")
    hf_config = oc_config = None
    is_jit = False
    if p.is_dir():
        if (p / "open_clip_config.json").is_file():
            oc_config = _read_json(p / "open_clip_config.json").get("model_cfg")
            weights = _first_file(p, ("open_clip_model.safetensors",
                                      "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth"))
        elif (p / "config.json").is_file():
            hf_config = _read_json(p / "config.json")
            weights = _first_file(p, ("model.safetensors", "pytorch_model.bin"))
        else:
            raise InteropError(f"{path} is a directory without config.json (HF) or "
                               "open_clip_config.json (open_clip)")
    else:
        weights = p
        beside = p.with_suffix(".json")  # our open_clip .pt export writes its config here
        if beside.is_file():
            cfg = _read_json(beside)
            oc_config = cfg if "vision_cfg" in cfg else None
    if weights.suffix == ".npz":
        w = big_vision.read_npz(str(weights))
        if not big_vision.is_big_vision(w):
            raise InteropError(f"{weights}: not a big_vision image-text checkpoint (no "
                               f"img/embedding/kernel); first keys: {', '.join(sorted(w)[:5])}")
        return Source(str(p), w, "big_vision", ln_eps=1e-6, eps_why="big_vision LayerNorm")
    if weights.suffix == ".safetensors":
        sd = read_safetensors(str(weights))
    elif weights.suffix in (".pt", ".pth", ".bin"):
        sd, is_jit = read_torch(str(weights))
    else:
        raise InteropError(f"unsupported file type {weights.suffix!r} "
                           "(.pt/.pth/.bin/.safetensors/.npz or a directory)")
    sd = infer.strip_prefixes(sd)
    fmt = infer.detect_format(sd)
    src = Source(str(p), sd, fmt, hf_config=hf_config)
    if hf_config is not None:
        acts = {hf_config["text_config"].get("hidden_act", "quick_gelu"),
                hf_config["vision_config"].get("hidden_act", "quick_gelu")}
        epss = {hf_config["text_config"].get("layer_norm_eps", 1e-5),
                hf_config["vision_config"].get("layer_norm_eps", 1e-5)}
        if len(acts) > 1 or len(epss) > 1:
            raise InteropError(f"{path}/config.json: the towers differ in hidden_act {acts} or "
                               f"layer_norm_eps {epss}; our model uses one of each")
        act = acts.pop()
        src.act = {v: k for k, v in HF_ACTS.items()}.get(act, act)
        src.act_why = "config.json hidden_act"
        src.ln_eps, src.eps_why = float(epss.pop()), "config.json layer_norm_eps"
    elif oc_config is not None:
        src.act = "quick_gelu" if oc_config.get("quick_gelu", False) else "gelu"
        src.act_why = "open_clip config quick_gelu"
        eps = (oc_config["vision_cfg"].get("norm_kwargs") or {}).get("eps", 1e-5)
        src.ln_eps, src.eps_why = float(eps), "open_clip config norm_kwargs"
    else:
        if is_jit or "input_resolution" in sd:
            src.act, src.act_why = "quick_gelu", "OpenAI JIT archive"
        src.ln_eps, src.eps_why = 1e-5, "PyTorch LayerNorm default"
    extras_path = (p if p.is_dir() else p.parent) / (
        EXTRAS_FILE if p.is_dir() else f"{p.stem}_{EXTRAS_FILE}")
    if extras_path.is_file():
        src.extras = read_safetensors(str(extras_path))
    return src


def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InteropError(f"cannot read {path}: {type(e).__name__}") from None


def _first_file(d: pathlib.Path, names: tuple[str, ...]) -> pathlib.Path:
    for n in names:
        if (d / n).is_file():
            return d / n
    raise InteropError(f"{d} has none of {', '.join(names)}")


# ------------------------------------------------------------------------------ resize
def _resize_grid(pos: np.ndarray, want: tuple[int, ...], prefix: int, key: str,
                 model_cfg: mlc.ConfigDict, allow_resize: bool, report: dict) -> np.ndarray:
    """``pos [prefix + g*g, D]`` resized to ``want`` (with permission), else unchanged."""
    if pos.ndim != 2 or pos.shape[0] == want[0] or pos.shape[1] != want[1]:
        return pos
    g_src, g_dst = math.isqrt(pos.shape[0] - prefix), math.isqrt(want[0] - prefix)
    p = model_cfg.vision.patch_size
    if not allow_resize:
        raise InteropError(
            f"{key}: checkpoint grid {g_src}x{g_src} ({g_src * p} px) but the config "
            f"wants {g_dst}x{g_dst} ({model_cfg.vision.image_size} px); pass --allow_resize "
            "to resize it bicubically")
    report["resized"] = f"{g_src}x{g_src} -> {g_dst}x{g_dst}"
    try:
        return pos_embed.resize(pos, (g_dst, g_dst), prefix)
    except ValueError as e:
        raise InteropError(f"{key}: {e}") from None


# ------------------------------------------------------------------------------ import
def _resolve(name: str, declared, why: str, flag, configured):
    """Value of ``act`` / ``ln_eps``: config > flag > source; all given ones must agree."""
    if flag is not None and declared is not None and flag != declared:
        raise InteropError(f"--{name} {flag} contradicts the source ({declared} from {why})")
    chosen = flag if flag is not None else declared
    if configured is not None:
        if chosen is not None and chosen != configured:
            src = "--" + name if flag is not None else why
            raise InteropError(f"{name} mismatch: {src} says {chosen}, the config says "
                               f"{configured} (numeric parity would break)")
        return configured
    if chosen is None:
        raise InteropError(f"cannot tell the {name} of this checkpoint; pass --{name} "
                           "quick_gelu (OpenAI weights) or gelu (LAION / open_clip)")
    return chosen


def _list(keys: list[str], n: int = 8) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def import_source(src: Source, model_cfg: mlc.ConfigDict | None = None, *,
                  act: str | None = None, allow_resize: bool = False
                  ) -> tuple[dict, mlc.ConfigDict, dict]:
    """Converts a loaded source to ``(params, model_cfg, report)``; ``params`` is the nested
    float32 numpy tree in the layout of ``model_cfg`` (stacked when ``scan``)."""
    from umg_jax.models import clip

    if src.fmt == "big_vision":
        return _import_big_vision(src, model_cfg, act=act, allow_resize=allow_resize)
    act = _resolve("act", src.act, src.act_why, act, model_cfg.act if model_cfg else None)
    eps = _resolve("ln_eps", src.ln_eps, src.eps_why, None,
                   float(model_cfg.ln_eps) if model_cfg else None)
    arch = infer.infer_arch(src.sd, src.fmt, src.hf_config)
    if model_cfg is None:
        model_cfg = infer.model_config_from_arch(arch, act, eps)
        # The UMG side file says which extras the trained model had.
        if any(k.startswith("logit_scale_") for k in src.extras):
            model_cfg.granularity_scales = True
        bias = src.sd.get("logit_bias", src.extras.get("logit_bias"))
        if bias is not None:
            model_cfg.logit_bias_init = float(np.asarray(bias).reshape(()))
    elif src.hf_config is not None:
        want = infer.arch_of_config(model_cfg)
        for k, where in (("vision_heads", "vision_config"), ("text_heads", "text_config")):
            if arch[k] != want[k]:
                raise InteropError(f"config.json {where}.num_attention_heads: checkpoint "
                                   f"{arch[k]}, config {want[k]}")
    abstract_flat = flatten(clip.abstract_params(model_cfg))
    shapes = abstract_canonical_shapes(abstract_flat)
    sd = dict(src.sd)
    report = _new_report(src, act, eps)

    # Positional grid: resize (with permission) before the strict shape check.
    pos_key = "visual.positional_embedding" if src.fmt == "classic" else \
        "vision_model.embeddings.position_embedding.weight"
    if pos_key in sd:
        sd[pos_key] = _resize_grid(sd[pos_key], shapes["visual/positional_embedding"], 1,
                                   pos_key, model_cfg, allow_resize, report)

    canonical, used, missing = torch_to_flax(sd, src.fmt, shapes)
    # Optional leaves: UMG extras and logit_bias come from the source's side file when present,
    # else from the config's init value (listed in the report, never silent).
    optional = [k for k in shapes if k not in canonical and
                (EXTRA_RE.match(k) or k == "logit_bias")]
    extras_used = set()
    for k in optional:
        if k in src.extras:
            v = np.asarray(src.extras[k], np.float32).reshape(shapes[k])
            extras_used.add(k)
        else:
            init = model_cfg.logit_bias_init if "bias" in k else model_cfg.logit_scale_init
            v = np.full(shapes[k], init, np.float32)
            report["initialised"].append(k)
        canonical[k] = v
    optional_keys = {key_of(r, src.fmt) for r in _rows_named(optional)}
    missing = [k for k in missing if k not in optional_keys]
    unknown = sorted(k for k in sd if k not in used and not IGNORED_KEYS.match(k))
    unknown += sorted(f"{EXTRAS_FILE}:{k}" for k in src.extras if k not in extras_used)
    report["ignored"] = sorted(k for k in sd if IGNORED_KEYS.match(k))
    return _finish(canonical, abstract_flat, missing, unknown, src.fmt, model_cfg), \
        model_cfg, report


def _new_report(src: Source, act: str, eps: float) -> dict:
    """``import_report.json``: what was read, how, and which keys were not taken as is."""
    return {"source": src.path, "format": src.fmt, "act": act, "ln_eps": eps, "resized": None,
            "initialised": [], "ignored": []}


def _finish(canonical: dict, abstract_flat: dict, missing: list[str], unknown: list[str],
            fmt: str, model_cfg: mlc.ConfigDict) -> dict:
    """Refuses missing / unknown keys (listed), then the nested params in the model's layout."""
    problems = []
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unknown:
        problems.append(f"unknown keys: {_list(unknown)}")
    if problems:
        raise InteropError("; ".join(problems) + f" (format {fmt}, config with "
                           f"{model_cfg.vision.layers}/{model_cfg.text.layers} layers)")
    flat = to_model_layout(canonical, abstract_flat)
    for k, a in abstract_flat.items():  # full coverage, exact shapes
        if k not in flat or tuple(flat[k].shape) != tuple(a.shape):
            raise InteropError(f"internal: param {k} not produced with shape {tuple(a.shape)}")
    return unflatten(flat)


def _import_big_vision(src: Source, model_cfg: mlc.ConfigDict | None, *, act: str | None,
                       allow_resize: bool) -> tuple[dict, mlc.ConfigDict, dict]:
    """:func:`import_source` for a big_vision SigLIP (``big_vision.py``)."""
    from umg_jax.models import clip

    # big_vision's MLPs use flax's nn.gelu (tanh); open_clip / timm run erf GELU instead.
    default_act = None if model_cfg is not None else "gelu_tanh"
    act = _resolve("act", None, "", act or default_act, model_cfg.act if model_cfg else None)
    eps = _resolve("ln_eps", src.ln_eps, src.eps_why, None,
                   float(model_cfg.ln_eps) if model_cfg else None)
    if model_cfg is None:
        model_cfg = big_vision.model_config(src.sd, act)
    abstract_flat = flatten(clip.abstract_params(model_cfg))
    shapes = abstract_canonical_shapes(abstract_flat)
    report = _new_report(src, act, eps)
    w = dict(src.sd)
    want = shapes.get("visual/positional_embedding")
    if want is not None and w.get("img/pos_embedding") is not None:
        prefix = int(model_cfg.vision.get("class_token", True))
        pos = w["img/pos_embedding"]
        w["img/pos_embedding"] = _resize_grid(pos.reshape(pos.shape[-2:]), want, prefix,
                                              "img/pos_embedding", model_cfg, allow_resize,
                                              report)
    canonical, unknown, missing = big_vision.to_flax(w, shapes)
    return _finish(canonical, abstract_flat, missing, unknown, src.fmt, model_cfg), \
        model_cfg, report


def _rows_named(flax_names: list[str]):
    from umg_jax.interop.mapping import TOP_ROWS

    return [r for r in TOP_ROWS if r.flax in flax_names]


# ------------------------------------------------------------------------------ output
def write_import_dir(out: str, params: dict, model_cfg: mlc.ConfigDict, report: dict,
                     tokenizer: str | None = None) -> None:
    """Writes ``out/{params, model_config.json, import_report.json}`` atomically (temp dir in the
    same parent, then rename). ``tokenizer``: a SentencePiece model for ``model.text.tokenizer``.
    The tokenizer the config names is copied to ``out/tokenizer.model`` and stored as that name,
    relative to ``out`` (read back with ``umg_jax.checkpoint.read_model_config``), so the
    directory can be moved. ``out`` on a bucket (``gs://``, ``s3://``): written locally, then
    uploaded with ``model_config.json`` (what makes it an import directory) last."""
    import jax

    from umg_jax import storage
    from umg_jax.checkpoint import bundle_model_files, save_params

    if storage.is_remote(out):
        _upload_import_dir(out, params, model_cfg, report, tokenizer)
        return
    dst = pathlib.Path(out).absolute()
    if dst.exists():
        raise InteropError(f"{out} already exists; remove it or choose another --out")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        model = model_cfg.to_dict()
        if tokenizer is not None:
            model["text"]["tokenizer"] = tokenizer
        model_cfg = mlc.ConfigDict(bundle_model_files(model, tmp))
        save_params(tmp / "params", jax.tree.map(np.asarray, params))
        (tmp / "model_config.json").write_text(model_cfg.to_json(indent=2))
        (tmp / "import_report.json").write_text(json.dumps(report, indent=2))
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _upload_import_dir(out: str, params: dict, model_cfg: mlc.ConfigDict, report: dict,
                       tokenizer: str | None) -> None:
    """:func:`write_import_dir` to a bucket: built in a local temp dir, then uploaded entry by
    entry, ``model_config.json`` last (``checkpoint.locate`` needs it to see an import)."""
    from umg_jax import storage

    dst = storage.path(out)
    if dst.exists():
        raise InteropError(f"{out} already exists; remove it or choose another --out")
    with tempfile.TemporaryDirectory(prefix="umg_import_") as tmp:
        local = pathlib.Path(tmp) / "out"
        write_import_dir(str(local), params, model_cfg, report, tokenizer)
        storage.copy_tree(local, dst, last="model_config.json")


def load_model_config(path: str) -> mlc.ConfigDict:
    """``configs/x.py`` (its ``.model`` section) or a ``model_config.json`` / workdir
    ``config.json`` (files it names resolved against its directory)."""
    if path.endswith(".json"):
        from umg_jax.checkpoint import read_model_config

        try:
            return read_model_config(path)
        except ValueError as e:
            raise InteropError(str(e)) from None
    from umg_jax.config_lib import load_config

    try:
        return load_config(path).model
    except FileNotFoundError as e:
        raise InteropError(str(e)) from None


def main(argv: list[str] | None = None) -> None:
    from umg_jax import host_platforms

    host_platforms.pin()  # the platforms this host has, before JAX's backends start
    ap = argparse.ArgumentParser(
        prog="python -m umg_jax.interop.import_torch",
        description="Import a PyTorch CLIP (OpenAI / open_clip / HF) or a big_vision SigLIP "
        ".npz into an orbax checkpoint the trainer can start from (config.init.checkpoint).")
    ap.add_argument("src", help=".pt/.pth/.bin/.safetensors file, HF or open_clip directory, "
                    "or a big_vision SigLIP .npz")
    ap.add_argument("--config", help="configs/x.py (uses .model) or a model_config.json; "
                    "default: inferred from the weights")
    ap.add_argument("--out", required=True, help="output directory (must not exist); local, "
                    "gs:// or s3://")
    ap.add_argument("--allow_resize", action="store_true",
                    help="bicubically resize the positional grid to the config's resolution")
    ap.add_argument("--act", choices=("quick_gelu", "gelu", "gelu_tanh"),
                    help="activation, when the source does not say (OpenAI: quick_gelu; "
                    "big_vision SigLIP: gelu_tanh by default, gelu to match open_clip / timm)")
    ap.add_argument("--tokenizer", help="SentencePiece .model of a SigLIP (copied into --out)")
    args = ap.parse_args(argv)
    from umg_jax import storage

    try:
        cfg = load_model_config(args.config) if args.config else None
        out = storage.path(args.out)
        # a missing bucket / no credentials / an unwritable folder: stop before reading SRC
        storage.check_writable_dir(out if storage.is_remote(out) else out.parent)
        if out.exists():
            raise InteropError(f"{args.out} already exists; remove it or choose another --out")
        storage.require_local(args.src, "SRC", LOCAL_HINT)
        if args.tokenizer:
            storage.require_local(args.tokenizer, "--tokenizer", LOCAL_HINT)
            _check_sentencepiece(args.tokenizer)
        src = load_source(args.src)
        params, cfg, report = import_source(src, cfg, act=args.act,
                                            allow_resize=args.allow_resize)
        if args.tokenizer and src.fmt != "big_vision":
            raise InteropError("--tokenizer is for SigLIP imports; CLIP weights use the "
                               "embedded CLIP BPE")
        write_import_dir(args.out, params, cfg, report, args.tokenizer)
    except (InteropError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    n = sum(int(np.prod(np.shape(x))) for x in flatten(params).values())
    print(f"imported {args.src} ({report['format']}, act={report['act']}, "
          f"ln_eps={report['ln_eps']}) -> {args.out}: {n:,} params")
    if report["resized"]:
        print(f"  positional grid resized {report['resized']} (bicubic, class slot kept)")
    if report["initialised"]:
        print(f"  not in the source, initialised from the config: "
              f"{', '.join(report['initialised'])}")
    if report["ignored"]:
        print(f"  ignored buffers: {', '.join(report['ignored'])}")
    if report["format"] == "big_vision" and not args.tokenizer:
        print("  no --tokenizer: set config.model.text.tokenizer to this SigLIP's SentencePiece "
              ".model before training or inference")


def _check_sentencepiece(path: str) -> None:
    from umg_jax.data.tokenizer import SentencePieceTokenizer

    try:
        SentencePieceTokenizer(path)
    except Exception as e:  # missing file, not a SentencePiece model, no EOS piece
        raise InteropError(f"--tokenizer {path}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160]}") from None


if __name__ == "__main__":
    main()
