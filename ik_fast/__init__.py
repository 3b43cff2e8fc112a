"""ik_fast: fast implicit steerable convolutions for escnn (Zhdanov, Hoffmann & Cesa, NeurIPS 2023).

The public names are imported on first use (PEP 562): ``import ik_fast`` alone loads neither torch nor escnn, so the
command-line tools (``python -m ik_fast.tools.bench --help``, ``ik_fast.tools.problems``) start in a fraction of a
second. Using any of :data:`__all__` (``ik_fast.ImplicitPointConv``, ``from ik_fast import available_backends``, ...)
imports the package's layers and backends, which registers the ops (``torch.ops.ik_fast.*``) as before.
"""

from __future__ import annotations

import importlib
import importlib.util

from ik_fast._version import __version__

# public name -> the submodule that defines it
_EXPORTS = {
    "ImplicitKernel": "spec.kernel",
    "ImplicitPointConv": "nn.layers",
    "ImplicitConv": "nn.layers",
    "KernelProgram": "spec.program",
    "available_backends": "backends",
    "implicit_point_conv": "nn.functional",
    "prepare_graph": "graph",
    "set_value_checks": "graph",
    "assert_equivariant": "testing",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        # the layers and every backend, as the eager package did: the ops are registered whichever name comes first
        importlib.import_module(".backends", __name__)
        importlib.import_module(".nn.layers", __name__)
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # a submodule (ik_fast.backends, ik_fast.ops, ...)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
