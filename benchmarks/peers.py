"""What benchmarks borrow from ``tests/``, loaded by file path (``tests/`` is no package and is not
put on ``sys.path``): the torchvision shim this machine's torch needs, and the test suite's fix
for gcp-storage-emulator.

Scripts import it by name (``import peers``): Python puts a script's own folder first on
``sys.path``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

TESTS = pathlib.Path(__file__).resolve().parents[1] / "tests"


def _load(name: str, path: pathlib.Path) -> ModuleType:
    """The module in ``path``, executed once (cached in ``sys.modules`` under ``name``)."""
    if name in sys.modules:
        return sys.modules[name]
    if not path.exists():
        raise ImportError(f"{path} is missing: benchmarks load it from the repository's tests/ "
                          "folder (run them from a full checkout)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def torch() -> ModuleType:
    """``torch`` with the torchvision op-schema shim applied (``tests/torch_shim.py:
    import_torch``; PyPI's torchvision beside a local CPU torch build fails at import without
    it). ImportError, naming the install, when torch is absent."""
    try:
        import torch as _  # noqa: F401 - a clear error before the shim is loaded
    except ImportError as e:
        raise ImportError("this benchmark compares against PyTorch: pip install -r "
                          "requirements-test.txt") from e
    return _load("_umg_bench_torch_shim", TESTS / "torch_shim.py").import_torch()


def emulator_sends_generations() -> None:
    """The tests' fix for gcp-storage-emulator (``tests/conftest.py:
    _emulator_sends_generations``): its downloads get GCS's ``x-goog-generation`` header, which
    tensorstore needs to update orbax's OCDBT manifest."""
    _load("_umg_bench_conftest", TESTS / "conftest.py")._emulator_sends_generations()
