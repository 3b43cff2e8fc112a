// The plain GEMMs of the native CUDA ops (the contraction's pair blocks of W', the trunk's Linear gradients): cuBLAS
// through ATen, except under torch.use_deterministic_algorithms(True), where ATen refuses cuBLAS unless
// CUBLAS_WORKSPACE_CONFIG is set: there ik_gemm_kernel (gemm_cuda.cu) computes them, each output element by one thread
// in a fixed order.
#pragma once

#include <ATen/ATen.h>

namespace ik_fast_cuda {

// out (M, N) = a (M, K) . b (K, N), or out += a . b with accumulate; 3-D operands (batch, ., .) batch the product.
// Any strides (views, transposes); out must not overlap a or b.
void gemm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// a . b in a new contiguous tensor (2-D, or 3-D batched).
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b);

}  // namespace ik_fast_cuda
