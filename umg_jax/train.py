r"""Trains UMG-CLIP: ``python -m umg_jax.train --config configs/tiny.py --workdir DIR``.

The same command runs on one CPU, a multi-GPU node or a TPU pod slice; on several hosts every
process runs it (``jax.distributed.initialize`` is called when ``--coordinator`` is given or the
cluster environment is detected). Override any config value with ``--config.x=y``;
``--show_config`` prints every override with its value and meaning. Re-running the command with
the same workdir resumes from the latest checkpoint (model, optimizer and data-iterator state
alike) and reproduces the uninterrupted run exactly. SIGTERM / Ctrl-C (preemption) finishes the
current step, saves a checkpoint and exits; run the same command again to continue.

Sections, in order: setup -> config checks -> mesh -> data -> model & optimizer -> state (init,
import or resume) -> compile -> loop (metrics, checkpoints, evals).
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import signal
import sys
import threading
import time
import uuid

import jax
import ml_collections as mlc
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from umg_jax import checkpoint as ckpt_lib
from umg_jax import config_checks, config_lib, optim, sharding, storage
from umg_jax import metrics as metrics_lib
from umg_jax import step as step_lib
from umg_jax.data import pipeline, records, schema
from umg_jax.host_platforms import tpu_chips_attached
from umg_jax.models import clip


# Flags are defined only when the module runs as a program, so that importing it (tests,
# other tools) never clashes with another module's absl flags of the same name.
def _define_flags() -> None:
    global _CONFIG, _WORKDIR, _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _SHOW_CONFIG
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.",
                                              lock_config=True)
    _WORKDIR = flags.DEFINE_string(
        "workdir", None, "Directory for checkpoints, metrics and logs: a local path, gs://BUCKET/"
        "... or s3://BUCKET/... (on several hosts: a bucket or a filesystem all of them mount).")
    _COORDINATOR = flags.DEFINE_string(
        "coordinator", None, "host:port of process 0 for multi-host runs (with --num_processes and "
        "--process_id); on TPU pods / SLURM leave unset, it is auto-detected.")
    _NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
    _PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
    _SHOW_CONFIG = flags.DEFINE_bool(
        "show_config", False, "Print every --config.<key>=<value> override of the given --config "
        "with its current value and meaning, then exit.")


class TrainingError(RuntimeError):
    """A run that cannot go on; the message is the one line the user sees."""


def _maybe_init_distributed() -> None:
    """``jax.distributed.initialize`` for multi-host runs: explicit ``--coordinator``, else
    auto-detected on a Slurm job of several tasks or on a TPU VM (jax finds the slice's hosts
    through the TPU metadata server; a single-host slice is one process). Orbax's multi-host
    checkpointing needs the distributed runtime."""
    if _COORDINATOR.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    elif (any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID"))
          and int(os.environ.get("SLURM_NTASKS", "2")) > 1) or tpu_chips_attached():
        jax.distributed.initialize()


class _StopSignal:
    """SIGTERM / SIGINT (preemption, Ctrl-C) -> finish the current step, save, exit cleanly."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self) -> _StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.received = signum
        logging.warning("signal %d: saving a checkpoint after this step, then stopping", signum)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(config: mlc.ConfigDict, workdir: storage.PathLike) -> dict:
    """Runs (or resumes) training into ``workdir`` (a local path, ``gs://`` or ``s3://``: see
    ``umg_jax.storage``); returns the last logged metrics.

    Writes ``workdir/config.json`` (the full config; ``umg_jax.load`` reads the model part; a
    SentencePiece tokenizer is copied in beside it as ``tokenizer.model``),
    ``checkpoints/<step>/``, ``metrics.jsonl`` + TensorBoard events, ``final_metrics.json``.
    Raises ``storage.StorageError`` (before anything is compiled) when ``workdir`` cannot be
    written or, on several processes, is not the same directory for all of them.
    """
    # ---------------------------------------------------------------- config + run-dir checks
    config_checks.validate(config)
    workdir = check_run_dir(workdir)
    ckpt = ckpt_lib.Checkpointer(  # refuses stores orbax cannot write (s3://) before compiling
        workdir, every_steps=config.ckpt.every_steps, keep=config.ckpt.keep,
        keep_best_metric=config.ckpt.keep_best_metric or None, best_mode=config.ckpt.best_mode,
        async_save=config.ckpt.async_save)
    mesh = sharding.make_mesh(config.mesh)
    nproc = jax.process_count()
    local_batch = config.batch_size // nproc
    is_main = jax.process_index() == 0
    if is_main:
        _write_config(config, workdir)
    seg_vocab = None
    if step_lib.seg_enabled(config):
        # The head's training vocabulary: inference treats other labels as unseen (ensemble).
        meta = records.read_meta(pipeline.ensure_data(config.data, "train"))
        seg_vocab = step_lib.train_vocabulary(config, meta.get("categories") or [])
        if is_main:
            storage.write_json(workdir / "seg_vocab.json",
                               {"names": seg_vocab["names"], "holdout": list(config.seg.holdout)})
    logging.info("mesh %s, global batch %d (%d per process)", dict(mesh.shape),
                 config.batch_size, local_batch)

    peak = config.log.peak_flops  # of all devices together (configs/common.py:log_config)
    if peak < 0:  # before the data workers start competing for the cores (CPU measures)
        peak, source = metrics_lib.mfu_peak(jax.devices(), dtype=config.model.dtype)
        if is_main:
            print(f"MFU peak: {peak / 1e12:.3g} TFLOP/s, {source}; set log.peak_flops to fix "
                  "it", flush=True)

    # ---------------------------------------------------------------- data
    data_iter = pipeline.make_iterator(config.data, config.model, batch_size=local_batch,
                                       train=True, seed=config.seed)
    batch_shapes = schema.batch_shapes_from_config(config)

    # ---------------------------------------------------------------- model & optimizer
    model = clip.build_model(config.model)
    abstract_params = jax.eval_shape(lambda: step_lib.init_params(config, jax.random.key(0)))
    tx, schedule = optim.make_optimizer(config.optim, abstract_params, config.total_steps,
                                        freeze=step_lib.frozen_regexes(config))
    abstract = step_lib.abstract_state(config, tx)
    state_sh = step_lib.state_shardings(abstract, mesh)
    text_vocab = None
    if step_lib.text_ids_enabled(config.loss) and not step_lib.seg_enabled(config):
        # Tag prompts of the data set's vocabulary travel as ids; the step encodes each
        # distinct one once (models/text_slots.py).
        names = pipeline.text_vocabulary(pipeline.ensure_data(config.data, "train"))
        text_vocab = pipeline.text_vocab_tokens(config.data, config.model, names)
        logging.info("text vocabulary: %d texts", len(names))
    train_step = step_lib.make_train_step(model, tx, config, mesh, state_sh, batch_shapes,
                                          seg_vocab, text_vocab)
    shards = sharding.batch_size_divisor(mesh)
    local_shards = max(1, shards // nproc)
    configured = (step_lib.text_budgets(config, len(text_vocab), shards)
                  if text_vocab is not None else None)
    text_warned = False

    # ---------------------------------------------------------------- state: resume / import / init
    abstract_sh = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                               abstract, state_sh)
    start = ckpt.latest_step()
    if start is not None:
        state, data_state, _ = ckpt.restore(start, abstract_sh)
        if data_state is not None:
            data_iter.set_state(data_state)
        if is_main:
            print(f"resumed from {ckpt.directory}/{start}", flush=True)
    else:
        rng = jax.random.key(config.seed)
        init_from = config.init.get("checkpoint", "")
        if not init_from:
            state = jax.jit(lambda r: step_lib.init_state(step_lib.init_params(config, r), tx),
                            out_shardings=state_sh)(rng)
        else:
            # An import dir, a training workdir (latest step) or a params checkpoint; with PEFT
            # these are the frozen backbone's params.
            src, _ = ckpt_lib.locate(init_from)
            target = abstract_sh.params["base"] if step_lib.nested_params(config) \
                else abstract_sh.params
            # A pretrained CLIP has no adapters: those start fresh (identity) in init_params.
            base = ckpt_lib.restore_params_only(src, step_lib.without_adapters(target))
            # Built under jit: fresh, distinct output buffers (the state is donated every step).
            state = jax.jit(lambda b, r: step_lib.init_state(
                step_lib.init_params(config, r, base=b), tx), out_shardings=state_sh)(base, rng)
            if is_main:
                print(f"initialised params from {init_from}", flush=True)
        start = 0
    if start >= config.total_steps:
        if is_main:
            print(f"nothing to do: checkpoint step {start} >= total_steps {config.total_steps}")
        ckpt.close()
        return _read_final(workdir)

    # ---------------------------------------------------------------- loop
    writer = metrics_lib.MetricWriter(workdir, tensorboard=config.log.tensorboard) \
        if is_main else None
    if writer and start == 0:
        writer.write_hparams(config.to_dict())
    if is_main and (step_lib.nested_params(config) or step_lib.peft_enabled(config)):
        print(optim.trainable_report(abstract_params, step_lib.frozen_regexes(config)),
              flush=True)
    progress = metrics_lib.Progress(config.total_steps, start, batch_size=config.batch_size)
    trim = step_lib.trim_enabled(config)
    lengths = None  # (caption, element) token lengths of the last trimmed batch
    hooks = _make_evaluators(config)
    # Reading a value every <= 16 steps bounds the dispatch queue (fake CPU devices deadlock
    # beyond ~32 queued collective programs) and is when non-finite runs are detected.
    sync_every = max(1, min(config.log.every_steps, 16))
    last: dict = {}
    # A crash still lets a save in flight finish (never lose the last good checkpoint).
    try:
        with _StopSignal() as stop:
            step = start
            budget = float(config.train.get("time_budget_s", 0.0) or 0.0)
            t_start = time.perf_counter()
            out_of_time = False
            for step in range(start + 1, config.total_steps + 1):
                with progress.timer("data"):
                    local = next(data_iter)
                    # One agreement over hosts per step: trimmed lengths and text needs.
                    own = step_lib.text_lengths(local) if trim else ()
                    if text_vocab is not None:
                        own += step_lib.text_needs(local, config.loss, len(text_vocab),
                                                   local_shards)
                    agreed = _agree_max(own) if own else ()
                    budgets = None
                    if trim:  # exact: only columns that are padding in the global batch
                        lengths = agreed[:2]
                        local = step_lib.trim_text(local, lengths)
                    if text_vocab is not None:
                        needs = agreed[2:] if trim else agreed
                        budgets = step_lib.text_budgets(config, len(text_vocab), shards, needs)
                        if budgets != configured and not text_warned and is_main:
                            text_warned = True  # once: such steps are slower, never wrong
                            print(f"step {step}: the batch holds {sum(needs[1:])} distinct "
                                  f"vocabulary texts and {needs[0]} free-form texts on one "
                                  f"shard, over the budgets {configured} "
                                  "(loss.text_vocab_budget, loss.free_text_frac): such batches "
                                  f"run with budgets {budgets} (another compile; a batch sized "
                                  "to the device memory by a config's GEN-N recipe, searched at "
                                  "the configured budgets, may not fit with them: lower the "
                                  "batch or raise loss.free_text_frac)", flush=True)
                    batch = sharding.put_batch(local, mesh)
                state, metrics = train_step(state, batch, budgets)
                if step == start + 1:
                    jax.block_until_ready(metrics)  # compile time stays out of the rates
                    progress.reset(step)
                log_now = step % config.log.every_steps == 0 or step == config.total_steps
                if step % sync_every == 0 or log_now or stop.received is not None:
                    metrics = jax.device_get(metrics)
                    if int(metrics.get("text/overflow", 0)):
                        ckpt.wait()
                        raise TrainingError(
                            f"step {step}: a batch's texts overflowed the step's text budgets "
                            "although the host sized them (a bug; the update was skipped). "
                            "Set loss.free_text_frac=1.0 to encode every slot.")
                    if int(metrics["nonfinite"]) >= config.train.max_nonfinite:
                        ckpt.wait()
                        raise TrainingError(
                            f"stopping at step {step}: {int(metrics['nonfinite'])} non-finite "
                            f"losses in a row (updates were skipped); the last good checkpoint "
                            f"(step {ckpt.latest_step()}) is intact. Lower optim.lr or check the "
                            "data.")
                    if log_now and step > start + 1:
                        scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
                        line = progress.update(step, scalars)
                        scalars["lr"] = float(schedule(step - 1))
                        scalars.update(progress.last)
                        if peak:
                            scalars["mfu"] = metrics_lib.mfu(
                                step_lib.step_flops(config, lengths, None if budgets is None
                                                    else budgets[0] + shards * budgets[1]),
                                1.0 / max(progress.last["steps_per_sec"], 1e-9), peak)
                        dropped = pipeline.drop_counts(data_iter)
                        scalars["dropped_records"] = float(sum(dropped.values()))
                        last = scalars
                        if writer:
                            writer.write_scalars(step, scalars)
                        if is_main:
                            print(line, flush=True)
                if hooks and (step % config.eval.every_steps == 0
                              or step == config.total_steps):
                    results = _run_hooks(hooks, state.params, step)
                    if writer:
                        writer.write_scalars(step, results)
                    last.update(results)
                if budget and step % sync_every == 0:
                    out_of_time = _all_agree(time.perf_counter() - t_start > budget)
                final = step == config.total_steps or stop.received is not None or out_of_time
                if ckpt.should_save(step, force=final):
                    jax.block_until_ready(state)
                    ckpt.save(step, state, data_state=data_iter.get_state(),
                              meta={"step": step, "dropped": pipeline.drop_counts(data_iter)},
                              metrics=last or None, force=final)
                if stop.received is not None or out_of_time:
                    break
    finally:
        ckpt.close()
    if hasattr(data_iter, "close"):
        data_iter.close()
    if writer:
        writer.close()
    if is_main:
        storage.write_json(workdir / "final_metrics.json", {"step": step, **last})
        if (step_lib.seg_enabled(config) and config.seg.get("calibrate", False)
                and step == config.total_steps):
            _calibrate_seg(config, workdir)
        if out_of_time:
            print(f"time budget of {budget:.0f}s used up at step {step}", flush=True)
        if stop.received is not None:
            print(f"stopped by signal at step {step}; re-run the same command to resume",
                  flush=True)
    return last


def _write_config(config: mlc.ConfigDict, workdir: storage.PathLike) -> None:
    """``workdir/config.json``: the full config, with the files the model names (a SigLIP's
    SentencePiece model) copied into the workdir and named relative to it, so that the workdir
    can be moved and still load (``umg_jax.checkpoint.read_model_config`` resolves them)."""
    d = json.loads(config.to_json_best_effort())
    if isinstance(d.get("model"), dict):
        ckpt_lib.bundle_model_files(d["model"], workdir)
    storage.write_json(storage.path(workdir) / "config.json", d)


_CHECKS = itertools.count()  # coordination-service keys are set once: one suffix per check


def check_run_dir(workdir: storage.PathLike, timeout_s: int = 300) -> epath.Path:
    """``storage.path(workdir)`` after checking, on every process, that it can be written (bucket
    exists, credentials, permissions) and, on several processes, that all of them see the same
    directory: process 0 writes a random token there, every process must read it back. A local
    path that each host has for itself (N partial checkpoints, a resume that mixes them) is
    refused. Raises ``storage.StorageError``; nothing is compiled (the coordination service's
    key-value store and barriers, not collectives)."""
    wd = storage.check_writable_dir(workdir)
    n = jax.process_count()
    if n == 1:
        return wd
    import orbax.checkpoint as ocp

    client = ocp.multihost.get_jax_distributed_client()
    pid, ms = jax.process_index(), timeout_s * 1000
    tag = f"umg_jax/run_dir/{next(_CHECKS)}"
    marker = wd / ".shared-run-dir-check"
    if pid == 0:
        token = uuid.uuid4().hex
        storage.write_text(marker, token)
        client.key_value_set(f"{tag}/token", token)
    else:
        token = client.blocking_key_value_get(f"{tag}/token", ms)
    try:
        seen = storage.read_text(marker)
    except FileNotFoundError:
        seen = None
    client.key_value_set(f"{tag}/ok/{pid}", "1" if seen == token else "0")
    client.wait_at_barrier(f"{tag}/read", ms)
    if pid == 0:
        marker.unlink()
    blind = [i for i in range(n) if client.blocking_key_value_get(f"{tag}/ok/{i}", ms) != "1"]
    if blind:
        raise storage.StorageError(
            f"--workdir {wd} is not shared: process(es) {blind} of {n} do not see the files "
            "process 0 writes there (each host has its own local directory); use a bucket "
            "(gs://...) or a filesystem that every host mounts")
    return wd


def _all_agree(flag: bool) -> bool:
    """Process 0's decision, on every process (each host has its own clock)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def _agree_max(values: tuple[int, ...]) -> tuple[int, ...]:
    """Element-wise max over processes (each host sees its own part of the batch)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(values, np.int32))
    return tuple(int(x) for x in np.asarray(gathered).reshape(-1, len(values)).max(0))


def _read_final(workdir: storage.PathLike) -> dict:
    try:
        return storage.read_json(storage.path(workdir) / "final_metrics.json")
    except FileNotFoundError:
        return {}


def _run_hooks(hooks: dict, params, step: int) -> dict:
    results = {}
    for name, hook in hooks.items():
        t0 = time.perf_counter()
        # Counts (examples, boxes, masks evaluated) are constants of the eval set, not curves.
        results.update({f"eval/{k}": v for k, v in hook(params).items()
                        if not k.endswith(("count", "num_examples"))})
        logging.info("eval %s took %.1fs", name, time.perf_counter() - t0)
    if jax.process_index() == 0:
        print(f"eval @ {step}: " + " ".join(f"{k}={v:.4f}" for k, v in sorted(results.items())),
              flush=True)
    return results


def _calibrate_seg(config: mlc.ConfigDict, workdir: storage.PathLike) -> None:
    """The finished head's panoptic thresholds, chosen on the validation split; a run whose
    data has no validation split keeps its config's thresholds (said once)."""
    from umg_jax import evaluate  # noqa: PLC0415  (heavy; only for head runs)

    try:
        evaluate.calibrate_seg(str(workdir), config=config,
                               log=lambda s: print(s, flush=True))
    except evaluate.EvalError as e:
        print(f"seg thresholds not calibrated ({e}); the config's are used", flush=True)


def _make_evaluators(config) -> dict:
    """Periodic evaluation hooks: ``{name: fn(params) -> {metric: value}}`` (see evaluate.py)."""
    if not config.eval.every_steps:
        return {}
    from umg_jax import evaluate  # noqa: PLC0415  (heavy; only when evals are on)

    return evaluate.make_hooks(config)


def main(argv: list[str]) -> None:
    from umg_jax import host_platforms

    host_platforms.pin()  # the platforms this host has, before JAX's backends start
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _SHOW_CONFIG.value and _CONFIG.value is not None:
        config_dir = pathlib.Path(flags.FLAGS["config"].config_filename).parent
        print(config_lib.describe(_CONFIG.value, config_dir))
        return
    if _CONFIG.value is None or not _WORKDIR.value:
        print("error: --config and --workdir are required, e.g. "
              "python -m umg_jax.train --config configs/tiny.py --workdir /tmp/umg_tiny",
              file=sys.stderr)
        sys.exit(2)
    if not flags.FLAGS["verbosity"].present:  # orbax / jax INFO lines drown the progress lines
        logging.set_verbosity(logging.WARNING)
    _maybe_init_distributed()
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except (config_checks.ConfigError, storage.StorageError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, TrainingError) else 2)


if __name__ == "__main__":
    jax.config.update("jax_threefry_partitionable", True)
    _define_flags()
    app.run(main)
