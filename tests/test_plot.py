"""umg_jax/plot.py: panels from a metrics.jsonl (with a resumed run's duplicate steps), a valid
PNG read back with Pillow, and the command line."""

import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from umg_jax import metrics as M
from umg_jax import plot


def _write_run(workdir, n=40):
    with M.MetricWriter(workdir, tensorboard=False) as w:
        for s in range(0, n, 2):
            w.write_scalars(s, {"loss": 3 * math.exp(-s / 20), "loss/image": 2 * math.exp(-s / 15),
                                "loss/region": 1 + math.exp(-s / 10),
                                "acc/image": 1 - math.exp(-s / 20), "lr": 1e-3 * s / n,
                                "examples_per_sec": 100 + s, "grad_norm": 1 / (1 + s),
                                "scale/image": 14.3 + s / 10, "data_wait_frac": 0.05,
                                "mfu": 0.4, "nan_skips": 0, "eta_s": 5.0})
        # A resumed run re-logs steps 30.. with different values: these must win.
        for s in range(30, n, 2):
            w.write_scalars(s, {"loss": 0.5})
        w.write_scalars(n, {"eval/region_acc": 0.7, "loss": float("nan")})


def test_series_and_groups(tmp_path):
    _write_run(tmp_path)
    data = plot.series(M.read_jsonl(tmp_path / "metrics.jsonl"))
    steps, loss = data["loss"]
    assert steps == list(range(0, 40, 2))  # the NaN at step 40 is dropped, no duplicates
    assert loss[-5:] == [0.5] * 5 and loss[0] == pytest.approx(3.0)
    assert "eta_s" not in data
    panels = plot.group(list(data))
    assert panels["loss"] == ["loss", "loss/image", "loss/region"]
    assert panels["accuracy"] == ["acc/image", "eval/region_acc"]
    assert panels["learning rate"] == ["lr"]
    assert panels["throughput (examples/s)"] == ["examples_per_sec"]
    assert panels["utilisation"] == ["data_wait_frac", "mfu"]
    assert panels["nan_skips"] == ["nan_skips"] and panels["logit scales"] == ["scale/image"]


def test_png_written_and_valid(tmp_path):
    _write_run(tmp_path)
    out = plot.plot_run(tmp_path)
    assert out == tmp_path / "curves.png"
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 800 and im.size[1] > 500
        px = np.asarray(im.convert("RGB"))
    assert px.std() > 10  # not a blank canvas


def test_cli_and_errors(tmp_path):
    _write_run(tmp_path / "run")
    target = tmp_path / "figs" / "c.png"
    res = subprocess.run([sys.executable, "-m", "umg_jax.plot", str(tmp_path / "run"),
                          "--out", str(target)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot.plot_run(tmp_path / "empty")
