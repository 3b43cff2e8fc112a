"""Error of each backend's float32 modes against a float64 evaluation of the same layer (issue 8, item 4).

    TRITON_INTERPRET=1 python benchmarks/precision.py --problem tiny --backends triton,torch,reference \
        --modes ieee,bf16 --json OUT.json        # on CPU (the Triton kernels in the interpreter)
    python benchmarks/precision.py --problem M@64 --modes ieee,tf32,bf16 --device cuda --json OUT.json   # on a GPU

For each backend, mode and training/eval mode: one forward and backward of the layer in float32 (``ieee``: matmul
precision ``"highest"``; ``tf32``: ``"high"``; ``bf16``: under ``torch.autocast(dtype=torch.bfloat16)``) against the
same layer in float64 with the ``reference`` backend; reported are the relative errors (Frobenius norm) of the output
and of the gradients to the node features and to the kernel MLP's parameters (all of them, concatenated). This is
the measurement that decides whether a faster mode (e.g. 3xTF32) may serve ``"highest"``: its errors must stay within
2x of IEEE float32's. It measures no speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def _run(layer, x, ei, attr, pos, w, mode: str, device: str):
    import torch

    for p in layer.parameters():
        p.grad = None
    xs = x.clone().requires_grad_(True)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high" if mode == "tf32" else "highest")
        if mode == "bf16":
            with torch.autocast(device, dtype=torch.bfloat16):
                out = layer(xs, ei, edge_attr=attr, pos=pos)
        else:
            out = layer(xs, ei, edge_attr=attr, pos=pos)
        (out.float() * w.to(out.dtype)).sum().backward()
    finally:
        torch.set_float32_matmul_precision(old)
    grads = torch.cat([p.grad.reshape(-1).double() for p in layer.kernel.parameters() if p.grad is not None])
    return out.detach(), xs.grad.detach(), grads


def measure(problem: str, backends, modes, device: str, seed: int = 0):
    import torch

    from ik_fast.problems import build_inputs, build_layer, get_problem

    p = get_problem(problem)
    x, pos, ei, attr = build_inputs(p, seed=seed, dtype=torch.float64)
    x, pos, ei, attr = (t.to(device) for t in (x, pos, ei, attr))
    w = torch.randn(x.shape[0], build_layer(p, backend="reference", seed=seed).out_type.size,
                    generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(device)
    records = []
    for training in (True, False):
        ref_layer = build_layer(p, backend="reference", seed=seed).to(device=device, dtype=torch.float64)
        ref_layer.train(training)
        ref = _run(ref_layer, x, ei, attr, pos, w, "ieee", device)
        for backend in backends:
            for mode in modes:
                if mode == "tf32" and device != "cuda":
                    continue  # TF32 exists on tensor cores only
                layer = build_layer(p, backend=backend, seed=seed).to(device=device, dtype=torch.float32)
                layer.train(training)
                t = time.perf_counter()
                out, gx, gp = _run(layer, x.float(), ei, attr.float(), pos.float(), w, mode, device)
                records.append({"problem": problem, "backend": backend, "mode": mode,
                                "training": training, "device": device, "edges": int(ei.shape[1]),
                                "out": _rel(out, ref[0]), "grad_x": _rel(gx, ref[1]), "grad_params": _rel(gp, ref[2]),
                                "seconds": time.perf_counter() - t})
                r = records[-1]
                print(f"{problem} {backend:9s} {mode:5s} {'train' if training else 'eval ':5s} out {r['out']:.2e} "
                      f"grad_x {r['grad_x']:.2e} grad_params {r['grad_params']:.2e}", flush=True)
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problem", default="tiny")
    ap.add_argument("--backends", default="triton,torch,reference")
    ap.add_argument("--modes", default="ieee,tf32,bf16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    recs = measure(args.problem, args.backends.split(","), args.modes.split(","), args.device, args.seed)
    if args.json:
        dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        with open(args.json, "w") as fh:
            json.dump({"command": "python benchmarks/precision.py " + " ".join(argv or sys.argv[1:]),
                       "device_name": dev, "torch": torch.__version__,
                       "interpreter": os.environ.get("TRITON_INTERPRET"), "records": recs}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
