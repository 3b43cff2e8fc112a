"""The native backend (``csrc/``: C++ kernels on CPU tensors) beyond the agreement with the reference that
test_backends and test_equivariance check for every backend: the build and its loader, the registered ops
(``ik_fast::native_*``: their statement, double backward; opcheck and torch.compile in test_compile.py), tolerances in
float32 and float64, thread counts, determinism, corner cases (empty and skewed graphs, receivers without edges, wide
layers), the loader's reasons when it cannot build, and "auto"'s choice on CPU. Bad inputs (through the layer and the
raw ops): test_errors.py.

The native tests skip when the extension does not load here, unless ``IK_FAST_REQUIRE_NATIVE=1`` (CI sets it), where
that is a failure stating the loader's reason."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import field_types, get_gspace, rel, small_graph
from torch.utils import cpp_extension as _cpp_ext

import ik_fast
import ik_fast.backends  # noqa: F401  (registers the native implementation before WHY asks for its status)
from ik_fast import _build, _native, ops
from ik_fast.graph import prepare_graph
from ik_fast.testing import tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHY = ops.status("native", "cpu")
F64 = torch.float64
REQUIRED = os.environ.get("IK_FAST_REQUIRE_NATIVE", "") == "1"
needs_native = pytest.mark.skipif(WHY is not None and not REQUIRED, reason=f"native extension unavailable: {WHY}")


def _conv(name="O3", kind="mixed_attr", dtype=torch.float64, n_layers=3, n_channels=2, **kw):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, kind)
    torch.manual_seed(0)
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=n_layers, n_channels=n_channels, **kw)
    return conv.to(dtype), gs, attr_t


def _inputs(conv, gs, attr_t, n=10, e=40, dtype=torch.float64, seed=0):
    pos, ei = small_graph(n, e, gs.dimensionality, seed=seed, dtype=dtype)
    x = torch.randn(n, conv.in_type.size, dtype=dtype)
    a = None if attr_t is None else torch.randn(e, attr_t.size, dtype=dtype)
    return pos, ei, x, a


def _op_args(conv, pos, ei, x, a, grad=True):
    """native_conv's arguments for a layer and a graph, as the fused backend builds them (op contract v2: the kernel
    MLP as written, each batch norm an affine map; in eval mode from the running statistics), in schema order up to
    ``hidden`` (None): x, inp, src, rowptr, weights, biases, fourier, fourier_inv, bn_factor, bn_shift, final_weight,
    final_bias, coef, norm, ndim, structure, hidden. Leaves that require gradients where the op has one."""
    prog = conv.kernel.program()
    n = x.shape[0]
    g = prepare_graph(ei, n, n)
    inp = prog.mlp_input(pos[ei[0]] - pos[ei[1]], a)[g.perm].contiguous()
    p = prog.op_program([], x.dtype)
    leaf = (lambda t: t.detach().clone().requires_grad_()) if grad else (lambda t: t.detach().clone())  # noqa: E731
    return [
        leaf(x),
        leaf(inp),
        g.src[g.perm].contiguous(),
        g.rowptr,
        [leaf(w) for w in p.weights],
        [leaf(b) for b in p.biases],
        p.fourier,
        p.fourier_inv,
        [leaf(t) for t in p.act_bias],
        [leaf(f) for f in p.bn_factor],
        [leaf(s) for s in p.bn_shift],
        leaf(p.final_weight),
        leaf(p.final_bias),
        leaf(p.coef),
        p.norm,
        p.ndim,
        p.structure,
        None,
    ]


def _leaves(args):
    flat = []
    for t in args:
        flat.extend(t if isinstance(t, list) else [t])
    return [t for t in flat if torch.is_tensor(t) and t.requires_grad]


def _layer_step(conv, backend, pos, ei, x, a):
    conv.backend = backend
    conv.zero_grad()
    xg, pg = x.clone().requires_grad_(), pos.clone().requires_grad_()
    ag = None if a is None else a.clone().requires_grad_()
    out = conv(xg, ei, edge_attr=ag, pos=pg)
    (out * torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape)).sum().backward()
    res = [out.detach(), xg.grad, pg.grad] + ([] if a is None else [ag.grad])
    return res + [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in conv.parameters()]


# ----------------------------------------------------------------------------------------------------------------
# the build and the loader
# ----------------------------------------------------------------------------------------------------------------
@needs_native
def test_extension_loads_with_openmp_and_the_current_sources():
    assert WHY is None, f"the native extension did not load: {WHY}"
    assert "native" in ik_fast.available_backends("cpu")
    mod = _native.module()
    assert mod.openmp(), "compiled without OpenMP: at::parallel_for would run on one thread"
    assert mod.num_threads() == torch.get_num_threads()
    root = _build.source_root()
    assert root is not None and mod.source_hash() == _build.source_hash(root)
    if _build.cpu_isa_flags():
        assert mod.cpu_capability() in ("avx2", "avx512") or "-march" in " ".join(_build.cpu_isa_flags())
    if not torch.version.cuda:
        assert not mod.cuda_built()
        assert "without its CUDA part" in ops.status("native", "cuda")


def test_built_hash_is_read_without_importing(tmp_path):
    """The loader reads the source hash from a built module's bytes (a stale module must not be imported: that would
    register its kernels); a truncated copy of the literal's prefix, as the linker may leave, is skipped."""
    f = tmp_path / "m.so"
    f.write_bytes(b"\0ik_fast-source-hash:habc: other string\0junk\0ik_fast-source-hash:h0123abcd;\0")
    assert _native._built_hash(str(f)) == "0123abcd"
    f.write_bytes(b"nothing here")
    assert _native._built_hash(str(f)) is None


def test_build_flags_are_shared_and_overridable(monkeypatch):
    """setup.py and the JIT build take their flags from ik_fast/_build.py; IK_FAST_CPU_FLAGS replaces the ISA flags
    and IK_FAST_BUILD_CUDA forces the CUDA part on or off."""
    monkeypatch.setenv("IK_FAST_CPU_FLAGS", "-march=native -DX=1")
    assert _build.cpu_isa_flags() == ["-march=native", "-DX=1"]
    flags = _build.cxx_flags(False)
    assert "-fopenmp" in flags and "-march=native" in flags and "-DIK_FAST_WITH_CUDA" not in flags
    monkeypatch.setenv("IK_FAST_CPU_FLAGS", "")
    assert _build.cpu_isa_flags() == []
    monkeypatch.setenv("IK_FAST_BUILD_CUDA", "0")
    assert not _build.want_cuda()
    monkeypatch.setenv("IK_FAST_BUILD_CUDA", "1")
    monkeypatch.setattr(_build, "_cuda_blocker", lambda: (None, "a toolkit that links"))
    assert _build.want_cuda()
    monkeypatch.setenv("IK_FAST_BUILD_CUDA", "maybe")
    with pytest.raises(ValueError, match="IK_FAST_BUILD_CUDA"):
        _build.want_cuda()
    assert "-DIK_FAST_WITH_CUDA" in _build.cxx_flags(True)
    nv = _build.nvcc_flags()
    assert {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"} <= set(nv)
    assert "--use_fast_math" not in nv
    root = _build.source_root()
    assert root is not None and os.path.basename(_build.sources(root, False)[0]) == "module.cpp"
    assert all(s.endswith(".cpp") for s in _build.sources(root, False))


def _fake_toolkit(tmp_path, release="13.0", libs=()):
    """A CUDA_HOME with a bin/nvcc that reports ``release`` and, in lib64, an empty shared library per name in
    ``libs`` (linked for real by the decision's test link)."""
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "lib64").mkdir()
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(
        f"#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\necho 'Cuda compilation tools, "
        f"release {release}, V{release}.0'\n"
    )
    nvcc.chmod(0o755)
    for name in libs:
        src = tmp_path / f"{name}.cpp"
        src.write_text(f"int {name}_stub() {{ return 0; }}\n")
        subprocess.run(["c++", "-shared", "-fPIC", str(src), "-o", str(home / "lib64" / f"lib{name}.so")], check=True)
    return home


def _as_cuda_torch(
    monkeypatch, home, how="torch's guess from the nvcc on the PATH, /somewhere/bin/nvcc", lib="ik_fast_test_cudart"
):
    """Make _build see a CUDA 13.0 build of torch whose CUDA_HOME is ``home`` and whose CUDA link needs
    ``-l<lib>`` from ``home``/lib64 (the real torch here is a CPU build, without libc10_cuda to link)."""
    monkeypatch.delenv("IK_FAST_BUILD_CUDA", raising=False)
    monkeypatch.delenv("PYTORCH_NVCC", raising=False)
    monkeypatch.setattr(_build, "_torch_cuda", lambda: "13.0")
    monkeypatch.setattr(_build, "_cuda_home", lambda: (None if home is None else str(home), how))
    monkeypatch.setattr(_build, "_cuda_link_flags", lambda: [f"-L{home}/lib64", f"-l{lib}"])


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to link with")
def test_cuda_torch_that_cannot_link_cuda_builds_the_cpu_part_and_says_why(monkeypatch, tmp_path):
    """A CUDA build of torch with nvcc but no runtime library to link: the CPU part alone, the reason carrying the
    linker's own line (a real link, of an empty object, against the missing library); IK_FAST_BUILD_CUDA=1 raises
    with it instead of compiling."""
    home = _fake_toolkit(tmp_path)
    _as_cuda_torch(monkeypatch, home)
    d = _build.cuda_decision(_build.source_root())
    assert not d.build
    assert "linking against CUDA fails" in d.reason and f"CUDA_HOME={home}" in d.reason
    assert "cannot find -lik_fast_test_cudart" in d.reason, d.reason
    assert "torch's guess from the nvcc on the PATH" in d.reason
    monkeypatch.setenv("IK_FAST_BUILD_CUDA", "1")
    with pytest.raises(_build.CudaBuildError, match="(?s)IK_FAST_BUILD_CUDA=1.*cannot find -lik_fast_test_cudart"):
        _build.cuda_decision(_build.source_root())
    monkeypatch.setenv("IK_FAST_BUILD_CUDA", "0")  # decided without nvcc or a test link
    monkeypatch.setattr(_build, "_link_probe", lambda flags: pytest.fail("IK_FAST_BUILD_CUDA=0 must not probe"))
    assert _build.cuda_decision(_build.source_root()) == (False, "IK_FAST_BUILD_CUDA=0")


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to link with")
def test_cuda_torch_with_a_toolkit_that_links_builds_the_cuda_part(monkeypatch, tmp_path):
    """The same CUDA_HOME once the library is there: the CUDA part is built (no GPU needed), forced or not."""
    home = _fake_toolkit(tmp_path, libs=["ik_fast_test_cudart"])
    _as_cuda_torch(monkeypatch, home, how="$CUDA_HOME")
    d = _build.cuda_decision(_build.source_root())
    assert d.build and "CUDA 13.0 build" in d.reason and "nvcc 13.0" in d.reason and "links" in d.reason, d
    monkeypatch.setenv("IK_FAST_BUILD_CUDA", "1")
    assert _build.cuda_decision(_build.source_root()).build


def test_cuda_decision_reasons_without_a_test_link(monkeypatch, tmp_path):
    """No toolkit, no nvcc in CUDA_HOME, nvcc of another CUDA major version, a CPU build of torch, no .cu sources:
    the CPU part, each with its reason, decided before any test link."""
    monkeypatch.setattr(_build, "_link_probe", lambda flags: pytest.fail("decided before the test link"))
    _as_cuda_torch(monkeypatch, None)
    d = _build.cuda_decision(_build.source_root())
    assert not d.build and "no CUDA toolkit was found" in d.reason
    empty = tmp_path / "empty-cuda"
    empty.mkdir()
    _as_cuda_torch(monkeypatch, empty)
    d = _build.cuda_decision(_build.source_root())
    assert not d.build and "has no nvcc" in d.reason and str(empty) in d.reason
    _as_cuda_torch(monkeypatch, _fake_toolkit(tmp_path, release="12.8"))
    d = _build.cuda_decision(_build.source_root())
    assert not d.build and "nvcc is CUDA 12.8, torch was built with CUDA 13.0" in d.reason
    monkeypatch.setenv("IK_FAST_BUILD_CUDA", "1")
    with pytest.raises(_build.CudaBuildError, match="12.8"):
        _build.cuda_decision(_build.source_root())
    monkeypatch.delenv("IK_FAST_BUILD_CUDA")
    monkeypatch.setattr(_build, "_torch_cuda", lambda: None)
    d = _build.cuda_decision(_build.source_root())
    assert not d.build and d.reason == f"torch {torch.__version__} is a CPU build"
    no_cu = tmp_path / "csrc"
    no_cu.mkdir()
    assert _build.cuda_decision(str(no_cu)) == (False, f"{no_cu} has no cuda/*.cu sources")


def test_cuda_fingerprint_follows_what_the_decision_reads(monkeypatch, tmp_path):
    """The first-use cache key holds the decision's inputs: a library added to CUDA_HOME, CUDA_HOME itself or
    IK_FAST_BUILD_CUDA change it (a rebuild that decides again); nothing changes it between two processes."""
    from torch.utils import cpp_extension

    home = _fake_toolkit(tmp_path)
    monkeypatch.delenv("IK_FAST_BUILD_CUDA", raising=False)
    monkeypatch.setattr(_build, "_torch_cuda", lambda: "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
    monkeypatch.setattr(cpp_extension, "library_paths", lambda device_type="cpu": ["/torch/lib", str(home / "lib64")])
    a = _build.cuda_fingerprint()
    assert a == _build.cuda_fingerprint()
    os.utime(home / "lib64", ns=(0, 0))
    b = _build.cuda_fingerprint()
    (home / "lib64" / "libcudart.so").write_text("")
    assert _build.cuda_fingerprint() != b
    monkeypatch.setenv("IK_FAST_BUILD_CUDA", "1")
    assert _build.cuda_fingerprint() != a
    monkeypatch.setenv("IK_FAST_BUILD_CUDA", "0")
    assert _build.cuda_fingerprint() == ["0", "13.0"]
    monkeypatch.setattr(_build, "_torch_cuda", lambda: None)
    monkeypatch.delenv("IK_FAST_BUILD_CUDA")
    assert _build.cuda_fingerprint() == ["", None]


_NINJA_LOG = """Error building extension 'ik_fast_native': [1/4] c++ -MMD -MF module.o.d \
-DTORCH_EXTENSION_NAME=ik_fast_native -I/x/csrc -isystem /venv/torch/include -fPIC -std=c++20 -O3 -fopenmp \
-c /x/csrc/module.cpp -o module.o
[2/4] c++ -MMD -MF conv_cpu.o.d -c /x/csrc/cpu/conv_cpu.cpp -o conv_cpu.o -Wno-error=unused
[3/4] c++ -MMD -MF errors.o.d -c /x/csrc/cpu/errors.cpp -o errors.o
[4/4] c++ module.o conv_cpu.o errors.o -shared -fopenmp -L/venv/torch/lib -lc10 -lc10_cuda -ltorch_cuda \
-L/usr/local/lib -lcudart -o ik_fast_native.so
FAILED: ik_fast_native.so
c++ module.o conv_cpu.o errors.o -shared -fopenmp -L/venv/torch/lib -lc10 -lc10_cuda -ltorch_cuda \
-L/usr/local/lib -lcudart -o ik_fast_native.so
/usr/bin/ld: cannot find -lcudart: No such file or directory
collect2: error: ld returned 1 exit status
ninja: build stopped: subcommand failed.
"""


def test_error_lines_are_the_compilers_and_linkers_own():
    """A failed build's message keeps the linker's cause (not only collect2's summary) and ninja's failed target,
    not the command lines (which name files and flags such as errors.cpp and -Wno-error)."""
    out = _build.error_lines(_NINJA_LOG)
    assert out.splitlines() == [
        "FAILED: ik_fast_native.so",
        "/usr/bin/ld: cannot find -lcudart: No such file or directory",
        "collect2: error: ld returned 1 exit status",
    ], out
    compile_log = (
        "[1/2] c++ -c /x/csrc/cpu/zz.cpp -o zz.o\nFAILED: zz.o\nc++ -c /x/csrc/cpu/zz.cpp -o zz.o\n"
        "/x/csrc/cpu/zz.cpp:1:12: error: expected ')' before '{' token\n    1 | int broken( {\n"
        "ninja: build stopped: subcommand failed.\n"
    )
    assert _build.error_lines(compile_log).splitlines() == [
        "FAILED: zz.o",
        "/x/csrc/cpu/zz.cpp:1:12: error: expected ')' before '{' token",
    ]
    assert _build.error_lines("something\nwent wrong\n", n=1) == "went wrong"  # unrecognised: the last lines


# A source tree standing in for csrc/ in the first-use build tests: a plain CPython module (compiles in about a second,
# unlike the real sources), whose cuda_built() says whether -DIK_FAST_WITH_CUDA was given. Each test names it anew:
# torch's JIT loader renames a module loaded twice under one name in a process.
_TINY_MODULE = r"""
#include <Python.h>
static PyObject* cuda_built(PyObject*, PyObject*) {
#ifdef IK_FAST_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}
static PyMethodDef methods[] = {{"cuda_built", cuda_built, METH_NOARGS, ""}, {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "NAME", nullptr, -1, methods};
PyMODINIT_FUNC PyInit_NAME(void) { return PyModule_Create(&def); }
"""
needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None or not _cpp_ext.is_ninja_available(), reason="no C++ compiler or no ninja"
)


def _tiny_first_use(monkeypatch, tmp_path, name):
    """_native._jit set up on a tiny source tree (with a cuda/*.cu file), a CUDA torch as _build sees it, whose
    CUDA_HOME has nvcc but not the library the CUDA link needs, and an empty cache. Returns the source root."""
    root = tmp_path / "csrc"
    (root / "cpu").mkdir(parents=True)
    (root / "cuda").mkdir()
    (root / "module.cpp").write_text(_TINY_MODULE.replace("NAME", name))
    (root / "cuda" / "k.cu").write_text("__global__ void k() {}\n")
    _as_cuda_torch(monkeypatch, _fake_toolkit(tmp_path))
    monkeypatch.setenv("IK_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_native, "_JIT_NAME", name)
    monkeypatch.setattr(_native, "_INFO", {})
    return str(root)


@needs_compiler
def test_first_use_build_on_a_cuda_torch_that_cannot_link_cuda(monkeypatch, tmp_path, capfd):
    """The first-use build itself (torch.utils.cpp_extension.load, ninja, the real compiler and linker) on a CUDA
    torch whose CUDA_HOME has nvcc but no runtime library: the CPU part is built and loads, the message says why the
    CUDA part was skipped with the linker's line, the build has no CUDA compile or link, and the next load finds it in
    the cache without deciding again."""
    root = _tiny_first_use(monkeypatch, tmp_path, "ik_fast_tiny_cpu_part")
    mod = _native._jit(root)
    built = _native.info()
    assert built["how"] == "compiled" and built["with_cuda"] is False and mod.cuda_built() is False
    assert "cannot find -lik_fast_test_cudart" in built["cuda_reason"]
    err = capfd.readouterr().err
    assert "compiling the native extension's CPU part" in err and "CUDA part skipped: linking against CUDA fails" in err
    assert "cannot find -lik_fast_test_cudart" in err and "minutes on 2 cores" in err
    ninja = next((tmp_path / "cache").glob("*/build.ninja")).read_text()
    assert "nvcc" not in ninja and "k.cu" not in ninja and "cudart" not in ninja and "IK_FAST_WITH_CUDA" not in ninja
    monkeypatch.setattr(_build, "cuda_decision", lambda root: pytest.fail("a cached build must not decide again"))
    monkeypatch.setattr(_native, "_INFO", {})
    assert _native._jit(root).cuda_built() is False
    cached = _native.info()
    assert cached["how"] == "cached" and cached["path"] == built["path"]
    assert cached["cuda_reason"] == built["cuda_reason"]
    assert "compiling" not in capfd.readouterr().err


@needs_compiler
def test_forced_cuda_build_that_cannot_link_fails_at_once_with_the_linkers_message(monkeypatch, tmp_path):
    """IK_FAST_BUILD_CUDA=1 where CUDA cannot be linked: an error naming the cause in the linker's words, before
    anything is compiled (the real build would spend minutes in nvcc first)."""
    root = _tiny_first_use(monkeypatch, tmp_path, "ik_fast_tiny_forced")
    monkeypatch.setenv("IK_FAST_BUILD_CUDA", "1")
    with pytest.raises(_build.CudaBuildError) as e:
        _native._jit(root)
    msg = str(e.value)
    assert "IK_FAST_BUILD_CUDA=1, but the CUDA part cannot be built here" in msg
    assert "cannot find -lik_fast_test_cudart" in msg, msg
    assert not list((tmp_path / "cache").glob("*/*.o")) and not list((tmp_path / "cache").glob("*/build.ninja"))


@needs_compiler
def test_failed_link_reports_the_linkers_own_lines(monkeypatch, tmp_path):
    """A build whose link fails (a library that does not exist) raises with the linker's cause and ninja's failed
    target, not only collect2's summary."""
    root = _tiny_first_use(monkeypatch, tmp_path, "ik_fast_tiny_link_error")
    monkeypatch.setattr(_build, "ld_flags", lambda: ["-fopenmp", "-lik_fast_no_such_library"])
    with pytest.raises(RuntimeError) as e:
        _native._jit(root)
    msg = str(e.value)
    assert "compiling the native extension's CPU part" in msg and "failed" in msg
    assert "cannot find -lik_fast_no_such_library" in msg, msg
    assert "FAILED: ik_fast_tiny_link_error.so" in msg and "collect2: error: ld returned 1 exit status" in msg


@needs_native
def test_build_command_reports_what_it_built(monkeypatch, capsys):
    """python -m ik_fast.build: what was built, where, and why the CUDA part is in or out; exit status 1 with the
    build's own lines when it fails."""
    from ik_fast import build

    assert build.main([]) == 0
    out = capsys.readouterr().out
    info = _native.info()
    assert "ik_fast.build: native extension, CPU" in out and info["path"] in out
    assert info["how"] in ("prebuilt", "cached", "compiled") and "OpenMP on" in out
    if info["cuda_reason"]:
        assert f"CUDA part skipped: {info['cuda_reason']}" in out or f"CUDA part built: {info['cuda_reason']}" in out

    def failing(rebuild=False):
        raise RuntimeError("compiling ... failed:\n/usr/bin/ld: cannot find -lcudart: No such file or directory")

    monkeypatch.setattr(_native, "load", failing)
    assert build.main([]) == 1
    err = capsys.readouterr().err
    assert "not available" in err and "cannot find -lcudart" in err

    class CpuOnly:  # a prebuilt module without the CUDA part, where IK_FAST_BUILD_CUDA=1 asks for it
        cuda_built = staticmethod(lambda: False)

    monkeypatch.setattr(_native, "load", lambda rebuild=False: CpuOnly)
    monkeypatch.setattr(_native, "info", lambda: {"how": "prebuilt", "path": "/x/_C.so"})
    monkeypatch.setattr(_build, "_cuda_blocker", lambda: ("torch 9.9 is a CPU build", ""))
    monkeypatch.setenv("IK_FAST_BUILD_CUDA", "1")
    assert build.main([]) == 1
    err = capsys.readouterr().err
    assert "IK_FAST_BUILD_CUDA=1, but the extension in use (prebuilt, /x/_C.so) has no CUDA part" in err
    assert "torch 9.9 is a CPU build" in err


_NO_COMPILER = r"""
import warnings
import ik_fast._native as N
N._prebuilt = lambda root: (None, "no prebuilt ik_fast._C (hidden by the test)")
import ik_fast
from ik_fast import ops
import ik_fast.backends as B
why = ops.status("native", "cpu")
print("WHY:", why)
print("AVAILABLE:", ik_fast.available_backends("cpu"))
B._MEASURED_FASTER["cpu"] = ("native",)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    print("AUTO:", B.resolve_backend("auto", "cpu", 10**6), B.resolve_backend("auto", "cpu", 100))
print("WARN:", " | ".join(str(m.message) for m in w))
"""


def test_missing_compiler_is_a_clear_reason(tmp_path):
    """Without a prebuilt module and without a compiler, "native" is unavailable with the reason stated (in
    ops.status, and in "auto"'s warning), and "auto" falls back by size. A fresh process with an empty cache."""
    env = dict(
        os.environ,
        CXX=str(tmp_path / "no-such-c++"),
        IK_FAST_CACHE=str(tmp_path / "cache"),
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        PYTHONWARNINGS="ignore",
    )
    res = subprocess.run([sys.executable, "-c", _NO_COMPILER], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = dict(line.split(": ", 1) for line in res.stdout.splitlines() if re.match(r"^[A-Z]+: ", line))
    assert "no C++ compiler" in out["WHY"] and "no-such-c++" in out["WHY"], out["WHY"]
    assert "hidden by the test" in out["WHY"]
    assert "'native'" not in out["AVAILABLE"] and "'torch'" in out["AVAILABLE"]
    assert out["AUTO"] == "torch reference"
    assert "native: its kernels failed to load" in out["WARN"] and "no C++ compiler" in out["WARN"]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.so"))


@pytest.mark.slow
def test_compile_error_is_a_clear_reason(tmp_path):
    """A source that does not compile: the reason names the compiler's error line. (Compiles module.cpp: minutes.)"""

    src = tmp_path / "csrc"
    shutil.copytree(_build.source_root(), src)
    (src / "cpu" / "zz_broken.cpp").write_text("int broken( { return 0; }\n")
    code = (
        "import ik_fast._native as N, ik_fast._build as Bd\n"
        f"Bd.source_root = lambda: {str(src)!r}\n"
        "N._prebuilt = lambda root: (None, 'hidden')\n"
        "import ik_fast.backends\nfrom ik_fast import ops\nprint('WHY:', ops.status('native', 'cpu'))\n"
    )
    env = dict(
        os.environ,
        IK_FAST_CACHE=str(tmp_path / "cache"),
        PYTHONWARNINGS="ignore",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    why = res.stdout.split("WHY: ", 1)[1]
    assert "compiling" in why and "failed" in why and "zz_broken.cpp" in why, why


@needs_native
@pytest.mark.parametrize(
    "name,nonlinearity",
    # Fourier ELUs; pointwise ELUs (Oh's hidden field); the gated and norm layers (no grids: their Linears' outputs
    # evaluated again from the tape's activations)
    [("O3", "fourier_elu"), ("Oh", "fourier_elu"), ("O3", "gated"), ("O3", "norm")],
)
def test_tape_matches_recomputation_and_reference(monkeypatch, name, nonlinearity):
    """Training with a tape of activations and grids, of activations only (grids re-evaluated), and without one
    (the trunk re-evaluated): the same numbers, and those of the reference, forward and every gradient; the host
    passes a tape of the expected form."""
    from ik_fast.backends import fused

    conv, gs, attr_t = _conv(name, "mixed_attr", n_channels=3, nonlinearity=nonlinearity)
    conv.train()
    pos, ei, x, a = _inputs(conv, gs, attr_t, n=20, e=150)
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    ref = _layer_step(conv, "reference", pos, ei, x, a)
    seen = []
    real_conv = ops.conv

    def spy(impl, x, inp, src, rowptr, program, hidden=None, tape=None):
        seen.append(None if tape is None else [t.numel() > 0 for t in tape])
        return real_conv(impl, x, inp, src, rowptr, program, hidden, tape)

    monkeypatch.setattr(ops, "conv", spy)
    res = {}
    for case, (acts, grids) in {"grids": (1 << 40, 1 << 40), "acts": (1 << 40, -1), "none": (-1, -1)}.items():
        monkeypatch.setattr(fused, "TAPE_LIMIT_BYTES", acts)
        monkeypatch.setattr(fused, "TAPE_GRID_LIMIT_BYTES", grids)
        conv.load_state_dict(state)
        res[case] = _layer_step(conv, "native", pos, ei, x, a)
    L = len(conv.kernel.program().hidden)
    pointwise = name == "Oh" or nonlinearity != "fourier_elu"
    assert seen == [[True, not pointwise] * L, [True, False] * L, None]
    for case, got in res.items():
        for i, (g, r) in enumerate(zip(got, ref)):
            assert rel(g, r) <= tolerance("backward", F64) or r.norm() == g.norm() == 0, (case, i)
        for i, (g, r) in enumerate(zip(got, res["none"])):
            assert rel(g, r) <= tolerance("reorder", F64) or r.norm() == g.norm() == 0, (case, i)


@needs_native
@pytest.mark.parametrize("kind", ["gated", "norm"])
def test_gated_and_norm_componentwise_layers_and_chained_statistics(kind):
    """Many channels make the hidden Linears componentwise (a gated one's gate rows read the previous field's trivial
    component): conv, every gradient and the statistics passes, chained from any layer, against their statements;
    the passes' grids are empty for these layers."""
    conv, gs, attr_t = _conv("SO3", "mixed", n_channels=8, nonlinearity=kind)
    ik_fast.testing.randomize_(conv)
    conv.eval()
    prog = conv.kernel.program()
    assert prog.componentwise(1)
    pos, ei, x, a = _inputs(conv, gs, attr_t, n=12, e=60)
    args = _op_args(conv, pos, ei, x, a)
    out = ops._op("native", "conv")(*args)
    ref = ops.conv_reference_form(*args[:-1])
    assert rel(out, ref) <= tolerance("forward", F64)
    w = torch.randn_like(out)
    leaves = _leaves(args)
    g1 = torch.autograd.grad((out * w).sum(), leaves, allow_unused=True)
    g2 = torch.autograd.grad((ref * w).sum(), leaves, allow_unused=True)
    for i, (u, v) in enumerate(zip(g1, g2)):
        if v is None:  # (an empty act_bias, unused by the statement)
            assert u is None or u.numel() == 0, i
            continue
        assert rel(u, v) <= tolerance("backward", F64) or u.norm() == v.norm() == 0, i
    p = prog.op_program([], F64)
    inp = args[1].detach()
    L = len(p.weights)
    # (leaves: x, inp, weights, biases, act_bias, ...): a norm layer's biases get their gradient
    assert all((g.numel() > 0) == (kind == "norm") for g in g1[2 + 2 * L : 2 + 3 * L])

    def given(start, upto):
        empty = inp.new_empty(0)
        f = [p.bn_factor[start - 1] if start else empty, *p.bn_factor[start : upto - 1]]
        s = [p.bn_shift[start - 1] if start else empty, *p.bn_shift[start : upto - 1]]
        lists = (p.weights, p.biases, p.fourier, p.fourier_inv, p.act_bias)
        return [t[start:upto] for t in lists] + [f, s, p.structure, start]

    acts = [inp] + [ops.trunk_moments_reference_form(inp, *given(0, k))[1] for k in range(1, L + 1)]
    for upto in range(1, L + 1):
        for start in range(upto):
            mom, act = ops.trunk_moments_reference_form(acts[start], *given(start, upto))
            got = ops.trunk_moments("native", acts[start], p, upto, with_activation=True, start=start, with_grid=True)
            assert rel(got.moments, mom) <= tolerance("forward", F64), (start, upto)
            assert rel(got.activation, act) <= tolerance("forward", F64), (start, upto)
            assert got.grid.numel() == 0


@needs_native
def test_one_thread_and_two_agree_and_runs_are_deterministic():
    conv, gs, attr_t = _conv("O3", "mixed_attr", n_channels=3)
    conv.train()
    pos, ei, x, a = _inputs(conv, gs, attr_t, n=40, e=600)
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    old = torch.get_num_threads()
    runs = {}
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            conv.load_state_dict(state)
            runs.setdefault(threads, []).append(_layer_step(conv, "native", pos, ei, x, a))
    finally:
        torch.set_num_threads(old)
    for u, v in zip(runs[2][0], runs[2][1]):
        assert torch.equal(u, v)  # same thread count: the same bits
    for u, v in zip(runs[1][0], runs[2][0]):
        assert rel(u, v) <= tolerance("reorder", F64) or u.norm() == v.norm() == 0


# ----------------------------------------------------------------------------------------------------------------
# "auto" on CPU
# ----------------------------------------------------------------------------------------------------------------
def test_auto_picks_native_on_cpu_when_it_loads_never_on_cuda(monkeypatch):
    import ik_fast.backends as B

    expected = "native" if WHY is None else "torch"
    assert B.resolve_backend("auto", "cpu", 10**6) == expected
    assert B.resolve_backend("auto", "cpu") == expected
    monkeypatch.setattr(B, "unavailable_reason", lambda name, device: "")  # as if everything ran everywhere
    B._warned.clear()
    with pytest.warns(RuntimeWarning, match="'auto' uses 'torch' on cuda"):
        assert B.resolve_backend("auto", "cuda", 10**6) == "torch"  # no GPU has run a fused kernel


def test_auto_without_native_picks_reference_on_small_graphs(monkeypatch):
    """Without a fused backend measured faster, "auto" on CPU never picks "torch" where it is slower than
    "reference": graphs below CPU_SMALL_GRAPH_EDGES edges (a QM9 molecule: 400) go to "reference"."""
    import ik_fast.backends as B

    monkeypatch.setitem(B._MEASURED_FASTER, "cpu", ())
    small = B.CPU_SMALL_GRAPH_EDGES
    B._warned.clear()
    with pytest.warns(RuntimeWarning, match=rf"uses 'torch' on cpu \('reference' below {small} edges\)"):
        assert B.resolve_backend("auto", "cpu", 400) == "reference"
    assert B.resolve_backend("auto", "cpu", small - 1) == "reference"
    assert B.resolve_backend("auto", "cpu", small) == "torch"
    assert B.resolve_backend("auto", "cpu") == "torch"  # size unknown (inside torch.compile)
    assert B.resolve_backend("auto", "cuda", 400) == "torch"
    # through the layer: the edge count of the call decides
    conv, gs, attr_t = _conv("C8", "mixed_attr", dtype=torch.float32)
    conv.eval()
    pos, ei, x, a = _inputs(conv, gs, attr_t, dtype=torch.float32)
    seen = []
    for name in ("reference", "torch"):
        monkeypatch.setitem(
            B.BACKENDS, name, (lambda f, n: lambda *args: seen.append(n) or f(*args))(B.BACKENDS[name], name)
        )
    conv.backend = "auto"
    conv(x, ei, edge_attr=a, pos=pos)
    assert seen == ["reference"]
