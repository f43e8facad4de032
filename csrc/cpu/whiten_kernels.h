// The table of CPU microkernels behind the native whitening passes (csrc/whiten_cpu.cpp), one table
// per instruction set: whiten_avx512.cpp, whiten_avx2.cpp (x86-64 only, compiled for that ISA by a
// target pragma) and whiten_portable.cpp (the baseline ISA of the build, any architecture). The
// dispatcher (whiten_dispatch.cpp) picks one at run time.
//
// Plain C declarations only: this header is included by the ISA translation units, which must not
// see any inline function or template defined outside themselves (one compiled for AVX-512 could be
// chosen by the linker for every caller).
//
// A block is d rows x n columns: row r of x at x + r * ld, its n columns (samples) contiguous.
// xs = (x - mu) * ic row-wise (the centred, scaled rows). `buf`: buf_len(d, n) elements of scratch,
// 64-byte aligned.
#pragma once

#include <stddef.h>
#include <stdint.h>

#define SDECOR_WHITEN_KERNELS(T)                                                                            \
  struct {                                                                                                   \
    /* elements of buf the kernels below need for blocks of d rows and at most n columns */               \
    int64_t (*buf_len)(int64_t d, int64_t n);                                                                \
    /* over columns [0, n): sum[r] += the row's sum, lo[r] / hi[r] = min / max with the row's least and   \
       greatest value (NaN ignored) */                                                                       \
    void (*rowstats)(const T* x, int64_t ld, int64_t rows, int64_t n, T* sum, T* lo, T* hi);               \
    /* dst[r][k] = xs[r][k] for k < n (x itself where mu is null and ic = 1), zeros to the end of its last \
       vector; sums[r] += the row's sum where sums is not null */                                        \
    void (*pack)(const T* x, int64_t ld, int64_t rows, int64_t n, const T* mu, T ic, T* dst, int64_t ldd,  \
                 T* sums);                                                                                   \
    /* acc[i * d + j] += xs_i . xs_j for j >= i, acc[d * d + i] += sum of xs_i (acc: d * d + d) */         \
    void (*syrk)(const T* x, int64_t ld, int64_t d, int64_t n, const T* mu, T ic, T* acc, T* buf);         \
    /* acc[i * d + j] += g_i . xs_j for all i, j, acc[d * d + i] += sum of g_i */                           \
    void (*gemm)(const T* g, int64_t ldg, const T* x, int64_t ldx, int64_t d, int64_t n, const T* mu, T ic, \
                 T* acc, T* buf);                                                                            \
    /* out (d x d) = acc's products (mirrored from j >= i where symmetric), sums (d) = its sums */         \
    void (*finish)(const T* acc, int64_t d, int symmetric, T* out, T* sums);                               \
    /* out[i][k] = shift[i] + sum_j mt[j * d + i] z[j][k] for i < d, k < n, z = [g; xs] (the rows given:   \
       g and/or x may be null; kk = d or 2d rows of mt, g's first); stream != 0: out written past the     \
       caches (non-temporal stores) */                                                                      \
    void (*amm)(const T* mt, const T* g, int64_t ldg, const T* x, int64_t ldx, const T* mu, T ic, int64_t d, \
                int64_t n, const T* shift, T* out, int64_t ldo, int stream, T* buf);                         \
  }

typedef SDECOR_WHITEN_KERNELS(float) sdecor_whiten_kernels_f32;
typedef SDECOR_WHITEN_KERNELS(double) sdecor_whiten_kernels_f64;

typedef struct {
  const char* name;   // "avx512", "avx2" or "portable"
  sdecor_whiten_kernels_f32 f32;
  sdecor_whiten_kernels_f64 f64;
} sdecor_whiten_isa;

#ifdef __cplusplus
extern "C" {
#endif
// The table of each ISA; null where this build has no code for it (not x86-64, or no compiler support).
const sdecor_whiten_isa* sdecor_whiten_isa_avx512(void);
const sdecor_whiten_isa* sdecor_whiten_isa_avx2(void);
const sdecor_whiten_isa* sdecor_whiten_isa_portable(void);
#ifdef __cplusplus
}
#endif
