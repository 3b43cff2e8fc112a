"""The foundation's CPU benchmark: forward+backward of one layer, `reference` vs `torch`, on problem ``cpu``
(16 fields of O(3) sphere type L<=2 = 144 dims in and out, MLP 3 x 16, 4 scalar attributes, N=2048, k=16).

    bash scripts/run.sh bench            # or: python benchmarks/bench_cpu.py [--repeats N]

Each case runs in its own process (peak resident set per case). Writes benchmarks/results/cpu-<date>.json and
prints the table, the speedup and the memory ratio.
"""

import argparse
import datetime
import json
import os
import sys

from ik_fast.bench import environment, format_table, run_child


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problem", default="cpu")
    ap.add_argument("--modes", default="train,eval")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference-repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    records = []
    modes = args.modes.split(",")
    cases = [(m, p) for m in modes for p in ("reference", "torch")]
    for i, (mode, provider) in enumerate(cases):
        reps = args.reference_repeats if provider == "reference" else args.repeats
        print(f"[{i + 1}/{len(cases)}] {args.problem} {provider} {mode} (x{reps}) ...", file=sys.stderr, flush=True)
        records.append(run_child(dict(problem=args.problem, provider=provider, mode=mode, repeats=reps, warmup=1),
                                 timeout=3600))
    env = environment("cpu")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"cpu-{datetime.date.today()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"environment": env, "records": records}, f, indent=1)
    print(f"device: {env['device_name']}, torch {env['torch']}, {env['threads']} threads, float32\n")
    print(format_table(records))
    for mode in modes:
        r = {rec["provider"]: rec for rec in records if rec["mode"] == mode and "error" not in rec}
        if len(r) == 2:
            print(f"{mode}: torch is {r['reference']['time_s'] / r['torch']['time_s']:.1f}x faster than reference, "
                  f"peak RSS {r['reference']['peak_rss_mb'] / r['torch']['peak_rss_mb']:.1f}x lower")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
