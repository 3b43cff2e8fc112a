"""GPU tests (marker ``gpu``; ``pytest -m gpu``). On CUDA where there is a GPU; skipped without one, except under
``IK_FAST_TEST_DEVICE=cpu`` (``benchmarks/run_gpu.sh --rehearse``): the same tests then run on the CPU at small sizes,
one group each, Triton in its interpreter, so that an error in them shows here rather than on a lent GPU.

Order: the cheap checks first, then the native backend (built before the tests by run_gpu.sh), then Triton (whose
first call of each configuration compiles), so that a run cut short by its time limit has the most answers."""

import functools

import pytest
import torch
from conftest import GPU_TEST_DEVICE, field_types, get_gspace, rel

import ik_fast

DEV = GPU_TEST_DEVICE or "cuda"
ON_CUDA = torch.device(DEV).type == "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        GPU_TEST_DEVICE is None,
        reason="needs a CUDA device (IK_FAST_TEST_DEVICE=cpu runs these tests on the CPU at "
        "small sizes: the rehearsal of benchmarks/run_gpu.sh)",
    ),
]


def size(cuda, rehearsal):
    """A size on CUDA, and its small stand-in in the CPU rehearsal (Triton's interpreter is slow)."""
    return cuda if ON_CUDA else rehearsal


GROUPS = ["O3", "SO3", "Ih", "O2", "C8", "full_cylinder"] if ON_CUDA else ["O3"]


def _triton_or_skip():
    if "triton" not in ik_fast.available_backends(DEV):
        from ik_fast import ops

        pytest.skip(f"Triton unavailable: {ops.status('triton', DEV)}")


def _native_or_skip():
    if "native" not in ik_fast.available_backends(DEV):
        from ik_fast import ops

        pytest.skip(f"native kernels unavailable on {DEV}: {ops.status('native', DEV)}")


def _layer_and_graph(name="O3", n=None, e=None, channels=4, dtype=torch.float32, seed=0):
    n, e = n or size(400, 12), e or size(6000, 48)
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    torch.manual_seed(seed)
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=channels).to(DEV, dtype)
    pos = torch.randn(n, gs.dimensionality, device=DEV, dtype=dtype)
    ei = torch.randint(0, n, (2, e), device=DEV)
    x = torch.randn(n, in_t.size, device=DEV, dtype=dtype)
    a = torch.randn(e, attr_t.size, device=DEV, dtype=dtype)
    return conv, pos, ei, x, a


def _fwd_bwd(conv, backend, pos, ei, x, a):
    conv.backend = backend
    conv.zero_grad()
    xs, ps = x.clone().requires_grad_(), pos.clone().requires_grad_()
    out = conv(xs, ei, edge_attr=a, pos=ps)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype).reshape(out.shape)).sum().backward()
    return [out.detach()] + [
        torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in (xs, ps, *conv.parameters())
    ]


def _agree(conv, backend, pos, ei, x, a, tol, other="reference"):
    """``backend`` against ``other`` on the same weights: the output and every gradient within ``tol`` (relative)."""
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    ref = _fwd_bwd(conv, other, pos, ei, x, a)
    conv.load_state_dict(state)
    got = _fwd_bwd(conv, backend, pos, ei, x, a)
    assert len(got) == len(ref)
    for i, (r, g) in enumerate(zip(ref, got)):
        assert rel(g.double(), r.double()) < tol or r.norm() == g.norm() == 0, (i, rel(g.double(), r.double()))
    return ref, got


# ---------------------------------------------------------------------------------------------------------------
# the torch backend and equivariance on the device
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["O3", "Ih", "O2"] if ON_CUDA else ["O3"])
def test_torch_backend_on_cuda_matches_reference(name, mode):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=4).to(DEV)
    getattr(conv, mode)()
    n, e = size(300, 30), size(4000, 200)
    pos = torch.randn(n, gs.dimensionality, device=DEV)
    ei = torch.randint(0, n, (2, e), device=DEV)
    x = torch.randn(n, in_t.size, device=DEV, requires_grad=True)
    a = torch.randn(e, attr_t.size, device=DEV)
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
    gs = get_gspace(size("Ih", "Oh"))  # exact groups; in the rehearsal the one whose escnn build takes 3 s, not 28
    in_t, out_t, attr_t = field_types(gs, "mixed_attr")
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=3, n_channels=4, backend="torch").to(DEV).eval()
    n, e = size(50, 12), size(400, 48)
    pos = torch.randn(n, 3, device=DEV)
    ei = torch.randint(0, n, (2, e), device=DEV)
    x = torch.randn(n, in_t.size, device=DEV)
    a = torch.randn(e, attr_t.size, device=DEV)
    ik_fast.assert_equivariant(conv, pos, x, ei, a, n_samples=size(3, 1), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the native backend's CUDA kernels (csrc/cuda), built through the package (ik_fast._native: the prebuilt module or
# the first-use build); on CPU the same checks of its C++ kernels are in test_native.py
# ---------------------------------------------------------------------------------------------------------------
def test_native_cuda_part_is_built_and_registered():
    """Where CUDA is the device, the extension the package loaded has its CUDA part and a CUDA kernel for each op."""
    _native_or_skip()
    from ik_fast import _native

    mod = _native.load()
    if ON_CUDA:
        assert mod.cuda_built()
        for op in ("native_conv", "native_conv_backward", "native_trunk_moments"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ik_fast::{op}", "CUDA"), op
    assert _native.runs_on(torch.device(DEV)) is None


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", GROUPS)
def test_native_matches_reference_on_cuda(name, mode):
    _native_or_skip()
    conv, pos, ei, x, a = _layer_and_graph(name, dtype=torch.float64)
    getattr(conv, mode)()
    _agree(conv, "native", pos, ei, x, a, 1e-10)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_native_float32_within_1e_5_on_cuda(mode):
    """IEEE float32 ("highest") within 1e-5 relative of the float64 reference, forward and every gradient — or, for
    a gradient that cancels (small against its terms, where float32 itself cannot reach 1e-5), within 4x the error of
    the reference backend's own float32 computation; TF32 coarser but bounded."""
    _native_or_skip()
    conv, pos, ei, x, a = _layer_and_graph("O3", dtype=torch.float64)
    getattr(conv, mode)()
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    ref = _fwd_bwd(conv, "reference", pos, ei, x, a)
    c32 = conv.float()
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        c32.load_state_dict(state)
        own = [
            rel(g.double(), r) for g, r in zip(_fwd_bwd(c32, "reference", pos.float(), ei, x.float(), a.float()), ref)
        ]
        c32.load_state_dict(state)
        errs = [rel(g.double(), r) for g, r in zip(_fwd_bwd(c32, "native", pos.float(), ei, x.float(), a.float()), ref)]
        torch.set_float32_matmul_precision("high")
        c32.load_state_dict(state)
        etf = rel(_fwd_bwd(c32, "native", pos.float(), ei, x.float(), a.float())[0].double(), ref[0])
    finally:
        torch.set_float32_matmul_precision(old)
    print(
        f"native float32 errors {max(errs):.2e} (the reference's own in float32: {max(own):.2e}), "
        f"tf32 forward {etf:.2e}"
    )
    bad = [(i, e, o) for i, (e, o) in enumerate(zip(errs, own)) if not e < max(1e-5, 4 * o)]
    assert not bad and etf < 1e-2, bad


@functools.lru_cache(maxsize=None)
def _corner_case(case):
    """(conv, pos, edge_index, x, attr) of a graph or layer shape that the kernels treat apart: a layer without
    hidden layers, a receiver with thousands of edges beside receivers with none, a wide layer (H's 144-dimensional
    fields, 16 channels), a graph without edges. Built once per case (the wide layer's basis takes seconds); callers
    copy the layer."""
    gs = get_gspace("O3")
    G = gs.fibergroup
    sphere = G.bl_sphere_representation(L=1)
    in_t = out_t = gs.type(*[sphere] * 2)
    attr_t = gs.type(G.trivial_representation, gs.basespace_action)
    layers, channels, n = 3, 4, size(400, 40)
    hub = size(10000, 100)
    if case == "no_hidden_layer":
        layers = 1
    elif case == "wide":
        in_t = out_t = gs.type(*[G.bl_sphere_representation(L=2)] * 16)
        channels = 16
    torch.manual_seed(0)
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=layers, n_channels=channels).to(DEV, torch.float64)
    g = torch.Generator().manual_seed(1)
    if case == "no_edges":
        ei = torch.zeros(2, 0, dtype=torch.long)
    elif case == "hub_and_isolated_receivers":
        # receiver 0 gets `hub` edges, receivers 1..9 one or three each, the others none
        hub_edges = torch.stack([torch.randint(0, n, (hub,), generator=g), torch.zeros(hub, dtype=torch.long)])
        few = torch.stack([torch.randint(0, n, (20,), generator=g), torch.arange(1, 21) % 10])
        ei = torch.cat([hub_edges, few], 1)
    else:
        ei = torch.randint(0, n, (2, size(3000, 60)), generator=g)
    pos = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x = torch.randn(n, in_t.size, generator=g, dtype=torch.float64)
    a = torch.randn(ei.shape[1], attr_t.size, generator=g, dtype=torch.float64)
    return conv, pos.to(DEV), ei.to(DEV), x.to(DEV), a.to(DEV)


@pytest.mark.parametrize("precision", ["float64", "ieee", "tf32"])
@pytest.mark.parametrize("case", ["no_hidden_layer", "hub_and_isolated_receivers", "wide", "no_edges"])
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_corner_cases_match_reference_on_cuda(backend, case, precision):
    """The cases the former csrc/cuda/gpu_check.py ran through the raw ops, now through the layer, in train mode (the
    statistics pass) and eval mode, against the float64 reference backend: float64 within 1e-10, float32 within 1e-4
    (IEEE) and 1e-2 (TF32: tensor cores; a wrong fragment layout would give O(1) errors)."""
    import copy

    (_native_or_skip if backend == "native" else _triton_or_skip)()
    if not ON_CUDA and case == "wide":
        pytest.skip("rehearsal: the wide layer runs the other cases' code at H's width, 15 s a step on CPU")
    if not ON_CUDA and backend == "triton" and precision != "ieee":
        pytest.skip("rehearsal: one precision in Triton's interpreter")
    conv, pos, ei, x, a = _corner_case(case)
    conv = copy.deepcopy(conv)
    tol = {"float64": 1e-10, "ieee": 1e-4, "tf32": 1e-2}[precision]
    old = torch.get_float32_matmul_precision()
    # (train mode needs two edges for the batch statistics: a graph without edges is an eval-mode case)
    for mode in ("eval",) if case == "no_edges" else ("train", "eval"):
        getattr(conv, mode)()
        state = {k: v.clone() for k, v in conv.state_dict().items()}
        ref = _fwd_bwd(conv, "reference", pos, ei, x, a)
        conv.load_state_dict(state)
        if precision == "float64":
            got = _fwd_bwd(conv, backend, pos, ei, x, a)
        else:
            c32 = copy.deepcopy(conv).float()
            torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
            try:
                got = _fwd_bwd(c32, backend, pos.float(), ei, x.float(), a.float())
            finally:
                torch.set_float32_matmul_precision(old)
        assert len(got) == len(ref)
        for i, (r, g) in enumerate(zip(ref, got)):
            err = rel(g.double(), r)
            assert err < tol or r.norm() == g.norm() == 0, (mode, i, err)
        if case == "no_edges" and mode == "eval":
            assert torch.allclose(got[0].double(), conv.expanded_bias().detach().expand_as(ref[0]), atol=1e-6)


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
    args = _op_args(conv, pos, ei, x, a)
    eager = torch.ops.ik_fast.native_conv(*args)
    compiled = torch.compile(lambda *a: torch.ops.ik_fast.native_conv(*a), fullgraph=True)(*args)
    assert rel(compiled, eager) < 1e-6
    torch.library.opcheck(torch.ops.ik_fast.native_conv, args)


def _op_args(conv, pos, ei, x, a):
    """The ops' arguments for a layer and a graph, as the fused backend builds them."""
    from ik_fast.graph import prepare_graph

    prog = conv.kernel.program()
    g = prepare_graph(ei, x.shape[0], x.shape[0])
    inp = prog.mlp_input(pos[ei[0]] - pos[ei[1]], a)[g.perm].contiguous()
    return (x, inp, g.src[g.perm].contiguous(), g.rowptr, *prog.packed([], x.dtype).args(), None)


# ---------------------------------------------------------------------------------------------------------------
# the fused Triton backend, natively on the GPU (on CPU the same checks run in the interpreter: test_triton.py)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", GROUPS)
def test_triton_matches_reference_on_cuda(name, mode):
    _triton_or_skip()
    conv, pos, ei, x, a = _layer_and_graph(name, dtype=torch.float64)
    getattr(conv, mode)()
    _agree(conv, "triton", pos, ei, x, a, 1e-9)


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
        with torch.autocast(torch.device(DEV).type, dtype=torch.bfloat16):
            ebf = rel(c32(*args, **kw).double(), ref)
    print(f"relative error vs float64: float32 {e32:.2e}, tf32 {etf:.2e}, bf16 {ebf:.2e}")
    assert e32 < 1e-5 and etf < 1e-2 and ebf < 1e-1


def test_triton_never_allocates_edges_times_hidden():
    """A training step's peak memory grows with the edge count by one (E x hidden) float32 tensor at most, never two
    (issue 8's bound): the v2 kernels keep the last hidden activation (forward) or its gradient (backward), one at a
    time, besides (E x small) tensors (edge inputs, their gradients). The fixed part (weights, the per-program
    gradient accumulators) does not depend on E."""
    if not ON_CUDA:
        pytest.skip("measures the peak of the CUDA caching allocator")
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
    args = _op_args(conv.eval(), pos, ei, x, a)
    eager = torch.ops.ik_fast.triton_conv(*args)
    compiled = torch.compile(lambda *a: torch.ops.ik_fast.triton_conv(*a), fullgraph=True)(*args)
    assert rel(compiled, eager) < 1e-6
