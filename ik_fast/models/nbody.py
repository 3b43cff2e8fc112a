"""The charged-particle N-body task (Kipf et al. 2018, as used by EGNN/SEGNN): five particles with charges ±1 interact
through a Coulomb force (like charges repel); from positions, velocities and charges predict the positions after
``horizon`` integration steps.

The simulator is written here (semi-implicit Euler in float64, softened 1/r^2 force clipped in norm for stability, no
box); systems are generated on the fly from a seed, so nothing is stored.
"""

from __future__ import annotations

from typing import Dict

import torch

__all__ = ["simulate", "nbody_dataset", "nbody_graph"]


def simulate(
    pos: torch.Tensor,
    vel: torch.Tensor,
    charge: torch.Tensor,
    steps: int,
    dt: float = 1e-3,
    max_force: float = 50.0,
    softening: float = 0.05,
):
    """Integrate ``steps`` steps of size ``dt``. pos, vel (B, n, 3), charge (B, n). Returns (pos, vel) at the end.

    Force on particle i: ``sum_j q_i q_j (x_i - x_j) / (|x_i - x_j|^2 + softening^2)^(3/2)``, its norm clipped at
    ``max_force`` (close encounters would otherwise need a much smaller step)."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    x, v = pos.double().clone(), vel.double().clone()
    qq = (charge[:, :, None] * charge[:, None, :]).double()
    for _ in range(steps):
        diff = x[:, :, None, :] - x[:, None, :, :]  # (B, n, n, 3): x_i - x_j
        r2 = (diff**2).sum(-1) + softening**2
        f = (qq / r2**1.5)[..., None] * diff
        f = f.sum(2)
        norm = f.norm(dim=-1, keepdim=True)
        f = f * torch.clamp(max_force / norm.clamp(min=1e-12), max=1.0)
        v = v + dt * f
        x = x + dt * v
    return x.to(pos.dtype), v.to(vel.dtype)


def nbody_dataset(
    n_systems: int,
    n_particles: int = 5,
    horizon: int = 1000,
    dt: float = 1e-3,
    seed: int = 0,
    burn_in: int = 100,
    loc_std: float = 0.5,
    vel_std: float = 0.5,
) -> Dict[str, torch.Tensor]:
    """``n_systems`` independent systems: dict with pos, vel (S, n, 3) after ``burn_in`` steps, charge (S, n),
    target (S, n, 3) = positions ``horizon`` steps later, and dt (the time span, ``horizon * dt``)."""
    if n_systems < 1:
        raise ValueError(f"n_systems must be positive, got {n_systems}")
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n_systems, n_particles, 3, generator=g, dtype=torch.float64) * loc_std
    vel = torch.randn(n_systems, n_particles, 3, generator=g, dtype=torch.float64) * vel_std
    charge = torch.randint(0, 2, (n_systems, n_particles), generator=g).double() * 2 - 1
    pos, vel = simulate(pos, vel, charge, burn_in, dt)
    target, _ = simulate(pos, vel, charge, horizon, dt)
    f = torch.get_default_dtype()
    return dict(
        pos=pos.to(f), vel=vel.to(f), charge=charge.to(f), target=target.to(f), dt=torch.tensor(horizon * dt, dtype=f)
    )


def nbody_graph(n_systems: int, n_particles: int = 5) -> torch.Tensor:
    """edge_index (2, S * n * n): every ordered pair of particles of a system, self-loops included."""
    i = torch.arange(n_particles)
    src, dst = torch.meshgrid(i, i, indexing="ij")
    one = torch.stack([src.reshape(-1), dst.reshape(-1)])
    off = (torch.arange(n_systems) * n_particles).repeat_interleave(one.shape[1])
    return one.repeat(1, n_systems) + off
