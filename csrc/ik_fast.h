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

#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace ik_fast {

using at::Tensor;
using at::TensorList;
using OptTensor = std::optional<at::Tensor>;

// The host packing's entry passes (csrc/cpu/packing_cpu.cpp; module functions, see ik_fast/packing.py)
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

std::vector<at::Tensor> pack_expand(const std::vector<at::Tensor>& sources, const at::Tensor& cols,
                                    const at::Tensor& vals, const at::Tensor& tgt, int64_t size,
                                    const at::Tensor& fcols, const at::Tensor& fvals,
                                    const std::vector<std::vector<int64_t>>& shapes,
                                    const std::vector<int64_t>& offsets);
std::vector<at::Tensor> pack_final(const at::Tensor& contrib, const at::Tensor& t, const at::Tensor& h,
                                   const at::Tensor& ch, const at::Tensor& rc, const OptTensor& factor,
                                   const OptTensor& shift, const OptTensor& bias, int64_t R, int64_t H, int64_t C,
                                   int64_t channels);
std::vector<at::Tensor> pack_bn(const at::Tensor& moments, int64_t count, const at::Tensor& avg,
                                const at::Tensor& scale, const at::Tensor& shift, double eps);
std::vector<at::Tensor> pack_fold(const at::Tensor& W, const OptTensor& bias, const at::Tensor& factor,
                                  const at::Tensor& shift, bool componentwise);
std::vector<at::Tensor> pack_vjp(const std::vector<OptTensor>& grads, const std::vector<at::Tensor>& weights,
                                 const std::vector<int64_t>& componentwise, const std::vector<OptTensor>& factors,
                                 const std::vector<OptTensor>& shifts, const std::vector<OptTensor>& means,
                                 const std::vector<OptTensor>& vars, const std::vector<double>& eps,
                                 const std::vector<int64_t>& bn_layers, const std::vector<int64_t>& off_w,
                                 const std::vector<int64_t>& off_b, const std::vector<int64_t>& off_shift,
                                 int64_t flat_size, const at::Tensor& contrib, const at::Tensor& t, const at::Tensor& h,
                                 const at::Tensor& ch, const at::Tensor& rc, int64_t R, int64_t H, int64_t C,
                                 int64_t channels, const at::Tensor& tgt, const at::Tensor& cols,
                                 const at::Tensor& vals, const std::vector<std::vector<int64_t>>& shapes,
                                 const at::Tensor& coef, const at::Tensor& sigma);
}  // namespace cpu

}  // namespace ik_fast
