"""Counted work of one training step: the multiply-adds a backend's kernels execute, next to the structured floor.

Three counts come from *executing* a step, never from a model of the kernels:

* every ``tl.dot`` of every Triton kernel, at the padded shape of its operand blocks (``M x N x K`` per program
  instance), counted by wrapping the Triton interpreter's ``create_dot`` (so the step must run under
  ``TRITON_INTERPRET=1`` on CPU tensors; see :func:`interpreting`);
* every host-side GEMM (``aten::mm``, ``addmm``, ``bmm``, ``baddbmm``, convolutions), from ``torch.profiler``'s FLOPs
  (``with_flops=True``, FLOPs / 2 = multiply-adds); the profiler sees inside custom ops' Python implementations;
* the ``aten::`` events ``torch.profiler`` records for the step, nested ones included, except the copies the Triton
  interpreter itself makes around each launch (a GPU launch makes none): each interpreted launch runs inside a
  ``triton::<kernel>`` profiler range and the ``aten::`` events below such a range are reported apart.

Kernels are found by their launches, not by name: every launch of an interpreted ``@triton.jit`` function (any
module) is recorded with its grid, and :func:`triton_kernels` lists the jitted functions of the modules
``ik_fast.kernels_triton.*`` so that a kernel never launched by the step shows up too.

The structured floor (docs/design.md, "The work model") per edge of one training step, with C channels of D hidden
components, G grid points, ``n_layers`` layers (``n_layers - 1`` hidden layers) and C_in input components, read from
the lowered program (:class:`ik_fast.spec.program.KernelProgram`), not from the problem's name::

    felu = 2 C D G;  trunk = (n_layers-1) felu + (n_layers-2) C^2 D + 8 C D;  fwd = trunk + C D C_in
    floor = 3 fwd + trunk

The per-edge *slope* between two graphs of the same degree (:func:`slope`) removes per-step constants (weight
gradients, statistics merges, W' contractions per receiver block when the receiver count scales with the edges
anyway).

``python -m ik_fast.tools.workcount --json OUT.json`` (and ``benchmarks/count_work.py``) writes the counts as records
(:mod:`ik_fast.records`, kind ``work``; :func:`work_records`), per problem and provider: ``macs_per_edge`` (the
slope, with the floor, the ratio and both graphs' counts per kernel in ``extra``; no value under ``--aten-only``),
``aten_ops`` (the smaller graph's count, both graphs' in ``extra.aten_ops_at_edges``) and, with ``--cached``,
``aten_ops_cached``. Under the interpreter the device is named ``<CPU> (<n> threads), Triton interpreter``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
import time
from collections import defaultdict
from dataclasses import replace
from typing import Dict, List

import torch

from ik_fast.tools.cases import floor_per_edge, floor_terms, program_sizes  # noqa: F401  (the floor, counted against)

__all__ = [
    "floor_terms",
    "program_sizes",
    "floor_per_edge",
    "interpreting",
    "DotCounter",
    "triton_kernels",
    "profile_step",
    "count_step",
    "slope",
    "graph_sizes",
    "work_table",
    "work_records",
    "slope_rows",
    "GEMM_OPS",
    "main",
]

# profiler events whose FLOPs are GEMMs (with_flops also reports aten::mul / aten::add, which are not multiply-adds
# of a GEMM and are left out)
GEMM_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::addbmm",
    "aten::conv1d",
    "aten::conv2d",
    "aten::conv3d",
    "aten::convolution",
    "aten::_convolution",
)
LAUNCH_PREFIX = "triton::"
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")  # compile options a launch may pass


# ----------------------------------------------------------------------------------------------------------------
# the structured floor
# ----------------------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------------------
# counting tl.dot in the interpreter
# ----------------------------------------------------------------------------------------------------------------
def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _macs(a_shape, b_shape) -> int:
    """Multiply-adds of a (batched) dot of blocks a (..., M, K) and b (..., K, N): M N K per batch element."""
    n = 1
    for s in a_shape:
        n *= int(s)
    return n * int(b_shape[-1])


class DotCounter:
    """Context manager counting, per launched kernel, the launches, program instances, ``tl.dot`` calls and their
    multiply-adds at the padded block shapes, while Triton's interpreter runs them.

    ``records`` keeps one entry per launch (kernel, module, grid, bound arguments when ``keep_args``) for tools that
    need the launch configurations (``benchmarks/compile_check.py``). ``execute=False`` records the launches without
    running the kernels (their outputs are left as they are: only for capturing launch configurations, which the host
    derives from the graph and the program, not from kernel results)."""

    def __init__(self, keep_args: bool = False, profile_ranges: bool = True, execute: bool = True):
        self.keep_args = keep_args
        self.execute = execute
        self.profile_ranges = profile_ranges
        self.kernels: Dict[str, Dict[str, int]] = defaultdict(
            lambda: {"launches": 0, "programs": 0, "dots": 0, "macs": 0, "seconds": 0.0}
        )
        self.dot_shapes: Dict[str, Dict[tuple, int]] = defaultdict(lambda: defaultdict(int))
        self.records: List[dict] = []
        self._current: List[str] = []
        self._undo = []

    @property
    def macs(self) -> int:
        return sum(k["macs"] for k in self.kernels.values())

    def __enter__(self):
        if not interpreting():
            raise RuntimeError(
                "DotCounter counts tl.dot in Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported"
            )
        from triton.runtime import interpreter as ti

        counter = self
        builder = ti.interpreter_builder
        orig_dot = builder.create_dot  # bound method of the one interpreter builder the semantic calls

        def create_dot(a, b, d, *args, **kwargs):
            name = counter._current[-1] if counter._current else "<outside a launch>"
            k = counter.kernels[name]
            k["dots"] += 1
            k["macs"] += _macs(a.data.shape, b.data.shape)
            counter.dot_shapes[name][(tuple(a.data.shape), tuple(b.data.shape))] += 1
            return orig_dot(a, b, d, *args, **kwargs)

        builder.create_dot = create_dot
        self._undo.append(lambda: builder.__dict__.pop("create_dot", None))
        if hasattr(builder, "create_dot_scaled"):
            orig_scaled = builder.create_dot_scaled

            def create_dot_scaled(lhs, lhs_scale, lhs_format, rhs, *args, **kwargs):
                name = counter._current[-1] if counter._current else "<outside a launch>"
                k = counter.kernels[name]
                k["dots"] += 1
                k["macs"] += _macs(lhs.data.shape, rhs.data.shape)
                return orig_scaled(lhs, lhs_scale, lhs_format, rhs, *args, **kwargs)

            builder.create_dot_scaled = create_dot_scaled
            self._undo.append(lambda: builder.__dict__.pop("create_dot_scaled", None))

        IF = ti.InterpretedFunction
        orig_run = IF.run

        def run(fn_self, *args, grid, warmup, **kwargs):
            if warmup:
                return orig_run(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
            fn = fn_self.fn
            name = f"{fn.__module__}.{fn.__qualname__}"
            g = grid
            if callable(g):
                import inspect

                g = g(inspect.getcallargs(fn, *args, **{k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}))
            g = tuple(int(v) for v in g) + (1,) * (3 - len(g))
            k = counter.kernels[name]
            k["launches"] += 1
            k["programs"] += g[0] * g[1] * g[2]
            if counter.keep_args:
                import inspect

                opts = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
                bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if k not in opts})
                counter.records.append(
                    {"kernel": name, "fn": fn_self, "grid": g, "args": dict(bound.arguments), "options": opts}
                )
            if not counter.execute:
                return None
            counter._current.append(name)
            t = time.perf_counter()
            ctx = (
                torch.profiler.record_function(LAUNCH_PREFIX + fn.__name__)
                if counter.profile_ranges
                else contextlib.nullcontext()
            )
            try:
                with ctx:
                    return orig_run(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                k["seconds"] += time.perf_counter() - t
                counter._current.pop()

        IF.run = run
        self._undo.append(lambda: setattr(IF, "run", orig_run))
        return self

    def __exit__(self, *exc):
        while self._undo:
            self._undo.pop()()
        return False

    def summary(self) -> Dict[str, dict]:
        return {name: dict(v) for name, v in sorted(self.kernels.items())}


def triton_kernels(package: str = "ik_fast.kernels_triton") -> Dict[str, object]:
    """The ``@triton.jit`` functions defined in the modules of ``package`` (qualified name -> function), compiled
    or interpreted. Helpers called from kernels are jitted too: the ones a step launches are the kernels."""
    try:
        pkg = importlib.import_module(package)
    except Exception:
        return {}
    mods = [pkg]
    for info in pkgutil.walk_packages(getattr(pkg, "__path__", []), package + "."):
        try:
            mods.append(importlib.import_module(info.name))
        except Exception:
            continue
    found = {}
    for mod in mods:
        for obj in vars(mod).values():
            fn = getattr(obj, "fn", None)
            if fn is None or not callable(fn) or not hasattr(obj, "arg_names"):
                continue
            if type(obj).__name__ not in ("JITFunction", "InterpretedFunction") and not hasattr(obj, "run"):
                continue
            if getattr(fn, "__module__", None) != mod.__name__:
                continue
            found[f"{mod.__name__}.{fn.__qualname__}"] = obj
    return found


# ----------------------------------------------------------------------------------------------------------------
# one step under the profiler
# ----------------------------------------------------------------------------------------------------------------
def _inside_launch(ev) -> bool:
    p = ev.cpu_parent
    while p is not None:
        if p.name.startswith(LAUNCH_PREFIX):
            return True
        p = p.cpu_parent
    return False


def profile_step(fn) -> Dict[str, object]:
    """Run ``fn()`` under ``torch.profiler`` (CPU, with FLOPs) and return the host GEMM multiply-adds, the ``aten::``
    event count (nested included; those inside an interpreted Triton launch counted apart) and per-op details."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=False) as prof:
        fn()
    aten = aten_in_launch = 0
    gemm_flops = 0
    per_op: Dict[str, int] = defaultdict(int)
    gemm_per_op: Dict[str, int] = defaultdict(int)
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        if _inside_launch(ev):
            aten_in_launch += 1
            continue
        aten += 1
        per_op[ev.name] += 1
        if ev.name in GEMM_OPS and ev.flops:
            gemm_flops += ev.flops
            gemm_per_op[ev.name] += ev.flops // 2
    return {
        "aten_ops": aten,
        "aten_ops_in_interpreter": aten_in_launch,
        "host_gemm_macs": gemm_flops // 2,
        "aten_per_op": dict(sorted(per_op.items(), key=lambda kv: -kv[1])),
        "host_gemm_macs_per_op": dict(gemm_per_op),
    }


def graph_sizes(problem: str) -> List[str]:
    """The two graphs of a problem's full degree used for the slope: 40 and 80 nodes at k = 32 (M-like), 32 and 64
    at k = 24 (H-like); in general 5k/4 and 5k/2 rounded to a multiple of 8 nodes (so every node has its k nearest
    neighbours). Molecule problems (P): 2 and 4 molecules."""
    from ik_fast.tools.problems import get_problem

    p = get_problem(problem)
    base = p.name.partition("@")[0]
    if p.graph == "qm9":
        return [f"{base}#2", f"{base}#4"]
    n = max(8, -(-(5 * p.k) // 4 // 8) * 8) if p.k else 16
    return [f"{base}@{n}", f"{base}@{2 * n}"]


def _problem(name: str):
    """A problem name, with ``@nodes`` (ik_fast.tools.problems) or ``#molecules`` (molecule graphs) for the graph
    size."""
    from ik_fast.tools.problems import get_problem

    base, hash_, mols = name.partition("#")
    p = get_problem(base)
    if hash_:
        p = replace(p, name=name, molecules=int(mols))
    return p


def _train_step(p, provider: str, seed: int, dtype: str):
    """``step()``: one training step (forward, backward with every gradient) of ``provider`` on problem ``p``. The
    layer gets a fresh copy of the edge index, so its first call prepares a new graph (the graph cache is per tensor)
    and later calls reuse it."""
    from ik_fast.tools.problems import build_inputs, build_layer

    if provider == "escnn":
        from ik_fast.tools.cases import setup_case

        step, rec = setup_case(p.name, provider, "train", device="cpu", dtype=dtype, seed=seed)
        step.nodes, step.edges, step.program = rec["nodes"], rec["edges"], None
        with contextlib.suppress(ValueError):
            step.program = build_layer(p, backend="torch", seed=seed).kernel.program()
        return step
    dt = getattr(torch, dtype)
    x, pos, ei, attr = build_inputs(p, seed=seed, dtype=dt)
    layer = build_layer(p, backend=provider, seed=seed).to(dt)
    layer.train(True)
    edge_index = ei.clone()

    def step(edges=None):
        xs, ps, at = (t.clone().requires_grad_(True) for t in (x, pos, attr))
        out = layer(xs, edge_index if edges is None else edges, edge_attr=at, pos=ps)
        out.backward(torch.ones_like(out))
        return out

    step.warm_up = lambda: step(ei.clone())  # another copy: the counted step still prepares a graph of its own
    step.nodes, step.edges = int(x.shape[0]), int(ei.shape[1])
    step.program = layer.kernel.program()
    return step


def count_step(
    problem: str, provider: str = "triton", seed: int = 0, steps: int = 1, dtype: str = "float32", execute: bool = True
) -> Dict[str, object]:
    """One training step (forward + backward, training mode, so batch statistics included) of ``provider`` on
    ``problem`` (``"M@40"``, ``"P#2"``, ...), on a graph the layer has not seen (graph preparation included),
    counted, after one uncounted step on another copy of the graph (so that the layer's one-time setup, such as an
    implementation's cached block plans, is not counted as a step's work). ``steps`` > 1 runs the step again on the
    same inputs (a cached graph) and reports its aten count as ``aten_ops_cached``; the work is that of the first
    step. ``execute=False`` records the Triton launches without running them: the aten count of the host side in
    seconds, but no tl.dot count (and kernel outputs left unset)."""
    from ik_fast.tools import problems as _problems

    p = _problem(problem)
    if p.name not in _problems.PROBLEMS:  # make the variant known to setup_case
        _problems.PROBLEMS.setdefault(p.name, p)
    if provider == "triton" and not interpreting():
        raise RuntimeError("counting the triton provider needs TRITON_INTERPRET=1 (set before importing triton)")
    step = _train_step(p, provider, seed, dtype)
    out = {"problem": p.name, "provider": provider, "nodes": step.nodes, "edges": step.edges}
    layer_prog = step.program
    if hasattr(step, "warm_up"):  # the layer's one-time setup (an implementation's cached plans, JIT) is not a step's
        with DotCounter(execute=False):
            step.warm_up()
    t = time.perf_counter()
    with DotCounter(execute=execute) as dots:
        prof = profile_step(step)
    out["seconds"] = time.perf_counter() - t
    out.update(
        dot_macs=dots.macs,
        host_gemm_macs=prof["host_gemm_macs"],
        macs=dots.macs + prof["host_gemm_macs"],
        aten_ops=prof["aten_ops"],
        aten_ops_in_interpreter=prof["aten_ops_in_interpreter"],
        kernels=dots.summary(),
        host_gemm_macs_per_op=prof["host_gemm_macs_per_op"],
        aten_top=dict(list(prof["aten_per_op"].items())[:12]),
    )
    for _ in range(1, steps):
        with DotCounter(execute=execute) as again:
            prof2 = profile_step(step)
        out["aten_ops_cached"] = prof2["aten_ops"]
        out["macs_cached"] = again.macs + prof2["host_gemm_macs"]
    if not execute:
        out["dot_macs"] = out["macs"] = None
    if layer_prog is not None:
        out["floor"] = floor_per_edge(layer_prog)
    return out


def slope(small: Dict, large: Dict) -> Dict[str, float]:
    """Per-edge slope of the counted work between two steps, and its ratio to the structured floor."""
    dE = large["edges"] - small["edges"]
    res = {"edges": (small["edges"], large["edges"]), "aten_ops": (small["aten_ops"], large["aten_ops"])}
    for key in ("macs", "dot_macs", "host_gemm_macs"):
        counted = small[key] is not None and large[key] is not None
        res[key + "_per_edge"] = (large[key] - small[key]) / dE if dE and counted else None
    fl = small.get("floor")
    if fl and res["macs_per_edge"] is not None:
        res["floor_per_edge"] = fl["floor"]
        res["ratio_to_floor"] = res["macs_per_edge"] / fl["floor"]
    a, b = small["aten_ops"], large["aten_ops"]
    res["aten_spread"] = abs(b - a) / max(a, b) if max(a, b) else 0.0
    return res


def work_table(rows: List[Dict]) -> str:
    """Markdown table of :func:`slope` results (``rows``: dicts with problem, provider and the slope fields)."""
    head = (
        "| problem | provider | edges | counted MACs / edge (slope) | tl.dot | host GEMM | structured floor / edge "
        "| ratio | aten ops per step |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]

    def n(v):
        return "–" if v is None else f"{v:,.0f}"

    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['provider']} | {r['edges'][0]:,} → {r['edges'][1]:,} | "
            f"{n(r['macs_per_edge'])} | {n(r['dot_macs_per_edge'])} | {n(r['host_gemm_macs_per_edge'])} | "
            f"{n(r.get('floor_per_edge'))} | "
            f"{'–' if r.get('ratio_to_floor') is None else format(r['ratio_to_floor'], '.2f') + '×'} | "
            f"{r['aten_ops'][0]:,} / {r['aten_ops'][1]:,} |"
        )
    return "\n".join(lines)


MACS_WHAT = "multiply-adds per edge of one training step: the slope between two graphs"
ATEN_WHAT = "aten:: events of one training step on a new graph (nested included)"


def _step_details(step: Dict) -> Dict[str, object]:
    keep = (
        "problem",
        "nodes",
        "edges",
        "macs",
        "dot_macs",
        "host_gemm_macs",
        "aten_ops",
        "aten_ops_in_interpreter",
        "aten_ops_cached",
        "macs_cached",
        "kernels",
        "host_gemm_macs_per_op",
        "seconds",
    )
    out = {k: step[k] for k in keep if k in step}
    if step.get("macs") is None:
        out.pop("macs_cached", None)  # launches recorded, not run: host GEMMs alone, not the step's work
    return out


def work_records(
    problem: str, provider: str, s: Dict, steps: List[Dict], prov: Dict, command: str, execute: bool = True, ok=None
) -> List[Dict]:
    """The records (:mod:`ik_fast.records`, kind ``work``) of one problem and provider: :func:`slope` ``s`` of the
    counted ``steps`` (:func:`count_step` of the two graphs); ``ok``: whether they pass ``--check``'s bounds."""
    from ik_fast import records

    edges = list(s["edges"])
    common = dict(mode="train", precision="ieee", prov=prov)
    fl = steps[0].get("floor")
    extra = {
        "edges": edges,
        "nodes": [st["nodes"] for st in steps],
        "graphs": [st["problem"] for st in steps],
        "floor_per_edge": s.get("floor_per_edge"),
        "ratio_to_floor": s.get("ratio_to_floor"),
        "dot_macs_per_edge": s["dot_macs_per_edge"],
        "host_gemm_macs_per_edge": s["host_gemm_macs_per_edge"],
        "floor": fl,
        "steps": [_step_details(st) for st in steps],
        "what": MACS_WHAT,
        "command": command,
    }
    if ok is not None:
        extra["ok"] = ok
        extra["check"] = (
            f"slope at most {RATIO_MAX}x the floor, aten counts within {ATEN_SPREAD:.0%} of each other "
            f"and at most {ATEN_MAX}"
        )
    error = None
    if s["macs_per_edge"] is None:
        error = "run with --aten-only (the Triton launches recorded, not run)" if not execute else "no count"
    out = [
        records.record(
            "work", problem, provider, "macs_per_edge", s["macs_per_edge"], "MAC", extra=extra, error=error, **common
        )
    ]
    aten = {
        "edges": edges[0],
        "aten_ops_at_edges": {str(e): a for e, a in zip(edges, s["aten_ops"])},
        "aten_spread": s["aten_spread"],
        "aten_ops_in_interpreter": [st["aten_ops_in_interpreter"] for st in steps],
        "aten_top": [st.get("aten_top", {}) for st in steps],
        "what": ATEN_WHAT,
        "command": command,
    }
    out.append(records.record("work", problem, provider, "aten_ops", s["aten_ops"][0], "count", extra=aten, **common))
    if all("aten_ops_cached" in st for st in steps):
        counts = {str(e): st["aten_ops_cached"] for e, st in zip(edges, steps)}
        cached = {
            "edges": edges[0],
            "aten_ops_at_edges": counts,
            "command": command,
            "what": "aten:: events of a second training step on the same (cached) graph",
        }
        out.append(
            records.record(
                "work",
                problem,
                provider,
                "aten_ops_cached",
                steps[0]["aten_ops_cached"],
                "count",
                extra=cached,
                **common,
            )
        )
    return out


def slope_rows(recs: List[Dict]) -> List[Dict]:
    """The :func:`slope` rows (problem, provider, macs_per_edge and the slope's fields) of ``work`` records written by
    :func:`work_records`."""
    rows = []
    for r in recs:
        if r["kind"] == "work" and r["metric"] == "macs_per_edge":
            aten = next(
                (
                    a
                    for a in recs
                    if a["metric"] == "aten_ops" and (a["problem"], a["provider"]) == (r["problem"], r["provider"])
                ),
                None,
            )
            row = {"problem": r["problem"], "provider": r["provider"], **r["extra"], "macs_per_edge": r["value"]}
            if aten is not None:
                row["aten_ops"] = list(aten["extra"]["aten_ops_at_edges"].values())
                row["aten_spread"] = aten["extra"]["aten_spread"]
            rows.append(row)
    return rows


def provenance() -> Dict[str, object]:
    """The provenance of a count on this CPU; under the interpreter, the device says so."""
    from ik_fast import records

    prov = records.provenance("cpu")
    if interpreting():
        prov = dict(prov, device={**prov["device"], "name": prov["device"]["name"] + ", Triton interpreter"})
    return prov


# ----------------------------------------------------------------------------------------------------------------
# command line (benchmarks/count_work.py; ik_fast.tools.bench --work runs it in a child under the interpreter)
# ----------------------------------------------------------------------------------------------------------------
ATEN_MAX = 600
ATEN_SPREAD = 0.10
RATIO_MAX = 2.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ik_fast.tools.workcount",
        description="the work of one training step per edge against the structured floor "
        "(TRITON_INTERPRET=1 for the triton provider; see "
        "benchmarks/count_work.py)",
    )
    ap.add_argument("--problems", default="M,H")
    ap.add_argument("--backend", default="triton", help="providers of ik_fast.tools.bench, comma separated")
    ap.add_argument(
        "--sizes", default=None, help="two graphs per problem instead of the defaults, e.g. 'M@40,M@80;H@32,H@64'"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--aten-only",
        action="store_true",
        help="record the Triton launches without running them: aten counts in seconds, no work count",
    )
    ap.add_argument(
        "--cached",
        action="store_true",
        help="also run a second step on the same (cached) graph and report its aten count",
    )
    ap.add_argument(
        "--json",
        default=None,
        help="write the records (ik_fast/records.py, kind work; per kernel counts too) to this file",
    )
    ap.add_argument("--name", default=None, help="also write them to benchmarks/results/work/<device>/<date>-NAME.json")
    ap.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 unless the slope is at most {RATIO_MAX}x the floor and the aten counts are within "
        f"{ATEN_SPREAD:.0%}% of each other and at most {ATEN_MAX}",
    )
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and "triton" in args.backend:
        sys.exit("the triton provider is counted in Triton's interpreter: run with TRITON_INTERPRET=1 (the default)")
    sizes = {}
    if args.sizes:
        for part in args.sizes.split(";"):
            pair = part.split(",")
            sizes[pair[0].partition("@")[0].partition("#")[0]] = pair
    if argv is None and sys.argv[0].endswith(".py"):  # benchmarks/count_work.py
        command = " ".join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    else:
        command = "python -m ik_fast.tools.workcount " + " ".join(sys.argv[1:] if argv is None else argv)
    prov = provenance() if args.json or args.name else None
    records, rows, recs, failed = [], [], [], False
    for problem in args.problems.split(","):
        pair = sizes.get(problem) or graph_sizes(problem)
        for provider in args.backend.split(","):
            steps = []
            for name in pair:
                t = time.time()
                r = count_step(
                    name, provider, seed=args.seed, steps=2 if args.cached else 1, execute=not args.aten_only
                )
                print(
                    f"# {name} {provider}: {r['edges']:,} edges, {r['macs'] or 0:,} MACs "
                    f"(tl.dot {r['dot_macs'] or 0:,}, host GEMM {r['host_gemm_macs']:,}), {r['aten_ops']} aten ops "
                    f"({r.get('aten_ops_cached', '-')} on the cached graph), {time.time() - t:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                for k, v in r["kernels"].items():
                    print(
                        f"#   {k}: {v['launches']} launches, {v['programs']} programs, {v['dots']} dots, "
                        f"{v['macs']:,} MACs",
                        file=sys.stderr,
                    )
                steps.append(r)
            s = slope(*steps)
            row = {"problem": problem, "provider": provider, **s}
            row["ok"] = bool(
                (s.get("ratio_to_floor") or 0) <= RATIO_MAX
                and s["aten_spread"] <= ATEN_SPREAD
                and max(s["aten_ops"]) <= ATEN_MAX
            )
            failed |= not row["ok"]
            rows.append(row)
            records.append({"problem": problem, "provider": provider, "slope": s, "steps": steps})
            if prov is not None:
                recs += work_records(
                    problem, provider, s, steps, prov, command, execute=not args.aten_only, ok=row["ok"]
                )
                _save(recs, args.json, args.name)
    print(work_table(rows))
    for r in records:
        f = r["steps"][0].get("floor")
        if f and r["provider"] == records[0]["provider"]:
            print(
                f"{r['problem']}: C={f['C']} D={f['D']} G={f['G']} C_in={f['C_in']} n_layers={f['n_layers']} "
                f"-> floor {f['floor']:,} MACs/edge (felu {f['felu']:,}, trunk {f['trunk']:,}, fwd {f['fwd']:,})"
            )
    launched = {k for r in records for s in r["steps"] for k in s["kernels"]}
    jitted = sorted(triton_kernels())
    print(
        f"Triton kernels launched: {sorted(launched) or 'none'}; jitted functions of ik_fast.kernels_triton never "
        f"launched (helpers, or kernels this step does not use): {len(set(jitted) - launched)}"
    )
    for path in _save(recs, args.json, args.name) if prov is not None else []:
        print(f"records: {path}", file=sys.stderr)
    return 1 if args.check and failed else 0


def _save(recs: List[Dict], json_out, name, kind: str = "work") -> List[str]:
    """Write ``recs`` to ``json_out`` and, with ``name``, to ``benchmarks/results/<kind>/<device folder of the first
    record>/<date>-<name>.json``; the paths written. (The record-saving tail of the tools that count or model a step:
    this module, :mod:`ik_fast.tools.sectors`, ``benchmarks/gpu_model.py``.)"""
    from ik_fast import records

    paths = [json_out] if json_out else []
    if name and recs:
        root = os.path.join(
            os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks", "results"
        )
        paths.append(os.path.join(root, kind, records.device_slug(recs[0]), f"{recs[0]['date'][:10]}-{name}.json"))
    for path in paths:
        records.write(path, recs)
    return paths


if __name__ == "__main__":
    sys.exit(main())
