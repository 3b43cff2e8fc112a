"""Pickling support: escnn's groups and field types hold local functions and cannot be pickled, so modules are
pickled as a recipe (how to rebuild their field types) plus their state_dict, and rebuilt on unpickling."""

from __future__ import annotations

import numpy as np
import torch
from escnn import group, gspaces
from escnn import nn as enn

__all__ = ["type_recipe", "type_from_recipe", "reduce_module"]


_GROUPS = {"O(3)": group.o3_group, "SO(3)": group.so3_group, "O(2)": group.o2_group, "SO(2)": group.so2_group}


def _encode_id(v):
    """Subgroup ids may hold group elements (an adjoint rotation): store them by group name and value."""
    if isinstance(v, tuple):
        return tuple(_encode_id(x) for x in v)
    if isinstance(v, group.GroupElement):
        return ("__element__", v.group.name, v.to(v.param), v.param)
    return v


def _decode_id(v):
    if isinstance(v, tuple) and len(v) == 4 and v[0] == "__element__":
        return _GROUPS[v[1]]().element(v[2], v[3])
    if isinstance(v, tuple):
        return tuple(_decode_id(x) for x in v)
    return v


def _gspace_recipe(gs):
    if isinstance(gs, gspaces.GSpace3D):
        return ("R3", _encode_id(gs._sg_id))
    if isinstance(gs, gspaces.GSpace2D):
        return ("R2", _encode_id(gs._sg_id))
    raise TypeError(f"cannot pickle a layer on the gspace {gs}")


def _gspace_from(recipe):
    if recipe[0] == "R3":
        return gspaces.GSpace3D(_decode_id(recipe[1]))
    if recipe[0] == "R2":
        return gspaces.GSpace2D(_decode_id(recipe[1]))
    raise ValueError(recipe)


def _rep_recipe(rep):
    return (rep.name, list(rep.irreps), np.asarray(rep.change_of_basis), sorted(rep.supported_nonlinearities))


def _rep_from(G, recipe):
    name, irreps, cob, nonlin = recipe
    if name in G.representations:
        rep = G.representations[name]
        if list(rep.irreps) == list(irreps) and np.allclose(rep.change_of_basis, cob):
            return rep
        name = f"{name}|restored{len(G.representations)}"
    for irr in irreps:
        G.irrep(*irr)
    return group.Representation(G, name, irreps, cob, set(nonlin))


def type_recipe(ft):
    if ft is None:
        return None
    return (_gspace_recipe(ft.gspace), [_rep_recipe(r) for r in ft.representations])


def type_from_recipe(recipe):
    if recipe is None:
        return None
    gs = _gspace_from(recipe[0])
    return enn.FieldType(gs, [_rep_from(gs.fibergroup, r) for r in recipe[1]])


class _FieldTypeRecipe(tuple):
    pass


def _encode(v):
    return _FieldTypeRecipe(type_recipe(v)) if isinstance(v, enn.FieldType) else v


def _decode(v):
    return type_from_recipe(tuple(v)) if isinstance(v, _FieldTypeRecipe) else v


def reduce_module(module, args, kwargs):
    """``__reduce__`` for a module built as ``type(module)(*args, **kwargs)``: field types travel as recipes, the
    parameters and buffers as the state_dict."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return (
        _restore,
        (type(module), [_encode(a) for a in args], {k: _encode(v) for k, v in kwargs.items()}, state, module.training),
    )


def _restore(cls, args, kwargs, state, training):
    module = cls(*[_decode(a) for a in args], **{k: _decode(v) for k, v in kwargs.items()})
    # rebuilt in the default dtype on the CPU: moved first to where the saved parameters are (their dtype and device,
    # after any torch.load map_location), so that loading them neither rounds float64 to float32 nor leaves a CUDA
    # layer's copy (copy.deepcopy, an EMA model) on the CPU; the buffers the constructor derives follow with them
    ref = next((v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    if ref is not None:
        module.to(device=ref.device, dtype=ref.dtype)
    module.load_state_dict(state)
    module.train(training)
    return module
