"""The block structure of the last layer's weight W' (R, H, C_in) that the contraction kernels (:mod:`.contract`) walk.

An equivariant W' is structurally sparse (6% of its entries at config H, 9% at M: most (output, hidden, input)
component triples are forbidden by the selection rules), and the sparsity is shared by whole field groups. Ordered
well, its 16 x 16 x 16 blocks are about as sparse as its entries (H: 244 of 4,131 blocks), so the contraction does
only the work of the non-zero blocks:

* hidden units in component-major order (component a of every channel together: a componentwise hidden layer gives
  all channels of a component one pattern), or, where that makes fewer blocks, with units of identical pattern moved
  together;
* inputs and outputs grouped by their pattern (the components of one irrep type across fields), groups in
  lexicographic order of their patterns;
* the non-zero blocks listed per (hidden block, input block) *pair*: a pair's Z block is formed once per receiver
  block and contracted with every output block of the pair's list.

The plan is derived on the host from the op's ``structure`` (the kernel's
:class:`~ik_fast.structure.ConvSpec`: its field groups and hidden components are the classes ordered here, its
blocks the non-zeros) with NumPy, so building it dispatches no PyTorch operator and synchronises no device, and is
cached by the structure's content. Without a structure every block is listed (a dense W').
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ik_fast.structure import Block, ConvSpec, FieldGroup, check_shape, decode

B = 16  # the block edge: hidden, input and output blocks of W' and the smallest tl.dot


def _ceil(n: int) -> int:
    return max(B, -(-int(n) // B) * B)


@dataclass(frozen=True)
class Blocks:
    """The non-zero 16^3 blocks of W' in the permuted order, as the contraction kernels read them (all int32).

    ``perm_h`` (HC,), ``perm_c`` (CINC,), ``perm_r`` (RC,): the original index at each permuted position (padding
    positions hold 0 and are masked by the true sizes); ``pairs`` (NP, 2): the (hidden, input) block offsets that
    have a non-zero block, hidden block outer (a hidden block's pairs consecutive); ``cperm`` (NP,): the pairs in
    input-block-outer order (an input block's pairs consecutive); ``pair_ptr`` (NP + 1,): each pair's range in
    ``blk_r``, the output block offsets; ``blk_p`` (NB,): the pair of each block;
    ``w_src`` / ``w_dst`` (nnz,) int64: flat positions in W' (R, H, C_in) and in the compact block tensor
    (NB, 16 * 16, 16) of its structural non-zeros (the gradient's partial sums are put back with them);
    ``b_src`` / ``b_dst`` (R C_in,) int64 likewise for B' (R, C_in) and its permuted, padded form (CINC, RC);
    ``w_idx`` (NB 16^3,) and ``b_idx`` (CINC RC,): the same maps as the kernels read them, the flat position in W'
    (B') of each entry of the compact blocks (the padded bias), -1 where it is structurally zero or padding;
    ``w_take`` / ``b_take`` int64: the same with 0 in place of -1 and ``w_pad`` / ``b_pad`` bool: where it was -1, so
    that packing them is one ``take`` and one ``masked_fill_`` (the padding exactly zero, whatever W''s values).

    ``inv_h`` (H,), ``inv_c`` (C_in,), ``inv_r`` (R,): the permuted position of each original index (the inverse of
    ``perm_*``). The contraction kernels read and write every per-edge and per-receiver operand in the plan's order
    (h and d hs as (E, HC), x and d x as (., CINC), dout and out as (., RC)); ``perm_*`` and ``inv_*`` are the one
    statement of that order, applied once per step at the trunk's boundary (:mod:`.launch`).
    """

    perm_h: Tensor
    perm_c: Tensor
    perm_r: Tensor
    inv_h: Tensor
    inv_c: Tensor
    inv_r: Tensor
    pairs: Tensor
    cperm: Tensor
    pair_ptr: Tensor
    blk_r: Tensor
    blk_p: Tensor
    w_src: Tensor
    w_dst: Tensor
    w_idx: Tensor
    b_src: Tensor
    b_dst: Tensor
    b_idx: Tensor
    w_take: Tensor
    b_take: Tensor
    w_pad: Tensor
    b_pad: Tensor
    n_pairs: int
    n_blocks: int
    n_cblocks: int


def _lex_order(keys: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``keys`` (n, m) bool in lexicographic order of the rows (ties in index order)."""
    packed = np.packbits(keys, axis=1)
    return np.lexsort((np.arange(keys.shape[0]), *packed.T[::-1])) if packed.shape[1] else np.arange(keys.shape[0])


def _classes(spec, mask: np.ndarray, side: str) -> np.ndarray:
    """One side's order from the spec: its indices grouped by *class*, the sets of indices that W' couples alike.
    ``side`` "c" (inputs: component j of every field of an input group), "r" (outputs, likewise) or "h" (hidden:
    component a of every channel, component-major). Classes with the same blocks are merged; classes in
    lexicographic order of their pattern in W' (so that similar patterns fall into the same 16-block), members in
    index order (hidden: channels of a component together)."""
    keyed: dict = {}
    if side == "h":
        for b in spec.blocks:
            keyed.setdefault(b.component, set()).add((b.out_group, b.in_group, b.entries))
        members = {a: a + np.arange(spec.channels) * spec.components for a in range(spec.components)}
        rows = lambda a: mask[:, a, :].reshape(-1)  # noqa: E731  (channel 0 of component a)
    else:
        groups = spec.in_groups if side == "c" else spec.out_groups
        members = {}
        for g, fg in enumerate(groups):
            for j in range(fg.d):
                members[(g, j)] = fg.indices()[:, j]
        for b in spec.blocks:
            own, other = (b.in_group, b.out_group) if side == "c" else (b.out_group, b.in_group)
            d_in = spec.in_groups[b.in_group].d
            for e in b.entries:
                i, j = divmod(e, d_in)
                mine, theirs = (j, i) if side == "c" else (i, j)
                keyed.setdefault((own, mine), set()).add((other, b.component, theirs))
        if side == "c":
            rows = lambda k: mask[:, :, members[k][0]].reshape(-1)  # noqa: E731
        else:
            rows = lambda k: mask[members[k][0]].reshape(-1)  # noqa: E731
    merged: dict = {}
    for k in members:  # classes with the same blocks (unkeyed: coupled to nothing) together
        merged.setdefault(frozenset(keyed.get(k, ())), []).append(k)
    classes = list(merged.values())
    pattern = np.stack([rows(ks[0]) for ks in classes])
    if side == "h":  # component-major within a class: component a's channels, then the next component's
        out = [np.concatenate([members[k] for k in sorted(classes[q])]) for q in _lex_order(pattern)]
    else:
        out = [np.sort(np.concatenate([members[k] for k in classes[q]])) for q in _lex_order(pattern)]
    return np.concatenate(out).astype(np.int64)


def _padded(perm: np.ndarray) -> np.ndarray:
    out = np.zeros(_ceil(perm.shape[0]), dtype=np.int32)
    out[: perm.shape[0]] = perm
    return out


def build(spec) -> dict:
    """The plan of :class:`Blocks` (as NumPy arrays) for a kernel's structure (a
    :class:`~ik_fast.structure.ConvSpec`): its inputs, outputs and hidden components in class order
    (:func:`_classes`), then the non-zero 16-blocks of its blocks."""
    mask = spec.dense_mask()
    R, H, C = mask.shape
    D = spec.components
    cm = np.arange(H).reshape(-1, D).T.reshape(-1)  # component-major order of the hidden units
    pc, pr = _classes(spec, mask, "c"), _classes(spec, mask, "r")
    HC, CC, RC = _ceil(H), _ceil(C), _ceil(R)
    best = None
    # hidden orders: component-major, or components of equal blocks together (fewest 16-blocks wins)
    for ph in (cm, _classes(spec, mask, "h")):
        m = np.zeros((RC, HC, CC), dtype=bool)
        m[:R, :H, :C] = mask[pr][:, ph][:, :, pc]
        blk = m.reshape(RC // B, B, HC // B, B, CC // B, B).any(axis=(1, 3, 5))  # (nr, nh, nc)
        if best is None or blk.sum() < best[2].sum():
            best = (ph, m, blk)
    ph, m, blk = best
    pair_any = blk.any(0)
    hb, cb = np.nonzero(pair_any)  # row-major: hidden block outer, input block inner
    pairs = np.stack([hb * B, cb * B], 1).astype(np.int32).reshape(-1, 2)
    counts = blk[:, hb, cb].sum(0)
    pair_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    cperm = np.lexsort((hb, cb)).astype(np.int32)  # input block outer, hidden block inner
    rb = [np.nonzero(blk[:, h, c])[0] for h, c in zip(hb, cb)]
    blk_r = (np.concatenate(rb) * B).astype(np.int32) if rb else np.zeros(0, dtype=np.int32)
    nb = int(blk_r.shape[0])
    if nb * B**3 >= 2**31:  # the kernels index the compact blocks in int32
        raise ValueError(
            f"the last layer's weight has {nb} non-zero blocks of {B}^3; at most {2**31 // B**3 - 1} are supported"
        )
    # compact blocks (NB, HB, CB, RB): for block q of pair (h0, c0) and output block r0, entry (i, j, k) is W'[pr[r0 +
    # k], ph[h0 + i], pc[c0 + j]] where that is inside W' and structurally non-zero
    q_h = np.repeat(pairs[:, 0], counts).astype(np.int64)
    q_c = np.repeat(pairs[:, 1], counts).astype(np.int64)
    i = q_h[:, None, None, None] + np.arange(B)[None, :, None, None]
    j = q_c[:, None, None, None] + np.arange(B)[None, None, :, None]
    k = blk_r.astype(np.int64)[:, None, None, None] + np.arange(B)[None, None, None, :]
    i, j, k = np.broadcast_arrays(i, j, k)
    valid = m[k, i, j]
    ph_, pc_, pr_ = _padded(ph), _padded(pc), _padded(pr)
    w_src = (pr_[k[valid]].astype(np.int64) * H + ph_[i[valid]]) * C + pc_[j[valid]]
    w_dst = np.nonzero(valid.reshape(-1))[0]
    w_idx = np.full(valid.size, -1, dtype=np.int64)  # the kernels' view: flat position in W' per compact entry
    w_idx[w_dst] = w_src
    cc, rr = np.meshgrid(np.arange(C), np.arange(R), indexing="ij")  # the bias (C_in, R) at permuted positions
    b_src = pr[rr].astype(np.int64).reshape(-1) * C + pc[cc].reshape(-1)
    b_dst = (cc * RC + rr).reshape(-1).astype(np.int64)
    b_idx = np.full(CC * RC, -1, dtype=np.int64)
    b_idx[b_dst] = b_src
    if nb == 0:  # one all-padding block, so that the kernels get a valid pointer
        w_idx = np.full(B**3, -1, dtype=np.int64)

    def inverse(perm: np.ndarray) -> np.ndarray:
        inv = np.empty(perm.shape[0], dtype=np.int32)
        inv[perm] = np.arange(perm.shape[0], dtype=np.int32)
        return inv

    return dict(
        perm_h=ph_,
        perm_c=pc_,
        perm_r=pr_,
        inv_h=inverse(ph),
        inv_c=inverse(pc),
        inv_r=inverse(pr),
        pairs=pairs,
        cperm=cperm,
        pair_ptr=pair_ptr,
        blk_r=blk_r,
        blk_p=np.repeat(np.arange(pairs.shape[0]), counts).astype(np.int32),
        w_src=w_src,
        w_dst=w_dst,
        w_idx=w_idx,
        b_src=b_src,
        b_dst=b_dst,
        b_idx=b_idx,
        w_take=np.maximum(w_idx, 0),
        b_take=np.maximum(b_idx, 0),
        w_pad=w_idx < 0,
        b_pad=b_idx < 0,
        n_pairs=int(pairs.shape[0]),
        n_blocks=nb,
        n_cblocks=CC // B,
    )


def _to_device(plan: dict, device: str) -> Blocks:
    def tens(v):
        t = torch.from_numpy(np.ascontiguousarray(v))
        return t if device == "cpu" else t.to(device)

    return Blocks(**{k: tens(v) if isinstance(v, np.ndarray) else v for k, v in plan.items()})


def _dense_spec(R: int, H: int, C: int, D: int):
    """The structure of a dense W' (R, H, C): one field of each size, every entry coupled."""
    D = D if D > 0 and H % D == 0 else H
    blocks = tuple(Block(0, a, 0, tuple(range(R * C))) for a in range(D))
    return ConvSpec(R, C, H // D, D, (), (FieldGroup(R, (0,)),), (FieldGroup(C, (0,)),), blocks)


@functools.lru_cache(maxsize=64)
def _planned(structure: Optional[str], shape: tuple, D: int, device: str) -> Blocks:
    spec = _dense_spec(*shape, D) if structure is None else decode(structure)
    return _to_device(build(spec), device)


def blocks(structure: Optional[str], shape, D: int, device) -> Blocks:
    """The block plan of W' of ``shape`` (R, H, C_in) on ``device`` for the op's ``structure`` (an encoded
    :class:`~ik_fast.structure.ConvSpec`; None: dense, hidden channels of ``D`` components); cached by the
    structure's content, the shape and the device."""
    shape = tuple(int(n) for n in shape)
    if structure is not None:
        check_shape(structure, shape)
        D = decode(structure).components
    return _planned(structure, shape, int(D), str(torch.device(device)))
