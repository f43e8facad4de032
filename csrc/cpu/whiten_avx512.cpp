// The whitening microkernels for AVX-512 (F, BW, VL) with FMA: 16 float32 / 8 float64 lanes, 32 registers.
// Compiled for that ISA by the target pragma below, whatever the flags of the build; run only where the
// dispatcher (whiten_dispatch.cpp) found the CPU and OS support for it. Includes no header with inline
// functions or templates of its own (see whiten_kernels.h).
#include "cpu/whiten_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,fma")
// GCC 12's intrinsics headers warn about their own _mm*_undefined_* values
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <immintrin.h>

namespace {

// register tiles (32 registers): amm 8 x 3 = 24 accumulators + 3 vectors of z, the entries of M broadcast
// (24 FMAs per 3 loads and 8 broadcasts); syrk / gemm 6 x 4 = 24 accumulators + 4 + 1 rows (24 FMAs per
// 10 loads: a 4 x 4 tile's 16 per 8 ran at 1.4 FMAs per cycle, load-bound, data in L1)
constexpr int kAmmRows = 8, kAmmVecs = 3, kDotRows = 6, kDotCols = 4, kPrefetchVecs = 6;

struct F32 {
  typedef float T;
  typedef __m512 V;
  static constexpr int W = 16;
  static __mmask16 mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static V load(const T* p) { return _mm512_loadu_ps(p); }
  static V loadn_or(const T* p, int64_t n, T fill) { return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), mask(n), p); }
  static void store(T* p, V v) { _mm512_storeu_ps(p, v); }
  static bool aligned(const T* p) { return (reinterpret_cast<uintptr_t>(p) & 63) == 0; }
  static void stream(T* p, V v) { _mm512_stream_ps(p, v); }
  static void fence() { _mm_sfence(); }
  static void prefetch(const T* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
  static void prefetch_l2(const T* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1); }
  static void storen(T* p, V v, int64_t n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static V keepn(V v, int64_t n) { return _mm512_maskz_mov_ps(mask(n), v); }
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(T a) { return _mm512_set1_ps(a); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static T hsum(V v) { return _mm512_reduce_add_ps(v); }
  static T hmin(V v) { return _mm512_reduce_min_ps(v); }
  static T hmax(V v) { return _mm512_reduce_max_ps(v); }
  // out[c] = sum of v[c]'s lanes, c < cnt <= 16: a transposing tree, 46 instructions for 16 sums
  static void hsums(const V* v, int cnt, T* out) {
    V x[16];
    for (int c = 0; c < 16; ++c) x[c] = c < cnt ? v[c] : _mm512_setzero_ps();
    V w[8], u[4];
    for (int k = 0; k < 8; ++k)   // 512 -> 256 bits: quarters 0, 1 hold x[2k], 2, 3 hold x[2k + 1]
      w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0x44),
                           _mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0xEE));
    for (int k = 0; k < 4; ++k)   // 256 -> 128: quarter q holds x[4k + q]
      u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0x88),
                           _mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0xDD));
    const V s0 = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1]));
    const V s1 = _mm512_add_ps(_mm512_unpacklo_ps(u[2], u[3]), _mm512_unpackhi_ps(u[2], u[3]));
    // lane 4q + t: the sum of x[q + 4t]
    const V r = _mm512_add_ps(_mm512_shuffle_ps(s0, s1, 0x44), _mm512_shuffle_ps(s0, s1, 0xEE));
    const V o = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
    _mm512_mask_storeu_ps(out, mask(cnt), o);
  }
};

struct F64 {
  typedef double T;
  typedef __m512d V;
  static constexpr int W = 8;
  static __mmask8 mask(int64_t n) { return static_cast<__mmask8>((1u << n) - 1u); }
  static V load(const T* p) { return _mm512_loadu_pd(p); }
  static V loadn_or(const T* p, int64_t n, T fill) { return _mm512_mask_loadu_pd(_mm512_set1_pd(fill), mask(n), p); }
  static void store(T* p, V v) { _mm512_storeu_pd(p, v); }
  static bool aligned(const T* p) { return (reinterpret_cast<uintptr_t>(p) & 63) == 0; }
  static void stream(T* p, V v) { _mm512_stream_pd(p, v); }
  static void fence() { _mm_sfence(); }
  static void prefetch(const T* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
  static void prefetch_l2(const T* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1); }
  static void storen(T* p, V v, int64_t n) { _mm512_mask_storeu_pd(p, mask(n), v); }
  static V keepn(V v, int64_t n) { return _mm512_maskz_mov_pd(mask(n), v); }
  static V zero() { return _mm512_setzero_pd(); }
  static V set1(T a) { return _mm512_set1_pd(a); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static V sub(V a, V b) { return _mm512_sub_pd(a, b); }
  static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V min(V a, V b) { return _mm512_min_pd(a, b); }
  static V max(V a, V b) { return _mm512_max_pd(a, b); }
  static T hsum(V v) { return _mm512_reduce_add_pd(v); }
  static T hmin(V v) { return _mm512_reduce_min_pd(v); }
  static T hmax(V v) { return _mm512_reduce_max_pd(v); }
  static void hsums8(const V* x, T* out, int cnt) {
    V w[4];
    for (int k = 0; k < 4; ++k)   // 512 -> 256: quarters 0, 1 hold x[2k], 2, 3 hold x[2k + 1]
      w[k] = _mm512_add_pd(_mm512_shuffle_f64x2(x[2 * k], x[2 * k + 1], 0x44),
                           _mm512_shuffle_f64x2(x[2 * k], x[2 * k + 1], 0xEE));
    const V u0 = _mm512_add_pd(_mm512_shuffle_f64x2(w[0], w[1], 0x88), _mm512_shuffle_f64x2(w[0], w[1], 0xDD));
    const V u1 = _mm512_add_pd(_mm512_shuffle_f64x2(w[2], w[3], 0x88), _mm512_shuffle_f64x2(w[2], w[3], 0xDD));
    // lane 2q + t: the sum of x[q + 4t]
    const V r = _mm512_add_pd(_mm512_unpacklo_pd(u0, u1), _mm512_unpackhi_pd(u0, u1));
    const V o = _mm512_permutexvar_pd(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), r);
    _mm512_mask_storeu_pd(out, mask(cnt), o);
  }
  static void hsums(const V* v, int cnt, T* out) {
    for (int c0 = 0; c0 < cnt; c0 += 8) {
      V x[8];
      for (int c = 0; c < 8; ++c) x[c] = c0 + c < cnt ? v[c0 + c] : _mm512_setzero_pd();
      hsums8(x, out + c0, cnt - c0 < 8 ? cnt - c0 : 8);
    }
  }
};

#include "cpu/whiten_kernels.inc"

const sdecor_whiten_isa kTable = {"avx512", kernels_of<F32, sdecor_whiten_kernels_f32>(),
                                  kernels_of<F64, sdecor_whiten_kernels_f64>()};

}  // namespace

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// baseline code: called on every CPU to find out whether this build has the table
extern "C" const sdecor_whiten_isa* sdecor_whiten_isa_avx512(void) { return &kTable; }

#else

extern "C" const sdecor_whiten_isa* sdecor_whiten_isa_avx512(void) { return nullptr; }

#endif
