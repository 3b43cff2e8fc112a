"""The sector tracer (ik_fast.tools.sectors): every block access of every program counted in 32-byte sectors relative
to its tensor's storage, traced in Triton's interpreter."""

import os

import numpy as np
import pytest
import torch

from ik_fast.tools.sectors import access_sectors

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
    }
    assert k["store"]["sectors"] == sum(
        len({(4 * (p * block + i)) // 32 for i in range(a)}) for p, a in enumerate(active)
    )
    assert k["atomic"]["sectors"] == 2 and k["atomic"]["useful_bytes"] == 8 and k["atomic"]["lanes"] == n - 1
    assert torch.equal(y[1 : n - 1], x[stride : (n - 1) * stride : stride])  # the kernel ran (y[0]: the atomics')
    assert k["efficiency"] == pytest.approx(k["useful_bytes"] / (32 * k["sectors"]))
    load_eff = k["load"]["useful_bytes"] / (32 * k["load"]["sectors"])
    assert load_eff > 0.75 if stride == 1 else load_eff == 4 / 32
