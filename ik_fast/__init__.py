"""ik_fast: fast implicit steerable convolutions for escnn (Zhdanov, Hoffmann & Cesa, NeurIPS 2023)."""

from ._version import __version__
from .backends import available_backends
from .functional import implicit_point_conv
from .graph import prepare_graph
from .kernel import ImplicitKernel
from .layers import ImplicitConv, ImplicitPointConv
from .program import KernelProgram
from .testing import assert_equivariant

__all__ = [
    "__version__",
    "ImplicitKernel",
    "ImplicitPointConv",
    "ImplicitConv",
    "KernelProgram",
    "available_backends",
    "implicit_point_conv",
    "prepare_graph",
    "assert_equivariant",
]
