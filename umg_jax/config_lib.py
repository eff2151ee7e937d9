"""Loading ``configs/*.py`` files outside absl (tools, tests, the inference API).

The command-line entry points use ``ml_collections.config_flags`` (``--config`` plus
``--config.x=y`` overrides); this is the same loading for code that has a path in hand.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections as mlc


def load_config(path: str, arg: str | None = None) -> mlc.ConfigDict:
    """``path`` may carry an argument as ``file.py:arg`` (big_vision style)."""
    if ":" in pathlib.Path(path).name:
        path, arg = path.rsplit(":", 1)
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"umg_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
