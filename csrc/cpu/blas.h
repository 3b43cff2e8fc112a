// Row-major GEMM on raw pointers for the CPU kernels, through the BLAS that torch itself links (MKL or OpenBLAS
// export the Fortran symbols sgemm_/dgemm_). They are declared weak: where a torch build does not export them, the
// same call goes through at::mm on borrowed tensors instead (slower for small shapes, same result).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c, const int* ldc)
    __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace ik_fast {
namespace cpu {

inline bool blas_linked() {
  return sgemm_ != nullptr && dgemm_ != nullptr;
}

template <typename T>
void gemm_fallback(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B,
                   int64_t ldb, T beta, T* C, int64_t ldc) {
  auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor a = ta ? at::from_blob(const_cast<T*>(A), {k, m}, {lda, 1}, opt).t()
                    : at::from_blob(const_cast<T*>(A), {m, k}, {lda, 1}, opt);
  at::Tensor b = tb ? at::from_blob(const_cast<T*>(B), {n, k}, {ldb, 1}, opt).t()
                    : at::from_blob(const_cast<T*>(B), {k, n}, {ldb, 1}, opt);
  at::Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opt);
  at::Tensor prod = at::mm(a, b);
  if (beta == T(0)) {
    c.copy_(prod.mul_(alpha));
  } else {
    c.mul_(beta).add_(prod, alpha);
  }
}

// C (m x n, ldc) = alpha * op(A) op(B) + beta * C, every matrix row-major; op(A) is m x k (A is k x m when ta),
// op(B) is k x n (B is n x k when tb). beta == 0 overwrites C (NaNs in C do not propagate).
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb,
          T beta, T* C, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  if (!blas_linked()) {
    gemm_fallback<T>(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  // row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, and a row-major X is the column-major X^T
  const char oa = tb ? 'T' : 'N', ob = ta ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LA = static_cast<int>(ldb), LB = static_cast<int>(lda), LC = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&oa, &ob, &M, &N, &K, &alpha, B, &LA, A, &LB, &beta, C, &LC);
  } else {
    dgemm_(&oa, &ob, &M, &N, &K, &alpha, B, &LA, A, &LB, &beta, C, &LC);
  }
}

}  // namespace cpu
}  // namespace ik_fast
