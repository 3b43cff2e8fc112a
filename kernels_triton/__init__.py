"""Fused Triton kernels of ik_fast (installed as ``ik_fast.kernels_triton``).

Empty until the fused backend lands (see the project's issue on Triton kernels); the torch backend is the fallback.
"""
