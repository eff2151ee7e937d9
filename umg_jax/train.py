r"""Trains UMG-CLIP: ``python -m umg_jax.train --config configs/tiny.py --workdir DIR``.

The same command runs on one CPU, a multi-GPU node or a TPU pod slice; on several hosts every
process runs it (``jax.distributed.initialize`` is called when ``--coordinator`` is given or the
cluster environment is detected). Override any config value with ``--config.x=y`` (``--helpfull``
lists them all). Re-running the command with the same workdir resumes from the latest checkpoint,
model, optimizer and data-iterator state alike, and reproduces the uninterrupted run exactly.

Sections, in order: setup -> config checks -> mesh -> data -> model & optimizer -> state (init,
import or resume) -> compile -> loop (metrics, checkpoints, evals).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import jax
import ml_collections as mlc
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from umg_jax import checkpoint as ckpt_lib
from umg_jax import config_checks, optim, sharding, step as step_lib
from umg_jax import metrics as metrics_lib
from umg_jax.data import pipeline
from umg_jax.data import schema
from umg_jax.models import clip

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0 for multi-host runs (with --num_processes and "
    "--process_id); on TPU pods / SLURM leave unset, it is auto-detected.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


class TrainingError(RuntimeError):
    """A run that cannot go on; the message is the one line the user sees."""


def _maybe_init_distributed() -> None:
    if _COORDINATOR.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    elif any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID")) and \
            int(os.environ.get("SLURM_NTASKS", "2")) > 1:
        jax.distributed.initialize()


def train(config: mlc.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last logged metrics."""
    workdir = str(pathlib.Path(workdir).resolve())
    # ---------------------------------------------------------------- config checks + mesh
    config_checks.validate(config)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_divisible(config.batch_size, mesh)
    nproc = jax.process_count()
    local_batch = config.batch_size // nproc
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    logging.info("mesh %s, global batch %d (%d per process)", dict(mesh.shape),
                 config.batch_size, local_batch)

    # ---------------------------------------------------------------- data
    data_dir = pipeline.ensure_data(config.data, split="train")
    data_iter = pipeline.make_iterator(config.data, config.model, data_dir=data_dir,
                                       batch_size=local_batch, train=True, seed=config.seed)
    batch_shapes = schema.batch_shapes_from_config(config)

    # ---------------------------------------------------------------- model & optimizer
    model = clip.build_model(config.model)
    abstract_params = clip.abstract_params(config.model)
    tx, schedule = optim.make_optimizer(config.optim, abstract_params, config.total_steps)
    abstract = step_lib.abstract_state(config, tx)
    state_sh = step_lib.state_shardings(abstract, mesh)
    train_step = step_lib.make_train_step(model, tx, config, mesh, state_sh, batch_shapes)

    # ---------------------------------------------------------------- state: resume / import / init
    ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), every_steps=config.ckpt.every_steps,
        keep=config.ckpt.keep, keep_best_metric=config.ckpt.keep_best_metric or None,
        best_mode=config.ckpt.best_mode)
    abstract_sh = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                               abstract, state_sh)
    start = ckpt.latest_step()
    if start is not None:
        state, data_state, _ = ckpt.restore(start, abstract_sh)
        if data_state is not None:
            data_iter.set_state(data_state)
        logging.info("resumed from step %d", start)
    else:
        rng = jax.random.key(config.seed)
        init_fn = jax.jit(lambda r: step_lib.init_state(clip.init_params(config.model, r), tx),
                          out_shardings=state_sh)
        state = init_fn(rng)
        init_from = config.init.get("from", "")
        if init_from:
            params = ckpt_lib.restore_params_only(init_from, abstract_sh.params)
            state = state.replace(params=params)
            logging.info("initialised params from %s", init_from)
        start = 0

    # ---------------------------------------------------------------- loop
    writer = metrics_lib.MetricWriter(workdir, tensorboard=config.log.tensorboard) \
        if is_main else None
    progress = metrics_lib.Progress(config.total_steps, start)
    flops = metrics_lib.clip_train_flops(config.model, config.batch_size,
                                         _texts_per_example(config))
    peak = config.log.peak_flops  # of all devices together (configs/common.py:log_config)
    evaluators = _make_evaluators(config, model, mesh)
    sync_every = max(1, min(config.log.every_steps, 16))  # fake-device deadlock: sync <= 16
    last: dict = {}
    t_data = t_total = 0.0
    t0 = time.perf_counter()
    n_window = 0
    for step in range(start + 1, config.total_steps + 1):
        ts = time.perf_counter()
        local = next(data_iter)
        batch = sharding.put_batch(local, mesh)
        t_data += time.perf_counter() - ts
        state, metrics = train_step(state, batch)
        n_window += 1
        if step % sync_every == 0 or step == config.total_steps:
            metrics = jax.device_get(metrics)
            if int(metrics["nonfinite"]) >= config.train.max_nonfinite:
                raise TrainingError(
                    f"stopping: {int(metrics['nonfinite'])} non-finite losses in a row at step "
                    f"{step}; the last good checkpoint (step {ckpt.latest_step()}) is intact")
            if step % config.log.every_steps == 0 or step == config.total_steps:
                dt = time.perf_counter() - t0
                t_total += dt
                scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
                scalars["lr"] = float(schedule(step - 1))
                scalars["examples_per_s"] = n_window * config.batch_size / dt
                scalars["data_wait_frac"] = t_data / dt
                scalars["mfu"] = metrics_lib.mfu(flops, dt / n_window, peak)
                last = scalars
                if writer:
                    writer.write_scalars(step, scalars)
                if is_main:
                    print(progress.update(step, scalars), flush=True)
                t0, t_data, n_window = time.perf_counter(), 0.0, 0
        if evaluators and (step % config.eval.every_steps == 0 or step == config.total_steps):
            results = {}
            for name, ev in evaluators.items():
                results.update({f"{name}/{k}": v for k, v in ev(state.params).items()})
            if writer:
                writer.write_scalars(step, results)
            if is_main:
                print(" ".join(f"{k}={v:.4f}" for k, v in results.items()), flush=True)
            last.update(results)
        if ckpt.should_save(step) or step == config.total_steps:
            jax.block_until_ready(state)
            ckpt.save(step, state, data_state=data_iter.get_state(),
                      meta={"step": step, "config": config.to_json_best_effort()},
                      metrics=last or None, force=step == config.total_steps)
    ckpt.wait()
    ckpt.close()
    if writer:
        writer.close()
    if is_main:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(last, f, indent=2)
    return last


def _texts_per_example(config: mlc.ConfigDict) -> int:
    sizes = {"text": 1, "tags": config.data.max_tags, "region_text": config.data.max_regions,
             "mask_text": config.data.max_masks}
    return sum(sizes[f] for f, _ in step_lib.needed_text_fields(config.loss))


def _make_evaluators(config, model, mesh) -> dict:
    """Periodic evaluation hooks: ``{name: fn(params) -> {metric: value}}`` (see evaluate.py)."""
    if not config.eval.every_steps:
        return {}
    from umg_jax import evaluate  # noqa: PLC0415  (heavy; only when evals are on)

    return evaluate.make_hooks(config, model, mesh)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        print("error: --config and --workdir are required, e.g. "
              "python -m umg_jax.train --config configs/tiny.py --workdir /tmp/umg_tiny",
              file=sys.stderr)
        sys.exit(2)
    _maybe_init_distributed()
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except (config_checks.ConfigError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, config_checks.ConfigError) else 1)


if __name__ == "__main__":
    jax.config.update("jax_threefry_partitionable", True)
    app.run(main)
