"""Helpers of ``benchmarks/accelerator_check.py``, ``benchmarks/vit_l_smoke.py`` and
``benchmarks/pod_recipes.py`` (flag parsing, memory totals, token counts, batch hints, the printed
tables, the attention read from compiled HLO); nothing is timed, only small attention calls are
compiled."""

import json
import pathlib
from types import SimpleNamespace

import accelerator_check as ac  # benchmarks/ is on sys.path ([tool.pytest.ini_options])
import pod_recipes
import pytest
import vit_l_smoke

from umg_jax import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_parse_models():
    assert ac.parse_models("tiny,b16") == ["tiny", "b16"]
    assert ac.parse_models(" b16 ") == ["b16"]
    for bad, msg in (("", "empty"), ("tiny,l14", "unknown"), ("tiny,tiny", "twice")):
        with pytest.raises(ValueError, match=msg):
            ac.parse_models(bad)


def test_parse_batch():
    models = ["tiny", "b16"]
    assert ac.parse_batch("", models) == {}
    assert ac.parse_batch("32", models) == {"tiny": 32, "b16": 32}
    assert ac.parse_batch("tiny=1024, b16=256", models) == {"tiny": 1024, "b16": 256}
    assert ac.parse_batch("b16=4", models) == {"b16": 4}
    for bad, msg in (("x", "not an integer"), ("0", ">= 1"), ("tiny=-2", ">= 1"),
                     ("l14=8", "not one of"), ("tiny=8,16", "name=size")):
        with pytest.raises(ValueError, match=msg):
            ac.parse_batch(bad, models)
    with pytest.raises(ValueError, match="not one of"):
        ac.parse_batch("b16=8", ["tiny"])


def test_main_rejects_bad_flags(capsys):
    for argv in (["--models", "vit_h"], ["--batch", "tiny=abc"], ["--steps", "0"],
                 ["--warmup", "-1"]):
        with pytest.raises(SystemExit) as e:
            ac.main(argv)
        assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_default_batch():
    assert ac.default_batch("b16", "gpu") == ac.default_batch("b16", "tpu") == 256
    assert ac.default_batch("tiny", "gpu") == 1024
    assert ac.default_batch("tiny", "cpu") == 32


def test_compiled_bytes():
    m = SimpleNamespace(argument_size_in_bytes=100, output_size_in_bytes=90,
                        alias_size_in_bytes=80, temp_size_in_bytes=7)
    assert ac.compiled_bytes(m) == 117  # donated outputs are counted once
    assert ac.compiled_bytes(None) is None


def test_vision_tokens_and_attention_plan():
    c = config_lib.load_config(str(ROOT / "configs/vit_b16.py"))
    assert ac.vision_tokens(c.model) == 197
    c.model.vision.class_token = False
    assert ac.vision_tokens(c.model) == 196
    c.model.dtype = "bfloat16"
    plan = ac.attention_plan(c.model, (24, 8), "cpu")
    assert set(plan) == {"vision", "caption", "element"}
    assert plan["vision"]["n"] == 196 and plan["vision"]["head_dim"] == 64
    assert not plan["vision"]["causal"] and plan["caption"]["causal"]
    assert plan["caption"]["n"] == 24 and plan["element"]["n"] == 8
    assert all(isinstance(p["impl"], str) and p["impl"] for p in plan.values())


def _row(**kw):
    att = {k: {"impl": "xla"} for k in ("vision", "caption", "element")}
    row = dict(model="b16", device_kind="NVIDIA H200", num_devices=8, per_device_batch=256,
               global_batch=2048, text_lengths=[24, 8], img_s=1234.5, mfu=0.41,
               peak_flops=8 * 989e12, peak_source="spec", attention=att,
               memory_bytes=50 * ac.GIB, memory_source="device peak", compile_s=61.0)
    return {**row, **kw}


def test_format_table():
    table = ac.format_table([_row(), _row(model="tiny", memory_bytes=None),
                             {"model": "tiny", "error": "RESOURCE_EXHAUSTED"},
                             _row(mfu=None, peak_flops=None, peak_source="no spec",
                                  attention_ran={"impl": "cudnn", "calls": {}})])
    lines = table.splitlines()
    assert len(lines) == 6
    assert "cudnn !" in lines[5]  # predicted XLA everywhere, the HLO has cuDNN calls
    assert "n/a" in lines[5] and "no spec" in lines[5]
    assert "NVIDIA H200 x8" in lines[2] and "41.0%" in lines[2] and "7912 TF/s" in lines[2]
    assert "50.00 GiB (device peak)" in lines[2] and "24/8" in lines[2]
    assert "n/a" in lines[3]
    assert lines[4].startswith("tiny") and "error: RESOURCE_EXHAUSTED" in lines[4]
    assert ac.flops_str(5.3e10) == "53 GF/s"


def test_attention_mismatch():
    plan = {"vision": {"impl": "cudnn"}, "caption": {"impl": "xla"}, "element": {"impl": "xla"}}
    assert not ac.attention_mismatch(plan, "cudnn")
    assert ac.attention_mismatch(plan, "xla")  # the vision tower's kernel did not run
    assert ac.attention_mismatch(plan, "pallas_flash")
    cpu = {k: {"impl": "cpu_vjp"} for k in ("vision", "caption", "element")}
    assert not ac.attention_mismatch(cpu, "xla") and ac.attention_mismatch(cpu, "cudnn")
    assert not ac.attention_mismatch({"vision": {"impl": "unknown"}}, "cudnn")


def _attention_hlo(devices, implementation):
    import jax
    import jax.numpy as jnp

    from umg_jax import accelerators

    sh = jax.sharding.SingleDeviceSharding(devices[0])
    x = jax.ShapeDtypeStruct((2, 128, 4, 64), jnp.bfloat16, sharding=sh)
    f = jax.grad(lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(
        q, k, v, implementation=implementation).astype(jnp.float32)))
    return jax.jit(f).lower(x, x, x).compile(
        compiler_options=accelerators.compile_options(devices) or None).as_text()


def test_compiled_attention_reads_the_hlo():
    """What ran, from real compiled programs: XLA's attention on the CPU; cuDNN's forward and
    backward calls on an H100 (XLA:GPU, deviceless)."""
    import jax

    from umg_jax import accelerators

    assert ac.compiled_attention(_attention_hlo(jax.devices(), "xla")) == {
        "impl": "xla", "calls": {}}
    if not accelerators.gpu_compiler_available():
        pytest.skip("the CUDA plugin (requirements-gpu.txt) not installed")
    gpu = ac.compiled_attention(_attention_hlo(accelerators.topology_devices("h100:1x1x1"),
                                               "cudnn"))
    assert gpu == {"impl": "cudnn", "calls": {"__cudnn$fmhaSoftmax": 1,
                                              "__cudnn$fmhaSoftmaxBackward": 1}}


def test_smoke_summary_line():
    r = {"batch": 2, "loss": 12.3456, "finite": True, "grad_norm": 3.21, "compile_s": 85.2,
         "step_s": 40.04, "peak_rss_bytes": int(14.2 * vit_l_smoke.GIB)}
    assert vit_l_smoke.summary_line(r) == (
        "vit_l smoke: 1 step, batch 2, loss 12.3456 (finite), grad_norm 3.21, compile 85 s, "
        "step 40.0 s, peak RSS 14.2 GiB")
    assert "NOT finite" in vit_l_smoke.summary_line({**r, "finite": False})


def test_attention_plan_calls_the_chooser(monkeypatch):
    """The documented signature: ``(nq, nk, head_dim, dtype, *, platform, causal, key_bias)``."""
    import jax.numpy as jnp

    from umg_jax.ops import attention

    calls = []

    def chooser(nq, nk, head_dim, dtype, *, platform, causal=False, key_bias=False):
        calls.append((nq, nk, head_dim, dtype, platform, causal, key_bias))
        return "xla"

    monkeypatch.setattr(attention, "attention_implementation", chooser, raising=False)
    c = config_lib.load_config(str(ROOT / "configs/tiny.py"))
    c.model.dtype = "bfloat16"
    plan = ac.attention_plan(c.model, (32, 8), "gpu")
    assert {p["impl"] for p in plan.values()} == {"xla"}
    bf16 = jnp.dtype(jnp.bfloat16)
    assert calls == [(65, 65, 32, bf16, "gpu", False, False),  # 8x8 patches + class token
                     (32, 32, 32, bf16, "gpu", True, False), (8, 8, 32, bf16, "gpu", True, False)]


GIB = pod_recipes.GiB


def _cell(path, *, devices, chip, probes, fits=True, ratio=None, total=None):
    best = max((p for p in probes if p["total"] <= 16 * GIB), key=lambda p: p["batch_size"])
    row = {"batch_size": best["batch_size"], "per_device_batch": best["batch_size"] / devices,
           "bytes_per_device": {"total": total or best["total"]}, "hbm_bytes": 16 * GIB,
           "fits": fits, "est_images_per_s": 12345.6, "est_mfu": 0.42,
           "roofline": {"bound": "memory"}, "max_batch_probes": probes,
           "umg_over_clip_flops": ratio}
    path.write_text(json.dumps({"devices": devices, "chip": chip, "compiler": "tpu",
                                "date": "2026-11-30", "rows": [row]}))


def test_per_chip_line_and_batch_hint(tmp_path):
    path = tmp_path / "c.json"
    # 2 GiB fixed + 0.1 GiB per example on each of 4 chips.
    probes = [{"batch_size": 4 * b, "total": (2 + 0.1 * b) * GIB} for b in (40, 80, 120)]
    _cell(path, devices=4, chip="tpu_v5e", probes=probes)
    fixed, slope = pod_recipes.per_chip_line(path)
    assert fixed == pytest.approx(2 * GIB) and slope == pytest.approx(0.1 * GIB)
    # 0.97 * 32 GiB = 31.04 GiB -> (31.04 - 2) / 0.1 = 290.4 examples per chip.
    assert pod_recipes.batch_hint((fixed, slope), 32, 256) == 290 * 256
    assert pod_recipes.batch_hint((fixed, -slope), 32, 256) is None
    assert pod_recipes.batch_hint((40 * GIB, slope), 32, 256) is None
    _cell(path, devices=4, chip="tpu_v5e", probes=probes[:1])
    assert pod_recipes.per_chip_line(path) is None


def test_singles_line_seeds_the_first_search(tmp_path, monkeypatch):
    monkeypatch.setattr(pod_recipes, "OUT_DIR", tmp_path)
    assert pod_recipes.singles_line("seg_vit_l") is None
    # Single compiles at 128 and 256 per chip: 0.5 GiB + 0.05 GiB per example.
    for b in (128, 256):
        _cell(tmp_path / f"seg_vit_l_v5e_16x16_batch{256 * b}.json", devices=256,
              chip="tpu_v5e", probes=[{"batch_size": 256 * b, "total": (0.5 + 0.05 * b) * GIB}])
    assert pod_recipes.singles_line("seg_vit_l") == pytest.approx((0.5 * GIB, 0.05 * GIB))
    assert pod_recipes.singles_line("vit_l") is None  # another config's files are not read


def test_recipes_table(tmp_path, monkeypatch):
    monkeypatch.setattr(pod_recipes, "OUT_DIR", tmp_path)
    _cell(pod_recipes.cell_path("vit_l", "v4:4x4x8"), devices=128, chip="tpu_v4", ratio=2.25,
          probes=[{"batch_size": 1024, "total": 10 * GIB}, {"batch_size": 2048, "total": 15 * GIB},
                  {"batch_size": 4096, "total": 30 * GIB}])
    _cell(pod_recipes.cell_path("vit_l", "v5e:16x16"), devices=256, chip="tpu_v5e",
          probes=[{"batch_size": 2048, "total": 14 * GIB}])
    # The stand-in's batch was never probed on v5e: its single compile is read instead.
    _cell(tmp_path / "vit_l_v5e_16x16_batch4096.json", devices=256, chip="tpu_v5e",
          probes=[{"batch_size": 4096, "total": 15.5 * GIB}], total=19.9 * GIB, fits=False)
    # A config never searched on a slice: its largest fitting single compile, as a lower bound.
    _cell(tmp_path / "seg_vit_l_v5e_16x16_batch512.json", devices=256, chip="tpu_v5e",
          probes=[{"batch_size": 512, "total": 3 * GIB}])
    _cell(tmp_path / "seg_vit_l_v5e_16x16_batch99999.json", devices=256, chip="tpu_v5e",
          probes=[{"batch_size": 1024, "total": 5 * GIB}], fits=False)
    _cell(pod_recipes.standin_path("vit_l", 256, "tpu_v5e"), devices=256, chip="tpu_v5e",
          probes=[{"batch_size": 4096, "total": 15 * GIB}], total=27.3 * GIB)
    md, rows = pod_recipes.table(["vit_l", "seg_vit_l"], ["v4:4x4x8", "v5e:16x16"],
                                 [("vit_l", 256, "tpu_v5e", "v5e:16x16")])
    lines = md.splitlines()
    assert [(r["config"], r["topology"]) for r in rows] == [
        ("vit_l", "v4:4x4x8"), ("vit_l", "v5e:16x16"), ("seg_vit_l", "v5e:16x16")]
    assert lines[4].startswith("| seg_vit_l | v5e:16x16 (256 chips) | >= 512 (2) (fits; largest "
                               "not searched) | 3.0 of 16 GiB |")
    assert lines[2] == ("| vit_l | v4:4x4x8 (128 chips) | 2,048 (16) | 15.0 of 16 GiB | "
                        "12,346 (memory, 42 %) | 2.25x |")
    assert lines[3].endswith("| 2.25x (on v4:4x4x8) |")  # the ratio is per config
    assert lines[-1] == "| vit_l | 4,096 | v5e:16x16 | 27.3 GiB | 19.9 GiB |"


def test_gpu_recipes_table(tmp_path, monkeypatch):
    """GPU nodes get their own table: per GPU, HBM of 80 GiB, the cuDNN calls per step; a GPU
    config's first search is not seeded from its TPU single compiles."""
    monkeypatch.setattr(pod_recipes, "OUT_DIR", tmp_path)
    cudnn = {"__cudnn$fmhaSoftmax": 96, "__cudnn$fmhaSoftmaxBackward": 48}
    for topo, devices, attn in (("h100:1x1x8", 8, cudnn), ("h100:1x2x8", 16, {})):
        row = {"batch_size": 512 * devices, "per_device_batch": 512.0,
               "bytes_per_device": {"total": 70 * GIB}, "hbm_bytes": 80 * GIB, "fits": True,
               "est_images_per_s": 5000.0, "est_mfu": 0.5, "roofline": {"bound": "compute"},
               "max_batch_probes": [], "fused_attention": attn}
        pod_recipes.cell_path("vit_l", topo).write_text(json.dumps(
            {"devices": devices, "chip": "h100", "compiler": "gpu", "rows": [row]}))
    md, rows = pod_recipes.table(["vit_l"], ["h100:1x1x8", "h100:1x2x8"], [])
    lines = md.splitlines()
    assert "cuDNN attention calls" in lines[0] and "JAX's share" in lines[0] and len(rows) == 2
    assert lines[2] == ("| vit_l | h100:1x1x8 (1 x 8 GPUs) | 4,096 (512) | 70.0 of 80 GiB | "
                        "5,000 (compute, 50 %) | 96 / 48 |")
    assert lines[3].startswith("| vit_l | h100:1x2x8 (2 x 8 GPUs) | 8,192 (512) |")
    assert lines[3].endswith("| none (XLA attention) |")
    _cell(tmp_path / "vit_l_v5e_16x16_batch512.json", devices=256, chip="tpu_v5e",
          probes=[{"batch_size": 512, "total": 3 * GIB}])
    _cell(tmp_path / "vit_l_v5e_16x16_batch1024.json", devices=256, chip="tpu_v5e",
          probes=[{"batch_size": 1024, "total": 4 * GIB}])
    assert pod_recipes.singles_line("vit_l") is not None
    assert pod_recipes.singles_line("vit_l", "gpu") is None


@pytest.mark.parametrize("config", ["vit_l", "vit_l336"])
def test_tpu_slice_arguments_follow_the_recipes(config):
    """``PER_CHIP_MAX`` of a TPU generation is the per-chip batch of that generation's recipe
    file: the search's cell, or, where none was searched, the single compile that fitted (a
    lower bound); a generation with neither is not in the table."""
    import importlib

    from umg_jax import accelerators

    mod = importlib.import_module(f"umg_jax.configs.{config}")
    for topo in pod_recipes.TOPOLOGIES:
        gen = topo.split(":")[0]
        cell = pod_recipes.cell_path(config, topo)
        singles = sorted(cell.parent.glob(f"{cell.stem}_batch*.json"))
        rows = [json.loads(q.read_text()) for q in ([cell] if cell.exists() else singles)]
        rows = [d for d in rows if d["rows"][0]["fits"] and "provenance" in d]
        if not rows:
            assert gen not in mod.PER_CHIP_MAX, f"{config}: {gen} has no recipe file"
            continue
        assert accelerators.topology_size(topo) == rows[0]["devices"]
        assert mod.PER_CHIP_MAX[gen] == max(int(d["rows"][0]["per_device_batch"])
                                            for d in rows), (config, topo)


@pytest.mark.parametrize("config", ["vit_l", "vit_l336"])
def test_gpu_slice_arguments_follow_the_recipes(config):
    """``configs/<config>.py:h100-8`` caps the batch at the per-GPU maximum the GPU recipes
    measured (the smaller of one and two hosts) times the GPUs."""
    import importlib

    from umg_jax.configs import common

    mod = importlib.import_module(f"umg_jax.configs.{config}")
    for card in ("h100", "h200"):
        cells = [json.loads(pod_recipes.cell_path(config, f"{card}:1x{h}x8").read_text())
                 for h in (1, 2)]
        assert mod.PER_CHIP_MAX[card] == min(int(c["rows"][0]["per_device_batch"])
                                             for c in cells)
        for gpus in (8, 16):
            assert mod.get_config(f"{card}-{gpus}").batch_size == min(
                mod.get_config().batch_size, mod.PER_CHIP_MAX[card] * gpus)
    for bad in ("h100-0", "h900-8", "h100"):
        with pytest.raises(ValueError, match="expected GEN-CHIPS"):
            common.slice_batch(bad, 4096, mod.PER_CHIP_MAX)
    with pytest.raises(ValueError, match="has not been compiled for b200"):
        common.slice_batch("b200-8", 4096, mod.PER_CHIP_MAX)
