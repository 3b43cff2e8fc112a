"""Error of each backend's float32 modes against a float64 evaluation of the same layer.

    TRITON_INTERPRET=1 python benchmarks/precision.py --problem tiny --backends triton,torch,reference \
        --modes ieee,bf16 --json OUT.json        # on CPU (the Triton kernels in the interpreter)
    TRITON_INTERPRET=1 python benchmarks/precision.py --problem tiny --backends triton --modes ieee,tf32,tf32x3 \
        --emulate --json OUT.json                # the tensor cores' TF32 / 3xTF32 rounding emulated on CPU
    python benchmarks/precision.py --problem M@64 --modes ieee,tf32,bf16 --device cuda --json OUT.json   # on a GPU

For each backend, mode and training/eval mode: one forward and backward of the layer in float32 (``ieee``: matmul
precision ``"highest"`` in IEEE arithmetic; ``tf32x3``: ``"highest"`` as split TF32, what the fused backends run it as
on CUDA; ``tf32``: ``"high"``; ``bf16``: under ``torch.autocast(dtype=torch.bfloat16)``; ``ieee`` and ``tf32x3`` are
chosen through ``IK_FAST_HIGHEST``, which the fused backends read) against the
same layer in float64 with the ``reference`` backend; reported are the relative errors (Frobenius norm) of the output
and of the gradients to the node features and to the kernel MLP's parameters (all of them, concatenated). This is
the measurement that decides whether a faster mode (e.g. 3xTF32) may serve ``"highest"``: its errors must stay within
2x of IEEE float32's. It measures no speed. ``tf32`` and ``tf32x3`` exist on CUDA only, or with ``--emulate``: the
Triton kernels in the interpreter with the tensor cores' rounding emulated (:mod:`ik_fast.tools.tensorcore_emulation`;
the device is then named ``..., Triton interpreter, tensor cores emulated``); the other backends have no such mode on
CPU and are skipped there.

``--json OUT.json`` writes the records (``ik_fast/records.py``, kind ``precision``; rewritten after every case),
and ``--name NAME`` also ``benchmarks/results/precision/<device>/<date>-NAME.json``: per backend (the record's
provider), float32 mode (its precision: ``ieee``, ``tf32``, ``bf16``) and training / eval mode (its mode), the metrics
``rel_error_out``, ``rel_error_grad_x`` and ``rel_error_grad_params`` (unit ``1``). On CPU under the interpreter
(``TRITON_INTERPRET=1``) the device is named ``<CPU> (<n> threads), Triton interpreter``. A case that raises gives its
three records without a value and with the error, and the exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


TENSOR_CORE_MODES = ("tf32", "tf32x3")


def _run(layer, x, ei, attr, pos, w, mode: str, device: str):
    import torch

    for p in layer.parameters():
        p.grad = None
    xs = x.clone().requires_grad_(True)
    old = torch.get_float32_matmul_precision()
    old_env = os.environ.get("IK_FAST_HIGHEST")
    try:
        torch.set_float32_matmul_precision("high" if mode == "tf32" else "highest")
        os.environ["IK_FAST_HIGHEST"] = "tf32x3" if mode == "tf32x3" else "ieee"
        if mode == "bf16":
            with torch.autocast(device, dtype=torch.bfloat16):
                out = layer(xs, ei, edge_attr=attr, pos=pos)
        else:
            out = layer(xs, ei, edge_attr=attr, pos=pos)
        (out.float() * w.to(out.dtype)).sum().backward()
    finally:
        torch.set_float32_matmul_precision(old)
        if old_env is None:
            os.environ.pop("IK_FAST_HIGHEST", None)
        else:
            os.environ["IK_FAST_HIGHEST"] = old_env
    grads = torch.cat([p.grad.reshape(-1).double() for p in layer.kernel.parameters() if p.grad is not None])
    return out.detach(), xs.grad.detach(), grads


METRICS = (("rel_error_out", "out"), ("rel_error_grad_x", "grad_x"), ("rel_error_grad_params", "grad_params"))
AGAINST = "float64 evaluation of the same layer (reference backend)"


def measure(problem: str, backends, modes, device: str, seed: int = 0, on_result=None, emulate: bool = False):
    """One dict per (training, backend, mode): the three relative errors, or ``error`` where the case raised;
    ``on_result`` sees each as it is made. ``emulate``: the Triton backend's dots rounded as the tensor cores round
    them (on CPU under the interpreter; the other backends then run ``ieee`` and ``bf16`` only)."""
    import contextlib

    import torch

    from ik_fast.tools.problems import build_inputs, build_layer, get_problem
    from ik_fast.tools.tensorcore_emulation import TensorCoreEmulation

    p = get_problem(problem)
    x, pos, ei, attr = build_inputs(p, seed=seed, dtype=torch.float64)
    x, pos, ei, attr = (t.to(device) for t in (x, pos, ei, attr))
    w = torch.randn(
        x.shape[0],
        build_layer(p, backend="reference", seed=seed).out_type.size,
        generator=torch.Generator().manual_seed(seed + 1),
        dtype=torch.float64,
    ).to(device)
    records = []
    for training in (True, False):
        ref_layer = build_layer(p, backend="reference", seed=seed).to(device=device, dtype=torch.float64)
        ref_layer.train(training)
        ref = _run(ref_layer, x, ei, attr, pos, w, "ieee", device)
        for backend in backends:
            for mode in modes:
                if mode in TENSOR_CORE_MODES and device != "cuda" and not (emulate and backend == "triton"):
                    continue  # TF32 exists on tensor cores only (emulated: for the Triton kernels)
                r = {
                    "problem": problem,
                    "backend": backend,
                    "mode": mode,
                    "training": training,
                    "device": device,
                    "edges": int(ei.shape[1]),
                    "nodes": int(x.shape[0]),
                }
                t = time.perf_counter()
                try:
                    layer = build_layer(p, backend=backend, seed=seed).to(device=device, dtype=torch.float32)
                    layer.train(training)
                    ctx = TensorCoreEmulation() if emulate and backend == "triton" else contextlib.nullcontext()
                    with ctx:
                        out, gx, gp = _run(layer, x.float(), ei, attr.float(), pos.float(), w, mode, device)
                    r.update(out=_rel(out, ref[0]), grad_x=_rel(gx, ref[1]), grad_params=_rel(gp, ref[2]))
                except Exception as exc:  # record it and go on: the other cases still tell something
                    r["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc) else ''}"
                r["seconds"] = time.perf_counter() - t
                records.append(r)
                if "error" in r:
                    print(
                        f"{problem} {backend:9s} {mode:5s} {'train' if training else 'eval ':5s} failed: {r['error']}",
                        flush=True,
                    )
                else:
                    print(
                        f"{problem} {backend:9s} {mode:5s} {'train' if training else 'eval ':5s} out {r['out']:.2e} "
                        f"grad_x {r['grad_x']:.2e} grad_params {r['grad_params']:.2e}",
                        flush=True,
                    )
                if on_result is not None:
                    on_result(records)
    return records


def provenance(device: str, emulate: bool = False) -> dict:
    """The records' provenance; on CPU under Triton's interpreter (``TRITON_INTERPRET=1``), the device says so (and
    that the tensor cores were emulated, ``emulate``)."""
    from ik_fast import records

    prov = records.provenance(device)
    if prov["device"]["type"] == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        tail = ", Triton interpreter" + (", tensor cores emulated" if emulate else "")
        prov = dict(prov, device={**prov["device"], "name": prov["device"]["name"] + tail})
    return prov


def to_records(rows, prov: dict, command: str, seed: int, emulate: bool = False) -> list:
    """The schema records of :func:`measure`'s dicts: three per case (each without a value where the case failed)."""
    from ik_fast import records

    out = []
    for r in rows:
        extra = {
            "edges": r["edges"],
            "nodes": r["nodes"],
            "seconds": round(r["seconds"], 3),
            "against": AGAINST,
            "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
            "seed": seed,
            "command": command,
        }
        if emulate and r["mode"] in TENSOR_CORE_MODES:
            extra["emulated"] = (
                "tensor-core rounding emulated in the interpreter's dots (ik_fast.tools.tensorcore_emulation): "
                "operands rounded as Triton's lowering and the MMA read them, products and sums in float32"
            )
        for metric, key in METRICS:
            out.append(
                records.record(
                    "precision",
                    r["problem"],
                    r["backend"],
                    metric,
                    r.get(key),
                    "1",
                    mode="train" if r["training"] else "eval",
                    precision=r["mode"],
                    extra=extra,
                    error=r.get("error"),
                    prov=prov,
                )
            )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problem", default="tiny")
    ap.add_argument("--backends", default="triton,torch,reference")
    ap.add_argument("--modes", default="ieee,tf32,bf16", help="comma-separated: ieee, tf32, tf32x3, bf16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--emulate",
        action="store_true",
        help="emulate the tensor cores' TF32 / 3xTF32 rounding for the Triton kernels (CPU, TRITON_INTERPRET=1)",
    )
    ap.add_argument("--json", default=None, help="write the records (ik_fast/records.py, kind precision) here")
    ap.add_argument(
        "--name", default=None, help="also write them to benchmarks/results/precision/<device>/<date>-NAME.json"
    )
    args = ap.parse_args(argv)
    from ik_fast import records

    backends, modes = args.backends.split(","), args.modes.split(",")
    command = "python benchmarks/precision.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.emulate and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        ap.error("--emulate needs TRITON_INTERPRET=1 (the Triton kernels in the interpreter)")
    prov = provenance(args.device, args.emulate)
    paths = [args.json] if args.json else []
    if args.name:
        paths.append(
            os.path.join(
                ROOT,
                "benchmarks",
                "results",
                "precision",
                records.device_slug(prov),
                f"{prov['date'][:10]}-{args.name}.json",
            )
        )

    def save(rows):
        recs = to_records(rows, prov, command, args.seed, args.emulate)
        for path in paths:
            records.write(path, recs)

    rows = measure(
        args.problem, backends, modes, args.device, args.seed, on_result=save if paths else None, emulate=args.emulate
    )
    for path in paths:
        print(f"records: {path}", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
