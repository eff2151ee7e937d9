"""Training checkpoints: an orbax ``CheckpointManager`` with the data-iterator state saved beside
the model state in the same step, in a local directory or a ``gs://`` bucket (``s3://``: see
below).

Layout (``workdir/checkpoints/<step>/``)::

    state/   the train-state pytree (``StandardSave``; sharded arrays, restorable onto any mesh)
    data/    JSON ``{"format": ..., "processes": [per-process iterator state]}``
    meta/    JSON dict given by the caller (config, counters, ...)
    metrics/ (orbax) the metrics dict used by keep-best

Atomicity comes from orbax. Locally a step is written into ``<step>.orbax-checkpoint-tmp-*`` and
renamed to ``<step>`` only after every item is complete. On ``gs://`` (no rename on object stores)
the step is written in place and finalised by a last ``<step>/commit_success.txt``. Either way an
interrupted save (a process killed mid-upload) leaves a step that orbax does not count as
finalised: ``latest_step()`` and :func:`locate` never report it, and the next manager opening the
directory removes it.

``s3://``: orbax-checkpoint 0.12.8 builds tensorstore specs only for local paths and ``gs://``
(``ValueError: Checkpoint path should be absolute`` for ``s3://``), so a :class:`Checkpointer` on
``s3://`` is refused with a :class:`~umg_jax.storage.StorageError`. Params checkpoints
(``save_params`` / ``restore_params_only`` / ``load_params``) on ``s3://`` go through a local
temporary copy.

Retention: the ``keep`` most recent steps, plus (``keep_best_metric``) the step with the best
value of that metric among the steps saved with it.

``restore_params_only`` reads the params of a *params checkpoint*: a directory written with
``orbax.checkpoint.StandardCheckpointer().save(path, {"params": params})`` (the layout the interop
importer writes; see ``save_params``), or the ``state`` of a training checkpoint step directory
(``workdir/checkpoints/<step>``, where the state has a top-level ``params`` entry).

Every path argument may be a local path, ``gs://`` or ``s3://`` (``umg_jax.storage``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from umg_jax import storage

PyTree = Any
DataState = dict | bytes | None

log = logging.getLogger(__name__)


def _encode_data_state(data_state: DataState) -> tuple[str, Any]:
    if data_state is None:
        return "none", None
    if isinstance(data_state, bytes | bytearray):
        return "bytes", base64.b64encode(bytes(data_state)).decode("ascii")
    if isinstance(data_state, dict):
        json.dumps(data_state)  # fail here, not in the background thread
        return "json", data_state
    raise TypeError(f"data_state must be dict, bytes or None, got {type(data_state).__name__}")


def _decode_data_state(fmt: str, value: Any) -> DataState:
    if fmt == "none":
        return None
    if fmt == "bytes":
        return base64.b64decode(value)
    if fmt == "json":
        return value
    raise ValueError(f"unknown data-state format {fmt!r} in checkpoint")


def _gather_process_states(encoded: Any) -> list[Any]:
    """Every process's encoded iterator state, in process order (all processes must call this)."""
    if jax.process_count() == 1:
        return [encoded]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(encoded).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([raw.size], np.int64))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: raw.size] = raw
    allraw = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(allraw[i, : int(lengths[i, 0])]).decode())
            for i in range(jax.process_count())]


class Checkpointer:
    """Periodic, atomic, optionally asynchronous train-state checkpoints in ``workdir``.

    ``every_steps``: ``save`` writes only at multiples of it (or with ``force=True``).
    ``keep``: number of most recent checkpoints kept. ``keep_best_metric``: name of a key of the
    ``metrics`` passed to ``save``; the best step by it (``best_mode`` "max" / "min") is kept too.
    ``async_save``: arrays are copied to host before ``save`` returns (so the caller may donate
    them to the next step); files are written in a background thread. Call ``wait()`` before
    reading the files and ``close()`` at the end.
    """

    def __init__(self, workdir: storage.PathLike, *, every_steps: int, keep: int,
                 keep_best_metric: str | None = None, best_mode: str = "max",
                 async_save: bool = True):
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = storage.path(workdir) / "checkpoints"
        if _is_s3(self.directory):
            raise storage.StorageError(
                f"cannot keep training checkpoints in {self.directory}: orbax-checkpoint "
                f"{ocp.__version__} writes arrays only to local paths and gs://; use a gs:// "
                "workdir or a filesystem every host mounts (an S3 FUSE mount will not do: "
                "orbax commits a local checkpoint by renaming it, which S3 cannot do atomically)")
        self.every_steps = every_steps
        self.keep_best_metric = keep_best_metric or None
        self.best_mode = best_mode
        policies: list[Any] = [ocm.LatestN(n=keep)]
        best_fn = None
        if self.keep_best_metric:
            best_fn = lambda m: float(m[self.keep_best_metric])  # noqa: E731
            policies.append(ocm.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                                      keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            best_fn=best_fn,  # orbax writes the metrics item only when best_fn is set
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # drop temp dirs of interrupted saves at start
            create=True,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """Newest complete checkpoint step, or None."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints kept on disk, ascending."""
        return sorted(self._mngr.all_steps())

    def best_step(self) -> int | None:
        """Step with the best ``keep_best_metric`` among the kept checkpoints (None if none)."""
        if not self.keep_best_metric:
            return None
        best, best_v = None, None
        for s in self.all_steps():
            m = self._mngr.metrics(s)
            if not m or self.keep_best_metric not in m:
                continue
            v = float(m[self.keep_best_metric])
            if best_v is None or (v > best_v if self.best_mode == "max" else v < best_v):
                best, best_v = s, v
        return best

    def should_save(self, step: int, force: bool = False) -> bool:
        return (force or step % self.every_steps == 0) and step not in self._mngr.all_steps()

    def save(self, step: int, state: PyTree, data_state: DataState = None,
             meta: dict | None = None, metrics: dict | None = None, force: bool = False) -> bool:
        """Saves ``state`` (pytree of arrays), the data-iterator state and ``meta`` (JSON dict) as
        ``step`` if ``step`` is a multiple of ``every_steps`` or ``force``; a step already on disk
        is never rewritten. Returns whether a save started. ``metrics``: scalars for keep-best
        (only stored when they contain ``keep_best_metric``). All processes must call it.
        """
        if not self.should_save(step, force):
            return False
        fmt, encoded = _encode_data_state(data_state)
        data = {"format": fmt, "processes": _gather_process_states(encoded)}
        meta = dict(meta or {})
        json.dumps(meta)  # clear error for non-JSON meta before anything is written
        keep_metrics = None
        if metrics and self.keep_best_metric and self.keep_best_metric in metrics:
            v = float(metrics[self.keep_best_metric])
            if math.isfinite(v):
                keep_metrics = {self.keep_best_metric: v}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta))
        return bool(self._mngr.save(step, args=args, metrics=keep_metrics, force=True))

    def restore(self, step: int | None, abstract_state: PyTree
                ) -> tuple[PyTree, DataState, dict]:
        """``(state, data_state, meta)`` of ``step`` (None = latest).

        ``abstract_state``: pytree of ``jax.ShapeDtypeStruct`` with the *target* shardings (e.g.
        ``jax.tree.map(ocp.utils.to_shape_dtype_struct, state)`` or built from the mesh rules);
        arrays are read directly into them, so the saving and restoring meshes may differ.
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif step not in self._mngr.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                                    f"(available: {self.all_steps()})")
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        data = out["data"]
        procs = data["processes"]
        if len(procs) != jax.process_count():
            raise ValueError(
                f"checkpoint step {step} holds data-iterator states of {len(procs)} processes, "
                f"this run has {jax.process_count()}: the input pipeline cannot resume exactly")
        data_state = _decode_data_state(data["format"], procs[jax.process_index()])
        return out["state"], data_state, dict(out["meta"])

    def wait(self) -> None:
        """Blocks until any background save is complete (and committed)."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_s3(p: storage.PathLike) -> bool:
    return os.fspath(p).startswith("s3://")


@contextlib.contextmanager
def _orbax_readable(p: epath.Path) -> Iterator[epath.Path]:
    """``p`` where orbax can read it: itself (local, gs://), or a local copy of an s3:// tree."""
    if not _is_s3(p):
        yield p
        return
    with tempfile.TemporaryDirectory(prefix="umg-jax-ckpt-") as d:
        storage.copy_tree(p, d)
        yield epath.Path(d)


def save_params(path: storage.PathLike, params: PyTree) -> None:
    """Writes a params checkpoint (``{"params": params}`` via ``StandardSave``) to ``path``,
    which must not exist. The format ``restore_params_only`` and ``config.init.checkpoint`` read.
    On s3:// it is written locally, then uploaded."""
    target = storage.path(path)
    if _is_s3(target):
        with tempfile.TemporaryDirectory(prefix="umg-jax-ckpt-") as d:
            save_params(pathlib.Path(d) / "params", params)
            storage.copy_tree(pathlib.Path(d) / "params", target)
        return
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, {"params": params})
        ckptr.wait_until_finished()


def restore_params_only(path: storage.PathLike, abstract_params: PyTree) -> PyTree:
    """Params from a params checkpoint (``save_params``) or from a training checkpoint step
    directory (its ``state/params``), read into ``abstract_params`` (ShapeDtypeStruct leaves with
    target shardings). Other entries of the checkpoint (optimizer state) are not read."""
    p = storage.path(path)
    if (p / "state").is_dir():  # Checkpointer step directory
        p = p / "state"
    if not p.is_dir():
        raise FileNotFoundError(f"params checkpoint {p} does not exist")
    target = {"params": abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with _orbax_readable(p) as src, ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(src, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
    return out["params"]


# ------------------------------------------------------------- finding trained params ---


def finalized_steps(checkpoints_dir: storage.PathLike) -> list[int]:
    """Steps under ``checkpoints_dir`` that orbax counts as finalised (renamed from their temp
    name locally, ``commit_success.txt`` written on gs://) and that hold a ``state``, ascending.
    A save interrupted mid-upload is never among them."""
    d = storage.path(checkpoints_dir)
    steps = ocp.path.step.checkpoint_steps(d) if d.is_dir() else []
    return sorted(s for s in steps if (d / str(s) / "state").is_dir())


def locate(path: storage.PathLike, step: int | None = None
           ) -> tuple[epath.Path, epath.Path | None]:
    """``(params checkpoint dir, model-config file or None)`` for any of: an import directory
    (``params/`` + ``model_config.json``, written by ``umg_jax.interop.import_torch``), a training
    workdir (``checkpoints/<step>/`` + ``config.json``; latest finalised step unless ``step``), or
    a bare params / step checkpoint directory. Local paths come back absolute. Raises
    ``FileNotFoundError`` with what was looked for."""
    p = storage.path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    if (p / "params").is_dir() and (p / "model_config.json").is_file():
        return p / "params", p / "model_config.json"
    if (p / "checkpoints").is_dir():
        steps = finalized_steps(p / "checkpoints")
        if not steps:
            raise FileNotFoundError(f"{p}/checkpoints holds no finalised <step>/state checkpoint")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"step {step} not in {p}/checkpoints (have {steps})")
        s = step if step is not None else steps[-1]
        cfg = p / "config.json"
        return p / "checkpoints" / str(s), cfg if cfg.is_file() else None
    return p, None


# ------------------------------------------------------------- files a directory names ---
# A run or import directory names the files it needs (a SigLIP's SentencePiece model) relative to
# itself, so that the directory can be moved to another folder or machine and still load.
TOKENIZER_FILE = "tokenizer.model"
_NOT_A_PATH = ("", "clip")  # model.text.tokenizer values that name no file


def _exists(p: storage.PathLike) -> bool:
    return storage.path(p).exists()


def resolve_stored_path(stored: str, directory: storage.PathLike) -> str:
    """A file path read from ``directory``'s config, as a path usable from here (a bucket URL
    when ``directory`` is on a bucket: read it with ``umg_jax.storage``).

    Relative: against ``directory`` (a cwd-relative path of an older run still works when it
    exists from the cwd). Absolute (older directories): as is while it exists, else the file of
    the same name inside ``directory`` (the directory was moved with its file). When nothing
    exists, the path the caller should report as missing."""
    d = storage.path(directory)
    if storage.is_remote(stored):
        return stored
    p = pathlib.PurePosixPath(stored)
    if p.is_absolute():
        if os.path.exists(stored):
            return stored
        moved = d / p.name
        return os.fspath(moved) if _exists(moved) else stored
    for candidate in (d / p, stored, d / p.name):  # stored: cwd-relative, from an older run
        if _exists(candidate):
            return os.fspath(candidate)
    return os.fspath(d / p)


def resolve_model_paths(model: dict, directory: storage.PathLike) -> dict:
    """``model`` (a ``config.model`` dict read from ``directory``) with the files it names
    resolved by :func:`resolve_stored_path`; the dict is changed in place and returned."""
    text = model.get("text")
    tok = text.get("tokenizer") if isinstance(text, dict) else None
    if isinstance(tok, str) and tok not in _NOT_A_PATH:
        text["tokenizer"] = resolve_stored_path(tok, directory)
    return model


def bundle_model_files(model: dict, directory: storage.PathLike) -> dict:
    """Copies the files ``model`` (a ``config.model`` dict) names into ``directory`` and names them
    relative to it (the tokenizer as ``tokenizer.model``), so that the directory holds all it
    needs. Files that do not exist are left named as they are (config checks report them).
    ``model`` is changed in place and returned."""
    text = model.get("text")
    tok = text.get("tokenizer") if isinstance(text, dict) else None
    if not isinstance(tok, str) or tok in _NOT_A_PATH:
        return model
    src = storage.path(tok)
    if not (src.exists() and not src.is_dir()):
        return model
    dst = storage.path(directory) / TOKENIZER_FILE
    same = (not storage.is_remote(dst) and not storage.is_remote(src) and dst.exists()
            and os.path.samefile(src, dst))  # resuming with the copy itself named
    if not same and os.fspath(src) != os.fspath(dst):
        storage.write_bytes(dst, storage.read_bytes(src))
    text["tokenizer"] = TOKENIZER_FILE
    return model


def _read_config_file(path: storage.PathLike) -> dict:
    try:
        d = json.loads(storage.read_text(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"cannot read {path}: not a JSON object")
    return d


def read_model_config(path: storage.PathLike):
    """The ``config.model`` section from a ``model_config.json`` or a workdir ``config.json``, the
    files it names resolved against the file's directory (:func:`resolve_stored_path`)."""
    import ml_collections as mlc

    path = storage.path(path)
    d = _read_config_file(path)
    model = d["model"] if "model" in d and "vision" not in d else d
    return mlc.ConfigDict(resolve_model_paths(model, path.parent))


SEG_CALIBRATION = "seg_calibration.json"  # a head run's thresholds, chosen on a validation split
CALIBRATED_KEYS = ("object_threshold", "overlap_threshold")  # what that file must hold
# ... and may hold (files written before it was calibrated lack it: the config's value stays)
CALIBRATED_OPTIONAL = ("pixel_weight",)


def read_seg_calibration(workdir: storage.PathLike) -> dict | None:
    """``workdir/seg_calibration.json`` (written by ``python -m umg_jax.evaluate --calibrate``
    or at the end of a head run), or None. ``ValueError`` for a file without the thresholds."""
    p = storage.path(workdir) / SEG_CALIBRATION
    if not p.exists():
        return None
    d = _read_json_dict(p)
    missing = [k for k in CALIBRATED_KEYS if not isinstance(d.get(k), (int, float))]
    if missing:
        raise ValueError(f"{p} lacks {missing}: delete it or rerun the calibration")
    return d


def apply_seg_calibration(config, workdir: storage.PathLike) -> dict | None:
    """Sets ``config.seg``'s panoptic thresholds (and the ensemble's ``pixel_weight`` when the
    file has it) from the workdir's calibration file, when there is one (the config's own values
    otherwise); returns the file's content."""
    d = read_seg_calibration(workdir)
    if d is not None:
        for k in CALIBRATED_KEYS:
            config.seg[k] = float(d[k])
        for k in CALIBRATED_OPTIONAL:
            if isinstance(d.get(k), (int, float)):
                config.seg[k] = float(d[k])
    return d


def read_run_config(path: storage.PathLike):
    """A workdir's full ``config.json`` with the files its model names resolved against the
    workdir (:func:`resolve_stored_path`), and a head run's calibrated thresholds
    (:func:`apply_seg_calibration`)."""
    import ml_collections as mlc

    path = storage.path(path)
    d = _read_config_file(path)
    if isinstance(d.get("model"), dict):
        resolve_model_paths(d["model"], path.parent)
    config = mlc.ConfigDict(d)
    if (d.get("seg") or {}).get("enabled"):
        apply_seg_calibration(config, path.parent)
    return config


def _read_json_dict(path: storage.PathLike | None) -> dict:
    """A JSON object file as a dict; ``{}`` when there is no such (readable) file."""
    if path is None:
        return {}
    try:
        d = storage.read_json(path)
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def read_peft_config(path: storage.PathLike | None):
    """The ``config.peft`` section of a workdir ``config.json`` when LoRA was on, else None."""
    import ml_collections as mlc

    peft = _read_json_dict(path).get("peft")
    lora = peft and peft.get("enabled") and peft.get("method", "lora") == "lora"
    return mlc.ConfigDict(peft) if lora else None


def read_seg_config(path: storage.PathLike | None):
    """The full config of a workdir ``config.json`` whose run trained the segmentation head
    (params ``{"base", "seg", ...}``), with its calibrated thresholds
    (:func:`apply_seg_calibration`), else None."""
    import ml_collections as mlc

    d = _read_json_dict(path)
    seg = d.get("seg")
    if not (seg and seg.get("enabled")):
        return None
    if isinstance(d.get("model"), dict):
        resolve_model_paths(d["model"], storage.path(path).parent)
    config = mlc.ConfigDict(d)
    apply_seg_calibration(config, storage.path(path).parent)
    return config


def _restore_cpu(path: storage.PathLike, abstract: PyTree) -> PyTree:
    """:func:`restore_params_only` onto the CPU with a one-line ``ValueError`` on mismatch."""
    dev = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                            abstract)
    try:
        return restore_params_only(path, abstract)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax raises many types for a tree mismatch
        raise ValueError(f"cannot restore params of this model config from {path}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def load_params(path: storage.PathLike, model_cfg, peft_cfg=None, nested: bool = False
                ) -> PyTree:
    """Params of ``model_cfg`` as numpy arrays from a params checkpoint or a training step
    directory (see :func:`locate`); the optimizer state is not read. With ``peft_cfg`` (a PEFT
    run, :func:`read_peft_config`) the checkpoint holds ``{"base", "lora"}`` and the LoRA deltas
    are merged; ``nested``: the CLIP params live under ``base`` (a segmentation-head run,
    :func:`read_seg_config`). The result is always a plain CLIP tree."""
    from umg_jax.models import clip

    abstract = clip.abstract_params(model_cfg)
    if peft_cfg is not None:
        from umg_jax.peft import lora

        abstract = {"base": abstract, "lora": jax.eval_shape(
            lambda: lora.init(clip.abstract_params(model_cfg), peft_cfg, jax.random.key(0)))}
    elif nested:
        abstract = {"base": abstract}
    params = _restore_cpu(path, abstract)
    if peft_cfg is not None:
        from umg_jax.peft import lora

        return lora.merge(params["base"], params["lora"], peft_cfg)
    return jax.tree.map(np.asarray, params["base"] if nested else params)


def load_seg_params(path: storage.PathLike, config) -> PyTree:
    """The mask decoder's params (numpy) of a segmentation-head run (``config``: its full
    config, :func:`read_seg_config`)."""
    from umg_jax.models import mask_decoder

    abstract = jax.eval_shape(lambda: mask_decoder.init_params(config, jax.random.key(0)))
    return jax.tree.map(np.asarray, _restore_cpu(path, {"seg": abstract})["seg"])
