// Run-time choice of the CPU microkernels of the whitening passes (whiten_dispatch.cpp).
#pragma once

#include <string>
#include <type_traits>

#include "cpu/whiten_kernels.h"

namespace sdecor {
namespace cpu {

// The table in use: the one set by set_cpu_isa, else SDECOR_CPU_ISA's, else the best this CPU runs
// (avx512, avx2, portable). Raises a clear error when SDECOR_CPU_ISA names no path or one this CPU
// (or this build) cannot run.
const sdecor_whiten_isa& whiten_isa();

// The kernels of `isa` for the scalar type T (float or double).
template <typename T>
const auto& kernels_of(const sdecor_whiten_isa& isa) {
  if constexpr (std::is_same_v<T, double>) {
    return isa.f64;
  } else {
    return isa.f32;
  }
}

// "cpu_isa=<the path in use>;cpu_isas=<every path this build and CPU can run>" for build_info (never raises).
std::string whiten_isa_info();

}  // namespace cpu
}  // namespace sdecor
