"""Loading the native extension (``csrc/``: C++ on CPU tensors, CUDA on CUDA tensors), prebuilt or compiled on demand.

:func:`load` imports ``ik_fast._C`` (built by ``setup.py``, e.g. by the editable install of ``scripts/run.sh``).
Without it, or when it was built from other sources than the checkout's (a source checkout whose ``csrc/`` changed
since the install), it compiles the same sources with the same flags (:mod:`ik_fast._build`) through
``torch.utils.cpp_extension.load`` (ninja) into a cache folder, ``$IK_FAST_CACHE`` or ``~/.cache/ik_fast``, one
subfolder per torch version, Python version and hash of the sources and flags; later processes import the cached
module without running ninja. Where that fails (no C++ compiler, no ninja, a compile error) it raises with the
reason, which ``ik_fast.ops.status("native")`` keeps and ``ik_fast.available_backends`` and ``"auto"`` report.

The op schemas must exist before the module is imported (its ``TORCH_LIBRARY_IMPL`` blocks add kernels to them):
:func:`ik_fast.ops.register_implementation` defines them before it calls the loader.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import threading
from typing import Optional

import torch

from . import _build

__all__ = ["load", "module", "runs_on", "cache_dir"]

_MODULE = None
_LOCK = threading.Lock()
_JIT_NAME = "ik_fast_native"
_HASH_RE = re.compile(rb"ik_fast-source-hash:h([0-9a-f]*);")


def cache_dir() -> str:
    base = os.environ.get("IK_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ik_fast")
    return os.path.abspath(base)


def _built_hash(path: str) -> Optional[str]:
    """The source hash recorded in a built module's file (csrc/module.cpp), read without importing it."""
    with open(path, "rb") as f:
        found = _HASH_RE.findall(f.read())  # (the linker may also keep a truncated copy of the literal's prefix)
    return found[0].decode() if found else None


def _prebuilt(root: Optional[str]):
    """``ik_fast._C`` when it exists and was built from the sources at ``root`` (when there are any); else None and
    the reason. Only a module that will be used is imported: importing registers its kernels, once per process."""
    spec = importlib.util.find_spec(f"{__package__}._C")
    if spec is None or spec.origin is None:
        return None, "no prebuilt ik_fast._C"
    if root is not None:
        built, now = _built_hash(spec.origin), _build.source_hash(root)
        if built != now:
            return None, f"the prebuilt {spec.origin} was built from other sources ({built}) than {root} ({now})"
    try:
        from . import _C
    except ImportError as e:
        return None, f"the prebuilt ik_fast._C does not import ({e})"
    return _C, None


def _tail(text: str, n: int = 25) -> str:
    """The compiler's error lines (else the last lines) of a failed build's output."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower()]
    return "\n".join((errs or lines)[-n:])


def _jit(root: str):
    """Compile the sources at ``root`` (or import the cached result)."""
    from torch.utils import cpp_extension

    with_cuda = _build.want_cuda(root)
    cflags = _build.cxx_flags(with_cuda, root)
    nvcc = _build.nvcc_flags(root) if with_cuda else []
    ldflags = _build.ld_flags()
    srcs = _build.sources(root, with_cuda)
    key = json.dumps([torch.__version__, sys.version, _build.source_hash(root), cflags, nvcc, ldflags,
                      os.environ.get("CXX", "c++"), with_cuda])
    tag = f"{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    build_dir = os.path.join(cache_dir(), f"{tag}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
    done = os.path.join(build_dir, "ok")
    so = os.path.join(build_dir, f"{_JIT_NAME}.so")
    if os.path.exists(done) and os.path.exists(so):  # built before by this configuration: no ninja run
        spec = importlib.util.spec_from_file_location(_JIT_NAME, so)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} (the CXX environment variable, else c++) is not on the PATH; "
                           f"install one (e.g. g++) or a prebuilt ik_fast")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja): torch.utils.cpp_extension needs it")
    os.makedirs(build_dir, exist_ok=True)
    print(f"ik_fast: compiling the native extension into {build_dir} (once; about a minute)", file=sys.stderr)
    try:
        mod = cpp_extension.load(_JIT_NAME, srcs, extra_cflags=cflags, extra_cuda_cflags=nvcc,
                                 extra_ldflags=ldflags, extra_include_paths=[root], build_directory=build_dir,
                                 with_cuda=with_cuda, verbose=False)
    except Exception as e:
        raise RuntimeError(f"compiling {root} failed ({type(e).__name__}): {_tail(str(e))}") from None
    with open(done, "w") as f:
        f.write(key)
    return mod


_OPS = ("native_conv", "native_conv_backward", "native_trunk_moments")


def _missing_kernels(key: str) -> list:
    """The native ops without a kernel for dispatch key ``key`` ("CPU", "CUDA")."""
    return [op for op in _OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ik_fast::{op}", key)]


def load():
    """The extension's module, loading it once (its import registers the kernels). Raises with the reason when it
    is neither prebuilt nor compilable here, or registers no CPU kernel for one of the ops."""
    global _MODULE
    with _LOCK:
        if _MODULE is not None:
            return _MODULE
        root = _build.source_root()
        mod, why = _prebuilt(root)
        if mod is None:
            if root is None:
                raise ImportError(f"{why}, and the package has no csrc/ sources to compile")
            try:
                mod = _jit(root)
            except Exception as e:
                raise RuntimeError(f"{why}; {e}") from None
        _MODULE = mod
    missing = _missing_kernels("CPU")
    if missing:
        raise RuntimeError(f"the native extension ({mod.__file__}) registers no CPU kernel for {', '.join(missing)} "
                           f"(csrc/cpu/*.cpp: TORCH_LIBRARY_IMPL(ik_fast, CPU, m))")
    return mod


def module():
    """The loaded module (None before :func:`load` succeeded)."""
    return _MODULE


def runs_on(device: torch.device) -> Optional[str]:
    """None where the native kernels run on ``device``, else the reason."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        mod = load()
        if not mod.cuda_built():
            return ("the native extension was built without its CUDA part (a CPU build of torch, no nvcc, or "
                    "IK_FAST_BUILD_CUDA=0); rebuild with a CUDA build of torch and nvcc")
        missing = _missing_kernels("CUDA")
        if missing:
            return f"the native extension registers no CUDA kernel for {', '.join(missing)} (csrc/cuda/*.cu)"
        return None
    return f"the native kernels run on CPU and CUDA devices, not {device.type}"
