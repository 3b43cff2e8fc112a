"""The host's share of a fused backend's training step: the step timed as it runs, and again with every op of the
implementation answered from a cache (its outputs from the first call, cloned), so what remains is everything but the
kernels — the lowering, graph preparation, the batch norms' statistics and affine maps, autograd, the layer.

Run from a checkout (``PYTHONPATH`` picks which one: the same file times an older commit's package)::

    python benchmarks/host_time.py --problem qm9-400 --backend native --rounds 3 [--json OUT.json]

Prints one line per round and the medians; ``--json`` writes ``host_time`` and ``step_time`` records
(:mod:`ik_fast.records`). Time it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _cached_ops(ops):
    """Replace the op layer's op lookup so that each op answers from the outputs of its first call."""
    import torch

    real, memo = ops._op, {}

    def clone(v):
        if isinstance(v, torch.Tensor):
            return v.clone()
        if isinstance(v, (list, tuple)):
            return type(v)(clone(u) for u in v)
        return v

    def lookup(impl, stage):
        fn = real(impl, stage)

        def cached(*args):
            key = (impl, stage, tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args))
            if key not in memo:
                memo[key] = fn(*args)
            return clone(memo[key])

        return cached

    ops._op = lookup
    return lambda: setattr(ops, "_op", real)


def _time(step, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/host_time.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--problem", default="qm9-400")
    ap.add_argument("--backend", default="native")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50, help="timed steps per round and variant")
    ap.add_argument("--json", default=None, help="write records to this file")
    args = ap.parse_args(argv)

    import torch

    from ik_fast import ops, records
    from ik_fast.tools.bench import setup_case

    step, rec = setup_case(args.problem, args.backend, "train")
    for _ in range(5):
        step()
    full, host = [], []
    for r in range(args.rounds):
        full.append(_time(step, args.steps))
        undo = _cached_ops(ops)
        try:
            step()  # (fills the cache)
            host.append(_time(step, args.steps))
        finally:
            undo()
        print(f"round {r}: step {full[-1] * 1e3:.2f} ms, host {host[-1] * 1e3:.2f} ms", flush=True)
    f, h = statistics.median(full), statistics.median(host)
    print(
        f"{args.problem} {args.backend} ({rec['edges']} edges, {torch.get_num_threads()} threads): "
        f"step {f * 1e3:.2f} ms, host {h * 1e3:.2f} ms ({100 * h / f:.0f}%), kernels {(f - h) * 1e3:.2f} ms"
    )
    if args.json:
        prov = records.provenance("cpu")
        extra = {"edges": rec["edges"], "rounds": args.rounds, "steps": args.steps, "command": " ".join(sys.argv)}
        out = [
            records.record(
                "timing",
                args.problem,
                args.backend,
                metric,
                value,
                "s",
                mode="train",
                spread={"min": min(vals), "max": max(vals)},
                extra=extra,
                prov=prov,
            )  # fmt: skip
            for metric, value, vals in (("host_time", h, host), ("step_time", f, full))
        ]
        records.write(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
