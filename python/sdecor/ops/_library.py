"""Registration of sdecor's Python-defined custom ops: one namespace, one helper for every op family.

Every op lives in the ``sdecor`` namespace (``torch.ops.sdecor.<name>``), beside the C++ ops of
``sdecor._C`` (``eigh_small``). An op module writes the body of a Triton-backed op as a plain function
and decorates it::

    @triton_custom_op("group_cov", "(Tensor x, int d) -> (Tensor, Tensor)")
    def group_cov_op(x, d):
        return stats.group_stats(x, d)          # launcher in sdecor_kernels (tensors in, tensors out)

    group_cov_op.register_autograd(backward, setup_context=setup)

and calls ``group_cov_op(x, d)``. The op is registered with torch.library on its first call, so that
``import sdecor`` stays cheap and Triton is imported only when a Triton op first runs (by the body's
launcher module). On a GPU it is a ``triton_op``: torch.compile sees the kernels, which the launchers
launch through ``wrap_triton``. Under the Triton interpreter (TRITON_INTERPRET=1, CPU tests)
interpreted kernels cannot be traced, so it is an opaque ``custom_op`` whose fake implementation is the
body itself (the launchers skip kernels on fake tensors).

Autocast (docs/design.md, "Precision"): every op has a kernel on the AutocastCPU and AutocastCUDA keys
(:func:`register_no_autocast`) that runs it with autocast off and its inputs as given, and its backward
runs under :func:`sdecor._precision.no_autocast`, so that the statistics and the d x d math stay in fp32
and the outputs keep the dtype of x, in eager code and under torch.compile alike. The C++ op
``eigh_small`` has the same kernel in ``csrc/ops.cpp``.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from .. import _backend
from .._precision import AUTOCAST_DEVICES, no_autocast

__all__ = ["NAMESPACE", "TritonCustomOp", "register_custom_ops", "register_no_autocast", "triton_custom_op"]

NAMESPACE = "sdecor"

_lock = threading.Lock()

# Every op defined so far (the op modules define theirs when imported), by qualified name.
_defined: dict[str, "TritonCustomOp"] = {}

# The registrations of register_no_autocast (a Library lives as long as its registrations).
_autocast_lib = torch.library.Library(NAMESPACE, "IMPL")


def register_no_autocast(name: str) -> None:
    """Under autocast (cpu and cuda), run the op ``sdecor::<name>`` with autocast off and its inputs
    as given.

    A variant of ``torch.library.register_autocast``, which registers the same kind of kernel on the
    Autocast keys (autocast excluded, then the op called again) but first casts every floating-point
    input other than fp64 to one ``cast_inputs`` dtype. That cast is wrong for these ops: the
    whitening ops must keep x's dtype, which is y's (x bf16 -> y bf16, as BatchNorm), and casting x
    to fp32 would change the output dtype, while bf16 inputs would change the statistics. So: no cast,
    and autocast off on every device type of AUTOCAST_DEVICES while the op runs (its body, e.g. the
    torch matmuls of the zca path, then computes in the dtypes it was written for).
    """
    overload = getattr(getattr(torch.ops, NAMESPACE), name).default
    kernel = no_autocast(overload)
    for key in _AUTOCAST_KEYS:
        _autocast_lib.impl(name, kernel, key)


# The dispatch keys of autocast on the device types of AUTOCAST_DEVICES.
_AUTOCAST_KEYS = tuple("Autocast" + {"cpu": "CPU", "cuda": "CUDA"}[t] for t in AUTOCAST_DEVICES)


class TritonCustomOp:
    """``sdecor::<name>`` with body ``fn``, registered on first use (see the module docstring)."""

    def __init__(self, name: str, fn: Callable, schema: str | None = None):
        self.name = name
        self.qualname = f"{NAMESPACE}::{name}"
        self.fn = fn
        self.schema = schema
        self._autograd = None
        self._op = None
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn
        _defined[self.qualname] = self

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """Gradients of the op (``torch.library.register_autograd``), attached when it is registered;
        ``backward`` runs with autocast off (the autograd engine runs it in the autocast state of the
        caller of ``.backward()``)."""
        if self._op is not None:
            raise RuntimeError(f"{self.qualname}: register_autograd after the op was registered")
        self._autograd = (no_autocast(backward), setup_context)

    @property
    def op(self):
        """The registered op (``torch.ops.sdecor.<name>``'s definition); registers it on first access."""
        if self._op is None:
            with _lock:
                if self._op is None:
                    self._op = self._register()
        return self._op

    def _register(self):
        lib = torch.library
        if _backend.interpreter_on():
            op = lib.custom_op(self.qualname, self.fn, mutates_args=(), schema=self.schema)
            op.register_fake(self.fn)
        else:
            op = lib.triton_op(self.qualname, self.fn, mutates_args=(), schema=self.schema)
        if self._autograd is not None:
            backward, setup = self._autograd
            op.register_autograd(backward, setup_context=setup)
        register_no_autocast(self.name)
        return op

    def __call__(self, *args):
        return self.op(*args)

    def __repr__(self) -> str:
        state = "registered" if self._op is not None else "registered on first call"
        return f"<sdecor op {self.qualname} ({state})>"


def triton_custom_op(name: str, schema: str | None = None) -> Callable[[Callable], TritonCustomOp]:
    """Decorator: the function becomes the body of the op ``sdecor::<name>`` (see the module docstring)."""
    def wrap(fn: Callable) -> TritonCustomOp:
        return TritonCustomOp(name, fn, schema)
    return wrap


def register_custom_ops() -> list[str]:
    """Register every op of the namespace now, e.g. before ``torch.export.load`` of a program that
    holds them (an op is otherwise registered on its first call, and a program deserialised before
    that cannot resolve it); the C++ ops come with the native extension, where it is built. Returns
    the qualified names of the ops now registered."""
    from .. import _ext, ops  # noqa: F401 -- defines the Python ops of every op module

    _ext.load()
    names = []
    for custom in _defined.values():
        custom.op
        names.append(custom.qualname)
    return sorted(names)
