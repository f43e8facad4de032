// Check of the phase structure of jacobi.h without a GPU: run eigh_jacobi with teams of real threads
// (a std::barrier as the block barrier, items strided over threads exactly as in the CUDA kernel) and
// require results bitwise equal to the serial twin. Each item does the same arithmetic whichever
// thread runs it, so any difference means a phase wrote what another item of the same phase read, or
// a barrier is missing. Built and run by tests/test_eigh_small.py, also under ThreadSanitizer.
// (Not part of the extension: setup.py compiles csrc/**/*.cpp and *.cu only.)
#include "../jacobi.h"

#include <barrier>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

using namespace sdecor::jacobi;

struct ThreadTeam {
  int r, n;
  std::barrier<>* bar;
  int rank() const { return r; }
  int size() const { return n; }
  void sync() const { bar->arrive_and_wait(); }
};

template <typename T>
void solve(int threads, const std::vector<T>& in, std::vector<T>& lam, std::vector<T>& vec, int d, int batch,
           bool v_external) {
  std::vector<double> buf(workspace_bytes<T>(d, v_external) / sizeof(double) + 1);
  const Work<T> w = carve<T>(buf.data(), d, v_external);
  std::barrier<> bar(threads);
  auto body = [&](int r) {
    const ThreadTeam team{r, threads, &bar};
    for (int b = 0; b < batch; ++b) {
      eigh_jacobi(team, in.data() + static_cast<size_t>(b) * d * d, lam.data() + static_cast<size_t>(b) * d,
                  vec.data() + static_cast<size_t>(b) * d * d, d, w, v_external);
      team.sync();  // the next matrix reuses the work arrays
    }
  };
  std::vector<std::thread> pool;
  for (int r = 1; r < threads; ++r) pool.emplace_back(body, r);
  body(0);
  for (auto& t : pool) t.join();
}

template <typename T>
int check(int d, int batch, int threads, bool v_external, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal;
  std::vector<T> in(static_cast<size_t>(batch) * d * d);
  for (int b = 0; b < batch; ++b)
    for (int i = 0; i < d; ++i)
      for (int j = 0; j <= i; ++j) {
        // repeated eigenvalues and an exact zero block in the last matrix
        const T v = b == batch - 1 && (i < d / 2 || j < d / 2) ? T(i == j) : T(normal(gen));
        in[(static_cast<size_t>(b) * d + i) * d + j] = in[(static_cast<size_t>(b) * d + j) * d + i] = v;
      }
  std::vector<T> l1(static_cast<size_t>(batch) * d), v1(in.size()), lt(l1.size()), vt(in.size());
  solve<T>(1, in, l1, v1, d, batch, v_external);
  solve<T>(threads, in, lt, vt, d, batch, v_external);
  const bool same = std::memcmp(l1.data(), lt.data(), l1.size() * sizeof(T)) == 0 &&
                    std::memcmp(v1.data(), vt.data(), v1.size() * sizeof(T)) == 0;
  std::printf("%s %s d=%d batch=%d threads=%d layout=%s\n", same ? "ok" : "MISMATCH",
              sizeof(T) == 4 ? "float32" : "float64", d, batch, threads, v_external ? "external" : "internal");
  return same ? 0 : 1;
}

int main(int argc, char** argv) {
  const int max_d = argc > 1 ? std::atoi(argv[1]) : 64;
  int failures = 0;
  for (int d : {1, 2, 3, 5, 16, 33, 64, 128}) {
    if (d > max_d) continue;
    const int batch = d >= 64 ? 1 : 3;
    for (int threads : {3, 8}) {
      for (bool ext : {false, true}) {
        failures += check<float>(d, batch, threads, ext, 1000u + d);
        failures += check<double>(d, batch, threads, ext, 2000u + d);
      }
    }
  }
  std::printf("%d mismatch(es)\n", failures);
  return failures != 0;
}
