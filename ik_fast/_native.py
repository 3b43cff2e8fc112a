"""Loading the native extension (``csrc/``: C++ on CPU tensors, CUDA on CUDA tensors), prebuilt or compiled on demand.

:func:`load` imports ``ik_fast._C`` (built by ``setup.py``, e.g. by the editable install of ``scripts/run.sh``).
Without it, or when it was built from other sources than the checkout's (a source checkout whose ``csrc/`` changed
since the install), it compiles the same sources with the same flags (:mod:`ik_fast._build`) through
``torch.utils.cpp_extension.load`` (ninja) into a cache folder, ``$IK_FAST_CACHE`` or ``~/.cache/ik_fast``, one
subfolder per torch version, Python version and hash of the sources, flags and the CUDA decision's inputs
(:func:`ik_fast._build.cuda_fingerprint`); later processes import the cached module without running ninja. Whether
the CUDA part is compiled is :func:`ik_fast._build.cuda_decision`'s (where a CUDA build of torch cannot link CUDA here,
the CPU part alone, with the reason printed and kept in :func:`info`). Where the build fails (no C++ compiler, no
ninja, a compile or link error) it raises with the compiler's or linker's own error lines, which
``ik_fast.ops.status("native")`` keeps and ``ik_fast.available_backends`` and ``"auto"`` report.
``python -m ik_fast.build`` runs this ahead of time (:mod:`ik_fast.build`).

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
import time
from typing import Optional

import torch

from ik_fast import _build

__all__ = ["load", "module", "runs_on", "cache_dir", "info"]

_MODULE = None
_LOCK = threading.Lock()
# How the loaded module came to be (for `python -m ik_fast.build` and the messages): how ("prebuilt", "cached",
# "compiled"), path, with_cuda, cuda_reason (why the CUDA part is or is not in it; None for a prebuilt module, built by
# setup.py, which printed it), seconds (the compile's wall-clock time).
_INFO: dict = {}
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
        from ik_fast import _C
    except ImportError as e:
        return None, f"the prebuilt ik_fast._C does not import ({e})"
    return _C, None


def _record(build_dir: str) -> Optional[dict]:
    """What a finished first-use build in ``build_dir`` recorded (None when it did not finish)."""
    try:
        with open(os.path.join(build_dir, "ok")) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _jit(root: str, rebuild: bool = False):
    """Compile the sources at ``root`` (or import the cached result; ``rebuild``: compile from scratch)."""
    from torch.utils import cpp_extension

    # The cache key holds what the build depends on, the CUDA decision's inputs included (not the decision itself:
    # deciding runs nvcc and a test link, which a cached build need not wait for).
    cflags = _build.cxx_flags(False, root)
    ldflags = _build.ld_flags()
    cxx = os.environ.get("CXX", "c++")
    key = json.dumps(
        [
            torch.__version__,
            sys.version,
            _build.source_hash(root),
            cflags,
            _build.nvcc_flags(root),
            ldflags,
            cxx,
            _build.cuda_fingerprint(),
        ]
    )
    tag = f"{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    build_dir = os.path.join(cache_dir(), f"{tag}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
    so = os.path.join(build_dir, f"{_JIT_NAME}.so")
    rec = _record(build_dir)
    if rec is not None and rec.get("key") == key and os.path.exists(so) and not rebuild:
        spec = importlib.util.spec_from_file_location(_JIT_NAME, so)  # built before by this configuration: no ninja
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _INFO.update(
            how="cached",
            path=so,
            with_cuda=rec.get("with_cuda"),
            cuda_reason=rec.get("cuda_reason"),
            seconds=rec.get("seconds"),
        )
        return mod
    if shutil.which(cxx) is None:
        raise RuntimeError(
            f"no C++ compiler: {cxx!r} (the CXX environment variable, else c++) is not on the PATH; "
            f"install one (e.g. g++) or a prebuilt ik_fast"
        )
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja): torch.utils.cpp_extension needs it")
    decision = _build.cuda_decision(root)  # raises CudaBuildError when IK_FAST_BUILD_CUDA=1 cannot be honoured
    with_cuda = decision.build
    if with_cuda:
        cflags = _build.cxx_flags(True, root)
    if rebuild:  # from scratch: ninja would otherwise keep the objects it finds up to date
        shutil.rmtree(build_dir, ignore_errors=True)
    os.makedirs(build_dir, exist_ok=True)
    if os.path.exists(os.path.join(build_dir, "ok")):
        os.remove(os.path.join(build_dir, "ok"))
    part = "CPU and CUDA parts" if with_cuda else "CPU part"
    print(
        f"ik_fast: compiling the native extension's {part} into {build_dir} (once; "
        f"{_build.estimate(with_cuda)}; `python -m ik_fast.build` does it ahead of time). CUDA part "
        f"{'built' if with_cuda else 'skipped'}: {decision.reason}",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    try:
        mod = cpp_extension.load(
            _JIT_NAME,
            _build.sources(root, with_cuda),
            extra_cflags=cflags,
            extra_cuda_cflags=_build.nvcc_flags(root) if with_cuda else [],
            extra_ldflags=ldflags,
            extra_include_paths=[root],
            build_directory=build_dir,
            with_cuda=with_cuda,
            verbose=False,
        )
    except Exception as e:
        raise RuntimeError(
            f"compiling the native extension's {part} from {root} in {build_dir} failed "
            f"({type(e).__name__}):\n{_build.error_lines(str(e))}"
        ) from None
    seconds = round(time.perf_counter() - t0, 1)
    with open(os.path.join(build_dir, "ok"), "w") as f:
        json.dump({"key": key, "with_cuda": with_cuda, "cuda_reason": decision.reason, "seconds": seconds}, f)
    _INFO.update(how="compiled", path=so, with_cuda=with_cuda, cuda_reason=decision.reason, seconds=seconds)
    return mod


_OPS = ("native_conv", "native_conv_backward", "native_trunk_moments")


def _missing_kernels(key: str) -> list:
    """The native ops without a kernel for dispatch key ``key`` ("CPU", "CUDA")."""
    return [op for op in _OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ik_fast::{op}", key)]


def load(rebuild: bool = False):
    """The extension's module, loading it once (its import registers the kernels). Raises with the reason when it
    is neither prebuilt nor compilable here, or registers no CPU kernel for one of the ops. ``rebuild``: compile
    again even where the first-use build's cache holds this configuration (a prebuilt module is still preferred)."""
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
                mod = _jit(root, rebuild)
            except Exception as e:
                raise RuntimeError(f"{why}; {e}") from None
        else:
            _INFO.update(
                how="prebuilt", path=mod.__file__, with_cuda=bool(mod.cuda_built()), cuda_reason=None, seconds=None
            )
        _MODULE = mod
    missing = _missing_kernels("CPU")
    if missing:
        raise RuntimeError(
            f"the native extension ({mod.__file__}) registers no CPU kernel for {', '.join(missing)} "
            f"(csrc/cpu/*.cpp: TORCH_LIBRARY_IMPL(ik_fast, CPU, m))"
        )
    return mod


def module():
    """The loaded module (None before :func:`load` succeeded)."""
    return _MODULE


def info() -> dict:
    """How the loaded module came to be (empty before :func:`load` succeeded): ``how`` ("prebuilt": ik_fast._C
    from setup.py; "cached": a first-use build of this configuration; "compiled": compiled by this process), ``path``,
    ``with_cuda``, ``cuda_reason`` (why the CUDA part is or is not in it; None for a prebuilt module) and ``seconds``
    (the compile's wall-clock time)."""
    return dict(_INFO)


def runs_on(device: torch.device) -> Optional[str]:
    """None where the native kernels run on ``device``, else the reason."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        mod = load()
        if not mod.cuda_built():
            why = _INFO.get("cuda_reason") or "a CPU build of torch, no usable CUDA toolkit, or IK_FAST_BUILD_CUDA=0"
            return (
                f"the native extension was built without its CUDA part ({why}); rebuild it with a CUDA build of "
                f"torch and a CUDA toolkit (IK_FAST_BUILD_CUDA=1 python -m ik_fast.build --rebuild says what is "
                f"missing)"
            )
        missing = _missing_kernels("CUDA")
        if missing:
            return f"the native extension registers no CUDA kernel for {', '.join(missing)} (csrc/cuda/*.cu)"
        return None
    return f"the native kernels run on CPU and CUDA devices, not {device.type}"
