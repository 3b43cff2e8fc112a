// ik_fast native CUDA implementation of the op layer's stages (ik_fast/ops.py is the spec):
//   ik_fast::native_conv, ik_fast::native_conv_backward, ik_fast::native_trunk_moments  (CUDA dispatch key)
// The schemas are defined from Python (ops.define("native")); this file only registers kernels for them.
//
// =====================================================================================================================
// ALGORITHM (E edges in receiver order, CSR rowptr (n_dst + 1); H hidden units of the last layer, C = C_in, R outputs;
// sizes in elements of the compute dtype T = float32 or float64; "tile" = be edges, be <= 16 picked per call so that
// two blocks fit a multiprocessor's shared memory (down to be = 4; below that, one block))
//
// Forward, conv(x, inp, ...):
//  1. radial shell s_e = norm exp(-coef |d_e|^2)                          ATen, (E,)
//  2. trunk per tile of edges, fused on chip (trunk_cuda.cu, ik_trunk_forward_kernel): input tile -> every hidden
//     layer (Linear, then Fourier / pointwise ELU, then its batch norm's affine map a f[c] + s in the tile) in shared
//     memory -> h (E, H) written once. The Fourier ELU's sampled values u = y A^T (E, C_k, G) exist only per chunk
//     (<= 256 rows x 32 grid points) in shared memory.
//       shared memory per block: 2 be (Hmax | 1) + 32 min(be C_k, 256)   (X / Y tiles + Fourier scratch)
//       e.g. config M (H = 152, C_k = 8, fp32): be = 16, 19.6 KB + 16 KB; config H (H = 816, C_k = 16, fp32):
//       be = 8, 52.3 KB + 16 KB (three blocks per SM on sm_90)
//     Skipped when the caller passes `hidden` (the statistics pass's activation, before the last batch norm: the Z
//     kernel applies that affine map as it stages h).
//  3. contraction once per receiver, receivers in chunks of nr (Z of a chunk <= 256 MB):
//       Z_i = sum_{e -> i} s_e [h_e, 1] (x) x_src(e)        ((H + 1) x C per receiver; row H is z_i = sum s_e x_e)
//       out_i = W_aug vec(Z_i),  W_aug = [W_F * mask | B_F] as (R, (H + 1) C)
//     Z per chunk by ik_contract_z_kernel (one block per receiver x 64 x 32 tile of Z, edges staged 16 at a time in
//     shared memory: 16 (64 + 32) elements static; degree skew costs one block's loop, isolated receivers write
//     zeros), then one GEMM per chunk (cuBLAS via ATen, into the chunk's rows of out). Global memory: h (E H),
//     Z chunk (nr (H + 1) C), W_aug (R (H + 1) C). Never per-edge kernels (E, R, C) nor (E, C_k, G) activations.
//
// Backward, conv_backward(grad, ...):
//  1. trunk forward again (same kernel) saving every layer's pre-activation y_k and activation a_k (E, H_k) before
//     its batch norm, and h = the last layer's output after it (global memory: 2 E sum_k H_k, + E H when the last
//     layer has a batch norm), and s.
//  2. per receiver chunk: Z again (kernel above); dW_aug += grad_c^T Z_c (cuBLAS addmm); dZ_c = grad_c W_aug
//     (cuBLAS, into Z's buffer); then ik_contract_edge_backward_kernel, one block per tile of <= te edges of ONE
//     receiver (tiles listed by a device-side prefix sum over ceil(deg / te): a receiver with 10^4 edges spreads
//     over many blocks; the grid is an upper bound, blocks past the chunk's tiles exit), dZ_i read once per tile:
//       G_e = dZ_i x_e (written: G[:H] into dh (E, H), G[H] into ds (E,)),  dxe_e = s_e dZ_i^T [h_e, 1] (E, C)
//     no atomics: each output element has one writer; then with ATen: ds_e = G_e . [h_e, 1], dh_e = s_e G_e[:H],
//     dx = index_add_(src, dxe) (deterministic under torch.use_deterministic_algorithms).
//     shared memory: te (C|1) x 2 + 32 (C|1) + te 33   (x tile, dx accumulator, dZ rows, h rows)
//  3. trunk backward layer by layer (trunk_cuda.cu), from dh_k, the gradient of layer k's output h_k = a_k f + s:
//     the batch norm's d f[c] = sum_{e,i} dh_k a_k, d s = sum_e dh_k (ATen reductions, like the bias gradient);
//     dy_k from (y_k, da_k = dh_k f) by ik_fourier_elu_backward_kernel (da_k formed as dh_k is loaded; u = y A^T and
//     du recomputed per chunk in shared memory, 3 (be, H|1) tiles + scratch) or the pointwise ELU's (likewise);
//     dW_k = dy_k^T h_{k-1} = (dy_k^T a_{k-1}) diag(f_{k-1}) + db_k s_{k-1}^T (from the saved a_{k-1}: no h_{k-1}),
//     db_k = sum_e dy_k, dh_{k-1} = dy_k W_k through ATen (cuBLAS mm / bmm for componentwise weights):
//     deterministic weight gradients, no atomics.
//  4. d inp = dh_0 + the radial term (-2 coef s_e ds_e d_e on the first ndim columns);
//     d coef = -sum_e s_e ds_e |d_e|^2;
//     dW_F = dW_aug[:, :H C] * mask (zero outside the structure), dB_F = dW_aug[:, H C:].
//  Global memory of the backward, beyond inputs and outputs: 2 E sum_k H_k (saved y_k, a_k) + E (H + 2) (G, ds)
//  + E C (dxe) + nr (H + 1) C (Z / dZ chunk, <= 256 MB) + 2 R (H + 1) C (W_aug, dW_aug), + E H (h after the last
//  batch norm, when there is one); at config H (float32, 197k edges) about 2.6 GB + 0.7 GB + 0.1 GB + 0.25 GB
//  + 0.14 GB (+ 0.6 GB).
//
// WHERE THIS DIFFERS FROM A FULLY FUSED DESIGN (first version; correctness first):
//  - Z goes through global memory in bounded receiver chunks so that W_aug is applied by cuBLAS (dense: the block
//    sparsity of the structure is not exploited; the mask only zeroes W_F and its gradient).
//  - The trunk's backward is layer by layer through global (E, H_k) tensors and cuBLAS, not fused per tile.
//  - The channel-major <-> component-major change needs no explicit transpose: the tiles live in shared memory and
//    the componentwise Linear reads them through strided indices (block_mm's aoff), batch = component.
//
// trunk_moments(inp, ...): step 2 of the forward (writing the last activation before its batch norm; in_factor[0]
// applied as the input tile is loaded, in_factor[k > 0] as layer k - 1's affine map in the tile), then column mean
// and sum of squared deviations with ATen (deterministic).
//
// PRECISION: float64 inputs compute in float64 (IEEE FFMA throughout). float32 inputs follow PyTorch's matmul switch
// as ATen's cuBLAS matmuls read it, at::globalContext().allowTF32CuBLAS() (torch.set_float32_matmul_precision):
//   "highest" (the default): every custom-kernel GEMM in IEEE float32 FFMA (block_mm, 4 x 4 / 2 x 2 register tiles);
//   "high" / "medium": the trunk's GEMMs (Linears, both Fourier GEMMs forward and backward) and the per-edge
//     backward's two GEMMs on TF32 tensor cores (mma.sync.m16n8k8, operands rounded with cvt.rna, float32
//     accumulation; block_mm_tf32 in common.cuh). The ELU, the Z kernel (a rank-1 update per edge) and every
//     reduction stay IEEE float32.
// The plain GEMMs (contraction with W_aug, the trunk's weight gradients; gemm_cuda.h) are cuBLAS through ATen and
// follow the same switch; under torch.use_deterministic_algorithms(True) (where ATen refuses cuBLAS without
// CUBLAS_WORKSPACE_CONFIG) they run in ik_gemm_kernel instead, IEEE FFMA, bit-reproducible. With no atomics anywhere
// (the gradient to x goes through index_add_), the backward is then deterministic.
// bf16 / half inputs are computed in float32 (under the same switch) and the results cast back; there is
// no bf16-operand path.
//
// INPUT LAYOUT ASSUMPTIONS (not checked on the device, which would need a synchronisation): rowptr is
// non-decreasing with rowptr[0] = 0 and rowptr[n_dst] = E; every src entry lies in [0, x.size(0)). rowptr and src
// may be int32 or int64 (converted to int64). Tensors may be non-contiguous (copied).
// =====================================================================================================================
#include "../structure.h"
#include "common.cuh"
#include "gemm_cuda.h"
#include "trunk_cuda.h"

#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <optional>
#include <tuple>

namespace ik_fast_cuda {

// ------------------------------------------------------------------------------------------------------------------
// kernels
// ------------------------------------------------------------------------------------------------------------------

// Z chunk (nr, H + 1, C): block (i, hb, cb) computes rows hb*64 .. and columns cb*32 .. of Z_{r0 + i}. With hf not
// null, h is the last activation before its affine map, applied as it is staged: h[e, j] hf[j / hd] + hsh[j].
template <typename T>
__global__ void __launch_bounds__(kZThreads)
    ik_contract_z_kernel(const T* __restrict__ h, const T* __restrict__ hf, const T* __restrict__ hsh, int hd,
                         const T* __restrict__ s, const T* __restrict__ x, const int64_t* __restrict__ src,
                         const int64_t* __restrict__ rowptr, T* __restrict__ Z, int64_t r0, int H, int C) {
  __shared__ T hs[kZEdges][kZTileH];
  __shared__ T xs[kZEdges][kZTileC];
  const int64_t i = r0 + blockIdx.x;
  const int h0 = blockIdx.y * kZTileH;
  const int c0 = blockIdx.z * kZTileC;
  const int th = threadIdx.x / kZThreadsC;
  const int tc = threadIdx.x % kZThreadsC;
  const int64_t beg = rowptr[i];
  const int64_t end = rowptr[i + 1];
  T acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = T(0);
  for (int64_t eb = beg; eb < end; eb += kZEdges) {
    const int nk = static_cast<int>(min(static_cast<int64_t>(kZEdges), end - eb));
    for (int idx = threadIdx.x; idx < kZEdges * kZTileH; idx += kZThreads) {
      const int k = idx / kZTileH;
      const int hh = h0 + idx % kZTileH;
      T v = T(0);
      if (k < nk) {
        const int64_t e = eb + k;
        if (hh < H) {
          T hv = h[e * H + hh];
          if (hf != nullptr) hv = fma(hv, hf[hh / hd], hsh[hh]);
          v = s[e] * hv;
        } else if (hh == H)
          v = s[e];
      }
      hs[k][idx % kZTileH] = v;
    }
    for (int idx = threadIdx.x; idx < kZEdges * kZTileC; idx += kZThreads) {
      const int k = idx / kZTileC;
      const int cc = c0 + idx % kZTileC;
      xs[k][idx % kZTileC] = (k < nk && cc < C) ? x[src[eb + k] * C + cc] : T(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kZEdges; ++k) {
      T hv[4], xv[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) hv[a] = hs[k][th * 4 + a];
#pragma unroll
      for (int b = 0; b < 4; ++b) xv[b] = xs[k][tc * 4 + b];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] = fma(hv[a], xv[b], acc[a][b]);
    }
    __syncthreads();
  }
  T* Zi = Z + static_cast<int64_t>(blockIdx.x) * (H + 1) * C;
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int hh = h0 + th * 4 + a;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int cc = c0 + tc * 4 + b;
      if (hh <= H && cc < C) Zi[static_cast<int64_t>(hh) * C + cc] = acc[a][b];
    }
  }
}

// Per-edge backward of the contraction for one tile of <= te edges of one receiver i (receivers r0 .. r1 - 1 of the
// chunk, dZ (nr, H + 1, C) their gradient of Z). For each edge e of the tile, with G_e = dZ_i x_src(e) (H + 1,):
//   dG (E, H)  <- G_e[:H]                          (the host scales it by s_e and reduces it with h_e for ds_e)
//   gz (E,)    <- G_e[H]
//   dxe (E, C) <- s_e dZ_i^T [h_e, 1]              (the host adds it into dx[src_e] with index_add_)
// Every output element is written by exactly one thread of one block: no atomics, deterministic.
template <typename T, bool TC>
__global__ void __launch_bounds__(kEdgeThreads)
    ik_contract_edge_backward_kernel(const T* __restrict__ dZ, const T* __restrict__ h, const T* __restrict__ s,
                                     const T* __restrict__ x, const int64_t* __restrict__ src,
                                     const int64_t* __restrict__ rowptr, const int64_t* __restrict__ tile_ptr,
                                     T* __restrict__ dG, T* __restrict__ gz, T* __restrict__ dxe, int64_t r0,
                                     int64_t r1, int H, int C, int te, int hb) {
  const int64_t t = tile_ptr[r0] + blockIdx.x;
  if (t >= tile_ptr[r1]) return;  // past the chunk's tiles (the grid is an upper bound): the whole block leaves
  // the receiver: the largest i in [r0, r1) with tile_ptr[i] <= t (it owns tile t: receivers without edges have no
  // tiles, tile_ptr[i] == tile_ptr[i + 1])
  int64_t lo = r0, hi = r1 - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (tile_ptr[mid] <= t)
      lo = mid;
    else
      hi = mid - 1;
  }
  const int64_t i = lo;
  const int64_t eb = rowptr[i] + (t - tile_ptr[i]) * te;
  const int ne = static_cast<int>(min(static_cast<int64_t>(te), rowptr[i + 1] - eb));  // >= 1

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ldc = C | 1;  // odd row strides: the micro-tiles' rows fall into different banks
  const int ldh = hb | 1;
  T* xs = reinterpret_cast<T*>(smem_raw);  // (te, ldc) source features
  T* dxa = xs + te * ldc;  // (te, ldc) dx accumulator
  T* dz = dxa + te * ldc;  // (hb, ldc) rows of dZ_i
  T* hr = dz + hb * ldc;  // (te, ldh) rows of [h_e, 1]
  for (int idx = threadIdx.x; idx < ne * C; idx += blockDim.x) {
    const int k = idx / C;
    const int c = idx - k * C;
    xs[k * ldc + c] = x[src[eb + k] * C + c];
    dxa[k * ldc + c] = T(0);
  }
  const T* dZi = dZ + (i - r0) * static_cast<int64_t>(H + 1) * C;
  for (int j0 = 0; j0 < H + 1; j0 += hb) {
    const int hc = min(hb, H + 1 - j0);
    __syncthreads();  // the previous rows are consumed (and, the first time, xs / dxa are written)
    for (int idx = threadIdx.x; idx < hc * C; idx += blockDim.x) {
      const int j = idx / C;
      const int c = idx - j * C;
      dz[j * ldc + c] = dZi[static_cast<int64_t>(j0 + j) * C + c];
    }
    for (int idx = threadIdx.x; idx < ne * hc; idx += blockDim.x) {
      const int k = idx / hc;
      const int j = idx - k * hc;
      hr[k * ldh + j] = j0 + j < H ? h[(eb + k) * H + j0 + j] : T(1);
    }
    __syncthreads();
    // G (ne x hc) = xs (ne x C) . dz^T (C x hc)
    mm<TC, 2, 2>(
        1, ne, hc, C, xs, [=](int, int m) { return m * ldc; }, 1, dz, [=](int, int n) { return n * ldc; }, 1,
        [=](int, int m, int n, T v) {
          const int j = j0 + n;
          if (j < H)
            dG[(eb + m) * H + j] = v;
          else
            gz[eb + m] = v;
        });
    // dx accumulator (ne x C) += hr (ne x hc) . dz (hc x C)
    mm<TC, 2, 2>(
        1, ne, C, hc, hr, [=](int, int m) { return m * ldh; }, 1, dz, [=](int, int n) { return n; }, ldc,
        [=](int, int m, int n, T v) { dxa[m * ldc + n] += v; });
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < ne * C; idx += blockDim.x) {
    const int k = idx / C;
    const int c = idx - k * C;
    dxe[(eb + k) * C + c] = s[eb + k] * dxa[k * ldc + c];
  }
}

// ------------------------------------------------------------------------------------------------------------------
// host
// ------------------------------------------------------------------------------------------------------------------
namespace {

constexpr size_t kZChunkBytes = size_t(256) << 20;  // Z of one receiver chunk
constexpr int kEdgeRows = 32;  // rows of dZ_i per step of the edge backward (hb)

// The structure's mask on the device, per structure (by content) and device: a structural constant of the layer,
// so it is expanded and copied once, not per call. A few entries.
struct MaskEntry {
  std::string key;
  at::Device device;
  at::Tensor dev;
};
std::mutex g_mask_mutex;
std::vector<MaskEntry> g_masks;

at::Tensor device_mask(const ik_fast::Structure& st, const at::Device& dev) {
  std::lock_guard<std::mutex> lock(g_mask_mutex);
  for (const MaskEntry& m : g_masks)
    if (m.device == dev && m.key == st.key) return m.dev;
  std::vector<uint8_t> bytes = st.mask();
  at::Tensor cpu = at::empty({st.R, st.H(), st.C}, at::TensorOptions().dtype(at::kBool));
  std::memcpy(cpu.data_ptr(), bytes.data(), bytes.size());
  at::Tensor d = cpu.to(dev);
  if (g_masks.size() >= 8) g_masks.erase(g_masks.begin());
  g_masks.push_back(MaskEntry{st.key, dev, d});
  return d;
}

// The inputs of conv / conv_backward, checked and converted to the compute dtype.
struct ConvInputs {
  at::ScalarType st;
  at::Tensor x, inp, src, rowptr, fw, fb, coef;
  std::vector<TrunkLayer> layers;
  std::optional<at::Tensor> mask;  // on the device, bool
  int64_t E, n_dst, n_src, R, H, C, P0, ndim;
};

ConvInputs check_conv(const at::Tensor& x, const at::Tensor& inp, const at::Tensor& src, const at::Tensor& rowptr,
                      at::TensorList weights, at::TensorList biases, at::TensorList fourier, at::TensorList fourier_inv,
                      at::TensorList bn_factor, at::TensorList bn_shift, const at::Tensor& final_weight,
                      const at::Tensor& final_bias, const at::Tensor& coef, int64_t ndim,
                      const std::optional<c10::string_view>& structure) {
  const at::Device dev = x.device();
  TORCH_CHECK(dev.is_cuda(), "ik_fast native CUDA: x must be a CUDA tensor, got ", dev);
  check_float(x, "x");
  check_float(inp, "inp");
  check_cuda(inp, "inp", dev);
  check_cuda(src, "src", dev);
  check_cuda(rowptr, "rowptr", dev);
  check_cuda(final_weight, "final_weight", dev);
  check_cuda(final_bias, "final_bias", dev);
  check_cuda(coef, "coef", dev);
  check_float(final_weight, "final_weight");
  check_float(final_bias, "final_bias");
  check_float(coef, "coef");
  TORCH_CHECK(x.dim() == 2, "ik_fast native CUDA: x must be (n_src, C_in), got ", x.sizes());
  TORCH_CHECK(inp.dim() == 2, "ik_fast native CUDA: inp must be (E, P0), got ", inp.sizes());
  TORCH_CHECK(src.dim() == 1 && src.size(0) == inp.size(0), "ik_fast native CUDA: src must be (E,) = (", inp.size(0),
              ",), got ", src.sizes());
  TORCH_CHECK(src.scalar_type() == at::kLong || src.scalar_type() == at::kInt,
              "ik_fast native CUDA: src must be int64 or int32, got ", src.scalar_type());
  TORCH_CHECK(rowptr.dim() == 1 && rowptr.size(0) >= 1, "ik_fast native CUDA: rowptr must be (n_dst + 1,), got ",
              rowptr.sizes());
  TORCH_CHECK(rowptr.scalar_type() == at::kLong || rowptr.scalar_type() == at::kInt,
              "ik_fast native CUDA: rowptr must be int64 or int32, got ", rowptr.scalar_type());
  TORCH_CHECK(final_weight.dim() == 3, "ik_fast native CUDA: final_weight must be (R, H, C_in), got ",
              final_weight.sizes());
  TORCH_CHECK(final_weight.size(2) == x.size(1), "ik_fast native CUDA: final_weight has C_in = ", final_weight.size(2),
              " but x has ", x.size(1), " features");
  TORCH_CHECK(
      final_bias.dim() == 2 && final_bias.size(0) == final_weight.size(0) && final_bias.size(1) == final_weight.size(2),
      "ik_fast native CUDA: final_bias must be (R, C_in) = (", final_weight.size(0), ", ", final_weight.size(2),
      "), got ", final_bias.sizes());
  TORCH_CHECK(coef.numel() == 1, "ik_fast native CUDA: coef must have one element, got ", coef.sizes());
  TORCH_CHECK(ndim >= 0 && ndim <= inp.size(1), "ik_fast native CUDA: ndim = ", ndim, " is not in [0, ", inp.size(1),
              "] (the MLP input's width)");
  ConvInputs c;
  c.st = compute_dtype(x);
  c.E = inp.size(0);
  c.n_dst = rowptr.size(0) - 1;
  c.n_src = x.size(0);
  c.R = final_weight.size(0);
  c.C = final_weight.size(2);
  c.P0 = inp.size(1);
  c.ndim = ndim;
  c.layers = prepare_trunk(weights, biases, fourier, fourier_inv, c.P0, c.st, dev, &c.H);
  TORCH_CHECK(bn_factor.size() == weights.size() && bn_shift.size() == weights.size(),
              "ik_fast native CUDA: bn_factor and bn_shift must have one entry per hidden layer (", weights.size(),
              "), got ", bn_factor.size(), " and ", bn_shift.size());
  for (size_t k = 0; k < c.layers.size(); ++k) {
    const std::string i = "[" + std::to_string(k) + "]";
    c.layers[k].bn =
        prepare_affine(bn_factor[k], bn_shift[k], c.layers[k].hout, "bn_factor" + i, "bn_shift" + i, c.st, dev);
  }
  TORCH_CHECK(final_weight.size(1) == c.H, "ik_fast native CUDA: final_weight has H = ", final_weight.size(1),
              " but the last hidden layer has ", c.H, " units");
  if (structure.has_value()) {
    TORCH_CHECK(final_weight.dim() == 3, "ik_fast native CUDA: final_weight must be (R, H, C_in)");
    auto st = ik_fast::parse_structure(*structure, final_weight.size(0), final_weight.size(1), final_weight.size(2),
                                       "ik_fast native CUDA");
    c.mask = device_mask(*st, dev);
  }
  c.x = prep(x, c.st);
  c.inp = prep(inp, c.st);
  c.src = src.to(at::kLong).contiguous();
  c.rowptr = rowptr.to(at::kLong).contiguous();
  c.fw = prep(final_weight, c.st);
  c.fb = prep(final_bias, c.st);
  c.coef = prep(coef, c.st).reshape({1});
  return c;
}

// |d_e|^2 (E,) and the radial shell s_e = norm exp(-coef |d_e|^2).
std::pair<at::Tensor, at::Tensor> radial(const ConvInputs& c, double norm) {
  at::Tensor r2 = c.ndim > 0 ? c.inp.narrow(1, 0, c.ndim).square().sum(1) : at::zeros({c.E}, c.inp.options());
  at::Tensor s = at::exp(-c.coef * r2) * norm;
  return {r2, s};
}

// W_aug (R, (H + 1) C): the masked final weight with the bias as the extra hidden row.
at::Tensor waug(const ConvInputs& c) {
  at::Tensor w = c.mask.has_value() ? c.fw * *c.mask : c.fw;
  return at::cat({w, c.fb.unsqueeze(1)}, 1).view({c.R, (c.H + 1) * c.C});
}

int64_t chunk_receivers(const ConvInputs& c) {
  const int64_t per = (c.H + 1) * c.C * static_cast<int64_t>(c.st == at::kDouble ? 8 : 4);
  return std::max<int64_t>(1, std::min<int64_t>(c.n_dst, static_cast<int64_t>(kZChunkBytes) / per));
}

// Z of receivers r0 .. r0 + nr - 1 from h (E, H), mapped by h_map first (the last activation before its batch norm,
// `hidden`) or by none (h after it)
template <typename T>
void launch_z(const ConvInputs& c, const at::Tensor& h, const Affine& h_map, const at::Tensor& s, at::Tensor& Z,
              int64_t r0, int64_t nr) {
  const dim3 grid(static_cast<unsigned>(nr), static_cast<unsigned>(ceil_div(c.H + 1, kZTileH)),
                  static_cast<unsigned>(ceil_div(c.C, kZTileC)));
  ik_contract_z_kernel<T><<<grid, kZThreads, 0, current_stream()>>>(
      h.data_ptr<T>(), h_map.on() ? h_map.f.data_ptr<T>() : nullptr, h_map.on() ? h_map.s.data_ptr<T>() : nullptr,
      h_map.on() ? static_cast<int>(h_map.d) : 1, s.data_ptr<T>(), c.x.data_ptr<T>(), c.src.data_ptr<int64_t>(),
      c.rowptr.data_ptr<int64_t>(), Z.data_ptr<T>(), r0, static_cast<int>(c.H), static_cast<int>(c.C));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

size_t edge_smem(int te, int64_t C, size_t elem) {
  const size_t ldc = static_cast<size_t>(C | 1), ldh = static_cast<size_t>(kEdgeRows | 1);
  return (2 * te * ldc + kEdgeRows * ldc + te * ldh) * elem;
}

int edge_tile(int64_t C, size_t elem) {
  const size_t limit = max_smem_optin();
  int te = 32;
  while (te > 1 && (edge_smem(te, C, elem) > 96 * 1024 || edge_smem(te, C, elem) > limit)) te /= 2;
  TORCH_CHECK(edge_smem(te, C, elem) <= limit, "ik_fast native CUDA: C_in = ", C,
              " needs more shared memory than the device has for the contraction's backward");
  return te;
}

template <typename T, bool TC>
void launch_edge_backward(const ConvInputs& c, const at::Tensor& dZ, const at::Tensor& h, const at::Tensor& s,
                          const at::Tensor& tile_ptr, at::Tensor& dG, at::Tensor& gz, at::Tensor& dxe, int64_t r0,
                          int64_t nr, int te) {
  const size_t smem = edge_smem(te, c.C, sizeof(T));
  allow_smem(ik_contract_edge_backward_kernel<T, TC>, smem);
  // at most one partial tile per receiver: E / te + nr tiles bound the chunk's
  const int64_t blocks = ceil_div(c.E, te) + nr;
  ik_contract_edge_backward_kernel<T, TC><<<static_cast<unsigned>(blocks), kEdgeThreads, smem, current_stream()>>>(
      dZ.data_ptr<T>(), h.data_ptr<T>(), s.data_ptr<T>(), c.x.data_ptr<T>(), c.src.data_ptr<int64_t>(),
      c.rowptr.data_ptr<int64_t>(), tile_ptr.data_ptr<int64_t>(), dG.data_ptr<T>(), gz.data_ptr<T>(), dxe.data_ptr<T>(),
      r0, r0 + nr, static_cast<int>(c.H), static_cast<int>(c.C), te, kEdgeRows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor native_conv_cuda(const at::Tensor& x, const at::Tensor& inp, const at::Tensor& src, const at::Tensor& rowptr,
                            at::TensorList weights, at::TensorList biases, at::TensorList fourier,
                            at::TensorList fourier_inv, at::TensorList bn_factor, at::TensorList bn_shift,
                            const at::Tensor& final_weight, const at::Tensor& final_bias, const at::Tensor& coef,
                            double norm, int64_t ndim, const std::optional<c10::string_view>& structure,
                            const std::optional<at::Tensor>& hidden,
                            std::optional<at::TensorList> /*tape: not used, see native_conv_backward_cuda*/) {
  const c10::cuda::CUDAGuard guard(x.device());
  ConvInputs c = check_conv(x, inp, src, rowptr, weights, biases, fourier, fourier_inv, bn_factor, bn_shift,
                            final_weight, final_bias, coef, ndim, structure);
  at::Tensor out = at::zeros({c.n_dst, c.R}, c.x.options());
  if (c.E == 0 || c.n_dst == 0 || c.R == 0 || c.C == 0) return out.to(x.scalar_type());
  // h: the last layer's output after its batch norm (the trunk), or `hidden`, the activation before it, with the
  // batch norm applied as the Z kernel stages it
  at::Tensor h;
  const Affine none;
  const Affine* h_map = &none;
  if (hidden.has_value()) {
    check_cuda(*hidden, "hidden", x.device());
    check_float(*hidden, "hidden");
    TORCH_CHECK(hidden->dim() == 2 && hidden->size(0) == c.E && hidden->size(1) == c.H,
                "ik_fast native CUDA: hidden must be the last activation (E, H) = (", c.E, ", ", c.H, "), got ",
                hidden->sizes());
    h = prep(*hidden, c.st);
    if (!c.layers.empty()) h_map = &c.layers.back().bn;
  } else {
    h = trunk_forward(c.inp, none, c.layers, nullptr, nullptr);
  }
  const at::Tensor s = radial(c, norm).second;
  const at::Tensor W = waug(c);
  const int64_t nr = chunk_receivers(c);
  at::Tensor Z = at::empty({nr, (c.H + 1) * c.C}, c.x.options());
  for (int64_t r0 = 0; r0 < c.n_dst; r0 += nr) {
    const int64_t n = std::min(nr, c.n_dst - r0);
    at::Tensor Zc = Z.narrow(0, 0, n);
    AT_DISPATCH_FLOATING_TYPES(c.st, "ik_contract_z", [&] { launch_z<scalar_t>(c, h, *h_map, s, Zc, r0, n); });
    at::Tensor o = out.narrow(0, r0, n);
    gemm_into(o, Zc, W.t(), false);
  }
  return out.to(x.scalar_type());
}

std::vector<at::Tensor> native_conv_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& inp,
                                                  const at::Tensor& src, const at::Tensor& rowptr,
                                                  at::TensorList weights, at::TensorList biases, at::TensorList fourier,
                                                  at::TensorList fourier_inv, at::TensorList bn_factor,
                                                  at::TensorList bn_shift, const at::Tensor& final_weight,
                                                  const at::Tensor& final_bias, const at::Tensor& coef, double norm,
                                                  int64_t ndim, const std::optional<c10::string_view>& structure,
                                                  std::optional<at::TensorList> /*tape*/) {
  // a tape (ik_fast/ops.py) is not used: the backward re-evaluates the trunk (GPU memory holds no per-layer grids)
  const c10::cuda::CUDAGuard guard(x.device());
  ConvInputs c = check_conv(x, inp, src, rowptr, weights, biases, fourier, fourier_inv, bn_factor, bn_shift,
                            final_weight, final_bias, coef, ndim, structure);
  check_cuda(grad, "grad", x.device());
  check_float(grad, "grad");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == c.n_dst && grad.size(1) == c.R,
              "ik_fast native CUDA: grad must be (n_dst, R) = (", c.n_dst, ", ", c.R, "), got ", grad.sizes());
  const size_t L = c.layers.size();
  // the gradients in the compute dtype, zero where nothing contributes
  at::Tensor dx = at::zeros({c.n_src, c.C}, c.x.options());
  at::Tensor dinp;
  std::vector<at::Tensor> dweights, dbiases, dbnf, dbns;
  at::Tensor dW = at::zeros({c.R, (c.H + 1) * c.C}, c.x.options());
  at::Tensor dcoef = at::zeros({1}, c.x.options());
  const bool empty = c.E == 0 || c.n_dst == 0 || c.R == 0 || c.C == 0;
  if (empty) {
    dinp = at::zeros({c.E, c.P0}, c.x.options());
    for (const TrunkLayer& t : c.layers) {
      dweights.push_back(at::zeros_like(t.w));
      dbiases.push_back(at::zeros_like(t.b));
      dbnf.push_back(t.bn.on() ? at::zeros_like(t.bn.f) : at::Tensor());
      dbns.push_back(t.bn.on() ? at::zeros_like(t.bn.s) : at::Tensor());
    }
  } else {
    const at::Tensor g = prep(grad, c.st);
    std::vector<at::Tensor> ys, as;
    // h: the last layer's output after its batch norm (a separate tensor from as.back() when it has one)
    const at::Tensor h = trunk_forward(c.inp, Affine(), c.layers, L > 0 ? &ys : nullptr, L > 0 ? &as : nullptr);
    at::Tensor r2, s;
    std::tie(r2, s) = radial(c, norm);
    const at::Tensor W = waug(c);
    const size_t elem = c.st == at::kDouble ? 8 : 4;
    const bool tc = use_tf32(c.st);
    const int te = edge_tile(c.C, elem);
    // tiles of te edges per receiver, and their prefix sum (on the device: no synchronisation)
    const at::Tensor deg = c.rowptr.narrow(0, 1, c.n_dst) - c.rowptr.narrow(0, 0, c.n_dst);
    const at::Tensor tile_ptr =
        at::cat({at::zeros({1}, c.rowptr.options()), at::floor_divide(deg + (te - 1), te).cumsum(0)}).contiguous();
    // the edge kernel's outputs (every element written by one thread; zeros for edges outside rowptr's range)
    at::Tensor dh = at::zeros({c.E, c.H}, c.x.options());  // G[:, :H], then s G[:, :H]
    at::Tensor ds = at::zeros({c.E}, c.x.options());  // G[:, H], then ds
    at::Tensor dxe = at::zeros({c.E, c.C}, c.x.options());
    const int64_t nr = chunk_receivers(c);
    at::Tensor Z = at::empty({nr, (c.H + 1) * c.C}, c.x.options());
    for (int64_t r0 = 0; r0 < c.n_dst; r0 += nr) {
      const int64_t n = std::min(nr, c.n_dst - r0);
      at::Tensor Zc = Z.narrow(0, 0, n);
      const at::Tensor gc = g.narrow(0, r0, n);
      AT_DISPATCH_FLOATING_TYPES(c.st, "ik_contract_z", [&] { launch_z<scalar_t>(c, h, Affine(), s, Zc, r0, n); });
      gemm_into(dW, gc.t(), Zc, true);  // dW_aug += grad_c^T Z_c
      gemm_into(Zc, gc, W, false);  // dZ_c = grad_c W_aug (over Z, which is consumed)
      AT_DISPATCH_FLOATING_TYPES(c.st, "ik_contract_edge_backward", [&] {
        dispatch_tc<scalar_t>(tc, [&](auto tcv) {
          launch_edge_backward<scalar_t, decltype(tcv)::value>(c, Zc, h, s, tile_ptr, dh, ds, dxe, r0, n, te);
        });
      });
    }
    // ds_e = G_e . [h_e, 1], dh_e = s_e G_e[:H], dx[src_e] += dxe_e (deterministic under
    // torch.use_deterministic_algorithms, as index_add_ is)
    ds.add_((dh * h).sum(1));
    dh.mul_(s.unsqueeze(1));
    dx.index_add_(0, c.src, dxe);
    // the trunk's backward from dh, then the radial shell s = norm exp(-coef r2)
    dinp = trunk_backward(c.inp, c.layers, ys, as, dh, &dweights, &dbiases, &dbnf, &dbns);
    const at::Tensor wds = ds * s;
    dcoef = -(wds * r2).sum().reshape({1});
    if (c.ndim > 0) {
      dinp.narrow(1, 0, c.ndim).add_(c.inp.narrow(1, 0, c.ndim) * wds.unsqueeze(1) * (c.coef * -2.0));
    }
  }
  at::Tensor dfw = dW.narrow(1, 0, c.H * c.C).reshape({c.R, c.H, c.C});
  if (c.mask.has_value()) dfw = dfw * *c.mask;
  at::Tensor dfb = dW.narrow(1, c.H * c.C, c.C).contiguous();
  std::vector<at::Tensor> out;
  out.reserve(5 + 4 * L);
  out.push_back(dx.to(x.scalar_type()));
  out.push_back(dinp.to(inp.scalar_type()));
  for (size_t k = 0; k < L; ++k) out.push_back(dweights[k].to(weights[k].scalar_type()).contiguous());
  for (size_t k = 0; k < L; ++k) out.push_back(dbiases[k].to(biases[k].scalar_type()).contiguous());
  // a layer without batch norm: zeros shaped as its (empty) factor / shift, an ignored shift included
  for (size_t k = 0; k < L; ++k)
    out.push_back(dbnf[k].defined() ? dbnf[k].to(bn_factor[k].scalar_type()).contiguous()
                                    : at::zeros_like(bn_factor[k]));
  for (size_t k = 0; k < L; ++k)
    out.push_back(dbns[k].defined() ? dbns[k].to(bn_shift[k].scalar_type()).contiguous() : at::zeros_like(bn_shift[k]));
  out.push_back(dfw.to(final_weight.scalar_type()).contiguous());
  out.push_back(dfb.to(final_bias.scalar_type()));
  out.push_back(dcoef.to(coef.scalar_type()).reshape(coef.sizes()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> native_trunk_moments_cuda(const at::Tensor& inp, at::TensorList weights,
                                                                         at::TensorList biases, at::TensorList fourier,
                                                                         at::TensorList fourier_inv,
                                                                         at::TensorList in_factor,
                                                                         at::TensorList in_shift, bool with_activation,
                                                                         bool with_grid) {
  TORCH_CHECK_NOT_IMPLEMENTED(!with_grid, "ik_fast native CUDA keeps no Fourier grids (the tape of ik_fast.ops)");
  TORCH_CHECK(inp.device().is_cuda(), "ik_fast native CUDA: inp must be a CUDA tensor, got ", inp.device());
  check_float(inp, "inp");
  TORCH_CHECK(inp.dim() == 2, "ik_fast native CUDA: inp must be (E, P0), got ", inp.sizes());
  const c10::cuda::CUDAGuard guard(inp.device());
  const at::ScalarType st = compute_dtype(inp);
  int64_t H = 0;
  std::vector<TrunkLayer> layers =
      prepare_trunk(weights, biases, fourier, fourier_inv, inp.size(1), st, inp.device(), &H);
  TORCH_CHECK(in_factor.size() == weights.size() && in_shift.size() == weights.size(),
              "ik_fast native CUDA: in_factor and in_shift must have one entry per given layer (", weights.size(),
              "), got ", in_factor.size(), " and ", in_shift.size());
  // in_factor[k] maps layer k's input: entry 0 maps inp, entry k > 0 is the affine map after layer k - 1 (the last
  // layer's activation, the output, is before its batch norm)
  Affine in_map;
  for (size_t k = 0; k < layers.size(); ++k) {
    const std::string i = "[" + std::to_string(k) + "]";
    Affine m = prepare_affine(in_factor[k], in_shift[k], k == 0 ? inp.size(1) : layers[k - 1].hout, "in_factor" + i,
                              "in_shift" + i, st, inp.device());
    if (k == 0)
      in_map = std::move(m);
    else
      layers[k - 1].bn = std::move(m);
  }
  const int64_t E = inp.size(0);
  const at::Tensor x = prep(inp, st);
  if (E == 0) {
    return {at::zeros({2, H}, inp.options()), at::empty({0, H}, inp.options()), at::empty({0}, inp.options())};
  }
  at::Tensor h = trunk_forward(x, in_map, layers, nullptr, nullptr);
  const at::Tensor mean = h.mean(0);
  const at::Tensor m2 = (h - mean).square().sum(0);
  at::Tensor moments = at::stack({mean, m2}).to(inp.scalar_type());
  at::Tensor act;
  if (with_activation) {
    act = h.to(inp.scalar_type());
    if (act.is_same(inp) || act.data_ptr() == inp.data_ptr()) act = act.clone();  // no layers: not inp itself
  } else {
    act = at::empty({0, H}, inp.options());
  }
  return {moments, act, at::empty({0}, inp.options())};
}

}  // namespace ik_fast_cuda

TORCH_LIBRARY_IMPL(ik_fast, CUDA, m) {
  m.impl("native_conv", &ik_fast_cuda::native_conv_cuda);
  m.impl("native_conv_backward", &ik_fast_cuda::native_conv_backward_cuda);
  m.impl("native_trunk_moments", &ik_fast_cuda::native_trunk_moments_cuda);
}
