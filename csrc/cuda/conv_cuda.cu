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
//     layer (Linear, then its activation: Fourier ELU, pointwise ELU, gated or norm, each layer's kind from the
//     structure; then its batch norm's affine map a f[c] + s in the tile) in shared
//     memory -> h (E, H) written once. The Fourier ELU's sampled values u = y A^T (E, C_k, G) exist only per chunk
//     (<= 256 rows x 32 grid points) in shared memory.
//       shared memory per block: 2 be (Hmax | 1) + 32 min(be C_k, 256)   (X / Y tiles + Fourier scratch)
//       e.g. config M (H = 152, C_k = 8, fp32): be = 16, 19.6 KB + 16 KB; config H (H = 816, C_k = 16, fp32):
//       be = 8, 52.3 KB + 16 KB (three blocks per SM on sm_90)
//     Skipped when the caller passes `hidden` (the statistics pass's activation, before the last batch norm: the Z
//     kernel applies that affine map as it stages h).
//  3. contraction once per receiver, on the blocks of W' only, receivers in chunks of nr (a chunk's Z and pair
//     slots <= 256 MB). The block plan of W' (ik_fast::cpu::plan_for, csrc/cpu/program.h, shared with the CPU
//     kernels; dense without a structure): hidden units with equal (R x C) patterns form a group g, the group's
//     columns with equal row sets a column group; each (group, column group) is a pair p whose block
//     W'[rows_p, units_g, cols_p] is dense; nothing outside the pairs is non-zero. A receiver's compact Z holds
//     only the (group, column) entries, group by group ((columns x units), each pair's (nc x nh) block contiguous),
//     then the bias row:
//       Z_i[g: c, j] = sum_{e -> i} s_e h_e[unit_g,j] x_src(e)[col_g,c]      (zsize per receiver)
//       Z_i[bias]    = sum_{e -> i} s_e x_src(e)                           (C)
//       out_i[rows_p] += B_p vec(Z_i[p]) for every pair p,  out_i += B_F Z_i[bias]
//     with B the packed W' (nnz: every pair's (nr, nc nh) block, gathered from W_F through the plan's widx once per
//     call). The plan's index arrays (units, column permutations, groups, Z tiles, rows, widx) live on the device,
//     uploaded once per structure, sizes and device (device_plan, cached by the structure's content).
//     Z per chunk by ik_contract_z_kernel<T, TH> (one block per receiver x tile of TH units x 2048 / TH columns of
//     one group, TH = 16, 32 or 64 picked per structure for the least padding; edges staged 16 at a time in shared
//     memory, 16 (TH + 2048 / TH) elements static, products over the staged edges only (a receiver of degree 24 costs
//     24 rank-1 updates, not 32); warps past a tile's columns skip the products; degree skew costs
//     one block's loop, isolated receivers write zeros); then per pair one GEMM of the chunk, T[:, slots_p] =
//     Z_c[p] B_p^T (cuBLAS via ATen), the bias row's GEMM into out, and out[:, rows] += T (index_add_ over the
//     pairs' output rows). Global memory: h (E H), Z chunk (nr (zsize + C)), T (nr S, S = sum_p nr_p), B (nnz).
//     Never per-edge kernels (E, R, C) nor (E, C_k, G) activations.
//     Multiply-adds at config H (R = 144, H = 816, C = 144; 32 groups of 16 / 32 units, 161 pairs, nnz = 999,424,
//     zsize = 56,832): Z 63,488 per edge (TH = 16, padding included; 56,976 structural; dense Z: 133,120),
//     contraction 1,020,160 per receiver (nnz + R C; dense W_aug: R (H + 1) C = 16,941,312). A whole training step
//     counted in the emulation's replay (tests/tools/emulate_check.py --count H): 1,826,064 per edge, 0.91x the
//     structured floor (TF32 warp tiles: 1.09x).
//
// Backward, conv_backward(grad, ...):
//  1. trunk forward again (same kernel) saving every layer's pre-activation y_k and activation a_k (E, H_k) before
//     its batch norm, and h = the last layer's output after it (global memory: 2 E sum_k H_k, + E H when the last
//     layer has a batch norm), and s.
//  2. per receiver chunk: Z again (kernel above); dB_F += grad_c^T Z_c[bias]; per pair, with Gp = grad_c[:, rows]
//     (index_select, (nr, S)): dB_p += Gp[:, p]^T Z_c[p], then dZ_c[p] = Gp[:, p] B_p over Z_c[p] (cuBLAS; each pair
//     reads and overwrites only its block); dZ_c[bias] = grad_c B_F; then ik_contract_edge_backward_kernel, one
//     block per tile of <= te edges of ONE receiver (tiles listed by a device-side prefix sum over ceil(deg / te): a
//     receiver with 10^4 edges spreads over many blocks; the grid is an upper bound, blocks past the chunk's tiles
//     exit), dZ_i read once per tile, group by group (the bias row last, as a group of one unit of value 1 on every
//     column) in chunks of 32 units:
//       G_e[unit_g,j] = sum_c dZ_i[g: c, j] x_e[col_g,c]   (into dh (E, H); the bias row's into ds (E,); units
//                                                           outside the plan stay zero)
//       dxe_e[col_g,c] += s_e sum_j dZ_i[g: c, j] [h_e, 1][unit_g,j]      (E, C)
//     2 (zsize + C) multiply-adds per edge (at config H 113,952; dense: 2 (H + 1) C = 235,296); no atomics: each
//     output element has one writer (a group's columns are distinct); then with ATen: ds_e = G_e . [h_e, 1],
//     dh_e = s_e G_e[:H], dx = index_add_(src, dxe) (deterministic under torch.use_deterministic_algorithms).
//     shared memory: te (C|1) x 3 + 32 (C|1) + te 33   (x tile, its group's columns, dx accumulator, dZ rows, h rows)
//  3. trunk backward layer by layer (trunk_cuda.cu), from dh_k, the gradient of layer k's output h_k = a_k f + s:
//     the batch norm's d f[c] = sum_{e,i} dh_k a_k, d s = sum_e dh_k (ATen reductions, like the bias gradient);
//     dy_k from (y_k, da_k = dh_k f) by ik_fourier_elu_backward_kernel (da_k formed as dh_k is loaded; u = y A^T and
//     du recomputed per chunk in shared memory, 3 (be, H|1) tiles + scratch), the pointwise ELU's (likewise) or
//     ik_irrep_act_backward_kernel (gated / norm, elementwise; a norm layer's d act_bias = the sum over the edges of
//     its per-edge terms (E, C nnt), ATen);
//     dW_k = dy_k^T h_{k-1} = (dy_k^T a_{k-1}) diag(f_{k-1}) + db_k s_{k-1}^T (from the saved a_{k-1}: no h_{k-1}),
//     db_k = sum_e dy_k, dh_{k-1} = dy_k W_k through ATen (cuBLAS mm / bmm for componentwise weights):
//     deterministic weight gradients, no atomics. (A gated layer's y_k and dy_k are (E, C (D + gates)), each
//     channel's gates after its components; its componentwise Linear's gate rows read the previous field's first
//     trivial component t0, so their part of dh_{k-1} is summed into component t0.)
//  4. d inp = dh_0 + the radial term (-2 coef s_e ds_e d_e on the first ndim columns);
//     d coef = -sum_e s_e ds_e |d_e|^2;
//     dW_F = dB scattered back through widx (index_copy_: zero outside the structure), dB_F as accumulated.
//  Global memory of the backward, beyond inputs and outputs: 2 E sum_k H_k (saved y_k, a_k) + E (H + 2) (G, ds)
//  + E C (dxe) + nr (zsize + C + S) (Z / dZ chunk and Gp, <= 256 MB) + 2 nnz (B, dB), + E H (h after the last
//  batch norm, when there is one); at config H (float32, 197k edges) about 2.6 GB + 0.7 GB + 0.1 GB + 0.25 GB
//  + 8 MB (+ 0.6 GB).
//
// WHERE THIS DIFFERS FROM A FULLY FUSED DESIGN (first version; correctness first):
//  - Z goes through global memory in bounded receiver chunks so that the pairs' blocks are applied by cuBLAS, one
//    GEMM per pair and chunk (161 per chunk at config H, three times that in the backward; a grouped GEMM would
//    launch once), and the pairs' outputs are summed into out's rows by index_add_.
//  - The trunk's backward is layer by layer through global (E, H_k) tensors and cuBLAS, not fused per tile.
//  - The channel-major <-> component-major change needs no explicit transpose: the tiles live in shared memory and
//    the componentwise Linear reads them through strided indices (block_mm's aoff), batch = component.
//
// trunk_moments(inp, ...): step 2 of the forward (writing the last activation before its batch norm; in_factor[0]
// applied as the input tile is loaded, in_factor[k > 0] as layer k - 1's affine map in the tile); the kernel also
// writes each tile's column sums and squared deviations about the tile's mean ((E / be) x 2 x H), merged with ATen
// (Chan et al.; deterministic): no pass over the (E, H) activation for the statistics.
//
// PRECISION: float64 inputs compute in float64 (IEEE FFMA throughout). float32 inputs follow PyTorch's matmul switch
// as ATen's cuBLAS matmuls read it, at::globalContext().allowTF32CuBLAS() (torch.set_float32_matmul_precision):
//   "highest" (the default): the block GEMMs below in IEEE float32 FFMA (block_mm, 4 x 4 / 2 x 2 register tiles),
//     or, in a build with -DIK_FAST_3XTF32, on sm_90 and newer, as 3xTF32 (block_mm_tf32<true>: each operand split
//     into two TF32 halves, three mma.sync per fragment; its error against float64 measured within 2x of IEEE
//     float32's, emulated on CPU; IK_FAST_HIGHEST=ieee keeps FFMA); gemm_mode in common.cuh;
//   "high" / "medium": the trunk's GEMMs (Linears, both Fourier GEMMs forward and backward) and the per-edge
//     backward's two GEMMs on TF32 tensor cores (mma.sync.m16n8k8, operands rounded with cvt.rna, float32
//     accumulation; block_mm_tf32 in common.cuh). The Z kernel (a rank-1 update per edge) and every reduction stay
//     IEEE float32.
// float32's exponentials (ELU, its derivative, the sigmoid of gated / norm) take the fast hardware path under every
// setting (common.cuh: __expf; expm1 below -1/4 as __expf - 1, a degree-6 polynomial above): within ~1e-6 relative
// of IEEE expm1f / expf (bounded in tests/tools/emulate_check.py's fast_expm1), far inside float32's 2e-5 / 1e-4.
// The plain GEMMs (the contraction's pair blocks and bias row, the trunk's weight gradients; gemm_cuda.h) are cuBLAS
// through ATen and follow the same switch; under torch.use_deterministic_algorithms(True) (where ATen refuses cuBLAS
// without CUBLAS_WORKSPACE_CONFIG) they run in ik_gemm_kernel instead, IEEE FFMA, bit-reproducible. With no atomics
// anywhere (the gradient to x and the pairs' outputs go through index_add_), the ops are then deterministic.
// bf16 / half inputs are computed in float32 (under the same switch) and the results cast back; there is
// no bf16-operand path.
//
// INPUT LAYOUT ASSUMPTIONS (not checked on the device, which would need a synchronisation): rowptr is
// non-decreasing with rowptr[0] = 0 and rowptr[n_dst] = E; every src entry lies in [0, x.size(0)). rowptr and src
// may be int32 or int64 (converted to int64). Tensors may be non-contiguous (copied).
// =====================================================================================================================
#include "../cpu/program.h"
#include "common.cuh"
#include "gemm_cuda.h"
#include "trunk_cuda.h"

#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace ik_fast_cuda {

// ------------------------------------------------------------------------------------------------------------------
// kernels
// ------------------------------------------------------------------------------------------------------------------

// Compact Z of a receiver chunk (nr, zs), zs = zsize + C: block (i, t) computes tile t of Z_{r0 + i}. A tile is
// (up to TH hidden rows of one plan group) x (up to TC = kZTileArea / TH of its columns), described by 6 ints:
//   hrow  plan position of its first hidden row (its units are hidden[hrow ..]); -1: the bias row (values s_e)
//   nh    its valid rows;  ld: the group's hidden units (Z's stride from one column to the next)
//   pcol  offset in perm of its first column;  nc: its valid columns;  zoff: Z offset of its (column 0, row 0)
// Z_i[zoff + c ld + j] = sum_{e -> i} s_e h_e[hidden[hrow + j]] x_src(e)[perm[pcol + c]]. With hf not null, h is
// the last activation before its affine map, applied as it is staged: h[e, u] hf[u / hd] + hsh[u].
template <typename T, int TH>
__global__ void __launch_bounds__(kZThreads)
    ik_contract_z_kernel(const T* __restrict__ h, const T* __restrict__ hf, const T* __restrict__ hsh, int hd,
                         const T* __restrict__ s, const T* __restrict__ x, const int64_t* __restrict__ src,
                         const int64_t* __restrict__ rowptr, const int* __restrict__ hidden,
                         const int* __restrict__ perm, const int* __restrict__ tiles, T* __restrict__ Z, int64_t r0,
                         int H, int C, int64_t zs) {
  constexpr int TC = kZTileArea / TH;
  constexpr int kThreadsH = TH / 4;
  static_assert(kThreadsH * (TC / 4) == kZThreads, "a 4 x 4 micro-tile per thread");
  __shared__ T hs[kZEdges][TH];
  __shared__ T xs[kZEdges][TC];
  const int64_t i = r0 + blockIdx.x;
  const int* tile = tiles + static_cast<int64_t>(blockIdx.y) * 6;
  const int hrow = tile[0], nh = tile[1], pcol = tile[3], nc = tile[4];  // (ld, zoff read at the end)
  // rows fastest: a warp covers all TH rows of 512 / TH columns, so that the warps wholly past the tile's columns
  // skip the products (a group's columns are rarely a multiple of TC)
  const int th = threadIdx.x % kThreadsH;
  const int tc = threadIdx.x / kThreadsH;
  const bool live = tc * 4 < nc;
  const int64_t beg = rowptr[i];
  const int64_t end = rowptr[i + 1];
  T acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = T(0);
  for (int64_t eb = beg; eb < end; eb += kZEdges) {
    const int nk = static_cast<int>(min(static_cast<int64_t>(kZEdges), end - eb));
    for (int idx = threadIdx.x; idx < kZEdges * TH; idx += kZThreads) {
      const int k = idx / TH;
      const int j = idx % TH;
      T v = T(0);
      if (k < nk && j < nh) {
        const int64_t e = eb + k;
        if (hrow >= 0) {
          const int u = hidden[hrow + j];
          T hv = h[e * H + u];
          if (hf != nullptr) hv = fma(hv, hf[u / hd], hsh[u]);
          v = s[e] * hv;
        } else {
          v = s[e];
        }
      }
      hs[k][j] = v;
    }
    for (int idx = threadIdx.x; idx < kZEdges * TC; idx += kZThreads) {
      const int k = idx / TC;
      const int j = idx % TC;
      xs[k][j] = (k < nk && j < nc) ? x[src[eb + k] * C + perm[pcol + j]] : T(0);
    }
    __syncthreads();
    if (live) {
#pragma unroll 4
      for (int k = 0; k < nk; ++k) {  // the staged edges only (nk is uniform over the block)
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
    }
    __syncthreads();
  }
  const int ld = tile[2];
  T* Zi = Z + static_cast<int64_t>(blockIdx.x) * zs + tile[5];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int j = th * 4 + a;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int c = tc * 4 + b;
      if (j < nh && c < nc) Zi[static_cast<int64_t>(c) * ld + j] = acc[a][b];
    }
  }
}

// Per-edge backward of the contraction for one tile of <= te edges of one receiver i (receivers r0 .. r1 - 1 of the
// chunk, dZ (nr, zs) their gradient of the compact Z). Group by group (ng entries of 5 ints: hoff, the plan position
// of its first hidden unit, -1 for the bias row; nh, its units; poff, lq: its columns perm[poff .. poff + lq); zoff:
// its (lq x nh) block in Z), for each edge e of the tile, with G_e[u] = sum_c dZ_i[zoff + c nh + j] x_e[perm[poff + c]]
// for unit u = hidden[hoff + j]:
//   dG (E, H)  <- G_e[u]                          (the host scales it by s_e and reduces it with h_e for ds_e)
//   gz (E,)    <- G_e of the bias row
//   dxe (E, C) <- s_e sum_j dZ_i[zoff + c nh + j] [h_e, 1][u] at column perm[poff + c]   (index_add_ on the host)
// Units outside the plan are never written (dG is zero there). Every output element is written by exactly one thread
// of one block (a group's columns are distinct): no atomics, deterministic.
template <typename T, int TC>
__global__ void __launch_bounds__(kEdgeThreads)
    ik_contract_edge_backward_kernel(const T* __restrict__ dZ, const T* __restrict__ h, const T* __restrict__ s,
                                     const T* __restrict__ x, const int64_t* __restrict__ src,
                                     const int64_t* __restrict__ rowptr, const int64_t* __restrict__ tile_ptr,
                                     const int* __restrict__ hidden, const int* __restrict__ perm,
                                     const int* __restrict__ groups, int ng, T* __restrict__ dG, T* __restrict__ gz,
                                     T* __restrict__ dxe, int64_t r0, int64_t r1, int H, int C, int64_t zs, int te,
                                     int hb) {
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
  T* xg = xs + te * ldc;  // (te, ldc) the group's columns of them, in perm order
  T* dxa = xg + te * ldc;  // (te, ldc) dx accumulator
  T* dz = dxa + te * ldc;  // (hb, ldc) the group's dZ_i, unit-major: dz[j ldc + c]
  T* hr = dz + hb * ldc;  // (te, ldh) rows of [h_e, 1] on the group's units
  for (int idx = threadIdx.x; idx < ne * C; idx += blockDim.x) {
    const int k = idx / C;
    const int c = idx - k * C;
    xs[k * ldc + c] = x[src[eb + k] * C + c];
    dxa[k * ldc + c] = T(0);
  }
  const T* dZi = dZ + (i - r0) * zs;
  T* dGt = dG + eb * H;  // the tile's rows of dG, gz
  T* gzt = gz + eb;
  for (int g = 0; g < ng; ++g) {
    const int hoff = groups[g * 5], nh = groups[g * 5 + 1], poff = groups[g * 5 + 2], lq = groups[g * 5 + 3];
    const int64_t zoff = groups[g * 5 + 4];
    const int* pg = perm + poff;
    const int* hu = hoff >= 0 ? hidden + hoff : nullptr;  // the group's units (none: the bias row)
    const T* dZg = dZi + zoff;
    __syncthreads();  // the previous group's xg is consumed (and, the first time, xs / dxa are written)
    for (int idx = threadIdx.x; idx < ne * lq; idx += blockDim.x) {
      const int k = idx / lq;
      const int c = idx - k * lq;
      xg[k * ldc + c] = xs[k * ldc + pg[c]];
    }
    for (int j0 = 0; j0 < nh; j0 += hb) {
      const int hc = min(hb, nh - j0);
      __syncthreads();  // the previous rows are consumed (and xg is written)
      for (int idx = threadIdx.x; idx < hc * lq; idx += blockDim.x) {
        const int c = idx / hc;
        const int j = idx - c * hc;
        dz[j * ldc + c] = dZg[c * nh + j0 + j];
      }
      for (int idx = threadIdx.x; idx < ne * hc; idx += blockDim.x) {
        const int k = idx / hc;
        const int j = idx - k * hc;
        hr[k * ldh + j] = hu != nullptr ? h[(eb + k) * H + hu[j0 + j]] : T(1);
      }
      __syncthreads();
      // G (ne x hc) = xg (ne x lq) . dz^T (lq x hc)
      mm<TC, 2, 2>(
          1, ne, hc, lq, xg, [=](int, int m) { return m * ldc; }, 1, dz, [=](int, int n) { return n * ldc; }, 1,
          [=](int, int m, int n, T v) {
            if (hu != nullptr)
              dGt[m * H + hu[j0 + n]] = v;
            else
              gzt[m] = v;
          });
      // dx accumulator (ne x C) at the group's columns += hr (ne x hc) . dz (hc x lq)
      mm<TC, 2, 2>(
          1, ne, lq, hc, hr, [=](int, int m) { return m * ldh; }, 1, dz, [=](int, int n) { return n; }, ldc,
          [=](int, int m, int n, T v) { dxa[m * ldc + pg[n]] += v; });
    }
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

// The block plan of W' (ik_fast::cpu::plan_for, csrc/cpu/program.h: hidden groups, column permutations, dense
// pairs, widx) as the kernels read it, on the device, per structure (by content), sizes and device: a structural
// constant of the layer, so it is laid out and copied once, not per call. A few entries.
struct DevicePlan {
  std::shared_ptr<const ik_fast::cpu::Plan> plan;
  int64_t zs = 0;  // a receiver's compact Z: plan->zsize, then the bias row's C
  int64_t S = 0;  // pair output slots (plan->rows.size())
  int th = 64;  // the Z kernel's tile rows (16, 32 or 64)
  int64_t nz = 0;  // Z tiles
  int ng = 0;  // groups, the bias row's included (last)
  at::Tensor widx;  // int64 (nnz,): packed W' slot -> flat index of W'
  at::Tensor rows;  // int64 (S,): pair slot -> output row
  at::Tensor hidden;  // int32 (P,): plan position -> hidden unit
  at::Tensor perm;  // int32: the column permutations concatenated, then the identity (the bias row's)
  at::Tensor groups;  // int32 (ng, 5): hoff (-1: bias), nh, poff, lq, zoff
  at::Tensor ztiles;  // int32 (nz, 6): hrow (-1: bias), nh, ld, pcol, nc, zoff (ik_contract_z_kernel)
};

struct PlanEntry {
  std::string key;
  int64_t R, H, C;
  at::Device device;
  std::shared_ptr<const DevicePlan> dp;
};
std::mutex g_plan_mutex;
std::vector<PlanEntry> g_plans;

template <typename V>
at::Tensor upload(const std::vector<V>& v, at::ScalarType st, const at::Device& dev) {
  at::Tensor cpu = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(st));
  if (!v.empty()) std::memcpy(cpu.data_ptr(), v.data(), v.size() * sizeof(V));
  return cpu.to(dev);
}

// The Z kernel's multiply-adds per edge for tile rows th, padding included (rows to th, columns to a warp's 512 / th:
// warps past a tile's columns skip the products); the host picks the th with the least.
int64_t z_area(const std::vector<std::array<int64_t, 5>>& groups, int th) {
  const int64_t wc = 32 * 16 / th;
  int64_t a = 0;
  for (const auto& g : groups) a += ceil_div(g[1], th) * th * ceil_div(g[3], wc) * wc;
  return a;
}

std::shared_ptr<const DevicePlan> device_plan(const std::optional<c10::string_view>& structure, int64_t R, int64_t H,
                                              int64_t C, const at::Device& dev) {
  const std::string key = structure.has_value() ? std::string(structure->data(), structure->size()) : std::string();
  std::lock_guard<std::mutex> lock(g_plan_mutex);
  for (const PlanEntry& e : g_plans)
    if (e.device == dev && e.R == R && e.H == H && e.C == C && e.key == key) return e.dp;
  auto dp = std::make_shared<DevicePlan>();
  dp->plan = ik_fast::cpu::plan_for(structure, R, H, C);
  const ik_fast::cpu::Plan& p = *dp->plan;
  dp->zs = p.zsize + C;
  dp->S = static_cast<int64_t>(p.rows.size());
  TORCH_CHECK(dp->zs < (int64_t(1) << 31) && H < (int64_t(1) << 31),
              "ik_fast native CUDA: the structure's compact Z is too large (", dp->zs, " elements per receiver)");
  std::vector<int32_t> perm, hidden(p.hidden.begin(), p.hidden.end());
  std::vector<int64_t> poffs;
  for (const auto& q : p.perms) {
    poffs.push_back(static_cast<int64_t>(perm.size()));
    perm.insert(perm.end(), q.begin(), q.end());
  }
  const int64_t ident = static_cast<int64_t>(perm.size());
  for (int64_t c = 0; c < C; ++c) perm.push_back(static_cast<int32_t>(c));
  // groups (hoff, nh, poff, lq, zoff), the bias row last: one unit of value 1, every column in order, after zsize
  std::vector<std::array<int64_t, 5>> gs;
  for (const ik_fast::cpu::Group& g : p.groups)
    gs.push_back({g.hoff, g.nh, poffs[g.q], static_cast<int64_t>(p.perms[g.q].size()), g.zoff});
  gs.push_back({-1, 1, ident, C, p.zsize});
  int64_t best = -1;
  for (int th : {64, 32, 16}) {
    const int64_t a = z_area(gs, th);
    if (best < 0 || a < best) {
      best = a;
      dp->th = th;
    }
  }
  const int th = dp->th, tc = kZTileArea / th;
  std::vector<int32_t> groups, ztiles;
  for (const auto& g : gs) {
    for (int64_t v : g) groups.push_back(static_cast<int32_t>(v));
    for (int64_t h0 = 0; h0 < g[1]; h0 += th)
      for (int64_t c0 = 0; c0 < g[3]; c0 += tc) {
        const int64_t t[6] = {g[0] >= 0 ? g[0] + h0 : -1,
                              std::min<int64_t>(th, g[1] - h0),
                              g[1],
                              g[2] + c0,
                              std::min<int64_t>(tc, g[3] - c0),
                              g[4] + c0 * g[1] + h0};
        for (int64_t v : t) ztiles.push_back(static_cast<int32_t>(v));
      }
  }
  dp->ng = static_cast<int>(gs.size());
  dp->nz = static_cast<int64_t>(ztiles.size()) / 6;
  TORCH_CHECK(dp->nz <= 65535, "ik_fast native CUDA: the structure needs ", dp->nz,
              " Z tiles per receiver, more than a grid dimension holds");
  dp->widx = upload(p.widx, at::kLong, dev);
  dp->rows = upload(p.rows, at::kLong, dev);
  dp->hidden = upload(hidden, at::kInt, dev);
  dp->perm = upload(perm, at::kInt, dev);
  dp->groups = upload(groups, at::kInt, dev);
  dp->ztiles = upload(ztiles, at::kInt, dev);
  if (g_plans.size() >= 8) g_plans.erase(g_plans.begin());
  g_plans.push_back(PlanEntry{key, R, H, C, dev, dp});
  return dp;
}

// The inputs of conv / conv_backward, checked and converted to the compute dtype.
struct ConvInputs {
  at::ScalarType st;
  at::Tensor x, inp, src, rowptr, fw, fb, coef;
  std::vector<TrunkLayer> layers;
  std::shared_ptr<const DevicePlan> dp;  // the block plan of W' (dense without a structure)
  int64_t E, n_dst, n_src, R, H, C, P0, ndim;
};

ConvInputs check_conv(const at::Tensor& x, const at::Tensor& inp, const at::Tensor& src, const at::Tensor& rowptr,
                      at::TensorList weights, at::TensorList biases, at::TensorList fourier, at::TensorList fourier_inv,
                      at::TensorList act_bias, at::TensorList bn_factor, at::TensorList bn_shift,
                      const at::Tensor& final_weight, const at::Tensor& final_bias, const at::Tensor& coef,
                      int64_t ndim, const std::optional<c10::string_view>& structure) {
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
  // (each layer's kind from the structure: a gated layer's Linear has its gates too)
  c.layers = prepare_trunk(weights, biases, fourier, fourier_inv, act_bias, structure, 0, c.P0, c.st, dev, &c.H);
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
  c.dp = device_plan(structure, c.R, c.H, c.C, dev);  // (parses the structure: its errors name the op)
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

// The packed W' (nnz,): the plan's dense blocks, pair by pair (nr, nc, nh), gathered through widx.
at::Tensor packed_weight(const ConvInputs& c) {
  return c.fw.reshape({-1}).index_select(0, c.dp->widx);
}

// Receivers per chunk: their compact Z and the pairs' output slots (T forward, the gathered grad backward).
int64_t chunk_receivers(const ConvInputs& c) {
  const int64_t per = (c.dp->zs + c.dp->S) * static_cast<int64_t>(c.st == at::kDouble ? 8 : 4);
  return std::max<int64_t>(1, std::min<int64_t>(c.n_dst, static_cast<int64_t>(kZChunkBytes) / per));
}

// Z of receivers r0 .. r0 + nr - 1 from h (E, H), mapped by h_map first (the last activation before its batch norm,
// `hidden`) or by none (h after it)
template <typename T, int TH>
void launch_z_tiles(const ConvInputs& c, const at::Tensor& h, const Affine& h_map, const at::Tensor& s, at::Tensor& Z,
                    int64_t r0, int64_t nr) {
  const DevicePlan& d = *c.dp;
  const dim3 grid(static_cast<unsigned>(nr), static_cast<unsigned>(d.nz));
  ik_contract_z_kernel<T, TH><<<grid, kZThreads, 0, current_stream()>>>(
      h.data_ptr<T>(), h_map.on() ? h_map.f.data_ptr<T>() : nullptr, h_map.on() ? h_map.s.data_ptr<T>() : nullptr,
      h_map.on() ? static_cast<int>(h_map.d) : 1, s.data_ptr<T>(), c.x.data_ptr<T>(), c.src.data_ptr<int64_t>(),
      c.rowptr.data_ptr<int64_t>(), d.hidden.data_ptr<int>(), d.perm.data_ptr<int>(), d.ztiles.data_ptr<int>(),
      Z.data_ptr<T>(), r0, static_cast<int>(c.H), static_cast<int>(c.C), d.zs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_z(const ConvInputs& c, const at::Tensor& h, const Affine& h_map, const at::Tensor& s, at::Tensor& Z,
              int64_t r0, int64_t nr) {
  if (c.dp->th == 16)
    launch_z_tiles<T, 16>(c, h, h_map, s, Z, r0, nr);
  else if (c.dp->th == 32)
    launch_z_tiles<T, 32>(c, h, h_map, s, Z, r0, nr);
  else
    launch_z_tiles<T, 64>(c, h, h_map, s, Z, r0, nr);
}

// The pair blocks' forward: T[:, roff .. roff + nr) = Z[:, zoff .. zoff + nc nh) . B_p^T for each pair (B_p the
// pair's (nr, nc nh) block of the packed W'): the structural multiply-adds only, one GEMM per pair.
void pairs_forward(const ConvInputs& c, const at::Tensor& Zc, const at::Tensor& B, at::Tensor& T) {
  for (const ik_fast::cpu::Pair& p : c.dp->plan->pairs) {
    const int64_t K = p.nc * p.nh;
    at::Tensor t = T.narrow(1, p.roff, p.nr);
    gemm_into(t, Zc.narrow(1, p.zoff, K), B.narrow(0, p.boff, p.nr * K).view({p.nr, K}).t(), false);
  }
}

// The pair blocks' backward: dB_p += Gp[:, pair]^T Z[:, pair], then dZ[:, pair] = Gp[:, pair] B_p over Z's own block
// (each pair reads and overwrites only its block), Gp = grad_c[:, rows] (n, S).
void pairs_backward(const ConvInputs& c, at::Tensor& Zc, const at::Tensor& Gp, const at::Tensor& B, at::Tensor& dB) {
  for (const ik_fast::cpu::Pair& p : c.dp->plan->pairs) {
    const int64_t K = p.nc * p.nh;
    at::Tensor z = Zc.narrow(1, p.zoff, K);
    const at::Tensor gp = Gp.narrow(1, p.roff, p.nr);
    at::Tensor db = dB.narrow(0, p.boff, p.nr * K).view({p.nr, K});
    gemm_into(db, gp.t(), z, true);
    gemm_into(z, gp, B.narrow(0, p.boff, p.nr * K).view({p.nr, K}), false);
  }
}

size_t edge_smem(int te, int64_t C, size_t elem) {
  const size_t ldc = static_cast<size_t>(C | 1), ldh = static_cast<size_t>(kEdgeRows | 1);
  return (3 * te * ldc + kEdgeRows * ldc + te * ldh) * elem;
}

int edge_tile(int64_t C, size_t elem) {
  const size_t limit = max_smem_optin();
  int te = 32;
  while (te > 1 && (edge_smem(te, C, elem) > 96 * 1024 || edge_smem(te, C, elem) > limit)) te /= 2;
  TORCH_CHECK(edge_smem(te, C, elem) <= limit, "ik_fast native CUDA: C_in = ", C,
              " needs more shared memory than the device has for the contraction's backward");
  return te;
}

template <typename T, int TC>
void launch_edge_backward(const ConvInputs& c, const at::Tensor& dZ, const at::Tensor& h, const at::Tensor& s,
                          const at::Tensor& tile_ptr, at::Tensor& dG, at::Tensor& gz, at::Tensor& dxe, int64_t r0,
                          int64_t nr, int te) {
  const size_t smem = edge_smem(te, c.C, sizeof(T));
  allow_smem(ik_contract_edge_backward_kernel<T, TC>, smem);
  // at most one partial tile per receiver: E / te + nr tiles bound the chunk's
  const int64_t blocks = ceil_div(c.E, te) + nr;
  ik_contract_edge_backward_kernel<T, TC><<<static_cast<unsigned>(blocks), kEdgeThreads, smem, current_stream()>>>(
      dZ.data_ptr<T>(), h.data_ptr<T>(), s.data_ptr<T>(), c.x.data_ptr<T>(), c.src.data_ptr<int64_t>(),
      c.rowptr.data_ptr<int64_t>(), tile_ptr.data_ptr<int64_t>(), c.dp->hidden.data_ptr<int>(),
      c.dp->perm.data_ptr<int>(), c.dp->groups.data_ptr<int>(), c.dp->ng, dG.data_ptr<T>(), gz.data_ptr<T>(),
      dxe.data_ptr<T>(), r0, r0 + nr, static_cast<int>(c.H), static_cast<int>(c.C), c.dp->zs, te, kEdgeRows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor native_conv_cuda(const at::Tensor& x, const at::Tensor& inp, const at::Tensor& src, const at::Tensor& rowptr,
                            at::TensorList weights, at::TensorList biases, at::TensorList fourier,
                            at::TensorList fourier_inv, at::TensorList act_bias, at::TensorList bn_factor,
                            at::TensorList bn_shift, const at::Tensor& final_weight, const at::Tensor& final_bias,
                            const at::Tensor& coef, double norm, int64_t ndim,
                            const std::optional<c10::string_view>& structure, const std::optional<at::Tensor>& hidden,
                            std::optional<at::TensorList> /*tape: not used, see native_conv_backward_cuda*/) {
  const c10::cuda::CUDAGuard guard(x.device());
  ConvInputs c = check_conv(x, inp, src, rowptr, weights, biases, fourier, fourier_inv, act_bias, bn_factor, bn_shift,
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
  const DevicePlan& d = *c.dp;
  const at::Tensor B = packed_weight(c);
  const int64_t nr = chunk_receivers(c);
  at::Tensor Z = at::empty({nr, d.zs}, c.x.options());
  at::Tensor T = at::empty({nr, d.S}, c.x.options());
  for (int64_t r0 = 0; r0 < c.n_dst; r0 += nr) {
    const int64_t n = std::min(nr, c.n_dst - r0);
    at::Tensor Zc = Z.narrow(0, 0, n);
    AT_DISPATCH_FLOATING_TYPES(c.st, "ik_contract_z", [&] { launch_z<scalar_t>(c, h, *h_map, s, Zc, r0, n); });
    at::Tensor o = out.narrow(0, r0, n);
    gemm_into(o, Zc.narrow(1, d.plan->zsize, c.C), c.fb.t(), false);  // the bias row: out_c = Z_c[bias] B_F^T
    if (d.S > 0) {
      at::Tensor Tc = T.narrow(0, 0, n);
      pairs_forward(c, Zc, B, Tc);
      o.index_add_(1, d.rows, Tc);  // each pair's rows (deterministic under use_deterministic_algorithms)
    }
  }
  return out.to(x.scalar_type());
}

std::vector<at::Tensor> native_conv_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& inp, const at::Tensor& src, const at::Tensor& rowptr,
    at::TensorList weights, at::TensorList biases, at::TensorList fourier, at::TensorList fourier_inv,
    at::TensorList act_bias, at::TensorList bn_factor, at::TensorList bn_shift, const at::Tensor& final_weight,
    const at::Tensor& final_bias, const at::Tensor& coef, double norm, int64_t ndim,
    const std::optional<c10::string_view>& structure, std::optional<at::TensorList> /*tape*/) {
  // a tape (ik_fast/ops.py) is not used: the backward re-evaluates the trunk (GPU memory holds no per-layer grids)
  const c10::cuda::CUDAGuard guard(x.device());
  ConvInputs c = check_conv(x, inp, src, rowptr, weights, biases, fourier, fourier_inv, act_bias, bn_factor, bn_shift,
                            final_weight, final_bias, coef, ndim, structure);
  check_cuda(grad, "grad", x.device());
  check_float(grad, "grad");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == c.n_dst && grad.size(1) == c.R,
              "ik_fast native CUDA: grad must be (n_dst, R) = (", c.n_dst, ", ", c.R, "), got ", grad.sizes());
  const size_t L = c.layers.size();
  // the gradients in the compute dtype, zero where nothing contributes
  at::Tensor dx = at::zeros({c.n_src, c.C}, c.x.options());
  at::Tensor dinp;
  std::vector<at::Tensor> dweights, dbiases, dab, dbnf, dbns;
  const DevicePlan& d = *c.dp;
  at::Tensor dB = at::zeros({static_cast<int64_t>(d.plan->widx.size())}, c.x.options());  // the packed W''s
  at::Tensor dfb = at::zeros({c.R, c.C}, c.x.options());
  at::Tensor dcoef = at::zeros({1}, c.x.options());
  const bool empty = c.E == 0 || c.n_dst == 0 || c.R == 0 || c.C == 0;
  if (empty) {
    dinp = at::zeros({c.E, c.P0}, c.x.options());
    for (const TrunkLayer& t : c.layers) {
      dweights.push_back(at::zeros_like(t.w));
      dbiases.push_back(at::zeros_like(t.b));
      dab.push_back(t.act == kActNorm ? at::zeros({t.hout / t.id * t.nnt}, c.x.options()) : at::Tensor());
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
    const at::Tensor B = packed_weight(c);
    const size_t elem = c.st == at::kDouble ? 8 : 4;
    const int tc = gemm_mode(c.st);
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
    at::Tensor Z = at::empty({nr, d.zs}, c.x.options());
    for (int64_t r0 = 0; r0 < c.n_dst; r0 += nr) {
      const int64_t n = std::min(nr, c.n_dst - r0);
      at::Tensor Zc = Z.narrow(0, 0, n);
      const at::Tensor gc = g.narrow(0, r0, n);
      AT_DISPATCH_FLOATING_TYPES(c.st, "ik_contract_z", [&] { launch_z<scalar_t>(c, h, Affine(), s, Zc, r0, n); });
      at::Tensor zb = Zc.narrow(1, d.plan->zsize, c.C);
      gemm_into(dfb, gc.t(), zb, true);  // dB_F += grad_c^T Z_c[bias]
      if (d.S > 0) pairs_backward(c, Zc, gc.index_select(1, d.rows), B, dB);  // dW' blocks, dZ_c over Z_c's
      gemm_into(zb, gc, c.fb, false);  // dZ_c[bias] = grad_c B_F (over Z_c[bias], consumed)
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
    dinp = trunk_backward(c.inp, c.layers, ys, as, dh, &dweights, &dbiases, &dab, &dbnf, &dbns);
    const at::Tensor wds = ds * s;
    dcoef = -(wds * r2).sum().reshape({1});
    if (c.ndim > 0) {
      dinp.narrow(1, 0, c.ndim).add_(c.inp.narrow(1, 0, c.ndim) * wds.unsqueeze(1) * (c.coef * -2.0));
    }
  }
  // dW_F: the packed gradient scattered back through widx (zero outside the structure)
  at::Tensor dfw = at::zeros({c.R * c.H * c.C}, c.x.options()).index_copy_(0, d.widx, dB).view({c.R, c.H, c.C});
  std::vector<at::Tensor> out;
  out.reserve(5 + 5 * L);
  out.push_back(dx.to(x.scalar_type()));
  out.push_back(dinp.to(inp.scalar_type()));
  for (size_t k = 0; k < L; ++k) out.push_back(dweights[k].to(weights[k].scalar_type()).contiguous());
  for (size_t k = 0; k < L; ++k) out.push_back(dbiases[k].to(biases[k].scalar_type()).contiguous());
  // a norm layer's act_bias gradient (C nnt,); the others' act_bias is empty, and so is its gradient
  for (size_t k = 0; k < L; ++k)
    out.push_back(dab[k].defined() ? dab[k].to(act_bias[k].scalar_type()).view(act_bias[k].sizes()).contiguous()
                                   : at::zeros_like(act_bias[k]));
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> native_trunk_moments_cuda(
    const at::Tensor& inp, at::TensorList weights, at::TensorList biases, at::TensorList fourier,
    at::TensorList fourier_inv, at::TensorList act_bias, at::TensorList in_factor, at::TensorList in_shift,
    const std::optional<c10::string_view>& structure, int64_t first_layer, bool with_activation, bool with_grid) {
  TORCH_CHECK_NOT_IMPLEMENTED(!with_grid, "ik_fast native CUDA keeps no Fourier grids (the tape of ik_fast.ops)");
  TORCH_CHECK(inp.device().is_cuda(), "ik_fast native CUDA: inp must be a CUDA tensor, got ", inp.device());
  check_float(inp, "inp");
  TORCH_CHECK(inp.dim() == 2, "ik_fast native CUDA: inp must be (E, P0), got ", inp.sizes());
  const c10::cuda::CUDAGuard guard(inp.device());
  const at::ScalarType st = compute_dtype(inp);
  int64_t H = 0;
  std::vector<TrunkLayer> layers = prepare_trunk(weights, biases, fourier, fourier_inv, act_bias, structure,
                                                 first_layer, inp.size(1), st, inp.device(), &H);
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
  // the moments from the trunk kernel's per-tile partials (no pass over h), or with ATen when there are no layers
  at::Tensor mom;
  at::Tensor h = trunk_forward(x, in_map, layers, nullptr, nullptr, &mom);
  if (!mom.defined()) {
    const at::Tensor mean = h.mean(0);
    mom = at::stack({mean, (h - mean).square().sum(0)});
  }
  at::Tensor moments = mom.to(inp.scalar_type());
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
