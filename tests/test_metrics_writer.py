"""umg_jax/metrics.py: JSON-lines + TensorBoard writer (event file parsed back), progress line
with a fake clock, MFU, and analytic FLOPs vs the ViT-B/32 reference figures and XLA's
``cost_analysis()``."""

import json
import os
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umg_jax import metrics as M
from umg_jax.config_lib import load_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _read_tb_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Parses TFRecord-framed Event protos (tensorboardX's own proto classes)."""
    from tensorboardX.proto import event_pb2

    from umg_jax import storage

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(storage.path(logdir).glob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                if v.HasField("simple_value") or v.tag:
                    out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_writer_jsonl_and_tensorboard(tmp_path):
    with M.MetricWriter(tmp_path, tensorboard=True) as w:
        w.write_scalars(10, {"loss": jnp.float32(2.5), "acc/image": np.float64(0.25), "lr": 1e-3})
        w.write_scalars(20, {"loss": float("nan"), "lr": 2e-3})
        w.write_hparams({"optim": {"lr": 1e-3, "freeze": ("text/.*",)}, "batch_size": 32})
        with pytest.raises(TypeError, match="not a scalar"):
            w.write_scalars(30, {"loss": np.zeros(3)})
    rows = M.read_jsonl(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 10, "loss": 2.5, "acc/image": 0.25, "lr": 1e-3},
                    {"step": 20, "loss": None, "lr": 2e-3}]
    hp = json.loads((tmp_path / "hparams.json").read_text())
    assert hp == {"optim.lr": 1e-3, "optim.freeze": "('text/.*',)", "batch_size": 32}
    tb = _read_tb_scalars(tmp_path / "tensorboard")
    assert tb["loss"][0] == (10, 2.5) and tb["loss"][1][0] == 20 and np.isnan(tb["loss"][1][1])
    assert tb["acc/image"] == [(10, 0.25)]
    assert [s for s, _ in tb["lr"]] == [10, 20]
    np.testing.assert_allclose([v for _, v in tb["lr"]], [1e-3, 2e-3], rtol=1e-6)
    # Appends on restart; a torn last line (killed writer) is skipped by the reader.
    with M.MetricWriter(tmp_path, tensorboard=False) as w:
        w.write_scalars(30, {"loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "lo')
    assert M.read_jsonl(tmp_path / "metrics.jsonl") == rows + [{"step": 30, "loss": 1.0}]


def test_writer_non_primary_writes_nothing(tmp_path):
    with M.MetricWriter(tmp_path / "w", primary=False) as w:
        w.write_scalars(1, {"loss": 1.0})
        w.write_hparams({"a": 1})
    assert not (tmp_path / "w").exists()


def test_progress_with_fake_clock(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(M.time, "perf_counter", lambda: clock[0])
    p = M.Progress(total_steps=1000, start_step=100, batch_size=32)
    for _ in range(10):  # 10 steps: 0.5 s data wait + 1.5 s compute each
        with p.timer("data"):
            clock[0] += 0.5
        with p.timer("step"):
            clock[0] += 1.5
    line = p.update(110, {"loss": jnp.float32(1.23456)})
    assert p.last["steps_per_sec"] == pytest.approx(0.5)
    assert p.last["examples_per_sec"] == pytest.approx(16.0)
    assert p.last["data_wait_frac"] == pytest.approx(0.25)
    assert p.last["step_frac"] == pytest.approx(0.75)
    assert p.last["eta_s"] == pytest.approx(890 / 0.5)
    assert line == "step 110/1000 (11%) | loss 1.2346 | 16.0 img/s | data 25% | ETA 29m40s"
    clock[0] += 4.0  # next window: 2 steps in 4 s, no timers
    p.update(112)
    assert p.last["data_wait_frac"] == 0.0 and p.last["examples_per_sec"] == pytest.approx(16.0)
    clock[0] += 100.0  # e.g. an evaluation: excluded by reset
    p.reset(112)
    clock[0] += 1.0
    assert p.update(113).endswith("ETA 14m47s") and p.last["steps_per_sec"] == pytest.approx(1.0)
    assert M.format_duration(7300) == "2h01m" and M.format_duration(9.4) == "9s"


def test_mfu():
    assert M.mfu(1418.6e9, 5.58, 430e9) == pytest.approx(1418.6 / 5.58 / 430)
    with pytest.raises(ValueError):
        M.mfu(1.0, 1.0, 0.0)



class _Device:
    """What ``mfu_peak`` reads of a device (abstract or real): platform and kind."""

    def __init__(self, platform: str, kind: str):
        self.platform, self.device_kind = platform, kind


def _no_measure(**_):
    raise AssertionError("an accelerator's peak must come from the table, not a timed matmul")


@pytest.mark.parametrize("platform,kind,tflops", [
    ("tpu", "TPU v4", 275), ("tpu", "TPU v5 lite", 197), ("tpu", "TPU v5", 459),
    ("tpu", "TPU v6 lite", 918), ("gpu", "NVIDIA H100 80GB HBM3", 989),
    ("gpu", "NVIDIA H200", 989), ("gpu", "NVIDIA A100-SXM4-80GB", 312)])
def test_mfu_peak_on_accelerators_is_the_spec_table(platform, kind, tflops):
    peak, source = M.mfu_peak([_Device(platform, kind)] * 8, "bfloat16", measure=_no_measure)
    assert peak == pytest.approx(8 * tflops * 1e12)
    assert kind in source and "spec" in source


def test_mfu_peak_unknown_accelerator_reports_no_mfu():
    peak, source = M.mfu_peak([_Device("gpu", "NVIDIA Quantum Q1")], measure=_no_measure)
    assert peak == 0.0 and "no spec peak" in source


def test_mfu_peak_on_cpu_is_measured():
    calls = []
    peak, source = M.mfu_peak(jax.devices("cpu"), "bfloat16",
                              measure=lambda dtype: calls.append(dtype) or 123e9)
    assert peak == 123e9 and calls == ["bfloat16"] and "measured" in source


def test_flops_match_vit_b32_reference():
    """performance-notes.md: ViT-B/32 vision 8.818 + text 5.960 GFLOP per sample, train step of
    batch 32 = 1418.6 GFLOP."""
    vis = M.vit_forward_flops(224, 32, 768, 12, 512, dense_mode=None)
    txt = M.text_forward_flops(77, 512, 12, 512)
    assert vis / 1e9 == pytest.approx(8.818, abs=5e-4)
    assert txt / 1e9 == pytest.approx(5.960, abs=5e-4)
    cfg = load_config(str(CONFIGS / "tiny.py")).model
    cfg.update(dict(embed_dim=512, dense_mode=None))
    cfg.vision.update(dict(image_size=224, patch_size=32, width=768, layers=12, heads=12))
    cfg.text.update(dict(context_length=77, width=512, layers=12, heads=8))
    assert M.clip_train_flops(cfg, 32, 1) / 1e9 == pytest.approx(1418.6, abs=0.1)


def _xla_flops(fn, *args) -> float:
    ca = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((ca[0] if isinstance(ca, list) else ca)["flops"])


def test_flops_match_xla_dense_only():
    """A matmul-only ViT / text forward (same shapes as the towers, no elementwise ops):
    XLA's count equals the analytic one."""
    b, s, p, d, heads, layers, e, ctx = 2, 32, 8, 64, 4, 3, 48, 16
    g = s // p
    hidden, dh = 4 * d, d // heads
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731

    def blocks(h, w):
        for _ in range(layers):
            q = jnp.einsum("bnd,dhk->bnhk", h, w["q"])
            k = jnp.einsum("bnd,dhk->bnhk", h, w["k"])
            v = jnp.einsum("bnd,dhk->bnhk", h, w["v"])
            a = jnp.einsum("bqhk,bnhk->bhqn", q, k)
            o = jnp.einsum("bhqn,bnhk->bqhk", a, v)
            h = jnp.einsum("bqhk,hkd->bqd", o, w["o"])
            h = jnp.einsum("bnd,dm->bnm", jnp.einsum("bnd,dm->bnm", h, w["fc"]), w["pr"])
        return h

    def weights(width):
        return {"q": sds(width, heads, width // heads), "k": sds(width, heads, width // heads),
                "v": sds(width, heads, width // heads), "o": sds(heads, width // heads, width),
                "fc": sds(width, 4 * width), "pr": sds(4 * width, width)}

    def vit(patches, cls, wp, w, proj):
        x = jnp.einsum("bpc,cd->bpd", patches, wp)
        h = blocks(jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1), w)
        return h[:, 0] @ proj

    got = _xla_flops(vit, sds(b, g * g, p * p * 3), sds(d), sds(p * p * 3, d), weights(d),
                     sds(d, e))
    assert got == b * M.vit_forward_flops(s, p, d, layers, e, dense_mode=None)
    assert hidden == 4 * d and dh * heads == d

    def text(h, w, proj):
        return blocks(h, w)[:, -1] @ proj

    got = _xla_flops(text, sds(b, ctx, d), weights(d), sds(d, e))
    assert got == b * M.text_forward_flops(ctx, d, layers, e)


def test_flops_close_to_xla_on_the_model():
    """The real tiny model (MaskCLIP dense features): XLA counts matmuls + elementwise work, so
    it must be a little above the analytic matmul count; the gradient step ~3x forward."""
    from umg_jax.models import clip

    cfg = load_config(str(CONFIGS / "tiny.py")).model
    cfg.text.vocab_size = 512  # the lookup is no matmul; a small table compiles faster
    model = clip.build_model(cfg)
    params = clip.abstract_params(cfg)
    b, n_txt = 2, 3
    img = jax.ShapeDtypeStruct((b, cfg.vision.image_size, cfg.vision.image_size, 3), jnp.float32)
    tok = jax.ShapeDtypeStruct((b, n_txt, cfg.text.context_length), jnp.int32)

    def fwd(p, x, t):
        o = model.apply({"params": p}, x, t)
        return o["img"].sum() + o["dense"].sum() + o["txt"].sum()

    analytic_fwd = b * M.clip_forward_flops(cfg, n_txt)
    ratio_fwd = _xla_flops(fwd, params, img, tok) / analytic_fwd
    assert 1.0 <= ratio_fwd < 1.15, ratio_fwd
    ratio_train = _xla_flops(jax.grad(fwd), params, img, tok) / M.clip_train_flops(cfg, b, n_txt)
    assert 1.0 <= ratio_train < 1.15, ratio_train


def test_writer_imports_neither_torch_nor_tensorflow(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from umg_jax import metrics; "
            f"w = metrics.MetricWriter({str(tmp_path)!r}); w.write_scalars(1, {{'a': 1.0}}); "
            "w.close(); print(sorted(m for m in ('torch', 'tensorflow') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=pathlib.Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("store", ["gs", "s3"])
def test_writer_on_a_bucket_keeps_history_across_restarts(store, request):
    """On an object store (no append) a restarted writer keeps what the first one wrote, and
    tensorboardX writes its event file into the bucket itself (real local servers)."""
    from umg_jax import storage

    bucket = request.getfixturevalue("gcs_bucket" if store == "gs" else "s3_bucket")
    wd = f"{bucket}/metrics-{os.getpid()}"
    with M.MetricWriter(wd, tensorboard=True) as w:
        w.write_scalars(10, {"loss": 2.5})
        w.write_hparams({"batch_size": 32})
        # Each line is in the bucket before the next step (a killed run keeps its metrics).
        assert M.read_jsonl(f"{wd}/metrics.jsonl") == [{"step": 10, "loss": 2.5}]
        w.write_scalars(20, {"loss": 2.0})
    with M.MetricWriter(wd, tensorboard=False) as w:  # the resumed run
        w.write_scalars(30, {"loss": 1.5})
    assert [r["step"] for r in M.read_jsonl(f"{wd}/metrics.jsonl")] == [10, 20, 30]
    assert storage.read_json(f"{wd}/hparams.json") == {"batch_size": 32}
    assert _read_tb_scalars(f"{wd}/tensorboard")["loss"] == [(10, 2.5), (20, 2.0)]
