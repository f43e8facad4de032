// The Autocast kernel of every sdecor C++ op (docs/design.md, "Precision"): under torch.autocast an op runs
// on its inputs as given, with autocast excluded, as the Python ops of sdecor.ops._library do; the
// default (a fallthrough) would leave autocast on for the kernel's own calls. Register it with
//   m.impl(name, torch::CppFunction::makeFromBoxedFunction<&sdecor::no_autocast_boxed>())
// on the AutocastCPU and AutocastCUDA keys.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace sdecor {

inline void no_autocast_boxed(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

}  // namespace sdecor
