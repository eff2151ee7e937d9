"""umg_jax/config_lib.py: every knob of every shipped config carries a comment (--show_config)."""

import importlib.util
import pathlib

import ml_collections as mlc
import pytest

from umg_jax import config_lib, configs

ROOT = pathlib.Path(__file__).parents[1]
CONFIGS = [f"{n}.py" for n in configs.names()]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_knob_is_commented(name):
    comments = config_lib.knob_comments(ROOT / "configs")
    cfg = config_lib.load_config(str(ROOT / "configs" / name))
    missing = []

    def walk(d: mlc.ConfigDict, prefix: str) -> None:
        for k in d.keys():
            if isinstance(d[k], mlc.ConfigDict):
                walk(d[k], f"{prefix}{k}.")
            elif prefix + k not in comments:
                missing.append(prefix + k)

    walk(cfg, "")
    assert not missing, f"{name}: knobs without a comment: {missing}"
    table = config_lib.describe(cfg, ROOT / "configs")
    assert "--config.batch_size=" in table


def test_slice_argument_caps_the_batch_to_what_the_tpu_compiler_fitted():
    """``configs/vit_l.py:GEN-CHIPS``: the batch the README's recipe table gives for the slice."""
    load = lambda arg: config_lib.load_config(str(ROOT / "configs" / arg))  # noqa: E731
    assert load("vit_l.py").batch_size == 32768
    assert load("vit_l.py:v5e-256").batch_size == 88 * 256  # 32,768 needs 19.9 of 16 GiB
    assert load("vit_l.py:v5e-64").batch_size == 88 * 64
    assert load("vit_l.py:v4-256").batch_size == 32768  # 128 per chip fits (<= 208)
    assert load("vit_l.py:v4-128").batch_size == 208 * 128
    assert load("vit_l336.py:v5e-256").batch_size == 16384  # the base batch; 72 per chip fits
    assert load("vit_l336.py:v5e-128").batch_size == 72 * 128
    assert load("vit_l336.py:v4-128").batch_size == 16384  # 128 per chip fits (<= 152)
    assert load("vit_l336.py:v4-64").batch_size == 152 * 64
    assert load("vit_l336.py:v5p-16").batch_size == 464 * 16
    for bad in ("vit_l.py:v5e", "vit_l.py:tpu9-8", "vit_l.py:v5e-0", "vit_l.py:v5e-x"):
        with pytest.raises(ValueError, match="expected GEN-CHIPS"):
            load(bad)
    spec = importlib.util.spec_from_file_location("configs_common", ROOT / "configs/common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    with pytest.raises(ValueError, match="has not been compiled for v5p"):
        common.slice_batch("v5p-256", 4096, {"v5e": 72})
    assert common.slice_batch(None, 4096, {}) == 4096
