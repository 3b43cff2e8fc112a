"""Compile time and compiled vs eager training-step time of ImplicitPointConv on one backend (CPU).

    python scripts/compile_timing.py [--backend NAME] [problem ...]     (default: torch; tiny M@256)

One training step = forward, a scalar loss, backward. The compiled module is torch.compile(layer, fullgraph=True,
dynamic=True); its first call includes compilation (reported as compile time, forward+backward); a second graph of
another size must not recompile. Steps are timed as the median of 10 after 2 warm-up steps.
"""

import statistics
import sys
import time
import warnings

import torch

from ik_fast.tools.problems import build_inputs, build_layer, get_problem

warnings.filterwarnings("ignore")


def step(f, x, ei, a, pos):
    y = f(x, ei, edge_attr=a, pos=pos)
    y.square().mean().backward()


def median_time(f, args, n=10):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        step(f, *args)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(names, backend="torch"):
    for name in names:
        p = get_problem(name)
        layer = build_layer(p, backend=backend).train()
        x, pos, ei, a = build_inputs(p)
        x2, pos2, ei2, a2 = build_inputs(p.with_nodes(int(p.nodes * 1.5)), seed=1)
        args = (x, ei, a, pos)
        for _ in range(2):
            step(layer, *args)
        eager = median_time(layer, args)
        torch._dynamo.reset()
        comp = torch.compile(layer, fullgraph=True, dynamic=True)
        t = time.perf_counter()
        step(comp, *args)
        first = time.perf_counter() - t
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        t = time.perf_counter()
        step(comp, x2, ei2, a2, pos2)
        second = time.perf_counter() - t
        recompiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames
        step(comp, *args)
        compiled = median_time(comp, args)
        print(
            f"{name} ({backend}): {ei.shape[1]} edges; eager step {eager * 1e3:.0f} ms; compiled: first call "
            f"(compile + step) {first:.1f} s, second graph ({ei2.shape[1]} edges) {second:.2f} s with "
            f"{recompiled} recompilations, "
            f"step {compiled * 1e3:.0f} ms ({eager / compiled:.2f}x eager)",
            flush=True,
        )


if __name__ == "__main__":
    args = sys.argv[1:]
    backend = "torch"
    if args[:1] == ["--backend"]:
        backend, args = args[1], args[2:]
    main(args or ["tiny", "M@256"], backend)
