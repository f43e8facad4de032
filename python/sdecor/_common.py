"""Helpers shared by the reference and the backends, each written once.

Layout: the statistics dtype, the (N, G, d, L) group view, the output memory format. Precision under
autocast: :func:`no_autocast` and :func:`no_autocast_function`. ZCA: the
whitening matrix from an eigendecomposition and its stable backward (DESIGN.md), as an autograd
Function that takes the eigensolver (torch.linalg.eigh, or sdecor's Jacobi solver on the native
backend). Top-k masking: the per-sample scores and the fill values, shared so that the torch backend
is bit-identical to the reference.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "AUTOCAST_DEVICES",
    "CORR_VAR_FLOOR",
    "channel_mask",
    "ZCAWhitening",
    "decorrelation",
    "decorrelation_from_cov",
    "decorrelation_per_group",
    "eye_like",
    "fill_values",
    "graph_backward",
    "grouped",
    "join_groups",
    "like_format",
    "mask_scores",
    "no_autocast",
    "no_autocast_function",
    "per_channel",
    "per_group",
    "power_of_two",
    "scale_for_corr",
    "rank_order",
    "samples_per_channel",
    "shifted_cov",
    "split_channels",
    "split_groups",
    "stats_dtype",
    "sym",
    "zca_backward",
    "zca_backward_dse",
    "zca_backward_scaled",
    "zca_from_eigh",
    "zca_from_eigh_scaled",
]


# ---------------------------------------------------------------------------------------------------
# layout and dtype


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and output dtype of statistics: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def samples_per_channel(x: torch.Tensor) -> int:
    """m = N * prod(S)."""
    return x.shape[0] * math.prod(x.shape[2:])


def grouped(x: torch.Tensor, num_channels: int) -> torch.Tensor:
    """View x (N, C, *S) as (N, G, d, L) with L = prod(S) (copies only for non-contiguous x)."""
    N, C = x.shape[:2]
    return x.reshape(N, C // num_channels, num_channels, math.prod(x.shape[2:]))


def split_channels(x: torch.Tensor, num_channels: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(x_even, x_last, r): the channels of the G - 1 full groups of d and those of the last group,
    r = C - (G - 1) d of them (r = d when d divides C), as views of x (N, C, *S).

    With a smaller last group (IterNorm's flexible groups) it is whitened as a group of its own:
    the paths that work on the (N, G, d, L) view of x run on each part (x_even has 0 channels when
    C <= d)."""
    C = x.shape[1]
    r = C - (-(-C // num_channels) - 1) * num_channels
    return x[:, :C - r], x[:, C - r:], r


def split_groups(t: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group values of G groups of d in the padded layout, (G,), (G, d) or (G, d, d), as (those
    of the G - 1 full groups, the last group's (1,), (1, r) or (1, r, r) block)."""
    return t[:-1], t[(slice(-1, None),) + (slice(None, r),) * (t.dim() - 1)]


def join_groups(even: torch.Tensor | None, last: torch.Tensor, d: int) -> torch.Tensor:
    """The inverse of :func:`split_groups`: the G - 1 full groups' values (None: no full group) and
    the last group's as (G,), (G, d) or (G, d, d), its block top-left and zeros in its padding
    (differentiable)."""
    if last.dim() > 1:
        last = torch.nn.functional.pad(last, [0, d - last.shape[-1]] * (last.dim() - 1))
    return last if even is None else torch.cat([even, last])


def by_part(d: int, fn, channels: list, groups: list) -> list:
    """fn(d_part, *channels_part, *groups_part) for each part of the channels: the full groups' and
    the last group's when it is smaller (the passes over x of the torch and native backends work on
    groups of d | C channels, which then do not exist), else the whole. ``channels``: tensors (N, C, *S) split along dim 1 (views);
    ``groups``: per-group tensors (G, ...) in the padded layout, split by
    :func:`split_groups`. Returns [the result] without a smaller last group, else
    [the full groups' result (None when C < d), the last group's]."""
    x_even, _, r = split_channels(channels[0], d)
    if r == d:
        return [fn(d, *channels, *groups)]
    ce = x_even.shape[1]
    split = [split_groups(t, r) for t in groups]
    even = fn(d, *[t[:, :ce] for t in channels], *[s[0] for s in split]) if ce else None
    return [even, fn(r, *[t[:, ce:] for t in channels], *[s[1] for s in split])]


def joined_parts(results: list, d: int) -> tuple:
    """The per-group results of :func:`by_part`'s parts in the padded layout."""
    if len(results) == 1:
        return results[0]
    even, last = results
    even = (None,) * len(last) if even is None else even
    return tuple(join_groups(e, t, d) for e, t in zip(even, last))


def per_group(t: torch.Tensor, G: int, d: int) -> torch.Tensor:
    """A per-channel vector (C,) as (G, d), zeros in the padding of a smaller last group."""
    C = t.shape[0]
    return (t if C == G * d else torch.nn.functional.pad(t, (0, G * d - C))).reshape(G, d)


def per_channel(t: torch.Tensor, C: int) -> torch.Tensor:
    """The inverse of :func:`per_group`: (G, d) as the (C,) values of the channels that exist."""
    return t.reshape(-1)[:C]


def channel_mask(G: int, d: int, C: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(G, d): 1 for the channels of the groups that exist, 0 for the padding of a smaller last group
    (channel g d + i exists when g d + i < C)."""
    return (torch.arange(G * d, device=device) < C).reshape(G, d).to(dtype)


def like_format(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return y (contiguous, shaped like x) in x's memory format (channels_last where x is)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return y.contiguous(memory_format=torch.channels_last_3d)
    return y


# ---------------------------------------------------------------------------------------------------
# precision under autocast

# The device types whose autocast sdecor turns off (torch.autocast's "cpu" and "cuda").
AUTOCAST_DEVICES = ("cpu", "cuda")


def no_autocast(fn):
    """Decorator: ``fn`` runs with autocast off on cpu and cuda, its inputs as given.

    DESIGN.md, "Precision": under autocast the statistics and the d x d math stay in fp32 (fp64 for
    fp64 input) and the output has the input's dtype, as BatchNorm's does (x fp32 under bf16 autocast
    -> y fp32; x bf16 -> y bf16). Autocast would instead run the covariance and whitening matmuls in
    bf16 (reference group_whiten on fp32 input (8, 32, 6, 6), d=16: max error 3e-2 instead of 2e-6)
    and mix dtypes in the hand-written backward passes. The public functions, the
    torch.autograd.Functions (:func:`no_autocast_function`) and the custom ops
    (:mod:`sdecor.ops._library`) all use it. Outside autocast it costs three flag reads (0.8 us).
    """
    @functools.wraps(fn)
    def run(*args, **kwargs):
        # Under torch.compile the regions are always traced: the graph may run under another
        # autocast state than the flags read at trace time (an autograd.Function's backward is
        # traced under its forward's autocast).
        if not (torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
                or torch.is_autocast_enabled("cuda")):
            return fn(*args, **kwargs)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)
    return run


def no_autocast_function(cls):
    """Class decorator of a torch.autograd.Function: its forward and backward run under
    :func:`no_autocast`. The backward needs it on its own: the autograd engine runs it in the autocast
    state of the caller of ``.backward()`` / ``torch.autograd.grad``, not in the forward's."""
    cls.forward = staticmethod(no_autocast(cls.forward))
    cls.backward = staticmethod(no_autocast(cls.backward))
    return cls


# ---------------------------------------------------------------------------------------------------
# d x d algebra


def power_of_two(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2**e exactly, built from the exponent bits; e an integer tensor of normal exponents of dtype
    (float32 or float64)."""
    if dtype == torch.float64:
        return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.transpose(-1, -2))


def eye_like(a: torch.Tensor) -> torch.Tensor:
    """Identity matrices broadcastable against a (..., d, d)."""
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)


def shifted_cov(cov: torch.Tensor, eps: float) -> torch.Tensor:
    """Se = cov + eps I, in the statistics dtype of cov (the matrix every whitening method works on)."""
    sd = stats_dtype(cov.dtype)
    return cov.to(sd) + eps * eye_like(cov).to(sd)


def zca_from_eigh(evals: torch.Tensor, evecs: torch.Tensor, eps: float) -> torch.Tensor:
    """W = U diag(l^-1/2) U^T with the eigenvalues clamped at eps (never NaN)."""
    s_inv = evals.clamp_min(eps).rsqrt()
    return (evecs * s_inv.unsqueeze(-2)) @ evecs.transpose(-1, -2)


def zca_backward(grad_w: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor, eps: float) -> torch.Tensor:
    """dL/dSe = U (F o (U^T sym(G) U)) U^T, F_ij = -1 / (s_i s_j (s_i + s_j)), s = sqrt(l).

    F is the divided difference of f(l) = l^-1/2 at (l_i, l_j); written this way it stays finite
    when eigenvalues repeat, where autograd through eigh divides by l_i - l_j = 0.
    """
    s = evals.clamp_min(eps).sqrt()
    si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
    F = -1.0 / (si * sj * (si + sj))
    inner = evecs.transpose(-1, -2) @ sym(grad_w) @ evecs
    return evecs @ (F * inner) @ evecs.transpose(-1, -2)


def zca_backward_dse(grad_w: torch.Tensor, grad_z: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor,
                     eps: float) -> torch.Tensor:
    """d<grad_z, Z>/dSe for Z = :func:`zca_backward` (grad_w, Se): the second-order term of ZCA.

    Z = Df(Se)[sym G] is the derivative of f(Se) = Se^-1/2 in the direction sym G (G = grad_w), so
    this is the second derivative D^2 f(Se)[sym G, .] read against sym H (H = grad_z). In the
    eigenbasis, with Ĝ = U^T sym(G) U and Ĥ = U^T sym(H) U (Daleckii-Krein):
        dSe^ = T + T^T,  T_pq = sum_a f[a,p,q] Ĝ_ap Ĥ_aq,
    f[a,p,q] the second divided difference of f(l) = l^-1/2, with s = sqrt(l):
        f[a,p,q] = (s_a + s_p + s_q) / (s_a s_p s_q (s_a + s_p) (s_p + s_q) (s_a + s_q)),
    finite for repeated eigenvalues (a = p = q gives f''/2 = 3/8 l^-5/2).
    """
    s = evals.clamp_min(eps).sqrt()
    sa, sp, sq = s[..., :, None, None], s[..., None, :, None], s[..., None, None, :]
    f3 = (sa + sp + sq) / (sa * sp * sq * (sa + sp) * (sp + sq) * (sa + sq))      # (..., a, p, q)
    evecs_t = evecs.transpose(-1, -2)
    g_hat = evecs_t @ sym(grad_w) @ evecs
    h_hat = evecs_t @ sym(grad_z) @ evecs
    t = (f3 * g_hat.unsqueeze(-1) * h_hat.unsqueeze(-2)).sum(-3)
    return evecs @ (t + t.transpose(-1, -2)) @ evecs_t


class _NoThirdDerivative(torch.autograd.Function):
    """Copies of ``values``, attached to the graph of ``sources`` (what they were computed from);
    differentiating them raises. torch's once_differentiable attaches its error to detached copies,
    so a third derivative through it is silently left out (or zero with allow_unused) instead."""

    @staticmethod
    def forward(ctx, what, values, *sources):
        ctx.what = what
        ctx.set_materialize_grads(False)
        return tuple(v.clone() for v in values)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.what}: a third derivative is not implemented (double backward, i.e. "
                           f"one backward with create_graph=True followed by another, is exact)")


@no_autocast_function
class _ZCABackward(torch.autograd.Function):
    """Z = :func:`zca_backward` (grad_w, Se) as a function of both grad_w and Se, so that the ZCA
    backward can itself be differentiated (double backward). Its own backward: d/dgrad_w is the same
    self-adjoint map applied to the incoming gradient; d/dSe is :func:`zca_backward_dse`. A third
    derivative raises."""

    @staticmethod
    def forward(ctx, grad_w, se, evals, evecs, eps):
        ctx.eps = eps
        ctx.save_for_backward(grad_w, se, evals, evecs)
        return zca_backward(grad_w, evals, evecs, eps)

    @staticmethod
    def backward(ctx, grad_z):
        grad_w, se, evals, evecs = ctx.saved_tensors
        need_grad_w, need_se = ctx.needs_input_grad[:2]
        with torch.no_grad():
            gg = zca_backward(grad_z, evals, evecs, ctx.eps) if need_grad_w else None
            gse = zca_backward_dse(grad_w, grad_z, evals, evecs, ctx.eps) if need_se else None
        sources = [t for t in (grad_z, grad_w, se) if t.requires_grad]
        if torch.is_grad_enabled() and sources:
            index = [i for i, g in enumerate((gg, gse)) if g is not None]
            copies = _NoThirdDerivative.apply("ZCA whitening", [(gg, gse)[i] for i in index], *sources)
            gg, gse = (copies[index.index(i)] if i in index else None for i in range(2))
        return gg, gse, None, None, None


def _zca_sigma(evals: torch.Tensor, eps: float, scale: torch.Tensor):
    """(sigma, sigma / c): square roots of Se's eigenvalues clamped at eps, from the eigenvalues of
    Se' = Se / c^2 (c = scale (G,), powers of two), in Se's units and in units of c."""
    c = scale.to(evals.dtype).unsqueeze(-1)
    root_eps = torch.full((), eps, dtype=evals.dtype, device=evals.device).sqrt()
    sigma = torch.maximum(c * evals.clamp_min(0).sqrt(), root_eps)
    return sigma, sigma / c


def zca_from_eigh_scaled(evals: torch.Tensor, evecs: torch.Tensor, eps: float,
                         scale: torch.Tensor) -> torch.Tensor:
    """W of Se = c^2 Se' from eigh(Se'), c = scale (G,) (powers of two): U diag(1 / sigma) U^T, sigma
    the square roots of Se's eigenvalues clamped at eps. Finite where Se is not (and where eps / c^2
    underflows); where c = 1 exactly :func:`zca_from_eigh`."""
    sigma, _ = _zca_sigma(evals, eps, scale)
    unscaled = (scale == 1).unsqueeze(-1)
    s_inv = torch.where(unscaled, evals.clamp_min(eps).rsqrt(), sigma.reciprocal())
    return (evecs * s_inv.unsqueeze(-2)) @ evecs.transpose(-1, -2)


def zca_backward_scaled(grad_w: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor, eps: float,
                        scale: torch.Tensor) -> torch.Tensor:
    """dL/dSe' / c from grad_w = dL/dW' for W' = c W = Se'^-1/2, Se' = Se / c^2 = U diag(l) U^T,
    c = scale (G,) (powers of two): :func:`zca_backward` in units of c, U ((F / c) o (U^T sym(G) U))
    U^T with F / c = -1 / (sigma_i s_j (s_i + s_j)), s = sigma / c (see zca_from_eigh_scaled).

    Divided by c it stays in fp32's range except between two eigenvalues both at the clamp (F / c ~
    c^2 / eps^1.5, e.g. 1e67 at c = 1e30): those entries are bounded by fp32's largest number, so
    that they give 0, not NaN, against the zero entries of U^T sym(G) U of a constant channel whose
    axis eigh returns exactly. Where c = 1 exactly :func:`zca_backward`.
    """
    sigma, s = _zca_sigma(evals, eps, scale)
    F = -1.0 / (sigma.unsqueeze(-1) * s.unsqueeze(-2) * (s.unsqueeze(-1) + s.unsqueeze(-2)))
    F = F.clamp_min(-torch.finfo(F.dtype).max)
    inner = evecs.transpose(-1, -2) @ sym(grad_w) @ evecs
    return evecs @ (F * inner) @ evecs.transpose(-1, -2)


@no_autocast_function
class ZCAWhitening(torch.autograd.Function):
    """W = Se^-1/2 through an eigendecomposition by ``eigh`` (ascending eigenvalues, eigenvectors as
    columns), with the stable backward :func:`zca_backward`, itself differentiable w.r.t. grad_w and
    Se when a graph of the backward is requested (double backward, see :class:`_ZCABackward`)."""

    @staticmethod
    def forward(ctx, se: torch.Tensor, eps: float, eigh):
        evals, evecs = eigh(se)
        ctx.eps = eps
        ctx.save_for_backward(se, evals, evecs)
        return zca_from_eigh(evals, evecs, eps)

    @staticmethod
    def backward(ctx, grad_w):
        se, evals, evecs = ctx.saved_tensors
        if torch.is_grad_enabled():                                   # create_graph=True
            return _ZCABackward.apply(grad_w, se, evals, evecs, ctx.eps), None, None
        return zca_backward(grad_w, evals, evecs, ctx.eps), None, None


# ---------------------------------------------------------------------------------------------------
# double backward


def graph_backward(fn, inputs, needs, grad_outputs) -> list:
    """Gradients of ``fn(*inputs)`` w.r.t. the inputs flagged in ``needs``, as a graph (create_graph).

    The backward of an op whose own backward is hand-written (or a kernel without a derivative) when
    a graph of the backward is requested (double backward): ``fn`` is a differentiable torch
    formulation of the op, recomputed here from the saved inputs, so that the gradients are
    differentiable w.r.t. the inputs and ``grad_outputs``. Returns one entry per input (None where
    not needed); ``grad_outputs`` None for an output means no gradient flows into it.
    """
    wanted = [i for i, (t, n) in enumerate(zip(inputs, needs)) if n and t is not None]
    result = [None] * len(inputs)
    with torch.enable_grad():
        outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    if not wanted or not pairs:
        return result
    grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                create_graph=True, allow_unused=True)
    for i, g in zip(wanted, grads):
        result[i] = torch.zeros_like(inputs[i]) if g is None else g
    return result


# ---------------------------------------------------------------------------------------------------
# top-k masking


def mask_scores(saliency: torch.Tensor, reduce, abs: bool) -> torch.Tensor:
    """Scores per sample, flattened: (N, prod(S)) for reduce="mean", (N, C*prod(S)) for None."""
    score = saliency.abs() if abs else saliency
    if reduce == "mean":
        # Mean over channels, pinned to one rounding on every device: accumulate channel by channel
        # in fp32 (fp64 for fp64), divide by C once, round to the saliency's dtype.
        acc = score[:, 0].to(stats_dtype(score.dtype))
        for c in range(1, score.shape[1]):
            acc = acc + score[:, c]
        score = (acc / score.shape[1]).to(score.dtype)
    # the row length spelled out: reshape(N, -1) cannot infer it when N = 0
    return score.reshape(score.shape[0], math.prod(score.shape[1:]))


def rank_order(score: torch.Tensor, largest: bool) -> torch.Tensor:
    """Per-row positions in selection order: the k first are the selected set.

    Order: by value (ascending, or descending for largest=True), NaN ranked as the largest value,
    equal values by lower flat index. Two stable sorts: by value, then by NaN-ness.
    """
    nan = torch.isnan(score)
    value = torch.where(nan, torch.zeros_like(score), score)
    order = torch.sort(-value if largest else value, dim=1, stable=True).indices
    nan_key = nan.gather(1, order).to(torch.int8)
    regroup = torch.sort(-nan_key if largest else nan_key, dim=1, stable=True).indices
    return order.gather(1, regroup)


def fill_values(x: torch.Tensor, fill: str, value: float, baseline, generator) -> torch.Tensor:
    """What the selected positions become, as a tensor broadcastable to x."""
    spatial = tuple(range(2, x.dim()))
    if fill == "zero":
        return torch.zeros((), dtype=x.dtype, device=x.device)
    if fill == "constant":
        return torch.full((), value, dtype=x.dtype, device=x.device)
    if fill == "baseline":
        return baseline.to(x.dtype)
    if fill == "mean":                                               # per sample, per channel
        return x.mean(dim=spatial, keepdim=True) if spatial else x
    # "uniform": i.i.d. U[min, max] with per-sample, per-channel min and max of x over S
    if x.numel() == 0:                                               # no positions: min / max undefined
        return torch.zeros((), dtype=x.dtype, device=x.device)
    lo = x.amin(dim=spatial, keepdim=True) if spatial else x
    hi = x.amax(dim=spatial, keepdim=True) if spatial else x
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=stats_dtype(x.dtype))
    return (lo + (hi - lo) * u).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# decorrelation

CORR_VAR_FLOOR = 1e-12

# Below 2^48 a sum of squares of up to 2^30 samples stays within fp32 (it overflows at |x| ~ 1e19).
_CORR_MAX_EXP = 48


def scale_for_corr(x: torch.Tensor, num_channels: int) -> torch.Tensor:
    """x with every group divided by a power of two that brings max |x| below 2^48 (1 wherever it
    already is: the identity there), detached. The correlation matrix does not change (exact
    scaling), and its covariance stays finite at any finite scale of x."""
    with torch.no_grad():
        sd = stats_dtype(x.dtype)
        amax = grouped(x.detach(), num_channels).abs().amax(dim=(0, 2, 3)).to(sd)     # (G,)
        e = (torch.frexp(amax).exponent - _CORR_MAX_EXP).clamp(0, 1022 if sd == torch.float64 else 126)
        scale = power_of_two(-e, sd).repeat_interleave(num_channels)              # (C,)
    return x * scale.reshape((1, -1) + (1,) * (x.dim() - 2)).to(x.dtype)


def decorrelation_per_group(cov: torch.Tensor, kind: str) -> torch.Tensor:
    """The penalty of every group (G,) from its covariance (G, d, d)."""
    diag = cov.diagonal(dim1=-2, dim2=-1)                            # (G, d)
    if kind == "decov":
        # 0.5 (||cov||_F^2 - ||diag cov||^2) summed as the off-diagonal squares (no cancellation)
        off = cov - torch.diag_embed(diag)
        return 0.5 * off.square().sum((-2, -1))
    d = cov.shape[-1]
    std = diag.clamp_min(CORR_VAR_FLOOR).sqrt()
    corr = cov / (std.unsqueeze(-1) * std.unsqueeze(-2))
    return (corr - eye_like(corr)).square().sum((-2, -1)) / (d * (d - 1))


def decorrelation_from_cov(cov: torch.Tensor, kind: str) -> torch.Tensor:
    return decorrelation_per_group(cov, kind).mean()


def decorrelation(x: torch.Tensor, num_channels: int, kind: str, group_cov) -> torch.Tensor:
    """decorrelation_loss of checked arguments, with the covariance from ``group_cov(x, d)`` (the
    reference's or the selected backend's); "corr" on x scaled by :func:`scale_for_corr`. A smaller
    last group (d does not divide C) is a group of its own: the mean is over all G groups."""
    x_even, x_last, r = split_channels(x, num_channels)
    if r == num_channels:
        parts = [(x, num_channels)]
    else:
        parts = [(x_even, num_channels)] * bool(x_even.shape[1]) + [(x_last, r)]
    per_group = []
    for xp, dp in parts:
        if kind == "corr":                                           # scale-free: keep it finite
            xp = scale_for_corr(xp, dp)
        _, cov = group_cov(xp, dp)
        per_group.append(decorrelation_per_group(cov, kind))
    return torch.cat(per_group).mean()
