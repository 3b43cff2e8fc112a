// Shared pieces of ik_fast's CUDA kernels (csrc/cuda/*.cu): the block-level small-GEMM helper every stage is written
// with, the ELU, the layer descriptors of the trunk, and host-side helpers (checks, dtype, shared-memory opt-in).
//
// Everything here is plain CUDA C++ (no tensor-core instructions): the custom kernels compute in IEEE FFMA in the
// tensors' own dtype (float32 or float64). See conv_cuda.cu's header for the algorithm and the precision paths.
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
#include <string>
#include <vector>

namespace ik_fast_cuda {

// Threads per block of the trunk kernels and of the per-edge contraction backward. The GEMM helper below strides
// its micro-tiles over whatever blockDim.x is, so this is a tuning constant, not a correctness one.
constexpr int kTrunkThreads = 256;
constexpr int kEdgeThreads = 256;
// Receiver-block tile of the Z kernel: 16 x 8 threads, each a 4 x 4 micro-tile of Z (hidden x input).
constexpr int kZThreadsH = 16;
constexpr int kZThreadsC = 8;
constexpr int kZThreads = kZThreadsH * kZThreadsC;
constexpr int kZTileH = 4 * kZThreadsH;  // 64 hidden rows of Z (the augmented row H included)
constexpr int kZTileC = 4 * kZThreadsC;  // 32 input columns
constexpr int kZEdges = 16;              // edges staged in shared memory per step
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

// One hidden layer of the kernel MLP as the trunk kernels read it (pointers into tensors the host prepared in the
// compute dtype, contiguous):
//   w     dense (cw_d == 0): W^T (hin, hout) row-major; componentwise (cw_d = D > 0): (D, cin, cout), i.e. the op's
//         (D, cout, cin) weight with its last two dimensions swapped (cin = hin / D, cout = hout / D)
//   b     (hout,)
//   at    Fourier ELU (fd > 0): A^T (fd, g); ainvt: (A^+)^T (g, fd); unused for a pointwise ELU (fd == 0)
//   save_y, save_a: when not null, the layer's pre-activation y and activation a are written there, (E, hout)
template <typename T>
struct LayerDesc {
  const T* w;
  const T* b;
  const T* at;
  const T* ainvt;
  T* save_y;
  T* save_a;
  int hin;
  int hout;
  int cw_d;
  int fd;
  int g;
};

template <typename T>
struct TrunkArgs {
  LayerDesc<T> layer[kMaxLayers];
  const T* in;   // (E, hin0) the MLP input (or the activation of the previous launch's last layer)
  T* out;        // (E, hout of the last layer)
  int64_t E;
  int nl;        // layers in this launch, 1 .. kMaxLayers
  int hin0;
  int be;        // edges per tile (block)
  int ld;        // row stride of the shared-memory tiles (>= every width, odd)
  int gc;        // grid points of the Fourier ELU per chunk
  int su;        // elements of the Fourier scratch (>= gc)
};

// ------------------------------------------------------------------------------------------------------------------
// host helpers
// ------------------------------------------------------------------------------------------------------------------
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The compute dtype: float64 stays float64, everything else (float32, and bf16 / half inputs) computes in float32.
inline at::ScalarType compute_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// t in dtype st, contiguous, on t's device (no copy when it already is).
inline at::Tensor prep(const at::Tensor& t, at::ScalarType st) { return t.to(st).contiguous(); }

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

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace ik_fast_cuda
