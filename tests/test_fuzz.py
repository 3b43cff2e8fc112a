"""Fuzzing the layer's boundary with hypothesis: every input either works (finite output of the right shape when the
inputs are finite) or raises a ValueError/TypeError whose message names the offending argument."""

import functools
import re

import pytest
import torch
from escnn import gspaces
from escnn import nn as enn

import ik_fast

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@functools.lru_cache(maxsize=None)
def _layer(backend):
    gs = gspaces.rot2dOnR2(-1, maximum_frequency=4)
    G = gs.fibergroup
    ft = enn.FieldType(gs, [G.irrep(0), G.irrep(1)])
    at = enn.FieldType(gs, [G.trivial_representation])
    torch.manual_seed(0)
    return ik_fast.ImplicitPointConv(ft, ft, at, n_layers=2, n_channels=2, backend=backend)


# one fault per case (or none): the argument its error must name
FAULTS = {
    "none": None,
    "ei_dtype": "edge_index",
    "ei_shape": "edge_index",
    "ei_negative": "edge_index",
    "ei_src_range": r"edge_index\[0\]",
    "ei_dst_range": r"edge_index\[1\]",
    "x_dtype": "x",
    "x_width": "x",
    "x_batched": "x",
    "pos_rows": "pos",
    "pos_nonfinite": "pos",
    "delta_rows": "edge_delta",
    "delta_nonfinite": "edge_delta",
    "attr_missing": "edge_attr",
    "attr_width": "edge_attr",
    "attr_nonfinite": "edge_attr",
    "attr_dtype": "edge_attr",
}
BAD = [float("nan"), float("inf"), float("-inf")]


@st.composite
def cases(draw):
    fault = draw(st.sampled_from(["none"] * 8 + list(FAULTS)[1:]))
    n = draw(st.integers(1, 8))
    e = draw(st.integers(2 if fault.startswith("ei_") else 0, 14))
    floats = st.floats(-2, 2, width=32)

    def values(rows, cols):
        return torch.tensor(
            draw(st.lists(floats, min_size=rows * cols, max_size=rows * cols)), dtype=torch.float32
        ).reshape(rows, cols)

    def poison(t):
        if t.numel():
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(BAD))
        return t

    ei = torch.tensor(draw(st.lists(st.integers(0, n - 1), min_size=2 * e, max_size=2 * e)), dtype=torch.long).reshape(
        2, e
    )
    if fault == "ei_negative":
        ei[draw(st.integers(0, 1)), draw(st.integers(0, e - 1))] = -draw(st.integers(1, 3))
    elif fault == "ei_src_range":
        ei[0, draw(st.integers(0, e - 1))] = n + draw(st.integers(0, 3))
    elif fault == "ei_dst_range":
        ei[1, draw(st.integers(0, e - 1))] = n + draw(st.integers(0, 3))
    ei = ei.to(
        draw(
            st.sampled_from(
                [torch.int64, torch.int32, torch.int16, torch.uint8]
                if fault != "ei_negative"
                else [torch.int64, torch.int32]
            )
        )
    )
    if fault == "ei_dtype":
        ei = ei.to(draw(st.sampled_from([torch.float32, torch.float64, torch.bool])))
    elif fault == "ei_shape":
        ei = draw(st.sampled_from([ei.t().contiguous(), ei.reshape(-1), ei[:1], ei.reshape(1, 2, e)]))
        if ei.shape == (2, e):
            ei = ei.reshape(-1)
    x = values(n, 3)
    if fault == "x_dtype":
        x = x.to(draw(st.sampled_from([torch.float64, torch.float16, torch.int64])))
    elif fault == "x_width":
        x = values(n, draw(st.sampled_from([2, 4])))
    elif fault == "x_batched":
        x = torch.stack([x, x])
    use_delta = fault.startswith("delta") or (not fault.startswith("pos") and draw(st.booleans()))
    pos = delta = None
    if use_delta:
        delta = values(e + (draw(st.sampled_from([1, -1])) if fault == "delta_rows" and e else 0), 2)
        if fault == "delta_rows" and e == 0:
            delta = values(1, 2)
        if fault == "delta_nonfinite":
            delta = poison(delta) if e else delta
    else:
        pos = values(n + (1 if fault == "pos_rows" else 0), 2) * 0.5
        if fault == "pos_nonfinite":
            pos = poison(pos)
    attr = values(e, 1)
    if fault == "attr_missing":
        attr = None
    elif fault == "attr_width":
        attr = values(e, 2)
    elif fault == "attr_nonfinite":
        attr = poison(attr) if e else attr
    elif fault == "attr_dtype":
        attr = attr.double()
    expect = FAULTS[fault]
    if fault in ("delta_nonfinite", "attr_nonfinite") and e == 0:
        expect = None  # nothing to poison
    if fault == "ei_shape" and e == 2 and ei.shape == (2, 2):
        expect = None  # the transpose of a (2, 2) edge_index is a valid edge_index
    return dict(
        x=x,
        edge_index=ei,
        pos=pos,
        edge_delta=delta,
        edge_attr=attr,
        expect=expect,
        backend=draw(st.sampled_from(["torch", "reference"])),
        train=draw(st.booleans()),
    )


@hypothesis.settings(
    max_examples=80, derandomize=True, deadline=None, database=None, suppress_health_check=list(hypothesis.HealthCheck)
)
@hypothesis.given(cases())
def test_fuzz_boundary(case):
    layer = _layer(case.pop("backend")).train(case.pop("train"))
    expect = case.pop("expect")
    x = case.pop("x")
    E = case["edge_index"].shape[-1]
    if expect is None and layer.training and E < 2:
        expect = "batch norm needs at least two edges"
    if expect is None:
        y = layer(x, **case)  # valid input: must work
        assert y.shape == (x.shape[0], layer.out_type.size)
        assert torch.isfinite(y).all()
        return
    with pytest.raises((ValueError, TypeError)) as err:
        layer(x, **case)
    assert re.search(rf"(^|\W){expect}(\W|$)", str(err.value)), f"expected an error naming {expect}: {err.value!r}"
