"""What every Hugging Face family shares: importing torch, choosing the device, and refusing a
model directory of the wrong architecture before any weight is read."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from umg_jax.labeling.annotate.backend import AnnotateError


def import_torch():
    """``torch``, imported on first use (the core package imports without it); the families'
    one entry point to it."""
    import torch

    return torch


def device(name: str):
    """``torch.device`` for ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (cuda when present);
    asking for a GPU that is not there is an :class:`AnnotateError`."""
    torch = import_torch()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AnnotateError(f"--device {name}: torch sees no CUDA device (torch "
                            f"{torch.__version__})")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise AnnotateError(f"--device {name}: {e}") from None


def check_model_dir(path: str | None, family: str, model_types: tuple[str, ...]) -> dict:
    """``config.json`` of a local model directory, after checking that it exists and that its
    ``model_type`` is one of ``model_types``: a directory of another architecture fails here,
    at start, with its path, instead of deep inside ``from_pretrained``."""
    if not path:
        raise AnnotateError(f"{family}: the recipe entry needs \"model\": a local model directory")
    cfg_path = pathlib.Path(path) / "config.json"
    if not cfg_path.is_file():
        raise AnnotateError(f"{family}: {path} is not a model directory (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AnnotateError(f"{family}: {cfg_path}: unreadable ({e})") from None
    kind = cfg.get("model_type")
    if kind not in model_types:
        raise AnnotateError(f"{family}: {path} holds a {kind!r} model "
                            f"({', '.join(cfg.get('architectures') or []) or 'no architectures'}"
                            f"), expected model_type {' or '.join(map(repr, model_types))}")
    return cfg


def load(model_cls, processor_cls, path: str, dev, family: str, model_types: tuple[str, ...]):
    """``(model in eval mode on dev, processor)`` from a local directory, offline, after
    :func:`check_model_dir`."""
    check_model_dir(path, family, model_types)
    try:
        model = model_cls.from_pretrained(path, local_files_only=True).to(dev).eval()
        processor = processor_cls.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise AnnotateError(f"{family}: cannot load {path}: {str(e).splitlines()[0]}") from None
    return model, processor


def positive_int(family: str, name: str, value: Any) -> int:
    """``value`` when it is an int >= 1 (not a bool); else an :class:`AnnotateError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AnnotateError(f"{family}: option {name!r} must be a positive integer, got {value!r}")
    return value


def tiny_bpe(text: str, special: list[str], vocab_size: int) -> tuple[dict, list]:
    """(vocab, merges) of a byte-level BPE trained on ``text``, for the tiny test models. Its
    alphabet is printable ASCII only, so random generations decode to readable characters, not
    broken UTF-8 bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = ["\u0120"] + [chr(c) for c in range(33, 127)]  # U+0120 is the byte-level space
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    return bpe["vocab"], [tuple(m) for m in bpe["merges"]]
