// The sdecor operator library (torch.ops.sdecor) and the Python module sdecor._C.
//
// Ops:
//   build_info() -> str                  "key=value;..." describing this build (see _ext.build_info)
//   eigh_small(Tensor a) -> (Tensor, Tensor)
//                                        batched symmetric eigendecomposition of (..., d, d), d <= 128,
//                                        float32/float64, reading the lower triangle; eigenvalues
//                                        ascending (..., d), eigenvectors as columns (..., d, d).
//   native_whiten_stats / _apply / _reduce / _dx, native_newton / _backward / _train / _train_backward,
//                                        native_topk_mask
//                                        the CPU kernels of the native backend, defined with their own
//                                        Meta, Autograd and Autocast kernels in whiten_cpu.cpp and
//                                        topk_cpu.cpp (TORCH_LIBRARY_FRAGMENT)
//   cpu_isa() -> str, set_cpu_isa(str name)
//                                        the instruction set of the whitening microkernels in use, and
//                                        forcing one (cpu/whiten_dispatch.cpp)
// Kernels: CPU here (eigh_small.cpp); CUDA in eigh_small_cuda.cu when built with SDECOR_WITH_CUDA.
// Meta kernels (shapes only) are registered here too, so fake tensors (torch.compile, opcheck) work
// however the extension was loaded; so are the Autocast kernels (CPU, CUDA), so that eager and
// compiled code see one behaviour under torch.autocast.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <string>

#include "cpu/whiten_dispatch.h"
#include "eigh_small.h"
#include "no_autocast.h"

#define SDECOR_STR2(x) #x
#define SDECOR_STR(x) SDECOR_STR2(x)

namespace sdecor {
namespace {

std::string compiler() {
#if defined(__clang__)
  return "clang-" SDECOR_STR(__clang_major__) "." SDECOR_STR(__clang_minor__) "." SDECOR_STR(__clang_patchlevel__);
#elif defined(__GNUC__)
  return "gcc-" SDECOR_STR(__GNUC__) "." SDECOR_STR(__GNUC_MINOR__) "." SDECOR_STR(__GNUC_PATCHLEVEL__);
#elif defined(_MSC_VER)
  return "msvc-" SDECOR_STR(_MSC_VER);
#else
  return "unknown";
#endif
}

std::string build_info() {
  std::string s = "torch=" SDECOR_STR(TORCH_VERSION_MAJOR) "." SDECOR_STR(TORCH_VERSION_MINOR) "." SDECOR_STR(
      TORCH_VERSION_PATCH);
  s += ";cxx=" + compiler();
#if defined(SDECOR_WITH_CUDA)
  s += ";" + cuda_build_info();
#else
  s += ";cuda=none;archs=none";
#endif
  s += ";" + cpu::whiten_isa_info();
  s += ";ops=build_info,eigh_small,native_whiten_stats,native_whiten_apply,native_whiten_reduce,native_whiten_dx,"
       "native_topk_mask,native_newton,native_newton_backward,native_newton_train,native_newton_train_backward,cpu_isa,set_cpu_isa";
  return s;
}

}  // namespace
}  // namespace sdecor

TORCH_LIBRARY(sdecor, m) {
  m.def("build_info() -> str", &sdecor::build_info);
  m.def("eigh_small(Tensor a) -> (Tensor eigenvalues, Tensor eigenvectors)");
}

TORCH_LIBRARY_IMPL(sdecor, CPU, m) { m.impl("eigh_small", &sdecor::eigh_small_cpu); }

TORCH_LIBRARY_IMPL(sdecor, Meta, m) { m.impl("eigh_small", &sdecor::eigh_small_meta); }

// eigh_small has no derivative of its own (the ZCA backward is a separate formula): backpropagating
// through it raises instead of passing wrong gradients on.
TORCH_LIBRARY_IMPL(sdecor, Autograd, m) {
  m.impl("eigh_small", torch::autograd::autogradNotImplementedFallback());
}

// Under torch.autocast eigh_small runs on its input as given (float32 or float64: a covariance in the
// statistics dtype) with autocast excluded (no_autocast.h); bf16 / fp16 are not eigh_small's dtypes.
TORCH_LIBRARY_IMPL(sdecor, AutocastCPU, m) {
  m.impl("eigh_small", torch::CppFunction::makeFromBoxedFunction<&sdecor::no_autocast_boxed>());
}

TORCH_LIBRARY_IMPL(sdecor, AutocastCUDA, m) {
  m.impl("eigh_small", torch::CppFunction::makeFromBoxedFunction<&sdecor::no_autocast_boxed>());
}

// Importing sdecor._C loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "sdecor native ops (registered in torch.ops.sdecor)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
