"""Benchmark harness: time, peak memory and FLOPs of one layer on the shared problems (``ik_fast.problems``).

``python -m ik_fast.bench --problems cpu --providers reference,torch --modes train`` runs every case in a child
process (so that each has its own peak resident set on CPU), prints a table and writes JSON with ``--out``.

Modes: ``train`` / ``eval`` — forward + backward (gradients for the node features, positions, attributes and all
parameters) with the module in training / eval mode; ``inference`` — eval mode under ``torch.no_grad()``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import torch

MODES = ("train", "eval", "inference")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def model_flops(layer, num_edges: int, num_receivers: int, provider: str, mode: str) -> float:
    """FLOPs (2 x multiply-adds) of the algorithm a provider runs; backward counted as twice the forward's GEMMs,
    plus the recomputation the torch backend does. An estimate from the shapes, not a hardware count."""
    prog = layer.kernel.program()
    per_edge = 0
    for h in prog.hidden:
        lin = h.linear
        per_edge += lin.plan.macs_per_row if lin.plan is not None else lin.weight.numel()
        if h.A is not None:
            per_edge += 2 * h.channels * h.A.numel()
    R, C, H = prog.out_size, prog.in_size, prog.hidden_size
    if provider == "reference":
        contraction = num_edges * (R * C * H + R * C)
        recompute = 0
    else:
        fin = prog.final
        final_macs = fin.plan.macs_per_row if fin.plan is not None else fin.weight.numel()
        contraction = num_edges * H * C + num_receivers * (final_macs + R * C)
        recompute = contraction
    fwd = num_edges * per_edge + contraction
    if mode == "inference":
        return 2.0 * fwd
    return 2.0 * (3 * fwd + recompute)


def measure(problem: str, provider: str, mode: str, repeats: int = 5, warmup: int = 1, device: str = "cpu",
            dtype: str = "float32", seed: int = 0) -> Dict:
    """Run one case in this process and return its record."""
    from .graph import prepare_graph
    from .problems import build_inputs, build_layer, get_problem

    p = get_problem(problem)
    dt = getattr(torch, dtype)
    torch.manual_seed(seed)
    rec = {"problem": p.name, "provider": provider, "mode": mode, "device": device, "dtype": dtype,
           "description": p.description}
    if provider == "escnn":
        raise ValueError("the escnn provider joins with the benchmark suite (see the benchmarks issue)")
    layer = build_layer(p, backend=provider, device=device, seed=seed).to(dt)
    x, pos, ei, attr = build_inputs(p, device=device, seed=seed, dtype=dt)
    rec["nodes"], rec["edges"] = int(x.shape[0]), int(ei.shape[1])
    layer.train(mode == "train")
    g = prepare_graph(ei, x.shape[0], x.shape[0], x.device)
    rec["flops"] = model_flops(layer, g.num_edges, int((g.degree > 0).sum()), provider, mode)
    rec["base_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fwd_t, bwd_t = [], []
    for it in range(warmup + repeats):
        xs = x.clone().requires_grad_(mode != "inference")
        ps = pos.clone().requires_grad_(mode != "inference")
        at = attr.clone().requires_grad_(mode != "inference")
        _sync(device)
        t0 = time.perf_counter()
        if mode == "inference":
            with torch.no_grad():
                out = layer(xs, ei, edge_attr=at, pos=ps)
            _sync(device)
            t1 = t2 = time.perf_counter()
        else:
            out = layer(xs, ei, edge_attr=at, pos=ps)
            _sync(device)
            t1 = time.perf_counter()
            out.backward(torch.ones_like(out))
            _sync(device)
            t2 = time.perf_counter()
        if it >= warmup:
            fwd_t.append(t1 - t0)
            bwd_t.append(t2 - t1)
        del out
    tot = sorted(f + b for f, b in zip(fwd_t, bwd_t))
    q = lambda v, f: v[min(len(v) - 1, int(round(f * (len(v) - 1))))]  # noqa: E731
    rec.update({
        "time_s": statistics.median(tot), "time_p20_s": q(tot, 0.2), "time_p80_s": q(tot, 0.8),
        "forward_s": statistics.median(fwd_t), "backward_s": statistics.median(bwd_t), "repeats": repeats,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })
    rec["tflops_per_s"] = rec["flops"] / rec["time_s"] / 1e12
    if torch.device(device).type == "cuda":
        rec["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return rec


def environment(device: str = "cpu") -> Dict:
    import escnn
    import numpy

    env = {
        "date": _dt.date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
        "numpy": numpy.__version__, "escnn": getattr(escnn, "__version__", "?"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(), "threads": torch.get_num_threads(),
        "cpu": _cpu_name(), "cores": os.cpu_count(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.device(device).type == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
    else:
        env["device_name"] = f"CPU: {env['cpu']} ({env['cores']} cores)"
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_child(case: Dict, timeout: float) -> Dict:
    """Run one case in a fresh interpreter (its own peak RSS); failures come back as records with an error."""
    cmd = [sys.executable, "-m", "ik_fast.bench", "--child", json.dumps(case)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timeout after {timeout:.0f} s"}
    for line in reversed(res.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    err = res.stderr.strip().splitlines()
    msg = err[-1] if err else f"exit code {res.returncode}"
    if "out of memory" in res.stderr.lower() or res.returncode in (-9, 137):
        msg = "out of memory"
    return {**case, "error": msg}


def format_table(records: List[Dict]) -> str:
    rows = ["| problem | provider | mode | edges | time (s) [p20-p80] | fwd / bwd (s) | peak RSS (MB) | GFLOP/s |",
            "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            rows.append(f"| {r['problem']} | {r['provider']} | {r['mode']} | | {r['error']} | | | |")
            continue
        rows.append(
            f"| {r['problem']} | {r['provider']} | {r['mode']} | {r['edges']:,} | {r['time_s']:.3f} "
            f"[{r['time_p20_s']:.3f}-{r['time_p80_s']:.3f}] | {r['forward_s']:.3f} / {r['backward_s']:.3f} | "
            f"{r.get('peak_gpu_mb', r['peak_rss_mb']):,.0f} | {r['tflops_per_s'] * 1e3:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ik_fast.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--problems", default="cpu")
    ap.add_argument("--providers", default="reference,torch")
    ap.add_argument("--modes", default="train")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=None, help="write the records and the environment as JSON")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        case = json.loads(args.child)
        print(json.dumps(measure(**case)))
        return 0
    cases = [dict(problem=p, provider=v, mode=m, repeats=args.repeats, warmup=args.warmup, device=args.device,
                  dtype=args.dtype)
             for p in args.problems.split(",") for m in args.modes.split(",") for v in args.providers.split(",")]
    records = []
    for i, case in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] {case['problem']} {case['provider']} {case['mode']} ...", file=sys.stderr,
              flush=True)
        records.append(run_child(case, args.timeout))
    table = format_table(records)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"environment": environment(args.device), "records": records}, f, indent=1)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
