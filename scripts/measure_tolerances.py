"""Measure the equivariance error of the correct layer over many seeds, per gspace and dtype, to set the bounds of
ik_fast.testing's tolerance table (the docs' equivariance page). One-off; not part of CI.

    PYTHONPATH=. python scripts/measure_tolerances.py --seeds 10 [--json OUT.json] > errors.jsonl
    PYTHONPATH=. python scripts/measure_tolerances.py --o3-mixed [--seeds 3] [--json OUT.json]
    PYTHONPATH=. python scripts/measure_tolerances.py --nonlinearity gated --groups O3,SO3,SO2,O2 --seeds 3 ...

Each line: gspace, family, seed, dtype, mode, worst error on exact elements (8 of them) and on 8 random elements.
``--json`` also writes the records (``ik_fast/records.py``, kind ``equivariance``) that ``benchmarks/report.py``
renders: per gspace (the record's problem, its escnn name) and dtype (its precision), ``rel_error_random_elements``
and ``rel_error_exact_elements``, each the largest over the seeds, elements and both modes (mode ``train+eval``), with
the range over seeds as spread; with ``--o3-mixed``, one ``rel_error_random_elements`` record per sampling grid
(``extra.grid``).
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

COMMAND = "python scripts/measure_tolerances.py"


def builder(name):
    """The escnn call that builds a gspace of tests/conftest.py, as the records name it: ``rot2dOnR2(8)``,
    ``flipRot3dOnR3`` (no arguments, or the continuous group's -1, left out)."""
    import inspect
    import re

    try:
        m = re.search(r"gspaces\.(\w+)\(([^)]*)\)", inspect.getsource(GSPACES[name][0]))
    except (OSError, TypeError):
        m = None
    if m is None:
        return name
    return m.group(1) + (f"({m.group(2)})" if m.group(2) not in ("", "-1") else "")


def errors(seeds, groups, kind, nonlinearity="fourier_elu"):
    """One dict per gspace, seed, dtype and mode (printed as a JSON line as it is measured)."""
    rows = []
    for name in groups:
        gs = get_gspace(name)
        for seed in range(seeds):
            in_t, out_t, attr_t = field_types(gs, kind)
            torch.manual_seed(seed)
            conv = ik_fast.ImplicitPointConv(
                in_t, out_t, attr_t, n_layers=3, n_channels=3, backend="torch", nonlinearity=nonlinearity
            )
            randomize_(conv, seed)
            for dtype in (torch.float32, torch.float64):
                conv = conv.to(dtype)
                graph = kernel_graph(conv, n_nodes=12, k=4, seed=seed, dtype=dtype)
                for mode in ("eval", "train"):
                    getattr(conv, mode)()
                    state = {k: v.clone() for k, v in conv.state_dict().items()}
                    r = check_equivariance(conv, graph, n_exact=8, n_random=8, seed=seed)
                    conv.load_state_dict(state)
                    rows.append(
                        {
                            "gspace": name,
                            "escnn": builder(name) + ("" if nonlinearity == "fourier_elu" else f"+{nonlinearity}"),
                            "nonlinearity": nonlinearity,
                            "group": gs.fibergroup.name,
                            "family": group_family(gs),
                            "seed": seed,
                            "dtype": str(dtype).split(".")[-1],
                            "mode": mode,
                            "exact": r["exact"],
                            "random": r["random"],
                        }
                    )
                    print(
                        json.dumps(
                            {k: rows[-1][k] for k in ("gspace", "family", "seed", "dtype", "mode", "exact", "random")}
                        ),
                        flush=True,
                    )
    return rows


def _worst(values):
    """(largest, {"min", "max", "n"} over seeds) of per-seed worst errors; None without values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return max(values), {"min": min(values), "max": max(values), "n": len(values)}


def error_records(rows, kind, seeds, command):
    from ik_fast import records

    prov = records.provenance("cpu")
    out = []
    for name, dtype in dict.fromkeys((r["gspace"], r["dtype"]) for r in rows):
        rs = [r for r in rows if (r["gspace"], r["dtype"]) == (name, dtype)]
        for metric, key in (("rel_error_random_elements", "random"), ("rel_error_exact_elements", "exact")):
            per_seed = [
                max((r[key] for r in rs if r["seed"] == s and r[key] is not None), default=None) for s in range(seeds)
            ]
            value, spread = _worst(per_seed)
            if value is None:
                continue  # a finite group has no random elements, a group without exact elements none of those
            out.append(
                records.record(
                    "equivariance",
                    rs[0]["escnn"],
                    "torch",
                    metric,
                    value,
                    "1",
                    mode="train+eval",
                    precision=dtype,
                    spread=spread,
                    prov=prov,
                    extra={
                        "group": rs[0]["group"],
                        "gspace": name,
                        "family": rs[0]["family"],
                        "nonlinearity": rs[0].get("nonlinearity", "fourier_elu"),
                        "seeds": seeds,
                        "elements": 8,
                        "layer": f"field_types(gs, {kind!r}) of tests/conftest.py, MLP 3 x 3, random "
                        "biases and batch-norm statistics, 12-node test graph",
                        "command": command,
                    },
                )
            )
    return out


def o3_mixed(seeds=3):
    """The O(3) mixed case in float64: scalar, vector and frequency-2 fields in; vector, scalar and
    pseudoscalar out; scalar and vector attributes. Default grid vs grid="paper" vs a 400-point Thomson grid."""
    import time

    from escnn import gspaces
    from escnn import nn as enn

    gs = gspaces.flipRot3dOnR3()
    G = gs.fibergroup
    in_t = enn.FieldType(gs, [G.irrep(0, 0), G.irrep(1, 1), G.irrep(0, 2)])
    out_t = enn.FieldType(gs, [G.irrep(1, 1), G.irrep(0, 0), G.irrep(1, 0)])
    attr_t = enn.FieldType(gs, [G.irrep(0, 0), G.irrep(1, 1)])
    rows = []
    for grid in (None, "paper", {"type": "thomson", "N": 400}):
        for seed in range(seeds):
            torch.manual_seed(seed)
            t = time.time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                conv = ik_fast.ImplicitPointConv(
                    in_t, out_t, attr_t, n_layers=3, n_channels=8, grid=grid, backend="torch"
                )
            built = time.time() - t
            conv = randomize_(conv, seed).double().eval()
            graph = kernel_graph(conv, n_nodes=32, k=8, seed=seed)
            r = check_equivariance(conv, graph, n_exact=8, n_random=8, seed=seed)
            label = "default" if grid is None else grid if isinstance(grid, str) else f"{grid['type']}-{grid['N']}"
            rows.append(
                {
                    "case": "o3_mixed",
                    "grid": str(grid),
                    "grid_label": label,
                    "G": conv.kernel.act_A.shape[0],
                    "quality": conv.kernel.grid_quality,
                    "seed": seed,
                    "exact": r["exact"],
                    "random": r["random"],
                    "build_s": round(built, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def grid_records(rows, command):
    from ik_fast import records

    prov = records.provenance("cpu")
    out = []
    for grid in dict.fromkeys(r["grid"] for r in rows):
        rs = [r for r in rows if r["grid"] == grid]
        value, spread = _worst([r["random"] for r in rs])
        label = rs[0]["grid_label"]
        out.append(
            records.record(
                "equivariance",
                "O3-mixed",
                "torch",
                "rel_error_random_elements",
                value,
                "1",
                mode="eval",
                precision="float64",
                spread=spread,
                prov=prov,
                extra={
                    "grid": label,
                    "grid_elements": rs[0]["G"],
                    "grid_quality": rs[0]["quality"],
                    "seeds": len(rs),
                    "elements": 8,
                    "command": command + " (O(3): scalar, vector and frequency-2 fields in; vector, "
                    "scalar, pseudoscalar out; scalar and vector attributes; MLP 3 x 8)",
                },
            )
        )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=None, help="seeds per case (default 10; 3 with --o3-mixed)")
    ap.add_argument("--groups", default=",".join(GSPACES))
    ap.add_argument("--kind", default="mixed_attr")
    ap.add_argument(
        "--nonlinearity", default="fourier_elu", help="the kernel MLP's (records name the gspace BUILDER+NONLINEARITY)"
    )
    ap.add_argument(
        "--o3-mixed", dest="o3_mixed", action="store_true", help="the O(3) mixed case on three sampling grids instead"
    )
    ap.add_argument("--json", default=None, help="also write the records (kind equivariance) to this file")
    args = ap.parse_args(argv)
    command = " ".join([COMMAND, *(sys.argv[1:] if argv is None else argv)])
    if args.o3_mixed:
        rows = o3_mixed(args.seeds or 3)
        recs = grid_records(rows, command)
    else:
        seeds = args.seeds or 10
        rows = errors(seeds, args.groups.split(","), args.kind, args.nonlinearity)
        recs = error_records(rows, args.kind, seeds, command)
    if args.json:
        from ik_fast import records

        records.write(args.json, recs)
        print(f"records: {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
