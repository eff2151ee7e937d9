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
    """``configs/vit_l.py:GEN-CHIPS``: the config's batch, capped at the per-chip batch the
    recipe search fitted (``PER_CHIP_MAX``; that it is the search's is checked against the
    recipe files in test_benchmarks_accel.py) times the chips."""
    from umg_jax.configs import vit_l, vit_l336

    load = lambda arg: config_lib.load_config(str(ROOT / "configs" / arg))  # noqa: E731
    assert load("vit_l.py").batch_size == 32768
    for mod, name, base in ((vit_l, "vit_l.py", 32768), (vit_l336, "vit_l336.py", 16384)):
        for gen, per_chip in mod.PER_CHIP_MAX.items():
            for chips in (8, 64, 256):
                assert load(f"{name}:{gen}-{chips}").batch_size == min(base, per_chip * chips)
    assert load("vit_l.py:v4-32").batch_size == vit_l.PER_CHIP_MAX["v4"] * 32 < 32768
    for bad in ("vit_l.py:v5e", "vit_l.py:tpu9-8", "vit_l.py:v5e-0", "vit_l.py:v5e-x"):
        with pytest.raises(ValueError, match="expected GEN-CHIPS"):
            load(bad)
    spec = importlib.util.spec_from_file_location("configs_common", ROOT / "configs/common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    with pytest.raises(ValueError, match="has not been compiled for v5p"):
        common.slice_batch("v5p-256", 4096, {"v5e": 72})
    assert common.slice_batch(None, 4096, {}) == 4096
