// Shared by the native extension's sources (csrc/module.cpp, csrc/cpu/*.cpp, csrc/cuda/*.cu).
//
// The ops' schemas are defined once, in Python (ik_fast/ops.py: ops.define("native") makes ik_fast::native_conv,
// ik_fast::native_conv_backward and ik_fast::native_trunk_moments, with their fakes and autograd). The sources only
// add kernels per dispatch key, TORCH_LIBRARY_IMPL(ik_fast, CPU, m) / TORCH_LIBRARY_IMPL(ik_fast, CUDA, m), with these
// C++ signatures (Tensor[] -> at::TensorList, Tensor? -> const std::optional<at::Tensor>&, str? ->
// const std::optional<c10::string_view>&, Tensor[]? -> std::optional<at::TensorList>, float -> double, int -> int64_t):
//
//   at::Tensor native_conv(x, inp, src, rowptr, weights, biases, fourier, fourier_inv, act_bias, bn_factor, bn_shift,
//                          final_weight, final_bias, coef, double norm, int64_t ndim, structure, hidden, tape)
//   std::vector<at::Tensor> native_conv_backward(grad, x, inp, src, rowptr, weights, biases, fourier, fourier_inv,
//                          act_bias, bn_factor, bn_shift, final_weight, final_bias, coef, double norm, int64_t ndim,
//                          structure, tape)
//       -> [dx, dinp, *dweights, *dbiases, *dact_bias, *dbn_factor, *dbn_shift, dfinal_weight, dfinal_bias, dcoef]
//          (5L + 5; empty tensors for the act_bias of a layer that is not `norm` and the batch norm of a layer
//          without one)
//   std::tuple<at::Tensor, at::Tensor, at::Tensor> native_trunk_moments(inp, weights, biases, fourier, fourier_inv,
//                          act_bias, in_factor, in_shift, structure, int64_t first_layer, bool with_activation,
//                          bool with_grid)    (the given layers are structure's layers[first_layer : first_layer + L])
//
// Each hidden layer's nonlinearity is the structure's (csrc/structure.h; without one: fourier_elu where fourier[k] is
// non-empty, else elu): elu, fourier_elu, gated and norm (ik_fast/ops.py states them; a gated layer's Linear also
// makes one gate per non-trivial irrep after each channel's components, a norm layer has act_bias[k] (C * n_nt,)).
//
// The kernel MLP comes as written (ik_fast/ops.py, op contract v2): bn_factor[k] / bn_shift[k] is hidden layer k's
// batch norm as an affine map on its activation (empty: none), applied by the kernels; `hidden` and the tape's
// activations are taken before their batch norms; in_factor[i] / in_shift[i] is the batch norm on the input of
// trunk_moments' layer i.
//
// Build macros (ik_fast/_build.py): IK_FAST_WITH_CUDA when the CUDA part is compiled in; CPU_CAPABILITY_AVX2 when the
// CPU part is compiled for AVX2 + FMA (ATen's at::vec::Vectorized is then 256 bits wide, else scalar);
// IK_FAST_SOURCE_HASH, the hash of the sources the module was built from.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace ik_fast {

using at::Tensor;
using at::TensorList;
using OptTensor = std::optional<at::Tensor>;

// Shared by the CPU kernels (csrc/cpu/*.cpp)
namespace cpu {
// t zeroed in place and returned; below 4 MB by the calling thread: Tensor::zero_ fills from 32768 elements up in a
// parallel region, whose fork and join cost more than a memset of that size on small graphs
inline at::Tensor zero_filled(at::Tensor t) {
  if (t.nbytes() >= (size_t(1) << 22)) {
    t.zero_();
  } else if (t.nbytes() > 0) {
    std::memset(t.data_ptr(), 0, t.nbytes());
  }
  return t;
}
}  // namespace cpu

}  // namespace ik_fast
