// The lowered kernel program as the CPU kernels use it: the op layer's tensors (ik_fast/ops.py) checked, converted to
// the compute dtype and put in the tile layout, and the block plan of the last Linear's structure.
//
// Tile layout. A tile of t edges keeps every activation feature-major, (H x t) with the edges along the rows, so the
// GEMMs of the trunk run over C*t columns at once. The rows of hidden layer k are in *component-major* order
// (position a*C + c holds the channel-major unit c*D + a) when the layer has a Fourier ELU or a componentwise Linear
// on D components: then the Fourier ELU of all channels is two GEMMs, (G x D)(D x C t) and back, and a componentwise
// Linear is D GEMMs of (C_out x C_in)(C_in x t) on contiguous rows. Dense Linears take their weights with rows and
// columns permuted into these orders (once per call; the weights are small).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include "../structure.h"

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

namespace ik_fast {
namespace cpu {

// A gated or norm layer's activation on the tile layout (component-major on its D components, C channels): per
// component its irrep's rows, the irreps in order. The Linear into a gated layer makes (D + n_nt) C rows,
// component-major on D + n_nt: its first D C rows are the components in the activation's order, then the n_nt C gates
// (gate g of channel c at row (D + g) C + c).
struct Irreps {
  int64_t D = 0, C = 0, n_nt = 0;
  std::vector<int64_t> off, size;  // per irrep, its first component and its size
  std::vector<uint8_t> trivial;
  std::vector<int64_t> nt_index;  // per irrep, its number among the non-trivial ones (-1: trivial)
};

template <typename T>
struct Layer {
  int64_t kind = kElu;     // its activation (csrc/structure.h); kElu or kFourierElu without a structure
  bool cw = false;         // componentwise weight (D, C_out, C_in)
  int64_t hin = 0, hout = 0;
  int64_t hlin = 0;        // rows of the Linear (hout, and a gated layer's gates too)
  int64_t D = 1, cout = 0, cin = 0;  // componentwise dims (D = 1, cout = hlin, cin = hin when dense)
  int64_t G = 0, Df = 1, C = 0;      // Fourier ELU: grid points, components, channels (G = 0: pointwise ELU)
  std::vector<T> W, b;               // W in the tile layout: dense (hlin x hin), componentwise (D, cout, cin)
  std::vector<int64_t> src;          // componentwise into a gated layer: the input component of each of the D
                                     // (empty: component a reads component a)
  std::vector<T> A, Ainv;            // (G x Df), (Df x G)
  Irreps ir;                         // gated and norm
  std::vector<T> nb;                 // norm: act_bias, (C * n_nt) channel-major
  std::vector<int64_t> out_perm;     // layout position -> channel-major unit (size hout)
  std::vector<int64_t> lin_perm;     // the Linear's layout position -> its channel-major unit (size hlin)
  // the batch norm after the activation (bn: there is one): per layout row its factor, shift and channel
  bool bn = false;
  int64_t bn_C = 0;  // its channels
  std::vector<T> bnf, bns;
  std::vector<int64_t> bn_ch;
  int64_t fourier_rows() const { return G * C; }
  bool irreps() const { return kind == kGated || kind == kNorm; }
};

template <typename T>
struct Trunk {
  int64_t n_in = 0;
  std::vector<int64_t> in_perm;  // layout position of the input rows -> input column
  std::vector<T> in_f, in_s;     // a batch norm on the input, per layout row (empty: none)
  std::vector<Layer<T>> layers;
  int64_t width() const { return layers.empty() ? n_in : layers.back().hout; }
  // layout position -> channel-major unit of the last activation
  const std::vector<int64_t>& last_perm() const { return layers.empty() ? in_perm : layers.back().out_perm; }
  int64_t max_rows() const;  // the widest per-edge buffer of a layer (for the tile size)
};

// The batch norms of a trunk as the op gives them: factor[k] / shift[k] after hidden layer k (an empty or undefined
// factor: none), in_factor / in_shift on the input; in errors, factor_name[k + offset] and shift_name[k + offset]
// (conv: bn_factor[k]; trunk_moments, whose in_factor[0] is the input's and in_factor[k + 1] the one after layer k:
// in_factor[k + 1]), the input's factor_name[0].
struct Affines {
  std::vector<at::Tensor> factor, shift;
  at::Tensor in_factor, in_shift;
  const char* factor_name = "bn_factor";
  const char* shift_name = "bn_shift";
  int64_t offset = 0;
};

// Parses and checks weights/biases/fourier/fourier_inv/act_bias and the batch norms (names in errors are the op's
// argument names). The given layers are `structure`'s hidden layers first .. first + L - 1 (their kinds and irreps;
// nullptr: each one fourier_elu where fourier[k] is non-empty, else elu); check_activations ran before.
template <typename T>
Trunk<T> make_trunk(int64_t n_in, at::TensorList weights, at::TensorList biases, at::TensorList fourier,
                    at::TensorList fourier_inv, at::TensorList act_bias, const Affines& bn, const Structure* structure,
                    int64_t first);

// The block plan of W' (R, H, C), derived from the blocks of its structure (csrc/structure.h), never from a mask:
// hidden components with the same couplings (blocks) form a group, whose units are every channel of them; within a
// group, the input columns with the same row set form a column group; each (group, column group) with a non-empty
// row set is a *pair*, whose block W'[rows, group, columns] is dense. Everything outside the pairs is zero.
//
// A receiver's Z is stored per group, transposed: group g's block is (n_cols x nh) (its columns in permutation q's
// order, then its hidden units), so that every pair's (nc x nh) block is contiguous.
struct Pair {
  int64_t g;            // its hidden group
  int64_t hoff, nh;     // hidden rows [hoff, hoff + nh) in plan order
  int64_t q, coff, nc;  // columns [coff, coff + nc) of column permutation q
  int64_t roff, nr;     // output rows rows[roff : roff + nr]
  int64_t zoff;         // offset of its (nc x nh) block in a receiver's Z
  int64_t boff;         // offset of its (nr x nc*nh) block in the packed W'
};

struct Group {
  int64_t hoff, nh;  // hidden rows [hoff, hoff + nh) in plan order
  int64_t q;         // its column permutation (all its columns, pair after pair)
  int64_t zoff;      // offset of its (len(perms[q]) x nh) block in a receiver's Z
};

struct Plan {
  int64_t R = 0, H = 0, C = 0;
  std::vector<int64_t> hidden;               // plan position -> hidden unit (units that reach some output)
  std::vector<std::vector<int64_t>> perms;   // distinct column permutations (lists of input columns)
  std::vector<Pair> pairs;
  std::vector<Group> groups;
  std::vector<int64_t> rows;
  std::vector<int64_t> widx;  // packed W' slot -> flat index r*H*C + h*C + c (pair by pair, (nr, nc, nh))
  int64_t zsize = 0;
};

// The plan of the op's structure (cached by its content); of a dense W' (dense_structure) when it is not given.
std::shared_ptr<const Plan> plan_for(const std::optional<c10::string_view>& structure, int64_t R, int64_t H, int64_t C);

}  // namespace cpu
}  // namespace ik_fast
