"""Training metrics without TensorFlow: writers, the console progress line, throughput / data-wait
accounting, and analytic model FLOPs for MFU.

* ``MetricWriter``: ``workdir/metrics.jsonl`` (one ``{"step": s, name: value, ...}`` object per
  line, appended across restarts, also on a bucket: ``umg_jax.storage.AppendLog``; non-finite
  values are written as ``null``) and TensorBoard event files in ``workdir/tensorboard`` via
  tensorboardX (on a bucket: written locally, uploaded every ``TB_UPLOAD_EVERY_S`` and at close).
  Only process 0 writes.
* ``Progress``: ``update(step, metrics) -> str`` console line (step, loss, img/s, data-wait %,
  ETA); ``timer(name)`` context managers split wall time into "data" / "step" / ...; the measured
  rates of the last window are in ``Progress.last`` for logging.
* ``vit_forward_flops`` / ``text_forward_flops`` / ``clip_train_flops``: 2 x multiply-adds of every
  matmul (QKV, scores, attention x V, out projection, MLP, patch embedding, projections);
  elementwise work (LayerNorm, softmax, GELU) is not counted. Train step = 3 x forward.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from umg_jax import storage


def _to_float(v: Any) -> float | None:
    try:
        f = float(np.asarray(v))
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric value {v!r} is not a scalar") from e
    return f if math.isfinite(f) else None


def _is_primary() -> bool:
    import jax

    return jax.process_index() == 0


def _tensorboardx_writer():
    """tensorboardX's ``SummaryWriter`` class, imported without dragging in torch: tensorboardX
    does an optional ``import torch`` at import time (seconds and ~1 GB when torch is installed,
    only to recognise torch tensors); a ``None`` entry in ``sys.modules`` makes it fail fast."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


TB_UPLOAD_EVERY_S = 30.0  # bucket workdirs: event files are re-uploaded whole at most this often


class MetricWriter:
    """Scalars to ``workdir/metrics.jsonl`` and (``tensorboard``) TensorBoard event files;
    ``workdir`` may be a bucket (``umg_jax.storage``).

    ``primary``: whether this process writes (default: ``jax.process_index() == 0``); the others
    accept every call and do nothing.

    On a bucket the event files are written into a local temporary directory and copied to
    ``workdir/tensorboard`` (whole files: objects cannot be appended to) on the first write, then
    at most every ``TB_UPLOAD_EVERY_S`` seconds and at ``close()``. tensorboardX's own gs://
    writer is not used: its ``close`` is not idempotent, so every writer uploads its file again
    when garbage-collected (and blocks for two minutes of retries if the store is gone by then).
    """

    def __init__(self, workdir: storage.PathLike, tensorboard: bool = True,
                 primary: bool | None = None):
        self.workdir = storage.path(workdir)
        self.primary = _is_primary() if primary is None else primary
        self._jsonl = None
        self._tb = None
        self._tb_local: str | None = None  # bucket workdirs: where the events are written
        self._tb_uploaded = -math.inf
        if not self.primary:
            return
        self._jsonl = storage.AppendLog(self.workdir / "metrics.jsonl")
        if tensorboard:
            logdir = os.fspath(self.workdir / "tensorboard")
            if storage.is_remote(logdir):
                self._tb_local = logdir = tempfile.mkdtemp(prefix="umg-jax-tensorboard-")
            self._tb = _tensorboardx_writer()(logdir=logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One JSON line ``{"step": step, **scalars}`` and one TensorBoard scalar per name.
        Values: python / numpy / jax scalars."""
        if not self.primary:
            return
        values = {str(k): _to_float(v) for k, v in scalars.items()}
        if "step" in values:
            raise ValueError("'step' is reserved in write_scalars")
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        # Every line reaches the file (on a bucket: the whole object is rewritten) before the
        # next step: a killed run keeps its metrics up to its last log step.
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, float("nan") if v is None else v, int(step))
            self._upload_tb()

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Writes ``workdir/hparams.json`` and a text summary (TensorBoard "Text" tab)."""
        if not self.primary:
            return
        flat = _flatten(hparams)
        storage.write_text(self.workdir / "hparams.json", json.dumps(flat, indent=1, default=str))
        if self._tb is not None:
            rows = "\n".join(f"| {k} | {v} |" for k, v in flat.items())
            self._tb.add_text("hparams", "| name | value |\n|---|---|\n" + rows, 0)

    def _upload_tb(self, force: bool = False) -> None:
        """Bucket workdirs: the local event files to ``workdir/tensorboard`` (when due)."""
        if self._tb_local is None or self._tb is None:
            return
        if force or time.monotonic() - self._tb_uploaded >= TB_UPLOAD_EVERY_S:
            self._tb.flush()
            storage.copy_tree(self._tb_local, self.workdir / "tensorboard")
            self._tb_uploaded = time.monotonic()

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()
            self._upload_tb(force=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            if self._tb_local is not None:
                storage.copy_tree(self._tb_local, self.workdir / "tensorboard")
                shutil.rmtree(self._tb_local, ignore_errors=True)
                self._tb_local = None
            self._tb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (ConfigDicts via ``to_dict``)."""
    if hasattr(d, "to_dict"):
        d = d.to_dict()
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if hasattr(v, "to_dict") or isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, bool | int | float | str) or v is None else str(v)
    return out


def read_jsonl(path: storage.PathLike) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a torn last line from a killed run is skipped)."""
    rows = []
    for line in storage.read_text(path).splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def format_duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class Progress:
    """Throughput, data-wait fraction and ETA over windows between ``update`` calls.

    ``batch_size``: examples per step (global), for examples/s. Usage::

        with progress.timer("data"): batch = next(it)
        with progress.timer("step"): state, m = train_step(state, batch)
        if step % every == 0: print(progress.update(step, {"loss": float(m["loss"])}))

    ``last`` (after ``update``): ``steps_per_sec``, ``examples_per_sec``, ``data_wait_frac``
    (share of the window's wall time spent inside ``timer("data")``), ``<name>_frac`` for the
    other timers, ``eta_s``.
    """

    def __init__(self, total_steps: int, start_step: int = 0, batch_size: int | None = None):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self._t = time.perf_counter()
        self._step = start_step
        self._timers: dict[str, float] = defaultdict(float)
        self.last: dict[str, float] = {}

    @contextlib.contextmanager
    def timer(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._timers[name] += time.perf_counter() - t0

    def reset(self, step: int) -> None:
        """Starts a new window at ``step`` without reporting (e.g. after the compile step)."""
        self._t, self._step = time.perf_counter(), step
        self._timers.clear()

    def measure(self, step: int) -> dict[str, float]:
        """Rates over the window since the previous call, then starts a new window."""
        now = time.perf_counter()
        wall = max(now - self._t, 1e-9)
        steps = step - self._step
        out = {"steps_per_sec": steps / wall}
        if self.batch_size:
            out["examples_per_sec"] = steps * self.batch_size / wall
        out["data_wait_frac"] = self._timers.get("data", 0.0) / wall
        for name, t in self._timers.items():
            if name != "data":
                out[f"{name}_frac"] = t / wall
        out["eta_s"] = (self.total_steps - step) / out["steps_per_sec"] if steps > 0 else math.inf
        self.reset(step)
        self._t = now
        self.last = out
        return out

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> str:
        """``measure(step)`` and the console line, e.g.
        ``step 120/600 (20%) | loss 2.3456 | 412.3 img/s | data 3% | ETA 1m05s``."""
        r = self.measure(step)
        parts = [f"step {step}/{self.total_steps} ({100 * step / max(self.total_steps, 1):.0f}%)"]
        if metrics and "loss" in metrics:
            loss = _to_float(metrics["loss"])
            parts.append(f"loss {loss:.4f}" if loss is not None else "loss nan")
        if "examples_per_sec" in r:
            parts.append(f"{r['examples_per_sec']:.1f} img/s")
        else:
            parts.append(f"{r['steps_per_sec']:.2f} steps/s")
        parts.append(f"data {100 * r['data_wait_frac']:.0f}%")
        parts.append(f"ETA {format_duration(r['eta_s'])}")
        return " | ".join(parts)


def mfu(model_flops_per_step: float, step_time_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over ``peak_flops`` (FLOP/s of all the
    devices the step runs on)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
    if step_time_s <= 0:
        raise ValueError(f"step_time_s must be > 0, got {step_time_s}")
    return model_flops_per_step / step_time_s / peak_flops



def mfu_peak(devices, dtype: str = "float32", measure=None) -> tuple[float, str]:
    """The MFU denominator of a run on ``devices``: ``(FLOP/s of all of them, where it came
    from)``.

    TPU / GPU: the spec bf16 peak of the device kind (``umg_jax/accelerators.toml``) times the
    device count. A short timed matmul there measures launch overhead, not the peak, and would
    inflate MFU several times over. CPU: measured (``measure``, default
    :func:`measure_peak_flops`), as no spec fits every host. An accelerator the table lacks:
    ``(0.0, ...)``, i.e. no MFU rather than a wrong one.
    """
    from umg_jax import accelerators
    from umg_jax.ops import platform

    devices = list(devices)
    spec = accelerators.spec_peak_flops(devices)
    if spec:
        return spec, f"spec bf16 peak of {len(devices)} x {devices[0].device_kind}"
    if platform.of_devices(devices) == "cpu":
        measure = measure or measure_peak_flops
        return measure(dtype=dtype), f"measured {dtype} matmul on {len(devices)} CPU device(s)"
    return 0.0, (f"no spec peak for {devices[0].device_kind!r} in umg_jax/accelerators.toml: "
                 "MFU not reported (set log.peak_flops)")


@functools.cache  # once per process: the devices do not change, every train() call reuses it
def measure_peak_flops(n: int = 1024, repeats: int = 10, dtype: str = "float32") -> float:
    """Measured matmul FLOP/s of all the run's devices together, for MFU.

    Every local device multiplies its own ``[n, n]`` pair (one jitted batched dot sharded over
    the devices, so fake CPU devices share the host's cores as in training); the best of
    ``repeats`` timed runs, times ``jax.process_count()`` (hosts assumed alike). Well under 1 s on a
    2-core CPU at ``n=1024``. Returns FLOP/s (float)."""
    import jax
    import jax.numpy as jnp

    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    x = jax.device_put(jnp.ones((len(devices), n, n), dtype), spec)
    dot = jax.jit(lambda a: jnp.einsum("bij,bjk->bik", a, a,
                                       preferred_element_type=jnp.float32),
                  out_shardings=spec)
    jax.block_until_ready(dot(x))  # compile
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(dot(x))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 * len(devices) * jax.process_count() / best

def _block_flops(n: int, d: int, hidden: int) -> int:
    """One pre-LN transformer block on ``n`` tokens of width ``d``."""
    qkv = 2 * n * d * 3 * d
    attn = 2 * (2 * n * n * d)  # scores q.k and probabilities x v
    out = 2 * n * d * d
    mlp = 2 * (2 * n * d * hidden)
    return qkv + attn + out + mlp


def vit_forward_flops(image_size: int, patch_size: int, width: int, layers: int,
                      embed_dim: int, mlp_ratio: float = 4.0,
                      dense_mode: str | None = "maskclip") -> int:
    """Forward matmul FLOPs of the vision tower for one image.

    ``dense_mode``: None = plain CLIP (only the class token is projected); "plain" = every token
    is projected to the joint space (dense features); "maskclip" = as "plain", and the last block
    runs the class token through attention and the patch tokens through ``out(value(x))``
    (``umg_jax.models.layers.ResidualBlock``), as the model computes them.
    """
    g = image_size // patch_size
    p = g * g
    n = p + 1
    d = width
    hidden = int(width * mlp_ratio)
    patch = 2 * p * (patch_size * patch_size * 3) * d
    if dense_mode is None:
        return patch + layers * _block_flops(n, d, hidden) + 2 * d * embed_dim
    proj = 2 * n * d * embed_dim
    if dense_mode == "plain":
        return patch + layers * _block_flops(n, d, hidden) + proj
    if dense_mode != "maskclip":
        raise ValueError(f"dense_mode must be None, 'plain' or 'maskclip', got {dense_mode!r}")
    last = (2 * d * d  # class-token query
            + 2 * (2 * n * d * d)  # keys and values of all tokens
            + 2 * (2 * n * d)  # class-token scores and attention x V
            + 2 * d * d  # class-token out projection
            + 2 * (2 * p * d * d)  # patch value path: value, then out
            + 2 * (2 * n * d * hidden))  # MLP on all tokens
    return patch + (layers - 1) * _block_flops(n, d, hidden) + last + proj


def text_forward_flops(context_length: int, width: int, layers: int, embed_dim: int,
                       mlp_ratio: float = 4.0) -> int:
    """Forward matmul FLOPs of the text tower for one sequence (projection of the pooled token
    only; the embedding lookup is not a matmul)."""
    hidden = int(width * mlp_ratio)
    return layers * _block_flops(context_length, width, hidden) + 2 * width * embed_dim


def clip_forward_flops(model_cfg, num_texts_per_example: float) -> int:
    """Forward FLOPs per example of ``config.model``: one image + ``num_texts_per_example`` texts
    (caption, tag prompts, region and mask texts that the step encodes)."""
    v, t = model_cfg.vision, model_cfg.text
    dense_mode = model_cfg.get("dense_mode", "maskclip")
    vis = vit_forward_flops(v.image_size, v.patch_size, v.width, v.layers, model_cfg.embed_dim,
                            v.mlp_ratio, dense_mode)
    txt = text_forward_flops(t.context_length, t.width, t.layers, model_cfg.embed_dim,
                             t.mlp_ratio)
    return int(vis + num_texts_per_example * txt)


def clip_train_flops(model_cfg, batch_size: int, num_texts_per_example: float) -> float:
    """Model FLOPs of one train step of ``batch_size`` examples: 3 x forward (the backward pass
    costs two forward matmuls per matmul). Remat recompute is not counted (model FLOPs, not
    hardware FLOPs)."""
    return 3.0 * batch_size * clip_forward_flops(model_cfg, num_texts_per_example)
