// Deterministic GEMM for the native CUDA ops under torch.use_deterministic_algorithms(True) (see gemm_cuda.h).
//
// ik_gemm_kernel<T>: one block of 256 threads per 64 x 64 tile of C (and batch index), K in steps of 16 staged in
// shared memory (2 x 16 x 65 elements: 8.3 KB in float32), each thread a 4 x 4 micro-tile accumulated in registers in
// IEEE FFMA, in a fixed order: bit-reproducible. Operands through arbitrary strides (int64 offsets).
#include "common.cuh"
#include "gemm_cuda.h"

namespace ik_fast_cuda {

namespace {
constexpr int kGemmTile = 64;
constexpr int kGemmK = 16;
constexpr int kGemmThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
}  // namespace

template <typename T>
__global__ void __launch_bounds__(kGemmThreads)
    ik_gemm_kernel(const T* __restrict__ A, int64_t sab, int64_t sam, int64_t sak, const T* __restrict__ B, int64_t sbb,
                   int64_t sbk, int64_t sbn, T* __restrict__ C, int64_t scb, int64_t scm, int64_t scn, int M, int N,
                   int K, bool accumulate) {
  __shared__ T As[kGemmK][kGemmTile + 1];  // [k][m]
  __shared__ T Bs[kGemmK][kGemmTile + 1];  // [k][n]
  const int64_t b = blockIdx.z;
  A += b * sab;
  B += b * sbb;
  C += b * scb;
  const int m0 = blockIdx.x * kGemmTile;  // (M, the long dimension, on x: up to 2^31 - 1 blocks)
  const int n0 = blockIdx.y * kGemmTile;
  const int tm = threadIdx.x / 16;
  const int tn = threadIdx.x % 16;
  T acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = T(0);
  for (int k0 = 0; k0 < K; k0 += kGemmK) {
    for (int idx = threadIdx.x; idx < kGemmK * kGemmTile; idx += kGemmThreads) {
      const int kk = idx / kGemmTile;
      const int r = idx % kGemmTile;
      const int k = k0 + kk;
      const int m = m0 + r;
      const int n = n0 + r;
      As[kk][r] = (m < M && k < K) ? A[m * sam + k * sak] : T(0);
      Bs[kk][r] = (n < N && k < K) ? B[k * sbk + n * sbn] : T(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < kGemmK; ++kk) {
      T av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = As[kk][tm * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tn * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = m0 + tm * 4 + i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tn * 4 + j;
      if (m < M && n < N) {
        T* p = C + m * scm + n * scn;
        *p = (accumulate ? *p : T(0)) + acc[i][j];
      }
    }
  }
}

void gemm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const bool batched = out.dim() == 3;
  TORCH_CHECK(a.dim() == out.dim() && b.dim() == out.dim() && (out.dim() == 2 || batched),
              "ik_fast native CUDA: internal GEMM operands of mismatched ranks");
  if (!at::globalContext().deterministicAlgorithms()) {
    if (batched) {
      if (accumulate)
        out.baddbmm_(a, b);
      else
        at::bmm_out(out, a, b);
    } else {
      if (accumulate)
        out.addmm_(a, b);
      else
        at::mm_out(out, a, b);
    }
    return;
  }
  const int d = batched ? 1 : 0;
  const int64_t nb = batched ? out.size(0) : 1;
  const int64_t M = out.size(d), N = out.size(d + 1), K = a.size(d + 1);
  TORCH_CHECK(
      a.size(d) == M && b.size(d) == K && b.size(d + 1) == N && (!batched || (a.size(0) == nb && b.size(0) == nb)),
      "ik_fast native CUDA: internal GEMM operands of mismatched shapes ", a.sizes(), " . ", b.sizes(), " -> ",
      out.sizes());
  if (M == 0 || N == 0 || nb == 0) return;
  TORCH_CHECK(M < (int64_t(1) << 31) && N < (int64_t(1) << 31) && K < (int64_t(1) << 31) && nb <= 65535 &&
                  ceil_div(N, kGemmTile) <= 65535,
              "ik_fast native CUDA: GEMM too large for the deterministic kernel");
  const dim3 grid(static_cast<unsigned>(ceil_div(M, kGemmTile)), static_cast<unsigned>(ceil_div(N, kGemmTile)),
                  static_cast<unsigned>(nb));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "ik_gemm", [&] {
    ik_gemm_kernel<scalar_t><<<grid, kGemmThreads, 0, current_stream()>>>(
        a.data_ptr<scalar_t>(), batched ? a.stride(0) : 0, a.stride(d), a.stride(d + 1), b.data_ptr<scalar_t>(),
        batched ? b.stride(0) : 0, b.stride(d), b.stride(d + 1), out.data_ptr<scalar_t>(), batched ? out.stride(0) : 0,
        out.stride(d), out.stride(d + 1), static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), accumulate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = a.dim() == 3 ? at::empty({a.size(0), a.size(1), b.size(2)}, a.options())
                                : at::empty({a.size(0), b.size(1)}, a.options());
  gemm_into(out, a, b, false);
  return out;
}

}  // namespace ik_fast_cuda
