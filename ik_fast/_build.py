"""How the native extension (``csrc/``) is compiled: its sources and flags, in one place for both builds.

``setup.py`` builds ``ik_fast._C`` ahead of time with these; :mod:`ik_fast._native` compiles the same sources with
the same flags on first use when no prebuilt module is importable (``torch.utils.cpp_extension.load``). setup.py runs
before the package is installed and must not import ``ik_fast`` (its ``__init__`` imports escnn), so it loads this
file by path: this module imports only the standard library at the top, and torch inside the functions that need it.

Environment variables (read at build time; the JIT build folds them into its cache key):

``IK_FAST_BUILD_CUDA``
    ``0``: CPU part only. ``1``: the CUDA part (``csrc/cuda/*.cu``) too, or a :class:`CudaBuildError` at once saying
    why it cannot be built here (before minutes of compiling). Unset: the CUDA part is built where it can be, as
    :func:`cuda_decision` checks — a CUDA build of torch, nvcc at ``$CUDA_HOME/bin/nvcc`` (``CUDA_HOME`` as torch finds
    it: the variable, else the folder above the ``nvcc`` on the PATH, else ``/usr/local/cuda``) of torch's CUDA major
    version, and a test link with exactly the libraries the extension links (``-lcudart`` from ``$CUDA_HOME/lib64``,
    torch's ``-lc10_cuda -ltorch_cuda``); else the CPU part alone, with the reason. A GPU is not needed to build.
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
import re
import shlex
import shutil
import subprocess
import tempfile
from typing import Dict, List, NamedTuple, Optional, Tuple

__all__ = [
    "source_root",
    "sources",
    "source_hash",
    "cuda_decision",
    "CudaDecision",
    "CudaBuildError",
    "want_cuda",
    "cuda_fingerprint",
    "error_lines",
    "estimate",
    "cpu_isa_flags",
    "cxx_flags",
    "nvcc_flags",
    "ld_flags",
    "CUDA_ARCHS",
    "BUILD_SECONDS",
]

CUDA_ARCHS = (80, 90)  # A100, H100/H200
# Wall-clock seconds of a whole build from an empty cache (fewest, most), measured on this project's 2-core VM while
# other jobs shared it (load average 4-8; more cores are faster: ninja compiles the sources in parallel): "cpu",
# module.cpp + cpu/*.cpp: 206 s (torch 2.13.0+cpu), 284 s and 134 s (torch 2.14.1+cu130, CUDA part skipped); "cuda",
# the same plus cuda/*.cu for sm_80 and sm_90: 674 s (torch 2.14.1+cu130, nvcc 13.0, measured once). The docs'
# getting-started page ("The native extension") quotes them; the first-use message states these as its estimate.
BUILD_SECONDS = {"cpu": (134, 284), "cuda": (674, 674)}
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


class CudaBuildError(RuntimeError):
    """``IK_FAST_BUILD_CUDA=1``, but the CUDA part cannot be built here; the message says why."""


class CudaDecision(NamedTuple):
    """Whether the build includes the CUDA part, and why (one sentence, for messages). (A NamedTuple, not a
    dataclass: setup.py executes this file without registering it as a module, which dataclasses need.)"""

    build: bool
    reason: str


def _cxx_cmd() -> List[str]:
    return shlex.split(_cxx())


def error_lines(text: str, n: int = 25) -> str:
    """The compiler's and linker's own diagnostics in a failed build's output (``error:``, ``fatal error``,
    ``/usr/bin/ld: cannot find -lcudart``, ``undefined reference``, ninja's ``FAILED: <target>``), without the
    command lines; the last ``n`` lines of the output when none is recognised."""
    text = re.sub(r"^Error building extension '[^']*': ", "", text)  # torch's prefix to ninja's first line
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    compilers = {"c++", "g++", "gcc", "cc", "clang", "clang++", "nvcc"} | {os.path.basename(c) for c in _cxx_cmd()[:1]}
    keep = []
    for ln in lines:
        first = ln.strip().split(" ", 1)[0]
        if re.match(r"^\[\d+/\d+\] ", ln) or os.path.basename(first) in compilers or len(ln) > 2000:
            continue  # ninja's progress lines and the commands themselves
        if ln.startswith("FAILED:") or _DIAG.search(ln):
            keep.append(ln)
    return "\n".join((keep or lines)[-n:])


_DIAG = re.compile(
    r"error|fatal|cannot find|undefined (reference|symbol)|multiple definition|no such file|"
    r"ld returned|\bld(\.\w+)?: ",
    re.I,
)


def _torch_cuda() -> Optional[str]:
    import torch

    return torch.version.cuda


def _cuda_home() -> Tuple[Optional[str], str]:
    """torch's CUDA_HOME (what its build will use) and how torch found it."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return home, f"${var}"
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        return home, f"torch's guess from the nvcc on the PATH, {nvcc}"
    return home, "torch's default"


def _nvcc(home: str) -> List[str]:
    return (
        shlex.split(os.environ["PYTORCH_NVCC"])
        if os.environ.get("PYTORCH_NVCC")
        else [os.path.join(home, "bin", "nvcc")]
    )


def _nvcc_version(nvcc: List[str]) -> Tuple[Optional[str], str]:
    """(``"13.0"``, output) from ``nvcc --version``; (None, why) when it does not run."""
    try:
        res = subprocess.run([*nvcc, "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{type(e).__name__}: {e}"
    m = re.search(r"release (\d+\.\d+)", res.stdout)
    if res.returncode != 0 or m is None:
        return None, error_lines(res.stdout + res.stderr, 5) or f"exit status {res.returncode}"
    return m.group(1), res.stdout


def _cuda_link_flags() -> List[str]:
    """The libraries a CUDA extension links (as torch.utils.cpp_extension links them) plus :func:`ld_flags`."""
    from torch.utils import cpp_extension

    lib_dirs = cpp_extension.library_paths("cuda")  # torch/lib, then $CUDA_HOME/lib64 (or lib)
    return (
        [f"-L{d}" for d in lib_dirs]
        + ["-lc10", "-lc10_cuda", "-ltorch_cpu", "-ltorch_cuda", "-ltorch", "-ltorch_python", "-lcudart"]
        + ld_flags()
    )


def _link_probe(flags: List[str]) -> Tuple[bool, str]:
    """Link an empty shared object with ``flags`` (a fraction of a second): (True, "") or (False, the linker's
    output)."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.cpp")
        with open(src, "w") as f:
            f.write("int ik_fast_link_probe() { return 0; }\n")
        cmd = [*_cxx_cmd(), "-shared", "-fPIC", src, "-o", os.path.join(d, "probe.so"), *flags]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, f"{type(e).__name__}: {e}"
    return res.returncode == 0, res.stdout + res.stderr


def _toolkits_with_cudart() -> List[str]:
    """CUDA toolkits in the usual places whose lib64 has a linkable libcudart (for the hint in a reason)."""
    found = []
    for cand in ["/usr/local/cuda"] + sorted(
        d for d in (os.path.join("/usr/local", x) for x in _ls("/usr/local")) if os.path.basename(d).startswith("cuda-")
    ):
        for lib in ("lib64", "lib"):
            if any(os.path.exists(os.path.join(cand, lib, f)) for f in ("libcudart.so", "libcudart.a")):
                found.append(cand)
                break
    return found


def _ls(d: str) -> List[str]:
    try:
        return os.listdir(d)
    except OSError:
        return []


def _cuda_blocker() -> Tuple[Optional[str], str]:
    """(None, what was found) where the CUDA part can be built and linked here, else (the reason it cannot, "")."""
    torch_cuda = _torch_cuda()
    if not torch_cuda:
        import torch

        return f"torch {torch.__version__} is a CPU build", ""
    home, how = _cuda_home()
    if home is None:
        return (
            f"torch is a CUDA {torch_cuda} build, but no CUDA toolkit was found (no nvcc on the PATH, CUDA_HOME "
            f"unset, no /usr/local/cuda)"
        ), ""
    where = f"CUDA_HOME={home} ({how})"
    nvcc = _nvcc(home)
    if shutil.which(nvcc[0]) is None:
        return f"{where} has no nvcc ({nvcc[0]} is not an executable)", ""
    version, out = _nvcc_version(nvcc)
    if version is None:
        return f"{where}: {' '.join(nvcc)} --version fails: {out}", ""
    if version.split(".")[0] != torch_cuda.split(".")[0]:
        return (
            f"{where}: nvcc is CUDA {version}, torch was built with CUDA {torch_cuda} (the major versions must match)"
        ), ""
    ok, out = _link_probe(_cuda_link_flags())
    if not ok:
        hint = [t for t in _toolkits_with_cudart() if os.path.realpath(t) != os.path.realpath(home)]
        return (
            f"linking against CUDA fails with {where}:\n{error_lines(out)}"
            + (f"\n(set CUDA_HOME to a toolkit with a linkable libcudart, e.g. CUDA_HOME={hint[0]})" if hint else "")
        ), ""
    return None, f"torch is a CUDA {torch_cuda} build and {where} has nvcc {version} and links"


def cuda_decision(root: Optional[str] = None) -> CudaDecision:
    """Whether to build the CUDA part, and why (see the module docstring). Imports torch; unless
    ``IK_FAST_BUILD_CUDA=0`` or torch is a CPU build, runs ``nvcc --version`` and a test link (well under a second).
    Raises :class:`CudaBuildError` when ``IK_FAST_BUILD_CUDA=1`` and the CUDA part cannot be built here."""
    forced = _env_flag("IK_FAST_BUILD_CUDA")
    if forced is False:
        return CudaDecision(False, "IK_FAST_BUILD_CUDA=0")
    if root is not None and not cuda_sources(root):
        why = f"{root} has no cuda/*.cu sources"
    else:
        why, found = _cuda_blocker()
        if why is None:
            return CudaDecision(True, found + ("; IK_FAST_BUILD_CUDA=1" if forced else ""))
    if forced:
        raise CudaBuildError(f"IK_FAST_BUILD_CUDA=1, but the CUDA part cannot be built here: {why}")
    return CudaDecision(False, why)


def want_cuda(root: Optional[str] = None) -> bool:
    """``cuda_decision(root).build``."""
    return cuda_decision(root).build


def cuda_fingerprint() -> List[object]:
    """What :func:`cuda_decision` depends on, cheaply (no subprocess): the first-use build's cache key includes it, so
    a cached build is reused without re-deciding while none of it changes, and rebuilt when one does (a toolkit
    installed, CUDA_HOME set, ...)."""
    forced = os.environ.get("IK_FAST_BUILD_CUDA", "").strip().lower()
    torch_cuda = _torch_cuda()
    if not torch_cuda or forced in ("0", "false", "no", "off"):
        return [forced, torch_cuda]
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    paths = [] if home is None else [_nvcc(home)[0]] + cpp_extension.library_paths("cuda")[1:]
    stats = []
    for p in paths:
        try:
            st = os.stat(p)
            stats.append([p, st.st_mtime_ns, st.st_size])
        except OSError:
            stats.append([p, None])
    return [forced, torch_cuda, home, os.environ.get("PYTORCH_NVCC"), _cxx(), stats]


def estimate(with_cuda: bool) -> str:
    """The measured build time (:data:`BUILD_SECONDS`), for messages."""
    lo, hi = (round(t / 60) for t in BUILD_SECONDS["cuda" if with_cuda else "cpu"])
    return f"about {lo if lo == hi else f'{lo}-{hi}'} minutes on 2 cores, less on more"


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
            f.write(
                "#include <immintrin.h>\nint main(){__m256 a=_mm256_set1_ps(1.f);"
                "a=_mm256_fmadd_ps(a,a,a);return (int)_mm256_cvtss_f32(a);}\n"
            )
        try:
            res = subprocess.run(
                [cxx, *flags, "-c", src, "-o", os.path.join(d, "t.o")], capture_output=True, timeout=60
            )
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
    """The build configuration this machine would use (for messages)."""
    root = source_root()
    cuda = cuda_decision(root)
    return {
        "root": root,
        "with_cuda": cuda.build,
        "cuda_reason": cuda.reason,
        "cxx": _cxx(),
        "cxx_flags": cxx_flags(cuda.build, root),
        "nvcc_flags": nvcc_flags(root) if cuda.build else [],
        "ld_flags": ld_flags(),
    }
