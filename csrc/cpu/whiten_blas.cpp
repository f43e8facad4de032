// BLAS products for the native whitening passes at large d (see whiten_blas.h).
#include "cpu/whiten_blas.h"

#include <c10/util/Exception.h>

#include <limits>

// Weak: a torch without these exports still loads sdecor._C (the passes then use the microkernels).
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
// MKL: the thread count of BLAS calls made by this thread.
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace sdecor {
namespace cpu {
namespace {

int as_int(int64_t v) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), "sdecor: a BLAS dimension exceeds the int range: ", v);
  return static_cast<int>(v);
}

// column-major C (m x n) = op(A) op(B) + beta C
void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
          int64_t ldb, float* c, int64_t ldc, float beta) {
  const int im = as_int(m), in = as_int(n), ik = as_int(k), ia = as_int(lda), ib = as_int(ldb), ic = as_int(ldc);
  const float one = 1;
  sgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ia, b, &ib, &beta, c, &ic);
}

void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b,
          int64_t ldb, double* c, int64_t ldc, double beta) {
  const int im = as_int(m), in = as_int(n), ik = as_int(k), ia = as_int(lda), ib = as_int(ldb), ic = as_int(ldc);
  const double one = 1;
  dgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ia, b, &ib, &beta, c, &ic);
}

}  // namespace

bool blas_available(bool float64) { return float64 ? dgemm_ != nullptr : sgemm_ != nullptr; }

// row-major C = A B^T is column-major C^T = B A^T: B's rows are the columns of a k x n matrix (op T),
// A's rows those of a k x m one (op N)
void blas_abt(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n, int64_t k, float* c,
              int64_t ldc, float beta) {
  gemm('T', 'N', n, m, k, b, ldb, a, lda, c, ldc, beta);
}

void blas_abt(const double* a, int64_t lda, const double* b, int64_t ldb, int64_t m, int64_t n, int64_t k, double* c,
              int64_t ldc, double beta) {
  gemm('T', 'N', n, m, k, b, ldb, a, lda, c, ldc, beta);
}

// row-major C = A B is column-major C^T = B^T A^T, both operands read as stored (op N)
void blas_ab(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n, int64_t k, float* c,
             int64_t ldc, float beta) {
  gemm('N', 'N', n, m, k, b, ldb, a, lda, c, ldc, beta);
}

void blas_ab(const double* a, int64_t lda, const double* b, int64_t ldb, int64_t m, int64_t n, int64_t k, double* c,
             int64_t ldc, double beta) {
  gemm('N', 'N', n, m, k, b, ldb, a, lda, c, ldc, beta);
}

OneBlasThread::OneBlasThread() {
  if (MKL_Set_Num_Threads_Local != nullptr) previous_ = MKL_Set_Num_Threads_Local(1);
}

OneBlasThread::~OneBlasThread() {
  if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
}

}  // namespace cpu
}  // namespace sdecor
