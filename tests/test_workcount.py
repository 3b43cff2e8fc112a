"""The work counter (ik_fast.tools.workcount): tl.dot counted at its padded shape in Triton's interpreter, host GEMMs
and aten events from torch.profiler, and the structured floor."""

import os

import pytest
import torch
from conftest import rel

from ik_fast.testing import tolerance
from ik_fast.tools.workcount import floor_terms, profile_step


def test_floor_matches_the_worked_numbers():
    # the floor's worked numbers (docs, design page), 3 layers: M (C=8, D=19, G=120, C_in=32) and
    # H (C=16, D=51, G=120, C_in=144)
    assert floor_terms(8, 19, 120, 32, 3)["floor"] == 316_160
    assert floor_terms(16, 51, 120, 144, 3)["floor"] == 1_997_568


def test_floor_reads_the_program():
    from ik_fast.tools.problems import build_layer, get_problem
    from ik_fast.tools.workcount import floor_per_edge

    prog = build_layer(get_problem("tiny"), backend="torch").kernel.program()
    f = floor_per_edge(prog)
    h = prog.hidden[-1]
    assert (f["C"], f["D"], f["G"], f["C_in"], f["n_layers"]) == (
        h.channels,
        h.dim,
        h.A.shape[0],
        prog.in_size,
        len(prog.hidden) + 1,
    )
    assert f["floor"] == floor_terms(f["C"], f["D"], f["G"], f["C_in"], f["n_layers"])["floor"]


def test_profiler_counts_host_gemms_and_aten_events():
    a, b = torch.randn(7, 5), torch.randn(5, 3)
    r = profile_step(lambda: (a @ b) * 2.0)  # the elementwise product is not a GEMM
    assert r["host_gemm_macs"] == 7 * 5 * 3
    assert r["aten_ops"] >= 2


try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton is an optional dependency
    triton = None

if triton is not None and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):

    @triton.jit
    def _one_dot(a_ptr, b_ptr, c_ptr, n, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid = tl.program_id(0)
        rm = tl.arange(0, BM)
        rk = tl.arange(0, BK)
        rn = tl.arange(0, BN)
        a = tl.load(a_ptr + rm[:, None] * 3 + rk[None, :], mask=(rm[:, None] < n) & (rk[None, :] < 3), other=0.0)
        b = tl.load(b_ptr + rk[:, None] * 3 + rn[None, :], mask=(rk[:, None] < 3) & (rn[None, :] < 3), other=0.0)
        c = tl.dot(a, b, input_precision="ieee")
        tl.store(c_ptr + pid * BM * BN + rm[:, None] * BN + rn[None, :], c)
else:
    _one_dot = None


@pytest.mark.skipif(_one_dot is None, reason="needs triton and TRITON_INTERPRET=1 (conftest sets it without a GPU)")
def test_dot_counter_counts_padded_shape():
    from ik_fast.tools.workcount import DotCounter

    # a 5 x 3 by 3 x 3 product in 16 x 16 by 16 x 32 blocks: the count is the padded one, per program instance
    a, b = torch.randn(5, 3), torch.randn(3, 3)
    c = torch.zeros(3, 16, 32)
    with DotCounter() as dc:
        _one_dot[(3,)](a, b, c, 5, BM=16, BN=32, BK=16)
    ((name, rec),) = dc.summary().items()
    assert name.endswith("._one_dot"), name
    assert (rec["launches"], rec["programs"], rec["dots"], rec["macs"]) == (1, 3, 3, 3 * 16 * 32 * 16)
    assert rel(c[1, :5, :3], a @ b) <= tolerance("reorder", torch.float32)
    # outside the context nothing is counted any more
    _one_dot[(1,)](a, b, c, 5, BM=16, BN=32, BK=16)
    assert dc.macs == 3 * 16 * 32 * 16
