"""Measure the equivariance error of the correct layer over many seeds, per gspace and dtype, to set the bounds of
ik_fast.testing's tolerance table (README, "Equivariance"). One-off; not part of CI.

    PYTHONPATH=. python scripts/measure_tolerances.py --seeds 10 > errors.jsonl

Each line: gspace, family, seed, dtype, mode, worst error on exact elements (8 of them) and on 8 random elements.
"""

import argparse
import json
import sys
import warnings

import torch

sys.path.insert(0, "tests")
warnings.filterwarnings("ignore")

from conftest import GSPACES, field_types, get_gspace  # noqa: E402

import ik_fast  # noqa: E402
from ik_fast.testing import check_equivariance, group_family, kernel_graph, randomize_  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--groups", default=",".join(GSPACES))
    ap.add_argument("--kind", default="mixed_attr")
    args = ap.parse_args()
    for name in args.groups.split(","):
        gs = get_gspace(name)
        for seed in range(args.seeds):
            in_t, out_t, attr_t = field_types(gs, args.kind)
            torch.manual_seed(seed)
            conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=3, backend="torch")
            randomize_(conv, seed)
            for dtype in (torch.float32, torch.float64):
                conv = conv.to(dtype)
                graph = kernel_graph(conv, n_nodes=12, k=4, seed=seed, dtype=dtype)
                for mode in ("eval", "train"):
                    getattr(conv, mode)()
                    state = {k: v.clone() for k, v in conv.state_dict().items()}
                    r = check_equivariance(conv, graph, n_exact=8, n_random=8, seed=seed)
                    conv.load_state_dict(state)
                    print(json.dumps({"gspace": name, "family": group_family(gs), "seed": seed,
                                      "dtype": str(dtype).split(".")[-1], "mode": mode, "exact": r["exact"],
                                      "random": r["random"]}), flush=True)


if __name__ == "__main__" and "--o3-mixed" not in sys.argv:
    main()


def o3_mixed(seeds=3):
    """The O(3) mixed case of issue 10 in float64: scalar, vector and frequency-2 fields in; vector, scalar and
    pseudoscalar out; scalar and vector attributes. Default grid vs grid="paper" vs a 400-point Thomson grid."""
    import time

    from escnn import gspaces
    from escnn import nn as enn

    gs = gspaces.flipRot3dOnR3()
    G = gs.fibergroup
    in_t = enn.FieldType(gs, [G.irrep(0, 0), G.irrep(1, 1), G.irrep(0, 2)])
    out_t = enn.FieldType(gs, [G.irrep(1, 1), G.irrep(0, 0), G.irrep(1, 0)])
    attr_t = enn.FieldType(gs, [G.irrep(0, 0), G.irrep(1, 1)])
    for grid in (None, "paper", {"type": "thomson", "N": 400}):
        for seed in range(seeds):
            torch.manual_seed(seed)
            t = time.time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=8, grid=grid,
                                                 backend="torch")
            built = time.time() - t
            conv = randomize_(conv, seed).double().eval()
            graph = kernel_graph(conv, n_nodes=32, k=8, seed=seed)
            r = check_equivariance(conv, graph, n_exact=8, n_random=8, seed=seed)
            print(json.dumps({"case": "o3_mixed", "grid": str(grid), "G": conv.kernel.act_A.shape[0],
                              "quality": conv.kernel.grid_quality, "seed": seed, "exact": r["exact"],
                              "random": r["random"], "build_s": round(built, 1)}), flush=True)


if __name__ == "__main__" and "--o3-mixed" in sys.argv:
    o3_mixed()
