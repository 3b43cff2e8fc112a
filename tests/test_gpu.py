"""GPU tests (marker ``gpu``; skipped without CUDA). Run on a GPU machine with ``pytest -m gpu``."""

import pytest
import torch
from conftest import field_types, get_gspace, rel

import ik_fast

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["O3", "Ih", "O2"])
def test_torch_backend_on_cuda_matches_reference(name, mode):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=4).cuda()
    getattr(conv, mode)()
    n, e = 300, 4000
    pos = torch.randn(n, gs.dimensionality, device="cuda")
    ei = torch.randint(0, n, (2, e), device="cuda")
    x = torch.randn(n, in_t.size, device="cuda", requires_grad=True)
    a = torch.randn(e, attr_t.size, device="cuda")
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    outs, grads = {}, {}
    for b in ("reference", "torch"):
        conv.load_state_dict(state)
        conv.backend = b
        x.grad = None
        out = conv(x, ei, edge_attr=a, pos=pos)
        out.square().sum().backward()
        outs[b], grads[b] = out.detach(), x.grad.clone()
    assert rel(outs["torch"], outs["reference"]) < 1e-4  # TF32 is off by default ("highest")
    assert rel(grads["torch"], grads["reference"]) < 1e-3


def test_cuda_equivariance():
    gs = get_gspace("Ih")
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=4, backend="torch").cuda().eval()
    pos = torch.randn(50, 3, device="cuda")
    ei = torch.randint(0, 50, (2, 400), device="cuda")
    x = torch.randn(50, in_t.size, device="cuda")
    a = torch.randn(400, attr_t.size, device="cuda")
    ik_fast.assert_equivariant(conv, pos, x, ei, a, n_samples=3, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the fused Triton backend, natively on the GPU (on CPU the same checks run in the interpreter: test_triton.py)
# ---------------------------------------------------------------------------------------------------------------
def _triton_or_skip():
    if "triton" not in ik_fast.available_backends("cuda"):
        pytest.skip("Triton not importable")


def _layer_and_graph(name="O3", n=400, e=6000, channels=4, dtype=torch.float32, seed=0):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    torch.manual_seed(seed)
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=channels).to("cuda", dtype)
    pos = torch.randn(n, gs.dimensionality, device="cuda", dtype=dtype)
    ei = torch.randint(0, n, (2, e), device="cuda")
    x = torch.randn(n, in_t.size, device="cuda", dtype=dtype)
    a = torch.randn(e, attr_t.size, device="cuda", dtype=dtype)
    return conv, pos, ei, x, a


def _fwd_bwd(conv, backend, pos, ei, x, a):
    conv.backend = backend
    conv.zero_grad()
    xs, ps = x.clone().requires_grad_(), pos.clone().requires_grad_()
    out = conv(xs, ei, edge_attr=a, pos=ps)
    (out * torch.linspace(-1, 1, out.numel(), device="cuda", dtype=out.dtype).reshape(out.shape)).sum().backward()
    return [out.detach(), xs.grad, ps.grad] + [p.grad.clone() for p in conv.parameters() if p.grad is not None]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["O3", "SO3", "Ih", "O2", "C8", "full_cylinder"])
def test_triton_matches_reference_on_cuda(name, mode):
    _triton_or_skip()
    conv, pos, ei, x, a = _layer_and_graph(name, dtype=torch.float64)
    getattr(conv, mode)()
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    ref = _fwd_bwd(conv, "reference", pos, ei, x, a)
    conv.load_state_dict(state)
    got = _fwd_bwd(conv, "triton", pos, ei, x, a)
    for r, g in zip(ref, got):
        assert rel(g, r) < 1e-9


def test_triton_float32_tf32_bf16_errors_on_cuda():
    _triton_or_skip()
    conv, pos, ei, x, a = _layer_and_graph("O3", dtype=torch.float64)
    conv.eval().backend = "triton"
    with torch.no_grad():
        ref = conv(x, ei, edge_attr=a, pos=pos)
        c32 = conv.float()
        args, kw = (x.float(), ei), dict(edge_attr=a.float(), pos=pos.float())
        old = torch.get_float32_matmul_precision()
        try:
            torch.set_float32_matmul_precision("highest")
            e32 = rel(c32(*args, **kw).double(), ref)
            torch.set_float32_matmul_precision("high")
            etf = rel(c32(*args, **kw).double(), ref)
        finally:
            torch.set_float32_matmul_precision(old)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ebf = rel(c32(*args, **kw).double(), ref)
    print(f"relative error vs float64: float32 {e32:.2e}, tf32 {etf:.2e}, bf16 {ebf:.2e}")
    assert e32 < 1e-5 and etf < 1e-2 and ebf < 1e-1


def test_triton_never_allocates_edges_times_hidden():
    """A training step's peak memory grows with the edge count by one (E x hidden) float32 tensor at most, never two
    (issue 8's bound): the v2 kernels keep the last hidden activation (forward) or its gradient (backward), one at a
    time, besides (E x small) tensors (edge inputs, their gradients). The fixed part (weights, the per-program
    gradient accumulators) does not depend on E."""
    _triton_or_skip()
    extra = {}
    for e in (200_000, 400_000):
        conv, pos, ei, x, a = _layer_and_graph("O3", n=20000, e=e, channels=8)
        conv.train()
        _fwd_bwd(conv, "triton", pos, ei, x, a)  # warm-up: compilation, graph preparation (cached per graph)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _fwd_bwd(conv, "triton", pos, ei, x, a)
        torch.cuda.synchronize()
        extra[e] = torch.cuda.max_memory_allocated() - base
    hidden = conv.kernel.program().hidden_size
    per_edge = (extra[400_000] - extra[200_000]) / 200_000
    print(f"peak memory per edge {per_edge:.0f} B; one hidden row is {hidden * 4} B")
    assert per_edge < hidden * 4 * 1.5, (per_edge, hidden)


def test_triton_deterministic_and_compiles_on_cuda():
    _triton_or_skip()
    conv, pos, ei, x, a = _layer_and_graph("O3")
    conv.train()
    torch.use_deterministic_algorithms(True)
    try:
        g1 = _fwd_bwd(conv, "triton", pos, ei, x, a)
        g2 = _fwd_bwd(conv, "triton", pos, ei, x, a)
    finally:
        torch.use_deterministic_algorithms(False)
    for u, v in zip(g1, g2):
        assert torch.equal(u, v)
    from ik_fast.graph import prepare_graph

    prog = conv.eval().kernel.program()
    g = prepare_graph(ei, x.shape[0], x.shape[0])
    inp = prog.mlp_input(pos[ei[0]] - pos[ei[1]], a)[g.perm].contiguous()
    args = (x, inp, g.src[g.perm].contiguous(), g.rowptr, *prog.packed([], x.dtype).args(), None)
    eager = torch.ops.ik_fast.triton_conv(*args)
    compiled = torch.compile(lambda *a: torch.ops.ik_fast.triton_conv(*a), fullgraph=True)(*args)
    assert rel(compiled, eager) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# the native backend's CUDA kernels (csrc/cuda), natively on the GPU (on CPU its C++ kernels: test_native.py)
# ---------------------------------------------------------------------------------------------------------------
def _native_or_skip():
    if "native" not in ik_fast.available_backends("cuda"):
        from ik_fast import ops

        pytest.skip(f"native CUDA kernels unavailable: {ops.status('native', 'cuda')}")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["O3", "SO3", "Ih", "O2", "C8", "full_cylinder"])
def test_native_matches_reference_on_cuda(name, mode):
    _native_or_skip()
    conv, pos, ei, x, a = _layer_and_graph(name, dtype=torch.float64)
    getattr(conv, mode)()
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    ref = _fwd_bwd(conv, "reference", pos, ei, x, a)
    conv.load_state_dict(state)
    got = _fwd_bwd(conv, "native", pos, ei, x, a)
    for r, g in zip(ref, got):
        assert rel(g, r) < 1e-10


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_native_float32_within_1e_5_on_cuda(mode):
    """IEEE float32 ("highest") within 1e-5 relative of the float64 reference, forward and every gradient; TF32 and
    bf16 coarser but bounded."""
    _native_or_skip()
    conv, pos, ei, x, a = _layer_and_graph("O3", dtype=torch.float64)
    getattr(conv, mode)()
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    ref = _fwd_bwd(conv, "reference", pos, ei, x, a)
    c32 = conv.float()
    c32.load_state_dict(state)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        got = _fwd_bwd(c32, "native", pos.float(), ei, x.float(), a.float())
        errs = [rel(g.double(), r) for g, r in zip(got, ref)]
        torch.set_float32_matmul_precision("high")
        c32.load_state_dict(state)
        etf = rel(_fwd_bwd(c32, "native", pos.float(), ei, x.float(), a.float())[0].double(), ref[0])
    finally:
        torch.set_float32_matmul_precision(old)
    print(f"native float32 errors {max(errs):.2e}, tf32 forward {etf:.2e}")
    assert max(errs) < 1e-5 and etf < 1e-2


def test_native_double_backward_deterministic_and_compiles_on_cuda():
    _native_or_skip()
    conv, pos, ei, x, a = _layer_and_graph("O3")
    conv.train()
    torch.use_deterministic_algorithms(True)
    try:
        g1 = _fwd_bwd(conv, "native", pos, ei, x, a)
        g2 = _fwd_bwd(conv, "native", pos, ei, x, a)
    finally:
        torch.use_deterministic_algorithms(False)
    for u, v in zip(g1, g2):
        assert torch.equal(u, v)
    conv.eval().backend = "native"
    p = pos.clone().requires_grad_()
    out = conv(x, ei, edge_attr=a, pos=p)
    forces = torch.autograd.grad(out.square().sum(), p, create_graph=True)[0]
    forces.square().sum().backward()
    assert all(torch.isfinite(q.grad).all() for q in conv.parameters() if q.grad is not None)
    from ik_fast.graph import prepare_graph

    prog = conv.kernel.program()
    g = prepare_graph(ei, x.shape[0], x.shape[0])
    inp = prog.mlp_input(pos[ei[0]] - pos[ei[1]], a)[g.perm].contiguous()
    args = (x, inp, g.src[g.perm].contiguous(), g.rowptr, *prog.packed([], x.dtype).args(), None)
    eager = torch.ops.ik_fast.native_conv(*args)
    compiled = torch.compile(lambda *a: torch.ops.ik_fast.native_conv(*a), fullgraph=True)(*args)
    assert rel(compiled, eager) < 1e-6
    torch.library.opcheck(torch.ops.ik_fast.native_conv, args)
