"""topk_mask: replace the k least (or most) salient positions of every sample.

Public function (checks once, picks the backend from ``SUPPORTS``) -> backends:

- ``triton``: the op ``sdecor::topk_mask`` (launcher :func:`sdecor_kernels.topk.launch_topk_mask`: score
  keys, an exact radix select of the k-th key per row, and one pass writing x_masked for every fill),
  with its autograd below. Picked automatically for CUDA tensors of float16, bfloat16 and float32;
  runs on CPU tensors only when forced under ``TRITON_INTERPRET=1``.
- ``native``: :func:`sdecor.ops.topk_native.topk_mask_native`, the C++ op ``sdecor::native_topk_mask``
  of ``sdecor._C`` (``csrc/topk_cpu.cpp``: per sample, order-preserving score keys, the k-th key by a
  histogram of their top bits and nth_element within one bucket, then one pass writing the mask and
  x_masked), with the autograd of the triton op. Takes CPU tensors of float32, float64, bfloat16 and
  float16; picked where the extension is built and the CPU choice table (:mod:`sdecor._cpu_choice`)
  names it for the dtype. Every output equals the torch backend's bit for bit, the uniform noise aside.
- ``torch``: :func:`sdecor.ops.topk_torch.topk_mask_torch`, bit-identical to the reference.

All backends give identical masks (ties by lower flat index, NaN ranked as the largest value,
-0.0 equal to +0.0). The ``uniform`` fill draws from ``generator`` on each, but from different
streams: the torch backend with ``torch.rand`` like the reference, the triton and native backends
with Philox under a seed and counter taken from the generator (:func:`philox_seed`, keyed by the
element's flat index, so the native result does not depend on the thread count); each repeats under
the same generator state.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _checks, _ext
from .._layout import like_format
from .._precision import no_autocast, stats_dtype
from . import topk_native, topk_torch
from ._library import triton_custom_op

__all__ = ["NATIVE_DTYPES", "SUPPORTS", "philox_seed", "topk_mask", "topk_mask_triton"]

# Backends of topk_mask per device type, in order of preference ("interpret": forced only, on CPU
# tensors under TRITON_INTERPRET=1).
SUPPORTS = {"cuda": ("triton", "torch"), "cpu": ("native", "torch"), "interpret": ("triton",)}

# dtypes of x and saliency the native kernel takes (others: the torch backend)
NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@no_autocast
def topk_mask(x: Tensor, saliency: Tensor, *, ratio=None, k=None, largest: bool = False,
              reduce="mean", abs: bool = True, fill: str = "zero", value: float = 0.0, baseline=None,
              generator=None) -> tuple[Tensor, Tensor]:
    """Replace the k least (largest=True: most) salient positions of every sample.

    score = |saliency| (abs=False: saliency), averaged over channels for reduce="mean" (one mask
    (N, *S) shared by all channels) or per element for reduce=None (mask shaped like x). k =
    floor(ratio * D) or k given (exactly one), D the scores per sample. Ties go to the lower flat
    index, NaN ranks as the largest score. fill: "zero", "constant" (``value``), "mean" / "uniform"
    (per-sample, per-channel mean / U[min, max] of x over S; uniform draws from ``generator``),
    "baseline" (``baseline``, shaped like x). Returns (x_masked, mask), mask bool, True = replaced.
    """
    _checks.check_mask_args(x, saliency, reduce, fill, value, baseline, largest, abs)
    D = math.prod(x.shape[2:]) * (1 if reduce == "mean" else x.shape[1])
    k = _checks.resolve_k(D, ratio, k)
    _checks.check_generator(generator, x.device)
    backend = _backend.select("topk_mask", {"x": x, "saliency": saliency}, _supports(x, saliency))
    if backend == "torch":
        return topk_torch.topk_mask_torch(x, saliency, k, largest, reduce, abs, fill, value, baseline, generator)
    # an empty x draws nothing, so the generator is left as the torch backend leaves it
    seed, call = philox_seed(generator, x.device) if fill == "uniform" and x.numel() else (0, 0)
    if backend == "triton":
        return topk_mask_triton(x, saliency, k, largest, reduce, abs, fill, value, baseline, seed, call)
    return topk_native.topk_mask_native(x, saliency, k, largest, reduce, abs, fill, value, baseline, seed, call)


def _supports(x: Tensor, saliency: Tensor):
    """SUPPORTS, without native for dtypes its kernel does not take (forced native: an error)."""
    if x.dtype in NATIVE_DTYPES and saliency.dtype in NATIVE_DTYPES:
        return SUPPORTS
    if _backend.forced() == "native":
        raise _backend.BackendUnavailableError(
            f"sdecor.topk_mask: the 'native' backend takes {', '.join(str(d) for d in NATIVE_DTYPES)} "
            f"tensors; got x {x.dtype}, saliency {saliency.dtype} (use the 'torch' backend for them)")
    return {dev: tuple(b for b in backends if b != "native") for dev, backends in SUPPORTS.items()}


# ---------------------------------------------------------------------------------------------------
# triton backend


def philox_seed(generator, device: torch.device) -> tuple[int, int]:
    """(seed, counter) for one Philox stream drawn from ``generator`` (default: device's), no sync.

    CUDA generators give their seed and current offset, and the offset is advanced (as torch's own
    Philox ops do); CPU generators draw two int64 on the host.
    """
    if generator is None:
        generator = (torch.cuda.default_generators[device.index if device.index is not None
                                                   else torch.cuda.current_device()]
                     if device.type == "cuda" else torch.default_generator)
    if generator.device.type == "cpu":
        seed, call = torch.randint(0, 2**62, (2,), generator=generator, dtype=torch.int64).tolist()
        return seed, call
    offset = generator.get_offset()
    generator.set_offset(offset + 4)
    return generator.initial_seed() & (2**63 - 1), offset


def topk_mask_triton(x, saliency, k, largest, reduce, abs, fill, value, baseline, seed: int, call: int):
    """(x_masked, mask) of :func:`topk_mask` on the triton backend for a resolved k and the Philox
    stream (seed, call) of the uniform fill (arguments checked by the caller)."""
    # the constant rounded to x's dtype once, as torch.full(value, dtype=x.dtype) does
    value = float(torch.tensor(float(value), dtype=x.dtype)) if fill == "constant" else 0.0
    out, mask = topk_mask_op(x, saliency, k, bool(largest), reduce == "mean", bool(abs), fill, value,
                             baseline if fill == "baseline" else None, seed, call)
    return like_format(out, x), mask


@triton_custom_op("topk_mask")
def topk_mask_op(x: Tensor, saliency: Tensor, k: int, largest: bool, shared: bool, abs: bool, fill: str,
                 value: float, baseline: Optional[Tensor], seed: int, call: int) -> tuple[Tensor, Tensor]:
    """(x_masked, mask); shared: one mask (N, *S) for all channels (reduce="mean")."""
    from sdecor_kernels import topk

    return topk.launch_topk_mask(x, saliency, k, largest, shared, abs, fill, value, baseline, seed, call)


def _topk_mask_setup(ctx, inputs, output):
    x, _, _, _, shared, _, fill, _, baseline, _, _ = inputs
    x_masked, mask = output
    ctx.fill, ctx.shared, ctx.has_baseline = fill, shared, baseline is not None
    ctx.baseline_dtype = baseline.dtype if baseline is not None else None
    ctx.save_for_backward(x if fill in ("mean", "uniform") else None,
                          x_masked if fill == "uniform" else None, mask)


def _topk_mask_backward(ctx, grad_out, _grad_mask):
    """Gradients of x_masked = where(mask, fill, x), the fill differentiated like the reference's.

    x gets grad where it is kept; "mean" adds the per-channel mean of the masked grad; "uniform"
    (lo + (hi - lo) u, u recovered from the output) sends sum(grad (1 - u)) to the channel's minima
    and sum(grad u) to its maxima, split evenly among ties as amin / amax do; "baseline" gets grad
    where it replaced x. Torch ops, linear in grad_out with constant coefficients: a double backward
    differentiates them exactly.
    """
    x, x_masked, mask = ctx.saved_tensors
    where = mask.unsqueeze(1) if ctx.shared else mask
    grad_x = grad_out.masked_fill(where, 0)
    grad_masked = grad_out.masked_fill(~where, 0)
    spatial = tuple(range(2, grad_out.dim()))
    if ctx.fill == "mean":
        if spatial:
            grad_x = grad_x + grad_masked.sum(spatial, keepdim=True) / math.prod(grad_out.shape[2:])
        else:
            grad_x = grad_x + grad_masked
    elif ctx.fill == "uniform":
        # x enters only through which positions hold the minima / maxima and through u, both constant
        # for the derivative: detached, so that a double backward sees a backward linear in grad_out
        sd = stats_dtype(x.dtype)                  # fp32, fp64 for fp64 x (native backend)
        xs = x.detach().to(sd)
        lo = xs.amin(dim=spatial, keepdim=True) if spatial else xs
        hi = xs.amax(dim=spatial, keepdim=True) if spatial else xs
        span = hi - lo
        u = torch.where(span > 0, (x_masked.detach().to(sd) - lo) / span.clamp_min(1e-30),
                        torch.zeros_like(span))
        gm = grad_masked.to(sd)
        g_lo = (gm * (1 - u)).sum(spatial, keepdim=True) if spatial else gm * (1 - u)
        g_hi = (gm * u).sum(spatial, keepdim=True) if spatial else gm * u
        at_lo, at_hi = (xs == lo).to(sd), (xs == hi).to(sd)
        if spatial:
            at_lo = at_lo / at_lo.sum(spatial, keepdim=True)
            at_hi = at_hi / at_hi.sum(spatial, keepdim=True)
        grad_x = grad_x + (g_lo * at_lo + g_hi * at_hi).to(grad_x.dtype)
    grad_baseline = grad_masked.to(ctx.baseline_dtype) if ctx.has_baseline else None
    return grad_x, None, None, None, None, None, None, None, grad_baseline, None, None


topk_mask_op.register_autograd(_topk_mask_backward, setup_context=_topk_mask_setup)


# run when the extension is imported (select imports it before it picks native): the native op's
# autograd is the triton op's above
_ext.on_load(functools.partial(topk_native.register_autograd, no_autocast(_topk_mask_backward), _topk_mask_setup))
