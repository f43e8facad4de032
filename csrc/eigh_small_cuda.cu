// sdecor::eigh_small on CUDA: one thread block per matrix, the phases of jacobi.h strided over the
// block's threads with __syncthreads between them, work arrays in dynamic shared memory. One launch
// for the whole batch, no host synchronisation.
#include "eigh_small.h"

#include "jacobi.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#define SDECOR_STR2(...) #__VA_ARGS__
#define SDECOR_STR(...) SDECOR_STR2(__VA_ARGS__)

namespace sdecor {

namespace {

struct BlockTeam {
  __device__ __forceinline__ int rank() const { return threadIdx.x; }
  __device__ __forceinline__ int size() const { return blockDim.x; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
};

template <typename T, bool VExternal>
__global__ void eigh_small_fwd_kernel(const T* __restrict__ in, T* __restrict__ evals, T* evecs, int d) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t b = blockIdx.x;
  const int64_t dd = static_cast<int64_t>(d) * d;
  const jacobi::Work<T> w = jacobi::carve<T>(smem, d, VExternal);
  jacobi::eigh_jacobi(BlockTeam{}, in + b * dd, evals + b * d, evecs + b * dd, d, w, VExternal);
}

// Threads per block: the widest phase has P*P + P*d = ~0.75 d^2 items; 512 threads leave 24 items per
// thread at d = 128 while a 16 x 16 matrix gets 192 threads.
int threads_for(int d) {
  const int P = jacobi::padded(d) / 2;
  const int items = P * P + P * d;
  return std::min(512, std::max(32, (items + 31) / 32 * 32));
}

template <typename T>
void launch(const at::Tensor& x, at::Tensor& evals, at::Tensor& evecs, int64_t batch, int d) {
  int optin_attr = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin_attr, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.get_device()));
  const size_t optin = static_cast<size_t>(optin_attr);
  const bool v_external = jacobi::workspace_bytes<T>(d, false) > optin;
  const size_t bytes = jacobi::workspace_bytes<T>(d, v_external);
  TORCH_CHECK(bytes <= optin, "sdecor::eigh_small: d = ", d, " needs ", bytes,
              " bytes of shared memory per block; this GPU allows ", optin);
  auto kernel = v_external ? eigh_small_fwd_kernel<T, true> : eigh_small_fwd_kernel<T, false>;
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
  TORCH_CHECK(batch <= 0x7fffffff, "sdecor::eigh_small: batch of ", batch, " matrices exceeds 2^31 - 1");
  kernel<<<static_cast<unsigned int>(batch), threads_for(d), bytes, c10::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<T>(), evals.mutable_data_ptr<T>(), evecs.mutable_data_ptr<T>(), d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> eigh_small_cuda(const at::Tensor& a) {
  const int64_t batch = eigh_small_check(a);
  TORCH_CHECK(a.is_cuda(), "sdecor::eigh_small (CUDA): a must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(a.device());
  const int d = static_cast<int>(a.size(-1));
  const at::Tensor x = a.contiguous();
  auto [evals, evecs] = eigh_small_outputs(x);
  if (batch == 0) return {evals, evecs};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sdecor_eigh_small_cuda",
                             [&] { launch<scalar_t>(x, evals, evecs, batch, d); });
  return {evals, evecs};
}

// "800,900" (nvcc's list of virtual architectures) -> "80,90".
std::string sm_list(const char* arch_list) {
  std::string out, num;
  for (const char* p = arch_list;; ++p) {
    if (*p >= '0' && *p <= '9') {
      num += *p;
      continue;
    }
    if (!num.empty()) {
      if (!out.empty()) out += ",";
      out += std::to_string(std::stoi(num) / 10);
      num.clear();
    }
    if (*p == '\0') break;
  }
  return out;
}

}  // namespace

std::string cuda_build_info() {
  std::string s = "cuda=" SDECOR_STR(__CUDACC_VER_MAJOR__) "." SDECOR_STR(__CUDACC_VER_MINOR__);
#if defined(__CUDA_ARCH_LIST__)
  s += ";archs=" + sm_list(SDECOR_STR(__CUDA_ARCH_LIST__));
#else
  s += ";archs=unknown";
#endif
  return s;
}

}  // namespace sdecor

TORCH_LIBRARY_IMPL(sdecor, CUDA, m) { m.impl("eigh_small", &sdecor::eigh_small_cuda); }
