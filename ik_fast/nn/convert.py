"""Load checkpoints of the research code (github.com/maxxxzdn/implicit-steerable-kernels) into ik_fast layers.

:func:`from_research_state_dict` maps the state dict of one research ``ImplicitPointConv`` onto an
:class:`ik_fast.ImplicitPointConv` built with the same field types and kernel MLP sizes:

- renames: ``implicit_kernel.mlp.mlp.{3k}`` (escnn Linear) -> ``kernel.mlp.{k}``, the batch norms
  ``implicit_kernel.mlp.mlp.{3k+2}`` -> ``kernel.bn.{k}``, ``implicit_kernel.shell_width`` -> ``kernel.sigma``;
- the hidden irreps: the research code orders them as ``list(set(...))``, ik_fast sorts them (and by default adds
  the irreps the outputs need, e.g. the pseudovector on O(3)); every weight matrix is expanded with the research
  layer's own escnn basis (rebuilt from its field types, the irrep order read from the state dict's keys), its hidden
  components permuted into ik_fast's order (components ik_fast has and the research code lacks stay zero), and
  ik_fast's basis coefficients re-solved by least squares (exact: ik_fast's space of equivariant maps contains the
  permuted matrix; the residual is checked);
- the Fourier nonlinearity: the research code's sampling matrices ``A`` and ``Ainv`` (its grid and its inverse), with
  the same permutation, replace the layer's. They are not part of ik_fast's state dict (nor of a pickled layer,
  which is rebuilt from its constructor arguments): after loading a saved converted layer, convert again from the
  research state dict, unless the layer was built on the research grid (then the matrices agree anyway).

Tested against the research code's outputs on SO(3) (band limits 1 and 2) and O(3) (vector fields); other groups
go through the same steps, and the least-squares residual check raises if the research layer's input representation
differs from ik_fast's (e.g. O(2) on R^2 with escnn's default reflection axis: ik_fast feeds the position with the
gspace's own action on the base space, see docs/semantics.md).
"""

from __future__ import annotations

import ast
import copy
import re
from typing import Dict, List, Optional

import torch
from escnn import nn as enn

__all__ = ["from_research_state_dict"]

_PREFIX = "implicit_kernel.mlp.mlp."


def _hidden_irreps_from_keys(sd: Dict[str, torch.Tensor]) -> Optional[List[tuple]]:
    """The research hidden field's irreps in its order, read from a batch norm's or basis's key name."""
    for k in sd:
        m = re.search(r"(?:quotient\[[^\]]*\]|regular)?_\[((?:\([0-9, -]+\)\|?)+)\]", k)
        if m and k.startswith(_PREFIX):
            return [ast.literal_eval(t) for t in m.group(1).split("|")]
    return None


def _solve(lin, W: torch.Tensor, b: Optional[torch.Tensor], name: str, tol: float) -> None:
    """Set the escnn-basis coefficients of ik_fast's ``_EquivariantLinear`` so that it expands to (W, b)."""
    n = lin.weights.numel()
    with torch.no_grad():
        eye = torch.eye(n, dtype=torch.float64)
        exp = lin.expansion.to(torch.float64)
        B = torch.stack([exp(eye[i]).reshape(-1) for i in range(n)], 1)  # (out*in, n)
        lin.expansion.to(lin.weights.dtype)
        theta = torch.linalg.lstsq(B, W.reshape(-1, 1).double()).solution.reshape(-1)
        res = float((B @ theta - W.reshape(-1).double()).norm() / W.double().norm().clamp(min=1e-30))
        if res > tol:
            raise ValueError(
                f"{name}: the research weights are not representable in this layer's basis (relative "
                f"residual {res:.2e}); build the layer with the research code's field types and MLP sizes"
            )
        lin.weights.copy_(theta.to(lin.weights.dtype))
        if b is not None:
            if lin.bias is None:
                raise ValueError(f"{name}: the research layer has a bias but this layer's Linear has none")
            E = lin.bias_expansion.double()
            beta = torch.linalg.lstsq(E, b.reshape(-1, 1).double()).solution.reshape(-1)
            lin.bias.copy_(beta.to(lin.bias.dtype))


def _permutation(irreps_from: List[tuple], irreps_to: List[tuple], G) -> torch.Tensor:
    """(dim_to, dim_from) 0/1 matrix moving each irrep's components from ``irreps_from`` to ``irreps_to``."""

    def offsets(irs):
        out, p = {}, 0
        for irr in irs:
            out.setdefault(irr, []).append(p)
            p += G.irrep(*irr).size
        return out, p

    o_from, d_from = offsets(irreps_from)
    o_to, d_to = offsets(irreps_to)
    P = torch.zeros(d_to, d_from, dtype=torch.float64)
    for irr, starts in o_from.items():
        if irr not in o_to or len(o_to[irr]) < len(starts):
            raise ValueError(
                f"this layer's hidden field lacks the irrep {irr} of the research layer's hidden field "
                f"(build it with hidden='paper' or a band_limit that covers it)"
            )
        s = G.irrep(*irr).size
        for a, b in zip(starts, o_to[irr]):
            P[b : b + s, a : a + s] = torch.eye(s, dtype=torch.float64)
    return P


def from_research_state_dict(state_dict: Dict[str, torch.Tensor], layer, tol: float = 1e-4):
    """Load the state dict of a research ``ImplicitPointConv`` into ``layer`` (an :class:`ik_fast.ImplicitPointConv`
    with the same in/out/attribute field types and kernel MLP sizes). Returns ``layer``.

    Raises ``ValueError`` naming what does not match (missing keys, sizes, irreps).
    """
    from ik_fast.nn.layers import ImplicitPointConv

    if not isinstance(layer, ImplicitPointConv):
        raise TypeError(f"layer must be an ik_fast.ImplicitPointConv, got {type(layer).__name__}")
    if not isinstance(state_dict, dict) or "implicit_kernel.shell_width" not in state_dict:
        raise ValueError(
            "state_dict must be the state dict of one research ImplicitPointConv (no key 'implicit_kernel.shell_width')"
        )
    kern = layer.kernel
    sd = state_dict
    n_lin = len(kern.mlp)
    lin_keys = sorted(
        {int(k[len(_PREFIX) :].split(".")[0]) for k in sd if k.startswith(_PREFIX) and k.endswith(".weights")}
    )
    if lin_keys != [3 * k for k in range(n_lin)]:
        raise ValueError(
            f"state_dict has Linear layers {lin_keys} in its kernel MLP but the layer has {n_lin} "
            f"(n_layers={kern.n_layers}); expected {[3 * k for k in range(n_lin)]}"
        )
    G = kern.in_type.fibergroup
    dt = kern.sigma.dtype
    hidden = n_lin > 1
    if hidden:
        irr_r = _hidden_irreps_from_keys(sd)
        if irr_r is None:
            raise ValueError("cannot find the research hidden field's irreps in the state dict's keys")
        rho_i = kern.mlp[0].out_type.representations[0]
        irr_i = list(rho_i.irreps)
        P = _permutation(irr_r, irr_i, G)  # (D_i, D_r)
        C = kern.n_channels
        D_r = P.shape[1]
        if kern.mlp[0].out_type.size != C * P.shape[0]:
            raise ValueError(f"the layer's hidden width {kern.mlp[0].out_type.size} is not n_channels x {P.shape[0]}")
        Pi = torch.kron(torch.eye(C, dtype=torch.float64), P)  # channel-major fields
        # the research layer's hidden type, to expand its weights with its own basis
        from escnn.group import O3, SO3

        g0 = kern.mlp[0].in_type.gspace
        if isinstance(G, (SO3, O3)):
            sg = (False, -1) if isinstance(G, SO3) else (False, False, -1)
            act_r = enn.QuotientFourierELU(g0, sg, C, irr_r, type="ico")
        else:
            act_r = enn.FourierELU(g0, C, irr_r, type="regular", N=40 if kern.band_limit == 3 else 125)
        hid_r = act_r.in_type
        if hid_r.size != C * D_r:
            raise ValueError(f"the research hidden field has {C * D_r} dims but n_channels={C} x {D_r} expected")
    # the research MLP's input: positions as O(n)'s standard representation (restricted), then the attributes
    from escnn import group as egroup

    gs = kern.in_type.gspace
    full = egroup.o3_group() if gs.dimensionality == 3 else egroup.o2_group()
    pos_rep = full.standard_representation()
    if G != full:
        pos_rep = pos_rep.restrict(gs._sg_id)
    attr_reps = list(kern.edge_attr_type.representations) if kern.edge_attr_type is not None else []
    in_r = kern.mlp[0].in_type.gspace.type(pos_rep, *attr_reps)
    # Linear layers
    for k in range(n_lin):
        pre = f"{_PREFIX}{3 * k}."
        if pre + "weights" not in sd:
            raise ValueError(f"state_dict lacks {pre}weights")
        t_in = in_r if k == 0 else hid_r
        t_out = hid_r if k < n_lin - 1 else kern.mlp[-1].out_type
        # a private copy: escnn shares the expansion modules (and their sampled-basis buffers) of equal bases between
        # all its Linear layers (a module-level cache), so writing the research basis into them in place would change
        # every escnn Linear built afterwards on these types in this process
        ref = copy.deepcopy(enn.Linear(t_in, t_out, bias=(pre + "bias") in sd, initialize=False))
        if ref.weights.shape != sd[pre + "weights"].shape:
            raise ValueError(
                f"{pre}weights has shape {tuple(sd[pre + 'weights'].shape)} but the research layer "
                f"rebuilt from this layer's types expects {tuple(ref.weights.shape)}"
            )
        # the research layer's own sampled basis and bias expansion (buffers of its state dict) with its weights:
        # escnn's bases are not unique (without py3nj its Clebsch-Gordan coefficients are computed numerically and
        # cached per environment), so the coefficients only mean something in the basis they were trained in
        own = {k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)}
        wanted = ref.state_dict()
        with torch.no_grad():
            for name, t in wanted.items():
                if name in own and own[name].shape == t.shape:
                    t.copy_(own[name])
                elif name in ("weights", "bias"):
                    raise ValueError(f"state_dict lacks {pre}{name} of shape {tuple(t.shape)}")
        ref.eval()
        W, b = ref.export().weight.detach().double(), None
        if ref.bias is not None:
            b = ref.export().bias.detach().double()
        if k > 0:
            W = W @ Pi.T
        if k < n_lin - 1:
            W = Pi @ W
            b = None if b is None else Pi @ b
        # the last layer outputs the pairs (o, i) of Hom(F_in, F_out) in the same order in both codes
        _solve(kern.mlp[k], W, b, f"{pre}weights", tol)
    # batch norms and the Fourier nonlinearity
    if hidden:
        with torch.no_grad():
            A = sd.get(f"{_PREFIX}1.A")
            Ainv = sd.get(f"{_PREFIX}1.Ainv")
            if A is not None and kern.act_A is not None:
                kern.act_A = (A.double() @ P.T).to(dt)
                kern.act_Ainv = (P @ Ainv.double()).to(dt)
            for k, bn in enumerate(kern.bn):
                pre = f"{_PREFIX}{3 * k + 2}."
                names = {n[len(pre) :] for n in sd if n.startswith(pre)}
                rm = [sd[pre + n] for n in names if n.endswith("running_mean")]
                rv = [sd[pre + n] for n in names if n.endswith("running_var")]
                wt = [sd[pre + n] for n in names if n.endswith("_weight")]
                bs = [sd[pre + n] for n in names if n.endswith("_bias")]
                if not (rm and rv and wt and bs):
                    raise ValueError(f"state_dict lacks the batch norm {pre}* (found {sorted(names)})")
                bn.running_mean.copy_((rm[0].double() @ P.T).to(dt))
                bn.running_var.copy_(rv[0].reshape(-1).to(dt))
                bn.weight.copy_(wt[0].reshape(-1).to(dt))
                bn.bias.copy_(bs[0].reshape(bn.bias.shape).to(dt))
                if pre + "num_batches_tracked" in sd:
                    bn.num_batches_tracked.copy_(sd[pre + "num_batches_tracked"])
        kern._cache = None
    with torch.no_grad():
        kern.sigma.copy_(sd["implicit_kernel.shell_width"].reshape(()).to(dt))
        if "bias" in sd:
            if layer.bias is None or layer.bias.shape != sd["bias"].shape:
                raise ValueError(
                    f"state_dict's bias has shape {tuple(sd['bias'].shape)} but the layer's is "
                    f"{None if layer.bias is None else tuple(layer.bias.shape)}"
                )
            layer.bias.copy_(sd["bias"].to(dt))
    return layer
