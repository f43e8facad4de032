// Check of the whitening microkernels (csrc/cpu/) against a scalar evaluation in double precision of
// what csrc/cpu/whiten_kernels.h says each computes: odd d and n (tails shorter than a vector), padded
// row strides, every combination of amm's operands. Built by tests/test_whiten_simd.py with the
// portable kernels, with and without -DSDECOR_PORTABLE_LOOPS (the array representation of compilers
// without vector types), and on x86-64 with -DSDECOR_CHECK_X86 and the AVX2 / AVX-512 kernels too,
// each checked where this CPU runs it.
// (Not part of the extension: setup.py compiles csrc/**/*.cpp and *.cu only.)
#include "../cpu/whiten_kernels.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const char* what, const char* type, int d, int n) {
  if (!ok) {
    ++failures;
    std::printf("MISMATCH %s %s d=%d n=%d\n", what, type, d, n);
  }
}

template <typename T>
bool close(T got, double want, double scale) {
  const double tol = (sizeof(T) == 4 ? 1e-5 : 1e-12) * (scale + std::fabs(want));
  return std::isfinite(static_cast<double>(got)) && std::fabs(static_cast<double>(got) - want) <= tol;
}

template <typename T, typename K>
void check(const K& k, int d, int n, unsigned seed) {
  const char* type = sizeof(T) == 4 ? "float32" : "float64";
  const int ld = n + 5;                                   // rows not a multiple of a vector apart
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal;
  std::vector<T> x(static_cast<size_t>(d) * ld), g(x.size()), mu(d), mt(2 * d * d), shift(d);
  for (auto& v : x) v = static_cast<T>(3 + 2 * normal(gen));
  for (auto& v : g) v = static_cast<T>(normal(gen));
  for (auto& v : mu) v = static_cast<T>(3 + normal(gen));
  for (auto& v : mt) v = static_cast<T>(normal(gen));
  for (auto& v : shift) v = static_cast<T>(normal(gen));
  const T ic = T(0.25);
  std::vector<T> buf(k.buf_len(d, n) + 16);
  auto xs = [&](int r, int c) { return (static_cast<double>(x[r * ld + c]) - mu[r]) * ic; };

  // rowstats, added to what is there
  std::vector<T> sum(d, T(1)), lo(d, T(1e30)), hi(d, T(-1e30));
  k.rowstats(x.data(), ld, d, n, sum.data(), lo.data(), hi.data());
  for (int r = 0; r < d; ++r) {
    double s = 1, l = 1e300, h = -1e300;
    for (int c = 0; c < n; ++c) s += x[r * ld + c], l = std::fmin(l, x[r * ld + c]), h = std::fmax(h, x[r * ld + c]);
    expect(close(sum[r], s, 5.0 * n) && lo[r] == static_cast<T>(l) && hi[r] == static_cast<T>(h), "rowstats", type, d, n);
  }

  // syrk and gemm, accumulated over two calls (the second on half the columns), then finish
  for (int sym = 1; sym >= 0; --sym) {
    std::vector<T> acc(d * d + d, T(0)), out(d * d), sums(d);
    for (int half = 0; half < 2; ++half) {
      const int m = half ? n / 2 : n;
      if (m == 0) continue;
      if (sym) {
        k.syrk(x.data(), ld, d, m, mu.data(), ic, acc.data(), buf.data());
      } else {
        k.gemm(g.data(), ld, x.data(), ld, d, m, mu.data(), ic, acc.data(), buf.data());
      }
    }
    k.finish(acc.data(), d, sym, out.data(), sums.data());
    for (int i = 0; i < d; ++i) {
      double s = 0, scale = 0;
      for (int half = 0; half < 2; ++half)
        for (int c = 0; c < (half ? n / 2 : n); ++c) s += sym ? xs(i, c) : g[i * ld + c], scale += 3;
      expect(close(sums[i], s, scale), sym ? "syrk sums" : "gemm sums", type, d, n);
      for (int j = 0; j < d; ++j) {
        double p = 0, ps = 0;
        for (int half = 0; half < 2; ++half)
          for (int c = 0; c < (half ? n / 2 : n); ++c) {
            const double a = sym ? xs(i, c) : g[i * ld + c], b = xs(j, c);
            p += a * b, ps += std::fabs(a * b);
          }
        expect(close(out[i * d + j], p, ps), sym ? "syrk" : "gemm", type, d, n);
      }
    }
  }

  // amm with g and / or x, writing only its n columns
  for (int use_g = 0; use_g < 2; ++use_g)
    for (int use_x = 0; use_x < 2; ++use_x)
      for (int stream = 0; stream < 2; ++stream) {
        std::vector<T> out(static_cast<size_t>(d) * ld, T(-7));
        k.amm(mt.data(), use_g ? g.data() : nullptr, ld, use_x ? x.data() : nullptr, ld, mu.data(), ic, d, n,
              shift.data(), out.data(), ld, stream, buf.data());
        for (int i = 0; i < d; ++i) {
          for (int c = 0; c < ld; ++c) {
            if (c >= n) {
              expect(out[i * ld + c] == T(-7), "amm wrote past n", type, d, n);
              continue;
            }
            double v = shift[i], vs = std::fabs(v);
            int row = 0;
            if (use_g)
              for (int j = 0; j < d; ++j, ++row) v += mt[row * d + i] * g[j * ld + c], vs += std::fabs(mt[row * d + i] * g[j * ld + c]);
            if (use_x)
              for (int j = 0; j < d; ++j, ++row) v += mt[row * d + i] * xs(j, c), vs += std::fabs(mt[row * d + i] * xs(j, c));
            expect(close(out[i * ld + c], v, vs), "amm", type, d, n);
          }
        }
      }
}

}  // namespace

int main() {
  std::vector<const sdecor_whiten_isa*> isas = {sdecor_whiten_isa_portable()};
#if defined(SDECOR_CHECK_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas.push_back(sdecor_whiten_isa_avx2());
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("fma"))
    isas.push_back(sdecor_whiten_isa_avx512());
#endif
  for (const sdecor_whiten_isa* isa : isas) {
    const int before = failures;
    for (int d : {1, 2, 3, 5, 7, 16, 17, 33})
      for (int n : {1, 3, 4, 5, 17, 33, 100}) {
        check<float>(isa->f32, d, n, 100u * d + n);
        check<double>(isa->f64, d, n, 200u * d + n);
      }
    std::printf("%s: %d mismatch(es)\n", isa->name, failures - before);
  }
  std::printf("%d mismatch(es)\n", failures);
  return failures != 0;
}
