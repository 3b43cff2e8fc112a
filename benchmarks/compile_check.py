"""Compile the fused Triton kernels ahead of time for a GPU architecture, on a machine without a GPU.

    python benchmarks/compile_check.py --problems M,H --arch 90 [--precision ieee] [--kernels forward,backward,stats]

For each benchmark problem (``ik_fast.problems``), the layer is built, lowered and laid out exactly as the ``triton``
backend would on a CUDA device; each kernel is then compiled by Triton's own pipeline down to a cubin (Triton ships
ptxas), and its shared memory, registers and stack (register spills) are reported with the compile time. This catches
what the interpreter cannot (the interpreter accepts code the compiler rejects, and knows nothing of shared memory)
before any GPU time is spent. It measures nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: this compiles the kernels, it does not interpret them")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from ik_fast.kernels_triton import conv  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ik_fast.backends import fused  # noqa: E402
from ik_fast.problems import build_layer, get_problem  # noqa: E402

POINTERS = {"src_ptr": "*i64", "loc_ptr": "*i32", "base_ptr": "*i32"}
INTS = {"E", "n_tiles", "t0", "t1", "seg0"}
FLOATS = {"norm"}


def _compile(fn, consts: dict, arch: int):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = POINTERS[name]
        elif name in INTS:
            sig[name] = "i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "*fp32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32))


def _resources(kernel) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    except OSError:
        return ""
    finally:
        os.unlink(f.name)
    fields = [w for line in out.splitlines() if "REG:" in line for w in line.split() if w.startswith(("REG", "STACK"))]
    return " ".join(fields)


def configs(problem: str, precision: str):
    """Constexpr sets of the three kernels for a problem's layer, as the backend would launch them on a GPU."""
    p = get_problem(problem)
    prog = build_layer(p, backend="torch").kernel.program()
    lay = fused.layout(prog)
    R, C = prog.out_size, prog.in_size
    common = dict(P0=lay.P0, P0P=lay.P0P, NDIM=lay.NDIM, CP=lay.CP, DP=lay.DP, GP=lay.GP, GW=lay.GW,
                  FOURIER=lay.FOURIER, BE=fused._tile_size("cuda", lay.HP), PREC=precision)
    main = dict(common, CIN=C, CINP=fused._pow2(C), R=R, RP=fused._pow2(R), NL=lay.NL,
                HAS_BIAS=prog.final.bias is not None, BR=16, CB=16)
    return {
        "forward": (conv.fused_forward_kernel, main),
        "backward": (conv.fused_backward_kernel, dict(main, NH=max(lay.NL - 1, 1))),
        "stats": (conv.fused_stats_kernel, dict(common, K=lay.NL, BE=fused.STATS_TILE)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", default="M,H")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--precision", default="ieee", choices=["ieee", "tf32", "bf16"])
    ap.add_argument("--kernels", default="forward,backward,stats")
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.precision}")
    print("| problem | kernel | compile (s) | shared memory (B) | registers / stack per thread |")
    print("|---|---|---|---|---|")
    failed = False
    for problem in args.problems.split(","):
        cfgs = configs(problem, args.precision)
        for name in args.kernels.split(","):
            fn, consts = cfgs[name]
            t = time.time()
            try:
                k = _compile(fn, consts, args.arch)
                print(f"| {problem} | {name} | {time.time() - t:.0f} | {k.metadata.shared:,} | {_resources(k)} |",
                      flush=True)
            except Exception as exc:  # report and go on: the point is to see every failure at once
                failed = True
                cause = exc.__cause__ if exc.__cause__ is not None else exc
                print(f"| {problem} | {name} | failed after {time.time() - t:.0f} s | {type(cause).__name__}: "
                      f"{str(cause).splitlines()[-1][:200] if str(cause) else ''} | |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
