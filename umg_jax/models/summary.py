"""Per-module parameter table of a config, without allocating the weights.

    python -m umg_jax.models.summary --config configs/vit_l.py [--depth 3]

Shapes come from ``jax.eval_shape``, so ViT-L/14 prints in a second on a laptop.
"""

from __future__ import annotations

import collections
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from umg_jax.models import clip


# Flags are defined only when the module runs as a program, so that importing it (tests,
# other tools) never clashes with another module's absl flags of the same name.
def _define_flags() -> None:
    global _CONFIG, _DEPTH
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Model config file (configs/*.py).")
    _DEPTH = flags.DEFINE_integer("depth", 3, "Group parameters by the first N path components.")


def param_table(params, depth: int = 3) -> list[tuple[str, int, int]]:
    """Rows ``(module path, number of arrays, number of parameters)`` grouped at ``depth``,
    in first-seen order; ``params`` may be abstract (ShapeDtypeStruct leaves)."""
    from flax import traverse_util

    rows: dict[str, list[int]] = collections.OrderedDict()
    for path, leaf in traverse_util.flatten_dict(params).items():
        key = "/".join(path[:depth]) if len(path) > depth else "/".join(path[:-1]) or path[0]
        row = rows.setdefault(key, [0, 0])
        row[0] += 1
        row[1] += int(np.prod(leaf.shape))
    return [(k, a, n) for k, (a, n) in rows.items()]


def format_table(rows: list[tuple[str, int, int]]) -> str:
    total = sum(n for _, _, n in rows)
    width = max(len(r[0]) for r in rows + [("module", 0, 0)])
    lines = [f"{'module':<{width}}  {'arrays':>6}  {'params':>13}  {'share':>6}",
             "-" * (width + 33)]
    for name, arrays, n in rows:
        lines.append(f"{name:<{width}}  {arrays:>6}  {n:>13,}  {100 * n / total:>5.1f}%")
    lines += ["-" * (width + 33), f"{'total':<{width}}  {'':>6}  {total:>13,}"]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from umg_jax import host_platforms

    host_platforms.pin()  # the platforms this host has, before JAX's backends start
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        print("error: --config is required (e.g. --config configs/vit_l.py)", file=sys.stderr)
        sys.exit(2)
    params = clip.abstract_params(config.model)
    print(f"{config.get('name', 'model')}: image {config.model.vision.image_size}px "
          f"patch {config.model.vision.patch_size}, embed {config.model.embed_dim}")
    print(format_table(param_table(params, _DEPTH.value)))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
