"""The edge-attribute ablation at a reduced budget: the QM9 quick preset with no attributes, bond attributes and
atom-type attributes (same split, seed and budget), then a Markdown table and a plot of the validation curves.

    python examples/qm9_ablation.py [--out build/runs/ablation] [--plot-only] [trainer options, e.g. --seed 1]
"""

import json
import os
import sys

KINDS = ("none", "bond", "atom")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = "build/runs/ablation"
    if "--out" in argv:
        i = argv.index("--out")
        out = argv[i + 1]
        del argv[i : i + 2]
    plot_only = "--plot-only" in argv
    argv = [a for a in argv if a != "--plot-only"]
    if not plot_only:
        from ik_fast.models.train import main as train_main

        for kind in KINDS:
            rc = train_main(["qm9", "--quick", "--edge-attrs", kind, "--out", os.path.join(out, kind), *argv])
            if rc:
                return rc
    res = {k: json.load(open(os.path.join(out, k, "history.json"))) for k in KINDS}
    print("| edge attributes | val MAE (meV) | test MAE (meV) | val / baseline | wall (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for k, r in res.items():
        print(
            f"| {k} | {r['val_mae']:.1f} | {r['test_mae']:.1f} | {r['val_mae'] / r['baseline_val']:.3f} | "
            f"{r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    r0 = next(iter(res.values()))
    print(f"baseline (training mean): val {r0['baseline_val']:.1f} meV, test {r0['baseline_test']:.1f} meV")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, r in res.items():
        h = r["history"]
        ax.plot(h["val_step"], h["val_metric"], "o-", label=f"{k}: val MAE {r['val_mae']:.0f} meV")
    ax.axhline(r0["baseline_val"], color="k", ls="--", label="baseline (training mean)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation MAE, HOMO (meV)")
    ax.set_title("QM9 quick preset: edge attributes of the implicit kernels")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ablation.png"), dpi=100)
    print(f"plot: {os.path.join(out, 'ablation.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
