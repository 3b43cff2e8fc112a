// Shared by the native extension's sources (csrc/module.cpp, csrc/cpu/*.cpp, csrc/cuda/*.cu).
//
// The ops' schemas are defined once, in Python (ik_fast/ops.py: ops.define("native") makes ik_fast::native_conv,
// ik_fast::native_conv_backward and ik_fast::native_trunk_moments, with their fakes and autograd). The sources only
// add kernels per dispatch key, TORCH_LIBRARY_IMPL(ik_fast, CPU, m) / TORCH_LIBRARY_IMPL(ik_fast, CUDA, m), with these
// C++ signatures (Tensor[] -> at::TensorList, Tensor? -> const std::optional<at::Tensor>&, Tensor[]? ->
// std::optional<at::TensorList>, float -> double, int -> int64_t):
//
//   at::Tensor native_conv(x, inp, src, rowptr, weights, biases, fourier, fourier_inv, final_weight, final_bias,
//                          coef, double norm, int64_t ndim, final_mask, hidden, tape)
//   std::vector<at::Tensor> native_conv_backward(grad, x, inp, src, rowptr, weights, biases, fourier, fourier_inv,
//                          final_weight, final_bias, coef, double norm, int64_t ndim, final_mask, tape)
//   std::tuple<at::Tensor, at::Tensor, at::Tensor> native_trunk_moments(inp, weights, biases, fourier, fourier_inv,
//                          bool with_activation, bool with_grid)
//
// Build macros (ik_fast/_build.py): IK_FAST_WITH_CUDA when the CUDA part is compiled in; CPU_CAPABILITY_AVX2 when the
// CPU part is compiled for AVX2 + FMA (ATen's at::vec::Vectorized is then 256 bits wide, else scalar);
// IK_FAST_SOURCE_HASH, the hash of the sources the module was built from.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace ik_fast {

using at::Tensor;
using at::TensorList;
using OptTensor = std::optional<at::Tensor>;

}  // namespace ik_fast
