// Batched small-matrix symmetric eigensolver: cyclic Jacobi with parallel (round-robin) ordering.
//
// One matrix is solved by a "team". The algorithm is written once as a sequence of phases; every
// phase is a loop over independent items with disjoint writes, and phases are separated by
// team.sync(). The CUDA kernel runs a matrix per thread block (team = the block, items strided over
// threads, sync = __syncthreads, work arrays in shared memory); the CPU build runs the same phases
// with a team of one (items in order, sync = nothing). Both compute the same thing.
//
// Method (A symmetric d x d, read from the lower triangle like torch.linalg.eigh's default):
//   * A is scaled by a power of two 2^-e so that max|a_ij| lies in [0.5, 1) (exact; undone on the
//     eigenvalues), which keeps the sums of squares below from overflowing or underflowing.
//   * d is padded to even n = d + (d & 1) with a dummy index n - 1 that never rotates.
//   * A sweep is n - 1 rounds; round r pairs the indices by the circle method: (r, n-1) and
//     ((r+k) mod (n-1), (r-k) mod (n-1)) for k = 1..n/2-1. Every pair (p, q) meets once per sweep and
//     the n/2 pairs of a round are disjoint, so their rotations commute and run in parallel.
//   * Round = two phases: (1) one item per pair computes the rotation that zeroes a_pq
//     (Golub & Van Loan, symmetric Schur 2x2), skipped when |a_pq| <= eps sqrt|a_pp| sqrt|a_qq|;
//     (2) one item per 2x2 block (pair k1 rows, pair k2 columns) applies A <- J^T A J to its four
//     entries, and one item per (pair, row of V) applies V <- V J.
//   * Before each sweep: stop when off(A) <= eps * ||A||_F (relative off-diagonal threshold), when the
//     previous sweep applied no rotation, or at the sweep cap.
//   * Eigenvalues ascending (NaN last, ties by index), eigenvectors as columns, like
//     torch.linalg.eigh.
//
// V lives in the work area when it fits (V_INTERNAL) or directly in the output buffer (V_EXTERNAL:
// used on the GPU when A and V together exceed the shared memory a block may opt in to, i.e. fp64 at
// d >= 101 on sm_80 and d >= 120 on sm_90; the final permutation then copies V into A's space,
// which is free by then).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define SDECOR_HD __host__ __device__ __forceinline__
#else
#define SDECOR_HD inline
#endif

namespace sdecor {
namespace jacobi {

constexpr int kMaxDim = 128;

template <typename T>
struct Limits;

// eps: machine epsilon, used for the per-rotation skip and the relative off-diagonal threshold.
// max_sweeps: cap; well-conditioned and clustered spectra at d = 128 converge in about 8-10 sweeps.
template <>
struct Limits<float> {
  static constexpr float eps = 1.1920928955078125e-07f;
  static constexpr int max_sweeps = 24;
};
template <>
struct Limits<double> {
  static constexpr double eps = 2.220446049250313e-16;
  static constexpr int max_sweeps = 32;
};

// Work arrays of one matrix. T arrays first, then int arrays, so every array is aligned.
template <typename T>
struct Work {
  T* a;       // [d, d] row-major
  T* v;       // [d, d] row-major (V_INTERNAL only)
  T* c;       // [P] rotation cosines of the current round
  T* s;       // [P] rotation sines
  T* t;       // [P] rotation tangents
  T* lam;     // [d] eigenvalues before sorting
  T* part;    // [2d] per-row partial sums (off-diagonal, diagonal) / per-row maxima
  int* pp;    // [P] pair k of the current round is (pp[k], qq[k]), pp < qq
  int* qq;    // [P]
  int* rot;   // [P] 1 when pair k rotates this round
  int* count; // [P] rotations applied by pair slot k during the current sweep
  int* perm;  // [d] perm[k] = index of the k-th smallest eigenvalue
  int* flag;  // [3] stop flag, scale exponent, non-finite input
};

// Math by explicit precision, one spelling for host and device code.
SDECOR_HD float m_abs(float x) { return fabsf(x); }
SDECOR_HD double m_abs(double x) { return fabs(x); }
SDECOR_HD float m_max(float x, float y) { return fmaxf(x, y); }
SDECOR_HD double m_max(double x, double y) { return fmax(x, y); }
SDECOR_HD float m_sqrt(float x) { return sqrtf(x); }
SDECOR_HD double m_sqrt(double x) { return sqrt(x); }
SDECOR_HD float m_hypot(float x, float y) { return hypotf(x, y); }
SDECOR_HD double m_hypot(double x, double y) { return hypot(x, y); }
SDECOR_HD float m_ldexp(float x, int e) { return ldexpf(x, e); }
SDECOR_HD double m_ldexp(double x, int e) { return ldexp(x, e); }
SDECOR_HD int m_exponent(float x) { int e = 0; frexpf(x, &e); return e; }
SDECOR_HD int m_exponent(double x) { int e = 0; frexp(x, &e); return e; }

SDECOR_HD int padded(int d) { return d + (d & 1); }

template <typename T>
SDECOR_HD size_t workspace_bytes(int d, bool v_external) {
  const size_t P = static_cast<size_t>(padded(d) / 2);
  const size_t dd = static_cast<size_t>(d) * d;
  const size_t nt = dd * (v_external ? 1 : 2) + 3 * P + 3 * static_cast<size_t>(d);
  const size_t ni = 4 * P + static_cast<size_t>(d) + 3;
  return nt * sizeof(T) + ni * sizeof(int);
}

template <typename T>
SDECOR_HD Work<T> carve(void* base, int d, bool v_external) {
  const int P = padded(d) / 2;
  const int dd = d * d;
  Work<T> w;
  T* p = static_cast<T*>(base);
  w.a = p; p += dd;
  w.v = v_external ? nullptr : p; p += v_external ? 0 : dd;
  w.c = p; p += P;
  w.s = p; p += P;
  w.t = p; p += P;
  w.lam = p; p += d;
  w.part = p; p += 2 * d;
  int* q = reinterpret_cast<int*>(p);
  w.pp = q; q += P;
  w.qq = q; q += P;
  w.rot = q; q += P;
  w.count = q; q += P;
  w.perm = q; q += d;
  w.flag = q;
  return w;
}

// Team of one: the CPU twin.
struct SerialTeam {
  SDECOR_HD int rank() const { return 0; }
  SDECOR_HD int size() const { return 1; }
  SDECOR_HD void sync() const {}
};

// Pair k of round r for padded size n (circle method); p < q, q == n - 1 may be the dummy index.
SDECOR_HD void round_pair(int r, int k, int n, int* p, int* q) {
  const int m = n - 1;
  int i, j;
  if (k == 0) {
    i = r;
    j = m;
  } else {
    i = (r + k) % m;
    j = (r - k + m) % m;
  }
  *p = i < j ? i : j;
  *q = i < j ? j : i;
}

// Strict weak order for sorting eigenvalues ascending with NaN last.
template <typename T>
SDECOR_HD bool ascending(T a, T b) {
  return a < b || (b != b && a == a);
}

template <typename T, typename Team>
SDECOR_HD void eigh_jacobi(const Team& team, const T* in, T* evals, T* evecs, int d, const Work<T>& w,
                           bool v_external) {
  const int rank = team.rank();
  const int step = team.size();
  const int n = padded(d);
  const int P = n / 2;
  const int dd = d * d;
  const T eps = Limits<T>::eps;
  T* A = w.a;
  T* V = v_external ? evecs : w.v;

  // load the lower triangle, mirrored; V = I                                       items: d*d
  for (int i = rank; i < dd; i += step) {
    const int r = i / d, c = i - r * d;
    A[i] = r >= c ? in[i] : in[c * d + r];
    V[i] = r == c ? T(1) : T(0);
  }
  team.sync();
  // per-row max |a_rj|                                                             items: d
  for (int r = rank; r < d; r += step) {
    T m = 0;
    for (int j = 0; j < d; ++j) m = m_max(m, m_abs(A[r * d + j]));
    w.part[r] = m;
  }
  team.sync();
  // scale exponent e: max|a| = f 2^e with f in [0.5, 1)                            items: 1
  for (int i = rank; i < 1; i += step) {
    T m = 0;
    for (int r = 0; r < d; ++r) m = m_max(m, w.part[r]);
    // zero, inf or NaN: no scaling
    w.flag[1] = (m > T(0) && m - m == T(0)) ? m_exponent(m) : 0;
  }
  team.sync();
  const int e = w.flag[1];
  // A <- 2^-e A (exact); clear the per-sweep rotation counts                       items: d*d, P
  for (int i = rank; i < dd; i += step) A[i] = m_ldexp(A[i], -e);
  for (int k = rank; k < P; k += step) w.count[k] = 0;
  team.sync();

  for (int sweep = 0;; ++sweep) {
    // per-row sums of squares: off-diagonal and diagonal                           items: d
    for (int r = rank; r < d; r += step) {
      T off = 0;
      for (int j = 0; j < d; ++j) {
        const T x = A[r * d + j];
        off += j == r ? T(0) : x * x;
      }
      w.part[r] = off;
      w.part[d + r] = A[r * d + r] * A[r * d + r];
    }
    team.sync();
    // stop test; reset the rotation counts. After scaling the sums are at most d^2, so a non-finite
    // total means inf or NaN in the input: stop at once and return NaN.             items: 1
    for (int i = rank; i < 1; i += step) {
      T off = 0, diag = 0;
      for (int r = 0; r < d; ++r) {
        off += w.part[r];
        diag += w.part[d + r];
      }
      int rotated = 0;
      for (int k = 0; k < P; ++k) {
        rotated += w.count[k];
        w.count[k] = 0;
      }
      const T total = off + diag;
      const bool finite = total - total == T(0);
      w.flag[2] = !finite;
      w.flag[0] = !finite || off <= eps * eps * total || (sweep > 0 && rotated == 0) ||
                  sweep >= Limits<T>::max_sweeps;
    }
    team.sync();
    if (w.flag[0]) break;

    for (int round = 0; round < n - 1; ++round) {
      // rotation of each pair                                                      items: P
      for (int k = rank; k < P; k += step) {
        int p, q;
        round_pair(round, k, n, &p, &q);
        T c = 1, s = 0, t = 0;
        int on = 0;
        if (q < d) {
          const T apq = A[p * d + q];
          const T app = A[p * d + p], aqq = A[q * d + q];
          if (m_abs(apq) > eps * m_sqrt(m_abs(app)) * m_sqrt(m_abs(aqq))) {
            const T tau = (aqq - app) / (T(2) * apq);
            t = (tau >= T(0) ? T(1) : T(-1)) / (m_abs(tau) + m_hypot(T(1), tau));
            c = T(1) / m_sqrt(T(1) + t * t);
            s = t * c;
            on = 1;
          }
        }
        w.pp[k] = p;
        w.qq[k] = q;
        w.c[k] = c;
        w.s[k] = s;
        w.t[k] = t;
        w.rot[k] = on;
        w.count[k] += on;
      }
      team.sync();
      // A <- J^T A J by 2x2 blocks; V <- V J by rows                               items: P*P + P*d
      const int nb = P * P;
      for (int i = rank; i < nb + P * d; i += step) {
        if (i < nb) {
          const int k1 = i / P, k2 = i - k1 * P;
          if (!w.rot[k1] && !w.rot[k2]) continue;
          const int p1 = w.pp[k1], q1 = w.qq[k1], p2 = w.pp[k2], q2 = w.qq[k2];
          if (k1 == k2) {
            const T apq = A[p1 * d + q1], t = w.t[k1];
            A[p1 * d + p1] -= t * apq;
            A[q1 * d + q1] += t * apq;
            A[p1 * d + q1] = T(0);
            A[q1 * d + p1] = T(0);
            continue;
          }
          const bool vq1 = q1 < d, vq2 = q2 < d;
          const T c1 = w.c[k1], s1 = w.s[k1], c2 = w.c[k2], s2 = w.s[k2];
          const T b00 = A[p1 * d + p2];
          const T b01 = vq2 ? A[p1 * d + q2] : T(0);
          const T b10 = vq1 ? A[q1 * d + p2] : T(0);
          const T b11 = vq1 && vq2 ? A[q1 * d + q2] : T(0);
          // rows: J1^T B
          const T r00 = c1 * b00 - s1 * b10, r01 = c1 * b01 - s1 * b11;
          const T r10 = s1 * b00 + c1 * b10, r11 = s1 * b01 + c1 * b11;
          // columns: (J1^T B) J2
          A[p1 * d + p2] = c2 * r00 - s2 * r01;
          if (vq2) A[p1 * d + q2] = s2 * r00 + c2 * r01;
          if (vq1) A[q1 * d + p2] = c2 * r10 - s2 * r11;
          if (vq1 && vq2) A[q1 * d + q2] = s2 * r10 + c2 * r11;
        } else {
          const int j = i - nb;
          const int k = j / d, row = j - k * d;
          if (!w.rot[k]) continue;
          const int p = w.pp[k], q = w.qq[k];
          const T c = w.c[k], s = w.s[k];
          const T vp = V[row * d + p], vq = V[row * d + q];
          V[row * d + p] = c * vp - s * vq;
          V[row * d + q] = s * vp + c * vq;
        }
      }
      team.sync();
    }
  }

  // eigenvalues, scale undone (NaN for non-finite input)                           items: d
  const bool nonfinite = w.flag[2] != 0;
  for (int i = rank; i < d; i += step) w.lam[i] = nonfinite ? T(NAN) : m_ldexp(A[i * d + i], e);
  team.sync();
  // rank of each eigenvalue (ascending, NaN last, ties by index)                  items: d
  for (int i = rank; i < d; i += step) {
    const T li = w.lam[i];
    int pos = 0;
    for (int j = 0; j < d; ++j) {
      const T lj = w.lam[j];
      pos += ascending(lj, li) || (j < i && !ascending(li, lj));
    }
    w.perm[pos] = i;
  }
  team.sync();
  const T* src = V;
  if (v_external) {
    // V is the output buffer: move it into A's space before permuting its columns  items: d*d
    for (int i = rank; i < dd; i += step) A[i] = V[i];
    team.sync();
    src = A;
  }
  // sorted eigenvalues and eigenvector columns                                     items: d*d, d
  for (int i = rank; i < dd; i += step) {
    const int r = i / d, k = i - r * d;
    evecs[i] = nonfinite ? T(NAN) : src[r * d + w.perm[k]];
  }
  for (int k = rank; k < d; k += step) evals[k] = w.lam[w.perm[k]];
}

}  // namespace jacobi
}  // namespace sdecor
