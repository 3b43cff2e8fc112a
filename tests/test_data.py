"""Graph construction: k-d tree kNN and radius graphs agree with brute force; a cutoff really cuts edges."""

import torch

from ik_fast.models.data import knn_graph, molecule_batch, radius_graph


def test_knn_graph_matches_brute_force():
    pos = torch.randn(300, 3, generator=torch.Generator().manual_seed(0))
    ei = knn_graph(pos, 7)
    brute = torch.cdist(pos, pos).topk(7, dim=1, largest=False).indices
    assert torch.equal(ei[1], torch.arange(300).repeat_interleave(7))
    assert torch.equal(ei[0].reshape(300, 7).sort(1).values, brute.sort(1).values)
    assert knn_graph(pos[:3], 7).shape == (2, 9)  # k capped at the node count


def test_radius_graph_cuts_at_the_cutoff_within_each_graph():
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(200, 3, generator=g)
    batch = torch.randint(0, 3, (200,), generator=g)
    ei = radius_graph(pos, 0.6, batch)
    d = torch.cdist(pos, pos)
    want = (d < 0.6) & (batch[:, None] == batch[None, :])
    assert ei.shape[1] == int(want.sum()) and bool(want[ei[0], ei[1]].all())
    assert radius_graph(pos, 0.6, batch, self_loops=False).shape[1] == ei.shape[1] - 200


def test_molecule_batch_cutoff_cuts_edges():
    g = torch.Generator().manual_seed(2)
    mols = [
        (torch.randn(n, 3, generator=g, dtype=torch.float64) * 2, torch.zeros(n, dtype=torch.long)) for n in (9, 14)
    ]
    pos, _, ei_all, attr_all = molecule_batch(mols)
    assert ei_all.shape[1] == 9 * 9 + 14 * 14  # no cutoff: every pair of each molecule
    pos, _, ei, attr = molecule_batch(mols, cutoff=2.0)
    dist = (pos[ei[0]] - pos[ei[1]]).norm(dim=1)
    assert 23 <= ei.shape[1] < ei_all.shape[1] and bool((dist < 2.0).all())
    same = (ei[0] < 9) == (ei[1] < 9)
    assert bool(same.all())  # no edge between molecules
    assert attr.shape == (ei.shape[1], 4)
