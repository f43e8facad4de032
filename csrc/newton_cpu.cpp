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
//   native_newton_train(cov, ms, center, scale, inv_scale, eps, T, weight?, bias?)
//       -> (w, a, a_apply, shift, mean, w_true, eps_s, trace, hist)
//       the d x d part of a GroupWhitening training forward for groups of d | C channels, from the
//       statistics of native_whiten_stats (units of the scale c): eps' = max(eps / c^2, sqrt(tiny)),
//       W' = native_newton's W of cov + eps' I, A' = diag(weight) W', shift = bias - A' ms (what the apply
//       pass adds), a_apply = A' / c (the apply pass's matrix), mean = center + c ms, w_true = W' / c.
//   native_newton_train_backward(gx, gsum, ms, w, weight?, inv_scale, cov, eps_s, trace, hist, T, m)
//       -> (grad_weight, s2, a_t, shift)
//       its backward from the reduce pass's (D / c, sum dy): GX' = D / c - sum(dy) ms^T, dL/dweight =
//       rowsum(GX' o W') (undefined without weight), dL/dSe' from dL/dW' = diag(weight) GX', and the dx
//       pass's s2 = (2 / m) sym(dL/dSe') / c, a_t = A'^T / c, shift = -a_t sum(dy) / m - s2 ms.
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
#include <initializer_list>
#include <limits>
#include <optional>
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

// (G, d) after checking cov (G, d, d) float32 / float64 on the CPU (or meta) and T >= 0.
std::tuple<int64_t, int64_t> check_cov(const at::Tensor& cov, int64_t T, const char* op) {
  TORCH_CHECK(cov.dim() == 3 && cov.size(1) == cov.size(2) && cov.size(1) >= 1, "sdecor::", op,
              ": cov must be (G, d, d) with d >= 1; got shape ", cov.sizes());
  TORCH_CHECK(cov.scalar_type() == at::kFloat || cov.scalar_type() == at::kDouble, "sdecor::", op,
              ": cov must be float32 or float64; got ", cov.scalar_type());
  TORCH_CHECK(cov.device().is_cpu() || cov.device().is_meta(), "sdecor::", op, ": cov must be a CPU tensor; got ",
              cov.device());
  TORCH_CHECK(T >= 0, "sdecor::", op, ": T must be >= 0; got ", T);
  return {cov.size(0), cov.size(1)};
}

// check_cov, and eps (G,) of cov's dtype.
std::tuple<int64_t, int64_t> check_cov_eps(const at::Tensor& cov, const at::Tensor& eps, int64_t T, const char* op) {
  const auto [G, d] = check_cov(cov, T, op);
  TORCH_CHECK(eps.dim() == 1 && eps.size(0) == G, "sdecor::", op, ": eps must have shape (", G, ",); got ",
              eps.sizes());
  TORCH_CHECK(eps.scalar_type() == cov.scalar_type(), "sdecor::", op, ": eps must be ", cov.scalar_type(), "; got ",
              eps.scalar_type());
  return {G, d};
}

// check_cov_eps, and 1 <= last <= d.
std::tuple<int64_t, int64_t> check_newton(const at::Tensor& cov, const at::Tensor& eps, int64_t T, int64_t last,
                                          const char* op) {
  const auto [G, d] = check_cov_eps(cov, eps, T, op);
  TORCH_CHECK(last >= 1 && last <= d, "sdecor::", op, ": last must be in [1, ", d, "]; got ", last);
  return {G, d};
}

// The T steps of one group of n channels: Se = c + eps I (c: the group's covariance, row stride ld),
// W = Z_T / sqrt(tr Se) into w (row stride ld; the padding left as it is), the iterates into h (slots of
// ld * ld elements: Y_0..Y_{T-1}, Z_0..Z_{T-1}, M_0..M_{T-1}, Z_T, each n x n); returns tr(Se). P: n * n
// scratch.
template <typename T, typename Mm>
T newton_group(const Mm& mm, const T* c, int64_t ld, T eps, int64_t T_, T* h, T* w, T* P) {
  const int64_t n = mm.n, nn = n * n, dd = ld * ld;
  auto Y = [&](int64_t s) { return h + s * dd; };
  auto Z = [&](int64_t s) { return h + (T_ + s) * dd; };
  auto M = [&](int64_t s) { return h + (2 * T_ + s) * dd; };
  T* z_last = h + 3 * T_ * dd;
  // Se = cov + eps I over the group's channels, Y_0 = Se / tr(Se), Z_0 = I
  T tr = 0;
  for (int64_t i = 0; i < n; ++i) tr += c[i * ld + i] + eps;
  T* y = T_ > 0 ? Y(0) : P;
  T* z = T_ > 0 ? Z(0) : z_last;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      y[i * n + j] = (c[i * ld + j] + (i == j ? eps : T(0))) / tr;
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
  // W = Z_T / sqrt(tr)
  const T rs = T(1) / std::sqrt(tr);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) w[i * ld + j] = z_last[i * n + j] * rs;
  return tr;
}

// dL/dSe of one group (into out, row stride ld; the padding left as it is) from dL/dW (gw, row stride
// ld), for the iterates h of newton_group. buf: 6 n * n scratch.
template <typename T, typename Mm>
void newton_backward_group(const Mm& mm, const T* gw, const T* c, int64_t ld, T eps, T tr, int64_t T_, const T* h,
                           T* out, T* buf) {
  const int64_t n = mm.n, nn = n * n, dd = ld * ld;
  T* gz = buf;
  T* gy = buf + nn;
  T* gm = buf + 2 * nn;
  T* p = buf + 3 * nn;
  T* gyn = buf + 4 * nn;
  T* gzn = buf + 5 * nn;
  const T* z_last = h + 3 * T_ * dd;
  const T rs = T(1) / std::sqrt(tr);
  // through W = Z_T / sqrt(tr)
  T dot = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      gz[i * n + j] = gw[i * ld + j] * rs;
      dot += gw[i * ld + j] * z_last[i * n + j];
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
    for (int64_t j = 0; j < n; ++j) se_dot += gy[i * n + j] * (c[i * ld + j] + (i == j ? eps : T(0)));
  g_tr = g_tr - se_dot / (tr * tr);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) out[i * ld + j] = gy[i * n + j] / tr + (i == j ? g_tr : T(0));
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
      const int64_t n = g == G - 1 ? last : d;
      const Products<T, std::decay_t<decltype(k)>> mm{k, n, buf.data() + 3 * dd, buf.data(), buf.data() + dd};
      T* wg = W + g * dd;
      std::fill(wg, wg + dd, T(0));   // zero padded
      TR[g] = newton_group(mm, C + g * dd, d, E[g], T_, H + g * slots * dd, wg, buf.data() + 2 * dd);
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
      const int64_t n = g == G - 1 ? last : d;
      const Products<T, std::decay_t<decltype(k)>> mm{k, n, buf.data() + 8 * dd, buf.data(), buf.data() + dd};
      T* out = GS + g * dd;
      std::fill(out, out + dd, T(0));   // zero padded
      newton_backward_group(mm, GW + g * dd, C + g * dd, d, E[g], TR[g], T_, H + g * slots * dd, out,
                            buf.data() + 2 * dd);
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

// ---------------------------------------------------------------------------------------------------
// the d x d part of a GroupWhitening training step (groups of d | C channels), around the steps

using Tensor9 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor>;

// weight / bias: none, or (G * d) of cov's dtype
const at::Tensor* optional_vector(const std::optional<at::Tensor>& t, const at::Tensor& cov, int64_t n, const char* op,
                                  const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->scalar_type() == cov.scalar_type(), "sdecor::", op, ": ", name,
              " must be ", cov.scalar_type(), " of shape (", n, ",); got ", t->scalar_type(), " ", t->sizes());
  return &*t;
}

void check_vectors(std::initializer_list<std::pair<const at::Tensor*, const char*>> ts, const at::Tensor& cov,
                   at::IntArrayRef shape, const char* op) {
  for (const auto& [t, name] : ts)
    TORCH_CHECK(t->sizes() == shape && t->scalar_type() == cov.scalar_type(), "sdecor::", op, ": ", name, " must be ",
                cov.scalar_type(), " of shape ", shape, "; got ", t->scalar_type(), " ", t->sizes());
}

template <typename T>
void newton_train_kernel(const at::Tensor& cov, const at::Tensor& ms, const at::Tensor& center, const at::Tensor& scale,
                         const at::Tensor& inv, double eps, int64_t T_, const at::Tensor* weight,
                         const at::Tensor* bias, Tensor9& out) {
  const auto& k = cpu::kernels_of<T>(cpu::whiten_isa());
  const int64_t G = cov.size(0), d = cov.size(1), slots = 3 * T_ + 1, dd = d * d;
  const T *C = cov.data_ptr<T>(), *MS = ms.data_ptr<T>(), *CE = center.data_ptr<T>(), *S = scale.data_ptr<T>(),
          *IC = inv.data_ptr<T>();
  const T* WT = weight ? weight->data_ptr<T>() : nullptr;
  const T* B = bias ? bias->data_ptr<T>() : nullptr;
  auto& [w_, a_, aa_, shift_, mean_, wt_, eps_, tr_, hist_] = out;
  T *W = w_.data_ptr<T>(), *A = a_.data_ptr<T>(), *AA = aa_.data_ptr<T>(), *SH = shift_.data_ptr<T>(),
    *MEAN = mean_.data_ptr<T>(), *WTRUE = wt_.data_ptr<T>(), *E = eps_.data_ptr<T>(), *TR = tr_.data_ptr<T>(),
    *H = hist_.data_ptr<T>();
  const T floor_eps = std::sqrt(std::numeric_limits<T>::min());   // as scaled_eps: 2^-63 (2^-511)
  at::parallel_for(0, G, grain(d, 3 * T_), [&](int64_t begin, int64_t end) {
    std::vector<T> buf(3 * dd + d, T(0));
    for (int64_t g = begin; g < end; ++g) {
      const Products<T, std::decay_t<decltype(k)>> mm{k, d, buf.data() + 3 * dd, buf.data(), buf.data() + dd};
      const T ic = IC[g];
      // eps' = eps / c^2, at least sqrt(tiny)
      const T e = std::max(T(eps) * ic * ic, floor_eps);
      E[g] = e;
      T* w = W + g * dd;
      TR[g] = newton_group(mm, C + g * dd, d, e, T_, H + g * slots * dd, w, buf.data() + 2 * dd);
      const T* m = MS + g * d;
      for (int64_t i = 0; i < d; ++i) {
        // A' = diag(weight) W', shift = b - A' ms, the apply's A = A' / c, W = W' / c
        const T gamma = WT ? WT[g * d + i] : T(1);
        T dot = 0;
        for (int64_t j = 0; j < d; ++j) {
          const int64_t o = g * dd + i * d + j;
          const T a = WT ? gamma * w[i * d + j] : w[i * d + j];
          A[o] = a;
          AA[o] = a * ic;
          WTRUE[o] = w[i * d + j] * ic;
          dot += a * m[j];
        }
        SH[g * d + i] = B ? -dot + B[g * d + i] : -dot;
        MEAN[g * d + i] = CE[g * d + i] + S[g] * m[i];
      }
    }
  });
}

Tensor9 newton_train_cpu(const at::Tensor& cov_, const at::Tensor& ms_, const at::Tensor& center_,
                         const at::Tensor& scale_, const at::Tensor& inv_, double eps, int64_t T,
                         const std::optional<at::Tensor>& weight_, const std::optional<at::Tensor>& bias_) {
  const char* op = "native_newton_train";
  const auto [G, d] = check_cov(cov_, T, op);
  check_vectors({{&ms_, "ms"}, {&center_, "center"}}, cov_, {G, d}, op);
  check_vectors({{&scale_, "scale"}, {&inv_, "inv_scale"}}, cov_, {G}, op);
  const at::Tensor* weight = optional_vector(weight_, cov_, G * d, op, "weight");
  const at::Tensor* bias = optional_vector(bias_, cov_, G * d, op, "bias");
  const at::Tensor cov = cov_.contiguous(), ms = ms_.contiguous(), center = center_.contiguous(),
                   scale = scale_.contiguous(), inv = inv_.contiguous();
  const at::Tensor wc = weight ? weight->contiguous() : at::Tensor(), bc = bias ? bias->contiguous() : at::Tensor();
  auto o = cov.options();
  Tensor9 out{at::empty({G, d, d}, o), at::empty({G, d, d}, o), at::empty({G, d, d}, o), at::empty({G, d}, o),
              at::empty({G, d}, o),    at::empty({G, d, d}, o), at::empty({G}, o),       at::empty({G}, o),
              at::empty({G, 3 * T + 1, d, d}, o)};   // every slot written: the groups are whole (n = d)
  if (G == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(cov.scalar_type(), "native_newton_train", [&] {
    newton_train_kernel<scalar_t>(cov, ms, center, scale, inv, eps, T, weight ? &wc : nullptr, bias ? &bc : nullptr,
                                  out);
  });
  return out;
}

Tensor9 newton_train_meta(const at::Tensor& cov, const at::Tensor& ms, const at::Tensor& center,
                          const at::Tensor& scale, const at::Tensor& inv, double, int64_t T,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  const auto [G, d] = check_cov(cov, T, "native_newton_train");
  auto o = cov.options();
  return {at::empty({G, d, d}, o), at::empty({G, d, d}, o), at::empty({G, d, d}, o), at::empty({G, d}, o),
          at::empty({G, d}, o),    at::empty({G, d, d}, o), at::empty({G}, o),       at::empty({G}, o),
          at::empty({G, 3 * T + 1, d, d}, o)};
}

template <typename T>
void newton_train_backward_kernel(const at::Tensor& gx, const at::Tensor& gsum, const at::Tensor& ms,
                                  const at::Tensor& w, const at::Tensor* weight, const at::Tensor& inv,
                                  const at::Tensor& cov, const at::Tensor& eps, const at::Tensor& trace,
                                  const at::Tensor& hist, int64_t T_, int64_t m, at::Tensor& grad_weight,
                                  at::Tensor& s2_, at::Tensor& at_, at::Tensor& shift_) {
  const auto& k = cpu::kernels_of<T>(cpu::whiten_isa());
  const int64_t G = cov.size(0), d = cov.size(1), slots = 3 * T_ + 1, dd = d * d;
  const T *GX = gx.data_ptr<T>(), *GS = gsum.data_ptr<T>(), *MS = ms.data_ptr<T>(), *W = w.data_ptr<T>(),
          *IC = inv.data_ptr<T>(), *C = cov.data_ptr<T>(), *E = eps.data_ptr<T>(), *TR = trace.data_ptr<T>(),
          *H = hist.data_ptr<T>();
  const T* WT = weight ? weight->data_ptr<T>() : nullptr;
  T *GWT = weight ? grad_weight.data_ptr<T>() : nullptr, *S2 = s2_.data_ptr<T>(), *AT = at_.data_ptr<T>(),
    *SH = shift_.data_ptr<T>();
  at::parallel_for(0, G, grain(d, 6 * T_), [&](int64_t begin, int64_t end) {
    std::vector<T> buf(11 * dd + d, T(0));
    for (int64_t g = begin; g < end; ++g) {
      const Products<T, std::decay_t<decltype(k)>> mm{k, d, buf.data() + 11 * dd, buf.data(), buf.data() + dd};
      T* gw = buf.data() + 8 * dd;
      T* gse = buf.data() + 9 * dd;
      T* gm_ = buf.data() + 10 * dd;   // gsum / m
      const T* s = GS + g * d;
      const T* msg = MS + g * d;
      const T* wg = W + g * dd;
      // GX' = sum gy (xs - ms)^T; dL/dweight = rowsum(GX' o W'); dL/dW' = diag(weight) GX'
      for (int64_t i = 0; i < d; ++i) {
        T dot = 0;
        for (int64_t j = 0; j < d; ++j) {
          const T v = GX[g * dd + i * d + j] - s[i] * msg[j];
          dot += v * wg[i * d + j];
          gw[i * d + j] = WT ? WT[g * d + i] * v : v;
        }
        if (GWT) GWT[g * d + i] = dot;
      }
      newton_backward_group(mm, gw, C + g * dd, d, E[g], TR[g], T_, H + g * slots * dd, gse, buf.data() + 2 * dd);
      // s2 = (2 / m) sym(dL/dSe') / c, A'^T / c, shift = -(A'^T / c) mean(gy) - s2 ms
      const T ic = IC[g], km = ic / T(m);
      for (int64_t j = 0; j < d; ++j) gm_[j] = s[j] / T(m);
      for (int64_t i = 0; i < d; ++i) {
        T sa = 0, ss = 0;
        for (int64_t j = 0; j < d; ++j) {
          const int64_t o = g * dd + i * d + j;
          const T v = (gse[i * d + j] + gse[j * d + i]) * km;
          const T a = (WT ? WT[g * d + j] * wg[j * d + i] : wg[j * d + i]) * ic;
          S2[o] = v;
          AT[o] = a;
          sa += a * gm_[j];
          ss += v * msg[j];
        }
        SH[g * d + i] = -sa - ss;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> newton_train_backward_cpu(
    const at::Tensor& gx_, const at::Tensor& gsum_, const at::Tensor& ms_, const at::Tensor& w_,
    const std::optional<at::Tensor>& weight_, const at::Tensor& inv_, const at::Tensor& cov_, const at::Tensor& eps_,
    const at::Tensor& trace_, const at::Tensor& hist_, int64_t T, int64_t m) {
  const char* op = "native_newton_train_backward";
  const auto [G, d] = check_cov_eps(cov_, eps_, T, op);
  check_matrices(gx_, op, "gx", G, d, cov_.scalar_type());
  check_matrices(w_, op, "w", G, d, cov_.scalar_type());
  check_vectors({{&gsum_, "gsum"}, {&ms_, "ms"}}, cov_, {G, d}, op);
  check_vectors({{&inv_, "inv_scale"}, {&trace_, "trace"}}, cov_, {G}, op);
  TORCH_CHECK(hist_.sizes() == at::IntArrayRef({G, 3 * T + 1, d, d}) && hist_.scalar_type() == cov_.scalar_type(),
              "sdecor::", op, ": hist must be ", cov_.scalar_type(), " of shape (", G, ", ", 3 * T + 1, ", ", d, ", ", d,
              ") (native_newton_train's, for the same T); got ", hist_.scalar_type(), " ", hist_.sizes());
  TORCH_CHECK(m >= 1, "sdecor::", op, ": m must be >= 1; got ", m);
  const at::Tensor* weight = optional_vector(weight_, cov_, G * d, op, "weight");
  const at::Tensor gx = gx_.contiguous(), gsum = gsum_.contiguous(), ms = ms_.contiguous(), w = w_.contiguous(),
                   inv = inv_.contiguous(), cov = cov_.contiguous(), eps = eps_.contiguous(),
                   trace = trace_.contiguous(), hist = hist_.contiguous();
  const at::Tensor wc = weight ? weight->contiguous() : at::Tensor();
  auto o = cov.options();
  at::Tensor grad_weight = weight ? at::empty({G * d}, o) : at::Tensor();
  at::Tensor s2 = at::empty({G, d, d}, o), a_t = at::empty({G, d, d}, o), shift = at::empty({G, d}, o);
  if (G == 0) return {grad_weight, s2, a_t, shift};
  AT_DISPATCH_FLOATING_TYPES(cov.scalar_type(), "native_newton_train_backward", [&] {
    newton_train_backward_kernel<scalar_t>(gx, gsum, ms, w, weight ? &wc : nullptr, inv, cov, eps, trace, hist, T, m,
                                           grad_weight, s2, a_t, shift);
  });
  return {grad_weight, s2, a_t, shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> newton_train_backward_meta(
    const at::Tensor& gx, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>& weight, const at::Tensor&, const at::Tensor& cov, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, int64_t T, int64_t) {
  const auto [G, d] = check_cov(cov, T, "native_newton_train_backward");
  auto o = cov.options();
  return {weight.has_value() && weight->defined() ? at::empty({G * d}, o) : at::Tensor(), at::empty({G, d, d}, o),
          at::empty({G, d, d}, o), at::empty({G, d}, o)};
}

constexpr const char* kOps[] = {"native_newton", "native_newton_backward", "native_newton_train",
                                "native_newton_train_backward"};

}  // namespace
}  // namespace sdecor

TORCH_LIBRARY_FRAGMENT(sdecor, m) {
  m.def("native_newton(Tensor cov, Tensor eps, int T, int last) -> (Tensor w, Tensor trace, Tensor hist)");
  m.def("native_newton_backward(Tensor grad_w, Tensor cov, Tensor eps, Tensor trace, Tensor hist, int T, "
        "int last) -> Tensor");
  m.def("native_newton_train(Tensor cov, Tensor ms, Tensor center, Tensor scale, Tensor inv_scale, float eps, "
        "int T, Tensor? weight, Tensor? bias) -> (Tensor w, Tensor a, Tensor a_apply, Tensor shift, Tensor mean, "
        "Tensor w_true, Tensor eps_s, Tensor trace, Tensor hist)");
  m.def("native_newton_train_backward(Tensor gx, Tensor gsum, Tensor ms, Tensor w, Tensor? weight, "
        "Tensor inv_scale, Tensor cov, Tensor eps_s, Tensor trace, Tensor hist, int T, int m) -> (Tensor grad_weight, "
        "Tensor s2, Tensor a_t, Tensor shift)");
}

TORCH_LIBRARY_IMPL(sdecor, CPU, m) {
  m.impl("native_newton", &sdecor::newton_cpu);
  m.impl("native_newton_backward", &sdecor::newton_backward_cpu);
  m.impl("native_newton_train", &sdecor::newton_train_cpu);
  m.impl("native_newton_train_backward", &sdecor::newton_train_backward_cpu);
}

TORCH_LIBRARY_IMPL(sdecor, Meta, m) {
  m.impl("native_newton", &sdecor::newton_meta);
  m.impl("native_newton_backward", &sdecor::newton_backward_meta);
  m.impl("native_newton_train", &sdecor::newton_train_meta);
  m.impl("native_newton_train_backward", &sdecor::newton_train_backward_meta);
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
