// sdecor::native_topk_mask on CPU: the topk_mask op of the native backend (sdecor.ops.topk).
//
//   native_topk_mask(Tensor x, Tensor saliency, SymInt k, bool largest, bool shared, bool abs, str fill,
//                    float value, Tensor? baseline, int seed, int call) -> (Tensor x_masked, Tensor mask)
//
// The arguments of the triton op sdecor::topk_mask. x, saliency (N, C, *S), 0 to 3 trailing dims;
// shared: one mask (N, *S) for all channels (reduce="mean"), else a mask shaped like x
// (reduce=None). x_masked has x's dtype and memory format (contiguous, channels_last or
// channels_last_3d); the mask is a contiguous bool tensor. The result equals the torch backend's
// (sdecor.ops.topk_torch) bit for bit, except the uniform noise, which comes from Philox4x32-10
// keyed by seed and counted by (call, flat element index): reproducible from the generator and
// independent of the thread count.
//
// Per sample (at::parallel_for over N), with its score row of D = prod(S) (shared) or C * prod(S)
// values in flat index order:
//   1. scores -> order-preserving unsigned keys (-0.0 == +0.0, NaN above +inf, inverted for
//      largest), with a histogram of their top 11 bits;
//   2. the k-th smallest key t: the histogram bucket that holds it, then nth_element on the keys
//      of that bucket only;
//   3. the mask in index order: every key < t and the first (k - count(< t)) keys == t;
//   4. per channel, x_masked = mask ? fill : x.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mean.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "no_autocast.h"

namespace sdecor {
namespace {

constexpr const char* kOp = "sdecor::native_topk_mask";

enum class Fill { kZero, kConstant, kMean, kUniform, kBaseline };

Fill parse_fill(c10::string_view fill) {
  const std::string f(fill.data(), fill.size());
  if (f == "zero") return Fill::kZero;
  if (f == "constant") return Fill::kConstant;
  if (f == "mean") return Fill::kMean;
  if (f == "uniform") return Fill::kUniform;
  if (f == "baseline") return Fill::kBaseline;
  TORCH_CHECK(false, kOp, ": fill must be one of zero, constant, mean, uniform, baseline; got '", f, "'");
}

bool native_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// Checks shared by the CPU and Meta kernels (shapes only).
void check_args(const at::Tensor& x, const at::Tensor& saliency, Fill fill,
                const std::optional<at::Tensor>& baseline) {
  TORCH_CHECK(x.dim() >= 2 && x.dim() <= 5, kOp, ": x must have shape (N, C, *S) with 0 to 3 trailing dims; got ",
              x.dim(), " dimension(s)");
  TORCH_CHECK(saliency.sym_sizes() == x.sym_sizes(), kOp, ": saliency must have the shape of x ", x.sym_sizes(),
              "; got ", saliency.sym_sizes());
  TORCH_CHECK(native_dtype(x.scalar_type()), kOp, ": x must be float32, float64, bfloat16 or float16; got ",
              x.scalar_type());
  TORCH_CHECK(native_dtype(saliency.scalar_type()), kOp,
              ": saliency must be float32, float64, bfloat16 or float16; got ", saliency.scalar_type());
  if (fill == Fill::kBaseline) {
    TORCH_CHECK(baseline.has_value() && baseline->defined(), kOp, ": fill='baseline' needs a baseline tensor");
    TORCH_CHECK(baseline->sym_sizes() == x.sym_sizes(), kOp, ": baseline must have the shape of x ",
                x.sym_sizes(), "; got ", baseline->sym_sizes());
    TORCH_CHECK(baseline->is_floating_point(), kOp, ": baseline must be a floating-point tensor; got ",
                baseline->scalar_type());
  }
}

c10::MemoryFormat out_format(const at::Tensor& x) {
  // contiguous, channels_last (4-D) or channels_last_3d (5-D): like sdecor._common.like_format
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

// ---------------------------------------------------------------------------------------------------
// keys

// float -> uint32 whose unsigned order is the float order; -0.0 == +0.0, every NaN above +inf.
inline uint32_t order_key(float v) {
  if (std::isnan(v)) return 0xFFFFFFFFu;
  v += 0.0f;  // -0.0 -> +0.0
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

inline uint64_t order_key(double v) {
  if (std::isnan(v)) return ~uint64_t{0};
  v += 0.0;
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return (bits & (uint64_t{1} << 63)) ? ~bits : (bits | (uint64_t{1} << 63));
}

// scores are ranked in float32 (float64 for float64 saliency), as sdecor.ops.topk_torch does
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;
template <typename T>
using key_type = std::conditional_t<std::is_same_v<T, double>, uint64_t, uint32_t>;

constexpr int kHistBits = 11;
constexpr int kHistSize = 1 << kHistBits;

template <typename K>
constexpr int key_shift() {
  return static_cast<int>(sizeof(K)) * 8 - kHistBits;
}

// Per-thread buffers, grown on demand.
struct Work {
  std::vector<float> accf;
  std::vector<double> accd;
  std::vector<uint32_t> k32, c32;
  std::vector<uint64_t> k64, c64;
  std::array<int64_t, kHistSize> hist;
  std::array<uint32_t, 4 * kHistSize> hist4;
  std::vector<float> uf;
  std::vector<double> ud;
  std::vector<uint32_t> rnd;

  template <typename A>
  A* acc(int64_t n) {
    if constexpr (std::is_same_v<A, double>) {
      if (static_cast<int64_t>(accd.size()) < n) accd.resize(n);
      return accd.data();
    } else {
      if (static_cast<int64_t>(accf.size()) < n) accf.resize(n);
      return accf.data();
    }
  }
  template <typename K>
  std::pair<K*, K*> keys(int64_t n) {
    auto& k = [&]() -> std::vector<K>& {
      if constexpr (std::is_same_v<K, uint64_t>) return k64; else return k32;
    }();
    auto& c = [&]() -> std::vector<K>& {
      if constexpr (std::is_same_v<K, uint64_t>) return c64; else return c32;
    }();
    if (static_cast<int64_t>(k.size()) < n) k.resize(n);
    if (static_cast<int64_t>(c.size()) < n) c.resize(n);
    return {k.data(), c.data()};
  }
};

// A (N, C, P) view: element (n, c, p) at data + n * sn + c * sc + p * sp.
template <typename T>
struct View3 {
  const T* data;
  int64_t sn, sc, sp;
};

View3<void> view3(const at::Tensor& t) {
  return {t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
View3<T> typed(const View3<void>& v) {
  return {static_cast<const T*>(v.data), v.sn, v.sc, v.sp};
}

struct Problem {
  int64_t N, C, P, D, k;
  bool largest, shared, abs;
  Fill fill;
  View3<void> x, sal, base;  // (N, C, P) views; base only for fill="baseline"
  void* out_data;            // out viewed as (N, C, P)
  int64_t out_sn, out_sc, out_sp;
  bool* mask;                // (N, D) contiguous
  const void* mean;          // (N, C) contiguous, x's dtype (fill="mean")
  double value;
  uint64_t seed, call;
};

// Keys of sample n's D scores into keys[0, D).
template <typename S>
void score_keys(const Problem& pb, int64_t n, key_type<S>* keys, Work& w) {
  using A = acc_type<S>;
  const View3<S> s = typed<S>(pb.sal);
  const S* row = s.data + n * s.sn;
  const int64_t C = pb.C, P = pb.P;
  const bool abs = pb.abs, largest = pb.largest;
  auto score = [abs](S v) -> A { return abs ? std::abs(static_cast<A>(v)) : static_cast<A>(v); };
  auto key_of = [largest](A v) {
    const auto key = order_key(v);
    return largest ? ~key : key;
  };
  if (pb.shared) {
    // channel mean pinned like sdecor._common.mask_scores: accumulate channel by channel in fp32
    // (fp64), starting at channel 0, divide by C once, round to the saliency's dtype
    A* acc = w.acc<A>(P);
    for (int64_t p = 0; p < P; ++p) acc[p] = score(row[p * s.sp]);
    for (int64_t c = 1; c < C; ++c) {
      const S* r = row + c * s.sc;
      if (s.sp == 1) {
        for (int64_t p = 0; p < P; ++p) acc[p] = acc[p] + score(r[p]);
      } else {
        for (int64_t p = 0; p < P; ++p) acc[p] = acc[p] + score(r[p * s.sp]);
      }
    }
    const A Cf = static_cast<A>(C);
    for (int64_t p = 0; p < P; ++p) keys[p] = key_of(static_cast<A>(static_cast<S>(acc[p] / Cf)));
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const S* r = row + c * s.sc;
      key_type<S>* kr = keys + c * P;
      for (int64_t p = 0; p < P; ++p) kr[p] = key_of(score(r[p * s.sp]));
    }
  }
}

// Counts of the keys' top kHistBits into w.hist. Four interleaved tables: scores cluster in a few
// buckets, and runs of one bucket would otherwise wait on the previous increment of one counter.
template <typename K>
void histogram(const K* keys, int64_t D, Work& w) {
  constexpr int shift = key_shift<K>();
  uint32_t* h = w.hist4.data();
  w.hist4.fill(0);
  int64_t i = 0;
  for (; i + 4 <= D; i += 4) {
    ++h[keys[i] >> shift];
    ++h[kHistSize + (keys[i + 1] >> shift)];
    ++h[2 * kHistSize + (keys[i + 2] >> shift)];
    ++h[3 * kHistSize + (keys[i + 3] >> shift)];
  }
  for (; i < D; ++i) ++h[keys[i] >> shift];
  for (int b = 0; b < kHistSize; ++b)
    w.hist[b] = int64_t{h[b]} + h[kHistSize + b] + h[2 * kHistSize + b] + h[3 * kHistSize + b];
}

// Sample n's mask row: the k smallest keys, ties (equal keys) by lower index.
template <typename S>
void select_sample(const Problem& pb, int64_t n, Work& w) {
  using K = key_type<S>;
  bool* m = pb.mask + n * pb.D;
  const int64_t D = pb.D, k = pb.k;
  if (k == 0) {
    std::fill(m, m + D, false);
    return;
  }
  auto [keys, cand] = w.keys<K>(D);
  score_keys<S>(pb, n, keys, w);
  histogram(keys, D, w);
  // the bucket of the k-th key, and how many keys lie in the buckets below it
  int64_t below = 0;
  int bucket = 0;
  while (below + w.hist[bucket] < k) below += w.hist[bucket++];
  constexpr int shift = key_shift<K>();
  int64_t nc = 0;
  for (int64_t i = 0; i < D; ++i) {
    cand[nc] = keys[i];
    nc += static_cast<int64_t>(keys[i] >> shift) == bucket;
  }
  const int64_t rank = k - below;  // 1-based rank of t within its bucket
  std::nth_element(cand, cand + (rank - 1), cand + nc);
  const K t = cand[rank - 1];
  for (int64_t i = 0; i < nc; ++i) below += cand[i] < t;
  const int64_t room = k - below;  // how many keys == t are taken, in index order
  int64_t seen = 0;
  for (int64_t i = 0; i < D; ++i) {
    const bool eq = keys[i] == t;
    m[i] = (keys[i] < t) | (eq & (seen < room));
    seen += eq;
  }
}

// ---------------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011)

// Blocks b, ..., b + kLanes - 1 of the counter (block, c2, c3) under the key (k0, k1): out[4 j + i]
// is word i of block b + j. The lanes are independent, so the compiler runs them side by side
// (the 32 x 32 -> 64-bit products in vector registers).
constexpr int kLanes = 8;

inline void philox_lanes(int64_t b, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1, uint32_t* out) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  uint32_t x0[kLanes], x1[kLanes], x2[kLanes], x3[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    const uint64_t block = static_cast<uint64_t>(b) + j;
    x0[j] = static_cast<uint32_t>(block);
    x1[j] = static_cast<uint32_t>(block >> 32);
    x2[j] = c2;
    x3[j] = c3;
  }
  for (int r = 0; r < 10; ++r) {
    for (int j = 0; j < kLanes; ++j) {
      const uint64_t p0 = static_cast<uint64_t>(M0) * x0[j];
      const uint64_t p1 = static_cast<uint64_t>(M1) * x2[j];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ x1[j] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ x3[j] ^ k1;
      x1[j] = static_cast<uint32_t>(p1);
      x3[j] = static_cast<uint32_t>(p0);
      x0[j] = n0;
      x2[j] = n2;
    }
    k0 += W0;
    k1 += W1;
  }
  for (int j = 0; j < kLanes; ++j) {
    out[4 * j] = x0[j];
    out[4 * j + 1] = x1[j];
    out[4 * j + 2] = x2[j];
    out[4 * j + 3] = x3[j];
  }
}

// u in [0, 1) for flat elements [first, first + len): float (24 bits of one word) or double (53 bits of
// two words). Block b of the counter (b, call) gives elements 4b..4b+3 (float) or 2b, 2b+1 (double).
template <typename A>
void uniforms(const Problem& pb, int64_t first, int64_t len, A* u, Work& w) {
  constexpr int per = std::is_same_v<A, double> ? 2 : 4;
  const int64_t b0 = first / per, b1 = (first + len - 1) / per + 1;
  const int64_t groups = (b1 - b0 + kLanes - 1) / kLanes;  // the last one may run past b1: unused
  if (static_cast<int64_t>(w.rnd.size()) < 4 * kLanes * groups) w.rnd.resize(4 * kLanes * groups);
  uint32_t* r = w.rnd.data();
  const uint32_t k0 = static_cast<uint32_t>(pb.seed), k1 = static_cast<uint32_t>(pb.seed >> 32);
  const uint32_t c2 = static_cast<uint32_t>(pb.call), c3 = static_cast<uint32_t>(pb.call >> 32);
  for (int64_t g = 0; g < groups; ++g) philox_lanes(b0 + g * kLanes, c2, c3, k0, k1, r + 4 * kLanes * g);
  const int64_t skip = first - b0 * per;
  for (int64_t i = 0; i < len; ++i) {
    const int64_t j = skip + i;
    if constexpr (std::is_same_v<A, double>) {
      const uint64_t bits = (static_cast<uint64_t>(r[2 * j]) << 32 | r[2 * j + 1]) >> 11;
      u[i] = static_cast<double>(bits) * 0x1.0p-53;
    } else {
      u[i] = static_cast<float>(r[j] >> 8) * 0x1.0p-24f;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// fill

// 1024 noise values per step: a few KiB of buffers per thread
constexpr int64_t kNoiseChunk = 1024;

// m ? fill : keep on the bits, without a branch: a random mask would mispredict half the time, and
// the select vectorises (zero fill at (16, 3, 224, 224), ratio 0.5: 15 ms -> 3 ms on one core).
template <typename T>
inline T blend(bool m, T fill, T keep) {
  using U = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
  static_assert(sizeof(T) == sizeof(U));
  U f, k;
  std::memcpy(&f, &fill, sizeof(U));
  std::memcpy(&k, &keep, sizeof(U));
  const U sel = static_cast<U>(-static_cast<U>(m));
  const U r = static_cast<U>((f & sel) | (k & ~sel));
  T out;
  std::memcpy(&out, &r, sizeof(U));
  return out;
}

// Channel c of sample n. Unit: x, out (and baseline) rows are contiguous, spelled out so that the
// loops vectorise; otherwise each tensor's own stride.
template <typename T, bool Unit>
void fill_row(const Problem& pb, int64_t n, int64_t c, const bool* m, Work& w) {
  using A = acc_type<T>;
  const View3<T> x = typed<T>(pb.x);
  const int64_t xs = Unit ? 1 : x.sp, os = Unit ? 1 : pb.out_sp;
  const T* xr = x.data + n * x.sn + c * x.sc;
  T* o = static_cast<T*>(pb.out_data) + n * pb.out_sn + c * pb.out_sc;
  const int64_t P = pb.P;
  auto write = [&](auto value_at) {
    for (int64_t p = 0; p < P; ++p) {
      const T keep = xr[p * xs];
      const T fill = value_at(p);
      o[p * os] = blend(m[p], fill, keep);
    }
  };
  switch (pb.fill) {
    case Fill::kZero: {
      const T z = static_cast<T>(0);
      write([&](int64_t) { return z; });
      break;
    }
    case Fill::kConstant: {
      const T v = c10::Scalar(pb.value).to<T>();  // as torch.full(value, dtype=x.dtype)
      write([&](int64_t) { return v; });
      break;
    }
    case Fill::kMean: {
      const T v = static_cast<const T*>(pb.mean)[n * pb.C + c];
      write([&](int64_t) { return v; });
      break;
    }
    case Fill::kBaseline: {
      const View3<T> b = typed<T>(pb.base);
      const T* br = b.data + n * b.sn + c * b.sc;
      const int64_t bs = Unit ? 1 : b.sp;
      write([&](int64_t p) { return br[p * bs]; });
      break;
    }
    case Fill::kUniform: {
      // lo + (hi - lo) u with the per-channel min / max of x, in fp32 (fp64), as
      // sdecor._common.fill_values: hi - lo rounded to x's dtype first, then clamped to [lo, hi]
      // (lo + (hi - lo) u may round past hi) and rounded to x's dtype. NaN in the channel: NaN.
      A lo = static_cast<A>(xr[0]), hi = lo;
      for (int64_t p = 1; p < P; ++p) {
        const A v = static_cast<A>(xr[p * xs]);
        if (v < lo || std::isnan(v)) lo = std::isnan(lo) ? lo : v;
        if (v > hi || std::isnan(v)) hi = std::isnan(hi) ? hi : v;
      }
      const A span = static_cast<A>(static_cast<T>(hi - lo));
      A* u = [&]() {
        if constexpr (std::is_same_v<A, double>) {
          if (w.ud.size() < kNoiseChunk) w.ud.resize(kNoiseChunk);
          return w.ud.data();
        } else {
          if (w.uf.size() < kNoiseChunk) w.uf.resize(kNoiseChunk);
          return w.uf.data();
        }
      }();
      const int64_t flat = (n * pb.C + c) * P;  // flat index of (n, c, 0) in x's logical order
      for (int64_t p0 = 0; p0 < P; p0 += kNoiseChunk) {
        const int64_t len = std::min(kNoiseChunk, P - p0);
        uniforms<A>(pb, flat + p0, len, u, w);
        for (int64_t i = 0; i < len; ++i) {
          const int64_t p = p0 + i;
          A v = lo + span * u[i];
          v = v < lo ? lo : v;
          v = v > hi ? hi : v;
          const T keep = xr[p * xs];
          const T fill = static_cast<T>(v);
          o[p * os] = blend(m[p], fill, keep);
        }
      }
      break;
    }
  }
}

template <typename T>
void fill_sample(const Problem& pb, int64_t n, Work& w) {
  const bool unit = pb.x.sp == 1 && pb.out_sp == 1 && (pb.fill != Fill::kBaseline || pb.base.sp == 1);
  for (int64_t c = 0; c < pb.C; ++c) {
    const bool* m = pb.mask + n * pb.D + (pb.shared ? 0 : c * pb.P);
    if (unit)
      fill_row<T, true>(pb, n, c, m, w);
    else
      fill_row<T, false>(pb, n, c, m, w);
  }
}

using SampleFn = void (*)(const Problem&, int64_t, Work&);

template <template <typename> class F>
SampleFn pick(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return &F<float>::run;
    case at::kDouble: return &F<double>::run;
    case at::kBFloat16: return &F<c10::BFloat16>::run;
    case at::kHalf: return &F<c10::Half>::run;
    default: TORCH_CHECK(false, kOp, ": unsupported dtype ", t);
  }
}

template <typename S>
struct Select {
  static void run(const Problem& pb, int64_t n, Work& w) { select_sample<S>(pb, n, w); }
};
template <typename T>
struct FillSample {
  static void run(const Problem& pb, int64_t n, Work& w) { fill_sample<T>(pb, n, w); }
};

// ---------------------------------------------------------------------------------------------------
// kernels

std::tuple<at::Tensor, at::Tensor> native_topk_mask_cpu(const at::Tensor& x, const at::Tensor& saliency, int64_t k,
                                                        bool largest, bool shared, bool abs, c10::string_view fill_name,
                                                        double value, const std::optional<at::Tensor>& baseline,
                                                        int64_t seed, int64_t call) {
  const Fill fill = parse_fill(fill_name);
  check_args(x, saliency, fill, baseline);
  TORCH_CHECK(x.device().is_cpu() && saliency.device().is_cpu(), kOp, " (CPU): x and saliency must be CPU tensors");
  const int64_t N = x.size(0), C = x.size(1);
  int64_t P = 1;
  for (int64_t d = 2; d < x.dim(); ++d) P *= x.size(d);
  const int64_t D = shared ? P : C * P;
  TORCH_CHECK(!(shared && C == 0), kOp, ": shared (reduce='mean') needs at least one channel");
  TORCH_CHECK(k >= 0 && k <= D, kOp, ": k must be in [0, ", D, "]; got ", k);
  // 32-bit histogram counts (each of four tables counts a quarter of a row)
  TORCH_CHECK(D < (int64_t{1} << 33), kOp, ": at most 2^33 scores per sample; got ", D);

  const c10::MemoryFormat fmt = out_format(x);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  std::vector<int64_t> mask_sizes = x.sizes().vec();
  if (shared) mask_sizes.erase(mask_sizes.begin() + 1);
  at::Tensor mask = at::empty(mask_sizes, x.options().dtype(at::kBool));
  if (N == 0 || C == 0 || P == 0) return {out, mask};

  // (N, C, P) views: the trailing dims merge in both memory formats
  const at::Tensor xv = x.contiguous(fmt).view({N, C, P});
  const at::Tensor sv = saliency.contiguous(out_format(saliency)).view({N, C, P});
  at::Tensor bv, mean;
  if (fill == Fill::kBaseline) bv = baseline->to(x.scalar_type()).contiguous(fmt).view({N, C, P});
  if (fill == Fill::kMean) {
    // torch's own mean of x over S, as the torch backend's fill (no trailing dims: x itself)
    std::vector<int64_t> dims(x.dim() - 2);
    std::iota(dims.begin(), dims.end(), int64_t{2});
    mean = (x.dim() > 2 ? at::mean(x, dims) : x).contiguous();
  }

  Problem pb;
  pb.N = N;
  pb.C = C;
  pb.P = P;
  pb.D = D;
  pb.k = k;
  pb.largest = largest;
  pb.shared = shared;
  pb.abs = abs;
  pb.fill = fill;
  pb.x = view3(xv);
  pb.sal = view3(sv);
  pb.base = bv.defined() ? view3(bv) : View3<void>{nullptr, 0, 0, 0};
  const at::Tensor ov = out.view({N, C, P});
  pb.out_data = ov.mutable_data_ptr();
  pb.out_sn = ov.stride(0);
  pb.out_sc = ov.stride(1);
  pb.out_sp = ov.stride(2);
  pb.mask = mask.mutable_data_ptr<bool>();
  pb.mean = mean.defined() ? mean.const_data_ptr() : nullptr;
  pb.value = value;
  pb.seed = static_cast<uint64_t>(seed);
  pb.call = static_cast<uint64_t>(call);

  const SampleFn select = pick<Select>(saliency.scalar_type());
  const SampleFn fill_fn = pick<FillSample>(x.scalar_type());
  // a sample per task, at least ~32k elements of x per task
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C * P));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    Work w;
    for (int64_t n = begin; n < end; ++n) {
      select(pb, n, w);
      fill_fn(pb, n, w);
    }
  });
  return {out, mask};
}

std::tuple<at::Tensor, at::Tensor> native_topk_mask_meta(const at::Tensor& x, const at::Tensor& saliency,
                                                         c10::SymInt k, bool largest, bool shared, bool abs,
                                                         c10::string_view fill_name, double value,
                                                         const std::optional<at::Tensor>& baseline, int64_t seed,
                                                         int64_t call) {
  const Fill fill = parse_fill(fill_name);
  check_args(x, saliency, fill, baseline);
  at::Tensor out = at::empty_symint(x.sym_sizes(), x.options().memory_format(out_format(x)));
  std::vector<c10::SymInt> mask_sizes(x.sym_sizes().begin(), x.sym_sizes().end());
  if (shared) mask_sizes.erase(mask_sizes.begin() + 1);
  at::Tensor mask = at::empty_symint(mask_sizes, x.options().dtype(at::kBool));
  return {out, mask};
}

}  // namespace
}  // namespace sdecor

// The op's gradients are registered from Python (sdecor.ops.topk, torch.library.register_autograd):
// they are torch ops, differentiable again for a double backward.
TORCH_LIBRARY_FRAGMENT(sdecor, m) {
  m.def(
      "native_topk_mask(Tensor x, Tensor saliency, SymInt k, bool largest, bool shared, bool abs, str fill, "
      "float value, Tensor? baseline, int seed, int call) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sdecor, CPU, m) { m.impl("native_topk_mask", &sdecor::native_topk_mask_cpu); }

TORCH_LIBRARY_IMPL(sdecor, Meta, m) { m.impl("native_topk_mask", &sdecor::native_topk_mask_meta); }

TORCH_LIBRARY_IMPL(sdecor, AutocastCPU, m) {
  m.impl("native_topk_mask", torch::CppFunction::makeFromBoxedFunction<&sdecor::no_autocast_boxed>());
}

TORCH_LIBRARY_IMPL(sdecor, AutocastCUDA, m) {
  m.impl("native_topk_mask", torch::CppFunction::makeFromBoxedFunction<&sdecor::no_autocast_boxed>());
}
