"""Global-memory efficiency of the Triton kernels, traced in Triton's interpreter: 32-byte sectors per block access.

Every ``tl.load`` / ``tl.store`` (masked or not, atomics included) that a program instance executes is one *block
access*. Under ``TRITON_INTERPRET=1`` the interpreter's builder receives each access with the addresses of all its
lanes and its mask; :class:`SectorCounter` wraps those builder calls and counts, per access:

* ``useful bytes``: the distinct addresses of the active lanes x element size (lanes that read the same element,
  a broadcast, bring no more data than one; ``lane_bytes``, active lanes x element size, is kept too);
* ``sectors``: the distinct 32-byte segments the active lanes touch, the address taken relative to the start of the
  storage of the tensor argument it falls in (the interpreter copies arguments into host memory that need not be
  32-byte aligned; CUDA allocations are aligned to at least 256 bytes, so the storage-relative segment is the one a
  GPU would touch).

* ``warp_sectors``: the sectors requested **per warp-wide instruction** (:func:`warp_sectors`): the block's elements
  laid on the program's warps as Triton's default blocked layout lays them (:func:`blocked_layout`), each warp's
  step coalesced on its own; the same sector in two warps or two instructions counts twice (an SM's load/store unit
  coalesces one instruction's 32 lanes, not the warps of a program); warps that hold copies of a small block load
  the same sectors with one instruction at once, which the L1 merges into one request, so a copy counts once. This is
  the request stream a GPU's L1 sends on when it holds nothing from earlier instructions, and what the static GPU
  model (``benchmarks/gpu_model.py``) takes for L2 traffic.

Per kernel (found by its launches, as :mod:`ik_fast.tools.workcount` does) the counts are summed over every access of
every program; the *efficiency* is ``useful / (32 x sectors)``: 1.0 when every touched sector is read or written in
full by one access, 0.125 for one 4-byte element per sector. This is the coalescing of one warp-wide (block-wide)
access; what a GPU's L1/L2 then reuses across accesses is not modelled, so ``sectors x 32 B`` is the traffic between
the SMs and L2 that the accesses request.

The per-edge figures are the slope between two graphs of the problem's degree (:func:`ik_fast.tools.workcount.slope`'s
graphs, :func:`ik_fast.tools.workcount.graph_sizes`): per-step constants (weights, statistics) drop out.

``python -m ik_fast.tools.sectors --problems M,H --backend triton [--check 0.5] [--json F] [--name NAME]`` prints the
per-kernel table and writes records (:mod:`ik_fast.records`, kind ``sectors``): per problem, ``efficiency`` (the whole
step's, larger graph), ``sectors_per_edge`` and ``useful_bytes_per_edge`` (slopes), and one ``kernel_efficiency``
record per kernel; ``extra`` holds both graphs' per-kernel and per-site counts. ``--check F`` exits 1 when a kernel's
efficiency at the larger graph is below F.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import numpy as np

from ik_fast.tools.workcount import DotCounter, _problem, _save, _train_step, graph_sizes, interpreting

__all__ = [
    "SectorCounter",
    "access_sectors",
    "blocked_layout",
    "warp_sectors",
    "count_step",
    "slope",
    "sector_table",
    "sector_records",
    "main",
]

SECTOR = 32  # bytes
_FIELDS = ("accesses", "lanes", "lane_bytes", "useful_bytes", "sectors", "warp_sectors")


def _empty():
    return {op: dict.fromkeys(_FIELDS, 0) for op in ("load", "store", "atomic")}


def _sector_keys(a: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The 32-byte sector of each address (uint64), relative to the storage range ``[starts[i], ends[i])`` it falls
    in (``starts`` sorted; the range's index in the key's high bits); an address in no range by its absolute value."""
    if not starts.size:
        return a // np.uint64(SECTOR)
    idx = np.searchsorted(starts, a, side="right").astype(np.int64) - 1
    inside = idx >= 0
    inside[inside] = a[inside] < ends[idx[inside]]
    base = np.where(inside, starts[np.maximum(idx, 0)], np.uint64(0))
    region = np.where(inside, idx + 1, 0).astype(np.uint64)
    return (region << np.uint64(48)) | ((a - base) // np.uint64(SECTOR))


def access_sectors(addresses: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> Tuple[int, int]:
    """``(distinct addresses, distinct 32-byte sectors)`` of ``addresses`` (uint64, the active lanes of one access),
    each address taken relative to the storage range ``[starts[i], ends[i])`` it falls in (``starts`` sorted); an
    address in no range counts by its absolute value."""
    a = np.unique(np.asarray(addresses, dtype=np.uint64).ravel())
    if a.size == 0:
        return 0, 0
    key = _sector_keys(a, starts, ends)
    return int(a.size), int(np.unique(key).size)


def blocked_layout(shape: Tuple[int, ...], num_warps: int, lanes: int = 32) -> List[Tuple[int, int]]:
    """Per dimension ``(lanes, warps)`` of Triton's default blocked layout of a block of ``shape`` (row-major: the last
    dimension fastest), one element per thread per step: the lanes and then the warps are laid along the dimensions
    fastest first, each taking at most the dimension's size, and the slowest dimension takes what is left (it then
    holds copies: replicated lanes or warps). As ``BlockedEncodingAttr``'s builder lays out ``sizePerThread = 1``; a
    vectorised layout (several contiguous elements per thread, one wide instruction) touches the same sectors per
    warp-wide step, so the sector count does not depend on it."""
    rank = len(shape)
    out = [(1, 1)] * rank
    left_lanes, left_warps = lanes, num_warps
    for d in range(rank - 1, 0, -1):
        threads = max(1, min(left_lanes * left_warps, shape[d]))
        tl_ = max(1, min(threads, left_lanes))
        tw = max(1, threads // tl_)
        out[d] = (tl_, tw)
        left_lanes //= tl_
        left_warps //= tw
    out[0] = (left_lanes, left_warps)
    return out


def warp_sectors(
    addresses: np.ndarray, active, starts: np.ndarray, ends: np.ndarray, num_warps: int, copies: bool = True
) -> int:
    """32-byte sectors that one block access requests **per warp-wide instruction**: the block's elements (``addresses``
    shaped as the block, ``active`` its mask broadcast to it or None) assigned to (warp, step) by
    :func:`blocked_layout`, and the distinct sectors of each warp's step summed over the warps and steps, the same
    sector in two warps or two steps counting twice (the requests an SM's load/store unit sends: it coalesces the 32
    lanes of one instruction, not across instructions). Warps holding copies of the block (a block smaller than the
    program's threads) each load their copy (``copies``); Triton predicates the copies off for stores and atomics
    (``copies=False``)."""
    a = np.asarray(addresses, dtype=np.uint64)
    shape = a.shape if a.ndim else (1,)
    a = a.reshape(shape)
    lay = blocked_layout(shape, num_warps)
    inst = np.zeros(shape, dtype=np.int64)  # the instruction id: (warp, step), dimension by dimension
    n_copies = 1
    for d, (n, (tl_, tw)) in enumerate(zip(shape, lay)):
        i = np.arange(n, dtype=np.int64)
        tile = tl_ * tw
        warp, step = (i // tl_) % tw, i // tile
        nsteps = max(1, -(-n // tile))
        n_copies *= max(1, tile // max(n, tl_))
        idx = (warp * nsteps + step).reshape([-1 if k == d else 1 for k in range(len(shape))])
        inst = inst * (tw * nsteps) + idx
    if active is not None:
        m = np.broadcast_to(np.asarray(active, dtype=bool), shape)
        a, inst = a[m], inst[m]
    else:
        a, inst = a.ravel(), inst.ravel()
    if a.size == 0:
        return 0
    key = _sector_keys(a, starts, ends)
    pairs = np.stack([inst.astype(np.uint64), key], axis=1)
    return int(np.unique(pairs, axis=0).shape[0]) * (n_copies if copies else 1)


class SectorCounter(DotCounter):
    """Context manager: per launched kernel, the launches, programs and ``tl.dot`` multiply-adds of
    :class:`~ik_fast.tools.workcount.DotCounter`, plus per kind of access (``load``, ``store``, ``atomic``) the block
    accesses, active lanes, useful bytes and 32-byte sectors; ``sites`` the same per source line of the access
    (``file:line`` of the innermost kernel frame, a jit helper's line where the access sits in a helper)."""

    def __init__(self, sites: bool = True):
        super().__init__(profile_ranges=False)
        self.access: Dict[str, Dict[str, Dict[str, int]]] = defaultdict(_empty)
        self.sites: Dict[str, Dict[str, Dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0, 0]))
        self.with_sites = sites
        self._starts = np.zeros(0, dtype=np.uint64)
        self._ends = np.zeros(0, dtype=np.uint64)
        self._warps: List[int] = []  # the running launch's num_warps (for warp_sectors)

    # the storages of a launch's tensor arguments (host copies), sorted by address
    def _set_ranges(self, args, kwargs):
        ranges = {}

        def visit(a):
            if isinstance(a, (tuple, list)):
                for b in a:
                    visit(b)
                return
            base = getattr(a, "base", None)
            if base is not None and hasattr(base, "data_ptr") and not hasattr(a, "data_ptr"):
                visit(base)  # a tensor descriptor
                return
            if hasattr(a, "untyped_storage"):
                st = a.untyped_storage()
                if st.nbytes():
                    ranges[st.data_ptr()] = st.nbytes()

        visit(list(args))
        visit(list(kwargs.values()))
        starts = sorted(ranges)
        self._starts = np.array(starts, dtype=np.uint64)
        self._ends = np.array([s + ranges[s] for s in starts], dtype=np.uint64)

    def _site(self) -> str:
        """``file:line`` of the access in the kernel's source, through the jit helpers it sits in (innermost first,
        ``<`` before each call site up to the kernel's own line)."""
        import triton

        tdir = os.path.dirname(os.path.abspath(triton.__file__)) + os.sep
        kernel = self._current[-1].rpartition(".")[2] if self._current else None
        f, chain = sys._getframe(3), []
        while f is not None:
            if not f.f_code.co_filename.startswith(tdir):
                chain.append(f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}")
                if f.f_code.co_name == kernel:
                    break
            f = f.f_back
        return "<".join(chain) if f is not None else (chain[0] if chain else "?")

    def _record(self, op: str, ptrs, mask, elsize: int) -> None:
        name = self._current[-1] if self._current else "<outside a launch>"
        full = np.asarray(ptrs.data)
        addr = full
        if mask is not None:
            m = np.broadcast_to(np.asarray(mask.data, dtype=bool), full.shape)
            addr = full[m]
        lanes = int(addr.size)
        distinct, sectors = access_sectors(addr, self._starts, self._ends)
        warps = self._warps[-1] if self._warps else 4
        per_warp = warp_sectors(
            full, None if mask is None else mask.data, self._starts, self._ends, warps, copies=False
        )
        c = self.access[name][op]
        c["accesses"] += 1
        c["lanes"] += lanes
        c["lane_bytes"] += lanes * elsize
        c["useful_bytes"] += distinct * elsize
        c["sectors"] += sectors
        c["warp_sectors"] += per_warp
        if self.with_sites:
            s = self.sites[name][f"{op} {self._site()}"]
            s[0] += 1
            s[1] += distinct * elsize
            s[2] += sectors
            s[3] += per_warp

    def __enter__(self):
        super().__enter__()
        from triton.runtime import interpreter as ti

        counter = self
        builder = ti.interpreter_builder

        def elsize(ptrs) -> int:
            return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)

        orig_load = builder.create_masked_load
        orig_store = builder.create_masked_store

        def create_masked_load(ptrs, mask, other, cache_policy, is_volatile):
            counter._record("load", ptrs, mask, elsize(ptrs))
            return orig_load(ptrs, mask, other, cache_policy, is_volatile)

        def create_masked_store(ptrs, value, mask, cache_policy):
            counter._record("store", ptrs, mask, elsize(ptrs))
            return orig_store(ptrs, value, mask, cache_policy)

        # create_load / create_store / atomic loads and stores go through these two (the builder calls its own
        # attributes, so the instance's wrappers catch them)
        builder.create_masked_load = create_masked_load
        builder.create_masked_store = create_masked_store
        self._undo.append(lambda: builder.__dict__.pop("create_masked_load", None))
        self._undo.append(lambda: builder.__dict__.pop("create_masked_store", None))
        if hasattr(builder, "create_atomic_rmw"):
            orig_rmw = builder.create_atomic_rmw

            def create_atomic_rmw(rmwOp, ptr, val, mask, sem, scope):
                counter._record("atomic", ptr, mask, elsize(ptr))
                return orig_rmw(rmwOp, ptr, val, mask, sem, scope)

            builder.create_atomic_rmw = create_atomic_rmw
            self._undo.append(lambda: builder.__dict__.pop("create_atomic_rmw", None))
        if hasattr(builder, "create_atomic_cas"):
            orig_cas = builder.create_atomic_cas

            def create_atomic_cas(ptr, cmp, val, sem, scope):
                counter._record("atomic", ptr, None, elsize(ptr))
                return orig_cas(ptr, cmp, val, sem, scope)

            builder.create_atomic_cas = create_atomic_cas
            self._undo.append(lambda: builder.__dict__.pop("create_atomic_cas", None))

        GE = ti.GridExecutor
        orig_init = GE._init_args_hst

        def _init_args_hst(ge_self, args_dev, kwargs):
            args_hst, kwargs_hst = orig_init(ge_self, args_dev, kwargs)
            counter._set_ranges(args_hst, kwargs_hst)
            return args_hst, kwargs_hst

        GE._init_args_hst = _init_args_hst
        self._undo.append(lambda: setattr(GE, "_init_args_hst", orig_init))
        IF = ti.InterpretedFunction
        counted_run = IF.run

        def run(fn_self, *args, grid, warmup, **kwargs):
            counter._warps.append(int(kwargs.get("num_warps") or 4))
            try:
                return counted_run(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                counter._warps.pop()

        IF.run = run
        self._undo.append(lambda: setattr(IF, "run", counted_run))
        return self

    def per_kernel(self) -> Dict[str, Dict[str, object]]:
        """Per kernel: launches, programs, the access counts per kind and their totals, and the efficiency."""
        out = {}
        for name in sorted(set(self.kernels) | set(self.access)):
            k = dict(self.kernels.get(name, {}))
            k.pop("seconds", None)
            acc = self.access.get(name, _empty())
            tot = {f: sum(acc[op][f] for op in acc) for f in _FIELDS}
            k.update({op: dict(v) for op, v in acc.items()}, **tot)
            k["efficiency"] = tot["useful_bytes"] / (SECTOR * tot["sectors"]) if tot["sectors"] else None
            if self.with_sites:
                k["sites"] = {
                    s: {"accesses": v[0], "useful_bytes": v[1], "sectors": v[2], "warp_sectors": v[3]}
                    for s, v in sorted(self.sites.get(name, {}).items(), key=lambda kv: -kv[1][2])
                }
            out[name] = k
        return out


def count_step(problem: str, provider: str = "triton", seed: int = 0, sites: bool = True) -> Dict[str, object]:
    """Sectors and useful bytes per kernel of one training step of ``provider`` on ``problem`` (``"M@40"``; a graph the
    layer has not seen, after one uncounted step on another copy, as :func:`ik_fast.tools.workcount.count_step`)."""
    from ik_fast.tools import problems as _problems

    if not interpreting():
        raise RuntimeError("sectors are traced in Triton's interpreter: set TRITON_INTERPRET=1 before importing triton")
    p = _problem(problem)
    if p.name not in _problems.PROBLEMS:
        _problems.PROBLEMS.setdefault(p.name, p)
    step = _train_step(p, provider, seed, "float32")
    if hasattr(step, "warm_up"):
        with DotCounter(execute=False, profile_ranges=False):
            step.warm_up()
    t = time.perf_counter()
    with SectorCounter(sites=sites) as sc:
        step()
    kernels = sc.per_kernel()
    tot = {f: sum(k[f] for k in kernels.values()) for f in _FIELDS}
    return {
        "problem": p.name,
        "provider": provider,
        "nodes": step.nodes,
        "edges": step.edges,
        "seconds": time.perf_counter() - t,
        **tot,
        "efficiency": tot["useful_bytes"] / (SECTOR * tot["sectors"]) if tot["sectors"] else None,
        "kernels": kernels,
    }


def slope(small: Dict, large: Dict) -> Dict[str, object]:
    """Per-edge slopes of sectors and useful bytes between two steps, for the step and per kernel."""
    dE = large["edges"] - small["edges"]

    def per_edge(a, b):
        out = {f: (b.get(f, 0) - a.get(f, 0)) / dE for f in ("sectors", "useful_bytes")}
        out["efficiency"] = out["useful_bytes"] / (SECTOR * out["sectors"]) if out["sectors"] > 0 else None
        return out

    res = {"edges": (small["edges"], large["edges"]), **per_edge(small, large), "kernels": {}}
    for name in sorted(set(small["kernels"]) | set(large["kernels"])):
        res["kernels"][name] = per_edge(small["kernels"].get(name, {}), large["kernels"].get(name, {}))
    return res


def _short(name: str) -> str:
    return name.rpartition(".")[2]


def sector_table(problem: str, large: Dict, s: Dict) -> str:
    """Markdown table, one row per kernel and the step: at the larger graph its programs, block accesses, sectors,
    useful bytes and efficiency; the per-edge slopes."""
    lines = [
        f"{problem}: {large['problem']} ({large['edges']:,} edges); per edge: slope over {s['edges'][0]:,} → "
        f"{s['edges'][1]:,} edges",
        "",
        "| kernel | programs | accesses | sectors | useful bytes | efficiency | sectors / edge | efficiency of the "
        "slope |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def e(v):
        return "–" if v is None else f"{v:.1%}"

    rows = list(large["kernels"].items()) + [("step", large)]
    for name, k in rows:
        sl = s if name == "step" else s["kernels"].get(name, {})
        lines.append(
            f"| {_short(name) if name != 'step' else '**step**'} | {k.get('programs', '–')} | {k['accesses']:,} | "
            f"{k['sectors']:,} | {k['useful_bytes']:,} | {e(k['efficiency'])} | {sl.get('sectors', 0):,.0f} | "
            f"{e(sl.get('efficiency'))} |"
        )
    return "\n".join(lines)


WHAT = (
    "global-memory efficiency: useful bytes (distinct addresses of the active lanes x element size) over "
    "32-byte sectors touched, summed over every block access (tl.load/tl.store/atomic) of every program of one "
    "training step, traced in Triton's interpreter; sectors relative to each tensor argument's storage"
)


def _strip(step: Dict) -> Dict:
    return {k: v for k, v in step.items() if k != "provider"}


def sector_records(problem: str, provider: str, steps: List[Dict], s: Dict, prov: Dict, command: str, threshold=None):
    """The records (kind ``sectors``) of one problem and provider."""
    from ik_fast import records

    small, large = steps
    common = dict(mode="train", precision="ieee", prov=prov)
    base = {
        "edges": list(s["edges"]),
        "graphs": [st["problem"] for st in steps],
        "command": command,
        "what": WHAT,
    }
    out = [
        records.record(
            "sectors",
            problem,
            provider,
            "efficiency",
            large["efficiency"],
            "1",
            extra={**base, "steps": [_strip(st) for st in steps], "slope": s},
            error=None if large["efficiency"] is not None else "no global access traced",
            **common,
        ),
        records.record(
            "sectors", problem, provider, "sectors_per_edge", s["sectors"], "count", extra=dict(base), **common
        ),
        records.record(
            "sectors",
            problem,
            provider,
            "useful_bytes_per_edge",
            s["useful_bytes"],
            "B",
            extra=dict(base),
            **common,
        ),
    ]
    for name, k in large["kernels"].items():
        ex = {
            **base,
            "kernel": name,
            "sectors": k["sectors"],
            "useful_bytes": k["useful_bytes"],
            "accesses": k["accesses"],
            "programs": k.get("programs"),
            "per_edge": s["kernels"].get(name),
        }
        if threshold is not None:
            ex["ok"] = k["efficiency"] is None or k["efficiency"] >= threshold
            ex["check"] = f"efficiency at least {threshold:.0%}"
        out.append(
            records.record(
                "sectors",
                problem,
                provider,
                "kernel_efficiency",
                k["efficiency"],
                "1",
                extra=ex,
                error=None if k["efficiency"] is not None else "no global access",
                **common,
            )
        )
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ik_fast.tools.sectors",
        description="global-memory efficiency (useful bytes / 32-byte sectors per block access) of every Triton "
        "kernel of a training step, traced in Triton's interpreter (TRITON_INTERPRET=1)",
    )
    ap.add_argument("--problems", default="M,H")
    ap.add_argument("--backend", default="triton", help="providers (ik_fast.tools.bench names), comma separated")
    ap.add_argument("--sizes", default=None, help="two graphs per problem, e.g. 'M@40,M@80;H@32,H@64'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", type=float, default=None, help="exit 1 when a kernel's efficiency is below this")
    ap.add_argument("--sites", action="store_true", help="also print each kernel's accesses per source line")
    ap.add_argument("--json", default=None, help="write the records (ik_fast/records.py, kind sectors) here")
    ap.add_argument(
        "--name", default=None, help="also write them to benchmarks/results/sectors/<device>/<date>-NAME.json"
    )
    args = ap.parse_args(argv)
    if not interpreting():
        sys.exit("sectors are traced in Triton's interpreter: run with TRITON_INTERPRET=1")
    from ik_fast.tools.workcount import provenance

    sizes = {}
    if args.sizes:
        for part in args.sizes.split(";"):
            pair = part.split(",")
            sizes[pair[0].partition("@")[0].partition("#")[0]] = pair
    command = "python -m ik_fast.tools.sectors " + " ".join(sys.argv[1:] if argv is None else argv)
    prov = provenance() if args.json or args.name else None
    recs, failed = [], False
    for problem in args.problems.split(","):
        pair = sizes.get(problem) or graph_sizes(problem)
        for provider in args.backend.split(","):
            steps = []
            for name in pair:
                r = count_step(name, provider, seed=args.seed)
                print(
                    f"# {name} {provider}: {r['edges']:,} edges, {r['sectors']:,} sectors, {r['useful_bytes']:,} "
                    f"useful bytes, efficiency {r['efficiency'] or 0:.1%}, {r['seconds']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                steps.append(r)
            s = slope(*steps)
            print(sector_table(problem, steps[1], s))
            if args.sites:
                for kname, k in steps[1]["kernels"].items():
                    print(f"\n{_short(kname)}:")
                    for site, v in list(k.get("sites", {}).items())[:20]:
                        eff = v["useful_bytes"] / (SECTOR * v["sectors"]) if v["sectors"] else 0
                        print(f"  {site}: {v['accesses']:,} accesses, {v['sectors']:,} sectors, {eff:.1%}")
            bad = [
                _short(k)
                for k, v in steps[1]["kernels"].items()
                if args.check is not None and v["efficiency"] is not None and v["efficiency"] < args.check
            ]
            if bad:
                print(f"{problem} {provider}: below {args.check:.0%}: {', '.join(bad)}")
                failed = True
            if prov is not None:
                recs += sector_records(problem, provider, steps, s, prov, command, threshold=args.check)
                _save(recs, args.json, args.name, "sectors")
    for path in _save(recs, args.json, args.name, "sectors") if prov is not None else []:
        print(f"records: {path}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
