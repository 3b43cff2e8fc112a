"""A static GPU model of one training step: every Triton kernel compiled for sm_90, its SASS counted with trip counts
from execution, and the resulting lower-bound time on an H100. A model, not a measurement.

    python benchmarks/gpu_model.py --problems M,H --precision ieee,tf32,tf32x3 [--triton 3.6=/tmp/tri36,3.9]
                                   [--tree PATH] [--json OUT.json] [--name NAME] [--markdown OUT.md]

Method (per problem, per precision):

1. **Execution** (a child process, ``TRITON_INTERPRET=1``, ``IK_FAST_TARGET_DEVICE=cuda`` so that the host makes the
   GPU's launch choices): one training step on each of two graphs of the problem's degree
   (:func:`ik_fast.tools.workcount.graph_sizes`, e.g. M@40 and M@80), the kernels found by their launches. Per
   launch: its signature, constexprs and options (as ``benchmarks/compile_check.py`` captures them), its grid, the
   ``tl.dot`` multiply-adds (:class:`ik_fast.tools.workcount.DotCounter`), its global-memory sectors
   (:class:`ik_fast.tools.sectors.SectorCounter`) and **how often each source line of the kernel and of its jit
   helpers executed, summed over the programs**, keyed by the line and the chain of call sites that led to it
   (``sys.settrace`` on the kernel's frames only). The step runs in IEEE; a TF32 / 3xTF32 step's launches are
   captured without running (their trip counts are the IEEE launch's at the same position, the constexprs other than
   the precision being the same).
2. **Compilation** (a child process per Triton version: ``PYTHONPATH`` names the Triton, e.g. 3.6 = the GPU image's):
   each distinct launch configuration compiled for ``sm_90`` with its own constexprs and ``num_warps`` (Triton's
   ``triton.compile``, as ``compile_check.py``), registers and stack from the cubin.
3. **SASS** (``nvdisasm -g -gi``, shipped with Triton): every instruction with its source line and the lines it was
   inlined at. Loops are the backward branches; each SASS loop is mapped to the innermost dynamic source loop
   (``for`` over ``range``/``tl.range``; ``tl.static_range`` is unrolled by Triton and is no loop) enclosing the
   line of its backward branch, in the same inlining context, and executes as often as that source loop's body did
   in step 1 (the count of the body's first line). Instructions outside every loop execute once per program. When a
   compiler unrolled a source loop (two SASS loops on one source loop), the larger one is taken as unrolled by the
   ratio of their sizes and runs ``trips / u`` times, the other one ``(u - 1) / 2`` per entry. Instructions under a
   branch count as executed on every trip (an upper bound: predication and divergence unknown).
   **Dynamic warp-instructions = per-thread instructions executed x warps per program**, summed over programs.
4. **Scaling**: every figure at the two graphs, extrapolated linearly in the edges to the full problem (E = nodes x k).
5. **Lower bound per kernel** = max(issue, memory, tensor core): issue = warp-instructions / (132 SMs x 4 per clock x
   1.98 GHz); memory = sectors x 32 B / L2 bandwidth (5.5 TB/s); tensor core = the MMA instructions' multiply-adds at
   their peak (``HGMMA`` (wgmma) at dense TF32 494.7 TFLOP/s, bf16 989 TFLOP/s; ``HMMA`` (mma.sync) at half that, the
   rate the prediction assumed). Summed per step; ATen passes and launch latency are not counted.

Per kernel also: the tensor-core instructions' multiply-adds against the ideal (the dots' MNK, x3 in 3xTF32), FFMA in
IEEE against MNK / 32, registers and stack. Records: kind ``model`` (``ik_fast/records.py``), device "H100 SXM static
model (sm_90 SASS, Triton <v>), computed on <CPU>".
"""

from __future__ import annotations

import argparse
import ast
import collections
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# machine constants (H100 SXM)
SMS = 132
ISSUE_PER_CLOCK = 4  # warp-instructions per clock per SM (one per sub-partition)
CLOCK = 1.98e9  # Hz, boost
L2_BW = 5.5e12  # B/s, assumed L2 bandwidth (the prediction's lower value)
HBM_BW = 3.35e12
SECTOR = 32
TF32_PEAK_MACS = 494.7e12 / 2  # dense TF32 multiply-adds per second (wgmma)
MMA_SYNC_SHARE = 0.5  # mma.sync (HMMA) at half the wgmma rate (the prediction's assumption)
PRECISIONS = {"ieee": "highest", "tf32": "high", "tf32x3": "highest"}
CONSTANTS = {
    "sms": SMS,
    "issue_per_clock_per_sm": ISSUE_PER_CLOCK,
    "clock_hz": CLOCK,
    "l2_bytes_per_s": L2_BW,
    "tf32_wgmma_macs_per_s": TF32_PEAK_MACS,
    "mma_sync_share": MMA_SYNC_SHARE,
}


# ----------------------------------------------------------------------------------------------------------------
# 1. execution: launches, line counts, dots, sectors (child, in the interpreter)
# ----------------------------------------------------------------------------------------------------------------
def _kernel_files() -> set:
    """The source files of the tree's Triton kernels (``ik_fast.kernels_triton``, or ``kernels_triton`` in older
    trees)."""
    import importlib

    for name in ("ik_fast.kernels_triton", "kernels_triton"):
        try:
            kt = importlib.import_module(name)
        except ImportError:
            continue
        d = os.path.dirname(os.path.abspath(kt.__file__))
        return {os.path.join(d, f) for f in os.listdir(d) if f.endswith(".py")}
    raise ImportError("no ik_fast.kernels_triton / kernels_triton in the tree")


def _register_tree(tree: str) -> None:
    """An older tree maps ``ik_fast.kernels_triton`` to ``./kernels_triton`` (its pyproject's package-dir): import it
    from there (else the editable install of this checkout would supply its own)."""
    import importlib.util

    kt = os.path.join(tree, "kernels_triton")
    if "ik_fast.kernels_triton" in sys.modules or not os.path.isdir(kt):
        return
    if os.path.exists(os.path.join(tree, "ik_fast", "kernels_triton")):
        return
    spec = importlib.util.spec_from_file_location(
        "ik_fast.kernels_triton", os.path.join(kt, "__init__.py"), submodule_search_locations=[kt]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ik_fast.kernels_triton"] = mod
    spec.loader.exec_module(mod)


def _tools():
    """(problems module of the tree, this checkout's sectors module): the tracer is this checkout's, the problems and
    kernels the tree's (``--tree``, first on the path), which may be an older layout without ``ik_fast.tools``."""
    import importlib
    import importlib.util
    import types

    tree = os.environ.get("IK_FAST_MODEL_TREE", ROOT)
    new_layout = os.path.exists(os.path.join(tree, "ik_fast", "tools", "workcount.py"))
    _register_tree(tree)
    problems = importlib.import_module("ik_fast.tools.problems" if new_layout else "ik_fast.problems")

    def load(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod

    if not new_layout:  # an older tree: this checkout's counter stands in
        pkg = types.ModuleType("ik_fast.tools")
        pkg.__path__ = []
        cases = types.ModuleType("ik_fast.tools.cases")
        cases.floor_per_edge = cases.floor_terms = cases.program_sizes = None
        sys.modules.update({"ik_fast.tools": pkg, "ik_fast.tools.cases": cases})
        sys.modules["ik_fast.tools.workcount"] = load("_gm_workcount", os.path.join(ROOT, "ik_fast/tools/workcount.py"))
    sectors = load("_gm_sectors", os.path.join(ROOT, "ik_fast", "tools", "sectors.py"))
    return problems, sectors


def _step(problems, name: str):
    """One training step of the triton backend on graph ``name`` (a fresh copy of the edge index, as
    ``workcount._train_step``), and its warm-up on another copy."""
    import torch

    p = problems.get_problem(name)
    x, pos, ei, attr = problems.build_inputs(p, seed=0, dtype=torch.float32)
    layer = problems.build_layer(p, backend="triton", seed=0).to(torch.float32)
    layer.train(True)

    def step(edges=None):
        xs, ps, at = (t.clone().requires_grad_(True) for t in (x, pos, attr))
        out = layer(xs, ei.clone() if edges is None else edges, edge_attr=at, pos=ps)
        out.backward(torch.ones_like(out))
        return out

    step.warm_up = lambda: step(ei.clone())
    step.nodes, step.edges = int(x.shape[0]), int(ei.shape[1])
    return step


class LineTracer:
    """Per launch: how often each line of the kernel and its jit helpers executed (all programs summed), keyed by
    ``"file:line<file:line<..."``: the line, then its call sites outwards up to the kernel's own line."""

    def __init__(self, files: set):
        self.files = files
        self.counts: Dict[str, int] = collections.Counter()
        self._ctx: Dict[int, tuple] = {}

    def _global(self, frame, event, arg):
        if event != "call" or frame.f_code.co_filename not in self.files:
            return None
        parent = frame.f_back
        while parent is not None and id(parent) not in self._ctx and parent.f_code.co_filename not in self.files:
            parent = parent.f_back
        if parent is not None and id(parent) in self._ctx:
            pctx = self._ctx[id(parent)]
            ctx = pctx + (f"{os.path.basename(parent.f_code.co_filename)}:{parent.f_lineno}",)
        else:
            ctx = ()
        self._ctx[id(frame)] = ctx
        counts = self.counts
        base = os.path.basename(frame.f_code.co_filename)
        suffix = "".join("<" + c for c in reversed(ctx))

        def local(fr, ev, a):
            if ev == "line":
                counts[f"{base}:{fr.f_lineno}{suffix}"] += 1
            elif ev == "return":
                self._ctx.pop(id(fr), None)
            return local

        return local

    def start(self):
        self.counts = collections.Counter()
        self._ctx = {}
        sys.settrace(self._global)

    def stop(self) -> Dict[str, int]:
        sys.settrace(None)
        return dict(self.counts)


def _compile_check():
    """benchmarks/compile_check.py (its argument types and JSON values), loaded by path; it puts this checkout first on
    ``sys.path``, which would shadow a ``--tree``'s package: the path is restored."""
    import importlib.util

    if "_gm_compile_check" not in sys.modules:
        saved = list(sys.path)
        spec = importlib.util.spec_from_file_location("_gm_compile_check", os.path.join(HERE, "compile_check.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_gm_compile_check"] = mod
        try:
            spec.loader.exec_module(mod)
        finally:
            sys.path[:] = saved
    return sys.modules["_gm_compile_check"]


def _config(rec) -> dict:
    cc = _compile_check()
    fn = rec["fn"].fn
    ann = inspect.get_annotations(fn)
    sig, const = {}, {}
    for arg in rec["fn"].arg_names:
        v = rec["args"].get(arg, inspect.signature(fn).parameters[arg].default)
        if "constexpr" in str(ann.get(arg, "")) or v is None:
            const[arg] = cc._jsonable(v)
        else:
            sig[arg] = cc._arg_type(v)
    return {
        "kernel": fn.__name__,
        "module": fn.__module__,
        "qualname": fn.__qualname__,
        "file": os.path.abspath(inspect.getsourcefile(fn)),
        "signature": sig,
        "constexprs": const,
        "options": {k: cc._jsonable(v) for k, v in rec.get("options", {}).items()},
        "programs": rec["grid"][0] * rec["grid"][1] * rec["grid"][2],
    }


def _traced_run(inner, sc, tracer, launches: list, execute: bool):
    """A wrapper of ``InterpretedFunction.run`` that traces the lines of each launch and its dots and sectors."""

    def run(fn_self, *args, grid, warmup, **kwargs):
        if warmup or not execute:
            return inner(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
        fn = fn_self.fn
        kname = f"{fn.__module__}.{fn.__qualname__}"
        before_macs = sc.kernels[kname]["macs"]
        fields = ("sectors", "warp_sectors", "useful_bytes")
        before = {f: sum(sc.access[kname][op].get(f, 0) for op in sc.access[kname]) for f in fields}
        tracer.start()
        try:
            return inner(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            lines = tracer.stop()
            after = {f: sum(sc.access[kname][op].get(f, 0) for op in sc.access[kname]) for f in fields}
            delta = {f: after[f] - before[f] for f in fields}
            launches.append({"lines": lines, "macs": sc.kernels[kname]["macs"] - before_macs, **delta})

    return run


def trace(graphs: List[str], precision: str, execute: bool) -> List[dict]:
    """The launches of one training step per graph: [{graph, edges, launches: [config + lines, macs, sectors]}]."""
    import torch
    from triton.runtime import interpreter as ti

    problems, sectors = _tools()
    workcount = sys.modules["ik_fast.tools.workcount"]
    torch.set_float32_matmul_precision(PRECISIONS[precision])
    out = []
    for name in graphs:
        step = _step(problems, name)
        with workcount.DotCounter(execute=False, profile_ranges=False):
            step.warm_up()
        launches = []
        tracer = LineTracer(_kernel_files())
        with sectors.SectorCounter(sites=False) as sc:
            sc.keep_args = True
            sc.execute = execute
            IF = ti.InterpretedFunction
            inner = IF.run
            run = _traced_run(inner, sc, tracer, launches, execute)
            IF.run = run
            try:
                step()
            finally:
                IF.run = inner
        configs = [_config(r) for r in sc.records]
        if execute:
            assert len(configs) == len(launches), (len(configs), len(launches))
            for c, extra in zip(configs, launches):
                c.update(extra)
        out.append({"graph": name, "edges": step.edges, "nodes": step.nodes, "launches": configs})
    return out


# ----------------------------------------------------------------------------------------------------------------
# 2. compilation (child, under the Triton version asked for)
# ----------------------------------------------------------------------------------------------------------------
def compile_configs(configs: List[dict], outdir: str) -> List[dict]:
    """Compile each configuration for sm_90; write ``<i>.cubin`` into ``outdir``; return registers/stack/errors."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _register_tree(os.environ.get("IK_FAST_MODEL_TREE", ROOT))
    res = []
    for i, cfg in enumerate(configs):
        t = time.time()
        try:
            fn = getattr(importlib.import_module(cfg["module"]), cfg["qualname"].split(".")[-1])
            sig = {n: ("constexpr" if n in cfg["constexprs"] else cfg["signature"][n]) for n in fn.arg_names}
            consts = {(fn.arg_names.index(k),): v for k, v in cfg["constexprs"].items()}
            k = triton.compile(
                ASTSource(fn=fn, signature=sig, constexprs=consts),
                target=GPUTarget("cuda", 90, 32),
                options=dict(cfg.get("options") or {}),
            )
            path = os.path.join(outdir, f"{i}.cubin")
            with open(path, "wb") as f:
                f.write(k.asm["cubin"])
            meta = k.metadata
            res.append(
                {
                    "cubin": path,
                    "num_warps": getattr(meta, "num_warps", None),
                    "shared": getattr(meta, "shared", None),
                    "seconds": time.time() - t,
                    "triton": triton.__version__,
                }
            )
        except Exception as e:  # a kernel that does not compile is reported, not fatal
            res.append({"error": f"{type(e).__name__}: {e}"[:2000], "triton": triton.__version__})
    return res


# ----------------------------------------------------------------------------------------------------------------
# 3. SASS: instructions, line info, loops
# ----------------------------------------------------------------------------------------------------------------
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)((?: inlined at "[^"]+", line \d+)*)')
_INL = re.compile(r'inlined at "([^"]+)", line (\d+)')
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*(?:x[0-9][A-Z0-9_.x]*)?)([^;]*);")
_TARGET = re.compile(r"`\(\.(L_x_\d+)\)")


def _bin(tool: str, triton_dir: Optional[str] = None) -> str:
    if triton_dir is None:
        import triton

        triton_dir = os.path.dirname(triton.__file__)
    return os.path.join(triton_dir, "backends", "nvidia", "bin", tool)


def parse_sass(text: str) -> List[dict]:
    """Instructions in address order: {addr, op, args, ctx} where ctx is ``"file:line<file:line..."`` (the line,
    then the lines it was inlined at, outwards), and ``target`` (address) for a branch to a label."""
    labels, insns, loc, block = {}, [], None, []
    for raw in text.splitlines():
        line = raw.strip()
        m = _LINE.search(line)
        if m:  # one comment per inlining level before an instruction, innermost first
            block.append(f"{os.path.basename(m.group(1))}:{m.group(2)}")
            continue
        if line.startswith(".L_x_") and line.endswith(":"):
            insns.append({"label": line[1:-1]})
            continue
        m = _INSN.search(line)
        if m:
            if block:
                loc, block = "<".join(block), []
            insn = {"addr": int(m.group(1), 16), "op": m.group(3), "args": m.group(4), "ctx": loc}
            t = _TARGET.search(line)
            if t:
                insn["target_label"] = t.group(1)
            insns.append(insn)
    out, want = [], []
    for it in insns:
        if "label" in it:
            want.append(it["label"])
            continue
        for lab in want:
            labels[lab] = it["addr"]
        want = []
        out.append(it)
    for it in out:
        if "target_label" in it:
            it["target"] = labels.get(it.pop("target_label"))
    return out


def sass_of(cubin: str, nvdisasm: str) -> List[dict]:
    res = subprocess.run([nvdisasm, "-c", "-g", "-gi", cubin], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {res.stderr[-500:]}")
    return parse_sass(res.stdout)


def loops(insns: List[dict]) -> List[dict]:
    """SASS loops from backward branches: {start, end (the branch's address), branch ctx, parent index, own: the
    instructions in the loop but in no nested loop}; the innermost first order does not matter."""
    ls = []
    for it in insns:
        # (a branch to itself is the trap after EXIT, no loop)
        if it["op"].startswith("BRA") and it.get("target") is not None and it["target"] < it["addr"]:
            ls.append({"start": it["target"], "end": it["addr"], "ctx": it["ctx"]})
    # merge loops with one head (several back edges): the widest
    byhead = {}
    for lp in ls:
        if lp["start"] not in byhead or lp["end"] > byhead[lp["start"]]["end"]:
            byhead[lp["start"]] = lp
    ls = sorted(byhead.values(), key=lambda lp: (lp["start"], -lp["end"]))
    for i, lp in enumerate(ls):
        lp["parent"] = None
        best = None
        for j, q in enumerate(ls):
            if (
                j != i
                and q["start"] <= lp["start"]
                and lp["end"] <= q["end"]
                and (q["start"], q["end"])
                != (
                    lp["start"],
                    lp["end"],
                )
            ):
                if best is None or (q["end"] - q["start"]) < (ls[best]["end"] - ls[best]["start"]):
                    best = j
        lp["parent"] = best
    return ls


def innermost_loop(insn_addr: int, ls: List[dict]) -> Optional[int]:
    best = None
    for j, q in enumerate(ls):
        if q["start"] <= insn_addr <= q["end"]:
            if best is None or (q["end"] - q["start"]) < (ls[best]["end"] - ls[best]["start"]):
                best = j
    return best


class SourceLoops:
    """The dynamic ``for`` loops of the kernel sources: per file, [(header line, last line, header line, static)] and
    the loops' AST nodes by header line (for their executed iterations)."""

    def __init__(self):
        self.files: Dict[str, list] = {}
        self.nodes: Dict[str, Dict[int, ast.AST]] = {}

    def of(self, path: str) -> list:
        base = os.path.basename(path)
        if base not in self.files:
            try:
                with open(path) as f:
                    tree = ast.parse(f.read())
            except (OSError, SyntaxError):
                self.files[base] = []
                return []
            found, nodes = [], {}
            for node in ast.walk(tree):
                if isinstance(node, ast.For):
                    it = node.iter
                    fname = ""
                    if isinstance(it, ast.Call):
                        fname = it.func.attr if isinstance(it.func, ast.Attribute) else getattr(it.func, "id", "")
                    static = fname == "static_range"
                    found.append((node.lineno, node.end_lineno, node.lineno, static))
                    nodes[node.lineno] = node
            self.files[base] = found
            self.nodes[base] = nodes
        return self.files[base]

    def iterations(self, key: str, lines: Dict[str, int]) -> Optional[int]:
        """How often the body of the loop ``key`` (``"file:header<call site<..."``) executed: the count of its first
        statement's line, or, when that statement is a loop, how often that loop was entered (a ``for`` header's
        line executes once per entry and once per iteration)."""
        head, _, rest = key.partition("<")
        base, _, ln = head.rpartition(":")
        node = self.nodes.get(base, {}).get(int(ln))
        if node is None:
            return None
        suffix = "<" + rest if rest else ""

        def get(k: str) -> int:
            # the SASS's inlining chain may stop short of the kernel (a location without its call sites): every
            # executed context that extends it
            if k in lines:
                return lines[k]
            return sum(v for kk, v in lines.items() if kk.startswith(k + "<"))

        def iters(loop) -> int:
            first = loop.body[0]
            if isinstance(first, (ast.For, ast.While)):
                return get(f"{base}:{first.lineno}{suffix}") - iters(first)
            return get(f"{base}:{first.lineno}{suffix}")

        return iters(node)

    def enclosing(self, ctx: str, paths: Dict[str, str]) -> List[tuple]:
        """The dynamic source loops enclosing ``ctx``'s line, innermost first (in its function, then at each call
        site outwards): [(key ``"file:header<call site<..."``, header ``"file:line"``, whether the line is that
        header)]."""
        chain = ctx.split("<")
        out = []
        for level, loc in enumerate(chain):
            base, _, ln = loc.rpartition(":")
            ln = int(ln)
            cands = [f for f in self.of(paths.get(base, base)) if not f[3] and f[0] <= ln <= f[1]]
            for hdr in sorted(cands, key=lambda f: -f[0]):
                key = "<".join([f"{base}:{hdr[0]}"] + chain[level + 1 :])
                out.append((key, f"{base}:{hdr[0]}", level == 0 and hdr[0] == ln))
        return out


VOTE = 0.85  # share of a SASS loop's own instructions a source loop must enclose to be taken as that loop


def map_loops(ls: List[dict], own: Dict, paths: Dict[str, str], src: SourceLoops) -> None:
    """Give each SASS loop ``key``/``source``: the source loop it runs. The loop of its backward branch's line when
    that line is a loop's header; else the innermost source loop enclosing at least VOTE of its own instructions and
    not taken by a loop nested in it."""
    order = sorted(range(len(ls)), key=lambda j: ls[j]["end"] - ls[j]["start"])
    for j in order:
        lp = ls[j]
        lp["key"] = lp["source"] = None
        taken = set()
        for k, q in enumerate(ls):
            if k != j and lp["start"] <= q["start"] and q["end"] <= lp["end"] and q.get("key"):
                taken.add(q["key"])
        enc = src.enclosing(lp["ctx"], paths) if lp["ctx"] else []
        if enc and enc[0][2] and enc[0][0] not in taken:
            lp["key"], lp["source"] = enc[0][0], enc[0][1]
            continue
        votes, n = collections.Counter(), 0
        for it in own.get(j, []):
            if not it["ctx"]:
                continue
            n += 1
            for key, hdr, _ in src.enclosing(it["ctx"], paths):
                votes[(key, hdr)] += 1
        best = None
        for (key, hdr), v in votes.items():
            if key in taken or v < VOTE * n:
                continue
            if best is None or v < best[1]:
                best = ((key, hdr), v)
        if best is not None:
            lp["key"], lp["source"] = best[0]


def dynamic_counts(insns: List[dict], lines: Dict[str, int], programs: int, paths: Dict[str, str], src: SourceLoops):
    """Per-thread instructions executed, summed over the programs, by opcode; and notes."""
    ls = loops(insns)
    notes = []
    own = collections.defaultdict(list)
    for it in insns:
        own[innermost_loop(it["addr"], ls)].append(it)
    map_loops(ls, own, paths, src)
    for lp in ls:
        lp["trips"] = src.iterations(lp["key"], lines) if lp["key"] else None
    # unrolled source loops: several SASS loops on one source loop in one context
    bykey = collections.defaultdict(list)
    for j, lp in enumerate(ls):
        if lp["key"] is not None:
            bykey[lp["key"]].append(j)

    def mult(j):
        if j is None:
            return programs
        lp = ls[j]
        if "mult" in lp:
            return lp["mult"]
        parent = mult(lp["parent"])
        if lp["trips"] is None:
            lp["mult"] = parent
            notes.append(f"loop at {lp['ctx']} not mapped to a source loop: counted once per parent trip")
        else:
            group = bykey[lp["key"]]
            if len(group) > 1:
                sizes = {g: len(own[g]) for g in group}
                big = max(group, key=lambda g: sizes[g])
                u = max(1, round(sizes[big] / max(1, min(sizes.values()))))
                if u == 1:  # alike loops: one source loop at several call sites the line info does not tell apart
                    lp["mult"] = lp["trips"] / len(group)
                    if j == big:
                        notes.append(f"{lp['source']}: {len(group)} SASS loops alike, its trips shared among them")
                else:
                    lp["mult"] = lp["trips"] / u if j == big else parent * (u - 1) / 2
                    if j == big:
                        notes.append(f"{lp['source']}: {len(group)} SASS loops, taken as unrolled x{u}")
            else:
                lp["mult"] = lp["trips"]
        return lp["mult"]

    ops = collections.Counter()
    for j, its in own.items():
        m = mult(j)
        for it in its:
            ops[it["op"]] += m
    return ops, notes, ls


# ----------------------------------------------------------------------------------------------------------------
# 4. per kernel figures
# ----------------------------------------------------------------------------------------------------------------
_MMA = re.compile(r"^(HGMMA|HMMA|IMMA|DMMA)\.(\d+)x?(\d+)?x?(\d+)?")


def mma_macs(op: str) -> Optional[float]:
    """Multiply-adds of one warp's share of a tensor-core instruction (HMMA.1688: 16x8x8; HGMMA.64xNxK: per
    warpgroup / 4)."""
    if op.startswith("HGMMA."):
        m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
        if m:
            a, b, c = map(int, m.groups())
            return a * b * c / 4
    if op.startswith("HMMA."):
        m = re.match(r"HMMA\.(\d+)", op)
        if m:
            s = m.group(1)
            shapes = {"1688": (16, 8, 8), "16816": (16, 8, 16), "884": (8, 8, 4), "16832": (16, 8, 32)}
            if s in shapes:
                a, b, c = shapes[s]
                return a * b * c
    return None


def kernel_figures(ops: collections.Counter, warps: int) -> dict:
    warp_instr = sum(ops.values()) * warps
    ffma = sum(v for k, v in ops.items() if k.startswith("FFMA")) * warps
    hmma = sum(v for k, v in ops.items() if k.startswith("HMMA")) * warps
    hgmma = sum(v for k, v in ops.items() if k.startswith("HGMMA")) * warps
    tc_macs_sync = sum((mma_macs(k) or 0) * v for k, v in ops.items() if k.startswith("HMMA")) * warps
    tc_macs_wg = sum((mma_macs(k) or 0) * v for k, v in ops.items() if k.startswith("HGMMA")) * warps
    return {
        "warp_instructions": warp_instr,
        "ffma": ffma,
        "hmma": hmma,
        "hgmma": hgmma,
        "tc_macs_mma_sync": tc_macs_sync,
        "tc_macs_wgmma": tc_macs_wg,
    }


def times(fig: dict, bf16: bool = False) -> dict:
    issue = fig["warp_instructions"] / (SMS * ISSUE_PER_CLOCK * CLOCK)
    # the requests per warp-wide instruction (what the load/store units send); a trace without them: per block access
    mem = fig.get("warp_sectors", fig.get("sectors", 0)) * SECTOR / L2_BW
    peak = TF32_PEAK_MACS * (2 if bf16 else 1)
    tc = fig["tc_macs_wgmma"] / peak + fig["tc_macs_mma_sync"] / (peak * MMA_SYNC_SHARE)
    return {"t_issue": issue, "t_memory": mem, "t_tensor": tc, "t_bound": max(issue, mem, tc)}


def extrapolate(v0: float, v1: float, e0: int, e1: int, edges: int) -> float:
    """A figure at ``edges`` from its values at two graphs of ``e0`` and ``e1`` edges: per-step constant plus per-edge
    slope (in proportion to the edges when the two are one graph)."""
    if e1 == e0:
        return v0 * edges / e0
    return max(0.0, v0 + (v1 - v0) / (e1 - e0) * (edges - e0))


def _cfg_key(c: dict) -> str:
    return json.dumps([c["module"], c["qualname"], c["signature"], c["constexprs"], c["options"]], sort_keys=True)


def _label(c: dict, shared_keys: Dict[str, List[str]]) -> str:
    """kernel name, with the constexprs that tell its configurations apart."""
    diff = shared_keys.get(c["qualname"], [])
    extra = ",".join(f"{k}={c['constexprs'][k]}" for k in diff if k in c["constexprs"])
    return c["kernel"] + (f"[{extra}]" if extra else "")


# ----------------------------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------------------------
def _child(args: List[str], tree: str, triton_path: Optional[str], interpret: bool, precision: str = "ieee") -> None:
    env = dict(os.environ)
    # what "highest" runs as on CUDA in a tree that offers 3xTF32 (ik_fast.kernels_triton.launch.highest_on_cuda)
    env["IK_FAST_HIGHEST"] = "tf32x3" if precision == "tf32x3" else "ieee"
    paths = [p for p in (triton_path, tree) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TRITON_INTERPRET"] = "1" if interpret else "0"
    env["IK_FAST_MODEL_TREE"] = tree
    env["IK_FAST_TARGET_DEVICE"] = "cuda"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    res = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed:\n{res.stderr[-4000:]}")


RECEIVER_BLOCK = 16  # receivers per program of the Triton contraction kernels (BN)


def model_graphs(problem: str) -> List[str]:
    """The two graphs the Triton model is traced on: :func:`ik_fast.tools.workcount.graph_sizes`' pair with each node
    count rounded up to a multiple of :data:`RECEIVER_BLOCK` (M: 48 and 80 nodes, H: 32 and 64). A partial block of
    receivers costs a whole program (its loops run to the block's largest degree), so a graph with one (M@40: three
    programs for two and a half blocks' receivers) would put part of a program's work into the per-step constant and
    take it out of the per-edge slope (0.8x the programs at M)."""
    from ik_fast.tools.workcount import graph_sizes

    out = []
    for g in graph_sizes(problem):
        base, at, n = g.partition("@")
        out.append(f"{base}@{-(-int(n) // RECEIVER_BLOCK) * RECEIVER_BLOCK}" if at and n.isdigit() else g)
    return out


def run_trace(problem: str, precision: str, tree: str, workdir: str, graphs=None) -> List[dict]:
    graphs = graphs or model_graphs(problem)  # (this checkout's rule; the child builds them with the tree's problems)
    out = os.path.join(workdir, f"trace-{problem}-{precision}.json")
    if not os.path.exists(out):
        # every precision executes its own trace: a precision may launch other block shapes (the Triton trunk's
        # tensor-core blocks in TF32), so the IEEE launch's trip counts, dots and sectors need not be its own
        execute = True
        args = ["--trace-child", ",".join(graphs), precision, out] + (["--execute"] if execute else [])
        _child(args, tree, None, True, precision)
    with open(out) as f:
        return json.load(f)


def run_compile(configs: List[dict], tree: str, triton_path: Optional[str], workdir: str, tag: str) -> List[dict]:
    """The compile results of ``configs`` (in order), compiling those not in ``workdir``'s cache for ``tag``."""
    import hashlib

    cache_path = os.path.join(workdir, f"compiled-{tag}.json")
    cache = {}
    if os.path.exists(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)
    keys = [_cfg_key(c) for c in configs]
    todo = [c for c, k in zip(configs, keys) if k not in cache]
    if todo:
        h = hashlib.sha1("".join(sorted(_cfg_key(c) for c in todo)).encode()).hexdigest()[:10]
        cub = os.path.join(workdir, f"cubins-{tag}-{h}")
        os.makedirs(cub, exist_ok=True)
        cfg_path, res_path = os.path.join(cub, "configs.json"), os.path.join(cub, "compiled.json")
        with open(cfg_path, "w") as f:
            json.dump(todo, f)
        _child(["--compile-child", cfg_path, cub, res_path], tree, triton_path, False)
        with open(res_path) as f:
            for c, r in zip(todo, json.load(f)):
                cache[_cfg_key(c)] = r
        with open(cache_path, "w") as f:
            json.dump(cache, f)
    return [cache[k] for k in keys]


def model(
    problem: str,
    precision: str,
    tree: str,
    triton_path: Optional[str],
    workdir: str,
    tag: str,
    ieee_trace=None,
    graphs=None,
) -> dict:
    """The model of one problem and precision: per kernel configuration and per step."""
    from ik_fast.tools.problems import get_problem

    p = get_problem(problem)
    full_edges = p.nodes * p.k
    mine = run_trace(problem, precision, tree, workdir, graphs)
    executed = all("lines" in lc for g in mine for lc in g["launches"])
    # the IEEE trace only for a trace that did not execute (an older one: its trip counts are the IEEE launch's)
    ieee = mine if executed else (ieee_trace or run_trace(problem, "ieee", tree, workdir, graphs))
    precs = {lc["constexprs"].get("PREC") for g in mine for lc in g["launches"]} - {None}
    if precision != "ieee" and precs and precision not in precs:
        return {"problem": problem, "precision": precision, "skipped": f"the tree's kernels run {sorted(precs)} here"}
    # the configurations of this precision's launches, each with its own trip counts (or, from a trace that did not
    # execute, the IEEE launch's at its position)
    configs, per_graph = {}, []
    for g_ieee, g in zip(ieee, mine):
        assert len(g_ieee["launches"]) == len(g["launches"]), "the precisions launch different kernels"
        launches = []
        for li, lp in zip(g_ieee["launches"], g["launches"]):
            if li["qualname"] != lp["qualname"]:
                raise RuntimeError(f"launch order differs between precisions: {li['qualname']} / {lp['qualname']}")
            src = lp if "lines" in lp else li  # (its own execution where traced; an older trace: the IEEE one's)
            lc = dict(lp, lines=src["lines"], macs=src["macs"], sectors=src["sectors"])
            lc["useful_bytes"] = src["useful_bytes"]
            if "warp_sectors" in src:
                lc["warp_sectors"] = src["warp_sectors"]
            lc["programs"] = src["programs"]
            launches.append(lc)
            configs.setdefault(_cfg_key(lp), lp)
        per_graph.append({"edges": g["edges"], "launches": launches})
    keys = list(configs)
    compiled = dict(zip(keys, run_compile([configs[k] for k in keys], tree, triton_path, workdir, tag)))
    tdir = None
    if triton_path:
        tdir = os.path.join(triton_path, "triton")
    nvdisasm = _bin("nvdisasm", tdir)
    cuobjdump = _bin("cuobjdump", tdir)
    src = SourceLoops()
    sass_cache, res_cache = {}, {}
    # constexprs that differ between configurations of one kernel (for labels)
    byq = collections.defaultdict(list)
    for c in configs.values():
        byq[c["qualname"]].append(c["constexprs"])
    differ = {
        q: sorted(k for k in cs[0] if len({json.dumps(c.get(k)) for c in cs}) > 1 and k != "PREC")
        for q, cs in byq.items()
    }
    rows = collections.OrderedDict()
    notes = set()
    for gi, g in enumerate(per_graph):
        for lc in g["launches"]:
            key = _cfg_key(lc)
            comp = compiled[key]
            label = _label(lc, differ)
            row = rows.setdefault(
                label,
                {
                    "kernel": lc["kernel"],
                    "label": label,
                    "num_warps": None,
                    "per_graph": [collections.Counter() for _ in per_graph],
                    "configs": set(),
                    "constexprs": {k: v for k, v in lc["constexprs"].items() if k != "PREC"},
                },
            )
            row["configs"].add(key)
            if "error" in comp:
                row["error"] = comp["error"]
                continue
            if key not in sass_cache:
                sass_cache[key] = sass_of(comp["cubin"], nvdisasm)
                res_cache[key] = _resources(comp["cubin"], cuobjdump)
            insns = sass_cache[key]
            warps = comp.get("num_warps") or lc["options"].get("num_warps", 4)
            row["num_warps"] = warps
            row.update(res_cache[key])
            paths = {os.path.basename(lc["file"]): lc["file"]}
            for f in _sources_near(lc["file"]):
                paths.setdefault(os.path.basename(f), f)
            ops, n, _ = dynamic_counts(insns, lc["lines"], lc["programs"], paths, src)
            notes.update(f"{lc['kernel']}: {x}" for x in n)
            fig = kernel_figures(ops, warps)
            acc = row["per_graph"][gi]
            for k, v in fig.items():
                acc[k] += v
            acc["programs"] += lc["programs"]
            acc["launches"] += 1
            acc["macs"] += lc["macs"]
            acc["sectors"] += lc["sectors"]
            if "warp_sectors" in lc:
                acc["warp_sectors"] += lc["warp_sectors"]
            acc["useful_bytes"] += lc["useful_bytes"]
    # scale to the full problem
    e0, e1 = per_graph[0]["edges"], per_graph[-1]["edges"]
    if len(per_graph) == 1:
        notes.add(
            f"one graph traced ({e0:,} edges): figures scaled in proportion to the edges (per-step constants scaled "
            "too: an overestimate for kernels with per-program or per-step work)"
        )
    passes = 3 if precision == "tf32x3" else 1
    out_rows = []
    for label, row in rows.items():
        a, b = row["per_graph"][0], row["per_graph"][-1]
        fig = {k: extrapolate(a[k], b[k], e0, e1, full_edges) for k in set(a) | set(b)}
        fig["launches"] = b["launches"]
        t = times(fig)
        tc = fig["tc_macs_mma_sync"] + fig["tc_macs_wgmma"]
        ideal = fig["macs"] * passes
        out_rows.append(
            {
                "label": label,
                "kernel": row["kernel"],
                "constexprs": row["constexprs"],
                "num_warps": row["num_warps"],
                "registers": row.get("registers"),
                "stack_bytes": row.get("stack_bytes"),
                "error": row.get("error"),
                **fig,
                **t,
                "tc_ratio": tc / ideal if ideal and tc else None,
                "ffma_ratio": fig["ffma"] * 32 / fig["macs"] if fig["macs"] and precision == "ieee" else None,
                "efficiency": fig["useful_bytes"] / (SECTOR * fig["sectors"]) if fig["sectors"] else None,
                "at_graphs": {str(g["edges"]): dict(c) for g, c in zip(per_graph, row["per_graph"])},
            }
        )
    return {
        **_summary(problem, precision, full_edges, [g["graph"] for g in ieee], (e0, e1), out_rows),
        "notes": sorted(notes),
        "triton": next((c.get("triton") for c in compiled.values()), None),
    }


STEP_SUMS = ("warp_instructions", "sectors", "warp_sectors", "macs", "t_issue", "t_memory", "t_tensor", "t_bound")


def _summary(problem: str, precision: str, edges: int, graphs: List[str], graph_edges, rows: List[dict]) -> dict:
    """One problem and precision of a model: its kernels' rows and the step's sums of them."""
    return {
        "problem": problem,
        "precision": precision,
        "edges": edges,
        "graphs": graphs,
        "graph_edges": sorted(set(graph_edges)),
        "kernels": rows,
        "step": {k: sum(r.get(k) or 0 for r in rows) for k in STEP_SUMS},
    }


def _sources_near(path: str) -> List[str]:
    d = os.path.dirname(path)
    return [os.path.join(d, f) for f in os.listdir(d) if f.endswith(".py")]


def _resources(cubin: str, cuobjdump: str) -> dict:
    try:
        out = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
    except OSError:
        return {}
    res = {}
    for key, field in (("REG", "registers"), ("STACK", "stack_bytes"), ("SHARED", "shared_bytes")):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m:
            res[field] = int(m.group(1))
    return res


# ----------------------------------------------------------------------------------------------------------------
# the native CUDA backend (coarse): replayed work and traffic, no per-loop SASS
# ----------------------------------------------------------------------------------------------------------------
FFMA_MACS_PER_S = SMS * ISSUE_PER_CLOCK * 32 * CLOCK  # one FFMA warp-instruction (32 multiply-adds) per issue slot
# the replay's stages (tests/tools/emulate_check.py) -> the native kernel that runs them; "cuBLAS": ATen's GEMMs
NATIVE_STAGES = {
    "trunk forward (statistics passes)": "ik_trunk_forward_kernel (statistics passes)",
    "trunk forward (conv)": "ik_trunk_forward_kernel (conv)",
    "trunk forward (backward's recompute)": "ik_trunk_forward_kernel (backward's recompute)",
    "Z kernel": "ik_contract_z_kernel",
    "W' pair GEMMs + bias row": "cuBLAS: W' pair GEMMs + bias row",
    "edge backward": "ik_contract_edge_backward_kernel",
    "activation backward kernels": "ik_*_backward_kernel (activations)",
    "trunk Linear gradients (cuBLAS)": "cuBLAS: trunk Linear gradients",
}
FFMA_ONLY_STAGES = {"Z kernel"}  # ik_contract_z_kernel has no tensor-core path (FFMA micro-tiles in every precision)
NATIVE_METHOD = (
    "coarse lower bound per native kernel: multiply-adds from the NumPy replay of the native step "
    "(tests/tools/emulate_check.py count_step: block_mm at its padded micro-tiles, TF32 at 16 x 16 x 8 warp tiles, the "
    "Z kernel per warp and 16-edge batch, cuBLAS at its shapes); issue = the FFMA (IEEE; the Z kernel in every "
    "precision; 32 multiply-adds each) or HMMA (TF32 m16n8k8, three per product in 3xTF32) warp-instructions those "
    "imply, divided by their largest share in any one region (a loop's own instructions, or the straight-line code) "
    "of the kernel's sm_90 SASS (csrc/cuda by nvcc with -DIK_FAST_3XTF32), at 132 SMs x 4 per clock x 1.98 GHz; "
    "tensor = the TF32 multiply-adds at the mma.sync rate (half the wgmma peak), cuBLAS's at wgmma (IEEE cuBLAS and "
    "cuBLAS under 'highest': FFMA issue only); L2 sectors: each operand element read or written once (contiguous rows "
    "at 32 B a sector, the layer weights once per trunk tile), the contraction's gathers per staged row in distinct "
    "sectors (h through the plan's hidden order, x through its column permutation, h / dG in the edge backward); "
    "per kernel the largest of the three; ATen's passes (moments, scalings, permutes) and launch gaps not counted"
)


def _row_sectors(cols: np.ndarray, row_elems: int) -> float:
    """Mean distinct 32-byte sectors of one row's gather ``base + cols`` (4-byte elements) over the row bases'
    alignments (``row_elems`` elements a row)."""
    cols = np.asarray(cols, dtype=np.int64)
    if cols.size == 0:
        return 0.0
    shifts = {(r * row_elems) % 8 for r in range(8)}
    return float(np.mean([np.unique((cols + s) // 8).size for s in shifts]))


class NativeTraffic:
    """Wraps the replay's kernels and GEMMs (module attributes of emulate_check) and sums their sectors per stage."""

    def __init__(self, ec):
        self.ec = ec
        self.sectors = collections.Counter()
        self.th = None  # the Z kernel's tile rows (its template argument)
        self._undo = []

    def add(self, n: float) -> None:
        self.sectors[self.ec.STAGE] += n

    def wrap(self, name: str, count) -> None:
        orig = getattr(self.ec, name)

        def wrapper(*a, **k):
            out = orig(*a, **k)
            count(out, *a, **k)
            return out

        setattr(self.ec, name, wrapper)
        self._undo.append(lambda: setattr(self.ec, name, orig))

    def __enter__(self):
        sec = lambda n: n * 4 / SECTOR  # noqa: E731  (contiguous float32 elements)

        def layer_elems(L) -> int:
            n = sum(v.size for k, v in L.items() if isinstance(v, np.ndarray) and k != "w")
            return n + (sum(v.size for v in L["bn"].values() if isinstance(v, np.ndarray)) if L.get("bn") else 0)

        def trunk(out, inp, in_map, layers, outa, saves, be, *rest):
            blocks = -(-inp.shape[0] // be)
            saved = sum(t.size for pair in saves for t in pair if t is not None)
            self.add(sec(inp.size + outa.size + saved) + blocks * sec(sum(layer_elems(L) for L in layers)))

        def act_bw(out, y, dh, L):
            outs = out if isinstance(out, tuple) else (out,)
            self.add(sec(y.size + dh.size + sum(o.size for o in outs if o is not None)))

        def z(out, h, h_map, s, x, src, rowptr, Z, r0, nr, H, C, dp):
            self.th = dp["th"]
            deg = np.diff(rowptr[r0 : r0 + nr + 1]).astype(np.float64)
            per_edge = 0.0
            for hrow, nh, _ld, pcol, nc, _zoff in dp["tiles"]:
                hs = _row_sectors(dp["hidden"][hrow : hrow + nh], H) if hrow >= 0 else 0.0
                per_edge += hs + _row_sectors(dp["perm"][pcol : pcol + nc], C) + 2 * sec(1)  # (+ s, src)
            self.add(deg.sum() * per_edge + sec(Z.size))

        def edge(out, dZ, h, s, x, src, rowptr, tile_ptr, dG, gz, dxe, r0, r1, H, C, te, hb, n_blocks, dp):
            edges = float(rowptr[r1] - rowptr[r0])
            per_edge = 2 * _row_sectors(np.arange(C), C) + 2 * sec(1)  # x row in, dxe row out, s, src
            for hoff, nh, _poff, _lq, _zoff in dp["groups"]:
                for j0 in range(0, nh, hb):
                    hc = min(hb, nh - j0)
                    if hoff >= 0:  # h in, dG out: the group's hidden units
                        per_edge += 2 * _row_sectors(dp["hidden"][hoff + j0 : hoff + j0 + hc], H)
            tiles = float(tile_ptr[r1] - tile_ptr[r0])
            self.add(edges * per_edge + tiles * sec(dZ.shape[1]))  # each tile reads its receiver's dZ once

        def gemm(out, a, b):
            size = lambda t: int(t.numel()) if hasattr(t, "numel") else int(np.size(t))  # noqa: E731
            self.add(sec(size(a) + size(b) + size(out)))

        self.wrap("trunk_forward_kernel", trunk)
        for name in ("fourier_backward_kernel", "elu_backward_kernel", "irrep_act_backward_kernel"):
            self.wrap(name, act_bw)
        self.wrap("z_kernel", z)
        self.wrap("edge_kernel", edge)
        self.wrap("gemm", gemm)
        return self

    def __exit__(self, *exc):
        while self._undo:
            self._undo.pop()()
        return False


def _emulate_check():
    import importlib.util

    if "_gm_emulate_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "_gm_emulate_check", os.path.join(ROOT, "tests", "tools", "emulate_check.py")
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_gm_emulate_check"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["_gm_emulate_check"]


# the replay's stages that run one native kernel: (mangled-name pattern, {precision: template argument TC})
NATIVE_SASS = {
    "trunk forward (statistics passes)": r"ik_trunk_forward_kernelIfLi{tc}E",
    "trunk forward (conv)": r"ik_trunk_forward_kernelIfLi{tc}E",
    "trunk forward (backward's recompute)": r"ik_trunk_forward_kernelIfLi{tc}E",
    "activation backward kernels": r"ik_fourier_elu_backward_kernelIfLi{tc}E",
    "Z kernel": r"ik_contract_z_kernelIfLi{th}E",
    "edge backward": r"ik_contract_edge_backward_kernelIfLi{tc}E",
}
NATIVE_TC = {"ieee": 0, "tf32": 1, "tf32x3": 2}  # common.cuh's GemmMode
HMMA_MACS = 16 * 8 * 8  # mma.sync.m16n8k8 (TF32)


def native_sass(workdir: str) -> Dict[str, List[dict]]:
    """The native kernels' SASS for sm_90 (csrc/cuda/*.cu by nvcc with the extension's flags and -DIK_FAST_3XTF32, so
    that the 3xTF32 instantiations exist too), by mangled name; cached in ``workdir``. {} without nvcc."""
    import glob

    cc = _compile_check()
    cache = os.path.join(workdir, "native-sass.json")
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    try:
        nvcc = cc._nvcc()
    except FileNotFoundError:
        return {}
    out = {}
    for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        obj = os.path.join(workdir, os.path.basename(src) + ".o")
        if not os.path.exists(obj):  # (an object already in the workdir is taken as it is)
            cmd = cc.nvcc_command(nvcc, src, obj, [90])
            cmd.insert(2, "-DIK_FAST_3XTF32")
            if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
                continue
        xdir = os.path.join(workdir, os.path.basename(src) + ".cubins")
        os.makedirs(xdir, exist_ok=True)
        subprocess.run([_bin("cuobjdump"), "-xelf", "all", obj], cwd=xdir, capture_output=True)
        for cubin in glob.glob(os.path.join(xdir, "*.cubin")):
            text = subprocess.run([_bin("nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
            parts = re.split(r"^\.text\.(\S+):\s*$", text, flags=re.M)
            for name, body in zip(parts[1::2], parts[2::2]):
                out[name] = parse_sass(body)
    with open(cache, "w") as f:
        json.dump(out, f)
    return out


def mma_density(insns: List[dict], op: str) -> Optional[float]:
    """The largest share of ``op`` (FFMA, HMMA) among the instructions of one region of the kernel: a SASS loop's own
    instructions (those in no nested loop) or the straight-line code. Every execution of a region's body issues all
    its instructions (branches inside it aside), so N such instructions take at least N / density issue slots."""
    ls = loops(insns)
    own = collections.defaultdict(list)
    for it in insns:
        own[innermost_loop(it["addr"], ls)].append(it)
    best = None
    for its in own.values():
        n = sum(it["op"].startswith(op) for it in its)
        if n and (best is None or n / len(its) > best):
            best = n / len(its)
    return best


def native_counts(graph: str) -> dict:
    """One replayed native training step on ``graph``: {edges, stages: {stage: {macs, macs_tf32, sectors}}}."""
    ec = _emulate_check()
    _, args = ec.step_args(graph)
    with NativeTraffic(ec) as tr:
        macs = ec.count_step(args)
    stages = {}
    for st in set(macs) | set(tr.sectors):
        m = macs.get(st, [0, 0])
        stages[st] = {"macs": m[0], "macs_tf32": m[1], "sectors": tr.sectors.get(st, 0.0)}
    return {"graph": graph, "edges": int(args[1].shape[0]), "stages": stages, "th": tr.th}


def native_model(problem: str, precisions: List[str], graphs=None, sass: Optional[Dict] = None) -> List[dict]:
    """The coarse model of the native backend (:data:`NATIVE_METHOD`) for each precision, extrapolated in the edges
    from two graphs (per-step constants drop out); ``sass``: :func:`native_sass` (issue from the replayed FFMA / HMMA
    only without it)."""
    from ik_fast.tools.problems import get_problem
    from ik_fast.tools.workcount import graph_sizes

    p = get_problem(problem)
    full = p.nodes * p.k
    runs = [native_counts(g) for g in (graphs or graph_sizes(problem))]
    a, b = runs[0], runs[-1]
    e0, e1 = a["edges"], b["edges"]
    out = []
    for prec in precisions:
        rows = []
        for st in sorted(set(a["stages"]) | set(b["stages"])):
            fig = {}
            for k in ("macs", "macs_tf32", "sectors"):
                v0, v1 = a["stages"].get(st, {}).get(k, 0), b["stages"].get(st, {}).get(k, 0)
                fig[k] = extrapolate(v0, v1, e0, e1, full)
            cublas = "cuBLAS" in NATIVE_STAGES.get(st, st)
            tc = prec != "ieee" and st not in FFMA_ONLY_STAGES and not (cublas and prec == "tf32x3")
            passes = 3 if prec == "tf32x3" else 1
            if not tc:  # FFMA: 32 multiply-adds a warp-instruction
                op, n_op, t_tensor = "FFMA", fig["macs"] / 32, 0.0
            elif cublas:  # wgmma: issue not counted
                op, n_op, t_tensor = None, 0.0, fig["macs"] / TF32_PEAK_MACS
            else:
                op, n_op = "HMMA", passes * fig["macs_tf32"] / HMMA_MACS
                t_tensor = passes * fig["macs_tf32"] / (TF32_PEAK_MACS * MMA_SYNC_SHARE)
            kernel, density = None, None
            if sass and st in NATIVE_SASS and op:
                pat = re.compile(NATIVE_SASS[st].format(tc=NATIVE_TC[prec] if tc else 0, th=b.get("th")))
                kernel = next((k for k in sass if pat.search(k)), None)
                density = mma_density(sass[kernel], op) if kernel else None
            warp_instr = n_op / density if density else n_op
            t_issue = warp_instr / (SMS * ISSUE_PER_CLOCK * CLOCK)
            t_mem = fig["sectors"] * SECTOR / L2_BW
            rows.append(
                {
                    "label": NATIVE_STAGES.get(st, st),
                    "stage": st,
                    **fig,
                    "mma_op": op,
                    "mma_instructions": n_op,
                    "sass_function": kernel,
                    "mma_density": density,
                    "warp_instructions": warp_instr,
                    "t_issue": t_issue,
                    "t_tensor": t_tensor,
                    "t_memory": t_mem,
                    "t_bound": max(t_issue, t_tensor, t_mem),
                    "at_graphs": {str(r["edges"]): r["stages"].get(st) for r in runs},
                }
            )
        out.append(_summary(problem, prec, full, [r["graph"] for r in runs], (e0, e1), rows))
    return out


def native_table(m: dict) -> str:
    lines = [
        f"**native CUDA, {m['problem']} {m['precision']}** (coarse, see the method; E = {m['edges']:,}, extrapolated "
        f"from {' and '.join(f'{e:,}' for e in m['graph_edges'])} edges) — model, not a measurement\n",
        "| kernel | multiply-adds / step | FFMA / HMMA per step | their densest SASS share | warp-instr / step | "
        "issue ms | tensor ms | sectors / step | L2 ms | bound ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(m["kernels"], key=lambda r: -r["t_bound"]):
        op = f"{_e(r['mma_instructions'])} {r['mma_op']}" if r["mma_op"] else "– (wgmma)"
        dens = "–" if r["mma_density"] is None else f"{r['mma_density']:.1%}"
        lines.append(
            f"| {r['label']} | {_e(r['macs'])} | {op} | {dens} | {_e(r['warp_instructions'])} | {_ms(r['t_issue'])} | "
            f"{_ms(r['t_tensor'])} | {_e(r['sectors'])} | {_ms(r['t_memory'])} | {_ms(r['t_bound'])} |"
        )
    s = m["step"]
    lines.append(
        f"| **step** | {_e(s['macs'])} | | | {_e(s['warp_instructions'])} | {_ms(s['t_issue'])} | "
        f"{_ms(s['t_tensor'])} | {_e(s['sectors'])} | {_ms(s['t_memory'])} | **{_ms(s['t_bound'])}** |"
    )
    return "\n".join(lines)


def native_records(models: List[dict], command: str) -> List[dict]:
    from ik_fast import records

    prov = records.provenance("cpu")
    cpu = re.sub(r"\s*\(.*\)", "", prov["device"]["name"])
    name = f"H100 SXM static model (native CUDA, replayed in NumPy), computed on a {os.cpu_count()}-core {cpu}"
    pv = dict(prov, device={"type": "cpu", "name": name})
    out = []
    for m in models:
        base = {
            "edges": m["edges"],
            "graphs": m["graphs"],
            "graph_edges": m["graph_edges"],
            "constants": dict(CONSTANTS, ffma_macs_per_s=FFMA_MACS_PER_S),
            "command": command,
            "what": "model, not a measurement: " + NATIVE_METHOD,
        }
        common = dict(mode="train", precision=m["precision"], prov=pv)
        out.append(
            records.record(
                "model",
                m["problem"],
                "native",
                "step_time_bound",
                m["step"]["t_bound"],
                "s",
                extra={**base, "step": m["step"]},
                **common,
            )  # fmt: skip
        )
        for r in m["kernels"]:
            out.append(
                records.record(
                    "model",
                    m["problem"],
                    "native",
                    "kernel_time_bound",
                    r["t_bound"],
                    "s",
                    extra={**base, **{k: v for k, v in r.items() if k != "label"}, "kernel": r["label"]},
                    **common,
                )  # fmt: skip
            )
    return out


# ----------------------------------------------------------------------------------------------------------------
# calibration against the committed prediction (GPU-PREDICTION.md, main at 606a722, Triton 3.6)
# ----------------------------------------------------------------------------------------------------------------
PREDICTION_COMMIT = "606a722"
# warp-instructions per step (tables 3.1 and 3.2: "SASS x trips"), per (problem, precision, kernel)
PREDICTED_WARP_INSTR = {
    ("M", "ieee"): {
        "stats K=1": 3.71e9,
        "stats K=2": 7.12e9,
        "contract_forward_kernel": 6.0e8,
        "contract_dhs_kernel": 5.6e8,
        "trunk_backward_kernel": 2.02e10,
        "contract_dx_kernel": 5.9e8,
        "contract_wgrad_kernel": 5.2e8,
    },
    ("M", "tf32"): {
        "stats K=1": 1.73e9,
        "stats K=2": 3.27e9,
        "contract_forward_kernel": 4.1e8,
        "contract_dhs_kernel": 3.8e8,
        "trunk_backward_kernel": 1.48e10,
        "contract_dx_kernel": 4.2e8,
        "contract_wgrad_kernel": 3.1e8,
    },
    ("H", "ieee"): {
        "stats K=1": 5.05e9,
        "stats K=2": 8.24e9,
        "contract_forward_kernel": 2.74e9,
        "contract_dhs_kernel": 2.55e9,
        "trunk_backward_kernel": 1.45e10,
        "contract_dx_kernel": 2.69e9,
        "contract_wgrad_kernel": 2.37e9,
    },
    ("H", "tf32"): {
        "stats K=1": 1.99e9,
        "stats K=2": 3.23e9,
        "contract_forward_kernel": 1.80e9,
        "contract_dhs_kernel": 1.70e9,
        "trunk_backward_kernel": 4.81e9,
        "contract_dx_kernel": 1.90e9,
        "contract_wgrad_kernel": 1.34e9,
    },
}
# L2 sectors per step of the contraction kernels (appendix B), per (problem, kernel)
PREDICTED_SECTORS = {
    "M": {
        "contract_forward_kernel": 0.37e9,
        "contract_dhs_kernel": 0.49e9,
        "contract_dx_kernel": 0.49e9,
        "contract_wgrad_kernel": 0.27e9,
    },
    "H": {
        "contract_forward_kernel": 2.06e9,
        "contract_dhs_kernel": 2.76e9,
        "contract_dx_kernel": 2.79e9,
        "contract_wgrad_kernel": 1.55e9,
    },
}


def _pred_name(row: dict) -> str:
    if row["kernel"] == "fused_stats_kernel":
        return f"stats K={row['constexprs'].get('K')}"
    return row["kernel"]


def calibration(models: List[dict]) -> List[dict]:
    """Model / prediction per kernel: warp-instructions (IEEE and TF32) and contraction sectors."""
    rows = []
    for m in models:
        pw = PREDICTED_WARP_INSTR.get((m["problem"], m["precision"]), {})
        ps = PREDICTED_SECTORS.get(m["problem"], {}) if m["precision"] == "ieee" else {}
        for r in m["kernels"]:
            name = _pred_name(r)
            for what, pred, got in (
                ("warp-instructions", pw.get(name), r["warp_instructions"]),
                ("sectors per block access", ps.get(name), r["sectors"]),
                ("sectors per warp instruction", ps.get(name), r.get("warp_sectors")),
            ):
                if pred and got is not None:
                    rows.append(
                        {
                            "problem": m["problem"],
                            "precision": m["precision"],
                            "kernel": name,
                            "what": what,
                            "predicted": pred,
                            "model": got,
                            "ratio": got / pred,
                            "triton": m["triton"],
                        }
                    )
    return rows


def calibration_table(rows: List[dict]) -> str:
    lines = [
        "| problem | precision | kernel | quantity | prediction | model | model / prediction |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flag = "" if abs(r["ratio"] - 1) <= 0.3 else " **(outside ±30%)**"
        lines.append(
            f"| {r['problem']} | {r['precision']} | {r['kernel']} | {r['what']} | {r['predicted']:.3g} | "
            f"{r['model']:.3g} | {r['ratio']:.2f}{flag} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------------
def _e(v) -> str:
    return "–" if v is None else f"{v:.3g}"


def _ms(v) -> str:
    return "–" if v is None else f"{v * 1e3:.2f}"


def table(m: dict) -> str:
    head = (
        f"**{m['problem']} {m['precision']}** (Triton {m['triton']}; E = {m['edges']:,}, extrapolated from "
        f"{' and '.join(f'{e:,}' for e in m['graph_edges'])} edges) — model, not a measurement\n\n"
        "| kernel | warps | regs / stack | warp-instr / step | FFMA share | MMA vs ideal | sectors / step (block "
        "access) | efficiency | sectors / step (warp instr.) | issue ms | L2 ms | tensor ms | bound ms |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]

    def pct(v, fmt="{:.0%}"):
        return "–" if v is None else fmt.format(v)

    for r in sorted(m["kernels"], key=lambda r: -r["t_bound"]):
        regs = "–" if r.get("registers") is None else f"{r['registers']} / {r.get('stack_bytes', 0)}"
        ffma = r["ffma"] / r["warp_instructions"] if r["warp_instructions"] else None
        lines.append(
            f"| {r['label']} | {r['num_warps']} | {regs} | {_e(r['warp_instructions'])} | {pct(ffma)} | "
            f"{pct(r['tc_ratio'], '{:.2f}×')} | {_e(r['sectors'])} | {pct(r['efficiency'])} | "
            f"{_e(r.get('warp_sectors'))} | "
            f"{_ms(r['t_issue'])} | {_ms(r['t_memory'])} | {_ms(r['t_tensor'])} | {_ms(r['t_bound'])} |"
        )
    s = m["step"]
    lines.append(
        f"| **step** | | | {_e(s['warp_instructions'])} | | | {_e(s['sectors'])} | | {_e(s.get('warp_sectors'))} | "
        f"{_ms(s['t_issue'])} | "
        f"{_ms(s['t_memory'])} | {_ms(s['t_tensor'])} | **{_ms(s['t_bound'])}** |"
    )
    return "\n".join(lines)


def model_records(models: List[dict], command: str, device_name: str) -> List[dict]:
    from ik_fast import records

    prov = records.provenance("cpu")
    prov = dict(prov, device={"type": "cpu", "name": device_name})
    prov["stack"] = dict(prov["stack"])
    out = []
    for m in models:
        stack = dict(prov["stack"], triton=m["triton"])
        pv = dict(prov, stack=stack)
        common = dict(mode="train", precision=m["precision"], prov=pv)
        base = {
            "edges": m["edges"],
            "graphs": m["graphs"],
            "graph_edges": m["graph_edges"],
            "constants": CONSTANTS,
            "command": command,
            "what": "model, not a measurement: lower-bound step time on an H100 = sum over kernels of "
            "max(issue, L2 sectors, tensor core)",
        }
        out.append(
            records.record(
                "model",
                m["problem"],
                "triton",
                "step_time_bound",
                m["step"]["t_bound"],
                "s",
                extra={**base, "step": m["step"], "notes": m["notes"]},
                **common,
            )
        )
        for r in m["kernels"]:
            ex = {k: v for k, v in r.items() if k not in ("label", "kernel")}
            ex["kernel_name"] = r["kernel"]
            out.append(
                records.record(
                    "model",
                    m["problem"],
                    "triton",
                    "kernel_time_bound",
                    r["t_bound"] if r.get("error") is None else None,
                    "s",
                    extra={**base, **ex, "kernel": r["label"]},
                    error=r.get("error"),
                    **common,
                )
            )
    return out


def calibration_records(rows: List[dict], command: str, device_name: str) -> List[dict]:
    from ik_fast import records

    if not rows:
        return []
    prov = records.provenance("cpu")
    out = []
    for r in rows:
        pv = dict(prov, device={"type": "cpu", "name": device_name}, stack=dict(prov["stack"], triton=r["triton"]))
        out.append(
            records.record(
                "model",
                r["problem"],
                "triton",
                "calibration_ratio",
                r["ratio"],
                "1",
                mode="train",
                precision=r["precision"],
                prov=pv,
                extra={
                    "kernel": r["kernel"],
                    "quantity": r["what"],
                    "predicted": r["predicted"],
                    "model": r["model"],
                    "prediction": f"GPU-PREDICTION.md (main at {PREDICTION_COMMIT}, Triton 3.6): tables 3.1, 3.2 and "
                    "appendix B",
                    "command": command,
                },
            )
        )
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--trace-child":
        graphs, precision, out = argv[1].split(","), argv[2], argv[3]
        res = trace(graphs, precision, execute="--execute" in argv)
        with open(out, "w") as f:
            json.dump(res, f)
        return 0
    if argv and argv[0] == "--compile-child":
        with open(argv[1]) as f:
            configs = json.load(f)
        res = compile_configs(configs, argv[2])
        with open(argv[3], "w") as f:
            json.dump(res, f)
        return 0
    ap = argparse.ArgumentParser(prog="python benchmarks/gpu_model.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", default="M,H")
    ap.add_argument("--precision", default="ieee,tf32")
    ap.add_argument("--graphs", default=None, help="two graphs per problem, e.g. 'M@40,M@80;H@32,H@64'")
    ap.add_argument(
        "--triton",
        default="3.9",
        help="Triton versions to compile with, comma separated: VERSION (this environment's) or VERSION=PATH "
        "(a --target install, e.g. 3.6=/tmp/tri36)",
    )
    ap.add_argument(
        "--backends",
        default="triton,native",
        help="triton (SASS x trip counts) and/or native (the coarse model of the native CUDA kernels: replayed "
        "multiply-adds and sectors, this tree only)",
    )
    ap.add_argument("--tree", default=ROOT, help="the source tree whose kernels are modelled (default: this one)")
    ap.add_argument("--workdir", default=None, help="keep traces and cubins here (reused when present)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--name", default=None, help="also write benchmarks/results/model/<device>/<date>-NAME.json")
    ap.add_argument("--markdown", default=None, help="write the tables to this file")
    ap.add_argument(
        "--calibrate",
        action="store_true",
        help=f"compare with the committed prediction (GPU-PREDICTION.md, made on {PREDICTION_COMMIT} with Triton 3.6; "
        f"run with --tree on a checkout of {PREDICTION_COMMIT})",
    )
    args = ap.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="gpu_model-")
    os.makedirs(workdir, exist_ok=True)
    tree = os.path.abspath(args.tree)
    graphs = {}
    if args.graphs:
        for part in args.graphs.split(";"):
            pair = part.split(",")
            graphs[pair[0].partition("@")[0]] = pair
    backends = args.backends.split(",")
    models, natives = [], []
    if "native" in backends and tree == ROOT:
        sass = native_sass(workdir)
        if not sass:
            print("# native: no nvcc / no SASS: issue from the replayed FFMA / HMMA alone", file=sys.stderr)
        for problem in args.problems.split(","):
            t = time.time()
            pair = graphs.get(problem)
            ms = native_model(problem, args.precision.split(","), pair, sass)
            natives += ms
            for m in ms:
                print(native_table(m), "\n", flush=True)
            print(f"# native {problem}: {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    for tv in args.triton.split(",") if "triton" in backends else []:
        version, _, tpath = tv.partition("=")
        for problem in args.problems.split(","):
            for prec in args.precision.split(","):
                t = time.time()
                m = model(problem, prec, tree, tpath or None, workdir, f"t{version}", graphs=graphs.get(problem))
                if "skipped" in m:
                    print(f"# {problem} {prec}: skipped ({m['skipped']})", file=sys.stderr, flush=True)
                    continue
                models.append(m)
                print(table(m), "\n", flush=True)
                print(f"# {problem} {prec} Triton {m['triton']}: {time.time() - t:.0f} s", file=sys.stderr, flush=True)
                for n in m["notes"]:
                    print(f"#   note: {n}", file=sys.stderr)
    cal = calibration(models) if args.calibrate else []
    if cal:
        print(calibration_table(cal))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n\n".join([table(m) for m in models] + [native_table(m) for m in natives]) + "\n")
            if cal:
                f.write("\n" + calibration_table(cal) + "\n")
    if args.json or args.name:
        from ik_fast import records

        if "IK_FAST_COMMIT" not in os.environ:
            # the records name the modelled tree's commit (the installed ik_fast, which would name its own, may be
            # another checkout's: this script run from a clone beside an editable install)
            head = subprocess.run(["git", "-C", tree, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
            status = subprocess.run(
                ["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
            ).stdout
            if head.strip():
                os.environ["IK_FAST_COMMIT"] = head.strip()
                os.environ["IK_FAST_DIRTY"] = "1" if status.strip() else "0"
        cpu = records.provenance("cpu")["device"]["name"]
        cpu = re.sub(r"\s*\(.*\)", "", cpu)
        command = "python benchmarks/gpu_model.py " + " ".join(argv)
        recs = []
        for tv in sorted({m["triton"] for m in models}):
            dev = f"H100 SXM static model (sm_90 SASS, Triton {tv}), computed on a {os.cpu_count()}-core {cpu}"
            recs += model_records([m for m in models if m["triton"] == tv], command, dev)
            recs += calibration_records([c for c in cal if c["triton"] == tv], command, dev)
        recs += native_records(natives, command)
        from ik_fast.tools.workcount import _save

        for p in _save(recs, args.json, args.name, "model"):
            print(f"records: {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
