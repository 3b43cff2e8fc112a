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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", default="M,H")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
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
    args = ap.parse_args(argv)

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
