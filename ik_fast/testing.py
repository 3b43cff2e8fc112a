"""Testing helpers for users and for our own suite: group actions and a reusable equivariance check."""

from __future__ import annotations

from typing import Iterable, Optional

import torch

__all__ = ["rep_matrix", "basespace_matrix", "equivariance_error", "assert_equivariant"]


def rep_matrix(field_type, g, like: torch.Tensor) -> torch.Tensor:
    """rho(g) of a field type, as a tensor with the dtype and device of ``like``."""
    return torch.as_tensor(field_type.representation(g), dtype=like.dtype, device=like.device)


def basespace_matrix(gspace, g, like: torch.Tensor) -> torch.Tensor:
    """The action of g on the base space R^n (escnn's ``basespace_action``, not always O(n)'s standard one)."""
    return torch.as_tensor(gspace.basespace_action(g), dtype=like.dtype, device=like.device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny))


@torch.no_grad()
def equivariance_error(module, g, pos, x=None, edge_index=None, edge_attr=None) -> float:
    """Relative error ||f(g.inputs) - g.f(inputs)|| / ||g.f(inputs)|| for one group element ``g``.

    ``module`` is an :class:`~ik_fast.ImplicitKernel` (then ``pos`` are edge vectors (E, n) and the kernel
    constraint K(g d) = rho_out(g) K(d) rho_in(g)^T is checked) or an :class:`~ik_fast.ImplicitPointConv`
    (then ``pos`` are node positions, ``x`` node features and ``edge_index`` the graph).
    """
    from .kernel import ImplicitKernel

    kern = module if isinstance(module, ImplicitKernel) else module.kernel
    gs = kern.in_type.gspace
    B = basespace_matrix(gs, g, pos)
    A = None if edge_attr is None else rep_matrix(kern.edge_attr_type, g, edge_attr)
    ga = None if edge_attr is None else edge_attr @ A.t()
    r_out = rep_matrix(kern.out_type, g, pos)
    r_in = rep_matrix(kern.in_type, g, pos)
    if isinstance(module, ImplicitKernel):
        k = module(pos, edge_attr)
        kg = module(pos @ B.t(), ga)
        return _rel(kg, r_out @ k @ r_in.t())
    out = module(x, edge_index, edge_attr=edge_attr, pos=pos)
    outg = module(x @ r_in.t(), edge_index, edge_attr=ga, pos=pos @ B.t())
    return _rel(outg, out @ r_out.t())


def assert_equivariant(module, pos, x=None, edge_index=None, edge_attr=None, elements: Optional[Iterable] = None,
                       n_samples: int = 5, rtol: float = 1e-5) -> float:
    """Check equivariance on ``elements`` (default: ``n_samples`` random elements of the group); returns the
    largest relative error and raises AssertionError when it exceeds ``rtol``."""
    from .kernel import ImplicitKernel

    kern = module if isinstance(module, ImplicitKernel) else module.kernel
    G = kern.in_type.fibergroup
    if elements is None:
        elements = [G.sample() for _ in range(n_samples)]
    worst = max(equivariance_error(module, g, pos, x, edge_index, edge_attr) for g in elements)
    if not worst <= rtol:
        raise AssertionError(f"equivariance error {worst:.3g} exceeds rtol={rtol:.3g} for {G.name}")
    return worst
