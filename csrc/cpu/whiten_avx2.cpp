// The whitening microkernels for AVX2 with FMA: 8 float32 / 4 float64 lanes, 16 registers. Compiled for
// that ISA by the target pragma below, whatever the flags of the build; run only where the dispatcher
// (whiten_dispatch.cpp) found the CPU and OS support for it. Includes no header with inline functions or
// templates of its own (see whiten_kernels.h).
#include "cpu/whiten_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// GCC 12's intrinsics headers warn about their own _mm*_undefined_* values
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <immintrin.h>

namespace {

// register tiles (16 registers): amm 4 x 3 = 12 accumulators + 3 vectors of x + 1 broadcast; dots
// 3 x 3 = 9 accumulators + 3 + 1 loads
constexpr int kAmmRows = 4, kAmmVecs = 3, kDotRows = 3, kDotCols = 3, kPrefetchVecs = 12;

struct F32 {
  typedef float T;
  typedef __m256 V;
  static constexpr int W = 8;
  static __m256i mask(int64_t n) {   // lanes < n all ones
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V load(const T* p) { return _mm256_loadu_ps(p); }
  static V loadn_or(const T* p, int64_t n, T fill) {
    const __m256i m = mask(n);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
  }
  static void store(T* p, V v) { _mm256_storeu_ps(p, v); }
  static bool aligned(const T* p) { return (reinterpret_cast<uintptr_t>(p) & 31) == 0; }
  static void stream(T* p, V v) { _mm256_stream_ps(p, v); }
  static void fence() { _mm_sfence(); }
  static void prefetch(const T* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
  static void prefetch_l2(const T* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1); }
  static void storen(T* p, V v, int64_t n) { _mm256_maskstore_ps(p, mask(n), v); }
  static V keepn(V v, int64_t n) { return _mm256_and_ps(v, _mm256_castsi256_ps(mask(n))); }
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(T a) { return _mm256_set1_ps(a); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static __m128 fold(V v) { return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)); }
  static T hsum(V v) {
    __m128 s = fold(v);
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
  static T hmin(V v) {
    __m128 s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_min_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_min_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
  static T hmax(V v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
  // out[c] = sum of x[c]'s lanes for 8 vectors: a transposing tree
  static void hsums8(const V* x, T* out, int cnt) {
    V w[4];
    for (int k = 0; k < 4; ++k)   // 256 -> 128: half 0 holds x[2k], half 1 x[2k + 1]
      w[k] = _mm256_add_ps(_mm256_permute2f128_ps(x[2 * k], x[2 * k + 1], 0x20),
                           _mm256_permute2f128_ps(x[2 * k], x[2 * k + 1], 0x31));
    const V s0 = _mm256_add_ps(_mm256_unpacklo_ps(w[0], w[1]), _mm256_unpackhi_ps(w[0], w[1]));
    const V s1 = _mm256_add_ps(_mm256_unpacklo_ps(w[2], w[3]), _mm256_unpackhi_ps(w[2], w[3]));
    // lane 4q + t: the sum of x[q + 2t]
    const V r = _mm256_add_ps(_mm256_shuffle_ps(s0, s1, 0x44), _mm256_shuffle_ps(s0, s1, 0xEE));
    storen(out, _mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)), cnt);
  }
  static void hsums(const V* v, int cnt, T* out) {
    for (int c0 = 0; c0 < cnt; c0 += 8) {
      V x[8];
      for (int c = 0; c < 8; ++c) x[c] = c0 + c < cnt ? v[c0 + c] : _mm256_setzero_ps();
      hsums8(x, out + c0, cnt - c0 < 8 ? cnt - c0 : 8);
    }
  }
};

struct F64 {
  typedef double T;
  typedef __m256d V;
  static constexpr int W = 4;
  static __m256i mask(int64_t n) { return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3)); }
  static V load(const T* p) { return _mm256_loadu_pd(p); }
  static V loadn_or(const T* p, int64_t n, T fill) {
    const __m256i m = mask(n);
    return _mm256_blendv_pd(_mm256_set1_pd(fill), _mm256_maskload_pd(p, m), _mm256_castsi256_pd(m));
  }
  static void store(T* p, V v) { _mm256_storeu_pd(p, v); }
  static bool aligned(const T* p) { return (reinterpret_cast<uintptr_t>(p) & 31) == 0; }
  static void stream(T* p, V v) { _mm256_stream_pd(p, v); }
  static void fence() { _mm_sfence(); }
  static void prefetch(const T* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
  static void prefetch_l2(const T* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1); }
  static void storen(T* p, V v, int64_t n) { _mm256_maskstore_pd(p, mask(n), v); }
  static V keepn(V v, int64_t n) { return _mm256_and_pd(v, _mm256_castsi256_pd(mask(n))); }
  static V zero() { return _mm256_setzero_pd(); }
  static V set1(T a) { return _mm256_set1_pd(a); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static V sub(V a, V b) { return _mm256_sub_pd(a, b); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V min(V a, V b) { return _mm256_min_pd(a, b); }
  static V max(V a, V b) { return _mm256_max_pd(a, b); }
  static T hsum(V v) {
    const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static T hmin(V v) {
    const __m128d s = _mm_min_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_min_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static T hmax(V v) {
    const __m128d s = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_max_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static void hsums4(const V* x, T* out, int cnt) {
    // 256 -> 128: half 0 holds x[0] (x[2]), half 1 x[1] (x[3])
    const V w0 = _mm256_add_pd(_mm256_permute2f128_pd(x[0], x[1], 0x20), _mm256_permute2f128_pd(x[0], x[1], 0x31));
    const V w1 = _mm256_add_pd(_mm256_permute2f128_pd(x[2], x[3], 0x20), _mm256_permute2f128_pd(x[2], x[3], 0x31));
    const V r = _mm256_add_pd(_mm256_unpacklo_pd(w0, w1), _mm256_unpackhi_pd(w0, w1));   // x0 x2 x1 x3
    storen(out, _mm256_permute4x64_pd(r, 0xD8), cnt);
  }
  static void hsums(const V* v, int cnt, T* out) {
    for (int c0 = 0; c0 < cnt; c0 += 4) {
      V x[4];
      for (int c = 0; c < 4; ++c) x[c] = c0 + c < cnt ? v[c0 + c] : _mm256_setzero_pd();
      hsums4(x, out + c0, cnt - c0 < 4 ? cnt - c0 : 4);
    }
  }
};

#include "cpu/whiten_kernels.inc"

const sdecor_whiten_isa kTable = {"avx2", kernels_of<F32, sdecor_whiten_kernels_f32>(),
                                  kernels_of<F64, sdecor_whiten_kernels_f64>()};

}  // namespace

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// baseline code: called on every CPU to find out whether this build has the table
extern "C" const sdecor_whiten_isa* sdecor_whiten_isa_avx2(void) { return &kTable; }

#else

extern "C" const sdecor_whiten_isa* sdecor_whiten_isa_avx2(void) { return nullptr; }

#endif
