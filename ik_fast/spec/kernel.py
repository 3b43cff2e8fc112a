"""ImplicitKernel: the G-equivariant MLP of an implicit steerable kernel, built from escnn, lowered to a program."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np
import torch
from escnn import nn as enn

from ik_fast.spec import _groups
from ik_fast.spec._serialize import reduce_module
from ik_fast.spec.program import BatchNorm, BlockPlan, Hidden, KernelProgram, Linear, _as, build_plan, scalar
from ik_fast.structure import ConvSpec, FieldGroup, HiddenLayout

__all__ = ["ImplicitKernel", "check_field_type", "NONLINEARITIES"]

# the kernel MLP's hidden nonlinearities: the paper's Fourier ELU (a pointwise ELU on finite groups' regular fields),
# and the exactly equivariant gated and norm nonlinearities on a direct sum of irreps
NONLINEARITIES = ("fourier_elu", "gated", "norm")

_BASIS_TOL = 1e-4  # relative; escnn's float32 bases carry numerical noise below ~1e-5 of each element's maximum


def check_field_type(value, name: str, gspace=None):
    if not isinstance(value, enn.FieldType):
        raise TypeError(f"{name} must be an escnn FieldType, got {type(value).__name__}")
    if gspace is not None and value.gspace != gspace:
        raise ValueError(f"{name} must live on the same gspace as in_type ({gspace}), got {value.gspace}")


def _clean_(t: torch.Tensor, dims) -> None:
    """Zero the float32 noise of an escnn basis in place, relative to each element's maximum over ``dims``."""
    peak = t.abs().amax(dim=dims, keepdim=True)
    t[t.abs() <= _BASIS_TOL * peak] = 0


def _non_persistent(module: torch.nn.Module) -> None:
    """Keep escnn's sampled bases out of state_dict (they are rebuilt from the field types)."""
    for m in module.modules():
        m._non_persistent_buffers_set.update(m._buffers.keys())


def _field_groups(field_type):
    """Index tensors (F, d) of the fields of each representation, grouped by representation name."""
    return [torch.from_numpy(g.indices()) for g in _field_group_specs(field_type)]


def _field_group_specs(field_type):
    """The fields of each representation as :class:`~ik_fast.structure.FieldGroup` (size, offsets), grouped by
    representation name in order of first appearance."""
    groups, sizes = {}, {}
    pos = 0
    for rep in field_type.representations:
        groups.setdefault(rep.name, []).append(pos)
        sizes[rep.name] = rep.size
        pos += rep.size
    return [FieldGroup(sizes[name], tuple(offs)) for name, offs in groups.items()]


_IRREP_FIELDS: dict = {}


def _irrep_field(G, irreps, gates: bool):
    """(rho, rho_lin): the direct sum of ``irreps`` (identity change of basis) and the Linear's output field of a
    layer (rho, then one trivial gate per non-trivial irrep when ``gates``), made once per group and irreps."""
    from escnn.group import directsum

    def make(ids, name):
        key = (id(G), G.name, name)
        if key not in _IRREP_FIELDS:
            _IRREP_FIELDS[key] = directsum([G.irrep(*i) for i in ids], name=name)
        return _IRREP_FIELDS[key]

    key = "_".join(str(i) for i in irreps)
    rho = make(list(irreps), f"ik_fast_irreps[{key}]")
    if not gates:
        return rho, rho
    triv = G.trivial_representation.irreps[0]
    extra = [triv] * sum(1 for i in irreps if not G.irrep(*i).is_trivial())
    return rho, make(list(irreps) + extra, f"ik_fast_gated[{key}]")


def _stable_order(keys: torch.Tensor) -> torch.Tensor:
    """``torch.argsort(keys, stable=True)`` of a CPU tensor at construction, by NumPy's single-threaded stable sort
    (the same permutation): torch's parallel sort of the 43k map entries of an O(2) layer took ~0.5 s on a loaded
    2-core machine (its threads waiting for each other), NumPy's 3 ms."""
    return torch.from_numpy(np.argsort(keys.numpy(), kind="stable"))


def _expansion_map(expansion, shape):
    """The linear map of an escnn ``BlocksBasisExpansion`` as sorted sparse entries: ``W.flatten()[rows] =
    segment_sum(weights[cols] * values, lengths)``. Built once from escnn's sampled (cleaned) bases and its field
    bookkeeping, so a forward pass expands a weight in a few operators instead of one Python-level block loop
    (with host synchronisations) per representation pair."""
    from escnn.nn.modules.basismanager import retrieve_indices

    _, in_pos, _ = retrieve_indices(expansion._in_reprs)
    _, out_pos, _ = retrieve_indices(expansion._out_reprs)
    n_in = shape[1]
    targets, cols, vals = [], [], []
    for io_pair in expansion._representations_pairs:
        basis = getattr(expansion, f"block_expansion_{expansion._escape_pair(io_pair)}").sampled_basis
        basis = basis.detach().reshape(basis.shape[0], basis.shape[1], basis.shape[2]).cpu()  # (n_b, o, i), S = 1
        n_b, o, i = basis.shape
        rows_p = out_pos[io_pair[1]].reshape(-1, o)  # (out_count, o) positions of the output fields
        cols_p = in_pos[io_pair[0]].reshape(-1, i)  # (in_count, i)
        n_out, n_inp = rows_p.shape[0], cols_p.shape[0]
        beta, a, b = torch.nonzero(basis, as_tuple=True)
        f = torch.arange(n_out)[:, None, None]
        g = torch.arange(n_inp)[None, :, None]
        start = expansion._weights_ranges[io_pair][0]
        targets.append((rows_p[f, a] * n_in + cols_p[g, b]).reshape(-1))
        cols.append((start + (f * n_inp + g) * n_b + beta).reshape(-1))
        vals.append(basis[beta, a, b].expand(n_out, n_inp, -1).reshape(-1))
    if not targets:
        e = torch.zeros(0, dtype=torch.long)
        return e, e, torch.zeros(0), e
    targets, cols, vals = torch.cat(targets), torch.cat(cols), torch.cat(vals)
    order = _stable_order(targets)
    targets, cols, vals = targets[order], cols[order], vals[order]
    rows, lengths = torch.unique_consecutive(targets, return_counts=True)
    return cols, vals, rows, lengths


class _Expand(torch.autograd.Function):
    """``segment_sum(cat(sources)[cols] * values, lengths)``, the kernel's one expansion map applied to its learnable
    tensors, split into the pieces of the given shapes. The backward is the chain autograd forms for these operators
    (each entry's target's gradient, read from its piece's gradient, times its value, accumulated per source column
    with index_add in entry order, split per source), in one node instead of one per operator and piece
    (their narrows and views cost ~70 operators a pass); it is built of differentiable operators, so double backward
    works."""

    @staticmethod
    def forward(ctx, cols, values, lengths, targets, shapes, local, *srcs):
        ctx.set_materialize_grads(False)
        src = torch.cat([t if t.dim() == 1 else t.view(-1) if t.is_contiguous() else t.reshape(-1) for t in srcs])
        ctx.save_for_backward(cols, values)
        ctx.src_shapes = [t.shape for t in srcs]
        ctx.local = local  # (constants of the kernel: each piece's entries' targets within the piece)
        contrib = src.index_select(0, cols) * values
        if contrib.device.type == "cpu":
            # the same sums in the same order; segment_reduce's CPU kernel loops over every (mostly empty) segment
            # of the dense output (35M at config H: 0.26 s a step), index_add only over the entries
            flat = contrib.new_zeros(lengths.shape[0]).index_add_(0, targets, contrib)
        else:  # deterministic on CUDA, where index_add uses atomics
            flat = torch.segment_reduce(contrib, "sum", lengths=lengths, unsafe=True)
        parts = torch.split(flat, [_numel(s) for s in shapes])
        return tuple(p if len(s) == 1 else p.view(s) for p, s in zip(parts, shapes))

    @staticmethod
    def backward(ctx, *grads):
        cols, values = ctx.saved_tensors
        ref = next((g for g in grads if g is not None), None)
        if ref is None:
            return (None,) * (6 + len(ctx.src_shapes))
        # each entry's target's gradient, read from its piece's gradient (the entries are sorted by target, so a
        # piece's entries are one run of them, at the targets ctx.local holds): no concatenation of the pieces'
        # gradients, which at problem `cpu` are 35M numbers (the dense final weight twice) for 2M entries
        contrib = []
        for g, local in zip(grads, ctx.local):
            if local.numel() == 0:
                continue
            # (take: the flat gather without a view of each piece's gradient)
            contrib.append(ref.new_zeros(local.numel()) if g is None else torch.take(g, local))
        contrib = (torch.cat(contrib) if len(contrib) > 1 else contrib[0]) * values
        g = ref.new_zeros(sum(_numel(s) for s in ctx.src_shapes)).index_add(0, cols, contrib)
        parts = torch.split(g, [_numel(s) for s in ctx.src_shapes])
        return (None,) * 6 + tuple(p if len(s) == 1 else p.view(s) for p, s in zip(parts, ctx.src_shapes))


def _numel(shape) -> int:
    return math.prod(shape)


class _EquivariantLinear(torch.nn.Module):
    """Parameters of an escnn ``Linear`` (same basis and initialisation), without its eval-mode buffers."""

    def __init__(self, in_type, out_type, init_scheme: str, bias: bool = True):
        super().__init__()
        # recompute=True: private basis tensors. escnn otherwise shares one module per basis across all layers, so
        # cleaning it, or .double() / .to() on one layer, would change every other layer built on the same basis
        lin = enn.Linear(in_type, out_type, bias=bias, initialize=False, recompute=True)
        self.expansion = lin.basisexpansion
        if self.expansion.dimension() == 0:
            raise ValueError(
                f"the kernel MLP has a Linear layer without parameters: no equivariant linear map exists from "
                f"{in_type} to {out_type} (escnn's basis between them is empty), so the kernel would be zero; with "
                f"n_layers=1 the MLP is that one Linear from the edge vector (and attributes) to the kernel: use "
                f"n_layers >= 2, whose hidden field carries every irrep the kernel needs, or other field types"
            )
        for name, buf in list(self.expansion.named_buffers()):
            if name.endswith("sampled_basis"):
                _clean_(buf.data, dims=tuple(range(1, buf.dim())))
        _non_persistent(self.expansion)
        if init_scheme == "deltaorthonormal":
            enn.init.deltaorthonormal_init(lin.weights.data, self.expansion)
        else:
            enn.init.generalized_he_init(lin.weights.data, self.expansion)
        self.weights = torch.nn.Parameter(lin.weights.data.clone())
        if lin.bias is not None:
            self.bias = torch.nn.Parameter(lin.bias.data.clone())
            be = lin.bias_expansion.clone()
            _clean_(be, dims=(0,))
            self.register_buffer("bias_expansion", be, persistent=False)
        else:
            self.bias = None
            self.bias_expansion = None
        self.shape = (out_type.size, in_type.size)
        self.in_type, self.out_type = in_type, out_type
        cols, vals, rows, lengths = _expansion_map(self.expansion, self.shape)
        dt = self.weights.dtype
        for name, t in (("map_cols", cols), ("map_values", vals.to(dt)), ("map_rows", rows), ("map_lengths", lengths)):
            self.register_buffer(name, t, persistent=False)

    @torch.no_grad()
    def structural_mask(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        w = self.expansion(
            torch.randn(self.weights.shape, generator=g, dtype=self.weights.dtype, device=self.weights.device)
        ).reshape(*self.shape)
        return w != 0

    def set_plan(self, plan: Optional[BlockPlan]) -> None:
        self._plan = plan

    def plan(self) -> Optional[BlockPlan]:
        return self._plan

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "_plan", None) is not None:
            self._plan = self._plan.to(self.weights.device)
        return out


class _IIDBatchNormParams(torch.nn.Module):
    """Parameters and running statistics of escnn's IIDBatchNorm1d on ``channels`` copies of ``rho``."""

    def __init__(self, G, rho, channels: int, eps: float, momentum: float):
        super().__init__()
        triv = []
        S = np.zeros((rho.size, rho.size))
        p = 0
        for irr in rho.irreps:
            if G.irrep(*irr).is_trivial():
                triv.append(p)
                S[p, p] = 1.0
            p += G.irrep(*irr).size
        P = rho.change_of_basis @ S @ rho.change_of_basis_inv
        Q = rho.change_of_basis[:, triv]
        dt = torch.get_default_dtype()
        self.register_buffer("avg", torch.tensor(P, dtype=dt), persistent=False)
        self.register_buffer("bias_expansion", torch.tensor(Q, dtype=dt), persistent=False)
        self.weight = torch.nn.Parameter(torch.ones(channels))
        self.bias = torch.nn.Parameter(torch.zeros(channels, len(triv)))
        self.register_buffer("running_mean", torch.zeros(channels, rho.size))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.eps, self.momentum = eps, momentum
        for v in (eps, momentum, 1 - momentum):  # the 0-d factors of finish and update, made now rather than in a pass
            scalar(v, dt)

    sync_stats = False  # set by ik_fast.nn.sync_bn.convert_sync_batchnorm: statistics over every process's edges

    def lower(self, training: bool, shift: torch.Tensor) -> BatchNorm:
        """The program's batch norm, with the expanded bias ``shift`` (C, d) (the kernel's one expansion map)."""
        return BatchNorm(
            training, self.eps, self.avg, self.weight, shift, self.running_mean, self.running_var, self.sync_stats
        )

    @torch.no_grad()
    def update(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """``running = (1 - m) running + m batch``, the factors as 0-d tensors (the same products as with Python
        numbers, without an operator that wraps each number)."""
        m = self.momentum
        for run, new in ((self.running_mean, mean), (self.running_var, var)):
            run.mul_(scalar(1 - m, run.dtype)).add_(_as(new, run.dtype).mul(scalar(m, run.dtype)))
        self.num_batches_tracked += 1


class ImplicitKernel(torch.nn.Module):
    r"""A G-steerable kernel parameterised by a G-equivariant MLP (Zhdanov, Hoffmann & Cesa, NeurIPS 2023).

    ``K(d, a) = reshape(MLP([d, a])) * exp(-|d|^2 / 2 sigma^2) / sqrt(len(out_type))`` satisfies
    ``K(g d, g a) = rho_out(g) K(d, a) rho_in(g)^T`` for every g in G, the fibergroup of ``in_type.gspace``.

    Args:
        in_type, out_type: escnn field types of the convolution's input and output, on the same gspace on R^2 or
            R^3 (any subgroup of O(n) escnn offers; mixed representations allowed).
        edge_attr_type: optional field type of G for per-edge attributes (bond types, distances, velocities).
        n_layers: layers of the MLP (``n_layers - 1`` hidden layers).
        n_channels: channels of each hidden layer.
        init_scheme: ``"he"`` (generalised He) or ``"deltaorthonormal"``.
        batch_norm: IIDBatchNorm1d after each hidden nonlinearity, as the research code does.
        band_limit: hidden band limit L; default max frequency of out_type (x) in_type + 1.
        grid: sampling grid of the Fourier nonlinearity. ``None``: the smallest well-conditioned default grid (the
            sampling matrix has full column rank and condition number <= 100, checked here; on SO(3)/O(3) unions of
            icosahedral orbits, so the icosahedral group is an exact symmetry); ``"paper"``: the research code's
            grids; or keyword arguments of ``G.grid`` (e.g. ``{"type": "thomson", "N": 300}`` on SO(3)), a finer grid
            making the nonlinearity more equivariant. A rank-deficient or ill-conditioned non-default grid warns.
        hidden: ``"full"`` (default): the hidden field carries every irrep the inputs, attributes and outputs need;
            ``"paper"``: exactly the research code's band-limited hidden field (for loading its checkpoints with
            :func:`ik_fast.nn.convert.from_research_state_dict`); warns naming the irreps the output then cannot get.
        nonlinearity: of the hidden layers. ``"fourier_elu"`` (default, the paper's): the Fourier ELU on the hidden
            field's sampling grid (a pointwise ELU on a finite group's regular field), exactly equivariant only under
            the grid's symmetries on a continuous group. ``"gated"`` and ``"norm"``: exactly equivariant under every
            element of every group; the hidden field is the same irreps as a direct sum, scalars (trivial irreps)
            through an ELU and every non-trivial irrep ``v`` scaled by ``sigmoid(gate)`` (``"gated"``: one invariant
            gate per irrep, made by the preceding Linear) or by ``sigmoid(|v| - b)`` (``"norm"``: ``b`` a learned
            bias per channel and irrep, :attr:`act_bias`). No grid: ``grid`` must be None.

    Calling it on positions (E, n) and attributes (E, A) returns the kernels (E, out_type.size, in_type.size).
    :meth:`program` returns the lowered :class:`~ik_fast.spec.program.KernelProgram` that the backends evaluate.
    """

    @_groups.escnn_build()  # escnn's debug prints to a logger, its Clebsch-Gordan constraints built faster
    def __init__(
        self,
        in_type,
        out_type,
        edge_attr_type=None,
        n_layers: int = 3,
        n_channels: int = 16,
        init_scheme: str = "he",
        batch_norm: bool = True,
        band_limit: Optional[int] = None,
        grid: Optional[dict] = None,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        hidden: str = "full",
        nonlinearity: str = "fourier_elu",
    ):
        super().__init__()
        if hidden not in ("full", "paper"):
            raise ValueError(f"hidden must be 'full' or 'paper', got {hidden!r}")
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {list(NONLINEARITIES)}, got {nonlinearity!r}")
        if nonlinearity != "fourier_elu" and grid is not None:
            raise ValueError(
                f"grid samples the Fourier ELU; nonlinearity={nonlinearity!r} has no grid (pass grid=None)"
            )
        check_field_type(in_type, "in_type")
        check_field_type(out_type, "out_type", in_type.gspace)
        gspace = in_type.gspace
        if gspace.dimensionality not in (2, 3):
            raise ValueError(f"in_type must live on a gspace on R^2 or R^3, got dimensionality {gspace.dimensionality}")
        G = gspace.fibergroup
        if edge_attr_type is not None:
            check_field_type(edge_attr_type, "edge_attr_type")
            if edge_attr_type.fibergroup != G:
                raise ValueError(
                    f"edge_attr_type must be a field type of {G.name}, got one of {edge_attr_type.fibergroup.name}"
                )
        if not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive integer, got {n_layers!r}")
        if not isinstance(n_channels, int) or n_channels < 1:
            raise ValueError(f"n_channels must be a positive integer, got {n_channels!r}")
        if init_scheme not in ("he", "deltaorthonormal"):
            raise ValueError(f"init_scheme must be 'he' or 'deltaorthonormal', got {init_scheme!r}")
        if band_limit is not None and (not isinstance(band_limit, int) or band_limit < 0):
            raise ValueError(f"band_limit must be a non-negative integer, got {band_limit!r}")
        if grid is not None and grid != "paper" and not isinstance(grid, dict):
            raise ValueError(f"grid must be None, 'paper' or a dict of keyword arguments of G.grid, got {grid!r}")

        self._ctor = (
            (in_type, out_type, edge_attr_type),
            dict(
                n_layers=n_layers,
                n_channels=n_channels,
                init_scheme=init_scheme,
                batch_norm=batch_norm,
                band_limit=band_limit,
                grid=grid,
                bn_eps=bn_eps,
                bn_momentum=bn_momentum,
                hidden=hidden,
                nonlinearity=nonlinearity,
            ),
        )
        self.in_type, self.out_type, self.edge_attr_type = in_type, out_type, edge_attr_type
        self.n_layers, self.n_channels, self.batch_norm = n_layers, n_channels, batch_norm
        self.nonlinearity = nonlinearity
        attr_reps = list(edge_attr_type.representations) if edge_attr_type is not None else []
        reps = [*in_type.representations, *out_type.representations, *attr_reps, gspace.basespace_action]
        fmax_io = _groups.max_frequency(G, reps)
        if fmax_io is not None:  # before anything decomposes a representation (escnn needs the irreps to exist)
            _groups.instantiate_irreps(G, 4 * fmax_io + 4 if band_limit is None else 2 * band_limit + 2)
        g0 = _groups.kernel_gspace(gspace)
        mlp_in = g0.type(gspace.basespace_action, *attr_reps)
        products = {}  # escnn's tensor product is slow (Clebsch-Gordan through a disk cache): once per pair of types
        for o in out_type.representations:
            for i in in_type.representations:
                if (o.name, i.name) not in products:
                    products[(o.name, i.name)] = o.tensor(i)
        pair_reps = [products[(o.name, i.name)] for o in out_type.representations for i in in_type.representations]
        mlp_out = g0.type(*pair_reps)
        fmax = _groups.max_frequency(G, pair_reps)
        self.band_limit = band_limit if band_limit is not None else (None if fmax is None else fmax + 1)

        linears = []
        hidden_type = mlp_in
        # elements of G under which the kernel is exactly equivariant (the nonlinearity's grid maps onto itself):
        # every element without a Fourier nonlinearity, the grid's symmetry group with one (ik_fast.testing uses them)
        self.grid_symmetries = list(G.testing_elements()) if not G.continuous else [G.identity]
        # whether the kernel is equivariant under every element of G, not only the grid's symmetries
        self.exactly_equivariant = not G.continuous or n_layers == 1 or nonlinearity != "fourier_elu"
        self.grid_quality = (None, None)
        self._irreps = ()
        act_bias = []
        self.hidden_description = "none (a single Linear)"
        if n_layers > 1:
            needed = {irr for rep in (*mlp_in.representations, *pair_reps) for irr in rep.irreps}
            spec = _groups.build_hidden(g0, set() if hidden == "paper" else needed, self.band_limit, n_channels, grid)
            if hidden == "paper":
                lost = sorted(needed - set(spec.hidden_type.representations[0].irreps), key=str)
                if lost:
                    warnings.warn(
                        f"hidden='paper': the research code's hidden field of {G.name} lacks the irreps "
                        f"{lost}; the kernel's components on them are zero (as in the research code)",
                        stacklevel=2,
                    )
            self.hidden_description = spec.description
            self.escnn_activation = spec.make_module
            self.grid_symmetries = spec.grid_symmetries
            self.grid_quality = (spec.grid_rank, spec.grid_condition)
            rho = spec.hidden_type.representations[0]
            lin_type = spec.hidden_type
            if nonlinearity != "fourier_elu":
                # the same irreps as the Fourier ELU's field, as a direct sum (identity change of basis), so that
                # the nonlinearity acts irrep by irrep; a gated layer's Linear adds one trivial gate per
                # non-trivial irrep after each channel's components
                rho, rho_lin = _irrep_field(G, rho.irreps, nonlinearity == "gated")
                spec.hidden_type = g0.type(*[rho] * n_channels)
                lin_type = g0.type(*[rho_lin] * n_channels)
                self._irreps = tuple((G.irrep(*i).size, G.irrep(*i).is_trivial()) for i in rho.irreps)
                spec.A = spec.Ainv = None
                self.escnn_activation = None
                self.grid_symmetries = list(G.testing_elements()) if not G.continuous else [G.identity]
                self.grid_quality = (None, None)
                n_nt = sum(1 for _, t in self._irreps if not t)
                self.hidden_description = (
                    f"{n_channels} x {rho.size} ({len(self._irreps)} irreps, {n_nt} non-trivial), {nonlinearity}"
                )
                if nonlinearity == "norm" and n_nt > 0:  # (no parameter of size 0: a group without such irreps)
                    act_bias = [torch.nn.Parameter(torch.zeros(n_channels * n_nt)) for _ in range(n_layers - 1)]
            self._rho_size = rho.size
            if spec.A is not None:
                self.register_buffer("act_A", spec.A.to(torch.get_default_dtype()), persistent=False)
                self.register_buffer("act_Ainv", spec.Ainv.to(torch.get_default_dtype()), persistent=False)
            else:
                self.act_A = self.act_Ainv = None
            bns = []
            for _ in range(n_layers - 1):
                linears.append(_EquivariantLinear(hidden_type, lin_type, init_scheme))
                if batch_norm:
                    bns.append(_IIDBatchNormParams(G, rho, n_channels, bn_eps, bn_momentum))
                hidden_type = spec.hidden_type
            self.bn = torch.nn.ModuleList(bns)
        else:
            self.bn = torch.nn.ModuleList()
        linears.append(_EquivariantLinear(hidden_type, mlp_out, init_scheme))
        self.mlp = torch.nn.ModuleList(linears)
        # the norm nonlinearity's learned bias per hidden layer (channels x non-trivial irreps), empty otherwise
        self.act_bias = torch.nn.ParameterList(act_bias)
        self.sigma = torch.nn.Parameter(torch.tensor(0.5))
        self.norm = 1.0 / math.sqrt(len(out_type))

        # kernel layout of the last layer: entry (r, c) of K is MLP output kidx[r, c]
        R, C = out_type.size, in_type.size
        kidx = torch.empty(R, C, dtype=torch.long)
        p = 0
        o_off = 0
        for o in out_type.representations:
            i_off = 0
            for i in in_type.representations:
                blk = torch.arange(p, p + o.size * i.size).reshape(o.size, i.size)
                kidx[o_off : o_off + o.size, i_off : i_off + i.size] = blk
                p += o.size * i.size
                i_off += i.size
            o_off += o.size
        self.register_buffer("kidx", kidx, persistent=False)
        self._build_plans(hidden_type)
        self._build_expansion()
        self._cache = None

    # ------------------------------------------------------------------------------------------------------------
    def _build_plans(self, last_hidden_type) -> None:
        hid = self.n_layers > 1
        d_h = self._rho_size if hid else last_hidden_type.size
        c_h = self.n_channels if hid else 1
        hidden_fields = torch.arange(c_h * d_h).reshape(c_h, d_h)
        kind = (
            self.nonlinearity
            if self._irreps
            else ("fourier_elu" if getattr(self, "act_A", None) is not None else "elu")
        )
        proto = HiddenLayout(c_h, d_h, 0, False, False, kind, self._irreps)
        d_lin = proto.linear_components if hid else d_h
        lin_fields = torch.arange(c_h * d_lin).reshape(c_h, d_lin)
        for k, lin in enumerate(self.mlp[:-1]):
            mask = lin.structural_mask()
            cols = [hidden_fields] if k > 0 else [torch.arange(mask.shape[1]).reshape(1, -1)]
            lin.set_plan(build_plan(mask, [lin_fields], cols))
            lin.cw_form = None
            if k > 0 and proto.gates:
                # componentwise with the gates reading the field's first trivial component, where the basis is
                src = torch.tensor(list(range(d_h)) + [proto.trivial_source()] * proto.gates)
                r, c = torch.nonzero(mask, as_tuple=True)
                if proto.trivial_source() >= 0 and bool((c % d_h == src[r % d_lin]).all()):
                    lin.cw_form = (c_h, d_lin, d_h, src)
            elif k > 0 and lin.plan() is not None and lin.plan().componentwise is not None:
                f, d = lin.plan().componentwise
                lin.cw_form = (f, d, d, torch.arange(d))
        last = self.mlp[-1]
        C = self.in_type.size
        mask = self._kernel_layout(last.structural_mask(), None)[0]  # (R, H * C)
        # the ops' view of the same structure: one frozen spec, encoded once (a structural constant of the layer)
        layers = []
        for lin in self.mlp[:-1]:
            cw = lin.cw_form is not None
            grid = 0 if self.act_A is None else int(self.act_A.shape[0])
            layers.append(
                HiddenLayout(self.n_channels, self._rho_size, grid, cw, bool(self.batch_norm), kind, self._irreps)
            )
        spec = ConvSpec.from_mask(
            mask.reshape(mask.shape[0], -1, C).cpu().numpy(),
            _field_group_specs(self.out_type),
            _field_group_specs(self.in_type),
            c_h,
            layers,
        )
        self.spec = spec
        self.structure = spec.encode()
        rows = _field_groups(self.out_type)
        cols = []
        for g in _field_groups(self.in_type):  # (F_i, d_i) -> fields: input fields f, components (c, t, b)
            idx = (hidden_fields[None, :, :, None] * C) + g[:, None, None, :]  # (F_i, c_h, d_h, d_i)
            cols.append(idx.reshape(g.shape[0], -1))
        # the last Linear's plan from the structure's blocks (the groups are the spec's, in its order)
        pattern = lambda r, g: torch.from_numpy(spec.field_pattern(r, g))  # noqa: E731
        last.set_plan(build_plan(None, rows, cols, pattern=pattern, shape=tuple(mask.shape)))

    @property
    def activation(self) -> str:
        """The hidden layers' activation kind as the ops see it ("elu": a finite group's pointwise ELU, or no hidden
        layer)."""
        return self.spec.layers[0].activation if self.spec.layers else "elu"

    def _sources(self):
        """The learnable tensors that :meth:`_build_expansion`'s map reads, in its order: each Linear's weights and
        bias, then each batch norm's bias."""
        out = []
        for lin in self.mlp:
            out.append(lin.weights)
            if lin.bias is not None:
                out.append(lin.bias)
        for bn in self.bn:
            out.append(bn.bias)
        return out

    def _build_expansion(self) -> None:
        """One sparse linear map from every learnable tensor of the MLP (:meth:`_sources`, concatenated) to every
        tensor that a forward pass lowers them to: each Linear's dense weight and its bias (the last Linear's in the
        kernel layout), each componentwise hidden Linear's (D, C, C) channel mixing as well (the fused ops' form,
        :attr:`BlockPlan.componentwise`), and each batch norm's expanded shift. A forward pass then lowers the whole MLP
        in four operators (cat, index_select, mul, segment_reduce) and one split, instead of one expansion (and
        layout gathers) per tensor. The entries of one target keep the order of the per-Linear map, and targets
        without an entry are empty segments (sum 0), so every value is the sum the per-Linear expansion forms."""
        targets, cols, vals, pieces = [], [], [], []
        total = [0, 0]  # (target offset, source offset)

        def piece(key, shape):
            pieces.append((key, tuple(shape)))
            total[0] += int(np.prod(shape))
            return total[0] - int(np.prod(shape))

        def add(t, c, v, base):
            targets.append(t.reshape(-1) + base)
            cols.append(c.reshape(-1) + total[1])
            vals.append(v.reshape(-1).to(torch.float64))

        R, C = self.kidx.shape
        inv = torch.empty(R * C, dtype=torch.long)  # MLP output row -> kernel position r * C + c
        inv[self.kidx.reshape(-1)] = torch.arange(R * C)
        last = len(self.mlp) - 1
        for k, lin in enumerate(self.mlp):
            mc, mv, mr, ml = lin.map_cols, lin.map_values.detach().cpu(), lin.map_rows, lin.map_lengths
            flat = torch.repeat_interleave(mr, ml)  # target of each entry, (out * in) layout
            row, col = flat // lin.shape[1], flat % lin.shape[1]
            if k < last:
                base = piece(("w", k), lin.shape)
                add(flat, mc, mv, base)
                cw = getattr(lin, "cw_form", None)
                if cw is not None:  # P[a, c, c'] = W[c * d_out + a, c' * d_in + src[a]]
                    f, d_out, d_in, src = cw
                    assert bool((col % d_in == src[row % d_out]).all())
                    base = piece(("cw", k), (d_out, f, f))
                    add((row % d_out) * f * f + (row // d_out) * f + col // d_in, mc, mv, base)
            else:
                H = lin.shape[1]
                base = piece(("w", k), (R, H * C))
                pos = inv[row]
                add((pos // C) * (H * C) + col * C + pos % C, mc, mv, base)
            total[1] += lin.weights.numel()
            if lin.bias is not None:
                be = lin.bias_expansion.detach().cpu()
                i, j = torch.nonzero(be, as_tuple=True)
                base = piece(("b", k), (be.shape[0],))
                add(i if k < last else inv[i], j, be[i, j], base)
                total[1] += lin.bias.numel()
        for k, bn in enumerate(self.bn):
            Q = bn.bias_expansion.detach().cpu()  # (d, T): shift[c, a] = sum_t bias[c, t] Q[a, t]
            ch, T = bn.bias.shape
            a, t = torch.nonzero(Q, as_tuple=True)
            c = torch.arange(ch)[:, None]
            base = piece(("shift", k), (ch, Q.shape[0]))
            add(c * Q.shape[0] + a, c * T + t, Q[a, t].expand(ch, -1), base)
            total[1] += bn.bias.numel()
        t = torch.cat(targets)
        order = _stable_order(t)
        dt = torch.get_default_dtype()
        self.register_buffer("expand_cols", torch.cat(cols)[order], persistent=False)
        self.register_buffer("expand_values", torch.cat(vals)[order].to(dt), persistent=False)
        self.register_buffer("expand_lengths", torch.bincount(t, minlength=total[0]), persistent=False)
        self.register_buffer("expand_targets", t[order], persistent=False)
        self._pieces = pieces
        # (first entry, first target) of each piece and the totals: a piece's entries are one run of the sorted ones
        starts = torch.tensor([0] + [_numel(shape) for _, shape in pieces]).cumsum(0)
        first = torch.searchsorted(self.expand_targets, starts)
        bounds = list(zip(first.tolist(), starts.tolist()))
        # each piece's entries' targets within the piece (what the backward reads its gradient at), made once
        for i, ((lo, start), (hi, _)) in enumerate(zip(bounds, bounds[1:])):
            self.register_buffer(f"expand_local_{i}", self.expand_targets[lo:hi] - start, persistent=False)

    def _expand_all(self) -> dict:
        """Every lowered tensor of :meth:`_build_expansion`, by key (differentiable)."""
        srcs = self._sources()
        parts = _Expand.apply(
            self.expand_cols,
            _as(self.expand_values, srcs[0].dtype),
            self.expand_lengths,
            self.expand_targets,
            tuple(shape for _, shape in self._pieces),
            tuple(getattr(self, f"expand_local_{i}") for i in range(len(self._pieces))),
            *srcs,
        )
        return {key: p for (key, _), p in zip(self._pieces, parts)}

    def _kernel_layout(self, w: torch.Tensor, b: Optional[torch.Tensor]):
        """MLP output order -> kernel layout: weight (R, H * C_in), bias (R * C_in,)."""
        R, C = self.kidx.shape
        wk = w[self.kidx]  # (R, C, H)
        wk = wk.permute(0, 2, 1).reshape(R, -1)
        bk = None if b is None else b[self.kidx].reshape(-1)
        return wk, bk

    def _cache_key(self):
        ts = list(self.parameters()) + list(self.buffers())
        return (self.training, torch.is_grad_enabled()) + tuple((t.data_ptr(), t._version, t.dtype) for t in ts)

    def _cacheable(self) -> bool:
        # A program built with autograd is part of one forward's graph: reusing it in the next forward would make a
        # second backward fail, so only gradient-free programs are cached (eval mode under no_grad, or frozen). Never
        # while torch.compile traces: a traced program's tensors exist in that graph only.
        if self.training or torch.compiler.is_compiling():
            return False
        return not torch.is_grad_enabled() or not any(p.requires_grad for p in self.parameters())

    def program(self) -> KernelProgram:
        """Lower the MLP for one forward pass (cached in eval mode when no gradient flows to the parameters): every
        lowered tensor from the parameters through the kernel's one expansion map (one autograd node)."""
        cacheable = self._cacheable()
        if cacheable and self._cache is not None and self._cache[0] == self._cache_key():
            return self._cache[1]
        ex = self._expand_all()
        hidden = []
        # (lists, not slices and indexing of the ModuleLists: a slice builds a new ModuleList each forward)
        mlp, bns, act_bias = list(self.mlp), list(self.bn), list(self.act_bias)
        layouts = self.spec.layers
        for k, lin in enumerate(mlp[:-1]):
            bn = bns[k].lower(self.training, ex[("shift", k)]) if self.batch_norm else None
            linear = Linear(ex[("w", k)], ex.get(("b", k)), lin.plan(), ex.get(("cw", k)))
            ab = act_bias[k] if act_bias else None
            hidden.append(
                Hidden(linear, self.n_channels, self._rho_size, self.act_A, self.act_Ainv, bn, layouts[k], ab)
            )
        last = len(mlp) - 1
        final = Linear(ex[("w", last)], ex.get(("b", last)), mlp[last].plan())
        attr = 0 if self.edge_attr_type is None else self.edge_attr_type.size
        prog = KernelProgram(
            self.in_type.gspace.dimensionality,
            self.in_type.size,
            self.out_type.size,
            attr,
            tuple(hidden),
            final,
            self.sigma,
            self.norm,
            self.training,
            structure=self.structure,
        )
        self._cache = (self._cache_key(), prog) if cacheable else None
        return prog

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._cache = None
        return super()._apply(fn, *args, **kwargs)

    def __reduce__(self):
        return reduce_module(self, *self._ctor)

    @torch.no_grad()
    def update_running_stats(self, stats) -> None:
        """Update the batch norms' running statistics with the batch statistics a backend returned."""
        for bn, (mean, var) in zip(self.bn, stats):
            bn.update(mean, var)

    def forward(self, pos: torch.Tensor, attr: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Kernels (E, out_type.size, in_type.size) at relative positions ``pos`` (E, n) with attributes ``attr``."""
        from ik_fast.graph import check_edge_inputs

        prog = self.program()
        check_edge_inputs(
            prog,
            pos,
            attr,
            pos.shape[0] if isinstance(pos, torch.Tensor) else None,
            self.sigma.device,
            self.sigma.dtype,
        )
        if prog.needs_batch_stats and pos.shape[0] < 2:
            raise ValueError(
                "in training mode the kernel's batch norm needs at least two positions for batch "
                f"statistics, got {pos.shape[0]} (call .eval() or pass batch_norm=False)"
            )
        kernels, stats = prog.kernels(pos, attr)
        if stats:
            self.update_running_stats(stats)
        return kernels

    def extra_repr(self) -> str:
        return (
            f"in={self.in_type.size}, out={self.out_type.size}, attr="
            f"{0 if self.edge_attr_type is None else self.edge_attr_type.size}, n_layers={self.n_layers}, "
            f"n_channels={self.n_channels}, band_limit={self.band_limit}, hidden: {self.hidden_description}"
        )
