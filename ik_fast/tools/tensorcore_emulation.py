"""The tensor cores' float32 GEMM modes emulated on CPU, to measure their error without a GPU.

Triton's interpreter ignores ``tl.dot``'s ``input_precision`` (every dot in IEEE float32), and the CPU has no TF32
unit. :class:`TensorCoreEmulation` wraps the interpreter's ``create_dot`` (as :mod:`ik_fast.tools.workcount` does to
count) so that each float32 dot rounds its operands as an NVIDIA GPU does under Triton's lowering:

* ``"tf32"``: the operands' float32 bit patterns go to the MMA as they are and the tensor core ignores their low 13
  mantissa bits (:func:`tf32_truncate`: a TF32 operand truncated toward zero); Triton inserts no conversion;
* ``"tf32x3"``: Triton's rewrite of the dot into three TF32 dots (its ``F32DotTC`` pass): ``a_big =
  cvt.rna.tf32.f32(a)`` (:func:`tf32_rna`), ``a_small = a - a_big`` (exact in float32), the same for ``b``;
  ``dot(a_small, b_big, 0)``, then ``dot(a_big, b_small, .)`` and ``dot(a_big, b_big, .)`` accumulated onto it, and the
  dot's accumulator added last; each TF32 dot's operands truncated by the tensor core as above (``a_small`` keeps up
  to 13 significant bits, of which the MMA reads 11);
* ``"ieee"`` and float64 dots: unchanged.

Each TF32 product is exact in float32 (11 x 11 significant bits); the sums are float32 sums (NumPy's single-precision
matmul), so the accumulation inside an MMA (its order and the tensor core's internal alignment) is modelled, not
reproduced. While active, :func:`ik_fast.kernels_triton.launch.precision` gives CPU tensors the precision CUDA
would (``launch.EMULATE_CUDA_PRECISION``): "highest" -> ``launch.HIGHEST_ON_CUDA``, "high" -> "tf32".

The native CUDA kernels' TF32 and 3xTF32 fragments are replayed by ``tests/tools/emulate_check.py`` (``--precision``)
with the same rounding functions.
"""

from __future__ import annotations

import numpy as np

__all__ = ["tf32_rna", "tf32_truncate", "tf32x3_split", "emulated_dot", "TensorCoreEmulation"]

_LOW13 = np.uint32(0x1FFF)
_HIGH = np.uint32(0xFFFFE000)
_EXP = np.uint32(0x7F800000)


def tf32_rna(x) -> np.ndarray:
    """``cvt.rna.tf32.f32``: float32 rounded to 10 mantissa bits, to nearest with ties away from zero (the low 13 bits
    zero); infinities and NaNs unchanged."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = (u + np.uint32(0x1000)) & _HIGH  # sign-magnitude: adding half an ulp to the magnitude rounds ties away
    return np.where((u & _EXP) == _EXP, u, r).view(np.float32)


def tf32_truncate(x) -> np.ndarray:
    """A float32 operand as a TF32 MMA reads it: the low 13 mantissa bits ignored (truncation toward zero)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return np.where((u & _EXP) == _EXP, u, u & _HIGH).view(np.float32)


def tf32x3_split(x, small=tf32_truncate):
    """(big, small) halves of float32 ``x``: big = cvt.rna(x), small = x - big (exact), as ``small`` reads it (Triton:
    the MMA's truncation; the native kernels round it with cvt.rna, ``small=tf32_rna``)."""
    x = np.asarray(x, dtype=np.float32)
    big = tf32_rna(x)
    return big, small(x - big)


def emulated_dot(a, b, acc, mode: str) -> np.ndarray:
    """``acc + a @ b`` in float32 as Triton's lowering of ``tl.dot(a, b, acc, input_precision=mode)`` rounds it."""
    a, b, acc = (np.asarray(t, dtype=np.float32) for t in (a, b, acc))
    if mode == "tf32":
        return (np.matmul(tf32_truncate(a), tf32_truncate(b), dtype=np.float32) + acc).astype(np.float32)
    if mode == "tf32x3":
        ab, as_ = tf32x3_split(a)
        bb, bs = tf32x3_split(b)
        d = np.matmul(as_, bb, dtype=np.float32)
        d = d + np.matmul(ab, bs, dtype=np.float32)
        d = d + np.matmul(ab, bb, dtype=np.float32)
        return (d + acc).astype(np.float32)
    return (np.matmul(a, b, dtype=np.float32) + acc).astype(np.float32)


class TensorCoreEmulation:
    """Context manager: the interpreter's float32 dots rounded as the tensor cores round them (see the module), and
    CPU tensors given CUDA's precision mapping. ``dots`` counts the dots emulated per mode."""

    def __init__(self):
        self.dots = {}
        self._undo = []

    def __enter__(self):
        from triton._C.libtriton import ir
        from triton.runtime import interpreter as ti

        from ik_fast.kernels_triton import launch

        modes = {ir.INPUT_PRECISION.TF32: "tf32", ir.INPUT_PRECISION.TF32x3: "tf32x3"}
        builder = ti.interpreter_builder
        orig = builder.create_dot
        had = "create_dot" in builder.__dict__
        me = self

        def create_dot(a, b, d, input_precision, *args, **kwargs):
            mode = modes.get(input_precision)
            if mode is None or a.data.dtype != np.float32 or b.data.dtype != np.float32:
                return orig(a, b, d, input_precision, *args, **kwargs)
            me.dots[mode] = me.dots.get(mode, 0) + 1
            return ti.TensorHandle(emulated_dot(a.data, b.data, d.data, mode).astype(d.data.dtype), d.dtype.scalar)

        builder.create_dot = create_dot
        self._undo.append(lambda: setattr(builder, "create_dot", orig) if had else builder.__dict__.pop("create_dot"))
        old = launch.EMULATE_CUDA_PRECISION
        launch.EMULATE_CUDA_PRECISION = True
        self._undo.append(lambda: setattr(launch, "EMULATE_CUDA_PRECISION", old))
        return self

    def __exit__(self, *exc):
        while self._undo:
            self._undo.pop()()
        return False
