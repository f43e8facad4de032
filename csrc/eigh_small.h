// Shared declarations of the sdecor::eigh_small op (CPU in eigh_small.cpp, CUDA in eigh_small_cuda.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

namespace sdecor {

// Shape/dtype checks shared by every device; returns the batch size (product of leading dims).
int64_t eigh_small_check(const at::Tensor& a);

// Empty outputs: eigenvalues (..., d), eigenvectors (..., d, d), same dtype and device as a.
std::tuple<at::Tensor, at::Tensor> eigh_small_outputs(const at::Tensor& a);

std::tuple<at::Tensor, at::Tensor> eigh_small_cpu(const at::Tensor& a);

// Shapes only (Meta / fake tensors), symbolic sizes allowed.
std::tuple<at::Tensor, at::Tensor> eigh_small_meta(const at::Tensor& a);

#if defined(SDECOR_WITH_CUDA)
// "cuda=<version>;archs=<sm list>" of the compiled CUDA part.
std::string cuda_build_info();
#endif

}  // namespace sdecor
