"""On a machine with a GPU: JIT-build the CUDA sources of this folder (torch.utils.cpp_extension.load, ninja) and check
ik_fast::native_conv / native_conv_backward / native_trunk_moments against the op layer's plain-PyTorch statement
(ik_fast.ops.conv_reference_form), float64 and float32, on the random programs of emulate_check.py and on corner
cases (no edges, isolated receivers, degree skew, the ``hidden`` argument). Prints one line per case; exit status 1
on any failure. A stop-gap until the package's build (setup.py) and test suite cover the native backend::

    python csrc/cuda/gpu_check.py            # (about a minute of compilation, then seconds)
    IK_GPU_CHECK_DRY=1 python csrc/cuda/gpu_check.py   # no GPU: the script's own plumbing, with the reference in
                                                       # place of the native ops, on the CPU
"""

from __future__ import annotations

import os
import sys

import torch
from torch.utils.cpp_extension import load

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from emulate_check import random_case  # noqa: E402

from ik_fast import ops  # noqa: E402


DRY = os.environ.get("IK_GPU_CHECK_DRY", "0") not in ("", "0")
DEVICE = "cpu" if DRY else "cuda"


def reference(*args):
    """ops.conv_reference_form, extended to graphs without edges (all zeros; its reshapes need an edge)."""
    if args[1].shape[0] == 0:
        zero = sum(t.sum() * 0 for t in leaves(args) if t.requires_grad)
        return args[0].new_zeros(args[3].shape[0] - 1, args[8].shape[0]) + zero
    return ops.conv_reference_form(*args)


class _Reference:
    """Stand-ins for the native ops in a dry run: the op layer's plain-PyTorch statements."""

    @staticmethod
    def native_conv(*args):
        return reference(*args[:14])

    @staticmethod
    def native_trunk_moments(inp, weights, biases, fourier, fourier_inv, with_activation=False, with_grid=False):
        h = ops.trunk_reference_form(inp, weights, biases, fourier, fourier_inv)
        m = torch.stack([h.mean(0), (h - h.mean(0)).square().sum(0)])
        return m, (h if with_activation else h.new_empty(0, h.shape[1])), h.new_empty(0)


def native():
    return _Reference if DRY else torch.ops.ik_fast


def build():
    if DRY:
        return
    ops.define("native")
    load(name="ik_fast_native_cuda_check", sources=[os.path.join(HERE, f) for f in ("conv_cuda.cu", "trunk_cuda.cu")],
         extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-Xptxas=-v"], is_python_module=False, verbose=False)


def to(args, dtype, device=DEVICE):
    out = []
    for a in args:
        if isinstance(a, list):
            out.append([t.detach().to(device, dtype).requires_grad_(t.requires_grad) for t in a])
        elif torch.is_tensor(a) and a.dtype == torch.bool:
            out.append(a)  # final_mask stays on the CPU
        elif torch.is_tensor(a) and a.is_floating_point():
            out.append(a.detach().to(device, dtype).requires_grad_(a.requires_grad))
        elif torch.is_tensor(a):
            out.append(a.to(device))
        else:
            out.append(a)
    return out


def leaves(args):
    return [args[0], args[1], *args[4], *args[5], args[8], args[9], args[10]]


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def check(name, args64, dtype, tol, hidden=False):
    args = to(args64, dtype)
    ref_args = to(args64, torch.float64)
    extra = [None]
    if hidden:
        _, act, _ = native().native_trunk_moments(args[1].detach(), [w.detach() for w in args[4]],
                                                           [b.detach() for b in args[5]], args[6], args[7], True)
        extra = [act]
        h = ops.trunk_reference_form(ref_args[1], ref_args[4], ref_args[5], ref_args[6], ref_args[7])
        assert rel(act.double(), h) < tol, "trunk_moments activation"
    out = native().native_conv(*args, *extra)
    ref = reference(*ref_args)
    errs = {"forward": rel(out.double(), ref)}
    g = torch.randn_like(ref)
    ours = torch.autograd.grad(out, leaves(args), g.to(dtype), allow_unused=True)
    theirs = torch.autograd.grad(ref, leaves(ref_args), g, allow_unused=True)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if b is None:
            b = torch.zeros_like(leaves(ref_args)[i])
        if a is None:
            a = torch.zeros_like(b)
        errs[f"grad{i}"] = rel(a.double(), b)
    worst = max(errs.values())
    print(f"{name:45s} {str(dtype):14s} worst {worst:.1e} {'ok' if worst < tol else 'FAIL ' + str(errs)}")
    return worst < tol


def main():
    build()
    fourier_cw = [("dense", 12, (10, 3)), ("cw", (3, 4), (10, 3))]
    cases = [
        ("fourier, dense + componentwise, mask", random_case(0, fourier_cw)),
        ("pointwise, dense + dense", random_case(2, [("dense", 7, None), ("dense", 9, None)])),
        ("mixed, 3 layers", random_case(3, [("dense", 8, (40, 4)), ("cw", (4, 2), (40, 4)), ("dense", 6, None)])),
        ("no hidden layer", random_case(4, [])),
        ("skew and isolated receivers", random_case(6, fourier_cw, degrees=[0, 10000, 0, 3, 0, 33, 1])),
        ("wide (H = 816, C = 144, G = 120)",
         random_case(7, [("dense", 816, (120, 51)), ("cw", (51, 16), (120, 51))], C=144, R=144, n_src=50,
                     degrees=[24] * 40)),
        ("no edges", random_case(8, fourier_cw, degrees=[0, 0, 0])),
    ]
    ok = True
    for name, args in cases:
        ok &= check(name, args, torch.float64, 1e-10)
        ok &= check(name, args, torch.float32, 1e-4)
    # the TF32 kernels (tensor cores; a wrong fragment layout would give O(1) errors, TF32 rounding ~1e-3)
    torch.set_float32_matmul_precision("high")
    try:
        for name, args in cases:
            ok &= check(name + " [tf32]", args, torch.float32, 1e-2)
    finally:
        torch.set_float32_matmul_precision("highest")
    # determinism: under torch.use_deterministic_algorithms(True) two backward passes agree bitwise (the GEMMs then
    # run in the extension's own kernel, the gradient to x through index_add_)
    args = to(cases[0][1], torch.float32)
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            out = native().native_conv(*args, None)
            runs.append(torch.autograd.grad(out.square().sum(), leaves(args), allow_unused=True))
    finally:
        torch.use_deterministic_algorithms(False)
    same = all((a is None and b is None) or torch.equal(a, b) for a, b in zip(*runs))
    print(f"{'deterministic backward (bitwise, twice)':45s} {'torch.float32':14s} {'ok' if same else 'FAIL'}")
    ok &= same
    ok &= check("hidden given (statistics pass)", cases[0][1], torch.float64, 1e-10, hidden=True)
    # trunk_moments against the trunk
    args = to(cases[2][1], torch.float64)
    m, act, _ = native().native_trunk_moments(args[1].detach(), [w.detach() for w in args[4]],
                                                       [b.detach() for b in args[5]], args[6], args[7], False)
    h = ops.trunk_reference_form(args[1].detach(), args[4], args[5], args[6], args[7]).detach()
    e = max(rel(m[0], h.mean(0)), rel(m[1], (h - h.mean(0)).square().sum(0)))
    print(f"{'trunk_moments':45s} {'torch.float64':14s} worst {e:.1e} {'ok' if e < 1e-10 else 'FAIL'}")
    ok &= e < 1e-10 and act.shape[0] == 0
    print("all ok" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
