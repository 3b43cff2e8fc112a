"""3xTF32 (split TF32) for float32 "highest" on CUDA: the precision mapping of the fused backends, and the tensor
cores' rounding emulated on CPU (ik_fast.tools.tensorcore_emulation for the Triton kernels, tests/tools/emulate_check.py
for the native CUDA kernels' fragments) within 2x of IEEE float32's error against float64, where TF32 alone is not."""

import importlib.util
import os

import numpy as np
import pytest
import torch

from ik_fast.tools.tensorcore_emulation import emulated_dot, tf32_rna, tf32_truncate, tf32x3_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUND = 2.0  # 3xTF32's error at most this many times IEEE float32's


def test_tf32_rounding_bits():
    one = np.float32(1.0)
    ulp = np.float32(2.0**-10)  # TF32's ulp at 1
    x = np.array([1 + 2.0**-11, -(1 + 2.0**-11), 1 + 2.0**-11 - 2.0**-23, 1 + 3 * 2.0**-12, 3.0, np.inf], np.float32)
    # ties away from zero (cvt.rna), below a tie down, above it up; exact values and infinities unchanged
    np.testing.assert_array_equal(tf32_rna(x), [one + ulp, -(one + ulp), one, one + ulp, 3.0, np.inf])
    np.testing.assert_array_equal(tf32_truncate(x), [one, -one, one, one, 3.0, np.inf])
    assert (tf32_rna(x[:5]).view(np.uint32) & 0x1FFF == 0).all()
    big, small = tf32x3_split(np.float32(np.pi), small=tf32_rna)
    assert big + small != np.float32(np.pi) and abs(float(big) + float(small) - np.pi) < 2.0**-21 * np.pi


def _errors(a, b):
    ref = a.astype(np.float64) @ b.astype(np.float64)
    z = np.zeros(ref.shape, np.float32)
    return {m: np.linalg.norm(emulated_dot(a, b, z, m) - ref) / np.linalg.norm(ref) for m in ("ieee", "tf32", "tf32x3")}


@pytest.mark.parametrize("k", [16, 64])
def test_emulated_triton_dot_3xtf32_within_bound_tf32_not(k):
    g = np.random.default_rng(k)
    e = _errors(g.standard_normal((32, k)).astype(np.float32), g.standard_normal((k, 32)).astype(np.float32))
    assert e["tf32x3"] <= BOUND * e["ieee"], e
    assert e["tf32"] > 100 * e["ieee"], e


@pytest.mark.parametrize("default", ["tf32x3", "ieee"])
def test_precision_mapping_highest_is_3xtf32_on_cuda_only(monkeypatch, default):
    """ "highest" on CUDA: launch.HIGHEST_ON_CUDA (the policy; both values tested) unless IK_FAST_HIGHEST says; on
    CPU and for float64 always IEEE; "high" TF32."""
    pytest.importorskip("triton")
    from ik_fast.kernels_triton import launch

    name = lambda dtype, dev: launch.PREC_NAMES[launch.precision(dtype, dev)]  # noqa: E731
    monkeypatch.delenv("IK_FAST_HIGHEST", raising=False)
    monkeypatch.setattr(launch, "HIGHEST_ON_CUDA", default)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert name(torch.float32, "cuda") == default
        assert name(torch.float32, "cpu") == "ieee" and name(torch.float64, "cuda") == "ieee"
        monkeypatch.setenv("IK_FAST_HIGHEST", "tf32x3")
        assert name(torch.float32, "cuda") == "tf32x3" and name(torch.float32, "cpu") == "ieee"
        monkeypatch.setenv("IK_FAST_HIGHEST", "ieee")
        assert name(torch.float32, "cuda") == "ieee"
        monkeypatch.setenv("IK_FAST_HIGHEST", "fp16")
        with pytest.raises(ValueError, match="IK_FAST_HIGHEST"):
            launch.precision(torch.float32, "cuda")
        monkeypatch.delenv("IK_FAST_HIGHEST")
        torch.set_float32_matmul_precision("high")
        assert name(torch.float32, "cuda") == "tf32" and name(torch.float64, "cuda") == "ieee"
    finally:
        torch.set_float32_matmul_precision(old)


try:
    import triton
    import triton.language as tl

    from ik_fast.kernels_triton import conv as KC
except ImportError:  # pragma: no cover
    triton = None

if triton is not None and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):

    @triton.jit
    def _mm32(a_ptr, b_ptr, c_ptr, PREC: tl.constexpr):
        r = tl.arange(0, 32)
        a = tl.load(a_ptr + r[:, None] * 32 + r[None, :])
        b = tl.load(b_ptr + r[:, None] * 32 + r[None, :])
        tl.store(c_ptr + r[:, None] * 32 + r[None, :], KC._mm(a, b, PREC))  # the fused kernels' dot
else:
    _mm32 = None


@pytest.mark.skipif(_mm32 is None, reason="needs triton and TRITON_INTERPRET=1 (conftest sets it without a GPU)")
def test_emulation_rounds_interpreter_dots_and_restores(monkeypatch):
    monkeypatch.setenv("IK_FAST_HIGHEST", "tf32x3")
    from ik_fast.kernels_triton import launch
    from ik_fast.tools.tensorcore_emulation import TensorCoreEmulation

    mm = _mm32

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 32, generator=g), torch.randn(32, 32, generator=g)
    ref = a.double() @ b.double()
    err = {}
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        with TensorCoreEmulation() as emu:
            assert launch.PREC_NAMES[launch.precision(torch.float32, "cpu")] == "tf32x3"
            for prec in ("ieee", "tf32", "tf32x3"):
                c = torch.empty(32, 32)
                mm[(1,)](a, b, c, PREC=prec)
                err[prec] = float((c.double() - ref).norm() / ref.norm())
        assert emu.dots == {"tf32": 1, "tf32x3": 1}
        assert launch.precision(torch.float32, "cpu") == 0  # the CPU mapping back
        c = torch.empty(32, 32)
        mm[(1,)](a, b, c, PREC="tf32")  # the interpreter itself: IEEE again
        assert float((c.double() - ref).norm() / ref.norm()) < 1e-6
    finally:
        torch.set_float32_matmul_precision(old)
    assert err["tf32x3"] <= BOUND * err["ieee"] < err["tf32"], err


def _emulate_check():
    spec = importlib.util.spec_from_file_location(
        "emulate_check", os.path.join(ROOT, "tests", "tools", "emulate_check.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _float32(a):
    if isinstance(a, (list, tuple)):
        return type(a)(_float32(u) for u in a)
    if isinstance(a, torch.Tensor) and a.dtype == torch.float64:
        return a.detach().float().requires_grad_(a.requires_grad)
    return a


@pytest.mark.parametrize("group,nonlinearity", [("SO2", "gated"), ("SO2", "norm")])
def test_native_3xtf32_fragments_within_bound_tf32_not(group, nonlinearity):
    """The native kernels replayed in float32 (tests/tools/emulate_check.py), their block GEMMs fragment by fragment
    (TF32: cvt.rna operands; 3xTF32: hi / lo halves, three mma), on an ImplicitPointConv's forward and every gradient
    of its backward, against float64."""
    ec = _emulate_check()
    args = ec.layer_case(group, nonlinearity)
    errs = ec.precision_errors(args, [_float32(a) for a in args], 4)
    for metric, ieee in errs["ieee"].items():
        assert 0 < ieee < 1e-6, (metric, errs)  # float32's rounding, not float64's: the replay ran in float32
        assert errs["tf32x3"][metric] <= BOUND * ieee, (metric, errs)
        assert errs["tf32"][metric] > 100 * ieee, (metric, errs)
