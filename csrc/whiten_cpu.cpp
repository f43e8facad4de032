// The native CPU kernels of group whitening and group_cov: the passes over the large tensors.
//
// Ops (torch.ops.sdecor, CPU and Meta kernels; x (N, C, *S) with d | C, any strides, float32,
// float64, bfloat16 or float16; the statistics in float64 for float64 x, else float32):
//   native_whiten_stats(x, d) -> (center, scale, inv_scale, ms, cov)
//       one read of x. center (G, d): the mean (the midrange where the mean overflows); scale (G,):
//       c = 2^e >= max |x - center| over the group, 1 <= c <= 2^126 (2^1022); ms = mean((x - center)
//       / c), cov = Sigma / c^2 (the statistics in units of c, as sdecor.ops.whiten_torch).
//   native_whiten_apply(x, d, a, center, shift) -> y = a (x - center) + shift per group
//       (a (G, d, d), center, shift (G, d)); one read of x, one write of y (x's dtype and layout).
//   native_whiten_reduce(gy, x, d, center, inv_scale) -> (sum gy (G, d), sum gy xs^T (G, d, d))
//       with xs = (x - center) / c; one read of (gy, x).
//   native_whiten_dx(gy?, x, d, center, inv_scale, b?, s2?, shift) -> dx = b gy + s2 xs + shift
//       one read of (gy, x), one write of dx (x's dtype and layout).
//
// Work is split into tasks (group, block of columns), the columns being the m = N * prod(S) samples
// of a channel in (n, s) order and a block a fixed number of them (from d only): each task gathers
// its block of x (and gy) into a cache-resident d x B buffer in the statistics dtype, does the d x d x B
// products with BLAS, and writes its partial sums to a slot of its own; the slots of a group are then
// combined in block order. The results are thus the same for any number of threads. The statistics
// of a block are taken about the block's own centre and scale and combined by the parallel-variance
// formula (Chan et al.), so that x is read once.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "no_autocast.h"

// BLAS as linked into libtorch (MKL or OpenBLAS export the Fortran symbols). Weak, so that a torch
// built without them still loads sdecor._C: the products then go through at::mm.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
// MKL: the thread count of BLAS calls made by this thread (a product inside a task runs on one thread,
// so that its result does not depend on the number of threads).
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace sdecor {
namespace {

// ---------------------------------------------------------------------------------------------------
// BLAS: C (m x n, column-major, ldc) = op(A) op(B), alpha = 1, beta = 0

template <typename T>
at::Tensor cm_transposed(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  // the column-major rows x cols matrix at p, as the row-major tensor of its transpose (cols x rows)
  return at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
          int64_t ldb, T* c, int64_t ldc, T beta) {
  const char sa = ta ? 'T' : 'N', sb = tb ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
  const T one = 1;
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&sa, &sb, &im, &in, &ik, &one, a, &ia, b, &ib, &beta, c, &ic);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&sa, &sb, &im, &in, &ik, &one, a, &ia, b, &ib, &beta, c, &ic);
      return;
    }
  }
  // C^T = op(B)^T op(A)^T (+ C^T) on row-major views
  at::Tensor at_ = ta ? cm_transposed(a, k, m, lda).t() : cm_transposed(a, m, k, lda);   // op(A)^T
  at::Tensor bt_ = tb ? cm_transposed(b, n, k, ldb).t() : cm_transposed(b, k, n, ldb);   // op(B)^T
  at::Tensor ct = cm_transposed(c, m, n, ldc);
  if (beta == T(0)) {
    at::mm_out(ct, bt_, at_);
  } else {
    ct.addmm_(bt_, at_);
  }
}

// A matrix in memory: element (i, j) at p[i * rs + j * cs], with rs == 1 or cs == 1 (a BLAS operand).
template <typename T>
struct Mat {
  const T* p;
  int64_t rs, cs;
  Mat t() const { return {p, cs, rs}; }
};

// C (m x n, element (i, j) at c[i * crs + j * ccs]) = A (m x k) B (k x n) + beta C.
template <typename T>
void mm(T* c, int64_t crs, int64_t ccs, Mat<T> a, Mat<T> b, int64_t m, int64_t n, int64_t k, T beta) {
  if (crs != 1) {                                  // row-major C: C^T = B^T A^T, column-major
    mm<T>(c, ccs, crs, b.t(), a.t(), n, m, k, beta);
    return;
  }
  const bool ta = a.rs != 1, tb = b.rs != 1;       // a row-major operand is the transpose of a column-major one
  gemm<T>(ta, tb, m, n, k, a.p, ta ? a.rs : a.cs, b.p, tb ? b.rs : b.cs, c, ccs, beta);
}

struct OneBlasThread {
  int previous = 0;
  OneBlasThread() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~OneBlasThread() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);
  }
};

// ---------------------------------------------------------------------------------------------------
// layout

// A tensor (N, C, *S) as (N, C, L): data and strides (elements).
struct View3 {
  void* data;
  int64_t N, C, L, sN, sC, sL;
};

at::Tensor flat3(const at::Tensor& t) { return t.dim() == 2 ? t.unsqueeze(2) : t.flatten(2); }

View3 view3(const at::Tensor& t3) {
  return {t3.data_ptr(), t3.size(0), t3.size(1), t3.size(2), t3.stride(0), t3.stride(1), t3.stride(2)};
}

// An output shaped like x, in x's memory format where that layout flattens to (N, C, L).
at::Tensor alloc_like(const at::Tensor& x) {
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Preserve);
  if (x.dim() > 2) {
    at::Tensor y3 = y.flatten(2);
    if (!y3.is_alias_of(y)) y = at::empty_like(x, at::MemoryFormat::Contiguous);
  }
  return y;
}

// Columns per block: a d x B buffer of 128 KiB (float32), fixed by d alone.
int64_t block_cols(int64_t d) {
  int64_t b = (int64_t{1} << 15) / std::max<int64_t>(d, 1);
  b = std::clamp<int64_t>(b, 64, 16384);
  return b / 16 * 16;
}

constexpr int64_t kAlign = 16;  // elements: 64 bytes in float32
int64_t padded(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// The blocks of columns of a group: whole samples, several per block where a sample is short
// (L < 256), else parts of one sample (at most block_cols(d) columns each), so that a block of a
// contiguous or channels_last tensor is one strided d x n matrix that BLAS reads and writes in place.
constexpr int64_t kMaxPartials = int64_t{1} << 23;

struct Plan {
  int64_t L = 1, m = 0, nb = 0, max_cols = 0;
  bool per_sample = false;
  int64_t bps = 1, Lb = 1, spb = 1;

  // parts: the size of one block's partial results (0: none), kept to kMaxPartials elements for the
  // G groups together by taking larger blocks where there would be too many
  Plan(int64_t N, int64_t L_, int64_t d, int64_t G, int64_t parts) : L(L_), m(N * L_) {
    const int64_t B = block_cols(d);
    const int64_t nb_max = parts > 0 ? std::max<int64_t>(1, kMaxPartials / (G * parts)) : INT64_MAX;
    per_sample = (L >= 256 || L >= B) && N <= nb_max;
    if (per_sample) {
      bps = std::clamp<int64_t>((L + B - 1) / B, 1, std::max<int64_t>(1, nb_max / N));
      Lb = (L + bps - 1) / bps;
      nb = N * bps;
      max_cols = Lb;
    } else {
      spb = std::max<int64_t>(1, B / std::max<int64_t>(L, 1));
      spb = std::max(spb, (N + nb_max - 1) / nb_max);
      nb = (N + spb - 1) / spb;
      max_cols = std::min(m, spb * L);
    }
  }

  // columns [j0, j1) of block b, in (n, l) order
  void block(int64_t b, int64_t& j0, int64_t& j1) const {
    if (per_sample) {
      const int64_t n = b / bps, k = b % bps;
      j0 = n * L + k * Lb;
      j1 = std::min(j0 + Lb, (n + 1) * L);
    } else {
      j0 = b * spb * L;
      j1 = std::min(m, j0 + spb * L);
    }
  }
};

// The block [j0, j1) of group g of v as a d x n matrix BLAS can use in place, when it is one: within
// one sample, in the statistics dtype, rows or columns unit-strided with a valid leading dimension.
template <typename scalar_t, typename acc_t>
bool direct(const View3& v, int64_t g, int64_t d, int64_t j0, int64_t j1, Mat<acc_t>& out) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    return false;
  } else {
    const int64_t n = j1 - j0;
    if (j0 / v.L != (j1 - 1) / v.L) return false;
    if (std::max(v.sC, v.sL) > std::numeric_limits<int>::max()) return false;   // BLAS takes int strides
    const bool rows_ok = v.sL == 1 && v.sC >= std::max<int64_t>(n, 2);
    const bool cols_ok = v.sC == 1 && v.sL >= std::max<int64_t>(d, 2);
    if (!rows_ok && !cols_ok) return false;
    const int64_t nn = j0 / v.L, l0 = j0 % v.L;
    const acc_t* p = static_cast<const acc_t*>(v.data) + nn * v.sN + g * d * v.sC + l0 * v.sL;
    out = rows_ok ? Mat<acc_t>{p, v.sC, 1} : Mat<acc_t>{p, 1, v.sL};
    return true;
  }
}

// dst[r * ldp + t] = convert(x[n, c0 + r, l]) for the block's columns [j0, j1) (t = j - j0), with
// optional per-row affine map (v - sub[r]) * mul (mul a scalar, a power of two).
template <typename scalar_t, typename acc_t>
void gather(const View3& v, int64_t c0, int64_t rows, int64_t j0, int64_t j1, acc_t* dst, int64_t ldp,
            const acc_t* sub, acc_t mul) {
  const scalar_t* base = static_cast<const scalar_t*>(v.data);
  const bool channels_inner = v.sC < v.sL;   // channels_last: the d values of a column are adjacent
  int64_t j = j0;
  while (j < j1) {
    const int64_t n = j / v.L, l0 = j % v.L;
    const int64_t len = std::min(v.L - l0, j1 - j);
    const scalar_t* src = base + n * v.sN + c0 * v.sC + l0 * v.sL;
    acc_t* out = dst + (j - j0);
    if (channels_inner) {
      for (int64_t t = 0; t < len; ++t) {
        const scalar_t* col = src + t * v.sL;
        for (int64_t r = 0; r < rows; ++r) {
          const acc_t val = static_cast<acc_t>(col[r * v.sC]);
          out[r * ldp + t] = sub ? (val - sub[r]) * mul : val;
        }
      }
    } else if (v.sL == 1) {
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* s = src + r * v.sC;
        acc_t* o = out + r * ldp;
        if (sub) {
          const acc_t sr = sub[r];
          for (int64_t t = 0; t < len; ++t) o[t] = (static_cast<acc_t>(s[t]) - sr) * mul;
        } else {
          for (int64_t t = 0; t < len; ++t) o[t] = static_cast<acc_t>(s[t]);
        }
      }
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* s = src + r * v.sC;
        acc_t* o = out + r * ldp;
        for (int64_t t = 0; t < len; ++t) {
          const acc_t val = static_cast<acc_t>(s[t * v.sL]);
          o[t] = sub ? (val - sub[r]) * mul : val;
        }
      }
    }
    j += len;
  }
}

// y[n, c0 + r, l] = convert(src[r * ldp + t]) for the block's columns.
template <typename scalar_t, typename acc_t>
void scatter(const View3& v, int64_t c0, int64_t rows, int64_t j0, int64_t j1, const acc_t* srcbuf,
             int64_t ldp) {
  scalar_t* base = static_cast<scalar_t*>(v.data);
  const bool channels_inner = v.sC < v.sL;
  int64_t j = j0;
  while (j < j1) {
    const int64_t n = j / v.L, l0 = j % v.L;
    const int64_t len = std::min(v.L - l0, j1 - j);
    scalar_t* dst = base + n * v.sN + c0 * v.sC + l0 * v.sL;
    const acc_t* in = srcbuf + (j - j0);
    if (channels_inner) {
      for (int64_t t = 0; t < len; ++t) {
        scalar_t* col = dst + t * v.sL;
        for (int64_t r = 0; r < rows; ++r) col[r * v.sC] = static_cast<scalar_t>(in[r * ldp + t]);
      }
    } else if (v.sL == 1) {
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* o = dst + r * v.sC;
        const acc_t* s = in + r * ldp;
        for (int64_t t = 0; t < len; ++t) o[t] = static_cast<scalar_t>(s[t]);
      }
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* o = dst + r * v.sC;
        const acc_t* s = in + r * ldp;
        for (int64_t t = 0; t < len; ++t) o[t * v.sL] = static_cast<scalar_t>(s[t]);
      }
    }
    j += len;
  }
}

// Sum of p[0, n) in a fixed order (8 lanes, then the lanes in order).
template <typename T>
T lane_sum(const T* p, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += p[i + k];
  for (int k = 0; i < n; ++i, ++k) acc[k] += p[i];
  T s = 0;
  for (int k = 0; k < 8; ++k) s += acc[k];
  return s;
}

// Sum of p[0], p[cs], ..., p[(n - 1) cs] in a fixed order (lane_sum where contiguous).
template <typename T>
T strided_sum(const T* p, int64_t n, int64_t cs) {
  if (cs == 1) return lane_sum(p, n);
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += p[(i + k) * cs];
  for (int k = 0; i < n; ++i, ++k) acc[k] += p[i * cs];
  T s = 0;
  for (int k = 0; k < 8; ++k) s += acc[k];
  return s;
}

// lane_sum, and the min and max, in one pass.
template <typename T>
T lane_sum_minmax(const T* p, int64_t n, T& lo, T& hi) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, l[8], h[8];
  for (int k = 0; k < 8; ++k) l[k] = std::numeric_limits<T>::infinity(), h[k] = -std::numeric_limits<T>::infinity();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) {
      const T v = p[i + k];
      acc[k] += v;
      l[k] = v < l[k] ? v : l[k];
      h[k] = v > h[k] ? v : h[k];
    }
  for (int k = 0; i < n; ++i, ++k) {
    acc[k] += p[i];
    l[k] = p[i] < l[k] ? p[i] : l[k];
    h[k] = p[i] > h[k] ? p[i] : h[k];
  }
  T s = 0;
  for (int k = 0; k < 8; ++k) s += acc[k];
  lo = l[0], hi = h[0];
  for (int k = 1; k < 8; ++k) lo = std::min(lo, l[k]), hi = std::max(hi, h[k]);
  return s;
}

// 2^e for the scale of a group whose values lie within `half` * 2 of the centre: the smallest power of
// two above 2 * half, at least 1 and at most 2^126 (2^1022), as sdecor.ops.whiten_torch does.
template <typename T>
int scale_exponent(T half) {
  const int emax = std::is_same_v<T, double> ? 1022 : 126;
  int e = 0;
  if (std::isnan(half)) return emax;
  if (std::isinf(half)) return emax;
  std::frexp(half, &e);   // half = f 2^e, 0.5 <= f < 1 (e = 0 for half = 0)
  return std::clamp(e + 1, 0, emax);
}

template <typename T>
T pow2(int e) {
  return std::ldexp(T(1), e);
}

// Scratch memory of one thread: 64-byte aligned.
template <typename T>
struct Scratch {
  c10::DataPtr ptr;
  explicit Scratch(int64_t n) : ptr(c10::GetCPUAllocator()->allocate(std::max<int64_t>(n, 1) * sizeof(T))) {}
  T* get() { return static_cast<T*>(ptr.get()); }
};

// body(buf, t, g, j0, j1) for every task t = g * nb + b (group g, columns [j0, j1) of block b), in
// parallel; each thread has `scratch` elements of its own at buf, set up by init(buf), and runs BLAS on
// one thread.
template <typename acc_t, typename Init, typename Body>
void for_each_block(const Plan& plan, int64_t G, int64_t scratch, Init init, Body body) {
  at::parallel_for(0, G * plan.nb, 1, [&](int64_t begin, int64_t end) {
    OneBlasThread one;
    Scratch<acc_t> buf(scratch);
    init(buf.get());
    for (int64_t t = begin; t < end; ++t) {
      int64_t j0, j1;
      plan.block(t % plan.nb, j0, j1);
      body(buf.get(), t, t / plan.nb, j0, j1);
    }
  });
}

template <typename acc_t>
void no_init(acc_t*) {}

// ---------------------------------------------------------------------------------------------------
// checks

int64_t check_x(const at::Tensor& x, int64_t d, const char* op) {
  TORCH_CHECK(x.dim() >= 2, "sdecor::", op, ": x must have shape (N, C, *S); got ", x.dim(), " dimension(s)");
  TORCH_CHECK(d >= 1, "sdecor::", op, ": d must be positive; got ", d);
  TORCH_CHECK(x.size(1) % d == 0, "sdecor::", op, ": d must divide the channels C; got C = ", x.size(1),
              ", d = ", d);
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, "sdecor::", op,
              ": x must be float32, float64, bfloat16 or float16; got ", t);
  TORCH_CHECK(x.device().is_cpu() || x.device().is_meta(), "sdecor::", op, ": x must be a CPU tensor; got ",
              x.device());
  return x.size(1) / d;
}

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor small(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape, const char* op,
                 const char* name) {
  TORCH_CHECK(t.sizes() == shape, "sdecor::", op, ": ", name, " must have shape ", shape, "; got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc_type(x), "sdecor::", op, ": ", name, " must be ", acc_type(x), "; got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "sdecor::", op, ": ", name, " must be on ", x.device(), "; got ",
              t.device());
  return t.contiguous();
}

// ---------------------------------------------------------------------------------------------------
// statistics

template <typename scalar_t, typename acc_t>
void stats_kernel(const at::Tensor& x3, int64_t d, at::Tensor& center, at::Tensor& scale, at::Tensor& inv,
                  at::Tensor& ms, at::Tensor& cov) {
  const View3 v = view3(x3);
  // per task: mu (d), lo (d), hi (d), s (d), S (d x d), c_b, n_b
  const int64_t rec = padded(4 * d + d * d + 2);
  const Plan plan(v.N, v.L, d, v.C / d, rec);
  const int64_t G = v.C / d, m = plan.m, nb = plan.nb, ldp = padded(plan.max_cols);
  TORCH_CHECK(ldp <= std::numeric_limits<int>::max(), "sdecor::native_whiten_stats: blocks too large for BLAS");
  Scratch<acc_t> parts(G * nb * rec);
  acc_t* P = parts.get();
  for_each_block<acc_t>(plan, G, d * ldp, no_init<acc_t>, [&](acc_t* p, int64_t t, int64_t g, int64_t j0, int64_t j1) {
    const int64_t n = j1 - j0;
    acc_t* r = P + t * rec;
    acc_t *mu = r, *lo = r + d, *hi = r + 2 * d, *s = r + 3 * d, *S = r + 4 * d, *cb = S + d * d;
    cb[1] = static_cast<acc_t>(n);
    // the rows of the block: in place (x in the statistics dtype, rows unit-strided) or gathered
    Mat<acc_t> src{};
    const bool in_place = direct<scalar_t, acc_t>(v, g, d, j0, j1, src) && src.cs == 1;
    if (!in_place) gather<scalar_t, acc_t>(v, g * d, d, j0, j1, p, ldp, nullptr, acc_t(1));
    const acc_t* rows = in_place ? src.p : p;
    const int64_t ld = in_place ? src.rs : ldp;
    acc_t half = 0;
    for (int64_t i = 0; i < d; ++i) {
      const acc_t* row = rows + i * ld;
      acc_t mean = lane_sum_minmax(row, n, lo[i], hi[i]) / static_cast<acc_t>(n);
      if (!std::isfinite(mean)) mean = acc_t(0.5) * hi[i] + acc_t(0.5) * lo[i];
      mu[i] = mean;
      half = std::max(half, std::max(acc_t(0.5) * hi[i] - acc_t(0.5) * mean, acc_t(0.5) * mean - acc_t(0.5) * lo[i]));
    }
    const int e = scale_exponent(half);
    const acc_t ic = pow2<acc_t>(-e);
    cb[0] = pow2<acc_t>(e);
    for (int64_t i = 0; i < d; ++i) {
      const acc_t* row = rows + i * ld;
      acc_t* out = p + i * ldp;
      const acc_t mi = mu[i];
      for (int64_t k = 0; k < n; ++k) out[k] = (row[k] - mi) * ic;
      s[i] = lane_sum(out, n);
    }
    // S = Xs Xs^T
    mm<acc_t>(S, d, 1, Mat<acc_t>{p, ldp, 1}, Mat<acc_t>{p, 1, ldp}, d, d, n, acc_t(0));
  });
  // combine the blocks of each group in block order
  acc_t* cen = center.data_ptr<acc_t>();
  acc_t* sc = scale.data_ptr<acc_t>();
  acc_t* isc = inv.data_ptr<acc_t>();
  acc_t* msp = ms.data_ptr<acc_t>();
  acc_t* cv = cov.data_ptr<acc_t>();
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      acc_t* mean = cen + g * d;
      acc_t* msg = msp + g * d;
      acc_t* cg = cv + g * d * d;
      const acc_t inv_m = acc_t(1) / static_cast<acc_t>(m);
      acc_t half = 0;
      for (int64_t i = 0; i < d; ++i) {
        acc_t a = 0, lo = std::numeric_limits<acc_t>::infinity(), hi = -lo;
        for (int64_t b = 0; b < nb; ++b) {
          const acc_t* r = P + (g * nb + b) * rec;
          const acc_t nn = r[4 * d + d * d + 1];
          const acc_t cb = r[4 * d + d * d];
          a += (nn * inv_m) * r[i] + (cb * inv_m) * r[3 * d + i];
          lo = std::min(lo, r[d + i]);
          hi = std::max(hi, r[2 * d + i]);
        }
        if (!std::isfinite(a)) a = acc_t(0.5) * hi + acc_t(0.5) * lo;
        mean[i] = a;
        half = std::max(half, std::max(acc_t(0.5) * hi - acc_t(0.5) * a, acc_t(0.5) * a - acc_t(0.5) * lo));
      }
      const int e = scale_exponent(half);
      const acc_t c = pow2<acc_t>(e), ic = pow2<acc_t>(-e);
      sc[g] = c;
      isc[g] = ic;
      // sums of xs = (x - mean) / c over the blocks: xs = rb xs_b + delta_b with rb = c_b / c and
      // delta_b = (mu_b - mean) / c
      for (int64_t i = 0; i < d; ++i) msg[i] = 0;
      for (int64_t k = 0; k < d * d; ++k) cg[k] = 0;
      acc_t delta[1024];
      for (int64_t b = 0; b < nb; ++b) {
        const acc_t* r = P + (g * nb + b) * rec;
        const acc_t nn = r[4 * d + d * d + 1];
        const acc_t rb = r[4 * d + d * d] * ic;
        const acc_t* s = r + 3 * d;
        const acc_t* S = r + 4 * d;
        for (int64_t i = 0; i < d; ++i) delta[i] = (r[i] - mean[i]) * ic;
        for (int64_t i = 0; i < d; ++i) {
          msg[i] += rb * s[i] + nn * delta[i];
          for (int64_t j = 0; j <= i; ++j)
            cg[i * d + j] += rb * rb * S[i * d + j] + rb * (s[i] * delta[j] + delta[i] * s[j]) + nn * delta[i] * delta[j];
        }
      }
      for (int64_t i = 0; i < d; ++i) msg[i] *= inv_m;
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j <= i; ++j) {
          const acc_t val = cg[i * d + j] * inv_m - msg[i] * msg[j];
          cg[i * d + j] = val;
          cg[j * d + i] = val;
        }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_outputs(const at::Tensor& x,
                                                                                     int64_t d) {
  const int64_t G = x.size(1) / d;
  auto o = x.options().dtype(acc_type(x));
  return {at::empty({G, d}, o), at::empty({G}, o), at::empty({G}, o), at::empty({G, d}, o),
          at::empty({G, d, d}, o)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> whiten_stats_cpu(const at::Tensor& x,
                                                                                        int64_t d) {
  check_x(x, d, "native_whiten_stats");
  TORCH_CHECK(d <= 1024, "sdecor::native_whiten_stats: d must be at most 1024; got ", d);
  auto [center, scale, inv, ms, cov] = stats_outputs(x, d);
  const at::Tensor x3 = flat3(x);
  TORCH_CHECK(x3.size(0) * x3.size(2) >= 1, "sdecor::native_whiten_stats: x must hold at least one sample per channel; got shape ",
              x.sizes());
  if (x.size(1) == 0) return {center, scale, inv, ms, cov};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "native_whiten_stats", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    stats_kernel<scalar_t, acc_t>(x3, d, center, scale, inv, ms, cov);
  });
  return {center, scale, inv, ms, cov};
}

// Meta kernels: shapes only, symbolic sizes allowed (the CPU kernels check the values).
void check_meta(const at::Tensor& x, int64_t d, const char* op) {
  TORCH_CHECK(x.dim() >= 2, "sdecor::", op, ": x must have shape (N, C, *S); got ", x.dim(), " dimension(s)");
  TORCH_CHECK(d >= 1, "sdecor::", op, ": d must be positive; got ", d);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> whiten_stats_meta(const at::Tensor& x,
                                                                                         int64_t d) {
  check_meta(x, d, "native_whiten_stats");
  const c10::SymInt G = x.sym_size(1) / d;
  auto o = x.options().dtype(acc_type(x));
  return {at::empty_symint({G, d}, o), at::empty_symint({G}, o), at::empty_symint({G}, o),
          at::empty_symint({G, d}, o), at::empty_symint({G, d, d}, o)};
}

// ---------------------------------------------------------------------------------------------------
// apply: y = a (x - center) + shift

// Ones in row d of a (d + 1) x ldp buffer: [Xc; 1] turns the shift into one more column of the product.
template <typename acc_t>
void ones_row(acc_t* p, int64_t d, int64_t ldp) {
  for (int64_t k = 0; k < ldp; ++k) p[d * ldp + k] = acc_t(1);
}

template <typename scalar_t, typename acc_t>
void apply_kernel(const at::Tensor& x3, at::Tensor& y3, int64_t d, const acc_t* aug, const acc_t* center) {
  // aug (G, d, d + 1) = [A | shift]: y = [A | shift] [x - center; 1]
  const View3 v = view3(x3), w = view3(y3);
  const Plan plan(v.N, v.L, d, v.C / d, 0);
  const int64_t G = v.C / d, ldp = padded(plan.max_cols);
  for_each_block<acc_t>(
      plan, G, (2 * d + 1) * ldp, [&](acc_t* p) { ones_row(p, d, ldp); },
      [&](acc_t* p, int64_t, int64_t g, int64_t j0, int64_t j1) {
        acc_t* q = p + (d + 1) * ldp;
        gather<scalar_t, acc_t>(v, g * d, d, j0, j1, p, ldp, center + g * d, acc_t(1));
        Mat<acc_t> out{};
        const bool in_place = direct<scalar_t, acc_t>(w, g, d, j0, j1, out);
        acc_t* c = in_place ? const_cast<acc_t*>(out.p) : q;
        mm<acc_t>(c, in_place ? out.rs : ldp, in_place ? out.cs : 1, Mat<acc_t>{aug + g * d * (d + 1), d + 1, 1},
                  Mat<acc_t>{p, ldp, 1}, d, j1 - j0, d + 1, acc_t(0));
        if (!in_place) scatter<scalar_t, acc_t>(w, g * d, d, j0, j1, q, ldp);
      });
}

at::Tensor whiten_apply_cpu(const at::Tensor& x, int64_t d, const at::Tensor& a, const at::Tensor& center,
                            const at::Tensor& shift) {
  const char* op = "native_whiten_apply";
  const int64_t G = check_x(x, d, op);
  const at::Tensor ac = small(a, x, {G, d, d}, op, "a");
  const at::Tensor cc = small(center, x, {G, d}, op, "center");
  const at::Tensor sc = small(shift, x, {G, d}, op, "shift");
  at::Tensor y = alloc_like(x);
  if (x.numel() == 0) return y;
  const at::Tensor aug = at::cat({ac, sc.unsqueeze(2)}, 2).contiguous();
  const at::Tensor x3 = flat3(x);
  at::Tensor y3 = flat3(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "native_whiten_apply", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    apply_kernel<scalar_t, acc_t>(x3, y3, d, aug.data_ptr<acc_t>(), cc.data_ptr<acc_t>());
  });
  return y;
}

at::Tensor whiten_apply_meta(const at::Tensor& x, int64_t d, const at::Tensor& a, const at::Tensor& center,
                             const at::Tensor& shift) {
  check_meta(x, d, "native_whiten_apply");
  return alloc_like(x);
}

// ---------------------------------------------------------------------------------------------------
// backward reduction: sum gy and sum gy xs^T

template <typename scalar_t, typename acc_t>
void reduce_kernel(const at::Tensor& g3, const at::Tensor& x3, int64_t d, const acc_t* center,
                   const acc_t* inv, acc_t* gsum, acc_t* gx) {
  const View3 vg = view3(g3), v = view3(x3);
  const int64_t rec = padded(d * (d + 1));
  const Plan plan(v.N, v.L, d, v.C / d, rec);
  const int64_t G = v.C / d, nb = plan.nb, ldp = padded(plan.max_cols);
  Scratch<acc_t> parts(G * nb * rec);
  acc_t* P = parts.get();
  for_each_block<acc_t>(plan, G, 2 * d * ldp, no_init<acc_t>, [&](acc_t* px, int64_t t, int64_t g, int64_t j0, int64_t j1) {
    const int64_t n = j1 - j0;
    acc_t* pg = px + d * ldp;
    gather<scalar_t, acc_t>(v, g * d, d, j0, j1, px, ldp, center + g * d, inv[g]);
    Mat<acc_t> gm{};
    if (!direct<scalar_t, acc_t>(vg, g, d, j0, j1, gm)) {
      gather<scalar_t, acc_t>(vg, g * d, d, j0, j1, pg, ldp, nullptr, acc_t(1));
      gm = Mat<acc_t>{pg, ldp, 1};
    }
    // D = Gy Xs^T (d x d; a (d + 1)-th column of ones would make the product slower than the sums),
    // s = Gy 1 by rows (in cache after the product)
    acc_t* r = P + t * rec;
    mm<acc_t>(r, d + 1, 1, gm, Mat<acc_t>{px, 1, ldp}, d, d, n, acc_t(0));
    for (int64_t i = 0; i < d; ++i) r[i * (d + 1) + d] = strided_sum(gm.p + i * gm.rs, n, gm.cs);
  });
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      acc_t* s = gsum + g * d;
      acc_t* D = gx + g * d * d;
      for (int64_t i = 0; i < d; ++i) s[i] = 0;
      for (int64_t k = 0; k < d * d; ++k) D[k] = 0;
      for (int64_t b = 0; b < nb; ++b) {
        const acc_t* r = P + (g * nb + b) * rec;
        for (int64_t i = 0; i < d; ++i) {
          for (int64_t j = 0; j < d; ++j) D[i * d + j] += r[i * (d + 1) + j];
          s[i] += r[i * (d + 1) + d];
        }
      }
    }
  });
}

void check_gy(const at::Tensor& gy, const at::Tensor& x, const char* op) {
  TORCH_CHECK(gy.sizes() == x.sizes(), "sdecor::", op, ": gy must have x's shape ", x.sizes(), "; got ", gy.sizes());
  TORCH_CHECK(gy.scalar_type() == x.scalar_type(), "sdecor::", op, ": gy must have x's dtype ", x.scalar_type(),
              "; got ", gy.scalar_type());
  TORCH_CHECK(gy.device() == x.device(), "sdecor::", op, ": gy must be on ", x.device(), "; got ", gy.device());
}

std::tuple<at::Tensor, at::Tensor> whiten_reduce_cpu(const at::Tensor& gy, const at::Tensor& x, int64_t d,
                                                     const at::Tensor& center, const at::Tensor& inv) {
  const char* op = "native_whiten_reduce";
  const int64_t G = check_x(x, d, op);
  check_gy(gy, x, op);
  const at::Tensor cc = small(center, x, {G, d}, op, "center");
  const at::Tensor ic = small(inv, x, {G}, op, "inv_scale");
  auto o = x.options().dtype(acc_type(x));
  at::Tensor gsum = at::zeros({G, d}, o), gx = at::zeros({G, d, d}, o);
  if (x.numel() == 0) return {gsum, gx};
  const at::Tensor x3 = flat3(x), g3 = flat3(gy);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "native_whiten_reduce", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    reduce_kernel<scalar_t, acc_t>(g3, x3, d, cc.data_ptr<acc_t>(), ic.data_ptr<acc_t>(), gsum.data_ptr<acc_t>(),
                                   gx.data_ptr<acc_t>());
  });
  return {gsum, gx};
}

std::tuple<at::Tensor, at::Tensor> whiten_reduce_meta(const at::Tensor& gy, const at::Tensor& x, int64_t d,
                                                      const at::Tensor& center, const at::Tensor& inv) {
  check_meta(x, d, "native_whiten_reduce");
  const c10::SymInt G = x.sym_size(1) / d;
  auto o = x.options().dtype(acc_type(x));
  return {at::empty_symint({G, d}, o), at::empty_symint({G, d, d}, o)};
}

// ---------------------------------------------------------------------------------------------------
// dx = b gy + s2 xs + shift

template <typename scalar_t, typename acc_t>
void dx_kernel(const at::Tensor* g3, const at::Tensor& x3, at::Tensor& o3, int64_t d, const acc_t* center,
               const acc_t* inv, const acc_t* aug, int64_t kk, bool use_x) {
  // dx = [s2 | shift | b] [xs; 1; gy] (kk = 2d + 1), without gy [s2 | shift] [xs; 1], without s2 shift 1:
  // one product over a buffer holding the rows it needs
  const View3 v = view3(x3), w = view3(o3);
  View3 vg{};
  if (g3 != nullptr) vg = view3(*g3);
  const Plan plan(v.N, v.L, d, v.C / d, 0);
  const int64_t G = v.C / d, ldp = padded(plan.max_cols);
  const int64_t first = use_x ? 0 : d;                   // the rows used: [first, first + kk)
  for_each_block<acc_t>(
      plan, G, (3 * d + 1) * ldp, [&](acc_t* px) { ones_row(px, d, ldp); },
      [&](acc_t* px, int64_t, int64_t g, int64_t j0, int64_t j1) {
        acc_t *pg = px + (d + 1) * ldp, *q = pg + d * ldp;
        Mat<acc_t> out{};
        const bool in_place = direct<scalar_t, acc_t>(w, g, d, j0, j1, out);
        acc_t* c = in_place ? const_cast<acc_t*>(out.p) : q;
        if (use_x) gather<scalar_t, acc_t>(v, g * d, d, j0, j1, px, ldp, center + g * d, inv[g]);
        if (g3 != nullptr) gather<scalar_t, acc_t>(vg, g * d, d, j0, j1, pg, ldp, nullptr, acc_t(1));
        mm<acc_t>(c, in_place ? out.rs : ldp, in_place ? out.cs : 1,
                  Mat<acc_t>{aug + g * d * (2 * d + 1) + first, 2 * d + 1, 1}, Mat<acc_t>{px + first * ldp, ldp, 1},
                  d, j1 - j0, kk, acc_t(0));
        if (!in_place) scatter<scalar_t, acc_t>(w, g * d, d, j0, j1, q, ldp);
      });
}

at::Tensor whiten_dx_cpu(const std::optional<at::Tensor>& gy, const at::Tensor& x, int64_t d,
                         const at::Tensor& center, const at::Tensor& inv, const std::optional<at::Tensor>& b,
                         const std::optional<at::Tensor>& s2, const at::Tensor& shift) {
  const char* op = "native_whiten_dx";
  const int64_t G = check_x(x, d, op);
  TORCH_CHECK(gy.has_value() == b.has_value(), "sdecor::", op, ": gy and b must be given together");
  if (gy.has_value()) check_gy(*gy, x, op);
  const at::Tensor cc = small(center, x, {G, d}, op, "center");
  const at::Tensor ic = small(inv, x, {G}, op, "inv_scale");
  const at::Tensor sh = small(shift, x, {G, d}, op, "shift");
  const auto o = sh.options();
  const at::Tensor bm = b.has_value() ? small(*b, x, {G, d, d}, op, "b") : at::zeros({G, d, d}, o);
  const at::Tensor s2m = s2.has_value() ? small(*s2, x, {G, d, d}, op, "s2") : at::zeros({G, d, d}, o);
  const at::Tensor aug = at::cat({s2m, sh.unsqueeze(2), bm}, 2).contiguous();   // (G, d, 2d + 1)
  const int64_t kk = s2.has_value() ? (gy.has_value() ? 2 * d + 1 : d + 1) : (gy.has_value() ? d + 1 : 1);
  at::Tensor out = alloc_like(x);
  if (x.numel() == 0) return out;
  const at::Tensor x3 = flat3(x);
  at::Tensor o3 = flat3(out);
  at::Tensor g3;
  if (gy.has_value()) g3 = flat3(*gy);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "native_whiten_dx", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    dx_kernel<scalar_t, acc_t>(gy.has_value() ? &g3 : nullptr, x3, o3, d, cc.data_ptr<acc_t>(), ic.data_ptr<acc_t>(),
                               aug.data_ptr<acc_t>(), kk, s2.has_value());
  });
  return out;
}

at::Tensor whiten_dx_meta(const std::optional<at::Tensor>& gy, const at::Tensor& x, int64_t d,
                          const at::Tensor& center, const at::Tensor& inv, const std::optional<at::Tensor>& b,
                          const std::optional<at::Tensor>& s2, const at::Tensor& shift) {
  check_meta(x, d, "native_whiten_dx");
  return alloc_like(x);
}

}  // namespace
}  // namespace sdecor

TORCH_LIBRARY_FRAGMENT(sdecor, m) {
  m.def("native_whiten_stats(Tensor x, int d) -> (Tensor center, Tensor scale, Tensor inv_scale, Tensor ms, "
        "Tensor cov)");
  m.def("native_whiten_apply(Tensor x, int d, Tensor a, Tensor center, Tensor shift) -> Tensor");
  m.def("native_whiten_reduce(Tensor gy, Tensor x, int d, Tensor center, Tensor inv_scale) -> (Tensor gsum, "
        "Tensor gx)");
  m.def("native_whiten_dx(Tensor? gy, Tensor x, int d, Tensor center, Tensor inv_scale, Tensor? b, Tensor? s2, "
        "Tensor shift) -> Tensor");
}

TORCH_LIBRARY_IMPL(sdecor, CPU, m) {
  m.impl("native_whiten_stats", &sdecor::whiten_stats_cpu);
  m.impl("native_whiten_apply", &sdecor::whiten_apply_cpu);
  m.impl("native_whiten_reduce", &sdecor::whiten_reduce_cpu);
  m.impl("native_whiten_dx", &sdecor::whiten_dx_cpu);
}

TORCH_LIBRARY_IMPL(sdecor, Meta, m) {
  m.impl("native_whiten_stats", &sdecor::whiten_stats_meta);
  m.impl("native_whiten_apply", &sdecor::whiten_apply_meta);
  m.impl("native_whiten_reduce", &sdecor::whiten_reduce_meta);
  m.impl("native_whiten_dx", &sdecor::whiten_dx_meta);
}

namespace sdecor {
namespace {

constexpr const char* kOps[] = {"native_whiten_stats", "native_whiten_apply", "native_whiten_reduce",
                                "native_whiten_dx"};

}  // namespace
}  // namespace sdecor

// Under torch.autocast the ops run on their inputs as given (no_autocast.h): statistics in the
// statistics dtype, outputs in x's dtype.
// The ops have no derivative of their own (the autograd Functions of sdecor.ops.whiten_torch and
// sdecor.ops.cov combine them): backpropagating through one directly raises.
TORCH_LIBRARY_IMPL(sdecor, Autograd, m) {
  for (const char* name : sdecor::kOps) m.impl(name, torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(sdecor, AutocastCPU, m) {
  for (const char* name : sdecor::kOps)
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&sdecor::no_autocast_boxed>());
}

TORCH_LIBRARY_IMPL(sdecor, AutocastCUDA, m) {
  for (const char* name : sdecor::kOps)
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&sdecor::no_autocast_boxed>());
}
