"""Backend selection: ``torch`` (reference), ``triton`` (fused GPU kernels) and ``native`` (sdecor._C).

Selection order for an op:

1. a backend forced by :func:`use_backend` (innermost context wins), else by ``SDECOR_BACKEND``;
   a forced backend that cannot run the op on the given tensors raises :class:`BackendUnavailableError`
   with the reason -- there is never a silent fallback;
2. otherwise the fastest backend that can run: for CUDA tensors the first available of the op's GPU
   preference order; for CPU tensors the backend that the measured choice table
   (:mod:`sdecor._cpu_choice`) names for the op, the input's dtype and the group size d, and where it
   cannot run (no extension built, a dtype its kernel does not take) or the table has no entry, the
   first available of the op's CPU order (``native`` where the op has a C++ kernel, then ``torch``).
   Triton runs on CPU tensors only under ``TRITON_INTERPRET=1`` and is never picked automatically
   there (the interpreter is for tests).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from typing import Mapping, Sequence

import torch

from . import _cpu_choice, _ext

BACKENDS = ("torch", "triton", "native")
ENV_VAR = "SDECOR_BACKEND"

# dtypes the Triton kernels take (statistics in fp32, outputs in the input's dtype)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for cannot run this op on these tensors."""


_local = threading.local()


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name.lower()


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block: ``with sdecor.use_backend("torch"): ...``.

    ``None`` restores automatic selection inside the block (also overriding ``SDECOR_BACKEND``).
    """
    value = None if name is None else _check_name(name, "backend")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(value if value is not None else "auto")
    try:
        yield value
    finally:
        stack.pop()


def forced() -> str | None:
    """The backend forced by the innermost :func:`use_backend` or by ``SDECOR_BACKEND``, else None."""
    stack = getattr(_local, "stack", None)
    if stack:
        top = stack[-1]
        return None if top == "auto" else top
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env.lower() != "auto":
        return _check_name(env, f"the environment variable {ENV_VAR}")
    return None


# ---------------------------------------------------------------------------------------------------
# availability


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_reason(device: torch.device) -> str | None:
    """None when Triton kernels can run on ``device``; otherwise why not."""
    if not triton_installed():
        return "Triton is not installed (it ships with CUDA builds of PyTorch on Linux)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreter_on():
            return None
        return ("Triton kernels need a CUDA tensor; CPU tensors run them only under the interpreter "
                "(set TRITON_INTERPRET=1 before Triton is imported)")
    return f"Triton kernels do not run on {device.type} tensors"


def _ext_error() -> str | None:
    return _ext.error()


# torch.compile runs it (importing the extension on a first call inside a compiled region) and takes
# its result as a constant: the extension's availability does not change within a process. This is
# the flag torch.compiler.assume_constant_result sets; calling that here would import torch._dynamo
# (and Triton) at `import sdecor`.
_ext_error._dynamo_marked_constant = True


def native_reason(device: torch.device) -> str | None:
    """None when the extension can run on ``device``; otherwise why not."""
    err = _ext_error()
    if err is not None:
        return err
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not _ext.has_cuda():
            return ("the native extension was built without its CUDA part (no CUDA toolkit at build "
                    "time, or USE_CUDA=0); rebuild with CUDA_HOME set to use it on CUDA tensors")
        return None
    return f"the native extension has no kernels for {device.type} tensors"


def reason(backend: str, device: torch.device) -> str | None:
    if backend == "torch":
        return None
    if backend == "triton":
        return triton_reason(device)
    return native_reason(device)


def available(device: torch.device | str = "cpu") -> list[str]:
    """Backends able to run on ``device`` (ignoring which ops each one implements)."""
    device = torch.device(device)
    return [b for b in BACKENDS if reason(b, device) is None]


def select(op: str, tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
           supports: Mapping[str, Sequence[str]], d: int | None = None) -> str:
    """Pick the backend for ``op`` on ``tensors`` (argument name -> tensor, or a sequence of tensors;
    the first one gives the device and, on the CPU, the dtype of the choice table's row).

    ``supports`` maps a device type to the backends that implement ``op`` there, in order of
    preference, e.g. ``{"cuda": ("triton", "torch"), "cpu": ("native", "torch"),
    "interpret": ("triton",)}``. ``"interpret"`` lists backends that can be forced on CPU tensors
    through the Triton interpreter but are never picked automatically. Triton runs only when every
    tensor has one of :data:`TRITON_DTYPES`: otherwise it is skipped, or, when forced, an error.
    ``d``: the group size (the side of the d x d matrices for whitening_matrix), the column of the
    CPU choice table; None reads only rows that do not depend on it.
    """
    if not isinstance(tensors, Mapping):
        tensors = {f"input {i}": t for i, t in enumerate(tensors)}
    device = next(iter(tensors.values())).device
    dev_type = device.type
    triton_ok = all(t.dtype in TRITON_DTYPES for t in tensors.values())
    want = forced()
    if want == "triton" and not triton_ok:
        got = ", ".join(f"{name} {t.dtype}" for name, t in tensors.items())
        raise BackendUnavailableError(
            f"sdecor.{op}: the 'triton' backend takes {', '.join(str(d) for d in TRITON_DTYPES)} "
            f"tensors; got {got} (use the 'torch' backend for it)")
    if not triton_ok:
        supports = {k: tuple(b for b in v if b != "triton") for k, v in supports.items()}
    preferred = tuple(supports.get(dev_type, ()))
    if "torch" not in preferred:
        preferred += ("torch",)
    if want is not None:
        implemented = set(preferred)
        if dev_type == "cpu":
            implemented |= set(supports.get("interpret", ()))
        if want not in implemented:
            raise BackendUnavailableError(
                f"sdecor.{op}: the {want!r} backend has no implementation for {dev_type} tensors "
                f"(implemented there: {', '.join(sorted(implemented))})")
        why = reason(want, device)
        if why is not None:
            raise BackendUnavailableError(f"sdecor.{op}: the {want!r} backend cannot run: {why}")
        return want
    if dev_type == "cpu":
        first = _cpu_choice.choice(op, next(iter(tensors.values())).dtype, d)
        if first in preferred:
            preferred = (first,) + tuple(b for b in preferred if b != first)
    for backend in preferred:
        if reason(backend, device) is None:
            return backend
    return "torch"
