"""Compile every Triton kernel the package launches, ahead of time for a GPU architecture, on a machine without a GPU.

    python benchmarks/compile_check.py --problems M,H --precision ieee,tf32,bf16 --json OUT.json [--max-stack 512]

Kernels are discovered, not listed: for each problem and precision, one training step (forward + backward, training
mode) runs in Triton's interpreter (a child process with ``TRITON_INTERPRET=1``) on a small graph of the problem's
full degree, and every launch of a ``@triton.jit`` kernel is captured with its argument types and constexpr values
(``ik_fast.workcount.DotCounter(keep_args=True)``). The launches are recorded, not run (``--execute`` runs them),
since the host derives launch parameters from the graph and the program, not from kernel results. Each distinct
(kernel, signature, constexprs) is then compiled by Triton's own pipeline down to a cubin (Triton ships ptxas) for
``sm_<arch>``, and its registers, stack (local memory per thread: spills) and shared memory are read from the cubin,
with the compile time. One JSON record per compiled kernel: ``{"kernel", "problem", "precision", "registers",
"stack_bytes", "shared_bytes", "compile_s", ...}``.

``--max-stack N`` makes the exit status non-zero when a kernel's stack exceeds N bytes per thread, its shared memory
exceeds the H100/H200 limit (227 KB = 232448 B), or a compile fails.

Precisions are set as a user would: ``ieee`` float32 under ``torch.set_float32_matmul_precision("highest")``, ``tf32``
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

compiles every ``.cu`` file with nvcc, compile only (``-c``), once per architecture, with the flags of the extension's
build (``ik_fast/_build.py``), the defines torch's ``CUDAExtension`` adds and torch's include paths (the CPU wheel
ships the ATen/c10 CUDA headers; ``-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE`` stands in for the one generated header it
lacks), and reads ``-Xptxas -v``: one record per kernel (entry function) and architecture, ``{"kernel", "mangled",
"file", "arch", "registers", "spill_stores", "spill_loads", "stack_bytes", "shared_bytes", "constant_bytes"}``. Exit
status 1 on any spill (in a kernel or a device function it calls that was not inlined), any compile error, or shared
memory over the sm_90 limit. nvcc: ``$CUDA_HOME/bin/nvcc``, else the PATH's, else ``/usr/local/cuda/bin/nvcc``.
Headers that need the CUDA math libraries' own headers (``ATen/cuda/CUDAContext.h`` includes cublas_v2.h and
cusparse.h) compile only where those are installed; ``c10/cuda/CUDAStream.h``, ``CUDAGuard.h``, ``CUDAException.h``,
``ATen/ATen.h``, ``torch/library.h``, ``mma.h``, ``cuda_bf16.h`` and ``cub`` need only the toolkit.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_LIMIT = 232448  # bytes of shared memory per block on sm_90 (227 KB)
PRECISIONS = ("ieee", "tf32", "bf16")
_DTYPES = {"torch.float32": "fp32", "torch.float64": "fp64", "torch.float16": "fp16", "torch.bfloat16": "bf16",
           "torch.int64": "i64", "torch.int32": "i32", "torch.int16": "i16", "torch.int8": "i8", "torch.uint8": "u8",
           "torch.bool": "i1"}


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
        return "i32" if -2**31 <= v < 2**31 else "i64"
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

    from ik_fast import problems as _problems
    from ik_fast import workcount
    from ik_fast.bench import setup_case

    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
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
                    raise TypeError(f"{rec['kernel']}: argument {arg} of type {type(v).__name__} has no signature "
                                    f"type here")
                sig[arg] = t
        opts = {k: _jsonable(v) for k, v in rec.get("options", {}).items()}
        key = json.dumps([rec["kernel"], sig, const, opts], sort_keys=True)
        if key not in seen:
            seen[key] = {"kernel": fn.__name__, "module": fn.__module__, "qualname": fn.__qualname__,
                         "signature": sig, "constexprs": const, "options": opts, "launches": 0, "graphs": []}
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
        cmd = [sys.executable, os.path.abspath(__file__), "--capture-child", problem, "--precision", precision,
               "--graphs", ",".join(graphs), "--json", out] + (["--execute"] if execute else [])
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


def compile_one(cfg: dict, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(cfg["module"]), cfg["qualname"].split(".")[-1])
    sig = {name: ("constexpr" if name in cfg["constexprs"] else cfg["signature"][name]) for name in fn.arg_names}
    consts = {(fn.arg_names.index(k),): v for k, v in cfg["constexprs"].items()}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    # the launch's own options (num_warps, ...), as the host passes them on a GPU
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(cfg.get("options") or {}))


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
    for cand in ([os.path.join(home, "bin", "nvcc")] if home else []) + [shutil.which("nvcc") or "",
                                                                          "/usr/local/cuda/bin/nvcc"]:
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
    defines = ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *cpp_extension.COMMON_NVCC_FLAGS]
    torch_inc = cpp_extension.include_paths("cpu")[0]
    if not os.path.exists(os.path.join(torch_inc, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # a CPU wheel: torch's own switch for that header
    flags = [f for f in _build.nvcc_flags(root) if not f.startswith("-gencode")]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arches]
    return [nvcc, "-c", src, "-o", obj, "-std=c++20", *gencode, "-Xptxas", "-v",
            "--compiler-options", "-fPIC", *defines, *flags, *[f"-I{i}" for i in incs]]


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


def cuda_check(sources: list, arches: list, json_out=None) -> int:
    """Compile each .cu for each architecture; print a table, write the records; 1 on a spill or a failure."""
    nvcc = _nvcc()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(f"{nvcc}: {version}", flush=True)
    if not sources:
        print("no .cu files to compile", flush=True)
    print("| file | arch | kernel | registers | spill stores / loads (B) | stack (B) | shared (B) |")
    print("|---|---|---|---|---|---|---|", flush=True)
    records, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            cmd = nvcc_command(nvcc, src, os.path.join(tmp, "k.o"), arches)
            t = time.time()
            res = subprocess.run(cmd, capture_output=True, text=True)
            rel = os.path.relpath(src, ROOT)
            if res.returncode != 0:
                err = "\n".join(ln for ln in (res.stderr + res.stdout).splitlines() if "error" in ln.lower())
                failures.append(f"{rel}: compile failed\n{err or res.stderr[-3000:]}")
                records.append({"file": rel, "arch": ",".join(f"sm_{a}" for a in arches),
                                "error": err or res.stderr[-3000:]})
                print(f"| {rel} | {','.join(f'sm_{a}' for a in arches)} | compile failed | | | | |", flush=True)
                continue
            funcs = parse_ptxas(res.stderr + res.stdout)
            names = _demangle([f["mangled"] for f in funcs])
            for f in funcs:
                rec = {"kernel": names[f["mangled"]], "file": rel, "compile_s": round(time.time() - t, 1), **f}
                records.append(rec)
                spill = rec["spill_stores"] or rec["spill_loads"]
                if spill:
                    failures.append(f"{rel} {rec['arch']}: {rec['kernel']} spills {rec['spill_stores']} B / "
                                    f"{rec['spill_loads']} B")
                if rec["shared_bytes"] > SHARED_LIMIT:
                    failures.append(f"{rel} {rec['arch']}: {rec['kernel']} uses {rec['shared_bytes']} B of shared "
                                    f"memory (limit {SHARED_LIMIT})")
                kind = "" if f["entry"] else " (device function)"
                print(f"| {rel} | {rec['arch']} | `{rec['kernel'][:90]}`{kind} | {rec['registers']} | "
                      f"{rec['spill_stores']} / {rec['spill_loads']}{' **spills**' if spill else ''} | "
                      f"{rec['stack_bytes']} | {rec['shared_bytes']:,} |", flush=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"nvcc": version, "arches": [f"sm_{a}" for a in arches], "shared_limit": SHARED_LIMIT,
                       "records": records, "failures": failures}, f, indent=1)
    for msg in failures:
        print(msg, file=sys.stderr)
    n_kernels = sum(1 for r in records if r.get("entry"))
    print(f"{len(sources)} .cu files, {n_kernels} kernels x architectures, {len(failures)} failures", flush=True)
    return 1 if failures else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", default="M,H")
    ap.add_argument("--arch", default="90", help="compute capability x 10 (90: H100/H200); with --cuda a "
                    "comma-separated list (e.g. 90,80)")
    ap.add_argument("--precision", default="ieee", help="comma-separated: ieee, tf32, bf16")
    ap.add_argument("--graphs", default=None, help="graphs to capture launches on (default: the problem's smaller "
                    "count_work graph); extra graphs after a '+', e.g. '+skew@64'")
    ap.add_argument("--set", action="append", default=[], metavar="[PRECISION:]NAME=V1,V2",
                    help="replace a captured constexpr's value by each of these (kernels that have it; only for that "
                         "precision with a prefix, e.g. 'bf16:PREC=bf16')")
    ap.add_argument("--kernels", default=None, help="compile only kernels whose name contains one of these")
    ap.add_argument("--max-stack", type=int, default=None,
                    help=f"exit 1 if a kernel's stack exceeds this (B/thread) or shared memory {SHARED_LIMIT} B")
    ap.add_argument("--json", default=None)
    ap.add_argument("--execute", action="store_true",
                    help="run the kernels during the capture (slow); by default launches are recorded, not run")
    ap.add_argument("--capture-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--list", action="store_true", help="print the captured launch configurations and stop")
    ap.add_argument("--cuda", action="store_true",
                    help="compile the native CUDA kernels (csrc/cuda/*.cu) with nvcc instead, one record per kernel "
                         "and architecture; exit 1 on any spill or compile error")
    ap.add_argument("--sources", default=None, help="with --cuda: comma-separated .cu files (default csrc/cuda/*.cu)")
    args = ap.parse_args(argv)

    if args.cuda:
        arches = [int(a) for a in str(args.arch).split(",")]
        srcs = args.sources.split(",") if args.sources else _build_module().cuda_sources(os.path.join(ROOT, "csrc"))
        return cuda_check([os.path.abspath(s) for s in srcs], arches, args.json)
    args.arch = int(args.arch)

    if args.capture_child:
        with open(args.json, "w") as f:
            json.dump(capture(args.capture_child, args.precision, args.graphs.split(","), args.execute), f)
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: this compiles the kernels (the capture runs the interpreter in a child)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    from ik_fast import workcount

    scoped = []  # (precision or None, constexpr, values)
    for item in args.set:
        name, _, values = item.partition("=")
        prec, _, name = name.rpartition(":")
        scoped.append((prec or None, name, [_parse_value(v) for v in values.split(",")]))
    print(f"triton {triton.__version__}, sm_{args.arch}", flush=True)
    print("| problem | precision | kernel | constexprs | compile (s) | registers | stack (B/thread) | shared (B) |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    records, failed = [], False
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
            print(f"<!-- {problem} {precision}: {len(cfgs)} launch configurations captured on {graphs} in "
                  f"{time.time() - t:.0f} s -->", flush=True)
            if args.kernels:
                cfgs = [c for c in cfgs if any(k in c["kernel"] for k in args.kernels.split(","))]
            if args.list:
                for c in cfgs:
                    print(json.dumps(c))
                continue
            # the table shows the constexprs that differ between configurations of a kernel, those set with --set,
            # and the usual tile / precision names; the JSON has them all
            varying = {}
            for cfg in cfgs:
                for k, v in cfg["constexprs"].items():
                    varying.setdefault((cfg["kernel"], k), set()).add(json.dumps(v))
            for cfg in cfgs:
                brief = {k: v for k, v in cfg["constexprs"].items()
                         if k in overrides or k in ("BE", "BR", "PREC") or len(varying[(cfg["kernel"], k)]) > 1}
                brief.update(cfg.get("options") or {})
                rec = {"kernel": cfg["kernel"], "problem": problem, "precision": precision,
                       "module": cfg["module"], "constexprs": cfg["constexprs"], "signature": cfg["signature"],
                       "options": cfg.get("options") or {}, "graphs": cfg["graphs"], "arch": args.arch}
                t = time.time()
                try:
                    k = compile_one(cfg, args.arch)
                    rec.update(compile_s=round(time.time() - t, 1), shared_bytes=int(k.metadata.shared),
                               **_resources(k))
                    bad = (rec["shared_bytes"] > SHARED_LIMIT or
                           (args.max_stack is not None and rec.get("stack_bytes", 0) > args.max_stack))
                    rec["ok"] = not bad
                    failed |= bad
                    print(f"| {problem} | {precision} | {cfg['kernel']} | {brief} | {rec['compile_s']:.0f} | "
                          f"{rec.get('registers', '?')} | {rec.get('stack_bytes', '?'):,} | {rec['shared_bytes']:,} |"
                          + ("" if not bad else " **over the limit**"), flush=True)
                except Exception as exc:  # report and go on: the point is to see every failure at once
                    failed = True
                    cause = exc.__cause__ if exc.__cause__ is not None else exc
                    msg = str(cause).splitlines()[-1][:200] if str(cause) else ""
                    rec.update(compile_s=round(time.time() - t, 1), error=f"{type(cause).__name__}: {msg}", ok=False)
                    print(f"| {problem} | {precision} | {cfg['kernel']} | {brief} | failed after "
                          f"{rec['compile_s']:.0f} s: {rec['error']} | | | |", flush=True)
                records.append(rec)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump({"triton": triton.__version__, "arch": args.arch, "max_stack": args.max_stack,
                                   "shared_limit": SHARED_LIMIT, "records": records}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
