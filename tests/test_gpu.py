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
