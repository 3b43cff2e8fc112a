"""The structure of one implicit kernel as a frozen, hashable value: what the ops receive as a structural constant.

A :class:`ConvSpec` is built once per :class:`~ik_fast.ImplicitKernel`, next to the lowering, from escnn's basis of the
last Linear. It holds the sizes, the hidden layout of every hidden layer (channels x components, grid points, whether
its Linear is componentwise, whether a batch norm follows) and the blocks of W' (R, H, C_in) as the basis knows them:

* the output fields grouped by representation (``out_groups``: each a field size d and the fields' offsets), the input
  fields likewise (``in_groups``);
* the last hidden activation as ``channels x components`` (channel-major, unit ``c * D + a``); without hidden layers
  the MLP input, one channel of ``n + A`` components;
* ``blocks``: for each (output field group, hidden component a, input field group) that the basis couples, the
  entries (i, j) of the d_out x d_in field pair that it reaches. W'[r, c D + a, s] is structurally non-zero exactly
  where r is entry i of a field of the output group, s entry j of a field of the input group and (i, j) is listed,
  for every channel c and every pair of fields of the two groups (escnn uses one basis per pair of representations,
  and each channel is a copy of the same hidden field).

The ops take it encoded (:meth:`ConvSpec.encode`, a string of integers, ``str? structure`` in the schemas): a
string is a constant to ``torch.compile`` and to every dispatcher, and its content is its hash, so an
implementation keys its caches on the string itself (:func:`decode` and :func:`mask` here; the native module's
``structure.cpp``). Every implementation derives its own tiling from it; none infers structure from data.

Format (``ik2`` then space-separated integers)::

    R C channels components L  [channels components grid componentwise batch_norm activation n_irreps
                                [size trivial] * n_irreps] * L
    n_out_groups [d F offset * F] * n_out_groups   n_in_groups [d F offset * F] * n_in_groups
    n_blocks [out_group component in_group n entry * n] * n_blocks          (entry = i * d_in + j)

``activation`` is the index of the layer's kind in :data:`ACTIVATIONS` (0 ``elu``, 1 ``fourier_elu``, 2 ``gated``,
3 ``norm``); ``n_irreps`` is 0 for the first two.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["ConvSpec", "FieldGroup", "HiddenLayout", "Block", "ACTIVATIONS", "decode", "mask", "layers_of"]

_MAGIC = "ik2"

# activation kinds of a hidden layer, by their code in the encoding
ACTIVATIONS = ("elu", "fourier_elu", "gated", "norm")


@dataclass(frozen=True)
class FieldGroup:
    """The fields of one representation: their size ``d`` and their offsets (in order)."""

    d: int
    offsets: Tuple[int, ...]

    def indices(self) -> np.ndarray:
        """(F, d) the indices of every field's components."""
        return np.asarray(self.offsets, dtype=np.int64)[:, None] + np.arange(self.d)[None, :]


@dataclass(frozen=True)
class HiddenLayout:
    """One hidden layer: ``channels`` x ``components`` units (channel-major), its Fourier ELU's ``grid`` points (0 for
    a pointwise ELU), whether its Linear is ``componentwise`` (the (D, C, C) form) and whether a ``batch_norm``
    follows; its ``activation`` (one of :data:`ACTIVATIONS`) and, for ``"gated"`` and ``"norm"``, the ``irreps`` of
    each channel's field in order, as (size, trivial) (the field is their direct sum, identity change of basis)."""

    channels: int
    components: int
    grid: int
    componentwise: bool
    batch_norm: bool
    activation: str = "fourier_elu"
    irreps: Tuple[Tuple[int, bool], ...] = ()

    @property
    def nontrivial(self) -> int:
        """Number of non-trivial irreps of a channel's field (the gates of a gated layer, the biases of a norm
        layer, per channel)."""
        return sum(1 for _, t in self.irreps if not t)

    @property
    def gates(self) -> int:
        """Gate scalars per channel that the Linear into a gated layer adds after the field's components."""
        return self.nontrivial if self.activation == "gated" else 0

    @property
    def linear_components(self) -> int:
        """Units per channel of the Linear into this layer: the components, and the gates of a gated layer."""
        return self.components + self.gates

    @property
    def bias_size(self) -> int:
        """Size of the layer's ``act_bias``: channels x non-trivial irreps for ``"norm"``, else 0."""
        return self.channels * self.nontrivial if self.activation == "norm" else 0

    def trivial_source(self) -> int:
        """The first trivial component of a channel's field (what a componentwise Linear's gate rows read when this
        layer is its input); -1 without one."""
        p = 0
        for size, trivial in self.irreps:
            if trivial:
                return p
            p += size
        return -1

    def component_irreps(self) -> Tuple[np.ndarray, np.ndarray]:
        """(trivial (D,) bool, index (D,) int64): per component whether its irrep is trivial and, for a non-trivial
        one, the irrep's number among the non-trivial irreps (its gate / bias index; 0 for trivial ones)."""
        triv = np.zeros(self.components, dtype=bool)
        idx = np.zeros(self.components, dtype=np.int64)
        p, g = 0, 0
        for size, trivial in self.irreps:
            triv[p : p + size] = trivial
            if not trivial:
                idx[p : p + size] = g
                g += 1
            p += size
        return triv, idx


@dataclass(frozen=True)
class Block:
    """Output field group ``out_group``, hidden component ``component``, input field group ``in_group``: the entries
    ``i * d_in + j`` of each field pair that W' reaches (sorted, never empty)."""

    out_group: int
    component: int
    in_group: int
    entries: Tuple[int, ...]


@dataclass(frozen=True)
class ConvSpec:
    """The structure of one implicit kernel (see the module docstring)."""

    out_size: int  # R
    in_size: int  # C_in
    channels: int  # of the last hidden activation (1 without hidden layers)
    components: int  # D of the last hidden activation (n + A without hidden layers)
    layers: Tuple[HiddenLayout, ...]
    out_groups: Tuple[FieldGroup, ...]
    in_groups: Tuple[FieldGroup, ...]
    blocks: Tuple[Block, ...]

    @property
    def hidden_size(self) -> int:
        """H = channels x components."""
        return self.channels * self.components

    @property
    def shape(self) -> Tuple[int, int, int]:
        """W''s shape (R, H, C_in)."""
        return self.out_size, self.hidden_size, self.in_size

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_mask(
        cls,
        mask: np.ndarray,
        out_groups: Sequence[FieldGroup],
        in_groups: Sequence[FieldGroup],
        channels: int,
        layers: Sequence[HiddenLayout] = (),
    ) -> "ConvSpec":
        """The spec of a structural mask (R, H, C_in) of W' from escnn's basis, with the field groups of the output
        and input types: read on the first field of each group and channel 0, then checked against the whole mask
        (a mask that the blocks do not state exactly raises: that would be a lowering bug)."""
        mask = np.asarray(mask, dtype=bool)
        R, H, C = mask.shape
        if H % channels:
            raise ValueError(f"the hidden size {H} is not a multiple of the channels ({channels})")
        D = H // channels
        blocks = []
        for og, go in enumerate(out_groups):
            for a in range(D):
                for ig, gi in enumerate(in_groups):
                    sub = mask[go.offsets[0] : go.offsets[0] + go.d, a, gi.offsets[0] : gi.offsets[0] + gi.d]
                    entries = tuple(int(e) for e in np.flatnonzero(sub))
                    if entries:
                        blocks.append(Block(og, a, ig, entries))
        spec = cls(R, C, channels, D, tuple(layers), tuple(out_groups), tuple(in_groups), tuple(blocks))
        if not np.array_equal(spec.dense_mask(), mask):
            raise ValueError("the last Linear's structural mask is not a union of field-group blocks")
        return spec

    def dense_mask(self) -> np.ndarray:
        """The bool (R, H, C_in) mask of W''s structural non-zeros."""
        R, H, C = self.shape
        m = np.zeros((R, self.channels, self.components, C), dtype=bool)
        for b in self.blocks:
            go, gi = self.out_groups[b.out_group], self.in_groups[b.in_group]
            e = np.asarray(b.entries, dtype=np.int64)
            rows = go.indices()[:, e // gi.d].reshape(-1)  # (F_out * n,)
            cols = gi.indices()[:, e % gi.d].reshape(-1)  # (F_in * n,)
            n = e.shape[0]
            r = rows.reshape(len(go.offsets), 1, n)
            c = cols.reshape(1, len(gi.offsets), n)
            r, c = np.broadcast_arrays(r, c)
            m[r.reshape(-1), :, b.component, c.reshape(-1)] = True
        return m.reshape(R, H, C)

    def field_pattern(self, out_group: int, in_group: int) -> np.ndarray:
        """The pattern that every field pair of the two groups shares: bool (d_out, channels * components * d_in),
        entry (i, (c, a, j)) where W'[i-th component of an output field, unit c D + a, j-th of an input field] can be
        non-zero."""
        go, gi = self.out_groups[out_group], self.in_groups[in_group]
        p = np.zeros((go.d, self.channels, self.components, gi.d), dtype=bool)
        for b in self.blocks:
            if b.out_group == out_group and b.in_group == in_group:
                e = np.asarray(b.entries, dtype=np.int64)
                p[e // gi.d, :, b.component, e % gi.d] = True
        return p.reshape(go.d, -1)

    # ------------------------------------------------------------------------------------------------------------
    def encode(self) -> str:
        """The spec as the ops take it (see the module docstring)."""
        v: List[int] = [self.out_size, self.in_size, self.channels, self.components, len(self.layers)]
        for h in self.layers:
            v += [h.channels, h.components, h.grid, int(h.componentwise), int(h.batch_norm)]
            v += [ACTIVATIONS.index(h.activation), len(h.irreps)]
            for size, trivial in h.irreps:
                v += [size, int(trivial)]
        for groups in (self.out_groups, self.in_groups):
            v.append(len(groups))
            for g in groups:
                v += [g.d, len(g.offsets), *g.offsets]
        v.append(len(self.blocks))
        for b in self.blocks:
            v += [b.out_group, b.component, b.in_group, len(b.entries), *b.entries]
        return " ".join([_MAGIC, *map(str, v)])


class _Reader:
    def __init__(self, s: str):
        parts = s.split()
        if not parts or parts[0] != _MAGIC:
            raise ValueError(f"structure must be an encoded ik_fast ConvSpec (starting {_MAGIC!r}), got {s[:40]!r}")
        try:
            self.v = [int(p) for p in parts[1:]]
        except ValueError:
            raise ValueError("structure holds a non-integer entry") from None
        self.i = 0

    def take(self, n: int = 1):
        if n < 0 or self.i + n > len(self.v):
            raise ValueError("structure is truncated")
        out = self.v[self.i : self.i + n]
        self.i += n
        return out

    def one(self) -> int:
        return self.take()[0]


def _check(spec: ConvSpec) -> None:
    R, H, C = spec.shape
    for name, groups, size in (("output", spec.out_groups, R), ("input", spec.in_groups, C)):
        seen = np.zeros(size, dtype=np.int64)
        for g in groups:
            if g.d <= 0 or not g.offsets:
                raise ValueError(f"structure: an empty {name} field group")
            idx = g.indices()
            if idx.min() < 0 or idx.max() >= size:
                raise ValueError(f"structure: an {name} field lies outside 0..{size - 1}")
            np.add.at(seen, idx.reshape(-1), 1)
        if not (seen == 1).all():
            raise ValueError(f"structure: the {name} field groups do not cover 0..{size - 1} exactly once")
    for b in spec.blocks:
        if not (0 <= b.out_group < len(spec.out_groups) and 0 <= b.in_group < len(spec.in_groups)):
            raise ValueError("structure: a block names a field group that does not exist")
        if not 0 <= b.component < spec.components:
            raise ValueError(f"structure: a block names hidden component {b.component} of {spec.components}")
        n = spec.out_groups[b.out_group].d * spec.in_groups[b.in_group].d
        if not b.entries or min(b.entries) < 0 or max(b.entries) >= n or list(b.entries) != sorted(set(b.entries)):
            raise ValueError("structure: a block's entries are empty, unsorted or outside its field pair")
    for h in spec.layers:
        if h.activation in ("gated", "norm"):
            if h.grid != 0 or not h.irreps or sum(size for size, _ in h.irreps) != h.components:
                raise ValueError(f"structure: a {h.activation} layer needs irreps that add up to its components")
            if any(size <= 0 for size, _ in h.irreps):
                raise ValueError("structure: an irrep of non-positive size")
        elif h.irreps or (h.grid > 0) != (h.activation == "fourier_elu"):
            raise ValueError(f"structure: an {h.activation} layer with grid {h.grid} and {len(h.irreps)} irreps")
    if len({h.activation for h in spec.layers}) > 1:
        raise ValueError("structure: the hidden layers mix activation kinds")
    if spec.layers:
        last = spec.layers[-1]
        if (last.channels, last.components) != (spec.channels, spec.components):
            raise ValueError("structure: the last hidden layer's layout is not the hidden layout")


@functools.lru_cache(maxsize=256)
def decode(structure: str) -> ConvSpec:
    """The :class:`ConvSpec` of an encoded structure (checked; cached by the string's content)."""
    if not isinstance(structure, str):
        raise TypeError(f"structure must be a str, got {type(structure).__name__}")
    r = _Reader(structure)
    R, C, ch, D, L = r.take(5)
    layers = []
    for _ in range(L):
        a, b, g, cw, bn, kind, n = r.take(7)
        if not 0 <= kind < len(ACTIVATIONS):
            raise ValueError(f"structure: activation code {kind} is not one of 0..{len(ACTIVATIONS) - 1}")
        irreps = tuple((size, bool(t)) for size, t in (r.take(2) for _ in range(n)))
        layers.append(HiddenLayout(a, b, g, bool(cw), bool(bn), ACTIVATIONS[kind], irreps))
    layers = tuple(layers)
    groups = []
    for _ in range(2):
        gs = []
        for _ in range(r.one()):
            d, F = r.take(2)
            gs.append(FieldGroup(d, tuple(r.take(F))))
        groups.append(tuple(gs))
    blocks = []
    for _ in range(r.one()):
        og, a, ig, n = r.take(4)
        blocks.append(Block(og, a, ig, tuple(r.take(n))))
    if r.i != len(r.v):
        raise ValueError("structure has trailing entries")
    if min(R, C, ch, D) <= 0:
        raise ValueError(f"structure: sizes must be positive, got R={R}, C_in={C}, channels={ch}, components={D}")
    spec = ConvSpec(R, C, ch, D, layers, groups[0], groups[1], tuple(blocks))
    _check(spec)
    return spec


@functools.lru_cache(maxsize=64)
def mask(structure: str) -> np.ndarray:
    """The bool (R, H, C_in) mask of an encoded structure (read-only; cached by the string's content)."""
    m = decode(structure).dense_mask()
    m.setflags(write=False)
    return m


def check_shape(structure: Optional[str], shape: Sequence[int], what: str = "final_weight") -> None:
    """Raise a ValueError naming ``structure`` unless it describes a W' of ``shape`` (R, H, C_in)."""
    if structure is None:
        return
    got = decode(structure).shape
    if tuple(int(n) for n in shape) != got:
        raise ValueError(f"structure describes a last Linear of shape {got}, but {what} is {tuple(shape)}")


def layers_of(structure: Optional[str], fourier: Sequence, first: int = 0) -> Tuple[HiddenLayout, ...]:
    """The layouts of the hidden layers ``first ..`` that ``fourier`` (one per layer) lists: from ``structure`` where
    given, else today's rule (a Fourier ELU where the layer's Fourier matrix is non-empty, a pointwise ELU otherwise;
    no sizes known: 0)."""
    if structure is not None:
        layers = decode(structure).layers[first : first + len(fourier)]
        if len(layers) != len(fourier):
            raise ValueError(
                f"structure states {len(decode(structure).layers)} hidden layers, but the program gives "
                f"{len(fourier)} from layer {first}"
            )
        return layers
    return tuple(HiddenLayout(0, 0, 0, False, False, "fourier_elu" if f.numel() else "elu", ()) for f in fourier)
