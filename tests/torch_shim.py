"""This test environment's torchvision fix, for the tests and benchmarks only (users install a
matching torch / torchvision pair and need none of it).

PyPI's torchvision 0.28 beside the local CPU build of torch 2.13 fails at import with ``operator
torchvision::nms does not exist`` (its compiled ops are built against the CUDA torch), and
transformers (image processors) and open_clip import torchvision. Defining the two op schemas
first lets torchvision import; only its compiled ops stay unavailable, and nothing tested uses
them (``tests/test_torch_model.py`` runs torchvision's roi_align through its Python reference).

Call :func:`import_torch` before anything imports torchvision (``transformers``, ``open_clip``,
the annotation families' models): ``tests/conftest.py``'s ``torch_peers`` / ``torch_mod`` do.
A subprocess applies it with ``python -c "import torch_shim; torch_shim.import_torch(); ..."``
and ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import sys
from typing import Any

_LIBRARY: list[Any] = []  # the torch.library.Library object must stay alive


def import_torch():
    """``torch``, with torchvision importable (the shim applied once, only when needed); raises
    ImportError without torch. A missing torchvision is fine: transformers works without it."""
    import torch

    if _LIBRARY or "torchvision" in sys.modules:
        return torch
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                       "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
            lib.define(schema)
        _LIBRARY.append(lib)
        import torchvision  # noqa: F401
    except ImportError:
        pass
    return torch
