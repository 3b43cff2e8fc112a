"""Soak (marked, not in the default run: ``pytest -m soak``): 1,000 training steps on new graphs each step; resident
memory must stay flat after warm-up (at most 5% growth), so nothing (graph caches, plans, autograd state) leaks."""

import gc
import os

import pytest
import torch
from conftest import so2_layer

from ik_fast.models.data import knn_graph

STEPS = int(os.environ.get("IK_FAST_SOAK_STEPS", "1000"))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.soak
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_soak_training_on_new_graphs():
    layer = so2_layer(n_layers=3)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    warmup = max(STEPS // 10, 1)
    rss = []
    for step in range(STEPS):
        n = int(torch.randint(40, 120, (1,), generator=gen))
        pos = torch.randn(n, 2, generator=gen) * 0.5
        ei = knn_graph(pos, int(torch.randint(4, 12, (1,), generator=gen)))
        x = torch.randn(n, layer.in_type.size, generator=gen)
        a = torch.randn(ei.shape[1], 2, generator=gen)
        loss = layer(x, ei, edge_attr=a, pos=pos).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        if step + 1 == warmup or (step + 1) % 100 == 0:
            gc.collect()
            rss.append(_rss_bytes())
    growth = max(rss) / rss[0] - 1
    print(
        f"\nsoak: {STEPS} steps, RSS after warm-up {rss[0] / 2**20:.1f} MB, max {max(rss) / 2**20:.1f} MB, "
        f"growth {100 * growth:.2f}%"
    )
    assert growth <= 0.05
