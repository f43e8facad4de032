// The Newton-Schulz (IterNorm) whitening matrices of G small groups and their exact backward, on the
// CPU: the d x d part of a GroupWhitening training step (method="newton") in one op each way, so that
// a layer's step runs no Python per iteration and no small torch op per product.
//
// Ops (torch.ops.sdecor, CPU and Meta kernels; float32 or float64; cov in units of the groups' scales,
// as sdecor.ops.whiten_torch):
//   native_newton(cov, eps, T, last) -> (w, trace, hist)
//       per group g: Se = cov[g] + eps[g] I over its channels (the first `last` of the last group, d of
//       the others), the coupled iteration of docs/design.md ("Semantics"): Y_0 = Se / tr(Se), Z_0 = I,
//       M_k = (3 I - Z_k Y_k) / 2, Y_{k+1} = Y_k M_k, Z_{k+1} = M_k Z_k, W = Z_T / sqrt(tr(Se)).
//       w (G, d, d): W, zeros in a smaller last group's padding; trace (G,): tr(Se); hist
//       (G, 3 T + 1, d, d): Y_0..Y_{T-1}, Z_0..Z_{T-1}, M_0..M_{T-1}, Z_T, each a group's own n x n
//       matrix (n = last or d) at the start of its d x d slot -- what the backward reads.
//   native_newton_backward(grad_w, cov, eps, trace, hist, T, last) -> grad_se
//       dL/dSe (G, d, d) from dL/dW (the padding of grad_w is ignored, that of grad_se is zero): the
//       recurrence run in reverse, the reverse of the torch backend's newton_torch_backward.
//
// Every product is an n x n x n one on the whitening microkernels (amm, csrc/cpu/whiten_kernels.inc:
// out = M g with M given transposed), on the instruction set the dispatcher chose. The groups run in
// parallel, each on its own; the result does not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu/whiten_dispatch.h"
#include "no_autocast.h"

namespace sdecor {
namespace {

// The n x n products of one group on the microkernels; `t` and `u`: n * n scratch each for transposes.
template <typename T, typename Kernels>
struct Products {
  const Kernels& k;
  int64_t n;
  const T* zeros;   // n zeros: amm's shift
  T* t;
  T* u;

  static void transpose(const T* a, T* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) out[j * n + i] = a[i * n + j];
  }

  // out = op(a) op(b), op(a) = a^T where ta, op(b) = b^T where tb; out distinct from a and b
  void mm(const T* a, bool ta, const T* b, bool tb, T* out) const {
    // amm: out = M g with M given transposed: M^T = op(a)^T is a itself where ta
    const T* mt = a;
    if (!ta) {
      transpose(a, t, n);
      mt = t;
    }
    const T* g = b;
    if (tb) {
      transpose(b, u, n);
      g = u;
    }
    k.amm(mt, g, n, nullptr, 0, nullptr, T(1), n, n, zeros, out, n, 0, u);
  }
};

// Groups per parallel task: at least kMinTaskFmas multiply-adds each (`products` products of n^3 per group), so
// that small layers run on one thread, with no fork and join for a few microseconds of work.
constexpr int64_t kMinTaskFmas = int64_t(1) << 20;

int64_t grain(int64_t d, int64_t products) {
  const int64_t per_group = std::max<int64_t>(1, products * d * d * d);
  return std::max<int64_t>(1, (kMinTaskFmas + per_group - 1) / per_group);
}

void check_matrices(const at::Tensor& t, const char* op, const char* name, int64_t G, int64_t d,
                    at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == G && t.size(1) == d && t.size(2) == d, "sdecor::", op, ": ", name,
              " must have shape (", G, ", ", d, ", ", d, "); got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "sdecor::", op, ": ", name, " must be ", dtype, "; got ", t.scalar_type());
}

// (G, d) after checking cov (G, d, d) float32 / float64 on the CPU (or meta), eps (G,) of its dtype,
// T >= 0 and 1 <= last <= d.
std::tuple<int64_t, int64_t> check_newton(const at::Tensor& cov, const at::Tensor& eps, int64_t T, int64_t last,
                                          const char* op) {
  TORCH_CHECK(cov.dim() == 3 && cov.size(1) == cov.size(2) && cov.size(1) >= 1, "sdecor::", op,
              ": cov must be (G, d, d) with d >= 1; got shape ", cov.sizes());
  TORCH_CHECK(cov.scalar_type() == at::kFloat || cov.scalar_type() == at::kDouble, "sdecor::", op,
              ": cov must be float32 or float64; got ", cov.scalar_type());
  TORCH_CHECK(cov.device().is_cpu() || cov.device().is_meta(), "sdecor::", op, ": cov must be a CPU tensor; got ",
              cov.device());
  const int64_t G = cov.size(0), d = cov.size(1);
  TORCH_CHECK(eps.dim() == 1 && eps.size(0) == G, "sdecor::", op, ": eps must have shape (", G, ",); got ",
              eps.sizes());
  TORCH_CHECK(eps.scalar_type() == cov.scalar_type(), "sdecor::", op, ": eps must be ", cov.scalar_type(), "; got ",
              eps.scalar_type());
  TORCH_CHECK(T >= 0, "sdecor::", op, ": T must be >= 0; got ", T);
  TORCH_CHECK(last >= 1 && last <= d, "sdecor::", op, ": last must be in [1, ", d, "]; got ", last);
  return {G, d};
}

template <typename T>
void newton_kernel(const at::Tensor& cov, const at::Tensor& eps, int64_t T_, int64_t last, at::Tensor& w,
                   at::Tensor& trace, at::Tensor& hist) {
  const auto& k = cpu::kernels_of<T>(cpu::whiten_isa());
  const int64_t G = cov.size(0), d = cov.size(1), slots = 3 * T_ + 1, dd = d * d;
  const T* C = cov.data_ptr<T>();
  const T* E = eps.data_ptr<T>();
  T* W = w.data_ptr<T>();
  T* TR = trace.data_ptr<T>();
  T* H = hist.data_ptr<T>();
  at::parallel_for(0, G, grain(d, 3 * T_), [&](int64_t begin, int64_t end) {
    std::vector<T> buf(3 * dd + d, T(0));
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n = g == G - 1 ? last : d, nn = n * n;
      const Products<T, std::decay_t<decltype(k)>> mm{k, n, buf.data() + 3 * dd, buf.data(), buf.data() + dd};
      T* P = buf.data() + 2 * dd;
      T* h = H + g * slots * dd;
      auto Y = [&](int64_t s) { return h + s * dd; };
      auto Z = [&](int64_t s) { return h + (T_ + s) * dd; };
      auto M = [&](int64_t s) { return h + (2 * T_ + s) * dd; };
      T* z_last = h + 3 * T_ * dd;
      // Se = cov + eps I over the group's channels, Y_0 = Se / tr(Se), Z_0 = I
      const T* c = C + g * dd;
      T tr = 0;
      for (int64_t i = 0; i < n; ++i) tr += c[i * d + i] + E[g];
      TR[g] = tr;
      T* y = T_ > 0 ? Y(0) : P;
      T* z = T_ > 0 ? Z(0) : z_last;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) {
          y[i * n + j] = (c[i * d + j] + (i == j ? E[g] : T(0))) / tr;
          z[i * n + j] = i == j ? T(1) : T(0);
        }
      for (int64_t s = 0; s < T_; ++s) {
        T* m = M(s);
        mm.mm(Z(s), false, Y(s), false, P);                       // Z_k Y_k
        for (int64_t i = 0; i < nn; ++i) m[i] = -(T(0.5) * P[i]);
        for (int64_t i = 0; i < n; ++i) m[i * n + i] = T(1.5) - T(0.5) * P[i * n + i];
        if (s + 1 < T_) mm.mm(Y(s), false, m, false, Y(s + 1));   // Y_{k+1} = Y_k M_k (unused after the last)
        mm.mm(m, false, Z(s), false, s + 1 < T_ ? Z(s + 1) : z_last);
      }
      // W = Z_T / sqrt(tr), zero padded
      const T rs = T(1) / std::sqrt(tr);
      T* wg = W + g * dd;
      for (int64_t i = 0; i < dd; ++i) wg[i] = T(0);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) wg[i * d + j] = z_last[i * n + j] * rs;
    }
  });
}

template <typename T>
void newton_backward_kernel(const at::Tensor& grad_w, const at::Tensor& cov, const at::Tensor& eps,
                            const at::Tensor& trace, const at::Tensor& hist, int64_t T_, int64_t last,
                            at::Tensor& grad_se) {
  const auto& k = cpu::kernels_of<T>(cpu::whiten_isa());
  const int64_t G = cov.size(0), d = cov.size(1), slots = 3 * T_ + 1, dd = d * d;
  const T* GW = grad_w.data_ptr<T>();
  const T* C = cov.data_ptr<T>();
  const T* E = eps.data_ptr<T>();
  const T* TR = trace.data_ptr<T>();
  const T* H = hist.data_ptr<T>();
  T* GS = grad_se.data_ptr<T>();
  at::parallel_for(0, G, grain(d, 6 * T_), [&](int64_t begin, int64_t end) {
    std::vector<T> buf(8 * dd + d, T(0));
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n = g == G - 1 ? last : d, nn = n * n;
      const Products<T, std::decay_t<decltype(k)>> mm{k, n, buf.data() + 8 * dd, buf.data(), buf.data() + dd};
      T* gz = buf.data() + 2 * dd;
      T* gy = buf.data() + 3 * dd;
      T* gm = buf.data() + 4 * dd;
      T* p = buf.data() + 5 * dd;
      T* gyn = buf.data() + 6 * dd;
      T* gzn = buf.data() + 7 * dd;
      const T* h = H + g * slots * dd;
      const T* z_last = h + 3 * T_ * dd;
      const T* gw = GW + g * dd;
      const T* c = C + g * dd;
      const T tr = TR[g];
      const T rs = T(1) / std::sqrt(tr);
      // through W = Z_T / sqrt(tr)
      T dot = 0;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) {
          gz[i * n + j] = gw[i * d + j] * rs;
          dot += gw[i * d + j] * z_last[i * n + j];
        }
      T g_tr = T(-0.5) * dot * rs / tr;
      for (int64_t i = 0; i < nn; ++i) gy[i] = T(0);
      for (int64_t s = T_ - 1; s >= 0; --s) {
        const T* y = h + s * dd;
        const T* z = h + (T_ + s) * dd;
        const T* m = h + (2 * T_ + s) * dd;
        // Y_{k+1} = Y_k M_k, Z_{k+1} = M_k Z_k
        mm.mm(y, true, gy, false, gm);                            // Y_k^T gY
        mm.mm(gz, false, z, true, p);                             // gZ Z_k^T
        for (int64_t i = 0; i < nn; ++i) gm[i] += p[i];
        mm.mm(gy, false, m, true, gyn);                           // gY M_k^T
        mm.mm(m, true, gz, false, gzn);                           // M_k^T gZ
        // M_k = 1.5 I - 0.5 Z_k Y_k
        mm.mm(gm, false, y, true, p);                             // gM Y_k^T
        for (int64_t i = 0; i < nn; ++i) gz[i] = gzn[i] - T(0.5) * p[i];
        mm.mm(z, true, gm, false, p);                             // Z_k^T gM
        for (int64_t i = 0; i < nn; ++i) gy[i] = gyn[i] - T(0.5) * p[i];
      }
      // Y_0 = Se / tr(Se)
      T se_dot = 0;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) se_dot += gy[i * n + j] * (c[i * d + j] + (i == j ? E[g] : T(0)));
      g_tr = g_tr - se_dot / (tr * tr);
      T* out = GS + g * dd;
      for (int64_t i = 0; i < dd; ++i) out[i] = T(0);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) out[i * d + j] = gy[i * n + j] / tr + (i == j ? g_tr : T(0));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> newton_cpu(const at::Tensor& cov_, const at::Tensor& eps_, int64_t T,
                                                          int64_t last) {
  const auto [G, d] = check_newton(cov_, eps_, T, last, "native_newton");
  const at::Tensor cov = cov_.contiguous(), eps = eps_.contiguous();
  at::Tensor w = at::empty({G, d, d}, cov.options());
  at::Tensor trace = at::empty({G}, cov.options());
  at::Tensor hist = at::zeros({G, 3 * T + 1, d, d}, cov.options());
  if (G == 0) return {w, trace, hist};
  AT_DISPATCH_FLOATING_TYPES(cov.scalar_type(), "native_newton",
                             [&] { newton_kernel<scalar_t>(cov, eps, T, last, w, trace, hist); });
  return {w, trace, hist};
}

at::Tensor newton_backward_cpu(const at::Tensor& grad_w_, const at::Tensor& cov_, const at::Tensor& eps_,
                               const at::Tensor& trace_, const at::Tensor& hist_, int64_t T, int64_t last) {
  const auto [G, d] = check_newton(cov_, eps_, T, last, "native_newton_backward");
  check_matrices(grad_w_, "native_newton_backward", "grad_w", G, d, cov_.scalar_type());
  TORCH_CHECK(trace_.dim() == 1 && trace_.size(0) == G && trace_.scalar_type() == cov_.scalar_type(),
              "sdecor::native_newton_backward: trace must be ", cov_.scalar_type(), " of shape (", G, ",); got ",
              trace_.scalar_type(), " ", trace_.sizes());
  TORCH_CHECK(hist_.dim() == 4 && hist_.size(0) == G && hist_.size(1) == 3 * T + 1 && hist_.size(2) == d &&
                  hist_.size(3) == d && hist_.scalar_type() == cov_.scalar_type(),
              "sdecor::native_newton_backward: hist must be ", cov_.scalar_type(), " of shape (", G, ", ", 3 * T + 1,
              ", ", d, ", ", d, ") (native_newton's, for the same T); got ", hist_.scalar_type(), " ", hist_.sizes());
  const at::Tensor grad_w = grad_w_.contiguous(), cov = cov_.contiguous(), eps = eps_.contiguous(),
                   trace = trace_.contiguous(), hist = hist_.contiguous();
  at::Tensor grad_se = at::empty({G, d, d}, cov.options());
  if (G == 0) return grad_se;
  AT_DISPATCH_FLOATING_TYPES(cov.scalar_type(), "native_newton_backward", [&] {
    newton_backward_kernel<scalar_t>(grad_w, cov, eps, trace, hist, T, last, grad_se);
  });
  return grad_se;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> newton_meta(const at::Tensor& cov, const at::Tensor& eps, int64_t T,
                                                           int64_t last) {
  const auto [G, d] = check_newton(cov, eps, T, last, "native_newton");
  return {at::empty({G, d, d}, cov.options()), at::empty({G}, cov.options()),
          at::empty({G, 3 * T + 1, d, d}, cov.options())};
}

at::Tensor newton_backward_meta(const at::Tensor& grad_w, const at::Tensor& cov, const at::Tensor& eps,
                                const at::Tensor&, const at::Tensor&, int64_t T, int64_t last) {
  const auto [G, d] = check_newton(cov, eps, T, last, "native_newton_backward");
  check_matrices(grad_w, "native_newton_backward", "grad_w", G, d, cov.scalar_type());
  return at::empty({G, d, d}, cov.options());
}

constexpr const char* kOps[] = {"native_newton", "native_newton_backward"};

}  // namespace
}  // namespace sdecor

TORCH_LIBRARY_FRAGMENT(sdecor, m) {
  m.def("native_newton(Tensor cov, Tensor eps, int T, int last) -> (Tensor w, Tensor trace, Tensor hist)");
  m.def("native_newton_backward(Tensor grad_w, Tensor cov, Tensor eps, Tensor trace, Tensor hist, int T, "
        "int last) -> Tensor");
}

TORCH_LIBRARY_IMPL(sdecor, CPU, m) {
  m.impl("native_newton", &sdecor::newton_cpu);
  m.impl("native_newton_backward", &sdecor::newton_backward_cpu);
}

TORCH_LIBRARY_IMPL(sdecor, Meta, m) {
  m.impl("native_newton", &sdecor::newton_meta);
  m.impl("native_newton_backward", &sdecor::newton_backward_meta);
}

// No derivative of their own (the autograd Function of sdecor.ops.whiten_torch pairs them); under
// torch.autocast they run on their inputs as given (no_autocast.h).
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
