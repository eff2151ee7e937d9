"""Training curves of a run as one PNG grid.

    python -m umg_jax.plot WORKDIR [--out PNG]

Reads ``WORKDIR/metrics.jsonl`` (``umg_jax.metrics.MetricWriter``) and writes ``--out``
(default ``WORKDIR/curves.png``): one panel per group (loss terms, accuracies, learning rate,
throughput, grad norm, logit scales, utilisation, then one panel per remaining prefix). After a
resume the file holds the killed run's rows past the checkpoint too; for each step the last row
written wins, so the curves show the run that continued.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import re
from collections.abc import Sequence

from umg_jax.metrics import read_jsonl

# (panel title, fullmatch regex over metric names), first match wins.
PANELS: tuple[tuple[str, str], ...] = (
    ("loss", r".*loss.*"),
    ("accuracy", r".*(acc|recall|r@\d+|_r\d+).*"),
    ("learning rate", r"(.*/)?lr"),
    ("throughput (examples/s)", r".*(examples_per_sec|img_per_sec).*"),
    ("grad norm", r".*grad_norm.*"),
    ("logit scales", r"(.*/)?(logit_scale|logit_bias|temperature|scale|bias)([/_].*)?"),
    ("utilisation", r".*(mfu|_frac)"),
)
SKIP = {"steps_per_sec", "eta_s"}


def series(rows: Sequence[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """``{name: (steps, values)}`` sorted by step; the last row for a step wins; nulls dropped."""
    per: dict[str, dict[int, float]] = {}
    for r in rows:
        step = int(r["step"])
        for k, v in r.items():
            if k == "step" or k in SKIP or v is None or not isinstance(v, int | float):
                continue
            per.setdefault(k, {})[step] = float(v)
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in per.items() if d}


def group(names: Sequence[str]) -> dict[str, list[str]]:
    """Panel title -> metric names, panels in ``PANELS`` order then by prefix."""
    panels: dict[str, list[str]] = {title: [] for title, _ in PANELS}
    for name in sorted(names):
        for title, rx in PANELS:
            if re.fullmatch(rx, name):
                panels[title].append(name)
                break
        else:
            panels.setdefault(name.split("/")[0], []).append(name)
    return {t: n for t, n in panels.items() if n}


def plot_run(workdir: str | pathlib.Path, out: str | pathlib.Path | None = None) -> pathlib.Path:
    """Writes the PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = pathlib.Path(workdir)
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (no metrics written in this workdir)")
    data = series(read_jsonl(path))
    if not data:
        raise ValueError(f"{path} holds no scalar metrics")
    panels = group(list(data))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (title, names) in zip(axes.ravel(), panels.items(), strict=False):
        for name in names:
            steps, values = data[name]
            ax.plot(steps, values, label=name, lw=1.2, marker="." if len(steps) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(names) > 1 or names[0] != title:
            ax.legend(fontsize=7)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(str(workdir.absolute().name))
    fig.tight_layout()
    out = pathlib.Path(out) if out else workdir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m umg_jax.plot", description=__doc__.split("\n")[0])
    ap.add_argument("workdir", help="training workdir holding metrics.jsonl")
    ap.add_argument("--out", default=None, help="output PNG (default WORKDIR/curves.png)")
    args = ap.parse_args(argv)
    print(plot_run(args.workdir, args.out))


if __name__ == "__main__":
    main()
