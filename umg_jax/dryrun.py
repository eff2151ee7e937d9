r"""Pod-scale dry run: compile the real train step for a simulated mesh and say whether it fits.

    python -m umg_jax.dryrun --config configs/vit_l.py --devices 256 --target tpu-v4
    python -m umg_jax.dryrun --config configs/vit_l.py --devices 256 \
        --sweep batch_size=8192,16384,32768 --sweep mesh.fsdp=1,8,32 --json sweep.json

N fake CPU devices stand in for the accelerators; the train step is the one ``umg_jax.train``
runs (``umg_jax.step.make_train_step``), lowered with the real shardings on abstract inputs
(``jax.ShapeDtypeStruct``), so nothing is allocated. Per device it reports parameter,
optimizer-state, gradient, batch and temporary bytes (XLA's memory analysis), the total against the
target's HBM, FLOPs per step (XLA's cost analysis beside the analytic count), and the bytes that
collectives move per step (read from the compiled HLO). Exit status 1 when a configuration does not
fit, 2 on a bad request.

Caveats: XLA:CPU's buffer assignment stands in for the accelerator compiler's, so temporaries are an
estimate (typically within tens of percent); step time assumes the stated MFU.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags


# Flags are defined only when the module runs as a program, so that importing it (tests,
# other tools) never clashes with another module's absl flags of the same name.
def _define_flags() -> None:
    global _CONFIG, _DEVICES, _TARGET, _MFU, _SWEEP, _JSON
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vit_l.py.",
                                              lock_config=True)
    _DEVICES = flags.DEFINE_integer("devices", 8, "Number of simulated devices.")
    _TARGET = flags.DEFINE_string("target", "tpu-v4", "Device profile (see device_profiles.json).")
    _MFU = flags.DEFINE_float("mfu", 0.4, "Assumed model-FLOPs utilisation for the time estimate.")
    _SWEEP = flags.DEFINE_multi_string(
        "sweep", [], "key=v1,v2,... over config keys (batch_size, mesh.fsdp, model.remat, ...); "
        "several --sweep flags form a grid.")
    _JSON = flags.DEFINE_string("json", None, "Write the results as JSON to this path.")

GiB = 1024 ** 3
PROFILES_FILE = os.path.join(os.path.dirname(__file__), "device_profiles.json")


def load_profiles() -> dict:
    with open(PROFILES_FILE) as f:
        return json.load(f)


def analyse(config, *, target: dict, mfu: float = 0.4, devices=None) -> dict:
    """Lowers + compiles the train step for ``config`` on the current (fake) devices.

    Returns per-device bytes, FLOPs, collective bytes and the fit verdict against ``target``
    (``{"hbm_gib", "bf16_tflops"}``).
    """
    import jax
    import numpy as np

    from umg_jax import config_checks, hlo_stats, optim, sharding
    from umg_jax import step as step_lib
    from umg_jax.data import schema
    from umg_jax.models import clip

    devices = jax.devices() if devices is None else devices
    config_checks.validate(config, num_devices=len(devices))
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    model = clip.build_model(config.model)
    tx, _ = optim.make_optimizer(
        config.optim, jax.eval_shape(lambda: step_lib.init_params(config, jax.random.key(0))),
        config.total_steps, freeze=step_lib.frozen_regexes(config))
    abstract = step_lib.abstract_state(config, tx)
    state_sh = step_lib.state_shardings(abstract, mesh)
    shapes = schema.batch_shapes_from_config(config)
    step_fn = step_lib.make_train_step(model, tx, config, mesh, state_sh, shapes)
    batch_sh = sharding.batch_sharding(mesh)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract, state_sh)
    abstract_batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sh)
                      for k, (s, d) in shapes.items()}
    compiled = step_fn.lower(abstract_state, abstract_batch).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax returned one dict per partition
        cost = cost[0] if cost else {}

    def shard_bytes(tree) -> int:
        return int(sum(np.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                       for a in jax.tree.leaves(tree)))

    params_b = shard_bytes(abstract_state.params)
    opt_b = shard_bytes(abstract_state.opt_state)
    batch_b = shard_bytes(abstract_batch)
    temp_b = int(mem.temp_size_in_bytes)
    # Donated state aliases the output; the rest of the output is new memory.
    total_b = int(mem.argument_size_in_bytes + temp_b + mem.output_size_in_bytes
                  - mem.alias_size_in_bytes)
    analytic = step_lib.step_flops(config)
    n = len(devices)
    xla_flops = float(cost.get("flops", 0.0))
    coll = hlo_stats.collective_bytes(compiled.as_text())
    hbm = target["hbm_gib"] * GiB
    step_time = analytic / (n * target["bf16_tflops"] * 1e12 * mfu)
    return {
        "devices": n, "mesh": dict(mesh.shape), "batch_size": config.batch_size,
        "remat": bool(config.model.remat), "dtype": config.model.dtype,
        "bytes_per_device": {"params": params_b, "opt_state": opt_b, "gradients": params_b,
                             "batch": batch_b, "temp_xla": temp_b,
                             "arguments_xla": int(mem.argument_size_in_bytes), "total": total_b},
        "flops_per_step": {"analytic_total": analytic, "analytic_per_device": analytic / n,
                           "xla_per_device": xla_flops},
        "collective_bytes_per_device": coll,
        "hbm_bytes": hbm, "fits": total_b <= hbm, "margin_gib": (hbm - total_b) / GiB,
        "est_step_time_s": step_time, "est_images_per_s": config.batch_size / step_time,
        "mfu_assumed": mfu,
    }


def _parse_value(text: str, current):
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected a boolean, got {text!r}")
        return text.lower() in ("true", "1")
    return type(current)(text) if current is not None else text


def sweep_configs(config, sweeps: list[str]):
    """Yields ``(overrides, config)`` for the grid of ``key=v1,v2`` sweeps."""
    axes = []
    for s in sweeps:
        if "=" not in s:
            raise ValueError(f"--sweep {s!r}: expected key=v1,v2,...")
        key, values = s.split("=", 1)
        node = config
        for part in key.split(".")[:-1]:
            node = node[part]
        leaf = key.split(".")[-1]
        if leaf not in node:
            raise ValueError(f"--sweep {s!r}: unknown config key {key!r}")
        axes.append([(key, _parse_value(v, node[leaf])) for v in values.split(",")])
    for combo in itertools.product(*axes) if axes else [()]:
        c = config.copy_and_resolve_references()
        for key, value in combo:
            node = c
            for part in key.split(".")[:-1]:
                node = node[part]
            node[key.split(".")[-1]] = value
        yield dict(combo), c


def format_rows(rows: list[dict], target_name: str) -> str:
    head = (f"{'config':<34} {'params':>8} {'opt':>8} {'temp':>8} {'total':>8} {'HBM':>6} "
            f"{'fits':>5} {'TFLOP/dev':>9} {'coll GiB':>8} {'img/s':>9}")
    lines = [f"per-device memory in GiB on {target_name}", head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<34} error: {r['error']}")
            continue
        b = r["bytes_per_device"]
        lines.append(
            f"{r['name']:<34} {b['params'] / GiB:>8.2f} {b['opt_state'] / GiB:>8.2f} "
            f"{b['temp_xla'] / GiB:>8.2f} {b['total'] / GiB:>8.2f} {r['hbm_bytes'] / GiB:>6.0f} "
            f"{'yes' if r['fits'] else 'NO':>5} "
            f"{r['flops_per_step']['analytic_per_device'] / 1e12:>9.2f} "
            f"{sum(r['collective_bytes_per_device'].values()) / GiB:>8.2f} "
            f"{r['est_images_per_s']:>9.0f}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None:
        print("error: --config is required", file=sys.stderr)
        sys.exit(2)
    profiles = load_profiles()
    if _TARGET.value not in profiles:
        print(f"error: unknown --target {_TARGET.value!r}; known: {', '.join(sorted(profiles))}",
              file=sys.stderr)
        sys.exit(2)
    import jax

    # Must happen before the backend starts: the tool sets its own fake device count.
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
    if len(jax.devices()) != _DEVICES.value:
        print(f"error: could not create {_DEVICES.value} CPU devices (got {len(jax.devices())})",
              file=sys.stderr)
        sys.exit(2)
    from umg_jax import config_checks

    rows = []
    try:
        grid = list(sweep_configs(_CONFIG.value, _SWEEP.value))
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for overrides, cfg in grid:
        name = ",".join(f"{k}={v}" for k, v in overrides.items()) or cfg.get("name", "config")
        print(f"compiling {name} on {_DEVICES.value} devices ...", file=sys.stderr, flush=True)
        try:
            r = analyse(cfg, target=profiles[_TARGET.value], mfu=_MFU.value)
        except config_checks.ConfigError as e:
            if len(grid) == 1:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
            r = {"error": str(e)}
        rows.append({"name": name, "overrides": overrides, **r})
    print(format_rows(rows, _TARGET.value))
    for r in rows:
        if "error" not in r and not r["fits"]:
            print(f"{r['name']}: does not fit by {-r['margin_gib']:.2f} GiB per device "
                  f"({r['bytes_per_device']['total'] / GiB:.2f} GiB needed, "
                  f"{r['hbm_bytes'] / GiB:.0f} GiB available)")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump({"target": _TARGET.value, "devices": _DEVICES.value, "rows": rows}, f,
                      indent=2, default=str)
    ok = [r for r in rows if "error" not in r]
    if not ok or not all(r["fits"] for r in ok):
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
