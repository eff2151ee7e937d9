"""umg_jax/config_lib.py: every knob of every shipped config carries a comment (--show_config)."""

import pathlib

import ml_collections as mlc
import pytest

from umg_jax import config_lib

ROOT = pathlib.Path(__file__).parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py") if p.name != "common.py")


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
