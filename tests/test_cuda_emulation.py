"""The native CUDA kernels' index arithmetic and host steps, emulated on the CPU (tests/tools/emulate_check.py),
against the op layer's statement: run with the suite so that a change of the op contract or of the block plan that
the CUDA code no longer follows fails here, on machines without a GPU."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cuda_kernels_emulated_on_the_cpu_agree_with_the_statement():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "tools", "emulate_check.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0 and "all ok" in r.stdout, (r.stdout[-3000:], r.stderr[-3000:])


def _emulation():
    import importlib.util

    path = os.path.join(ROOT, "tests", "tools", "emulate_check.py")
    spec = importlib.util.spec_from_file_location("_emulate_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fast_expm1_of_the_float32_elu_stays_within_a_few_ulps():
    """common.cuh's float32 ELU below zero (a Taylor polynomial near zero, __expf - 1 below -1/4), replayed in float32
    with __expf at the CUDA guide's worst error either way: within 1e-6 of expm1 relative (IEEE expm1f: ~1 ulp,
    6e-8; the float32 forward bound is 2e-5), and exact at 0 and -inf."""
    import numpy as np

    ec = _emulation()
    u = -np.concatenate([np.geomspace(1e-30, 40, 20001), np.linspace(0, 1, 4001)]).astype(np.float32)
    ref = np.expm1(u.astype(np.float64))
    for sign in (1, -1):
        got = ec.fast_expm1(u, lambda v, s=sign: s * (2 + np.floor(1.173 * np.abs(v.astype(np.float64)))))
        rel = np.abs(got.astype(np.float64) - ref) / np.abs(np.where(ref == 0, 1.0, ref))
        assert rel.max() < 1e-6, (sign, rel.max(), u[rel.argmax()])
    assert ec.fast_expm1(np.float32([0.0, -np.inf])).tolist() == [0.0, -1.0]


def test_native_cuda_training_step_counted_in_the_replay_is_within_1_5x_the_floor_at_H():
    """The multiply-adds per edge of a native CUDA training step at config H, counted while the emulation replays
    every kernel launch and host GEMM (block-sparse W' through the structure's pairs, no dense W_aug)."""
    r = _emulation().count_problem("H")
    assert r["ieee"] <= 1.5 * r["floor"], r["stages"]
    assert r["tf32"] <= 1.5 * r["floor"], r["stages"]
    # every stage of the step replayed: statistics passes, the recompute, both activation backwards, Z, the pairs, the
    # edge backward, the trunk's Linear gradients
    assert len(r["stages"]) == 7 and min(v[0] for v in r["stages"].values()) > 0, r["stages"]
