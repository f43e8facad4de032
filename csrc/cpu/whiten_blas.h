// BLAS products for the native whitening passes at large d (whiten_blas.cpp): the BLAS linked into
// libtorch (MKL or OpenBLAS), found at load time. Row-major operands, one BLAS thread per call (each
// product belongs to one task: its result must not depend on the thread count).
#pragma once

#include <cstdint>

namespace sdecor {
namespace cpu {

// Whether libtorch exports the BLAS product of this dtype (float32: sgemm_, float64: dgemm_).
bool blas_available(bool float64);

// C (m x n) = A (m x k) B^T + beta C, B given as n rows of k (row-major, leading dimensions lda, ldb, ldc).
void blas_abt(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n, int64_t k, float* c,
              int64_t ldc, float beta);
void blas_abt(const double* a, int64_t lda, const double* b, int64_t ldb, int64_t m, int64_t n, int64_t k, double* c,
              int64_t ldc, double beta);

// C (m x n) = A (m x k) B (k x n) + beta C (row-major).
void blas_ab(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n, int64_t k, float* c,
             int64_t ldc, float beta);
void blas_ab(const double* a, int64_t lda, const double* b, int64_t ldb, int64_t m, int64_t n, int64_t k, double* c,
             int64_t ldc, double beta);

// While alive, BLAS calls of this thread run on one thread (MKL; OpenBLAS does so inside a parallel region).
class OneBlasThread {
 public:
  OneBlasThread();
  ~OneBlasThread();
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace cpu
}  // namespace sdecor
