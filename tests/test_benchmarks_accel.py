"""Pure helpers of ``benchmarks/accelerator_check.py`` and ``benchmarks/vit_l_smoke.py`` (flag
parsing, memory totals, token counts, the printed table); nothing is compiled or timed."""

import pathlib
import sys
from types import SimpleNamespace

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import accelerator_check as ac  # noqa: E402
import vit_l_smoke  # noqa: E402

from umg_jax import config_lib  # noqa: E402


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
                             _row(mfu=None, peak_flops=None, peak_source="no spec")])
    lines = table.splitlines()
    assert len(lines) == 6
    assert "n/a" in lines[5] and "no spec" in lines[5]
    assert "NVIDIA H200 x8" in lines[2] and "41.0%" in lines[2] and "7912 TF/s" in lines[2]
    assert "50.00 GiB (device peak)" in lines[2] and "24/8" in lines[2]
    assert "n/a" in lines[3]
    assert lines[4].startswith("tiny") and "error: RESOURCE_EXHAUSTED" in lines[4]
    assert ac.flops_str(5.3e10) == "53 GF/s"


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
