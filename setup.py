"""Build script: the pure-Python package, plus the native extension ``ik_fast._C`` (``csrc/``) when torch is importable
at build time (``pip install --no-build-isolation``, as scripts/run.sh and the README's set-up do, after torch).

- CPU part (``csrc/module.cpp``, ``csrc/cpu/*.cpp``) wherever a C++ compiler exists (``$CXX``, else ``c++``);
- CUDA part (``csrc/cuda/*.cu``, sm_80 and sm_90) where ``_build.cuda_decision`` finds it can be built: a CUDA build
  of torch, nvcc of its CUDA major version, and a test link against libcudart and torch's CUDA libraries (else the
  CPU part alone, with the reason printed); ``IK_FAST_BUILD_CUDA=1`` requires it (stops at once, with the reason, when
  it cannot be built), ``IK_FAST_BUILD_CUDA=0`` builds the CPU part only;
- ``IK_FAST_CPU_FLAGS`` overrides the CPU vector ISA flags (default ``-mavx2 -mfma`` where supported);
- ``IK_FAST_BUILD_EXT=0`` builds no extension.

Without torch (an isolated build) or without a compiler the package installs without the extension and compiles it on
first use instead (``ik_fast/_native.py``). Sources and flags live in ``ik_fast/_build.py``, shared with that
just-in-time build; it is loaded by path because ``ik_fast/__init__.py`` imports escnn, which a build need not have.
"""

import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh", ".md")

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build():
    spec = importlib.util.spec_from_file_location("_ik_fast_build", os.path.join(ROOT, "ik_fast", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extensions():
    build = _load_build()
    if os.environ.get("IK_FAST_BUILD_EXT", "1") == "0":
        print("ik_fast: IK_FAST_BUILD_EXT=0, no native extension (compiled on first use instead)", file=sys.stderr)
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "ik_fast: torch is not importable at build time, so the native extension is not built now (it is "
            "compiled on first use; install torch first and use --no-build-isolation to build it here)",
            file=sys.stderr,
        )
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        print(f"ik_fast: no C++ compiler ({cxx!r} not found), no native extension", file=sys.stderr)
        return [], {}
    root = os.path.join(ROOT, "csrc")
    try:
        decision = build.cuda_decision(root)  # a test link, not a guess: a CUDA torch that cannot link CUDA here
    except build.CudaBuildError as e:  # IK_FAST_BUILD_CUDA=1 that cannot be honoured: stop now, not after nvcc
        raise SystemExit(f"ik_fast: {e}") from None
    with_cuda = decision.build
    rel = lambda paths: [os.path.relpath(p, ROOT) for p in paths]  # noqa: E731  (setuptools wants relative paths)
    kwargs = dict(
        name="ik_fast._C",
        sources=rel(build.sources(root, with_cuda)),
        include_dirs=[root],
        extra_link_args=build.ld_flags(),
    )
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            **kwargs, extra_compile_args={"cxx": build.cxx_flags(True, root), "nvcc": build.nvcc_flags(root)}
        )
    else:
        ext = cpp_extension.CppExtension(**kwargs, extra_compile_args={"cxx": build.cxx_flags(False, root)})
    print(
        f"ik_fast: building ik_fast._C ({'CPU + CUDA' if with_cuda else 'CPU'}, {build.estimate(with_cuda)}; "
        f"flags {' '.join(build.cxx_flags(with_cuda))}); CUDA part {'built' if with_cuda else 'skipped'}: "
        f"{decision.reason}",
        file=sys.stderr,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


class BuildPyWithSources(build_py):
    """Also copies csrc/'s sources into the built package as ``ik_fast/csrc``, where the first-use build finds them
    (``ik_fast/_build.py`` ``source_root``) when the wheel was built without the extension."""

    def run(self):
        super().run()
        root = os.path.join(ROOT, "csrc")
        for dirpath, _, files in os.walk(root):
            for f in sorted(files):
                if f.endswith(SOURCE_SUFFIXES):
                    src = os.path.join(dirpath, f)
                    dst = os.path.join(self.build_lib, "ik_fast", "csrc", os.path.relpath(src, root))
                    self.mkpath(os.path.dirname(dst))
                    self.copy_file(src, dst)


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
