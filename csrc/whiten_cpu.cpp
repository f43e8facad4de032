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
// of a channel in (n, s) order and a block a fixed number of them (from the shape only: whole samples,
// or parts of one starting on whole vectors). Tasks run block-major, so that a thread streams through
// contiguous x. A task runs register-blocked microkernels (csrc/cpu/whiten_kernels.inc) on its
// d x n block:
//   - where a channel's samples of one image lie contiguous in the statistics dtype (float32 / float64
//     NCHW-like layouts, runs of >= 16 samples), on x where it lies, one call per run (per sample);
//   - else (channels_last, other strides, bfloat16 / float16, tiny images) on the block gathered into a
//     buffer of the thread, converted to the statistics dtype; outputs then scattered back (converted).
// stats:  rowstats (sum, min, max: the one read of the block from memory) gives the block's centre and
//         power-of-two scale; syrk then takes Xs = (X - centre) / scale from cache into the upper
//         triangle of Xs Xs^T and Xs 1.
// apply:  amm, y = a (x - center) + shift, x centred in registers; y streamed past the caches when large.
// reduce: gemm, Gy Xs^T and Gy 1.
// dx:     amm over [gy; xs]: dx = [b | s2] [gy; xs] + shift.
// Above d = 128, reduce and dx pack their rows and multiply with the BLAS of libtorch instead, faster
// there (kBlasMinD); without a BLAS in libtorch they keep the microkernels.
// stats and reduce write each task's partial sums to a slot of its own, combined per group in block
// order afterwards; the results are thus the same for any number of threads. The statistics of a block
// are taken about the block's own centre and scale and combined by the parallel-variance formula (Chan
// et al.), so that x is read once.
//
// The microkernels are compiled for AVX-512, AVX2 and the build's baseline ISA in separate translation
// units (csrc/cpu/whiten_avx512.cpp, _avx2.cpp, _portable.cpp); csrc/cpu/whiten_dispatch.cpp picks one
// at run time (SDECOR_CPU_ISA, torch.ops.sdecor.set_cpu_isa). Results depend on that choice in their
// rounding only.
//
// Measured on a shared 2-core Xeon (AVX-512), x (32, 256, 28, 28) float32, 2 threads, medians of
// interleaved rounds (the BLAS version this replaced in parentheses): GroupWhitening d = 16 training
// forward + backward 1.13x BatchNorm2d's time (2.03x), eval 0.88x BatchNorm2d eval (1.47x), group_cov
// 0.83x x.clone() (2.18x); d = 64 forward + backward 1.91x the flop floor (2.63x), the five d x d x m
// products at the rate of a 2048^3 sgemm. benchmarks/cpu_passes.py times the passes.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
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

#include "cpu/whiten_blas.h"
#include "cpu/whiten_dispatch.h"
#include "cpu/whiten_kernels.h"
#include "no_autocast.h"

namespace sdecor {
namespace {

using cpu::kernels_of;

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

// Columns per block, fixed by d alone: the packed rows of syrk / gemm (2 d x B, float32) within 512 KiB
// of the 2 MiB L2. A sample of 28 x 28 stays one block up to d = 64: split in two at d = 64 (the
// earlier 128 KiB bound), its halves cost the apply pass 1.4x (misaligned halves, no streamed stores).
int64_t block_cols(int64_t d) {
  int64_t b = (int64_t{1} << 16) / std::max<int64_t>(d, 1);
  b = std::clamp<int64_t>(b, 256, 16384);
  return b / 16 * 16;
}

constexpr int64_t kAlign = 16;  // elements: 64-byte rows in float32, a multiple of every ISA's vector
int64_t padded(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// The blocks of columns of a group: whole samples, several per block where a sample is short
// (L < 256), else parts of one sample (at most block_cols(d) columns each).
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
      Lb = ((L + bps - 1) / bps + 15) / 16 * 16;   // parts start on whole vectors (aligned rows stay aligned)
      bps = (L + Lb - 1) / Lb;
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

// fn(n, l0, len, off) for each run of the columns [j0, j1) within one sample n: columns [l0, l0 + len)
// of sample n, at offset off in the block
template <typename Fn>
void for_runs(const View3& v, int64_t j0, int64_t j1, Fn fn) {
  for (int64_t j = j0; j < j1;) {
    const int64_t n = j / v.L, l0 = j % v.L, len = std::min(v.L - l0, j1 - j);
    fn(n, l0, len, j - j0);
    j += len;
  }
}

// Runs of at least this many columns are read or written where they lie, shorter ones (an (N, C)
// input, tiny images) gathered: one call per run would cost more than the copy. amm handles each
// run on its own; syrk and gemm sum each run's dot products across lanes (a horizontal sum per tile
// and run), so they take longer runs only.
constexpr int64_t kMinRunAmm = 16, kMinRunDots = 256;

// The rows of v are used in place: unit-strided runs of columns in the statistics dtype.
template <typename scalar_t, typename acc_t>
bool in_place(const View3& v, int64_t min_run) {
  return std::is_same_v<scalar_t, acc_t> && v.sL == 1 && v.L >= min_run;
}

template <typename T>
T* at_column(const View3& v, int64_t n, int64_t c, int64_t l) {
  return static_cast<T*>(v.data) + n * v.sN + c * v.sC + l * v.sL;
}

// dst[r * ldp + t] = convert(x[n, c0 + r, l]) for the block's columns [j0, j1) (t = j - j0), with
// optional per-row affine map (v - sub[r]) * mul (mul a scalar, a power of two).
// Samples shorter than this (tiny images, an (N, C) input) are gathered row by row over the block's
// whole samples (rows outer), not run by run: a run of one to a few columns costs a call and a loop per
// row. Measured on (64, 512, 1, 1) float32 d = 16, one thread: the statistics pass 1.45x and the reduce
// pass 1.65x faster. (Written back run by run: rows outer, the stores of one sample's channels, adjacent
// there, land on one line from d rows apart, and the apply pass measured 1.15x slower.)
constexpr int64_t kShortSample = 16;

// The block [j0, j1) as whole samples [n0, n1) where its samples are short (kShortSample) and it holds
// only whole ones (always so then: a block of short samples is never a part of one).
bool whole_short_samples(const View3& v, int64_t j0, int64_t j1, int64_t& n0, int64_t& n1) {
  if (v.L >= kShortSample || j0 % v.L != 0 || j1 % v.L != 0) return false;
  n0 = j0 / v.L, n1 = j1 / v.L;
  return true;
}

template <typename scalar_t, typename acc_t>
void gather(const View3& v, int64_t c0, int64_t rows, int64_t j0, int64_t j1, acc_t* dst, int64_t ldp,
            const acc_t* sub, acc_t mul) {
  const bool channels_inner = v.sC < v.sL;   // channels_last: the d values of a column are adjacent
  int64_t n0, n1;
  if (!channels_inner && whole_short_samples(v, j0, j1, n0, n1)) {
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* s = at_column<const scalar_t>(v, 0, c0 + r, 0);
      acc_t* o = dst + r * ldp;
      const acc_t sr = sub ? sub[r] : acc_t(0);
      for (int64_t n = n0; n < n1; ++n) {
        const scalar_t* p = s + n * v.sN;
        for (int64_t l = 0; l < v.L; ++l) *o++ = (static_cast<acc_t>(p[l * v.sL]) - sr) * mul;
      }
    }
    return;
  }
  for_runs(v, j0, j1, [&](int64_t n, int64_t l0, int64_t len, int64_t off) {
    const scalar_t* src = at_column<const scalar_t>(v, n, c0, l0);
    acc_t* out = dst + off;
    if (channels_inner) {
      for (int64_t t = 0; t < len; ++t) {
        const scalar_t* col = src + t * v.sL;
        for (int64_t r = 0; r < rows; ++r) {
          const acc_t val = static_cast<acc_t>(col[r * v.sC]);
          out[r * ldp + t] = sub ? (val - sub[r]) * mul : val;
        }
      }
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* s = src + r * v.sC;
        acc_t* o = out + r * ldp;
        const acc_t sr = sub ? sub[r] : acc_t(0);
        if (v.sL == 1) {
          for (int64_t t = 0; t < len; ++t) o[t] = (static_cast<acc_t>(s[t]) - sr) * mul;
        } else {
          for (int64_t t = 0; t < len; ++t) o[t] = (static_cast<acc_t>(s[t * v.sL]) - sr) * mul;
        }
      }
    }
  });
}

// y[n, c0 + r, l] = convert(src[r * ldp + t]) for the block's columns.
template <typename scalar_t, typename acc_t>
void scatter(const View3& v, int64_t c0, int64_t rows, int64_t j0, int64_t j1, const acc_t* srcbuf,
             int64_t ldp) {
  const bool channels_inner = v.sC < v.sL;
  for_runs(v, j0, j1, [&](int64_t n, int64_t l0, int64_t len, int64_t off) {
    scalar_t* dst = at_column<scalar_t>(v, n, c0, l0);
    const acc_t* in = srcbuf + off;
    if (channels_inner) {
      for (int64_t t = 0; t < len; ++t) {
        scalar_t* col = dst + t * v.sL;
        for (int64_t r = 0; r < rows; ++r) col[r * v.sC] = static_cast<scalar_t>(in[r * ldp + t]);
      }
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* o = dst + r * v.sC;
        const acc_t* s = in + r * ldp;
        for (int64_t t = 0; t < len; ++t) o[t * v.sL] = static_cast<scalar_t>(s[t]);
      }
    }
  });
}

// An operand of a task: rows [c0, c0 + rows) of v over the block's columns, used where it lies (runs
// of one sample's columns) or gathered into buf (rows x ldp, in the statistics dtype). v null: unused.
template <typename scalar_t, typename acc_t>
struct Operand {
  const View3* v = nullptr;
  int64_t c0 = 0;
  acc_t* buf = nullptr;
  int64_t ldp = 0;
  bool direct = false;

  Operand(const View3* v_, int64_t c0_, acc_t* buf_, int64_t ldp_, int64_t min_run)
      : v(v_), c0(c0_), buf(buf_), ldp(ldp_), direct(v_ != nullptr && in_place<scalar_t, acc_t>(*v_, min_run)) {}
  void gather_block(int64_t rows, int64_t j0, int64_t j1) const {
    if (v != nullptr && !direct) gather<scalar_t, acc_t>(*v, c0, rows, j0, j1, buf, ldp, nullptr, acc_t(1));
  }
  // the part at offset off of the block: columns [l0, ...) of sample n
  acc_t* at(int64_t n, int64_t l0, int64_t off) const {
    if (v == nullptr) return nullptr;
    return direct ? at_column<acc_t>(*v, n, c0, l0) : buf + off;
  }
  int64_t ld() const { return direct ? v->sC : ldp; }
};

// Outputs of at least 16 MiB are written with non-temporal stores, past the caches: a normal store
// first reads each line, and an output that size is not all in cache for its reader anyway. Measured on
// (32, 256, 28, 28) float32, one thread: the apply pass 1.3x faster (5.3 vs 6.9 ms), and apply followed
// by a sum or a relu of y still 1.1x faster (8.3 vs 9.4 ms, 10.4 vs 12.2 ms).
constexpr int64_t kStreamBytes = int64_t{1} << 24;

int streamed(const at::Tensor& out) { return out.numel() * out.element_size() >= kStreamBytes ? 1 : 0; }

// fn(n, l0, len, off) over the block's columns: per run of one sample where an operand is used in place,
// else once for the whole block (all gathered)
template <typename Fn>
void for_parts(bool runs, const View3& v, int64_t j0, int64_t j1, Fn fn) {
  if (runs) {
    for_runs(v, j0, j1, fn);
  } else {
    fn(0, 0, j1 - j0, 0);
  }
}

// The block's rows [c0, c0 + rows) of op packed into dst (rows x ldd, ldd >= the block's columns + 16):
// (x - mu) * ic, row sums added to sums where not null; gathered into dst first where op is not used
// in place (op.buf must then be dst).
template <typename scalar_t, typename acc_t, typename K>
void pack_block(const K& k, const Operand<scalar_t, acc_t>& op, int64_t rows, int64_t j0, int64_t j1, const acc_t* mu,
                acc_t ic, acc_t* dst, int64_t ldd, acc_t* sums) {
  if (op.direct) {
    for_runs(*op.v, j0, j1, [&](int64_t nn, int64_t l0, int64_t len, int64_t off) {
      k.pack(op.at(nn, l0, off), op.ld(), rows, len, mu, ic, dst + off, ldd, sums);
    });
  } else {
    op.gather_block(rows, j0, j1);
    k.pack(dst, ldd, rows, j1 - j0, mu, ic, dst, ldd, sums);
  }
}

// d above which reduce and dx multiply with BLAS (MKL's sgemm): measured on (32, 2 d, 28, 28) float32,
// one core, microkernels / BLAS time: d = 128 reduce 0.92, dx 0.90; d = 192 reduce 1.16, dx 1.13;
// d = 256 reduce 1.06, dx 1.24. (stats and apply: the microkernels as fast or faster at d = 256.)
constexpr int64_t kBlasMinD = 129;

template <typename acc_t>
bool use_blas(int64_t d) {
  return d >= kBlasMinD && cpu::blas_available(std::is_same_v<acc_t, double>);
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
// parallel; each thread has `scratch` elements of its own at buf. The tasks run block-major (all groups
// of block 0, then of block 1, ...): a thread's range of x is then one stream through memory for
// contiguous x (measured: twice the read rate of group-major order, 20 vs 9.5 GB/s on one core).
template <typename acc_t, typename Body>
void for_each_block(const Plan& plan, int64_t G, int64_t scratch, Body body) {
  at::parallel_for(0, G * plan.nb, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> buf(scratch);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t g = u % G, b = u / G;
      int64_t j0, j1;
      plan.block(b, j0, j1);
      body(buf.get(), g * plan.nb + b, g, j0, j1);
    }
  });
}

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
  const auto& k = kernels_of<acc_t>(cpu::whiten_isa());
  const View3 v = view3(x3);
  // per task: mu (d), lo (d), hi (d), s (d), S (d x d), c_b, n_b
  const int64_t rec = padded(4 * d + d * d + 2);
  const Plan plan(v.N, v.L, d, v.C / d, rec);
  const int64_t G = v.C / d, m = plan.m, nb = plan.nb, ldp = padded(plan.max_cols);
  const int64_t nk = k.buf_len(d, plan.max_cols), nacc = d * d + d;
  Scratch<acc_t> parts(G * nb * rec);
  acc_t* P = parts.get();
  for_each_block<acc_t>(plan, G, nk + nacc + d * ldp, [&](acc_t* p, int64_t t, int64_t g, int64_t j0, int64_t j1) {
    const int64_t n = j1 - j0;
    acc_t* r = P + t * rec;
    acc_t *mu = r, *lo = r + d, *hi = r + 2 * d, *s = r + 3 * d, *S = r + 4 * d, *cb = S + d * d;
    acc_t *kbuf = p, *acc = p + nk;
    const Operand<scalar_t, acc_t> X(&v, g * d, acc + nacc, ldp, kMinRunDots);
    cb[1] = static_cast<acc_t>(n);
    std::fill(mu, mu + d, acc_t(0));
    std::fill(lo, lo + d, std::numeric_limits<acc_t>::infinity());
    std::fill(hi, hi + d, -std::numeric_limits<acc_t>::infinity());
    // sums, minima and maxima: the one read of the block from memory
    X.gather_block(d, j0, j1);
    for_parts(X.direct, v, j0, j1, [&](int64_t nn, int64_t l0, int64_t len, int64_t off) {
      k.rowstats(X.at(nn, l0, off), X.ld(), d, len, mu, lo, hi);
    });
    acc_t half = 0;
    for (int64_t i = 0; i < d; ++i) {
      acc_t mean = mu[i] / static_cast<acc_t>(n);
      if (!std::isfinite(mean)) mean = acc_t(0.5) * hi[i] + acc_t(0.5) * lo[i];
      mu[i] = mean;
      half = std::max(half, std::max(acc_t(0.5) * hi[i] - acc_t(0.5) * mean, acc_t(0.5) * mean - acc_t(0.5) * lo[i]));
    }
    const int e = scale_exponent(half);
    const acc_t ic = pow2<acc_t>(-e);
    cb[0] = pow2<acc_t>(e);
    // Xs = (X - mu) / c_b, s = Xs 1, S = Xs Xs^T (the block is in cache now)
    std::fill(acc, acc + nacc, acc_t(0));
    for_parts(X.direct, v, j0, j1, [&](int64_t nn, int64_t l0, int64_t len, int64_t off) {
      k.syrk(X.at(nn, l0, off), X.ld(), d, len, mu, ic, acc, kbuf);
    });
    k.finish(acc, d, 1, S, s);
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

template <typename scalar_t, typename acc_t>
void apply_kernel(const at::Tensor& x3, at::Tensor& y3, int64_t d, const acc_t* at_, const acc_t* center,
                  const acc_t* shift) {
  // at_ (G, d, d): a transposed, the layout amm broadcasts from
  const auto& k = kernels_of<acc_t>(cpu::whiten_isa());
  const View3 v = view3(x3), w = view3(y3);
  const Plan plan(v.N, v.L, d, v.C / d, 0);
  const int64_t G = v.C / d, ldp = padded(plan.max_cols), nk = k.buf_len(d, 0);
  const int stream = streamed(y3);
  for_each_block<acc_t>(plan, G, nk + 2 * d * ldp, [&](acc_t* p, int64_t, int64_t g, int64_t j0, int64_t j1) {
    const Operand<scalar_t, acc_t> X(&v, g * d, p + nk, ldp, kMinRunAmm), Y(&w, g * d, p + nk + d * ldp, ldp, kMinRunAmm);
    X.gather_block(d, j0, j1);
    for_parts(X.direct || Y.direct, v, j0, j1, [&](int64_t nn, int64_t l0, int64_t len, int64_t off) {
      k.amm(at_ + g * d * d, nullptr, 0, X.at(nn, l0, off), X.ld(), center + g * d, acc_t(1), d, len, shift + g * d,
            Y.at(nn, l0, off), Y.ld(), Y.direct ? stream : 0, p);
    });
    if (!Y.direct) scatter<scalar_t, acc_t>(w, g * d, d, j0, j1, Y.buf, ldp);
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
  const at::Tensor at_ = ac.transpose(1, 2).contiguous();
  const at::Tensor x3 = flat3(x);
  at::Tensor y3 = flat3(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "native_whiten_apply", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    apply_kernel<scalar_t, acc_t>(x3, y3, d, at_.data_ptr<acc_t>(), cc.data_ptr<acc_t>(), sc.data_ptr<acc_t>());
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
  const auto& k = kernels_of<acc_t>(cpu::whiten_isa());
  const View3 vg = view3(g3), v = view3(x3);
  const int64_t rec = padded(d * d + d);     // per task: D (d x d), s (d)
  const Plan plan(v.N, v.L, d, v.C / d, rec);
  const int64_t G = v.C / d, nb = plan.nb, ldp = padded(plan.max_cols);
  const int64_t nk = k.buf_len(d, plan.max_cols), nacc = d * d + d, ldb = ldp + kAlign;
  const bool blas = use_blas<acc_t>(d);
  Scratch<acc_t> parts(G * nb * rec);
  acc_t* P = parts.get();
  const int64_t scratch = blas ? 2 * d * ldb : nk + nacc + 2 * d * ldp;
  for_each_block<acc_t>(plan, G, scratch, [&](acc_t* p, int64_t t, int64_t g, int64_t j0, int64_t j1) {
    acc_t *acc = p + nk, *r = P + t * rec;
    if (blas) {   // D = Gy Xs^T by BLAS on the packed rows, s = Gy 1 from the packing
      cpu::OneBlasThread one;
      acc_t *bx = p, *bg = p + d * ldb;
      std::fill(r + d * d, r + d * d + d, acc_t(0));
      pack_block(k, Operand<scalar_t, acc_t>(&v, g * d, bx, ldb, kMinRunAmm), d, j0, j1, center + g * d, inv[g], bx,
                 ldb, static_cast<acc_t*>(nullptr));
      pack_block(k, Operand<scalar_t, acc_t>(&vg, g * d, bg, ldb, kMinRunAmm), d, j0, j1,
                 static_cast<const acc_t*>(nullptr), acc_t(1), bg, ldb, r + d * d);
      cpu::blas_abt(bg, ldb, bx, ldb, d, d, j1 - j0, r, d, acc_t(0));
      return;
    }
    const Operand<scalar_t, acc_t> X(&v, g * d, acc + nacc, ldp, kMinRunDots);
    const Operand<scalar_t, acc_t> Gy(&vg, g * d, acc + nacc + d * ldp, ldp, kMinRunDots);
    X.gather_block(d, j0, j1);
    Gy.gather_block(d, j0, j1);
    // D = Gy Xs^T, s = Gy 1
    std::fill(acc, acc + nacc, acc_t(0));
    for_parts(X.direct || Gy.direct, v, j0, j1, [&](int64_t nn, int64_t l0, int64_t len, int64_t off) {
      k.gemm(Gy.at(nn, l0, off), Gy.ld(), X.at(nn, l0, off), X.ld(), d, len, center + g * d, inv[g], acc, p);
    });
    k.finish(acc, d, 0, r, r + d * d);
  });
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      acc_t* s = gsum + g * d;
      acc_t* D = gx + g * d * d;
      std::fill(s, s + d, acc_t(0));
      std::fill(D, D + d * d, acc_t(0));
      for (int64_t b = 0; b < nb; ++b) {
        const acc_t* r = P + (g * nb + b) * rec;
        for (int64_t i = 0; i < d * d; ++i) D[i] += r[i];
        for (int64_t i = 0; i < d; ++i) s[i] += r[d * d + i];
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
               const acc_t* inv, const acc_t* mt, int64_t kk, const acc_t* shift, bool use_x, const acc_t* bm,
               const acc_t* s2m) {
  // dx = [b | s2] [gy; xs] + shift: one amm over the rows used (kk = d or 2d of them, or none), mt
  // (G, kk, d) the matching columns of [b | s2] transposed
  const auto& k = kernels_of<acc_t>(cpu::whiten_isa());
  const View3 v = view3(x3), w = view3(o3);
  View3 vg{};
  if (g3 != nullptr) vg = view3(*g3);
  const Plan plan(v.N, v.L, d, v.C / d, 0);
  const int64_t G = v.C / d, ldp = padded(plan.max_cols), nk = k.buf_len(d, 0), ldb = ldp + kAlign;
  const int stream = streamed(o3);
  const bool blas = use_blas<acc_t>(d);
  for_each_block<acc_t>(plan, G, blas ? 3 * d * ldb : nk + 3 * d * ldp, [&](acc_t* p, int64_t, int64_t g, int64_t j0,
                                                                             int64_t j1) {
    if (blas) {   // dx = b Gy + s2 Xs + shift by BLAS on the packed rows
      cpu::OneBlasThread one;
      acc_t *bg = p, *bx = p + d * ldb, *bo = p + 2 * d * ldb;
      const int64_t n = j1 - j0;
      for (int64_t i = 0; i < d; ++i) std::fill(bo + i * ldb, bo + i * ldb + n, shift[g * d + i]);
      if (g3 != nullptr) {
        pack_block(k, Operand<scalar_t, acc_t>(&vg, g * d, bg, ldb, kMinRunAmm), d, j0, j1,
                   static_cast<const acc_t*>(nullptr), acc_t(1), bg, ldb, static_cast<acc_t*>(nullptr));
        cpu::blas_ab(bm + g * d * d, d, bg, ldb, d, n, d, bo, ldb, acc_t(1));
      }
      if (use_x) {
        pack_block(k, Operand<scalar_t, acc_t>(&v, g * d, bx, ldb, kMinRunAmm), d, j0, j1, center + g * d, inv[g], bx,
                   ldb, static_cast<acc_t*>(nullptr));
        cpu::blas_ab(s2m + g * d * d, d, bx, ldb, d, n, d, bo, ldb, acc_t(1));
      }
      scatter<scalar_t, acc_t>(w, g * d, d, j0, j1, bo, ldb);
      return;
    }
    acc_t* q = p + nk;
    const Operand<scalar_t, acc_t> Gy(g3 != nullptr ? &vg : nullptr, g * d, q, ldp, kMinRunAmm);
    const Operand<scalar_t, acc_t> X(use_x ? &v : nullptr, g * d, q + d * ldp, ldp, kMinRunAmm);
    const Operand<scalar_t, acc_t> Out(&w, g * d, q + 2 * d * ldp, ldp, kMinRunAmm);
    Gy.gather_block(d, j0, j1);
    X.gather_block(d, j0, j1);
    for_parts(Gy.direct || X.direct || Out.direct, v, j0, j1, [&](int64_t nn, int64_t l0, int64_t len, int64_t off) {
      k.amm(mt + g * kk * d, Gy.at(nn, l0, off), Gy.ld(), X.at(nn, l0, off), X.ld(), center + g * d, inv[g], d, len,
            shift + g * d, Out.at(nn, l0, off), Out.ld(), Out.direct ? stream : 0, p);
    });
    if (!Out.direct) scatter<scalar_t, acc_t>(w, g * d, d, j0, j1, Out.buf, ldp);
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
  const at::Tensor bm = b.has_value() ? small(*b, x, {G, d, d}, op, "b") : at::Tensor();
  const at::Tensor s2m = s2.has_value() ? small(*s2, x, {G, d, d}, op, "s2") : at::Tensor();
  std::vector<at::Tensor> cols;      // the transposed matrices, in the order of amm's rows [gy; xs]
  if (b.has_value()) cols.push_back(bm.transpose(1, 2));
  if (s2.has_value()) cols.push_back(s2m.transpose(1, 2));
  const int64_t kk = static_cast<int64_t>(cols.size()) * d;
  const at::Tensor mt = cols.empty() ? at::zeros({G, 0, d}, sh.options()) : at::cat(cols, 1).contiguous();
  at::Tensor out = alloc_like(x);
  if (x.numel() == 0) return out;
  const at::Tensor x3 = flat3(x);
  at::Tensor o3 = flat3(out);
  at::Tensor g3;
  if (gy.has_value()) g3 = flat3(*gy);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "native_whiten_dx", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    dx_kernel<scalar_t, acc_t>(gy.has_value() ? &g3 : nullptr, x3, o3, d, cc.data_ptr<acc_t>(), ic.data_ptr<acc_t>(),
                               mt.data_ptr<acc_t>(), kk, sh.data_ptr<acc_t>(), s2.has_value(),
                               bm.defined() ? bm.data_ptr<acc_t>() : nullptr,
                               s2m.defined() ? s2m.data_ptr<acc_t>() : nullptr);
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
