"""The kernel's structure (ik_fast/structure.py): the frozen spec that the ops take as ``structure``.

Built once per kernel from escnn's basis; these tests check it against what the lowering produces (the non-zeros of a
randomly initialised last Linear, the program's hidden layers), its encoding, and that malformed encodings give an
error naming the argument."""

import numpy as np
import pytest
import torch
from conftest import field_types, get_gspace

import ik_fast
from ik_fast import structure as ST

CASES = [
    ("O3", "mixed_attr", 3),
    ("SO3", "uniform", 2),
    ("Ih", "mixed", 2),
    ("SO2_R3", "mixed_attr", 3),
    ("cylinder", "mixed", 2),
    ("O2", "mixed_attr", 2),
    ("D6", "uniform_attr", 3),
    ("C8", "mixed", 1),
    ("trivial_R3", "mixed_attr", 2),
]


def _kernel(name, kind, n_layers):
    gs = get_gspace(name)
    in_t, out_t, attr_t = field_types(gs, kind)
    torch.manual_seed(0)
    conv = ik_fast.ImplicitPointConv(in_t, out_t, attr_t, n_layers=n_layers, n_channels=2)
    return conv.kernel.double()


@pytest.mark.parametrize("name,kind,n_layers", CASES)
def test_spec_states_what_the_lowering_produces(name, kind, n_layers):
    """The blocks are exactly the non-zeros of a randomly initialised last Linear in kernel layout; the hidden layout
    is the program's (channels, components, grid, componentwise Linears, batch norms); the encoding round-trips."""
    kern = _kernel(name, kind, n_layers)
    spec = ST.decode(kern.structure)
    assert ST.decode(spec.encode()) == spec and spec.encode() == kern.structure
    prog = kern.program()
    R, H, C = spec.shape
    assert (R, H, C) == (prog.out_size, prog.hidden_size, prog.in_size)
    with torch.no_grad():
        nonzero = (prog.final.weight.view(R, H, C) != 0).numpy()
    assert np.array_equal(ST.mask(kern.structure), nonzero)
    assert (spec.channels, spec.components) == prog.hidden_layout
    assert len(spec.layers) == len(prog.hidden)
    for k, (lay, hid) in enumerate(zip(spec.layers, prog.hidden)):
        assert (lay.channels, lay.components) == (hid.channels, hid.dim)
        assert lay.grid == (0 if hid.A is None else hid.A.shape[0])
        assert lay.componentwise == prog.componentwise(k)
        assert lay.batch_norm == (hid.bn is not None)
    assert ST.decode(" ".join(kern.structure.split(" "))) is spec  # cached by content, not identity


def test_a_mask_that_is_not_a_union_of_blocks_is_refused():
    kern = _kernel("O3", "mixed", 2)
    spec = ST.decode(kern.structure)
    m = ST.mask(kern.structure).copy()
    f = spec.in_groups[-1].offsets[-1]  # one entry of the last field of a group only: not shared by its fields
    m[0, 0, f] = not m[0, 0, f]
    with pytest.raises(ValueError, match="not a union of field-group blocks"):
        ST.ConvSpec.from_mask(m, spec.out_groups, spec.in_groups, spec.channels, spec.layers)


@pytest.mark.parametrize(
    "breaker,match",
    [
        (lambda s: s.replace("ik2", "ik0", 1), "structure must be"),
        (lambda s: s.rsplit(" ", 1)[0], "structure"),
        (lambda s: s + " 7", "structure has trailing"),
        (lambda s: s + " x", "non-integer"),
        (lambda s: s.replace("ik2 ", "ik2 1", 1), "structure"),
    ],
)
def test_malformed_structures_name_the_argument(breaker, match):
    kern = _kernel("O3", "mixed_attr", 2)
    with pytest.raises(ValueError, match=match):
        ST.decode(breaker(kern.structure))
    with pytest.raises(ValueError, match="structure describes"):
        ST.check_shape(kern.structure, (1, 2, 3))
