// The kernel's structure as the ops take it: `str? structure`, an encoded ik_fast.structure.ConvSpec (its
// docstring has the format). Parsed once per distinct string (cached by content: the string is its own hash key) and
// shared by the CPU and CUDA kernels, which derive their tiling of W' (R, H, C_in) from its blocks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace ik_fast {

struct FieldGroup {
  int64_t d = 0;                 // field size
  std::vector<int64_t> offsets;  // each field's first index
};

// Activation kinds of a hidden layer, by their code in the encoding (ik_fast.structure.ACTIVATIONS)
enum Activation : int64_t { kElu = 0, kFourierElu = 1, kGated = 2, kNorm = 3 };
const char* activation_name(int64_t activation);

struct HiddenLayout {
  int64_t channels = 0, components = 0, grid = 0;
  bool componentwise = false, batch_norm = false;
  int64_t activation = kFourierElu;
  // gated and norm: each channel's field as a direct sum of irreps, in order (sizes add up to components)
  std::vector<int64_t> irrep_sizes;
  std::vector<uint8_t> irrep_trivial;
  // the non-trivial irreps (per channel: a gated layer's gates, a norm layer's biases)
  int64_t n_nontrivial() const {
    int64_t n = 0;
    for (uint8_t t : irrep_trivial) n += t == 0;
    return n;
  }
  // the units per channel of the Linear into the layer (a gated layer's gates after its components)
  int64_t linear_components() const { return activation == kGated ? components + n_nontrivial() : components; }
};

struct Block {
  int64_t out_group = 0, component = 0, in_group = 0;
  std::vector<int64_t> entries;  // i * d_in + j, sorted
};

struct Structure {
  std::string key;  // the encoded string
  int64_t R = 0, C = 0, channels = 0, components = 0;
  std::vector<HiddenLayout> layers;
  std::vector<FieldGroup> out_groups, in_groups;
  std::vector<Block> blocks;
  int64_t H() const { return channels * components; }
  // the bool (R, H, C) mask of W's structural non-zeros, row-major (1 byte per entry)
  std::vector<uint8_t> mask() const;
};

// The parsed structure (cached by content); a c10::Error naming `structure` (and `what`, the op) when it is malformed
// or does not describe a W' of shape (R, H, C).
std::shared_ptr<const Structure> parse_structure(c10::string_view s, int64_t R, int64_t H, int64_t C, const char* what);

// The parsed structure (cached by content) without a shape check (trunk_moments, which has no final_weight).
std::shared_ptr<const Structure> parse_structure(c10::string_view s, const char* what);

// The activations of the hidden layers layers[first : first + L] of the structure (parsed; every one fourier_elu or
// elu without a structure) against act_bias (L entries: (channels x non-trivial irreps,) for a norm layer, empty for
// the others): a kind that the kernels do not do (gated and norm, unless the caller's kernels do them:
// `gated_and_norm`, per device) raises a NotImplementedError "<impl>: nonlinearity '<kind>' is not implemented"; a
// c10::Error (prefixed `what`) naming structure when it is malformed or has no such layers, naming act_bias when an
// entry does not fit. Called before the layers' shapes are checked (a gated layer's Linear has its gates too).
void check_activations(const std::optional<c10::string_view>& structure, int64_t first, int64_t L,
                       at::TensorList act_bias, const char* impl, const char* what, bool gated_and_norm = false);

// The structure of a dense W' (R, H, C): H channels of one component, coupled to every entry of the one field pair
// (one output field of size R, one input field of size C). Without a key; no blocks when a size is 0.
Structure dense_structure(int64_t R, int64_t H, int64_t C);

}  // namespace ik_fast
