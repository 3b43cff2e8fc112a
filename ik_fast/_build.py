"""How the native extension (``csrc/``) is compiled: its sources and flags, in one place for both builds.

``setup.py`` builds ``ik_fast._C`` ahead of time with these; :mod:`ik_fast._native` compiles the same sources with
the same flags on first use when no prebuilt module is importable (``torch.utils.cpp_extension.load``). setup.py runs
before the package is installed and must not import ``ik_fast`` (its ``__init__`` imports escnn), so it loads this
file by path: this module imports only the standard library at the top, and torch inside the functions that need it.

Environment variables (read at build time; the JIT build folds them into its cache key):

``IK_FAST_BUILD_CUDA``
    ``0``: CPU part only. ``1``: build the CUDA part (``csrc/cuda/*.cu``) whatever is detected (fails clearly without
    a CUDA build of torch and nvcc). Unset: the CUDA part is built when torch is a CUDA build and its CUDA toolkit
    (``CUDA_HOME``, or nvcc on the PATH) is found.
``IK_FAST_CPU_FLAGS``
    The compiler's vector ISA flags for the CPU kernels, replacing the default (``-mavx2 -mfma`` plus ATen's
    ``-DCPU_CAPABILITY_AVX2`` when the build machine's CPU and compiler support them, else nothing). ``""`` gives a
    portable build (e.g. for a wheel run on other machines), ``"-march=native"`` tunes for the build machine.
``IK_FAST_BUILD_EXT``
    ``0``: ``setup.py`` builds no extension (the package then compiles it on first use).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from typing import Dict, List, Optional

__all__ = ["source_root", "sources", "source_hash", "want_cuda", "cpu_isa_flags", "cxx_flags", "nvcc_flags",
           "ld_flags", "CUDA_ARCHS"]

CUDA_ARCHS = (80, 90)  # A100, H100/H200
_HERE = os.path.dirname(os.path.abspath(__file__))


def source_root() -> Optional[str]:
    """The ``csrc`` folder: shipped inside the package (a wheel: ``ik_fast/csrc``) or beside it (a checkout or an
    editable install); None when neither has the sources."""
    for cand in (os.path.join(_HERE, "csrc"), os.path.join(os.path.dirname(_HERE), "csrc")):
        if os.path.isfile(os.path.join(cand, "module.cpp")):
            return cand
    return None


def _listdir(root: str, sub: str, ext: str) -> List[str]:
    d = os.path.join(root, sub)
    if not os.path.isdir(d):
        return []
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(ext))


def sources(root: str, with_cuda: bool) -> List[str]:
    """module.cpp and every ``cpu/*.cpp``; with ``with_cuda`` also every ``cuda/*.cu``."""
    srcs = [os.path.join(root, "module.cpp")] + _listdir(root, "cpu", ".cpp")
    if with_cuda:
        srcs += _listdir(root, "cuda", ".cu")
    return srcs


def cuda_sources(root: str) -> List[str]:
    return _listdir(root, "cuda", ".cu")


def source_hash(root: str) -> str:
    """A hash of every source and header under ``root`` (names and contents): the prebuilt module records it, so
    that a checkout whose sources changed since its build recompiles instead of running stale kernels."""
    h = hashlib.sha256()
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for f in sorted(files):
            if f.endswith((".cpp", ".cu", ".h", ".cuh", ".hpp")):
                p = os.path.join(dirpath, f)
                h.update(os.path.relpath(p, root).encode() + b"\0")
                with open(p, "rb") as fh:
                    h.update(fh.read())
                h.update(b"\0")
    return h.hexdigest()[:16]


def _env_flag(name: str) -> Optional[bool]:
    v = os.environ.get(name, "").strip().lower()
    if v in ("", "auto"):
        return None
    if v in ("0", "false", "no", "off"):
        return False
    if v in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 0 or 1 (or unset), got {os.environ[name]!r}")


def want_cuda(root: Optional[str] = None) -> bool:
    """Whether to build the CUDA part (see the module docstring). Imports torch."""
    forced = _env_flag("IK_FAST_BUILD_CUDA")
    if forced is not None:
        return forced
    if root is not None and not cuda_sources(root):
        return False
    import torch
    from torch.utils import cpp_extension

    return bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None


def _cxx() -> str:
    return os.environ.get("CXX", "c++")  # the compiler torch.utils.cpp_extension uses


def _cpu_has(*features: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return all(x in have for x in features)
    except OSError:
        pass
    return False


def _compiler_accepts(flags: List[str]) -> bool:
    cxx = shutil.which(_cxx())
    if cxx is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.cpp")
        with open(src, "w") as f:
            f.write("#include <immintrin.h>\nint main(){__m256 a=_mm256_set1_ps(1.f);"
                    "a=_mm256_fmadd_ps(a,a,a);return (int)_mm256_cvtss_f32(a);}\n")
        try:
            res = subprocess.run([cxx, *flags, "-c", src, "-o", os.path.join(d, "t.o")], capture_output=True,
                                 timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return False
    return res.returncode == 0


def cpu_isa_flags() -> List[str]:
    """The vector ISA flags of the CPU part: $IK_FAST_CPU_FLAGS when set, else AVX2 + FMA where this machine's CPU
    and compiler support them (``-DCPU_CAPABILITY_AVX2`` selects ATen's 256-bit ``at::vec::Vectorized``; without it
    the ``Vectorized`` types are plain scalar loops whatever ``-m`` flags are given)."""
    if "IK_FAST_CPU_FLAGS" in os.environ:
        return shlex.split(os.environ["IK_FAST_CPU_FLAGS"])
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    flags = ["-mavx2", "-mfma", "-mf16c"]
    if _cpu_has("avx2", "fma", "f16c") and _compiler_accepts(flags):
        return flags + ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def cxx_flags(with_cuda: bool, root: Optional[str] = None, isa: Optional[List[str]] = None) -> List[str]:
    """Host compiler flags (torch.utils.cpp_extension adds -std=c++20, -fPIC, the include paths and the ABI)."""
    flags = ["-O3", "-fopenmp", "-Wno-unused-function"]  # -fopenmp: at::parallel_for is OpenMP only when compiled so
    flags += cpu_isa_flags() if isa is None else isa
    if with_cuda:
        flags.append("-DIK_FAST_WITH_CUDA")
    if root is not None:
        flags.append(f"-DIK_FAST_SOURCE_HASH=h{source_hash(root)}")
    return flags


def nvcc_flags(root: Optional[str] = None) -> List[str]:
    """nvcc flags of the CUDA part (torch adds its own defines, e.g. -D__CUDA_NO_HALF_OPERATORS__)."""
    flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DIK_FAST_WITH_CUDA"]  # IEEE math: no --use_fast_math
    flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
    if root is not None:
        flags.append(f"-DIK_FAST_SOURCE_HASH=h{source_hash(root)}")
    return flags


def ld_flags() -> List[str]:
    # libgomp.so.1: the same soname as the runtime torch ships and has already loaded, so one OpenMP runtime serves both
    return ["-fopenmp"]


def describe() -> Dict[str, object]:
    """The build configuration this machine would use (for messages and the JIT cache key)."""
    root = source_root()
    cuda = want_cuda(root)
    return {"root": root, "with_cuda": cuda, "cxx": _cxx(), "cxx_flags": cxx_flags(cuda, root),
            "nvcc_flags": nvcc_flags(root) if cuda else [], "ld_flags": ld_flags()}
