// Shared pieces of ik_fast's CUDA kernels (csrc/cuda/*.cu): the block-level small-GEMM helper every stage is written
// with, the ELU, the layer descriptors of the trunk, and host-side helpers (checks, dtype, shared-memory opt-in).
//
// The custom kernels compute in IEEE FFMA in the compute dtype (float32 or float64), or, for float32, their GEMMs on
// the tensor cores (block_mm_tf32): TF32 under TF32 matmul precision, 3xTF32 (split TF32) under "highest" (gemm_mode).
// See conv_cuda.cu's header for the algorithm and the precision paths.
#pragma once

// Only ATen and c10's CUDA headers: ATen/cuda/CUDAContext.h would pull in cuBLAS / cuSPARSE / cuSOLVER headers,
// which a bare CUDA toolkit (and so a compile-only CI with the CPU wheel of torch) does not have.
// c10::cuda::getCurrentCUDAStream is the function at::cuda::getCurrentCUDAStream names.
// The CPU wheel of torch ships c10/cuda's headers but not the configured c10/cuda/impl/cuda_cmake_macros.h (it only
// matters for Windows DLL exports): compile against either wheel.
#if defined(__has_include)
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>) && !defined(C10_CUDA_NO_CMAKE_CONFIGURE_FILE)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#endif
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

namespace ik_fast_cuda {

// Threads per block of the trunk kernels and of the per-edge contraction backward. The GEMM helper below strides
// its micro-tiles over whatever blockDim.x is, so this is a tuning constant, not a correctness one.
constexpr int kTrunkThreads = 256;
constexpr int kEdgeThreads = 256;
// Receiver-block tile of the Z kernel: 128 threads, each a 4 x 4 micro-tile of Z (hidden x input); the tile is TH
// hidden rows x kZTileArea / TH input columns, TH = 16, 32 or 64 (picked per structure, see conv_cuda.cu).
constexpr int kZThreads = 128;
constexpr int kZTileArea = 16 * kZThreads;  // elements of Z per tile (TH x TC)
constexpr int kZEdges = 16;                 // edges staged in shared memory per step
// Layers one trunk launch evaluates (the host chains launches for deeper MLPs).
constexpr int kMaxLayers = 16;

// ELU with alpha = 1, as torch.nn.functional.elu (which uses expm1 below zero), and its derivative.
template <typename T>
__device__ __forceinline__ T elu(T u) {
  return u > T(0) ? u : expm1(u);
}
template <typename T>
__device__ __forceinline__ T elu_grad(T u) {
  return u > T(0) ? T(1) : exp(u);
}
template <typename T>
__device__ __forceinline__ T sigmoid(T u) {
  return T(1) / (T(1) + exp(-u));
}

// float32's exponentials on the fast hardware path (MUFU.EX2 through __expf, a handful of instructions; IEEE expm1f
// / expf take ~29 / ~10): these non-template overloads take precedence over the templates above for float (float64
// keeps the IEEE functions). expm1(u) for u <= 0 is __expf(u) - 1 for u <= -1/4 (|result| >= 0.22: the subtraction
// is exact, __expf errs by 2 + 1.17 |u| ulp of e^u, so a few ulp of the result) and its Taylor polynomial of degree 6
// above (truncation below |u|^7 / 5040 <= 1.2e-8, under one ulp of |result| >= |u| / 1.2; Horner's rounding one or
// two ulp), chosen without a branch. tests/tools/emulate_check.py (fast_expm1) bounds the formula's error on a dense
// grid with __expf at its documented worst case; the tolerance table's float32 bounds are 2e-5 / 1e-4.
__device__ __forceinline__ float fast_expm1_nonpositive(float u) {
  const float p =
      u * fmaf(u, fmaf(u, fmaf(u, fmaf(u, fmaf(u, 1.f / 720.f, 1.f / 120.f), 1.f / 24.f), 1.f / 6.f), 0.5f), 1.f);
  const float e = __expf(u) - 1.f;
  return u > -0.25f ? p : e;
}
__device__ __forceinline__ float elu(float u) {
  return u > 0.f ? u : fast_expm1_nonpositive(u);
}
__device__ __forceinline__ float elu_grad(float u) {
  return u > 0.f ? 1.f : __expf(u);
}
__device__ __forceinline__ float sigmoid(float u) {
  return 1.f / (1.f + __expf(-u));
}

// C (M x N) = A (M x K) . B (K x N), batched over nb independent products, computed by the whole block: each thread
// takes TM x TN micro-tiles of (batch, M, N) in turn (N fastest, so that a warp's B loads are consecutive when B's
// columns are) and accumulates over K in registers, then hands every element to store(batch, m, n, value).
//
//   A[batch, m, k] = A[aoff(batch, m) + k * aks]     (A is usually a shared-memory tile)
//   B[batch, k, n] = B[boff(batch, n) + k * bks]     (global weights, or a shared-memory tile)
//
// Rows m >= M and columns n >= N of a micro-tile read row / column 0 instead (always valid memory: M, N >= 1) and
// are never stored. Each (batch, m, n) is stored by exactly one thread, so store may read-modify-write its target.
// No barrier inside: the caller synchronises before the operands are written and after C is complete.
template <int TM, int TN, typename T, typename AOff, typename BOff, typename Store>
__device__ __forceinline__ void block_mm(int nb, int M, int N, int K, const T* A, AOff aoff, int aks,
                                         const T* __restrict__ B, BOff boff, int bks, Store store) {
  const int mt = (M + TM - 1) / TM;
  const int nt = (N + TN - 1) / TN;
  const int total = nb * mt * nt;
  for (int w = threadIdx.x; w < total; w += blockDim.x) {
    const int ni = w % nt;
    const int rest = w / nt;
    const int mi = rest % mt;
    const int bi = rest / mt;
    const int m0 = mi * TM;
    const int n0 = ni * TN;
    int ao[TM];
    int bo[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) ao[i] = aoff(bi, m0 + i < M ? m0 + i : 0);
#pragma unroll
    for (int j = 0; j < TN; ++j) bo[j] = boff(bi, n0 + j < N ? n0 + j : 0);
    T acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = T(0);
    for (int k = 0; k < K; ++k) {
      T av[TM];
      T bv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) av[i] = A[ao[i] + k * aks];
#pragma unroll
      for (int j = 0; j < TN; ++j) bv[j] = B[bo[j] + k * bks];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
    }
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j)
        if (m0 + i < M && n0 + j < N) store(bi, m0 + i, n0 + j, acc[i][j]);
  }
}

// The TF32 tensor-core variant of block_mm (float only, sm_80+): each warp takes 16 x 16 tiles of (batch, M, N) in
// turn and accumulates them over K with mma.sync.m16n8k8 (two n8 halves sharing the A fragment), operands rounded
// to TF32 (cvt.rna) and products accumulated in float32. Operands are read element by element through aoff / boff
// (no ldmatrix), in the fragment layout of the PTX ISA for .tf32 (g = lane / 4, t = lane % 4):
//   A (16 x 8, row):  a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4)
//   B (8 x 8, col):   b0 (k = t, n = g), b1 (k = t + 4, n = g)
//   C (16 x 8):       c0 (g, 2t), c1 (g, 2t + 1), c2 (g + 8, 2t), c3 (g + 8, 2t + 1)
// k >= K reads as zero in both operands; rows / columns past M / N read row / column 0 and are not stored. The loops
// are warp-uniform (mma.sync needs the whole warp). Same store contract as block_mm.
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  r = __float_as_uint(x);
  __trap();  // the extension is built for sm_80 and newer only
#else
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
#endif
  return r;
}

// The low TF32 half of x whose high half is hi = to_tf32(x): cvt.rna of x - hi (exact in float32).
__device__ __forceinline__ uint32_t tf32_lo(float x, uint32_t hi) {
  return to_tf32(x - __uint_as_float(hi));
}

__device__ __forceinline__ void mma_tf32(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// Split (3xTF32, float32 accuracy on the tensor cores): each operand x is split into hi = cvt.rna(x) and lo =
// cvt.rna(x - hi) (x - hi is exact in float32), and each fragment takes three mma: hi_a hi_b into acc, lo_a hi_b and
// hi_a lo_b into a second accumulator accs (so the small terms are not absorbed step by step into the large sum);
// stored is acc + accs. lo_a lo_b (below float32's rounding of the result) is dropped. tests/tools/emulate_check.py
// (--precision tf32x3) replays this rounding fragment by fragment.
template <bool Split = false, typename AOff, typename BOff, typename Store>
__device__ __forceinline__ void block_mm_tf32(int nb, int M, int N, int K, const float* A, AOff aoff, int aks,
                                              const float* __restrict__ B, BOff boff, int bks, Store store) {
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int mt = (M + 15) / 16;
  const int nt = (N + 15) / 16;
  const int total = nb * mt * nt;
  for (int w = threadIdx.x >> 5; w < total; w += blockDim.x >> 5) {
    const int ni = w % nt;
    const int rest = w / nt;
    const int mi = rest % mt;
    const int bi = rest / mt;
    const int r0 = mi * 16 + g;
    const int r1 = r0 + 8;
    const int ao0 = aoff(bi, r0 < M ? r0 : 0);
    const int ao1 = aoff(bi, r1 < M ? r1 : 0);
    // n8 halves of the tile per pass over K: both (sharing the A fragment) for TF32; one at a time for 3xTF32, whose
    // second accumulator and low halves would otherwise spill (the A fragment is then loaded once per half)
    constexpr int JN = Split ? 1 : 2;
    for (int j0 = 0; j0 < 2; j0 += JN) {
      int bo[JN];
#pragma unroll
      for (int j = 0; j < JN; ++j) {
        const int n = ni * 16 + 8 * (j0 + j) + g;
        bo[j] = boff(bi, n < N ? n : 0);
      }
      float acc[JN][4];
      float accs[JN][4];  // (Split) the small products
#pragma unroll
      for (int j = 0; j < JN; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[j][q] = accs[j][q] = 0.f;
      for (int k0 = 0; k0 < K; k0 += 8) {
        const int ka = k0 + t;
        const int kb = ka + 4;
        const bool va = ka < K;
        const bool vb = kb < K;
        const float fa0 = va ? A[ao0 + ka * aks] : 0.f;
        const float fa1 = va ? A[ao1 + ka * aks] : 0.f;
        const float fa2 = vb ? A[ao0 + kb * aks] : 0.f;
        const float fa3 = vb ? A[ao1 + kb * aks] : 0.f;
        const uint32_t a0 = to_tf32(fa0);
        const uint32_t a1 = to_tf32(fa1);
        const uint32_t a2 = to_tf32(fa2);
        const uint32_t a3 = to_tf32(fa3);
#pragma unroll
        for (int j = 0; j < JN; ++j) {
          const float fb0 = va ? B[bo[j] + ka * bks] : 0.f;
          const float fb1 = vb ? B[bo[j] + kb * bks] : 0.f;
          const uint32_t b0 = to_tf32(fb0);
          const uint32_t b1 = to_tf32(fb1);
          if constexpr (Split) {
            mma_tf32(accs[j], tf32_lo(fa0, a0), tf32_lo(fa1, a1), tf32_lo(fa2, a2), tf32_lo(fa3, a3), b0, b1);
            mma_tf32(accs[j], a0, a1, a2, a3, tf32_lo(fb0, b0), tf32_lo(fb1, b1));
          }
          mma_tf32(acc[j], a0, a1, a2, a3, b0, b1);
        }
      }
#pragma unroll
      for (int j = 0; j < JN; ++j) {
        const int c0 = ni * 16 + 8 * (j0 + j) + 2 * t;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int m = q < 2 ? r0 : r1;
          const int n = c0 + (q & 1);
          if (m < M && n < N) store(bi, m, n, Split ? acc[j][q] + accs[j][q] : acc[j][q]);
        }
      }
    }
  }
}

// The block GEMMs' arithmetic, the kernels' TC template argument: IEEE FFMA in T, TF32 tensor cores, or 3xTF32
// (split TF32: float32 accuracy on the tensor cores).
enum GemmMode : int { kGemmFfma = 0, kGemmTf32 = 1, kGemm3xTf32 = 2 };

// block_mm in IEEE FFMA (TC = kGemmFfma, any T) or on the tensor cores (kGemmTf32 / kGemm3xTf32, T = float).
template <int TC, int TM, int TN, typename T, typename AOff, typename BOff, typename Store>
__device__ __forceinline__ void mm(int nb, int M, int N, int K, const T* A, AOff aoff, int aks, const T* __restrict__ B,
                                   BOff boff, int bks, Store store) {
  if constexpr (TC == kGemm3xTf32) {
    static_assert(std::is_same<T, float>::value, "the TF32 paths are for float32 operands");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    // sm_8x: gemm_mode never picks 3xTF32 there (it spills in the trunk's forward kernel on sm_80): FFMA
    block_mm<TM, TN>(nb, M, N, K, A, aoff, aks, B, boff, bks, store);
#else
    block_mm_tf32<true>(nb, M, N, K, A, aoff, aks, B, boff, bks, store);
#endif
  } else if constexpr (TC == kGemmTf32) {
    static_assert(std::is_same<T, float>::value, "the TF32 paths are for float32 operands");
    block_mm_tf32<false>(nb, M, N, K, A, aoff, aks, B, boff, bks, store);
  } else {
    block_mm<TM, TN>(nb, M, N, K, A, aoff, aks, B, boff, bks, store);
  }
}

// A hidden layer's nonlinearity, by its code in the structure's encoding (ik_fast::Activation, csrc/structure.h)
enum ActKind : int { kActElu = 0, kActFourierElu = 1, kActGated = 2, kActNorm = 3 };

// One hidden layer of the kernel MLP as the trunk kernels read it (pointers into tensors the host prepared in the
// compute dtype, contiguous):
//   act   its nonlinearity (ActKind)
//   w     dense (cw_d == 0): W^T (hin, lout) row-major; componentwise (cw_d > 0 output components per channel, the
//         gates included): (cw_d, cin, cout), i.e. the op's (cw_d, cout, cin) weight with its last two dimensions
//         swapped (cin = hin / cw_din, cout = lout / cw_d); output component a reads input component a for a < cw_dm,
//         else cw_t0 (a gated layer's gates: the previous field's first trivial component)
//   b     (lout,)
//   lout  the Linear's outputs: C (D + gates) for a gated layer (channel-major, each channel's D components, then its
//         gates), else hout; hout: the activation's units, C D
//   at    Fourier ELU (fd > 0): A^T (fd, g); ainvt: (A^+)^T (g, fd); unused for the other kinds (fd == 0)
//   tab   gated / norm: per component a of a channel's D = id its non-trivial irrep's number (-1: trivial), then per
//         non-trivial irrep (first component, size); ab: norm's act_bias (C nnt,); dl: the Linear's units per
//         channel (D + nnt for gated, D for norm)
//   bnf, bns: the affine map after the activation (a batch norm with known statistics), or null:
//         h[:, j] = a[:, j] * bnf[j / bnd] + bns[j] (channel-major: bnf (hout / bnd,), bns (hout,))
//   save_y, save_a: when not null, the layer's pre-activation y (E, lout) and activation a (E, hout) (before the
//         affine) are written there
template <typename T>
struct LayerDesc {
  const T* w;
  const T* b;
  const T* at;
  const T* ainvt;
  const int* tab;
  const T* ab;
  const T* bnf;
  const T* bns;
  T* save_y;
  T* save_a;
  int act;
  int hin;
  int lout;
  int hout;
  int cw_d;
  int cw_din;
  int cw_dm;
  int cw_t0;
  int fd;
  int g;
  int id;
  int dl;
  int nnt;
  int bnd;
};

// A gated or norm layer's activation at unit j = c D + a of one edge, from yr, that edge's row of the layer's Linear
// output (channel c at yr[c dl ..]): a trivial irrep's component ELU(y); a non-trivial irrep's y times sigmoid of its
// gate (gated) or of |v| - act_bias[c nnt + g] (norm; |v| over the irrep's components).
template <typename T>
__device__ __forceinline__ T irrep_act(int act, const int* __restrict__ tab, const T* __restrict__ ab, int D, int dl,
                                       int nnt, const T* yr, int j) {
  const int c = j / D;
  const int a = j - c * D;
  const T* yc = yr + c * dl;
  const int g = tab[a];
  const T v = yc[a];
  if (g < 0) return elu(v);
  if (act == kActGated) return v * sigmoid(yc[D + g]);
  const int s0 = tab[D + 2 * g];
  const int sz = tab[D + 2 * g + 1];
  T sq = T(0);
  for (int i = 0; i < sz; ++i) sq = fma(yc[s0 + i], yc[s0 + i], sq);
  const T n = sq > T(0) ? sqrt(sq) : T(0);
  return v * sigmoid(n - ab[c * nnt + g]);
}

template <typename T>
struct TrunkArgs {
  LayerDesc<T> layer[kMaxLayers];
  const T* in;    // (E, hin0) the MLP input (or the output of the previous launch's last layer)
  const T* in_f;  // the affine map applied to `in` as it is loaded (in_f[j / in_d], in_s[j]), or null
  const T* in_s;
  T* out;         // (E, hout of the last layer), after the last layer's affine
  T* part;        // or null: per block (tile), the output's column sums and squared deviations about the tile's own
                  // mean, (blocks, 2, hout) (trunk_moments' statistics without another pass over out)
  int64_t E;
  int nl;         // layers in this launch, 1 .. kMaxLayers
  int hin0;
  int in_d;
  int be;        // edges per tile (block)
  int ld;        // row stride of the shared-memory tiles (>= every width, odd)
  int gc;        // grid points of the Fourier ELU per chunk
  int su;        // elements of the Fourier scratch (>= gc)
};

// ------------------------------------------------------------------------------------------------------------------
// host helpers
// ------------------------------------------------------------------------------------------------------------------
// f(std::integral_constant<int, mode>) for float (mode a GemmMode: the TF32 / 3xTF32 kernels), else
// f(std::integral_constant<int, kGemmFfma>) (IEEE FFMA in T).
template <typename T, typename F>
inline void dispatch_tc(int mode, F&& f) {
  if constexpr (std::is_same<T, float>::value) {
    if (mode == kGemmTf32) {
      f(std::integral_constant<int, kGemmTf32>{});
      return;
    }
#ifdef IK_FAST_3XTF32
    if (mode == kGemm3xTf32) {
      f(std::integral_constant<int, kGemm3xTf32>{});
      return;
    }
#endif
  }
  f(std::integral_constant<int, kGemmFfma>{});
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The compute dtype: float64 stays float64, everything else (float32, and bf16 / half inputs) computes in float32.
inline at::ScalarType compute_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The current device's compute capability major, cached per device.
inline int compute_major() {
  static int cached[64] = {0};
  const int dev = c10::cuda::current_device();
  if (dev < 0 || dev >= 64) return 0;
  if (cached[dev] == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, dev));
    cached[dev] = v;
  }
  return cached[dev];
}

// Whether float32 GEMMs of the custom kernels may use TF32 tensor cores: the switch ATen's own cuBLAS matmuls read,
// allowTF32CuBLAS() (torch.set_float32_matmul_precision "highest" -> IEEE FFMA; "high" / "medium" -> TF32; the newer
// torch.backends.cuda.matmul.fp32_precision likewise), so the custom kernels and the cuBLAS GEMMs of one call agree.
inline bool use_tf32(at::ScalarType st) {
  return st == at::kFloat && at::globalContext().allowTF32CuBLAS();
}

// The block GEMMs' GemmMode for the compute dtype st: float64 in FFMA; float32 under TF32 (use_tf32) on TF32 tensor
// cores; float32 under "highest" in IEEE FFMA, or, in a build with -DIK_FAST_3XTF32 (today its split spills 12-32 B
// in one kernel per architecture: off by default), on sm_90 and newer as 3xTF32 (its error against float64 measured
// within 2x of IEEE float32's, emulated on CPU: the docs' precision table), or IEEE FFMA when the environment variable
// IK_FAST_HIGHEST is "ieee" (read per call, as the Triton backend reads it).
inline int gemm_mode(at::ScalarType st) {
  if (st != at::kFloat) return kGemmFfma;
  if (use_tf32(st)) return kGemmTf32;
  const char* env = std::getenv("IK_FAST_HIGHEST");
  const std::string v(env != nullptr ? env : "");
  TORCH_CHECK(v.empty() || v == "ieee" || v == "tf32x3", "IK_FAST_HIGHEST must be 'ieee' or 'tf32x3', got '", v, "'");
#ifdef IK_FAST_3XTF32
  if (compute_major() < 9) return kGemmFfma;  // (3xTF32 is compiled for sm_90 and newer only)
  return v == "ieee" ? kGemmFfma : kGemm3xTf32;
#else
  TORCH_CHECK(v != "tf32x3", "IK_FAST_HIGHEST=tf32x3: this build of the native CUDA kernels has no 3xTF32 path ",
              "(build with -DIK_FAST_3XTF32)");
  return kGemmFfma;
#endif
}

// t in dtype st, contiguous, on t's device (no copy when it already is).
inline at::Tensor prep(const at::Tensor& t, at::ScalarType st) {
  return t.to(st).contiguous();
}

inline void check_cuda(const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, "ik_fast native CUDA: ", name, " must be on ", dev, ", got ", t.device());
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "ik_fast native CUDA: ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

// Opt a kernel into dynamic shared memory above 48 KB (required by the runtime beyond the default), and check the
// device allows that much.
template <typename Kernel>
inline void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// Shared memory a block may opt into on the current device (227 KB on sm_90, 163 KB on sm_80), cached per device.
inline size_t max_smem_optin() {
  static int cached[64] = {0};
  const int dev = c10::cuda::current_device();
  if (dev < 0 || dev >= 64) return 48 * 1024;
  if (cached[dev] == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    cached[dev] = v;
  }
  return static_cast<size_t>(cached[dev]);
}

inline cudaStream_t current_stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}

}  // namespace ik_fast_cuda
