// Which microkernel table the whitening passes use (ops: cpu_isa() -> str, set_cpu_isa(str name)).
//
// The paths, best first: "avx512" (AVX-512 F/BW/VL + FMA), "avx2" (AVX2 + FMA), "portable" (the
// build's baseline ISA). A path runs where this build has its code (x86-64 for the first two) and the
// CPU has the instructions and the OS saves their registers (XCR0). The environment variable
// SDECOR_CPU_ISA=avx512|avx2|portable|auto forces one (read on first use and by set_cpu_isa("auto"));
// torch.ops.sdecor.set_cpu_isa(name) forces one at run time, "auto" returning to SDECOR_CPU_ISA or the
// best. Each op call reads the choice once, so one call runs on one path.
#include "cpu/whiten_dispatch.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define SDECOR_X86 1
#endif

namespace sdecor {
namespace cpu {
namespace {

constexpr const char* kEnv = "SDECOR_CPU_ISA";
constexpr const char* kNames[] = {"avx512", "avx2", "portable"};

#if defined(SDECOR_X86)
// The register state the OS saves (XCR0) has all of `bits`: 0x6 = XMM + YMM, 0xE6 = + opmask + ZMM.
bool os_saves(uint32_t bits) {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(1, &a, &b, &c, &d) == 0 || (c & (1u << 27)) == 0) return false;   // OSXSAVE
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & bits) == bits;
}
#endif

const sdecor_whiten_isa* table(const std::string& name) {
  if (name == "avx512") return sdecor_whiten_isa_avx512();
  if (name == "avx2") return sdecor_whiten_isa_avx2();
  if (name == "portable") return sdecor_whiten_isa_portable();
  return nullptr;
}

// Why this process cannot run the path `name` (empty: it can).
std::string lacks(const std::string& name) {
  if (name == "portable") return "";
  if (table(name) == nullptr) return "this build has no " + name + " code (not an x86-64 build with GCC or clang)";
#if defined(SDECOR_X86)
  __builtin_cpu_init();
  if (name == "avx512") {
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")))
      return "this CPU lacks AVX-512 F/BW/VL or FMA";
    if (!os_saves(0xE6)) return "the OS does not enable the AVX-512 registers";
    return "";
  }
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return "this CPU lacks AVX2 or FMA";
  if (!os_saves(0x6)) return "the OS does not enable the AVX registers";
  return "";
#else
  return "not an x86-64 build";
#endif
}

std::string runnable() {
  std::string s;
  for (const char* n : kNames)
    if (lacks(n).empty()) s += (s.empty() ? "" : ",") + std::string(n);
  return s;
}

const sdecor_whiten_isa* checked(const std::string& name, const char* who) {
  TORCH_CHECK(name == "avx512" || name == "avx2" || name == "portable", who,
              " must be one of avx512, avx2, portable or auto; got '", name, "'");
  const std::string why = lacks(name);
  TORCH_CHECK(why.empty(), who, "=", name, " cannot run here: ", why, " (paths this machine runs: ", runnable(), ")");
  return table(name);
}

// SDECOR_CPU_ISA's path, else the best one
const sdecor_whiten_isa* by_default() {
  const char* env = std::getenv(kEnv);
  const std::string want = env == nullptr ? "" : env;
  if (!want.empty() && want != "auto") return checked(want, kEnv);
  for (const char* n : kNames)
    if (lacks(n).empty()) return table(n);
  return sdecor_whiten_isa_portable();
}

std::atomic<const sdecor_whiten_isa*> g_active{nullptr};

std::string cpu_isa_op() { return whiten_isa().name; }

void set_cpu_isa_op(std::string name) {
  g_active.store(name == "auto" ? by_default() : checked(name, "set_cpu_isa: name"));
}

}  // namespace

const sdecor_whiten_isa& whiten_isa() {
  const sdecor_whiten_isa* t = g_active.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = by_default();
    g_active.store(t, std::memory_order_release);
  }
  return *t;
}

std::string whiten_isa_info() {
  std::string active;
  try {
    active = whiten_isa().name;
  } catch (const c10::Error&) {
    active = std::string("none (invalid ") + kEnv + ")";
  }
  return "cpu_isa=" + active + ";cpu_isas=" + runnable();
}

}  // namespace cpu
}  // namespace sdecor

TORCH_LIBRARY_FRAGMENT(sdecor, m) {
  m.def("cpu_isa() -> str", &sdecor::cpu::cpu_isa_op);
  m.def("set_cpu_isa(str name) -> ()", &sdecor::cpu::set_cpu_isa_op);
}
