"""Top-k saliency masking: ``topk_mask`` (dispatch), ``SaliencyMasker``, ``saliency``, ``progressive_masks``.

Backends of ``topk_mask``:

- ``triton``: three fused kernels (:mod:`sdecor_kernels.topk`) registered as the custom op
  ``sdecor::topk_mask``: score keys, an exact radix select of the k-th key per row, and one pass
  writing x_masked for every fill. Picked automatically for CUDA tensors of float16, bfloat16 and
  float32; runs on CPU tensors only when forced under ``TRITON_INTERPRET=1``.
- ``torch``: the reference semantics with a faster selection: scores are mapped to order-preserving
  integer keys that also encode the flat index, so every key is distinct, and one
  ``torch.kthvalue`` per row finds the k-th, replacing the reference's two stable sorts. The mask and
  every output, uniform noise included, are bit-identical to :func:`sdecor.reference.topk_mask`
  (float64 saliency goes through the reference itself).

Both backends give identical masks (ties by lower flat index, NaN ranked as the largest value,
-0.0 equal to +0.0). The ``uniform`` fill draws from ``generator`` on both, but from different
streams: the torch backend with ``torch.rand`` like the reference, the triton backend with Philox
under a seed and counter taken from the generator, so both repeat under the same generator state.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from . import _backend
from . import reference as ref

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FAST_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------------
# order-preserving keys (torch)


def value_keys(score: torch.Tensor, largest: bool) -> torch.Tensor:
    """int32 keys of float scores whose ascending order is the selection order of the values.

    The float32 bits made order-preserving as a signed int32 (negatives: non-sign bits flipped),
    -0.0 equal to +0.0 (adding +0.0 turns -0.0 into +0.0), every NaN above +inf; bitwise-inverted
    for largest=True (an order reversal without overflow). Equal keys are ties.
    """
    s = score.to(torch.float32) + 0.0                                # -0.0 -> +0.0
    bits = s.view(torch.int32)
    keys = bits >> 31                                                # -1 for negatives, else 0
    keys &= 0x7FFFFFFF
    keys ^= bits
    keys.masked_fill_(torch.isnan(s), 2**31 - 1)                     # above +inf
    return keys.bitwise_not_() if largest else keys


def order_keys(score: torch.Tensor, largest: bool) -> torch.Tensor:
    """int64 keys (N, D), distinct per row, whose ascending order is the full selection order:
    (value key << 32) | flat index, so that ties go to the lower flat index."""
    index = torch.arange(score.shape[1], device=score.device, dtype=torch.int64)
    return (value_keys(score, largest).to(torch.int64) << 32) | index


def select_mask(score: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Bool (N, D): the k first positions of every row in selection order (reference.rank_order).

    The k-th value key per row by torch.kthvalue; then every key below it and, among the keys equal
    to it, the first (k - count below) in index order.
    """
    N, D = score.shape
    if k == 0 or D == 0:
        return torch.zeros((N, D), dtype=torch.bool, device=score.device)
    if score.dtype not in FAST_TORCH_DTYPES:
        mask = torch.zeros((N, D), dtype=torch.bool, device=score.device)
        return mask.scatter_(1, ref.rank_order(score, largest)[:, :k], True)
    keys = value_keys(score, largest)
    kth = torch.kthvalue(keys, k, dim=1, keepdim=True).values
    below = keys < kth
    tied = keys == kth
    room = k - below.sum(1, keepdim=True, dtype=torch.int32)         # how many tied ones to take
    # int32 counts: half the memory traffic of the default int64 (D < 2**31)
    return below | (tied & (tied.cumsum(1, dtype=torch.int32) <= room))


def _topk_mask_torch(x, saliency, k, largest, reduce, abs, fill, value, baseline, generator):
    score = ref.mask_scores(saliency, reduce, abs)                   # (N, D), as the reference
    mask = select_mask(score, k, largest)
    mask = mask.reshape((x.shape[0],) + tuple(x.shape[2:]) if reduce == "mean" else x.shape)
    where = mask.unsqueeze(1) if reduce == "mean" else mask
    x_masked = torch.where(where, ref.fill_values(x, fill, value, baseline, generator), x)
    return x_masked, mask


# ---------------------------------------------------------------------------------------------------
# triton backend: the custom op


_triton_op = None


def _get_triton_op():
    """Register ``sdecor::topk_mask`` on first use: triton_op + wrap_triton on GPUs.

    Under the interpreter (TRITON_INTERPRET=1) ``wrap_triton`` hands back the plain interpreted
    kernel, which no graph can capture, so there the same function is registered as an opaque
    custom op with a fake impl; the schema is the same.
    """
    global _triton_op
    if _triton_op is not None:
        return _triton_op
    from torch.library import custom_op, triton_op

    from sdecor_kernels import topk as kernels

    interpret = _backend.interpreter_on()

    def topk_mask_op(x: torch.Tensor, saliency: torch.Tensor, k: int, largest: bool, shared: bool,
                     abs: bool, fill: str, value: float, baseline: Optional[torch.Tensor], seed: int,
                     call: int) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.topk_mask(x, saliency, k, largest, shared, abs, fill, value, baseline, seed, call)

    if not interpret:
        op = triton_op("sdecor::topk_mask", topk_mask_op, mutates_args=())
        op.register_autograd(_topk_mask_backward, setup_context=_topk_mask_setup)
        _triton_op = op
        return _triton_op
    op = custom_op("sdecor::topk_mask", topk_mask_op, mutates_args=())
    op.register_autograd(_topk_mask_backward, setup_context=_topk_mask_setup)

    @op.register_fake
    def _(x, saliency, k, largest, shared, abs, fill, value, baseline, seed, call):
        mask_shape = (x.shape[0],) + tuple(x.shape[2:]) if shared else x.shape
        return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
                torch.empty(mask_shape, dtype=torch.bool, device=x.device))

    _triton_op = op
    return _triton_op


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
    where it replaced x.
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
        xs = x.to(torch.float32)
        lo = xs.amin(dim=spatial, keepdim=True) if spatial else xs
        hi = xs.amax(dim=spatial, keepdim=True) if spatial else xs
        span = hi - lo
        u = torch.where(span > 0, (x_masked.to(torch.float32) - lo) / span.clamp_min(1e-30),
                        torch.zeros_like(span))
        gm = grad_masked.to(torch.float32)
        g_lo = (gm * (1 - u)).sum(spatial, keepdim=True) if spatial else gm * (1 - u)
        g_hi = (gm * u).sum(spatial, keepdim=True) if spatial else gm * u
        at_lo, at_hi = (xs == lo).to(torch.float32), (xs == hi).to(torch.float32)
        if spatial:
            at_lo = at_lo / at_lo.sum(spatial, keepdim=True)
            at_hi = at_hi / at_hi.sum(spatial, keepdim=True)
        grad_x = grad_x + (g_lo * at_lo + g_hi * at_hi).to(grad_x.dtype)
    grad_baseline = grad_masked.to(ctx.baseline_dtype) if ctx.has_baseline else None
    return grad_x, None, None, None, None, None, None, None, grad_baseline, None, None


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


def _topk_mask_triton(x, saliency, k, largest, reduce, abs, fill, value, baseline, generator):
    seed, call = philox_seed(generator, x.device) if fill == "uniform" else (0, 0)
    # the constant rounded to x's dtype once, as torch.full(value, dtype=x.dtype) does
    value = float(torch.tensor(float(value), dtype=x.dtype)) if fill == "constant" else 0.0
    out, mask = _get_triton_op()(x, saliency, k, bool(largest), reduce == "mean", bool(abs), fill,
                                 value, baseline if fill == "baseline" else None, seed, call)
    return ref.like_format(out, x), mask


# ---------------------------------------------------------------------------------------------------
# public function


def _check_generator(generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator must be on x's device type {device.type!r}; got a generator on "
                         f"{generator.device.type!r}")


def _supports(x: torch.Tensor, saliency: torch.Tensor) -> dict:
    if x.dtype in TRITON_DTYPES and saliency.dtype in TRITON_DTYPES:
        return {"cuda": ("triton", "torch"), "cpu": ("torch",), "interpret": ("triton",)}
    return {"cuda": ("torch",), "cpu": ("torch",)}


def _num_scores(x: torch.Tensor, reduce) -> int:
    return math.prod(x.shape[2:]) * (1 if reduce == "mean" else x.shape[1])


def topk_mask(x: torch.Tensor, saliency: torch.Tensor, *, ratio=None, k=None, largest: bool = False,
              reduce="mean", abs: bool = True, fill: str = "zero", value: float = 0.0, baseline=None,
              generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the k least (largest=True: most) salient positions of every sample.

    score = |saliency| (abs=False: saliency), averaged over channels for reduce="mean" (one mask
    (N, *S) shared by all channels) or per element for reduce=None (mask shaped like x). k =
    floor(ratio * D) or k given (exactly one), D the scores per sample. Ties go to the lower flat
    index, NaN ranks as the largest score. fill: "zero", "constant" (``value``), "mean" / "uniform"
    (per-sample, per-channel mean / U[min, max] of x over S; uniform draws from ``generator``),
    "baseline" (``baseline``, shaped like x). Returns (x_masked, mask), mask bool, True = replaced.
    """
    ref.check_mask_args(x, saliency, reduce, fill, value, baseline)
    k = ref.resolve_k(_num_scores(x, reduce), ratio, k)
    _check_generator(generator, x.device)
    want = _backend.forced()
    if want == "triton" and not (x.dtype in TRITON_DTYPES and saliency.dtype in TRITON_DTYPES):
        raise _backend.BackendUnavailableError(
            f"sdecor.topk_mask: the 'triton' backend supports x and saliency of "
            f"{', '.join(str(d) for d in TRITON_DTYPES)}; got x {x.dtype}, saliency {saliency.dtype}")
    backend = _backend.select("topk_mask", (x,), _supports(x, saliency))
    run = _topk_mask_triton if backend == "triton" else _topk_mask_torch
    return run(x, saliency, k, largest, reduce, abs, fill, value, baseline, generator)


# ---------------------------------------------------------------------------------------------------
# module form


def _check_ratio_k(ratio, k) -> None:
    if (ratio is None) == (k is None):
        raise ValueError(f"give exactly one of ratio and k; got ratio={ratio!r}, k={k!r}")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or not 0.0 <= ratio <= 1.0):
        raise ValueError(f"ratio must be a number in [0, 1]; got {ratio!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
        raise ValueError(f"k must be a non-negative int; got {k!r}")


def _check_options(reduce, fill, value) -> None:
    if reduce not in ("mean", None):
        raise ValueError(f"reduce must be 'mean' or None; got {reduce!r}")
    if fill not in ref.FILLS:
        raise ValueError(f"fill must be one of {ref.FILLS}; got {fill!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"value must be a number; got {value!r}")


class SaliencyMasker(nn.Module):
    """:func:`topk_mask` as a module: ``forward(x, saliency, baseline=None) -> (x_masked, mask)``.

    Holds the masking options (ratio or k, largest, reduce, abs, fill, value, generator); no
    parameters or buffers. ``baseline`` is given per call for fill="baseline".
    """

    def __init__(self, ratio=None, k=None, *, largest: bool = False, reduce="mean", abs: bool = True,
                 fill: str = "zero", value: float = 0.0, generator=None):
        super().__init__()
        _check_ratio_k(ratio, k)
        _check_options(reduce, fill, value)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
        self.ratio, self.k, self.largest, self.reduce = ratio, k, bool(largest), reduce
        self.abs, self.fill, self.value, self.generator = bool(abs), fill, value, generator

    def forward(self, x: torch.Tensor, saliency: torch.Tensor, baseline=None):
        return topk_mask(x, saliency, ratio=self.ratio, k=self.k, largest=self.largest,
                         reduce=self.reduce, abs=self.abs, fill=self.fill, value=self.value,
                         baseline=baseline, generator=self.generator)

    def extra_repr(self) -> str:
        amount = f"ratio={self.ratio}" if self.ratio is not None else f"k={self.k}"
        return (f"{amount}, largest={self.largest}, reduce={self.reduce!r}, abs={self.abs}, "
                f"fill={self.fill!r}" + (f", value={self.value}" if self.fill == "constant" else ""))


# ---------------------------------------------------------------------------------------------------
# saliency


def saliency(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|d logit_y / d x| for a whole batch with one backward pass, shaped like x.

    The model runs in eval mode during the pass (so samples do not interact through batch
    statistics, and the per-sample logits can be summed into one backward); afterwards every
    module's training flag is what it was. Only x's gradient is computed: parameters' ``.grad``
    are left untouched. The result is detached. Works under ``torch.no_grad()`` too.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    ref.check_input(x, "x", min_dim=2, max_dim=5)
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16,
                                                           torch.int8, torch.uint8):
        got = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
        raise TypeError(f"y must be an integer tensor of class indices; got {got}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape (N,) = ({x.shape[0]},); got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"y must be on x's device {x.device}; got {y.device}")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            logits = model(xi)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"model(x) must return logits of shape (N, num_classes); got {got}")
            picked = logits.gather(1, y.long()[:, None]).sum()
            (grad,) = torch.autograd.grad(picked, xi)
    finally:
        for m, mode in modes:
            m.training = mode
    return grad.abs()


# ---------------------------------------------------------------------------------------------------
# progressive masking


class ProgressiveMasks(NamedTuple):
    """x_masked (L, N, C, *S) and mask (L, N, *S) or (L, *x.shape), one level per ratio."""
    x_masked: torch.Tensor
    mask: torch.Tensor


def progressive_masks(x: torch.Tensor, saliency: torch.Tensor, ratios: Sequence[float], *,
                      largest: bool = True, reduce="mean", abs: bool = True, fill: str = "zero",
                      value: float = 0.0, baseline=None, generator=None) -> ProgressiveMasks:
    """Every masking level of a deletion / insertion curve from one ranking of the scores.

    ``ratios``: non-decreasing numbers in [0, 1]. Level i masks the k_i = floor(ratios[i] * D)
    first positions of each sample in selection order (largest=True, the default: most salient
    first, for deletion curves; largest=False: least salient first), so each level's mask contains
    the previous one. Fill values are computed once and shared by all levels (one draw from
    ``generator`` for "uniform"). Level i equals ``topk_mask(x, saliency, ratio=ratios[i], ...)``
    with the same options and, for "uniform", the same generator state (on the torch backend).
    Returns ``ProgressiveMasks(x_masked, mask)`` stacked along a new first dim of size L.
    """
    ref.check_mask_args(x, saliency, reduce, fill, value, baseline)
    _check_generator(generator, x.device)
    try:
        ratios = [r for r in ratios]
    except TypeError:
        raise TypeError(f"ratios must be a sequence of numbers; got {type(ratios).__name__}") from None
    if not ratios:
        raise ValueError("ratios must hold at least one ratio; got an empty sequence")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
            raise ValueError(f"every ratio must be a number in [0, 1]; got {r!r} in ratios={ratios!r}")
    if any(b < a for a, b in zip(ratios, ratios[1:])):
        raise ValueError(f"ratios must be non-decreasing (nested masks); got {ratios!r}")
    score = ref.mask_scores(saliency, reduce, abs)                   # (N, D)
    N, D = score.shape
    if score.dtype in FAST_TORCH_DTYPES:
        order = torch.sort(order_keys(score, largest), dim=1).indices
    else:
        order = ref.rank_order(score, largest)
    rank = torch.empty_like(order)                                   # position -> rank in the order
    rank.scatter_(1, order, torch.arange(D, device=x.device).expand(N, D))
    ks = torch.tensor([math.floor(r * D) for r in ratios], device=x.device)
    mask = rank.unsqueeze(0) < ks.view(-1, 1, 1)                     # (L, N, D)
    mask = mask.reshape((len(ratios), N) + (tuple(x.shape[2:]) if reduce == "mean" else tuple(x.shape[1:])))
    where = mask.unsqueeze(2) if reduce == "mean" else mask
    fill_value = ref.fill_values(x, fill, value, baseline, generator)
    return ProgressiveMasks(torch.where(where, fill_value, x.unsqueeze(0)), mask)
