// Host entry points of the trunk stage (trunk_cuda.cu), used by the contraction (conv_cuda.cu) and by the
// registration of ik_fast::native_trunk_moments. All tensors are CUDA tensors in the compute dtype (float32 or
// float64); the callers have checked shapes (check_program) and converted dtypes.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <optional>

#include <string>
#include <vector>

namespace ik_fast_cuda {

// An affine map on a layer's units (a batch norm with known statistics), channel-major:
// v[:, j] -> v[:, j] f[j / d] + s[j], f (C,), s (C d,); no map when f is undefined.
struct Affine {
  at::Tensor f;
  at::Tensor s;
  int64_t d = 0;
  bool on() const { return f.defined(); }
};

// Checks factor (C,) and shift (width,) (named fname / sname in errors) and converts them; an empty factor is no map
// (its shift is then ignored, as ops.affine_reference_form ignores it).
Affine prepare_affine(const at::Tensor& factor, const at::Tensor& shift, int64_t width, const std::string& fname,
                      const std::string& sname, at::ScalarType st, const at::Device& dev);

// The program's hidden layers in the layout the trunk kernels read (built per call, in the compute dtype).
struct TrunkLayer {
  at::Tensor w;      // the op's weight, as given (dense (L_k, H_{k-1}) or componentwise (D', C_out, C_in))
  at::Tensor wk;     // the kernels' weight: W^T (H_{k-1}, L_k), or (D', C_in, C_out)
  at::Tensor b;      // (L_k,)
  at::Tensor A;      // Fourier (G, D) as given, or undefined for the other kinds
  at::Tensor Ainv;   // (D, G) as given
  at::Tensor At;     // A^T (D, G)
  at::Tensor Ainvt;  // Ainv^T (G, D)
  at::Tensor tab;    // gated / norm: int32 (D + 2 nnt,) on the device (LayerDesc::tab), cached per layout
  at::Tensor ab;     // norm: act_bias (C nnt,), else undefined
  Affine bn;         // the affine map after the activation (set by the caller after prepare_trunk), or none
  int act = 0;       // ActKind (common.cuh)
  // hout: the activation's units H_k; lout: the Linear's, L_k (a gated layer's gates included, else H_k);
  // componentwise (cw_d > 0): cw_d output components per channel (gates included), cw_din input components,
  // outputs a < cw_dm read input component a, the others cw_t0; id, dl, nnt: a gated / norm layer's components
  // per channel, the Linear's units per channel, its non-trivial irreps per channel
  int64_t hin = 0, hout = 0, lout = 0, cw_d = 0, cw_din = 0, cw_dm = 0, cw_t0 = 0, fd = 0, g = 0, id = 0, dl = 0,
          nnt = 0;
};

// Checks the hidden layers of a program against the MLP input width p0 and converts them (names the argument in
// every error). The layers are the structure's layers[first : first + L] (their kinds, a gated / norm layer's irreps,
// and, for a componentwise Linear into a gated layer, layers[first - 1]'s field), or without a structure each a
// Fourier ELU where fourier[k] is non-empty, else a pointwise ELU; act_bias[k] is a norm layer's (C nnt,), empty for
// the others. Returns the layers (without affine maps); *h_last is the width of the last activation (p0 without
// layers).
std::vector<TrunkLayer> prepare_trunk(at::TensorList weights, at::TensorList biases, at::TensorList fourier,
                                      at::TensorList fourier_inv, at::TensorList act_bias,
                                      const std::optional<c10::string_view>& structure, int64_t first, int64_t p0,
                                      at::ScalarType st, const at::Device& dev, int64_t* h_last);

// The last layer's output h (E, H_L), after its affine map, of the trunk on inp (E, p0) mapped by in_map first (inp
// itself, contiguous, without layers). With saves, ys[k] / as[k] receive every layer's pre-activation y_k (E, L_k)
// and activation a_k (E, H_k) before its affine map (as.back() is h when the last layer has none).
// With moments, also the column mean and sum of squared deviations of h (2, H_L), from the kernel's per-tile partials
// (no pass over h; left undefined without layers or edges).
at::Tensor trunk_forward(const at::Tensor& inp, const Affine& in_map, const std::vector<TrunkLayer>& layers,
                         std::vector<at::Tensor>* ys, std::vector<at::Tensor>* as, at::Tensor* moments = nullptr);

// Backward of the trunk (on inp without an input map) given dh (E, H_L), the gradient of the last layer's output
// after its affine map, and the saved ys (E, L_k) / as (E, H_k): d inp (E, p0), each layer's weight and bias gradient
// (in the op's layouts), a norm layer's act_bias gradient (C nnt,) and, for the layers with an affine map, the
// gradients of its factor (C,) and shift (H_k,) (undefined tensors for the others).
at::Tensor trunk_backward(const at::Tensor& inp, const std::vector<TrunkLayer>& layers,
                          const std::vector<at::Tensor>& ys, const std::vector<at::Tensor>& as, at::Tensor dh,
                          std::vector<at::Tensor>* dweights, std::vector<at::Tensor>* dbiases,
                          std::vector<at::Tensor>* dact_bias, std::vector<at::Tensor>* dbn_factor,
                          std::vector<at::Tensor>* dbn_shift);

}  // namespace ik_fast_cuda
