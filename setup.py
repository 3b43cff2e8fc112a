"""Build script. ik_fast is pure Python today; the CUDA extension in csrc/ joins here when its kernels land
(built only when a CUDA toolkit and a CUDA build of torch are present, or IK_FAST_BUILD_CUDA=1)."""

from setuptools import setup

setup()
