"""ik_fast: fast implicit steerable convolutions for escnn (Zhdanov, Hoffmann & Cesa, NeurIPS 2023)."""

from .backends import available_backends
from .functional import implicit_point_conv
from .graph import prepare_graph
from .kernel import ImplicitKernel
from .layers import ImplicitConv, ImplicitPointConv
from .program import KernelProgram
from .testing import assert_equivariant

__version__ = "0.1.0"

__all__ = [
    "ImplicitKernel",
    "ImplicitPointConv",
    "ImplicitConv",
    "KernelProgram",
    "available_backends",
    "implicit_point_conv",
    "prepare_graph",
    "assert_equivariant",
]
