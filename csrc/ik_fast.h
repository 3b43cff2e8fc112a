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
// parallel region, whose fork and join cost more than a memset of that size (measured at 400 edges: the (R, H, C)
// final weight's parallel fill took about half of pack_final)
inline at::Tensor zero_filled(at::Tensor t) {
  if (t.nbytes() >= (size_t(1) << 22)) {
    t.zero_();
  } else if (t.nbytes() > 0) {
    std::memset(t.data_ptr(), 0, t.nbytes());
  }
  return t;
}

std::vector<at::Tensor> pack_expand(const at::Tensor& src, const at::Tensor& cols, const at::Tensor& vals,
                                    const at::Tensor& tgt, int64_t size, const at::Tensor& fcols,
                                    const at::Tensor& fvals);
std::vector<at::Tensor> pack_final(const at::Tensor& contrib, const at::Tensor& t, const at::Tensor& h,
                                   const at::Tensor& ch, const at::Tensor& rc, const OptTensor& factor,
                                   const OptTensor& shift, const OptTensor& bias, int64_t R, int64_t H, int64_t C,
                                   int64_t channels);
std::vector<at::Tensor> pack_final_vjp(const OptTensor& gfw, const OptTensor& gfb, const at::Tensor& contrib,
                                       const at::Tensor& t, const at::Tensor& h, const at::Tensor& ch,
                                       const at::Tensor& rc, const OptTensor& factor, const OptTensor& shift,
                                       int64_t R, int64_t H, int64_t C, int64_t channels);
at::Tensor pack_transpose(const at::Tensor& flat, const at::Tensor& tgt, const OptTensor& gfinal,
                          const at::Tensor& cols, const at::Tensor& vals, int64_t S);
}  // namespace cpu

}  // namespace ik_fast
