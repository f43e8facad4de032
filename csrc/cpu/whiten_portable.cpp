// The whitening microkernels in portable C++ for the baseline ISA of the build (any architecture):
// "vectors" of 16 bytes (4 float32 / 2 float64 lanes). GCC and clang vector types where the compiler has them (SSE2 on x86-64, NEON on
// aarch64: 10-20x faster than the loops below, which GCC 12 left scalar), else arrays with element-wise
// loops (SDECOR_PORTABLE_LOOPS selects those too; csrc/check/whiten_kernels_check.cc tests them). The
// path of CPUs without AVX2 and of SDECOR_CPU_ISA=portable. No FMA at the baseline ISA: a b + c is
// rounded twice here.
#include "cpu/whiten_kernels.h"

namespace {

// register tiles for 16 vector registers (SSE2): amm 4 x 2 = 8 accumulators, gemm and syrk
// 2 x 2; portable code has no prefetch (kPrefetchVecs unused)
constexpr int kAmmRows = 4, kAmmVecs = 2, kDotRows = 2, kDotCols = 2, kPrefetchVecs = 6;

#if (defined(__GNUC__) || defined(__clang__)) && !defined(SDECOR_PORTABLE_LOOPS)
template <class Scalar, class Bits>
struct Lanes {
  typedef Scalar T;
  static constexpr int W = 16 / sizeof(Scalar);
  typedef Scalar V __attribute__((vector_size(16)));
  typedef Bits M __attribute__((vector_size(16)));
  static V load(const T* p) {
    V v;
    __builtin_memcpy(&v, p, sizeof(V));
    return v;
  }
  static void store(T* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }
  static V set1(T a) { return V{} + a; }
  static T lane(V v, int l) { return v[l]; }
  static V with_lane(V v, int l, T a) {
    v[l] = a;
    return v;
  }
  static V add(V a, V b) { return a + b; }
  static V mul(V a, V b) { return a * b; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V pick(M m, V a, V b) { return (V)(((M)a & m) | ((M)b & ~m)); }
  static V min(V a, V b) { return pick(a < b, a, b); }   // b where either is NaN, as x86's min
  static V max(V a, V b) { return pick(a > b, a, b); }
#include "cpu/whiten_portable_lanes.inc"
};

typedef Lanes<float, int32_t> F32;
typedef Lanes<double, int64_t> F64;
#else
template <class Scalar, class Bits>
struct Lanes {
  typedef Scalar T;
  static constexpr int W = 16 / sizeof(Scalar);
  struct V {
    T x[W];
  };
  static V load(const T* p) {
    V v;
    for (int l = 0; l < W; ++l) v.x[l] = p[l];
    return v;
  }
  static void store(T* p, V v) {
    for (int l = 0; l < W; ++l) p[l] = v.x[l];
  }
  static V set1(T a) {
    V v;
    for (int l = 0; l < W; ++l) v.x[l] = a;
    return v;
  }
  static T lane(V v, int l) { return v.x[l]; }
  static V with_lane(V v, int l, T a) {
    v.x[l] = a;
    return v;
  }
#define SDECOR_LANEWISE(name, expr)     \
  static V name(V a, V b) {            \
    V v;                               \
    for (int l = 0; l < W; ++l) {      \
      const T p = a.x[l], q = b.x[l];  \
      v.x[l] = expr;                   \
    }                                  \
    return v;                          \
  }
  SDECOR_LANEWISE(add, p + q)
  SDECOR_LANEWISE(mul, p * q)
  SDECOR_LANEWISE(min, p < q ? p : q)
  SDECOR_LANEWISE(max, p > q ? p : q)
#undef SDECOR_LANEWISE
  static V fma(V a, V b, V c) { return add(mul(a, b), c); }
#include "cpu/whiten_portable_lanes.inc"
};

typedef Lanes<float, int32_t> F32;
typedef Lanes<double, int64_t> F64;
#endif

#include "cpu/whiten_kernels.inc"

const sdecor_whiten_isa kTable = {"portable", kernels_of<F32, sdecor_whiten_kernels_f32>(),
                                  kernels_of<F64, sdecor_whiten_kernels_f64>()};

}  // namespace

extern "C" const sdecor_whiten_isa* sdecor_whiten_isa_portable(void) { return &kTable; }
