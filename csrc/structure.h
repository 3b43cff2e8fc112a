// The kernel's structure as the ops take it: `str? structure`, an encoded ik_fast.structure.ConvSpec (its
// docstring has the format). Parsed once per distinct string (cached by content: the string is its own hash key) and
// shared by the CPU and CUDA kernels, which derive their tiling of W' (R, H, C_in) from its blocks.
#pragma once

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

struct HiddenLayout {
  int64_t channels = 0, components = 0, grid = 0;
  bool componentwise = false, batch_norm = false;
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

// The structure of a dense W' (R, H, C): H channels of one component, coupled to every entry of the one field pair
// (one output field of size R, one input field of size C). Without a key; no blocks when a size is 0.
Structure dense_structure(int64_t R, int64_t H, int64_t C);

}  // namespace ik_fast
