"""Plots and the README's results section, generated from the latest results file of each device.

    python benchmarks/report.py            # writes benchmarks/results/<device>-*.png and updates README.md

Per device: time vs edges and peak memory vs edges (log-log) for the M and H sweeps, per provider and mode, and a
bar chart of the torch backend's speedups over `reference` and escnn on the fixed problems.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(os.path.dirname(HERE), "README.md")
START, END = "<!-- results:start -->", "<!-- results:end -->"


def latest_per_device():
    files = defaultdict(list)
    for path in glob.glob(os.path.join(RESULTS, "*.json")):
        m = re.match(r"(.+)-(\d{4}-\d{2}-\d{2})\.json$", os.path.basename(path))
        if m:
            files[m.group(1)].append((m.group(2), path))
    return {slug: max(v)[1] for slug, v in sorted(files.items())}


def _mem(r):
    return r.get("peak_gpu_mb", r.get("peak_rss_mb"))


def plots(slug: str, data: dict) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in data["records"] if "error" not in r]
    made = []
    is_sweep = lambda name: name.startswith(("M@", "H@"))  # noqa: E731
    sweep = [r for r in recs if is_sweep(r["problem"])]
    if sweep:
        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        for col, base in enumerate(["M", "H"]):
            for row, (key, label) in enumerate([("time_s", "time (s)"), ("mem", "peak memory (MB)")]):
                ax = axes[row][col]
                for prov in sorted({r["provider"] for r in sweep}):
                    for mode, style in (("train", "-o"), ("inference", "--s")):
                        pts = sorted((r["edges"], r["time_s"] if key == "time_s" else _mem(r)) for r in sweep
                                     if r["problem"].startswith(base + "@") and r["provider"] == prov
                                     and r["mode"] == mode)
                        if pts:
                            ax.plot(*zip(*pts), style, label=f"{prov} ({mode})")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("edges")
                ax.set_ylabel(label)
                ax.set_title(f"config {base}: {label}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle(data["environment"]["device_name"])
        fig.tight_layout()
        path = os.path.join(RESULTS, f"{slug}-sweep.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        made.append(path)
    fixed = sorted({r["problem"] for r in recs if not is_sweep(r["problem"])})
    bars = []
    for prob in fixed:
        for mode in ("train", "inference"):
            by = {r["provider"]: r for r in recs if r["problem"] == prob and r["mode"] == mode}
            if "torch" in by:
                for base in ("reference", "escnn"):
                    if base in by:
                        bars.append((f"{prob}\n{mode}", base, by[base]["time_s"] / by["torch"]["time_s"]))
    if bars:
        fig, ax = plt.subplots(figsize=(max(6, len(bars) * 0.55), 4))
        labels = sorted({b[0] for b in bars}, key=lambda s: [x for x, _, _ in bars].index(s))
        for j, base in enumerate(("reference", "escnn")):
            xs = [labels.index(lbl) + (j - 0.5) * 0.38 for lbl, b, _ in bars if b == base]
            ys = [v for _, b, v in bars if b == base]
            ax.bar(xs, ys, width=0.38, label=f"torch vs {base}")
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("speedup (x)")
        ax.set_title(f"ik_fast torch backend speedup — {data['environment']['device_name']}")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(RESULTS, f"{slug}-speedup.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        made.append(path)
    return made


def table(data: dict) -> str:
    rows = ["| problem | edges | mode | provider | time (s) median [p20–p80] | fwd / bwd (s) | peak mem (MB) | "
            "model GFLOP/s |", "|---|---|---|---|---|---|---|---|"]
    for r in data["records"]:
        if "error" in r:
            rows.append(f"| {r['problem']} | | {r['mode']} | {r['provider']} | {r['error']} | | | |")
            continue
        rows.append(f"| {r['problem']} | {r['edges']:,} | {r['mode']} | {r['provider']} | {r['time_s']:.3g} "
                    f"[{r['time_p20_s']:.3g}–{r['time_p80_s']:.3g}] | {r['forward_s']:.3g} / {r['backward_s']:.3g} "
                    f"| {_mem(r):,.0f} | {r['tflops_per_s'] * 1e3:.2f} |")
    return "\n".join(rows)


def section() -> str:
    out = [START]
    for slug, path in latest_per_device().items():
        with open(path) as f:
            data = json.load(f)
        env = data["environment"]
        made = plots(slug, data)
        rel = os.path.relpath(path, os.path.dirname(README))
        out.append(f"### {env['device_name']} — {env['date']}\n")
        out.append(f"torch {env['torch']}, escnn {env['escnn']}, NumPy {env['numpy']}, {env['threads']} threads, "
                   f"float32 (matmul precision `{env['float32_matmul_precision']}`). Reproduce: "
                   f"`{data.get('command', 'python -m ik_fast.bench')}`; raw records: `{rel}`.\n")
        for m in made:
            out.append(f"![{os.path.basename(m)}]({os.path.relpath(m, os.path.dirname(README))})\n")
        out.append(table(data) + "\n")
    out.append(END)
    return "\n".join(out)


def main() -> int:
    with open(README) as f:
        text = f.read()
    new = section()
    if START in text and END in text:
        text = text[:text.index(START)] + new + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + new + "\n"
    with open(README, "w") as f:
        f.write(text)
    print(f"README results section updated from {len(latest_per_device())} device(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
