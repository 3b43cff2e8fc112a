"""Compile every Triton kernel the package launches, ahead of time for a GPU architecture, on a machine without a GPU.

    python benchmarks/compile_check.py --problems M,H --precision ieee,tf32,bf16 --json OUT.json [--max-stack 512]

Kernels are discovered, not listed: for each problem and precision, one training step (forward + backward, training
mode) runs in Triton's interpreter (a child process with ``TRITON_INTERPRET=1``) on a small graph of the problem's
full degree, and every launch of a ``@triton.jit`` kernel is captured with its argument types and constexpr values
(``ik_fast.tools.workcount.DotCounter(keep_args=True)``). The launches are recorded, not run (``--execute`` runs them),
since the host derives launch parameters from the graph and the program, not from kernel results. Each distinct
(kernel, signature, constexprs) is then compiled by Triton's own pipeline down to a cubin (Triton ships ptxas) for
``sm_<arch>``, and its registers, stack (local memory per thread: spills) and shared memory are read from the cubin,
with the compile time, its spills from ptxas's own report, and its tensor-core instructions from its SASS.

``--max-stack N`` makes the exit status non-zero when a kernel's stack exceeds N bytes per thread, its shared memory
exceeds the H100/H200 limit (227 KB = 232448 B), or a compile fails.

Precisions are set as a user would: ``ieee`` float32 under ``torch.set_float32_matmul_precision("highest")`` with
``IK_FAST_HIGHEST=ieee``, ``tf32x3`` under ``"highest"`` (3xTF32, what "highest" runs as on CUDA), ``tf32``
under ``"high"``, ``bf16`` under ``torch.autocast(dtype=torch.bfloat16)``. The capture runs on CPU tensors, so the
launch parameters are those the host picks for the interpreter; the child sets ``IK_FAST_TARGET_DEVICE=cuda`` for a
backend that can pick its GPU choices while interpreting, and ``--set NAME=V1,V2`` replaces (and multiplies) captured
constexpr values where a kernel has that constexpr (e.g. ``--set BE=16,32`` for every tile size a GPU host may choose;
``--set bf16:PREC=bf16`` for one precision only).
``--graphs`` adds graphs (e.g. ``skew@64``) whose launches are captured too.
This catches what the interpreter cannot (code the compiler rejects, shared memory, spills) before any GPU time is
spent. It measures nothing about speed.

**The native CUDA kernels** (``csrc/cuda/*.cu``)::

    python benchmarks/compile_check.py --cuda [--arch 90,80] [--json OUT.json] [--sources a.cu,b.cu]

compiles every ``.cu`` file with nvcc, compile only (``-c``), for each architecture (default: the extension's,
``ik_fast._build.CUDA_ARCHS``: sm_80 and sm_90) in one host pass, with the flags of the extension's build
(``ik_fast/_build.py``), the defines torch's ``CUDAExtension`` adds and torch's include paths (the CPU wheel ships the
ATen/c10 CUDA headers; ``-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE`` stands in for the one generated header it lacks), reads
``-Xptxas -v`` per function (kernel, or device function that was not inlined) and architecture, and counts the
tensor-core instructions in each kernel's SASS (``cuobjdump -sass``). Exit status 1 on any spill (in a kernel or a
device function it calls that was not inlined), any compile error, or shared memory over the sm_90 limit. nvcc:
``$CUDA_HOME/bin/nvcc``, else the PATH's, else ``/usr/local/cuda/bin/nvcc``.
Headers that need the CUDA math libraries' own headers (``ATen/cuda/CUDAContext.h`` includes cublas_v2.h and
cusparse.h) compile only where those are installed; ``c10/cuda/CUDAStream.h``, ``CUDAGuard.h``, ``CUDAException.h``,
``ATen/ATen.h``, ``torch/library.h``, ``mma.h``, ``cuda_bf16.h`` and ``cub`` need only the toolkit.

**Records** (both modes): ``--json OUT.json`` writes the results file (``ik_fast/records.py``, kind ``compile``),
rewritten after every kernel (Triton) or source file (nvcc); ``--name NAME`` also writes
``benchmarks/results/compile/sm-<arch>/<date>-NAME.json``, one file per architecture. The device of a record is the
architecture compiled for (``sm_90 (compiled only, not run)``), the machine that compiled it is ``extra.host``; the
problem is the Triton kernel's problem, or the native kernel's name. Per kernel and architecture, the metrics
``registers`` (count), ``stack_bytes``, ``spill_stores``, ``spill_loads``, ``shared_bytes`` (B; per thread for the
first three) and ``mma_instructions`` (tensor-core instructions in the SASS, e.g. ``HMMA`` / ``HGMMA``: a static
count, ``extra.opcodes`` has them by opcode), with ``extra.entry`` naming the kernel across its records and the
registers record carrying the details (constexprs, signature, launch options, compile seconds). A kernel that does
not compile is one ``registers`` record without a value and with the ``error``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SHARED_LIMIT = 232448  # bytes of shared memory per block on sm_90 (227 KB)
PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")
_DTYPES = {
    "torch.float32": "fp32",
    "torch.float64": "fp64",
    "torch.float16": "fp16",
    "torch.bfloat16": "bf16",
    "torch.int64": "i64",
    "torch.int32": "i32",
    "torch.int16": "i16",
    "torch.int8": "i8",
    "torch.uint8": "u8",
    "torch.bool": "i1",
}


# ----------------------------------------------------------------------------------------------------------------
# capture (child process, in the interpreter)
# ----------------------------------------------------------------------------------------------------------------
def _arg_type(v):
    """Triton signature type of a runtime argument (None: not representable)."""
    import torch

    if isinstance(v, torch.Tensor):
        return "*" + _DTYPES[str(v.dtype)]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -(2**31) <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    return None


def _jsonable(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def capture(problem: str, precision: str, graphs, execute: bool = False) -> list:
    """Launch configurations of one training step and one eval-mode step per graph: [{kernel, module, qualname,
    signature, constexprs, launches}], deduplicated."""
    import contextlib
    import inspect

    import torch

    from ik_fast.tools import problems as _problems
    from ik_fast.tools import workcount
    from ik_fast.tools.bench import setup_case

    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    # "highest" is 3xTF32 on CUDA (IK_FAST_TARGET_DEVICE=cuda: the GPU's choices): ieee asks for IEEE explicitly
    os.environ["IK_FAST_HIGHEST"] = "tf32x3" if precision == "tf32x3" else "ieee"
    seen = {}
    records = []
    for name in graphs:
        p = workcount._problem(name)
        _problems.PROBLEMS.setdefault(p.name, p)
        # a training step (statistics, contraction, backward) and an eval-mode one (the forward trunk kernel)
        for mode in ("train", "eval"):
            step, _ = setup_case(p.name, "triton", mode, device="cpu", dtype="float32")
            amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
            with workcount.DotCounter(keep_args=True, profile_ranges=False, execute=execute) as dc, amp:
                step()
            records += [(name, rec) for rec in dc.records]
    for name, rec in records:
        fn = rec["fn"].fn
        ann = inspect.get_annotations(fn)
        sig, const = {}, {}
        for arg in rec["fn"].arg_names:
            v = rec["args"].get(arg, inspect.signature(fn).parameters[arg].default)
            is_const = "constexpr" in str(ann.get(arg, "")) or v is None
            if is_const:
                const[arg] = _jsonable(v)
            else:
                t = _arg_type(v)
                if t is None:
                    raise TypeError(
                        f"{rec['kernel']}: argument {arg} of type {type(v).__name__} has no signature type here"
                    )
                sig[arg] = t
        opts = {k: _jsonable(v) for k, v in rec.get("options", {}).items()}
        key = json.dumps([rec["kernel"], sig, const, opts], sort_keys=True)
        if key not in seen:
            seen[key] = {
                "kernel": fn.__name__,
                "module": fn.__module__,
                "qualname": fn.__qualname__,
                "signature": sig,
                "constexprs": const,
                "options": opts,
                "launches": 0,
                "graphs": [],
            }
        seen[key]["launches"] += 1
        if name not in seen[key]["graphs"]:
            seen[key]["graphs"].append(name)
    return list(seen.values())


def _capture_child(problem: str, precision: str, graphs, execute: bool = False) -> list:
    env = dict(os.environ, TRITON_INTERPRET="1", IK_FAST_TARGET_DEVICE="cuda")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONWARNINGS", "ignore::UserWarning:escnn.group.groups.so3group")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--capture-child",
            problem,
            "--precision",
            precision,
            "--graphs",
            ",".join(graphs),
            "--json",
            out,
        ] + (["--execute"] if execute else [])
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"capture of {problem} {precision} failed:\n{res.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


# ----------------------------------------------------------------------------------------------------------------
# ahead-of-time compilation (this process, no interpreter)
# ----------------------------------------------------------------------------------------------------------------
def _resources(kernel) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    except OSError:
        return {}
    finally:
        os.unlink(f.name)
    res = {}
    for line in out.splitlines():
        for key, field in (("REG", "registers"), ("STACK", "stack_bytes"), ("LOCAL", "local_bytes")):
            m = re.search(rf"\b{key}:(\d+)", line)
            if m and field not in res:
                res[field] = int(m.group(1))
    return res


def _cubin_mma(kernel) -> Counter:
    """The tensor-core instructions of a compiled Triton kernel's SASS, by opcode."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        funcs = sass_mma(f.name, tool)
    finally:
        os.unlink(f.name)
    return sum(funcs.values(), Counter())


def _ptxas_version(arch: int):
    """The version of the ptxas Triton compiles ``sm_<arch>`` with (``13.4, V13.4.59``; Triton ships one for sm_90 and
    newer, another for older), or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        try:
            text = get_ptxas_version(arch)
        except TypeError:  # a Triton whose ptxas is one for every architecture
            text = get_ptxas_version()
    except Exception:
        return None
    m = re.search(r"release (\S+ V\S+)", text)
    return m.group(1) if m else text.strip().splitlines()[-1]


def compile_one(cfg: dict, arch: int):
    """(the compiled kernel, ptxas's ``-v`` report: empty unless :func:`_ptxas_log_on` took effect)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(cfg["module"]), cfg["qualname"].split(".")[-1])
    sig = {name: ("constexpr" if name in cfg["constexprs"] else cfg["signature"][name]) for name in fn.arg_names}
    consts = {(fn.arg_names.index(k),): v for k, v in cfg["constexprs"].items()}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints ptxas's report with dump_ptxas_log
        # the launch's own options (num_warps, ...), as the host passes them on a GPU
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(cfg.get("options") or {}))
    return kernel, log.getvalue()


def _ptxas_log_on() -> bool:
    """Make Triton compile every kernel (no cache hit) and print ptxas's ``-v`` report, which has the spills; False
    where this Triton has no such switches."""
    import triton

    knobs = getattr(triton, "knobs", None)
    try:
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
    except AttributeError:
        return False
    return True


def _spills(log: str) -> dict:
    """spill_stores / spill_loads (B per thread) of a Triton kernel from ptxas's report: its entry function and any
    function it calls that was not inlined, summed; {} without a report."""
    funcs = parse_ptxas(log)
    if not funcs:
        return {}
    return {k: sum(f[k] for f in funcs) for k in ("spill_stores", "spill_loads")}


def _variants(cfgs: list, overrides: dict) -> list:
    """Each captured configuration with ``overrides`` applied (the cartesian product of the values given for the
    constexprs it has), deduplicated."""
    out, seen = [], set()
    for cfg in cfgs:
        names = [n for n in overrides if n in cfg["constexprs"]]
        for values in itertools.product(*(overrides[n] for n in names)):
            c = dict(cfg, constexprs={**cfg["constexprs"], **dict(zip(names, values))})
            key = json.dumps([c["module"], c["qualname"], c["signature"], c["constexprs"]], sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


def _parse_value(s: str):
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(s, s)


# ----------------------------------------------------------------------------------------------------------------
# tensor-core instructions (SASS) and the records
# ----------------------------------------------------------------------------------------------------------------
_SASS_OP = re.compile(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")


def parse_sass(text: str) -> dict:
    """``cuobjdump -sass`` output -> {(arch, mangled function): Counter of its tensor-core instructions by opcode
    (``HMMA.1684.F32.TF32``, ``HGMMA.64x64x8.F32.TF32``, ...: every opcode whose name ends in ``MMA``)}; every function
    of the dump is a key, with an empty Counter when it has none."""
    funcs, arch, cur = {}, None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = funcs.setdefault((arch, m.group(1)), Counter())
            continue
        m = _SASS_OP.search(line) if cur is not None else None
        if m and m.group(1).split(".")[0].endswith("MMA"):
            cur[m.group(1)] += 1
    return funcs


def _cuobjdump() -> str:
    """The toolkit's cuobjdump (next to nvcc, else on the PATH), else the one Triton ships."""
    import shutil

    cands = [shutil.which("cuobjdump") or ""]
    with contextlib.suppress(FileNotFoundError):
        cands.insert(0, os.path.join(os.path.dirname(os.path.realpath(_nvcc())), "cuobjdump"))
    for cand in cands:
        if cand and os.path.isfile(cand):
            return cand
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def sass_mma(path: str, tool: str = None) -> dict:
    """:func:`parse_sass` of a cubin or an object file."""
    res = subprocess.run([tool or _cuobjdump(), "-sass", path], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass failed: {(res.stderr or res.stdout).strip()[-500:]}")
    return parse_sass(res.stdout)


UNITS = {
    "registers": "count",
    "stack_bytes": "B",
    "spill_stores": "B",
    "spill_loads": "B",
    "shared_bytes": "B",
    "mma_instructions": "count",
}
MMA_WHAT = "tensor-core instructions in the kernel's SASS (static count: each HMMA / HGMMA / ... once)"


def _sm(arch) -> str:
    return arch if str(arch).startswith("sm_") else f"sm_{arch}"


def arch_provenance(prov: dict, arch, cuda=None) -> dict:
    """The provenance of a compile for ``arch``: the device is the architecture (nothing ran on one), the stack's
    ``cuda`` the toolkit that compiled."""
    return dict(
        prov,
        device={"type": "cuda", "name": f"{_sm(arch)} (compiled only, not run)"},
        stack=dict(prov["stack"], cuda=cuda),
    )


def kernel_records(
    prov: dict,
    problem: str,
    provider: str,
    values: dict,
    ident: dict,
    details: dict,
    precision: str = "",
    mma=None,
    error=None,
) -> list:
    """The records of one kernel compiled for one architecture: one per metric of ``values`` (see UNITS) and a
    ``mma_instructions`` one from ``mma`` (a Counter by opcode, or an error string); ``ident`` goes into every
    record's extra, ``details`` into the registers record's. A compile that failed (``error``): one registers record
    without a value."""
    from ik_fast import records

    def rec(metric, value, extra, err=None):
        return records.record(
            "compile",
            problem,
            provider,
            metric,
            value,
            UNITS[metric],
            precision=precision,
            extra=extra,
            error=err,
            prov=prov,
        )

    if error is not None:
        return [rec("registers", None, {**ident, **details}, error)]
    out = [rec(m, values[m], {**ident, **details} if m == "registers" else dict(ident)) for m in UNITS if m in values]
    if isinstance(mma, Counter):
        out.append(
            rec(
                "mma_instructions", sum(mma.values()), {**ident, "opcodes": dict(sorted(mma.items())), "what": MMA_WHAT}
            )
        )
    elif mma is not None:
        out.append(rec("mma_instructions", None, {**ident, "what": MMA_WHAT}, f"SASS not read: {mma}"))
    return out


def save_records(recs: list, json_out=None, name=None) -> list:
    """Write the records to ``json_out`` and, with ``name``, to ``benchmarks/results/compile/<arch>/<date>-NAME.json``
    (one file per architecture). Returns the paths written."""
    from ik_fast import records

    paths = []
    if json_out:
        paths.append(records.write(json_out, recs))
    if name:
        by_dev = {}
        for r in recs:
            by_dev.setdefault(records.device_slug(r), []).append(r)
        for slug, rs in by_dev.items():
            paths.append(records.write(os.path.join(RESULTS, "compile", slug, f"{rs[0]['date'][:10]}-{name}.json"), rs))
    return paths


# ----------------------------------------------------------------------------------------------------------------
# the native CUDA kernels: nvcc + ptxas -v
# ----------------------------------------------------------------------------------------------------------------
def _build_module():
    """ik_fast/_build.py by path (the extension's sources and flags; without importing the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_ik_fast_build", os.path.join(ROOT, "ik_fast", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _nvcc() -> str:
    import shutil

    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ([os.path.join(home, "bin", "nvcc")] if home else []) + [
        shutil.which("nvcc") or "",
        "/usr/local/cuda/bin/nvcc",
    ]:
        if cand and os.path.isfile(cand):
            return cand
    raise FileNotFoundError("nvcc not found (set CUDA_HOME, or put nvcc on the PATH)")


def nvcc_command(nvcc: str, src: str, obj: str, arches: list) -> list:
    """The compile-only nvcc command of one .cu file for the given architectures (one host compilation), as the
    extension's build compiles it (torch.utils.cpp_extension's CUDAExtension defines and includes,
    ik_fast/_build.py's flags)."""
    import sysconfig

    import torch
    from torch.utils import cpp_extension

    _build = _build_module()
    root = os.path.join(ROOT, "csrc")
    incs = cpp_extension.include_paths("cpu") + [sysconfig.get_path("include"), root]
    cuda_inc = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")
    if os.path.isdir(cuda_inc):
        incs.append(cuda_inc)
    defines = [
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *cpp_extension.COMMON_NVCC_FLAGS,
    ]
    torch_inc = cpp_extension.include_paths("cpu")[0]
    if not os.path.exists(os.path.join(torch_inc, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # a CPU wheel: torch's own switch for that header
    flags = [f for f in _build.nvcc_flags(root) if not f.startswith("-gencode")]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arches]
    return [
        nvcc,
        "-c",
        src,
        "-o",
        obj,
        "-std=c++20",
        *gencode,
        "-Xptxas",
        "-v",
        "--compiler-options",
        "-fPIC",
        *defines,
        *flags,
        *[f"-I{i}" for i in incs],
    ]


def _demangle(names: list) -> dict:
    import shutil

    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not names or tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_ptxas(text: str) -> list:
    """ptxas -v output -> one dict per function: {"mangled", "entry", "arch", "registers", "stack_bytes",
    "spill_stores", "spill_loads", "shared_bytes", "constant_bytes"}."""
    funcs, cur, arch = {}, None, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            arch = m.group(2)  # the architecture of the functions that follow
            funcs.setdefault((m.group(1), arch), {"mangled": m.group(1), "arch": arch})["entry"] = True
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            cur = funcs.setdefault((m.group(1), arch), {"mangled": m.group(1), "arch": arch, "entry": False})
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur is not None:
            cur.update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and cur is not None:
            cur["registers"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            cur["shared_bytes"] = int(sm.group(1)) if sm else 0
            cm = re.findall(r"(\d+) bytes cmem\[\d+\]", line)
            cur["constant_bytes"] = sum(int(c) for c in cm)
    for f in funcs.values():
        for k in ("registers", "stack_bytes", "spill_stores", "spill_loads", "shared_bytes"):
            f.setdefault(k, 0)
    return list(funcs.values())


def _short_name(demangled: str) -> str:
    """``void ik_fast_cuda::k<float, false>(float const*, ...)`` -> ``k<float, false>``."""
    name = demangled.split("(", 1)[0]
    name = name[5:] if name.startswith("void ") else name
    return name.replace("ik_fast_cuda::", "")


def cuda_check(sources: list, arches: list, json_out=None, name=None, command: str = "") -> int:
    """Compile each .cu for each architecture; print a table, write the records (after every file); 1 on a spill or
    a failure."""
    from ik_fast import records as _records

    nvcc = _nvcc()
    lines = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    version = lines[-1]
    release = next((ln.split("release", 1)[1].strip() for ln in lines if "release" in ln), version)
    print(f"{nvcc}: {version}", flush=True)
    if not sources:
        print("no .cu files to compile", flush=True)
    base = _records.provenance("cpu")
    provs = {_sm(a): arch_provenance(base, a, f"nvcc {release}") for a in arches}
    common = {
        "host": base["device"]["name"],
        "nvcc": f"{release} ({version})",
        "shared_limit": SHARED_LIMIT,
        "command": command,
    }
    tool = _cuobjdump()
    print(
        "| file | arch | kernel | registers | spill stores / loads (B) | stack (B) | shared (B) | tensor-core "
        "instructions |"
    )
    print("|---|---|---|---|---|---|---|---|", flush=True)
    recs, failures, n_kernels = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            obj = os.path.join(tmp, "k.o")
            cmd = nvcc_command(nvcc, src, obj, arches)
            t = time.time()
            res = subprocess.run(cmd, capture_output=True, text=True)
            rel = os.path.relpath(src, ROOT)
            if res.returncode != 0:
                err = "\n".join(ln for ln in (res.stderr + res.stdout).splitlines() if "error" in ln.lower())
                err = err or res.stderr[-3000:]
                failures.append(f"{rel}: compile failed\n{err}")
                for a in arches:
                    recs += kernel_records(
                        provs[_sm(a)],
                        rel,
                        "native",
                        {},
                        {"kernel": rel, "entry": len(recs), "file": rel, "arch": _sm(a)},
                        common,
                        error=f"compile failed: {err}",
                    )
                print(f"| {rel} | {','.join(_sm(a) for a in arches)} | compile failed | | | | | |", flush=True)
                save_records(recs, json_out, name)
                continue
            seconds = round(time.time() - t, 1)
            funcs = parse_ptxas(res.stderr + res.stdout)
            names = _demangle([f["mangled"] for f in funcs])
            try:
                sass = sass_mma(obj, tool)
            except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
                sass = f"{type(exc).__name__}: {exc}"
            for f in funcs:
                kernel = _short_name(names[f["mangled"]])
                ident = {
                    "kernel": kernel,
                    "entry": len(recs),
                    "file": rel,
                    "arch": f["arch"],
                    "entry_function": f["entry"],
                }
                details = {
                    "signature": names[f["mangled"]],
                    "mangled": f["mangled"],
                    "compile_s": seconds,
                    "constant_bytes": f.get("constant_bytes", 0),
                    **common,
                }
                mma = None
                if f["entry"]:  # a device function that was not inlined has no SASS section of its own
                    mma = sass if isinstance(sass, str) else sass.get((f["arch"], f["mangled"]), Counter())
                    n_kernels += 1
                values = {k: f[k] for k in ("registers", "stack_bytes", "spill_stores", "spill_loads", "shared_bytes")}
                recs += kernel_records(provs[f["arch"]], kernel, "native", values, ident, details, mma=mma)
                spill = f["spill_stores"] or f["spill_loads"]
                if spill:
                    failures.append(f"{rel} {f['arch']}: {kernel} spills {f['spill_stores']} B / {f['spill_loads']} B")
                if f["shared_bytes"] > SHARED_LIMIT:
                    failures.append(
                        f"{rel} {f['arch']}: {kernel} uses {f['shared_bytes']} B of shared "
                        f"memory (limit {SHARED_LIMIT})"
                    )
                kind = "" if f["entry"] else " (device function)"
                tc = "" if mma is None else (sum(mma.values()) if isinstance(mma, Counter) else "?")
                print(
                    f"| {rel} | {f['arch']} | `{names[f['mangled']][:90]}`{kind} | {f['registers']} | "
                    f"{f['spill_stores']} / {f['spill_loads']}{' **spills**' if spill else ''} | "
                    f"{f['stack_bytes']} | {f['shared_bytes']:,} | {tc} |",
                    flush=True,
                )
            save_records(recs, json_out, name)
    for msg in failures:
        print(msg, file=sys.stderr)
    for path in save_records(recs, json_out, name):
        print(f"records: {path}", file=sys.stderr)
    print(f"{len(sources)} .cu files, {n_kernels} kernels x architectures, {len(failures)} failures", flush=True)
    return 1 if failures else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", default="M,H")
    ap.add_argument(
        "--arch",
        default=None,
        help="compute capabilities x 10, comma-separated (90: H100/H200, 80: "
        "A100); default 90, with --cuda the extension's (ik_fast._build.CUDA_ARCHS)",
    )
    ap.add_argument("--precision", default="ieee", help="comma-separated: ieee, tf32, tf32x3, bf16")
    ap.add_argument(
        "--graphs",
        default=None,
        help="graphs to capture launches on (default: the problem's smaller "
        "count_work graph); extra graphs after a '+', e.g. '+skew@64'",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[PRECISION:]NAME=V1,V2",
        help="replace a captured constexpr's value by each of these (kernels that have it; only for that "
        "precision with a prefix, e.g. 'bf16:PREC=bf16')",
    )
    ap.add_argument("--kernels", default=None, help="compile only kernels whose name contains one of these")
    ap.add_argument(
        "--max-stack",
        type=int,
        default=None,
        help=f"exit 1 if a kernel's stack exceeds this (B/thread) or shared memory {SHARED_LIMIT} B",
    )
    ap.add_argument("--json", default=None, help="write the records (ik_fast/records.py, kind compile) to this file")
    ap.add_argument(
        "--name",
        default=None,
        help="also write them to benchmarks/results/compile/sm-<arch>/<date>-NAME.json, one file per architecture",
    )
    ap.add_argument(
        "--execute",
        action="store_true",
        help="run the kernels during the capture (slow); by default launches are recorded, not run",
    )
    ap.add_argument("--capture-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--list", action="store_true", help="print the captured launch configurations and stop")
    ap.add_argument(
        "--cuda",
        action="store_true",
        help="compile the native CUDA kernels (csrc/cuda/*.cu) with nvcc instead, one record per kernel "
        "and architecture; exit 1 on any spill or compile error",
    )
    ap.add_argument("--sources", default=None, help="with --cuda: comma-separated .cu files (default csrc/cuda/*.cu)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*py3nj.*")  # escnn's, when the records read its version

    command = "python benchmarks/compile_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.cuda:
        arches = (
            [int(a) for a in str(args.arch).split(",")]
            if args.arch
            else sorted(_build_module().CUDA_ARCHS, reverse=True)
        )
        srcs = args.sources.split(",") if args.sources else _build_module().cuda_sources(os.path.join(ROOT, "csrc"))
        return cuda_check([os.path.abspath(s) for s in srcs], arches, args.json, args.name, command)
    arches = [int(a) for a in str(args.arch or "90").split(",")]

    if args.capture_child:
        with open(args.json, "w") as f:
            json.dump(capture(args.capture_child, args.precision, args.graphs.split(","), args.execute), f)
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: this compiles the kernels (the capture runs the interpreter in a child)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    from ik_fast import records as _records
    from ik_fast.tools import workcount

    scoped = []  # (precision or None, constexpr, values)
    for item in args.set:
        name, _, values = item.partition("=")
        prec, _, name = name.rpartition(":")
        scoped.append((prec or None, name, [_parse_value(v) for v in values.split(",")]))
    spills = _ptxas_log_on()
    ptxas = {a: _ptxas_version(a) for a in arches}
    base = _records.provenance("cpu")
    provs = {a: arch_provenance(base, a, f"ptxas {ptxas[a]}" if ptxas[a] else None) for a in arches}
    common = {
        "host": base["device"]["name"],
        "max_stack": args.max_stack,
        "shared_limit": SHARED_LIMIT,
        "command": command,
    }
    print(f"triton {triton.__version__}; " + ", ".join(f"{_sm(a)}: ptxas {ptxas[a]}" for a in arches), flush=True)
    print(
        "| problem | precision | arch | kernel | constexprs | compile (s) | registers | stack (B/thread) | spills "
        "(B) | shared (B) | tensor-core instructions |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    recs, failed = [], False
    for problem in args.problems.split(","):
        graphs = workcount.graph_sizes(problem)[:1]
        if args.graphs:
            extra = args.graphs.lstrip("+").split(",")
            graphs = graphs + extra if args.graphs.startswith("+") else extra
        for precision in args.precision.split(","):
            if precision not in PRECISIONS:
                sys.exit(f"--precision: one of {PRECISIONS}, got {precision!r}")
            overrides = {n: v for p, n, v in scoped if p in (None, precision)}
            t = time.time()
            cfgs = _variants(_capture_child(problem, precision, graphs, args.execute), overrides)
            print(
                f"<!-- {problem} {precision}: {len(cfgs)} launch configurations captured on {graphs} in "
                f"{time.time() - t:.0f} s -->",
                flush=True,
            )
            if args.kernels:
                cfgs = [c for c in cfgs if any(k in c["kernel"] for k in args.kernels.split(","))]
            if args.list:
                for c in cfgs:
                    print(json.dumps(c))
                continue
            # the table shows the constexprs that differ between configurations of a kernel, those set with --set,
            # and the usual tile / precision names; the records have them all
            varying = {}
            for cfg in cfgs:
                for k, v in cfg["constexprs"].items():
                    varying.setdefault((cfg["kernel"], k), set()).add(json.dumps(v))
            for cfg, arch in itertools.product(cfgs, arches):
                brief = {
                    k: v
                    for k, v in cfg["constexprs"].items()
                    if k in overrides or k in ("BE", "BR", "PREC") or len(varying[(cfg["kernel"], k)]) > 1
                }
                brief.update(cfg.get("options") or {})
                opts = cfg.get("options") or {}
                ident = {
                    "kernel": cfg["kernel"],
                    "entry": len(recs),
                    "num_warps": opts.get("num_warps"),
                    "arch": _sm(arch),
                }
                details = {
                    "module": cfg["module"],
                    "constexprs": cfg["constexprs"],
                    "signature": cfg["signature"],
                    "options": opts,
                    "graphs": cfg["graphs"],
                    "triton": triton.__version__,
                    "ptxas": ptxas[arch],
                    **common,
                }
                t = time.time()
                try:
                    k, log = compile_one(cfg, arch)
                    details["compile_s"] = round(time.time() - t, 1)
                    res = _resources(k)
                    values = {
                        "registers": res.get("registers"),
                        "stack_bytes": res.get("stack_bytes"),
                        "shared_bytes": int(k.metadata.shared),
                        **_spills(log),
                    }
                    values = {m: v for m, v in values.items() if v is not None}
                    details["local_bytes"] = res.get("local_bytes")
                    try:
                        mma = _cubin_mma(k)
                    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
                        mma = f"{type(exc).__name__}: {exc}"
                    bad = values["shared_bytes"] > SHARED_LIMIT or (
                        args.max_stack is not None and values.get("stack_bytes", 0) > args.max_stack
                    )
                    details["ok"] = not bad
                    failed |= bad
                    recs += kernel_records(provs[arch], problem, "triton", values, ident, details, precision, mma)
                    spill = (
                        f"{values['spill_stores']} / {values['spill_loads']}"
                        if "spill_stores" in values
                        else "?"
                        if spills
                        else ""
                    )
                    tc = sum(mma.values()) if isinstance(mma, Counter) else "?"
                    print(
                        f"| {problem} | {precision} | {_sm(arch)} | {cfg['kernel']} | {brief} | "
                        f"{details['compile_s']:.0f} | {values.get('registers', '?')} | "
                        f"{values.get('stack_bytes', '?'):,} | {spill} | {values['shared_bytes']:,} | {tc} |"
                        + ("" if not bad else " **over the limit**"),
                        flush=True,
                    )
                except Exception as exc:  # report and go on: the point is to see every failure at once
                    failed = True
                    cause = exc.__cause__ if exc.__cause__ is not None else exc
                    msg = str(cause).splitlines()[-1][:200] if str(cause) else ""
                    details.update(compile_s=round(time.time() - t, 1), ok=False)
                    error = f"{type(cause).__name__}: {msg}"
                    recs += kernel_records(provs[arch], problem, "triton", {}, ident, details, precision, error=error)
                    print(
                        f"| {problem} | {precision} | {_sm(arch)} | {cfg['kernel']} | {brief} | failed after "
                        f"{details['compile_s']:.0f} s: {error} | | | | | |",
                        flush=True,
                    )
                save_records(recs, args.json, args.name)
    for path in save_records(recs, args.json, args.name) if recs else []:
        print(f"records: {path}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
