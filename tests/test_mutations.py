"""Mutation tests: the suite's equivariance check must fail on deliberately broken layers.

Each mutation is applied with pytest's monkeypatch (undone after the test) to a layer built and randomised exactly as
in tests/test_equivariance.py, and ik_fast.testing.check_equivariance — the suite's check, with the suite's graph
helper and tolerance table — must report a failure, on every group family where the mutation applies:
"SO3" (O(3)), "SO2" (O(2) on R^2) and "finite" (D_6 on R^2). The unmutated layer passes the same check."""

import pytest
import torch
import torch.nn.functional as F
from conftest import field_types, get_gspace
from escnn import nn as enn

import ik_fast
from ik_fast.backends import factorized
from ik_fast.spec.program import KernelProgram
from ik_fast.testing import check_equivariance, kernel_graph, randomize_

FAMILIES = {"SO3": "O3", "SO2": "O2", "finite": "D6"}
MUTATIONS = [
    "none",
    "bias_expansion",
    "anisotropic_shell",
    "additive_term",
    "wrong_position_rep",
    "pseudoscalar_as_scalar",
    "pointwise_elu_on_fourier",
    "gate_per_component",
    "norm_per_component",
]
# the layer's hidden nonlinearity per mutation (the Fourier ELU where not named)
NONLINEARITY = {"gate_per_component": "gated", "norm_per_component": "norm"}


def _odd_scalar_index(attr_t):
    """Position of the first non-trivial one-dimensional representation (pseudoscalar, sign) in attr_t."""
    for i, rep in enumerate(attr_t.representations):
        if rep.size == 1 and not rep.is_trivial():
            return i
    return None


_BUILT = {}


def _build(name, scalar_for_odd=False, nonlinearity="fourier_elu"):
    """The randomised float64 layer of a gspace (built once per module; its initial state restored on every call)."""
    key = (name, scalar_for_odd, nonlinearity)
    if key not in _BUILT:
        gs = get_gspace(name)
        in_t, out_t, attr_t = field_types(gs, "mixed_attr")
        layer_attr = attr_t
        if scalar_for_odd:
            reps = list(attr_t.representations)
            reps[_odd_scalar_index(attr_t)] = gs.fibergroup.trivial_representation
            layer_attr = enn.FieldType(gs, reps)
        torch.manual_seed(0)
        conv = ik_fast.ImplicitPointConv(
            in_t, out_t, layer_attr, n_layers=3, n_channels=3, backend="torch", nonlinearity=nonlinearity
        )
        conv = randomize_(conv).double()
        _BUILT[key] = (conv, attr_t, {k: v.clone() for k, v in conv.state_dict().items()})
    conv, attr_t, state = _BUILT[key]
    conv.load_state_dict(state)
    return conv, attr_t


def _mutate(mutation, name, monkeypatch):
    """A broken layer (or None where the mutation does not apply to the family)."""
    gs = get_gspace(name)
    G = gs.fibergroup
    if mutation == "pseudoscalar_as_scalar":
        if _odd_scalar_index(field_types(gs, "mixed_attr")[2]) is None:
            return None
        conv, attr_t = _build(name, scalar_for_odd=True)
        # the data are pseudoscalars (and the check transforms them so); the layer was built for scalars
        monkeypatch.setattr(conv.kernel, "edge_attr_type", attr_t)
        return conv
    conv, _ = _build(name, nonlinearity=NONLINEARITY.get(mutation, "fourier_elu"))
    if mutation == "bias_expansion":  # the bias spread over every output component, not only the trivial irreps
        be = conv.bias_expansion
        wrong = be + 0.3 * torch.randn(be.shape, generator=torch.Generator().manual_seed(1), dtype=be.dtype)
        monkeypatch.setattr(type(conv), "expanded_bias", lambda self: wrong @ self.bias)
    elif mutation == "anisotropic_shell":  # the radial shell 2% wider along the first axis
        orig = KernelProgram.shell

        def shell(self, delta):
            scale = torch.ones(delta.shape[1], dtype=delta.dtype)
            scale[0] = 1 / 1.02
            return orig(self, delta * scale)

        monkeypatch.setattr(KernelProgram, "shell", shell)
    elif mutation == "additive_term":  # out + 1e-3 * rms(out) * a fixed pattern (not equivariant)
        forward = conv.forward

        def mutated(*args, **kwargs):
            out = forward(*args, **kwargs)
            v = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
            return out + 1e-3 * out.detach().square().mean().sqrt() * v

        monkeypatch.setattr(conv, "forward", mutated)
    elif mutation == "wrong_position_rep":  # d enters the MLP through a reflection the group does not commute with
        orig = KernelProgram.mlp_input

        def mlp_input(self, delta, attr):
            M = torch.eye(delta.shape[1], dtype=delta.dtype)
            M[0, 0] = -1
            return orig(self, delta @ M, attr)

        monkeypatch.setattr(KernelProgram, "mlp_input", mlp_input)
    elif mutation == "pointwise_elu_on_fourier":  # ELU applied to the Fourier coefficients, not to the samples
        if not G.continuous:
            return None

        def activate(y, A, Ainv, bias=None, layout=None):  # (the layer runs the torch backend, whose trunk takes
            return F.elu(y)  # its activation from here)

        monkeypatch.setattr(factorized, "_activate", activate)
    elif mutation in ("gate_per_component", "norm_per_component"):
        # every component of an irrep scaled by a function of itself (a gate or a norm per component, not per irrep)

        def activate(y, A, Ainv, bias=None, layout=None):
            D = layout.components
            v = y.reshape(y.shape[0], -1, layout.linear_components)[..., :D]
            m = torch.sigmoid(v) if mutation == "gate_per_component" else torch.sigmoid(v.abs() - 0.5)
            return (v * m).reshape(y.shape[0], -1)

        monkeypatch.setattr(factorized, "_activate", activate)
    return conv


@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_equivariance_check_catches_mutation(family, mutation, monkeypatch):
    name = FAMILIES[family]
    conv = _mutate(mutation, name, monkeypatch)
    if conv is None:
        pytest.skip(f"{mutation} does not apply to the {family} family")
    graph = kernel_graph(conv, n_nodes=10, k=4)
    for mode in ("eval", "train"):
        getattr(conv, mode)()
        res = check_equivariance(conv, graph, n_exact=3, n_random=2)
        if mutation == "none":
            assert res["passed"], res
        else:
            assert not res["passed"], (mode, res)
