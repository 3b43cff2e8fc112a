"""The sector tracer (ik_fast.tools.sectors): every block access of every program counted in 32-byte sectors relative
to its tensor's storage, traced in Triton's interpreter."""

import os

import numpy as np
import pytest
import torch

from ik_fast.tools.sectors import access_sectors, blocked_layout, warp_sectors

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton is an optional dependency
    triton = None


def test_sectors_are_counted_from_the_storage_start():
    starts = np.array([1000, 5000], dtype=np.uint64)
    ends = np.array([2000, 6000], dtype=np.uint64)
    # 8 floats from an unaligned host address: one sector relative to the storage, however the host aligned it
    assert access_sectors(np.arange(1000, 1032, 4, dtype=np.uint64), starts, ends) == (8, 1)
    # 4 floats 32 bytes apart: one sector each; a repeated address is one address
    assert access_sectors(np.array([5000, 5032, 5064, 5096, 5096], dtype=np.uint64), starts, ends) == (4, 4)
    # the same offsets in two storages are two sectors
    assert access_sectors(np.array([1000, 5000], dtype=np.uint64), starts, ends) == (2, 2)


def test_blocked_layout_lays_lanes_then_warps_fastest_dimension_first():
    # (lanes, warps) per dimension, as Triton's BlockedEncodingAttr builder with one element per thread
    assert blocked_layout((16, 32, 16), 4) == [(1, 1), (2, 4), (16, 1)]
    assert blocked_layout((64, 64), 8) == [(1, 4), (32, 2)]
    assert blocked_layout((2, 16), 4) == [(2, 4), (16, 1)]  # 2 x 16 < 128 threads: the slow dimension holds copies


def test_warp_sectors_count_each_warp_instruction_on_its_own():
    none = np.zeros(0, dtype=np.uint64)
    rows = np.arange(0, 128, 4, dtype=np.uint64)  # 32 floats: 4 sectors
    # 8 rows reading the same 32 floats: one block access touches 4 distinct sectors, but each of the 4 warps reads
    # 2 rows in 2 instructions, every one of them requesting the 4 sectors
    block = np.broadcast_to(rows, (8, 32))
    assert access_sectors(block, none, none)[1] == 4
    assert warp_sectors(block, None, none, none, num_warps=4) == 8 * 4
    # masked lanes request nothing; an instruction whose lanes are all masked off requests no sector
    mask = np.zeros((8, 32), dtype=bool)
    mask[0, :8] = True
    assert warp_sectors(block, mask, none, none, num_warps=4) == 1
    # a 2 x 16 block on 4 warps: one instruction's worth of elements, held (and loaded) by every warp
    small = np.arange(0, 128, 4, dtype=np.uint64).reshape(2, 16)
    assert warp_sectors(small, None, none, none, num_warps=4) == 4 * 4
    assert warp_sectors(small, None, none, none, num_warps=4, copies=False) == 4
    assert warp_sectors(small, None, none, none, num_warps=1) == 4


if triton is not None and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):

    @triton.jit
    def _strided_copy(x_ptr, y_ptr, n, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs * STRIDE, mask=offs < n, other=0.0)
        tl.store(y_ptr + offs, v, mask=offs < n)
        tl.atomic_add(y_ptr + offs * 0, v, mask=offs < n)  # every lane on one address: one sector, 4 useful bytes
else:
    _strided_copy = None


@pytest.mark.skipif(_strided_copy is None, reason="needs triton and TRITON_INTERPRET=1 (conftest sets it)")
@pytest.mark.parametrize("stride", [1, 8])
def test_counter_traces_loads_stores_and_atomics_per_program(stride):
    from ik_fast.tools.sectors import SectorCounter

    n, block = 40, 32
    x = torch.randn(n * stride)[1:]  # a view one element into its storage: sectors still counted from the storage
    y = torch.zeros(n)
    with SectorCounter() as sc:
        _strided_copy[(2,)](x, y, n - 1, STRIDE=stride, BLOCK=block)
    ((name, k),) = sc.per_kernel().items()
    assert name.endswith("._strided_copy") and k["programs"] == 2
    active = [block, n - 1 - block]  # lanes per program
    # loads: element i sits at byte 4 (1 + i * stride) of x's storage
    want_load = sum(len({(4 * (1 + (p * block + i) * stride)) // 32 for i in range(a)}) for p, a in enumerate(active))
    assert k["load"] == {
        "accesses": 2,
        "lanes": n - 1,
        "lane_bytes": 4 * (n - 1),
        "useful_bytes": 4 * (n - 1),
        "sectors": want_load,
        # per warp-wide instruction: a 32-element block on 4 warps is held by every warp; the copies' requests are
        # one instruction's at once (merged by the L1), so the count is one warp's
        "warp_sectors": want_load,
    }
    assert k["store"]["sectors"] == sum(
        len({(4 * (p * block + i)) // 32 for i in range(a)}) for p, a in enumerate(active)
    )
    assert k["store"]["warp_sectors"] == k["store"]["sectors"]  # (stores from one copy only)
    assert k["atomic"]["sectors"] == 2 and k["atomic"]["useful_bytes"] == 8 and k["atomic"]["lanes"] == n - 1
    assert torch.equal(y[1 : n - 1], x[stride : (n - 1) * stride : stride])  # the kernel ran (y[0]: the atomics')
    assert k["efficiency"] == pytest.approx(k["useful_bytes"] / (32 * k["sectors"]))
    load_eff = k["load"]["useful_bytes"] / (32 * k["load"]["sectors"])
    assert load_eff > 0.75 if stride == 1 else load_eff == 4 / 32
