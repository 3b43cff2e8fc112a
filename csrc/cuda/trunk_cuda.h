// Host entry points of the trunk stage (trunk_cuda.cu), used by the contraction (conv_cuda.cu) and by the
// registration of ik_fast::native_trunk_moments. All tensors are CUDA tensors in the compute dtype (float32 or
// float64); the callers have checked shapes (check_program) and converted dtypes.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace ik_fast_cuda {

// The program's hidden layers in the layout the trunk kernels read (built per call, in the compute dtype).
struct TrunkLayer {
  at::Tensor w;      // the op's weight, as given (dense (H_k, H_{k-1}) or componentwise (D, C_out, C_in))
  at::Tensor wk;     // the kernels' weight: W^T (H_{k-1}, H_k), or (D, C_in, C_out)
  at::Tensor b;      // (H_k,)
  at::Tensor A;      // Fourier (G, D) as given, or undefined for a pointwise ELU
  at::Tensor Ainv;   // (D, G) as given
  at::Tensor At;     // A^T (D, G)
  at::Tensor Ainvt;  // Ainv^T (G, D)
  int64_t hin = 0, hout = 0, cw_d = 0, fd = 0, g = 0;
};

// Checks the hidden layers of a program against the MLP input width p0 and converts them (names the argument in
// every error). Returns the layers; *h_last is the width of the last activation (p0 without layers).
std::vector<TrunkLayer> prepare_trunk(at::TensorList weights, at::TensorList biases, at::TensorList fourier,
                                      at::TensorList fourier_inv, int64_t p0, at::ScalarType st, const at::Device& dev,
                                      int64_t* h_last);

// The last activation h (E, H_L) of the trunk on inp (E, p0) (inp itself, contiguous, without layers). With saves,
// ys[k] / as[k] receive every layer's pre-activation and activation (as.back() is h).
at::Tensor trunk_forward(const at::Tensor& inp, const std::vector<TrunkLayer>& layers, std::vector<at::Tensor>* ys,
                         std::vector<at::Tensor>* as);

// Backward of the trunk given dh (E, H_L) and the saved ys / as: d inp (E, p0) and each layer's weight and bias
// gradient (in the op's layouts). dh is consumed (overwritten).
at::Tensor trunk_backward(const at::Tensor& inp, const std::vector<TrunkLayer>& layers,
                          const std::vector<at::Tensor>& ys, const std::vector<at::Tensor>& as, at::Tensor dh,
                          std::vector<at::Tensor>* dweights, std::vector<at::Tensor>* dbiases);

}  // namespace ik_fast_cuda
