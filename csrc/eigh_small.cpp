// sdecor::eigh_small on CPU: the serial twin of the CUDA kernel (same phases, a team of one),
// parallel over the batch.
#include "eigh_small.h"

#include "jacobi.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <vector>

namespace sdecor {

namespace {

// The smallest opt-in shared memory per block among the supported GPUs (sm_80: 163 KiB). The CPU
// twin keeps V where an sm_80 kernel would, so CPU tests run both layouts of the solver.
constexpr size_t kSm80SharedBytes = 163 * 1024;

}  // namespace

int64_t eigh_small_check(const at::Tensor& a) {
  TORCH_CHECK(a.dim() >= 2, "sdecor::eigh_small: a must have shape (..., d, d); got ", a.dim(),
              " dimension(s)");
  const int64_t d = a.size(-1);
  TORCH_CHECK(a.size(-2) == d, "sdecor::eigh_small: a must hold square matrices (..., d, d); got shape ",
              a.sizes());
  TORCH_CHECK(d >= 1 && d <= jacobi::kMaxDim, "sdecor::eigh_small: d must be in [1, ", jacobi::kMaxDim,
              "]; got d = ", d);
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "sdecor::eigh_small: a must be float32 or float64; got ", a.scalar_type());
  return a.numel() / (d * d);
}

std::tuple<at::Tensor, at::Tensor> eigh_small_outputs(const at::Tensor& a) {
  auto batch = a.sizes().vec();
  batch.pop_back();
  at::Tensor evals = at::empty(batch, a.options());
  at::Tensor evecs = at::empty(a.sizes(), a.options());
  return {evals, evecs};
}

std::tuple<at::Tensor, at::Tensor> eigh_small_meta(const at::Tensor& a) {
  TORCH_CHECK(a.dim() >= 2, "sdecor::eigh_small: a must have shape (..., d, d); got ", a.dim(),
              " dimension(s)");
  TORCH_CHECK(a.sym_size(-1) == a.sym_size(-2),
              "sdecor::eigh_small: a must hold square matrices (..., d, d); got shape ", a.sym_sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "sdecor::eigh_small: a must be float32 or float64; got ", a.scalar_type());
  std::vector<c10::SymInt> sizes(a.sym_sizes().begin(), a.sym_sizes().end());
  at::Tensor evecs = at::empty_symint(sizes, a.options());
  sizes.pop_back();
  at::Tensor evals = at::empty_symint(sizes, a.options());
  return {evals, evecs};
}

std::tuple<at::Tensor, at::Tensor> eigh_small_cpu(const at::Tensor& a) {
  const int64_t batch = eigh_small_check(a);
  TORCH_CHECK(a.device().is_cpu(), "sdecor::eigh_small (CPU): a must be a CPU tensor");
  const int d = static_cast<int>(a.size(-1));
  const at::Tensor x = a.contiguous();
  auto [evals, evecs] = eigh_small_outputs(x);
  if (batch == 0) return {evals, evecs};

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sdecor_eigh_small_cpu", [&] {
    const bool v_external = jacobi::workspace_bytes<scalar_t>(d, false) > kSm80SharedBytes;
    const size_t bytes = jacobi::workspace_bytes<scalar_t>(d, v_external);
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* lam = evals.mutable_data_ptr<scalar_t>();
    scalar_t* vec = evecs.mutable_data_ptr<scalar_t>();
    const int64_t dd = static_cast<int64_t>(d) * d;
    // About 10 d^3 flops per sweep: hand each thread at least ~1e6 flops.
    const int64_t grain = std::max<int64_t>(1, 100000 / (dd * d));
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> buf((bytes + sizeof(double) - 1) / sizeof(double));
      const jacobi::Work<scalar_t> w = jacobi::carve<scalar_t>(buf.data(), d, v_external);
      for (int64_t b = begin; b < end; ++b) {
        jacobi::eigh_jacobi(jacobi::SerialTeam{}, in + b * dd, lam + b * d, vec + b * dd, d, w, v_external);
      }
    });
  });
  return {evals, evecs};
}

}  // namespace sdecor
