"""Benchmark harness: time, peak memory and FLOPs of one layer on the shared problems (``ik_fast.tools.problems``).

``python -m ik_fast.tools.bench --problems cpu --providers reference,torch --modes train`` runs every case in a child
process (so that each has its own peak resident set on CPU), prints a table and writes the records
(:mod:`ik_fast.records`: one ``step_time`` and one ``peak_memory`` record per case, each with the commit, the
device and the stack's versions) to ``benchmarks/results/timing/<device>/<date>-<name>.json``, rewritten after every
case, and to the same path under ``--copy-to`` (e.g. a folder that a lent GPU machine returns). ``--budget-s`` bounds
the whole run: a case still running when it is spent is stopped (its child killed) and recorded as such, and the cases
not started are recorded as skipped. Problems whose data is not installed (QM9 needs ``qm9pack``) are recorded as
skipped with the reason.

Work: each record carries ``flops``, a *model* of the FLOPs (2 x multiply-adds) the provider's algorithm runs (from
the shapes; for ``triton``, a model of the padded kernels), used for the achieved FLOP/s, and ``floor_macs``, the
structured floor (the docs' design page) for the record's edges (``ik_fast.tools.workcount``). ``--work`` instead
*counts* the multiply-adds each provider executes in one training step (every ``tl.dot`` at its padded shape in Triton's
interpreter, host GEMMs from torch.profiler) on two small graphs of each problem's full degree, and prints their
per-edge slope next to the floor (``python -m ik_fast.tools.bench --work --problems P,M,H --providers
reference,torch,triton``; each problem in a child process under ``TRITON_INTERPRET=1``).

Modes: ``train`` / ``eval`` — forward + backward (gradients for the node features, positions, attributes and all
parameters) with the module in training / eval mode; ``inference`` — eval mode under ``torch.no_grad()``.

torch and escnn are imported only where a case is built or measured: ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

from ik_fast.tools.cases import MODES, model_flops, setup_case  # noqa: F401  (the harness's names)

# A pass's precision name -> (torch.set_float32_matmul_precision, $IK_FAST_HIGHEST): "highest" is PyTorch's switch
# as a user leaves it (on CUDA the fused backends run it as 3xTF32, every other provider as IEEE); "ieee" and
# "tf32x3" pin what "highest" runs as in the fused backends; "high" is TF32 (every provider alike).
_PASSES = {
    "highest": ("highest", None),
    "ieee": ("highest", "ieee"),
    "tf32x3": ("highest", "tf32x3"),
    "high": ("high", None),
}
# the records' names for the passes (float32 cases)
PRECISIONS = {"highest": "ieee", "ieee": "ieee", "tf32x3": "tf32x3", "high": "tf32"}
_PRECISION_ALIASES = {"highest": "highest", "ieee": "ieee", "tf32x3": "tf32x3", "high": "high", "tf32": "high"}
PRECOMPILE_PRECISIONS = ("highest", "high", "bf16")
_FUSED = ("triton", "native")


def set_precision(name: str) -> None:
    """Set up this process for a float32 pass named as in :data:`_PASSES` (``bf16`` and unknown names: "highest")."""
    import torch

    matmul, highest = _PASSES.get(name, ("highest", None))
    if highest is None:
        os.environ.pop("IK_FAST_HIGHEST", None)
    else:
        os.environ["IK_FAST_HIGHEST"] = highest
    torch.set_float32_matmul_precision(matmul)


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
_T0 = time.time()  # about when this process started (this module imports nothing heavy): --budget-s counts from it


def _sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def provenance(device: str = "cpu") -> Dict:
    """:func:`ik_fast.records.provenance` of ``device``; where CUDA is named but cannot be used (a CPU build of
    torch, no driver), the records still get written: the device is then ``cuda`` named by the reason."""
    from ik_fast import records

    try:
        return records.provenance(device)
    except (AssertionError, RuntimeError) as exc:  # torch.cuda's own errors when CUDA cannot initialise
        prov = records.provenance("cpu")
        prov["device"] = {"type": "cuda", "name": f"CUDA unavailable: {exc}"}
        return prov


def problem_unavailable(name: str) -> Optional[str]:
    """Why problem ``name`` cannot be built here (its data is not installed), else None. Raises ValueError for an
    unknown name."""
    from ik_fast.tools.problems import get_problem

    p = get_problem(name.partition("#")[0])
    if p.graph == "qm9" and importlib.util.find_spec("qm9pack") is None:
        return "needs the QM9 data of the qm9pack package (pip install --no-deps qm9pack), which is not installed"
    return None


def count_work(problems: List[str], providers: List[str], timeout: float = 3600.0, out_records=None) -> List[Dict]:
    """Counted work per edge of one training step for each problem and provider (``python -m ik_fast.tools.workcount``
    in a child process under Triton's interpreter): rows of :func:`ik_fast.tools.workcount.slope` with problem and
    provider, or ``{"problem", "error"}`` for a problem whose count failed. The children's ``work`` records are
    appended to ``out_records`` when given."""
    import tempfile

    from ik_fast import records
    from ik_fast.tools.workcount import slope_rows

    rows = []
    env = dict(os.environ, TRITON_INTERPRET="1")
    for problem in problems:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        try:
            cmd = [
                sys.executable,
                "-m",
                "ik_fast.tools.workcount",
                "--problems",
                problem,
                "--backend",
                ",".join(providers),
                "--json",
                out,
            ]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            if res.returncode != 0:
                rows.append({"problem": problem, "error": res.stderr[-2000:]})
                continue
            recs = records.load(out)
            rows += slope_rows(recs)
            if out_records is not None:
                out_records += recs
        except subprocess.TimeoutExpired:
            rows.append({"problem": problem, "error": f"timeout after {timeout:.0f} s"})
        finally:
            os.unlink(out)
    return rows


class _Timer:
    """Wall clock on CPU; CUDA events on GPU."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if self.cuda:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def elapsed(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a


def measure(
    problem: str,
    provider: str,
    mode: str,
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    budget_s: float = 120.0,
    precision: str = "highest",
    min_time_s: float = 1.0,
    max_repeats: int = 500,
) -> Dict:
    """Run one case in this process and return its record: median, 20th and 80th percentile of the step time
    (forward and backward separately too), peak memory, achieved FLOP/s. Fewer repeats are made when they would
    exceed ``budget_s`` (at least one after the warm-up); more when ``repeats`` steps take less than ``min_time_s``
    (steps of milliseconds: their median over a second of them, at most ``max_repeats``, not over a handful)."""
    import torch

    set_precision(precision)
    step, rec = setup_case(problem, provider, mode, device, dtype, seed)
    rec["precision"] = precision
    call, (x, pos, attr) = step.call, step.inputs
    rec["base_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer = _Timer(device)
    grad = mode != "inference"
    fwd_t, bwd_t = [], []
    it = 0
    while it < warmup + repeats:
        xs, ps, at = (t.clone().requires_grad_(grad) for t in (x, pos, attr))
        t0 = timer.mark()
        if grad:
            out = call(xs, ps, at)
            t1 = timer.mark()
            out.backward(torch.ones_like(out))
            t2 = timer.mark()
        else:
            with torch.no_grad():
                out = call(xs, ps, at)
            t1 = t2 = timer.mark()
        f, b = timer.elapsed(t0, t1), timer.elapsed(t1, t2)
        if it == 0:
            rec["warmup_s"] = f + b  # the first step: includes Triton's compilation for the fused backend
        if it >= warmup:
            fwd_t.append(f)
            bwd_t.append(b)
            if it + 1 == warmup + repeats and repeats < max_repeats and sum(fwd_t) + sum(bwd_t) < min_time_s:
                repeats += 1
        elif f + b > 0 and (f + b) * repeats > budget_s:
            repeats = max(1, int(budget_s / (f + b)))
        del out
        it += 1
    tot = sorted(f + b for f, b in zip(fwd_t, bwd_t))
    q = lambda v, f: v[min(len(v) - 1, int(round(f * (len(v) - 1))))]  # noqa: E731
    rec.update(
        {
            "time_s": statistics.median(tot),
            "time_p20_s": q(tot, 0.2),
            "time_p80_s": q(tot, 0.8),
            "forward_s": statistics.median(fwd_t),
            "backward_s": statistics.median(bwd_t),
            "repeats": repeats,
            "warmup": warmup,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )
    rec["tflops_per_s"] = rec["flops"] / rec["time_s"] / 1e12
    if torch.device(device).type == "cuda":
        rec["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return rec


_CHILD = None  # the case's child process now running (killed with its process group when this process is stopped)


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_child(signum, frame):
    """SIGTERM (e.g. from ``timeout``): kill the running case with its process group, then exit."""
    if _CHILD is not None:
        _kill_group(_CHILD)
    raise SystemExit(128 + signum)


def run_child(case: Dict, timeout: float) -> Dict:
    """Run one case in a fresh interpreter (its own peak RSS) in its own process group; failures come back as
    records with an error. After ``timeout`` seconds the child and everything it started are killed."""
    global _CHILD
    cmd = [sys.executable, "-m", "ik_fast.tools.bench", "--child", json.dumps(case)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _CHILD = proc
    try:
        stdout, stderr = proc.communicate(timeout=max(timeout, 0.001))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        return {**case, "error": f"timeout after {timeout:.0f} s"}
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        _CHILD = None
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    err = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    msg = err[-1] if err else f"exit code {proc.returncode}"
    if "out of memory" in stderr.lower() or "not enough memory" in stderr.lower():
        msg = "out of memory"
    elif proc.returncode in (-9, 137):
        msg = "killed by SIGKILL (the kernel's out-of-memory killer, most likely)"
    return {**case, "error": msg}


def format_table(records: List[Dict]) -> str:
    mem = "peak GPU memory (MB)" if any("peak_gpu_mb" in r for r in records) else "peak RSS (MB)"
    rows = [
        f"| problem | provider | mode | edges | time (s) [p20-p80] | fwd / bwd (s) | {mem} | GFLOP/s | "
        f"first step (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "error" in r:
            rows.append(f"| {r['problem']} | {r['provider']} | {r['mode']} | | {r['error']} | | | | |")
            continue
        warm = f"{r['warmup_s']:.2f}" if "warmup_s" in r else ""
        rows.append(
            f"| {r['problem']} | {r['provider']} | {r['mode']} | {r['edges']:,} | {r['time_s']:.3f} "
            f"[{r['time_p20_s']:.3f}-{r['time_p80_s']:.3f}] | {r['forward_s']:.3f} / {r['backward_s']:.3f} | "
            f"{r.get('peak_gpu_mb', r['peak_rss_mb']):,.0f} | {r['tflops_per_s'] * 1e3:.1f} | {warm} |"
        )
    return "\n".join(rows)


def suites() -> Dict[str, Dict]:
    """The named runs: ``cpu`` (the default; minutes on 2 cores) and ``gpu`` (configs P, M, H at full size, the
    10^4..10^7-edge sweep, degree skew)."""
    from ik_fast.backends import FUSED
    from ik_fast.tools.problems import sweep_problems

    # every declared implementation of the ops that runs on the suite's device (Triton on CPU only in its
    # interpreter, under TRITON_INTERPRET=1: not a benchmark)
    fused = [b for b in FUSED if b in _available("cuda")]
    fused_cpu = [b for b in FUSED if b in _available("cpu")]
    return {
        "cpu": dict(
            problems=["P", "qm9-400", "planar", "cpu", "skew@4096", *sweep_problems("cpu")],
            providers=["escnn", "reference", "torch", *fused_cpu],
            modes=["train", "inference"],
            device="cpu",
        ),
        "gpu": dict(
            problems=["P", "M", "H", "skew", *sweep_problems("gpu")],
            providers=["escnn", "reference", "torch", *fused],
            modes=["train", "inference"],
            device="cuda",
        ),
    }


def _available(device=None):
    from ik_fast.backends import available_backends

    return available_backends(device)


def _progress(i: int, n: int, label: str, t0: float) -> None:
    done = int(30 * i / max(n, 1))
    el = time.time() - t0
    eta = el / i * (n - i) if i else 0.0
    print(
        f"\r[{'#' * done}{'.' * (30 - done)}] {i}/{n} {el:5.0f}s elapsed, ~{eta:4.0f}s left  {label:<40}",
        end="",
        file=sys.stderr,
        flush=True,
    )


def _key(case: Dict):
    return (
        case["problem"],
        case["provider"],
        case["mode"],
        case.get("device", "cpu"),
        case.get("dtype", "float32"),
        case.get("precision", "highest"),
    )


def run_cases(
    cases: List[Dict],
    timeout: float,
    budget_s: float = float("inf"),
    done: Dict = None,
    on_record=None,
    start: Optional[float] = None,
) -> List[Dict]:
    """Run cases in child processes with a progress bar. A provider that ran out of memory on a problem is not run
    on larger sizes of the same sweep (recorded as such); a problem whose data is missing is recorded as skipped.
    ``budget_s`` bounds the whole list from ``start`` (default: now): a case still running when it is spent is
    stopped, and no case starts after it. ``done`` maps case keys to records already measured (``--resume``);
    ``on_record`` sees the list of records after each case."""
    records = []
    oom = set()
    done = done or {}
    t0 = time.time()
    deadline = (t0 if start is None else start) + budget_s
    unavailable = {}
    for i, case in enumerate(cases):
        label = f"{case['problem']} {case['provider']} {case['mode']}"
        _progress(i, len(cases), label, t0)
        base = case["problem"].split("@")[0]
        if case["problem"] not in unavailable:
            unavailable[case["problem"]] = problem_unavailable(case["problem"])
        left = deadline - time.time()
        if _key(case) in done:
            rec = done[_key(case)]
        elif unavailable[case["problem"]]:
            rec = {**case, "error": f"skipped: {unavailable[case['problem']]}"}
        elif (base, case["provider"], case["mode"]) in oom and "@" in case["problem"]:
            rec = {**case, "error": "out of memory (at a smaller size)"}
        elif left <= 0:
            rec = {**case, "error": f"skipped: the time budget ({budget_s:.0f} s) was spent"}
        else:
            limit = min(timeout, left)
            rec = run_child(case, limit)
            if limit < timeout and rec.get("error", "").startswith("timeout"):
                rec["error"] = f"stopped after {limit:.0f} s: the time budget ({budget_s:.0f} s) was spent"
        if rec.get("error", "").startswith("out of memory"):
            oom.add((base, case["provider"], case["mode"]))
        records.append(rec)
        if on_record is not None:
            on_record(records)
    _progress(len(cases), len(cases), "done", t0)
    print(file=sys.stderr)
    return records


def run_rounds(
    cases: List[Dict],
    rounds: int,
    timeout: float,
    budget_s: float = float("inf"),
    done: Dict = None,
    on_record=None,
    start: Optional[float] = None,
) -> List[Dict]:
    """:func:`run_cases` ``rounds`` times over the whole list, round after round, so that the providers of a problem
    are measured minutes apart in every round rather than once each in one stretch: on a machine whose speed drifts
    (this project's 2-core VM: +-20% from minute to minute), the drift then falls on every provider alike. Each case's
    record is that of its median round (the lower median for an even count), with ``rounds_time_s``, every round's
    time in order, and ``time_s`` their median. ``budget_s`` bounds all rounds together, from ``start`` (default:
    now)."""
    if rounds <= 1:
        return run_cases(cases, timeout, budget_s, done, on_record, start)
    start = time.time() if start is None else start
    done = done or {}
    todo = [c for c in cases if _key(c) not in done]
    per_round = []
    for r in range(rounds):
        print(f"round {r + 1} of {rounds}", file=sys.stderr)
        per_round.append(run_cases(todo, timeout, budget_s, start=start))
    merged = {}
    for i, case in enumerate(todo):
        recs = [rr[i] for rr in per_round]
        ok = [rec for rec in recs if "error" not in rec]
        if not ok:
            merged[_key(case)] = recs[0]
            continue
        times = [rec["time_s"] for rec in ok]
        rec = dict(sorted(ok, key=lambda x: x["time_s"])[(len(ok) - 1) // 2])
        rec["rounds_time_s"] = times
        rec["time_s"] = statistics.median(times)
        merged[_key(case)] = rec
    records = [done[_key(c)] if _key(c) in done else merged[_key(c)] for c in cases]
    if on_record is not None:
        on_record(records)
    return records


# ----------------------------------------------------------------------------------------------------------------
# results files (ik_fast.records)
# ----------------------------------------------------------------------------------------------------------------
_EXTRA = (
    "description",
    "device",
    "dtype",
    "nodes",
    "edges",
    "flops",
    "flops_source",
    "floor_macs",
    "tflops_per_s",
    "forward_s",
    "backward_s",
    "warmup_s",
    "repeats",
    "warmup",
    "base_rss_mb",
    "peak_rss_mb",
    "peak_gpu_mb",
    "rounds_time_s",
    "timeout",
)


def record_precision(case: Dict) -> str:
    """The records' ``precision`` of a case: ``ieee`` / ``tf32`` for float32 (the matmul precision), else the
    dtype (``float64``, ``bfloat16``)."""
    dtype = case.get("dtype", "float32")
    if dtype != "float32":
        return dtype
    prec = case.get("precision", "highest")
    if prec in ("highest", "tf32x3"):
        # 3xTF32 is what "highest" runs as in the fused backends on CUDA (unless $IK_FAST_HIGHEST says otherwise);
        # everything else, and everything on CPU, runs it as IEEE
        cuda_fused = str(case.get("device", "cpu")).startswith("cuda") and case.get("provider") in _FUSED
        return "tf32x3" if cuda_fused else "ieee"
    return PRECISIONS.get(prec, prec)


def case_records(rec: Dict, prov: Dict, command: str) -> List[Dict]:
    """The schema records of one case's result: ``step_time`` (median, with p20 / p80 and the sample count as its
    spread) and ``peak_memory`` (the CUDA caching allocator's peak on a GPU, the peak resident set on CPU); a case
    without a result gives one ``step_time`` record with its error."""
    from ik_fast import records

    extra = {k: rec[k] for k in _EXTRA if k in rec}
    extra.update(matmul_precision=rec.get("precision", "highest"), command=command)
    common = dict(
        kind="timing",
        problem=rec["problem"],
        provider=rec["provider"],
        mode=rec["mode"],
        precision=record_precision(rec),
        prov=prov,
    )
    if "error" in rec:
        return [records.record(metric="step_time", value=None, unit="s", error=rec["error"], extra=extra, **common)]
    spread = {"p20": rec["time_p20_s"], "p80": rec["time_p80_s"], "n": rec["repeats"]}
    out = [records.record(metric="step_time", value=rec["time_s"], unit="s", spread=spread, extra=extra, **common)]
    gpu = "peak_gpu_mb" in rec
    out.append(
        records.record(
            metric="peak_memory",
            value=rec["peak_gpu_mb"] if gpu else rec["peak_rss_mb"],
            unit="MB",
            extra={**extra, "memory": "cuda max_memory_allocated" if gpu else "peak RSS"},
            **common,
        )
    )
    return out


def results_root() -> str:
    """$IK_FAST_RESULTS_DIR when set, else ``benchmarks/results`` of the checkout this package is in, else of the
    working directory."""
    if os.environ.get("IK_FAST_RESULTS_DIR"):
        return os.path.abspath(os.environ["IK_FAST_RESULTS_DIR"])
    if os.path.isdir(os.path.join(_ROOT, "benchmarks")):
        return os.path.join(_ROOT, "benchmarks", "results")
    return os.path.join(os.getcwd(), "benchmarks", "results")


def results_path(kind: str, name: str, prov: Dict, root: Optional[str] = None) -> str:
    """``<root>/<kind>/<device slug>/<date>-<name>.json`` (root: :func:`results_root`)."""
    from ik_fast import records

    return os.path.join(root or results_root(), kind, records.device_slug(prov), f"{prov['date'][:10]}-{name}.json")


def write_results(path: str, recs: List[Dict], copy_to: Optional[str] = None, root: Optional[str] = None) -> str:
    """Write a results file (atomically) and, with ``copy_to``, the same file under that folder at the same path
    relative to the results root (or by its name when it lies elsewhere). Returns ``path``."""
    from ik_fast import records

    records.write(path, recs)
    if copy_to:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root or results_root()))
        if rel.startswith(".."):
            rel = os.path.basename(path)
        records.write(os.path.join(copy_to, rel), recs)
    return path


def precompile(
    problems,
    device: str = "cuda",
    provider: str = "triton",
    precisions=PRECOMPILE_PRECISIONS,
    budget_s: float = float("inf"),
    on_result=None,
) -> list:
    """Compile every kernel ``provider`` launches for each problem before anything is timed: a training step and an
    eval-mode step on a small graph of the problem's sizes (its kernels do not specialise on the graph's size) in
    IEEE float32, TF32 and bf16 autocast (``precisions``). Fills Triton's on-disk cache, which the timed runs (child
    processes) then hit. A step that fails is reported and the next one runs; none starts after ``budget_s``.
    Returns [(problem, precision, mode, seconds or None, error or None)]; ``on_result`` sees the list after each."""
    import contextlib

    import torch

    from ik_fast.tools import problems as _problems
    from ik_fast.tools.workcount import _problem, graph_sizes

    out = []
    t0 = time.time()

    def add(row):
        out.append(row)
        if on_result is not None:
            on_result(out)

    for problem in problems:
        why = problem_unavailable(problem)
        for prec in precisions:
            for mode in ("train", "eval"):
                if why:
                    add((problem, prec, mode, None, f"skipped: {why}"))
                    continue
                if time.time() - t0 > budget_s:
                    add((problem, prec, mode, None, f"skipped: the time budget ({budget_s:.0f} s) was spent"))
                    continue
                small = _problem(graph_sizes(problem)[0])
                _problems.PROBLEMS.setdefault(small.name, small)
                t = time.perf_counter()
                set_precision(prec)
                amp = (
                    torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
                    if prec == "bf16"
                    else contextlib.nullcontext()
                )
                try:
                    step, _ = setup_case(small.name, provider, mode, device=device, dtype="float32")
                    with amp:
                        step()
                    _sync(device)
                except Exception as exc:  # reported, and the next configuration still compiles
                    add((problem, prec, mode, None, _last_line(exc)))
                    continue
                add((problem, prec, mode, time.perf_counter() - t, None))
    set_precision("highest")
    return out


def _last_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def _problem_help() -> str:
    from ik_fast.tools.problems import PROBLEMS, SWEEPS, sweep_problems

    rows = [f"  {name:<8} {p.description}" for name, p in PROBLEMS.items()]
    sweeps = "; ".join(f"{kind}: {','.join(sweep_problems(kind))}" for kind in SWEEPS)
    return (
        "problems (--problems, comma separated; NAME@N: the problem's fields and degree on N nodes):\n"
        + "\n".join(rows)
        + f"\nedge sweeps (SWEEPS): {sweeps}"
    )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m ik_fast.tools.bench",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_problem_help(),
    )
    ap.add_argument(
        "--suite",
        choices=["cpu", "gpu"],
        default=None,
        help="a named run (its problems, providers, modes and device replace those options): cpu = the "
        "CPU problems and sweep; gpu = P, M, H, skew and the 10^4..10^7-edge sweep on CUDA",
    )
    ap.add_argument("--problems", default="cpu", help="comma-separated problem names (listed below)")
    ap.add_argument(
        "--providers",
        default="reference,torch",
        help="comma separated: escnn (escnn's own point convolution) or an ik_fast backend: reference, "
        "torch, triton, native",
    )
    ap.add_argument("--modes", default="train", help=f"comma separated, of {', '.join(MODES)}")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per case (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones (the first compiles)")
    ap.add_argument(
        "--min-time",
        type=float,
        default=1.0,
        help="seconds of timed steps at least: more than --repeats where they take less (fast cases)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every case this many times, round after round over the whole list (providers "
        "interleaved in time); report each case's median round",
    )
    ap.add_argument("--device", default="cpu", help="torch device of the cases: cpu, cuda, cuda:1, ...")
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64", "bfloat16"],
        help="dtype of the layer and its inputs",
    )
    ap.add_argument(
        "--precision",
        default=None,
        help="float32 passes over the cases, comma separated: highest (torch.set_float32_matmul_precision's "
        "default: IEEE float32, on CUDA 3xTF32 in the fused backends), ieee or tf32x3 (what highest runs as in the "
        "fused backends, pinned with $IK_FAST_HIGHEST), high (= tf32: TF32, every provider alike); with "
        "--precompile: which of these and bf16 to compile (default highest, high, bf16)",
    )
    ap.add_argument("--timeout", type=float, default=240, help="seconds per case: its child is killed after that")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=float("inf"),
        help="seconds for the whole run, from this process's start: a case still running then is stopped "
        "(its child killed) and no case starts after it; each is recorded as such",
    )
    ap.add_argument(
        "--name",
        default=None,
        help="results file name: benchmarks/results/<kind>/<device>/<date>-NAME.json (default: the "
        "suite's name, else bench / precompile / work)",
    )
    ap.add_argument("--out", default=None, help="write the results file here instead (the records schema)")
    ap.add_argument(
        "--copy-to",
        default=None,
        help="also write every results file, whenever it is rewritten, under this folder (at its path "
        "relative to benchmarks/results)",
    )
    ap.add_argument("--no-save", action="store_true", help="write no results file (print the table only)")
    ap.add_argument("--resume", action="store_true", help="keep the records already in the output file")
    ap.add_argument(
        "--work",
        action="store_true",
        help="count the multiply-adds each provider executes per edge (interpreter, small graphs) against "
        "the structured floor, instead of timing",
    )
    ap.add_argument(
        "--precompile",
        action="store_true",
        help="only compile every Triton kernel of the problems (train and eval, IEEE/TF32/bf16) on the "
        "device, filling Triton's cache before a timed run; records each step's seconds",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap


def _split(value: str, option: str) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise SystemExit(f"python -m ik_fast.tools.bench: error: {option} is empty")
    return items


def _check(args, ap) -> None:
    """Refuse bad values with a message naming the option."""
    from ik_fast.tools.problems import get_problem

    if args.child:
        return
    for name in ("repeats", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        ap.error(f"--warmup must be 0 or more, got {args.warmup}")
    for name in ("timeout", "budget_s"):
        if not getattr(args, name) > 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in _split(args.problems, "--problems"):
        try:
            get_problem(name)
        except ValueError as exc:
            ap.error(f"--problems: {exc}")
    if not args.precompile and not args.work:
        bad = [m for m in _split(args.modes, "--modes") if m not in MODES]
        if bad:
            ap.error(f"--modes: unknown mode(s) {bad}; known: {list(MODES)}")
    if args.precision is not None:
        known = set(PRECOMPILE_PRECISIONS) | set(_PRECISION_ALIASES) if args.precompile else set(_PRECISION_ALIASES)
        bad = [p for p in _split(args.precision, "--precision") if p not in known]
        if bad:
            ap.error(f"--precision: unknown value(s) {bad}; known: {sorted(known)}")


def _results_file(args, kind: str, default_name: str, prov: Dict) -> Optional[str]:
    if args.no_save:
        return None
    return args.out or results_path(kind, args.name or default_name, prov)


def main(argv=None) -> int:
    start = _T0 if argv is None else time.time()  # the command line's budget counts from the process's start
    ap = _parser()
    args = ap.parse_args(argv)
    _check(args, ap)
    command = "python -m ik_fast.tools.bench " + " ".join(
        a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"
    )
    if args.child:
        import torch

        case = json.loads(args.child)
        try:
            print(json.dumps(measure(**case)))
        except torch.cuda.OutOfMemoryError:
            print(json.dumps({**case, "error": "out of memory"}))
        except RuntimeError as exc:
            if "out of memory" not in str(exc).lower() and "not enough memory" not in str(exc).lower():
                raise
            print(json.dumps({**case, "error": "out of memory"}))
        return 0
    signal.signal(signal.SIGTERM, _stop_child)
    from ik_fast import records

    if args.precompile:
        precs = (
            [_PRECISION_ALIASES.get(p, p) for p in _split(args.precision, "--precision")]
            if args.precision
            else list(PRECOMPILE_PRECISIONS)
        )
        prov = provenance(args.device)
        out = _results_file(args, "compile", "precompile", prov)

        def save(rows):
            recs = [
                records.record(
                    "compile",
                    problem,
                    "triton",
                    "first_step_time",
                    sec,
                    "s",
                    mode=mode,
                    precision=PRECISIONS.get(prec, prec),
                    error=err,
                    prov=prov,
                    extra={
                        "what": "a first step on a small graph of the problem (Triton compiles)",
                        "command": command,
                    },
                )
                for problem, prec, mode, sec, err in rows
            ]
            if out:
                write_results(out, recs, args.copy_to)

        rows = precompile(
            _split(args.problems, "--problems"),
            device=args.device,
            precisions=precs,
            budget_s=args.budget_s - (time.time() - start),
            on_result=save,
        )
        for problem, prec, mode, sec, err in rows:
            print(f"precompiled {problem} {prec} {mode}: " + (f"{sec:.1f} s" if err is None else err), flush=True)
        if out:
            print(f"results: {out}", file=sys.stderr)
        return 0 if all(err is None or err.startswith("skipped") for *_, err in rows) else 1
    if args.work:
        from ik_fast.tools.workcount import work_table

        recs = []
        rows = count_work(
            _split(args.problems, "--problems"),
            _split(args.providers, "--providers"),
            timeout=args.timeout * 15,
            out_records=recs,
        )
        good = [r for r in rows if "error" not in r]
        print(work_table(good))
        for r in rows:
            if "error" in r:
                print(f"{r['problem']}: {r['error']}", file=sys.stderr)
        out = _results_file(args, "work", "work", recs[0]) if recs else None
        if out:
            write_results(out, recs, args.copy_to)
            print(f"results: {out}", file=sys.stderr)
        return 1 if len(good) < len(rows) else 0
    import torch

    if args.suite:
        suite = suites()[args.suite]
        problems, providers, modes, device = suite["problems"], suite["providers"], suite["modes"], suite["device"]
    else:
        problems, providers = _split(args.problems, "--problems"), _split(args.providers, "--providers")
        modes, device = _split(args.modes, "--modes"), args.device
    precisions = [_PRECISION_ALIASES[p] for p in _split(args.precision or "highest", "--precision")]
    cases = [
        dict(
            problem=p,
            provider=v,
            mode=m,
            repeats=args.repeats,
            warmup=args.warmup,
            min_time_s=args.min_time,
            device=device,
            dtype=args.dtype,
            precision=prec,
        )
        for prec in precisions
        for p in problems
        for m in modes
        for v in providers
    ]
    prov = provenance(device)
    out = _results_file(args, "timing", args.suite or "bench", prov)
    done = {}  # case key -> its records in the file (--resume)
    if args.resume and out and os.path.exists(out):
        groups = {}
        for r in records.load(out):
            x = r["extra"]
            key = (
                r["problem"],
                r["provider"],
                r["mode"],
                x.get("device", "cpu"),
                x.get("dtype", "float32"),
                x.get("matmul_precision", "highest"),
            )
            groups.setdefault(key, []).append(r)
        for key, rs in groups.items():  # results, not crashes, are kept
            step = [r for r in rs if r["metric"] == "step_time"]
            if step and (step[0].get("error") is None or step[0]["error"].startswith(("out of memory", "timeout"))):
                done[key] = rs

    def save(recs):
        if not out:
            return
        by_key = {_key(r): r for r in recs}
        flat = []
        for c in cases:
            k = _key(c)
            if k in done:
                flat += done[k]
            elif k in by_key:
                flat += case_records(by_key[k], prov, command)
        write_results(out, flat, args.copy_to)

    todo = [c for c in cases if _key(c) not in done]
    recs = run_rounds(todo, args.rounds, args.timeout, args.budget_s, None, save, start=start)
    save(recs)
    if out:
        print(f"results: {out}", file=sys.stderr)
    print(
        f"{prov['device']['name']}, torch {torch.__version__}, {args.dtype}, matmul precision {', '.join(precisions)}"
    )
    print(format_table(recs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
