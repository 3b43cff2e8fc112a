"""ik_fast demo: train the paper's O(3) QM9 model on real molecules (or compare the backends on one layer).

Part 1 trains the quick preset of ``python -m ik_fast.models.train qm9 --quick`` (HOMO, 1,024 training molecules, two
epochs; a progress bar per epoch, the validation MAE after each, the test MAE at the end) and ends with
``val_mae_meV=<x> baseline_meV=<y>``. Extra arguments go to the trainer (e.g. ``--edge-attrs atom``).
Part 2 (``--layers``, instead of training) builds the research model's layer (8 fields of the O(3) sphere type
L <= 1, kernel MLP 3 x 8, 4 radial edge attributes) on 32 molecules from QM9 (every pair of atoms of a molecule is
an edge), runs every backend available here and prints, side by side: forward+backward time in training mode,
peak memory, agreement with the reference and equivariance error under a random rotation-reflection.

    bash scripts/run.sh demo            # or: python examples/demo.py [trainer options]
    bash scripts/run.sh demo --layers   # only the backend comparison
"""

import sys
import warnings

import torch

warnings.filterwarnings("ignore", message=".*py3nj.*")

import ik_fast  # noqa: E402
from ik_fast.testing import equivariance_error  # noqa: E402
from ik_fast.tools.bench import run_child  # noqa: E402
from ik_fast.tools.problems import build_inputs, build_layer, get_problem  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--layers" not in argv:
        from ik_fast.models.train import main as train_main

        return train_main(["qm9", "--quick", *argv])
    return compare_layers()


def compare_layers() -> int:
    torch.manual_seed(0)
    problem = get_problem("P")
    x, pos, ei, attr = build_inputs(problem)
    print(
        f"QM9 batch: {problem.molecules} molecules, {x.shape[0]} atoms, {ei.shape[1]} edges; "
        f"field type {problem.fields} x O(3) sphere L<={problem.L} ({x.shape[1]} dims), MLP "
        f"{problem.n_layers} x {problem.channels}, {problem.n_attr} RBF edge attributes"
    )
    backends = ik_fast.available_backends()
    print(f"backends available here: {', '.join(backends)}\n")

    layer = build_layer(problem, backend="reference").eval()
    G = layer.in_type.fibergroup
    with torch.no_grad():
        ref = layer(x, ei, edge_attr=attr, pos=pos)
    g = G.sample()
    rows = []
    for b in backends:
        layer.backend = b
        with torch.no_grad():
            out = layer(x, ei, edge_attr=attr, pos=pos)
        agree = float((out - ref).norm() / ref.norm())
        eq = equivariance_error(layer, g, pos, x, ei, attr)
        rec = run_child(dict(problem="P", provider=b, mode="train", repeats=5, warmup=1), timeout=900)
        if "error" in rec:
            rows.append((b, rec["error"], "", "", agree, eq))
            continue
        rows.append(
            (
                b,
                f"{rec['time_s'] * 1e3:.1f}",
                f"{rec['forward_s'] * 1e3:.1f} / {rec['backward_s'] * 1e3:.1f}",
                f"{rec['peak_rss_mb']:.0f}",
                agree,
                eq,
            )
        )
    print(
        f"{'backend':<10} {'fwd+bwd ms':>11} {'fwd / bwd ms':>15} {'peak RSS MB':>12} {'vs reference':>13} "
        f"{'equiv. error':>13}"
    )
    for b, t, fb, mem, agree, eq in rows:
        print(f"{b:<10} {t:>11} {fb:>15} {mem:>12} {agree:>13.1e} {eq:>13.1e}")
    print(
        f"\n(training mode, float32, {torch.get_num_threads()} threads; equivariance error: relative, one random "
        f"element of O(3); the Fourier ELU samples on a finite grid, so it is approximate on continuous groups)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
