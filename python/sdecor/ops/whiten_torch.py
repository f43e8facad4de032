"""The ``torch`` backend of group whitening with batch statistics: torch ops, hand-written backward.

What :func:`sdecor.ops.whiten.group_whiten` and ``GroupWhitening`` run on the torch backend (the
default on CPU): same semantics as the reference composition
``weight * W (x - mean) + bias`` (W from :func:`sdecor.reference.whitening_matrix`), computed on the
(N, G, d, L) view of x with batched matrix products (never a transposed copy of x), and a backward
that reads the large tensors twice instead of autograd's dozen. Xc = X - mu is never stored: every
pass forms it block by block (a few samples at a time) in a cache-sized buffer, right before the
products that use it, so x is saved for the backward instead of a centred copy.

Forward (per group, X the d x m matrix of the group, m = N * L):
    mu = X 1 / m,  Xc = X - mu,  Sigma = Xc Xc^T / m,  W = f(Sigma + eps I),  A = diag(w) W,
    y = A Xc + b.
Backward, given gy:
    db = sum gy,  GX = gy Xc^T,  dw = rowsum(GX o W),  dW = diag(w) GX,  dSe = f'(dW) (d x d work),
    dx = A^T (gy - mean(gy)) + (2 / m) sym(dSe) Xc
(the mean's own contribution vanishes because the rows of Xc sum to zero).
A backward with create_graph=True (double backward) instead differentiates the reference composition
recomputed from the saved x (:func:`train_graph_backward`), so that the gradients carry a graph.

A smaller last group (d does not divide C, IterNorm's flexible groups): the passes over x work on
its (N, G, d, L) view, which then does not exist, so :func:`train_with_passes` runs them on the
channels of the full groups and on those of the last group (views of x, the last group as G = 1
group of r channels) and concatenates the outputs: one extra write of y, and the statistics padded
to the (G, d) / (G, d, d) layout. The d x d functions (:mod:`sdecor.ops.whiten_scaled_torch`) take
a channel mask instead (the padding block decoupled and zero), for the synchronised statistics.

The passes over the large tensors are those of :class:`TorchPasses` (the interface
:class:`~sdecor.ops._whiten_passes.WhiteningPasses`); the ``native`` backend runs the same autograd
Function with the C++ passes of :class:`sdecor.ops.whiten_native.NativePasses`.
"""

from __future__ import annotations

import math

import torch

from .. import reference as ref
from .._double_backward import graph_backward
from .._layout import (group_layout, grouped, join_groups, last_group_mask, like_format, split_channels,
                       split_groups)
from .._precision import no_autocast_function, power_of_two, stats_dtype
from .._zca import ZCAWhitening, shifted_cov
from ._whiten_passes import ScaledStats, affine_terms
from .whiten_scaled_torch import scaled_eps, whitening_scaled, whitening_scaled_backward

__all__ = ["TorchPasses", "eval_torch", "train_composition", "train_graph_backward", "train_torch",
           "train_with_passes", "whitening_matrices"]


# ---------------------------------------------------------------------------------------------------
# the large tensors


def _batched(a: torch.Tensor, n: int) -> torch.Tensor:
    """(G, p, q) -> (n * G, p, q): one copy of the small matrix per sample, for bmm/baddbmm."""
    return a.unsqueeze(0).expand(n, *a.shape).reshape(n * a.shape[0], *a.shape[1:])


# Bytes of x per block of the blocked passes (whole samples, at least one): a block of x, its centred
# copy and the block of gy or dx stay in cache between the ops that use them. Forward + backward at
# (32, 256, 28, 28) fp32, d=16, 2-core EPYC (32 MiB L3): 15.5 ms with 1 or 2 MiB blocks, 16.1 ms with
# 8 MiB, 27.9 ms unblocked (one centred copy of x, as large as x, per pass).
_BLOCK_BYTES = 2 << 20


def _blocks(N: int, sample_bytes: int):
    step = max(1, min(N, _BLOCK_BYTES // max(1, sample_bytes)))
    return [(i, min(N, i + step)) for i in range(0, N, step)]


def _center_and_scale(xg: torch.Tensor, blocks, m: int):
    """The centre of every channel and the power-of-two scale of every group, in one pass over x.

    centre = the mean (the midrange where the sum of a channel overflows), c = 2^e >= max |x - centre|
    over the group, 1 <= c <= 2^126 (2^1022 for fp64). Work in units of c keeps every product and sum of the
    statistics in range at any finite |x| (fp32 overflows at |x| ~ 1e19 unscaled), and a power of two
    scales without rounding: the results equal the unscaled ones wherever those are finite.
    Returns (centre (G, d), c (G,), 1/c (G,)).
    """
    G, d = xg.shape[1:3]
    total = xg.new_zeros(G, d)
    hi = xg.new_full((G, d), -math.inf)
    lo = xg.new_full((G, d), math.inf)
    for i, j in blocks:                                              # block in cache after the sum
        xb = xg[i:j]
        total += xb.sum(dim=(0, 3))
        torch.maximum(hi, xb.amax(dim=(0, 3)), out=hi)
        torch.minimum(lo, xb.amin(dim=(0, 3)), out=lo)
    mean = total / m
    center = torch.where(torch.isfinite(mean), mean, 0.5 * hi + 0.5 * lo)
    half = torch.maximum(0.5 * hi - 0.5 * center, 0.5 * center - 0.5 * lo).amax(-1)   # (G,)
    # max |x - centre| = 2 half < 2^e; e <= 126 (1022 for fp64) keeps 1/c a normal number
    e = (torch.frexp(half).exponent + 1).clamp(0, 1022 if xg.dtype == torch.float64 else 126)
    return center, power_of_two(e, xg.dtype), power_of_two(-e, xg.dtype)


def regrouped(x: torch.Tensor, d: int) -> torch.Tensor:
    """x as (N, G, d, L) in the statistics dtype."""
    xg = grouped(x, d)
    sd = stats_dtype(x.dtype)
    return xg if xg.dtype == sd else xg.to(sd)


def _block_plan(xg: torch.Tensor):
    """The blocks of the blocked passes over xg (N, G, d, L), and a buffer for one block."""
    blocks = _blocks(xg.shape[0], xg[0].numel() * xg.element_size())
    buf = torch.empty((blocks[0][1],) + xg.shape[1:], dtype=xg.dtype, device=xg.device)
    return blocks, buf


def _scaler(center: torch.Tensor, inv_c: torch.Tensor):
    """(1/c, -centre/c) shaped (1, G, 1, 1) and (1, G, d, 1), for :func:`_scaled`."""
    return inv_c[None, :, None, None], (-center * inv_c[:, None])[None, :, :, None]


def _scaled(xg: torch.Tensor, scaler, i: int, j: int, buf: torch.Tensor) -> torch.Tensor:
    """xs = (x - centre) / c of samples [i, j), formed in buf (in cache)."""
    inv_c4, neg_cs4 = scaler
    return torch.mul(xg[i:j], inv_c4, out=buf[:j - i]).add_(neg_cs4)


def scaled_stats(xg: torch.Tensor, m: int):
    """Statistics of xg (N, G, d, L) (N >= 1) in units of each group's power-of-two scale c, in two
    blocked passes (see :func:`_center_and_scale`): (centre (G, d), c (G,), 1/c (G,), ms (G, d),
    cov' (G, d, d)) with xs = (x - centre) / c, ms = mean(xs) and cov' = Sigma / c^2; the mean of x
    is centre + c ms."""
    G, d = xg.shape[1:3]
    blocks, buf = _block_plan(xg)
    center, c, inv_c = _center_and_scale(xg, blocks, m)
    scaler = _scaler(center, inv_c)
    # sums of xs and xs xs^T block by block (xs formed in cache, never stored)
    acc1 = torch.zeros(G, d, dtype=xg.dtype, device=xg.device)
    acc2 = torch.zeros(G, d, d, dtype=xg.dtype, device=xg.device)
    for i, j in blocks:
        xs = _scaled(xg, scaler, i, j, buf)
        acc1 += xs.sum(dim=(0, 3))
        acc2 += torch.matmul(xs, xs.transpose(-1, -2)).sum(0)
    ms = acc1 / m                                                    # mean(xs): (G, d)
    cov = acc2 / m - ms.unsqueeze(-1) * ms.unsqueeze(-2)             # Sigma': (G, d, d)
    return center, c, inv_c, ms, cov


def apply_pass(x: torch.Tensor, xg: torch.Tensor, a: torch.Tensor, center: torch.Tensor,
               shift: torch.Tensor) -> torch.Tensor:
    """y = a (x - centre) + shift per group (a (G, d, d), centre (G, d), shift (G, d, 1)), blocked;
    x's shape, dtype and memory format. y is allocated with x's shape and written through a view, so
    that the output is not a view (callers may modify it in place, e.g. ReLU(inplace=True))."""
    N, G, d, L = xg.shape
    blocks, buf = _block_plan(xg)
    n0 = blocks[0][1]
    y = torch.empty(x.shape, dtype=xg.dtype, device=x.device)
    yg = y.view(N, G, d, L)
    a_b, shift_b = _batched(a, n0), _batched(shift, n0)
    center4 = center[None, :, :, None]
    for i, j in blocks:
        n = j - i
        xc = torch.sub(xg[i:j], center4, out=buf[:n]).view(n * G, d, L)
        torch.baddbmm(shift_b[:n * G], a_b[:n * G], xc, out=yg[i:j].view(n * G, d, L))
    return like_format(y.to(x.dtype), x)


def reduce_pass(gy: torch.Tensor, xg: torch.Tensor, center: torch.Tensor, inv_c: torch.Tensor):
    """(sum gy (G, d), sum gy xs^T (G, d, d)) over the samples, xs = (x - centre) / c formed block
    by block in cache; gy and xg (N, G, d, L) in the statistics dtype."""
    G, d = xg.shape[1:3]
    blocks, buf = _block_plan(xg)
    gsum = torch.zeros(G, d, dtype=xg.dtype, device=xg.device)
    gx_t = torch.zeros(G, d, d, dtype=xg.dtype, device=xg.device)
    scaler = _scaler(center, inv_c)
    for i, j in blocks:
        gb = gy[i:j]
        xs = _scaled(xg, scaler, i, j, buf)
        gsum += gb.sum(dim=(0, 3))
        gx_t += torch.matmul(gb, xs.transpose(-1, -2)).sum(0)
    return gsum, gx_t


def dx_pass(gy: torch.Tensor, xg: torch.Tensor, center: torch.Tensor, inv_c: torch.Tensor,
            b: torch.Tensor, s2: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """dx = b gy + s2 xs + shift per group (b, s2 (G, d, d), shift (G, d, 1)), xs = (x - centre) / c
    formed block by block; (N, G, d, L) in the statistics dtype."""
    N, G, d, L = xg.shape
    blocks, buf = _block_plan(xg)
    n0 = blocks[0][1]
    dx = torch.empty((N, G, d, L), dtype=xg.dtype, device=xg.device)
    shift_b, b_b, s2_b = _batched(shift, n0), _batched(b, n0), _batched(s2, n0)
    scaler = _scaler(center, inv_c)
    for i, j in blocks:
        n = j - i
        k = n * G
        xs = _scaled(xg, scaler, i, j, buf).view(k, d, L)
        out = dx[i:j].view(k, d, L)
        torch.baddbmm(shift_b[:k], b_b[:k], gy[i:j].reshape(k, d, L), out=out)
        out.baddbmm_(s2_b[:k], xs)
    return dx


def weight_grad(gx: torch.Tensor, gsum: torch.Tensor, ms: torch.Tensor, w: torch.Tensor | None):
    """(GX', dL/dweight) from the reduce pass's (D / c, s = sum dy): GX' = D / c - s ms^T = sum dy (xs - ms)^T,
    and sum_j dy_j o W (x_j - mean) = rowsum(GX' o W') (G * d; the scales cancel), None where w is None."""
    gx_t = gx - gsum.unsqueeze(-1) * ms.unsqueeze(-2)
    return gx_t, None if w is None else (gx_t * w).sum(-1).reshape(-1)


class TorchPasses:
    """The passes of the torch backend over one input x (N, C, *S) in groups of d | C
    (:class:`~sdecor.ops._whiten_passes.WhiteningPasses`): the blocked passes above on the
    (N, G, d, L) view of x in the statistics dtype, formed once (and the one of dy once per backward)."""

    def __init__(self, x: torch.Tensor, d: int):
        self.x, self.d = x, d
        self.xg = regrouped(x, d)
        self._dy = self._gy = None

    def statistics(self) -> ScaledStats:
        xg = self.xg
        center, c, inv_c, ms, cov = scaled_stats(xg, xg.shape[0] * xg.shape[3])
        return ScaledStats(center, c, inv_c, ms, cov)

    def whiten(self, mean, w, weight, bias) -> torch.Tensor:
        a, shift = affine_terms(mean, w, weight, bias)
        return apply_pass(self.x, self.xg, a, mean, shift.unsqueeze(-1))

    def _grouped_grad(self, dy: torch.Tensor) -> torch.Tensor:
        if dy is not self._dy:
            self._dy, self._gy = dy, regrouped(dy, self.d).contiguous()
        return self._gy

    def reduce_grad(self, dy, mean, c):
        s, D = reduce_pass(self._grouped_grad(dy), self.xg, mean, c.reciprocal())
        return D, s

    def input_grad(self, dy, mean, c, a, b, v) -> torch.Tensor:
        dx = dx_pass(self._grouped_grad(dy), self.xg, mean, c.reciprocal(), b, a, v.unsqueeze(-1))
        return dx.reshape(dy.shape).to(dy.dtype)

    @staticmethod
    def whitening(cov, eps_s, method, T, C):
        """(W', state): W' = f(cov' + eps' I) of the groups of C channels in units of their scales
        (:func:`whitening_scaled`), and what :meth:`whitening_grad` needs (a tuple of tensors)."""
        w, small, history = whitening_scaled(cov, eps_s, method, T, last_group_mask(cov, C))
        return w, (*small, *history)

    @staticmethod
    def whitening_grad(grad_w, state, eps_s, method, T, C) -> torch.Tensor:
        """dL/dSe' from dL/dW' (:func:`whitening_scaled_backward`; ``state`` from :meth:`whitening`)."""
        return whitening_scaled_backward(grad_w, state, eps_s, method, T, last_group_mask(grad_w, C))

    @classmethod
    def train_matrix(cls, stats: ScaledStats, weight, bias, method, eps, T):
        """The d x d part of a training forward on groups of d | C channels from ``stats`` (units of
        the scales c): (w, a, a_apply, shift, mean, w_true, eps_s, state) with eps' = eps / c^2
        (:func:`scaled_eps`), W' = f(cov' + eps' I) (:meth:`whitening`; ``state`` its state),
        A' = diag(weight) W', shift = bias - A' ms (G, d), a_apply = A' / c, mean = center + c ms,
        w_true = W' / c."""
        center, c, inv_c, ms, cov = stats
        G, d = ms.shape
        eps_s = scaled_eps(eps, inv_c)
        w, state = cls.whitening(cov, eps_s, method, T, G * d)
        a = w if weight is None else weight.to(cov.dtype).reshape(G, d).unsqueeze(-1) * w
        shift = -(a @ ms.unsqueeze(-1))
        if bias is not None:
            shift = shift + bias.to(cov.dtype).reshape(G, d, 1)
        inv_c3 = inv_c[:, None, None]
        return w, a, a * inv_c3, shift.reshape(G, d), center + c[:, None] * ms, w * inv_c3, eps_s, state

    @classmethod
    def train_matrix_grad(cls, gx, gsum, ms, w, a, weight, inv_c, m, state, eps_s, method, T):
        """Its backward from the reduce pass's (D / c, s = sum dy): (grad_weight, s2, a_t, shift) with
        GX' = D / c - s ms^T, grad_weight = rowsum(GX' o W') (G * d, None without weight), dL/dSe'
        from dL/dW' = diag(weight) GX' (:meth:`whitening_grad`), s2 = (2 / m) sym(dL/dSe') / c,
        a_t = A'^T / c and shift = -a_t s / m - s2 ms (G, d): the input_grad pass's terms."""
        G, d = ms.shape
        gx_t, grad_weight = weight_grad(gx, gsum, ms, None if weight is None else w)
        grad_w = gx_t if weight is None else weight.to(w.dtype).reshape(G, d).unsqueeze(-1) * gx_t
        grad_se = cls.whitening_grad(grad_w, state, eps_s, method, T, G * d)
        inv_c3 = inv_c[:, None, None]
        s2 = (grad_se + grad_se.transpose(-1, -2)) * (inv_c3 / m)    # (2/m) sym(dSe') / c
        a_t = a.transpose(-1, -2) * inv_c3                           # A'^T / c
        shift = -(a_t @ (gsum / m).unsqueeze(-1)) - s2 @ ms.unsqueeze(-1)
        return grad_weight, s2, a_t, shift.squeeze(-1)

    @classmethod
    def matrix(cls, cov, c, method, eps, T, C):
        inv_c = c.reciprocal()                                       # exact: c is a power of two
        eps_s = scaled_eps(eps, inv_c)
        w, state = cls.whitening(cov, eps_s, method, T, C)
        return w * inv_c[:, None, None], (eps_s, *state)

    @classmethod
    def matrix_grad(cls, grad_w, state, cov, c, method, eps, T, C) -> torch.Tensor:
        eps_s, *rest = state
        g = cls.whitening_grad(grad_w, tuple(rest), eps_s, method, T, C)
        return g * c.reciprocal()[:, None, None]


@no_autocast_function
class _GroupWhitenTrain(torch.autograd.Function):
    """Per group, in units of the power-of-two scale c (see :func:`_center_and_scale`):
    xs = (x - centre) / c, ms = mean(xs), Sigma' = Xs Xs^T / m - ms ms^T = Sigma / c^2,
    W' = f(Sigma' + (eps / c^2) I) = c W, y = A' (xs - ms) + b with A' = diag(w) W'. The backward is
    the one of the module docstring in these units, and dx = dxs / c. The passes over x and dy and
    the d x d whitening (``whitening`` / ``whitening_grad``) are those of ``passes``
    (:class:`TorchPasses` or the native backend's).

    The extra work over unscaled statistics is the max and min of every channel in the mean pass
    and the scaling of x in the covariance pass and the two backward passes (all on blocks in cache).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, passes, num_channels, method, eps, T):
        N, C = x.shape[:2]
        d = num_channels
        G = C // d
        m = N * math.prod(x.shape[2:])
        run = passes(x, d)
        stats = run.statistics()
        center, c, inv_c, ms, cov = stats
        # y = A' (xs - ms) + b = A (x - centre) + (b - A' ms) with A = A' / c: the apply pass needs
        # no scaling (A ~ 1 / std is in range wherever y is); it is the whiten pass with W = A, mean =
        # centre and bias = b - A' ms
        w, a, a_apply, shift, mean, w_true, eps_s, state = passes.train_matrix(stats, weight, bias, method, eps, T)
        y = run.whiten(center, a_apply, None, shift.reshape(-1))

        ctx.meta = (method, eps, T, N, G, d, m, weight is not None, bias is not None,
                    None if bias is None else bias.dtype, passes)
        # x itself is saved (regrouped in backward): the double backward differentiates through it
        ctx.save_for_backward(x, center, c, inv_c, ms, eps_s, w, a, weight, bias, *state)
        ctx.mark_non_differentiable(mean, w_true)
        return y, mean, w_true

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_w):
        method, eps, T, N, G, d, m, has_weight, has_bias, bias_dtype, passes = ctx.meta
        x, center, c, inv_c, ms, eps_s, w, a, weight, bias, *rest = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        nones = (None,) * 5
        if torch.is_grad_enabled():                                   # create_graph=True: double backward
            return (*train_graph_backward(grad_y, x, weight, bias, ctx.needs_input_grad[:3], d, method,
                                          eps, T), *nones)
        sd = w.dtype
        grad_x = grad_weight = grad_bias = None
        need_gx = need_x or (has_weight and need_weight)
        if not need_gx:
            if has_bias and need_bias:
                grad_bias = grouped(grad_y, d).to(sd).sum(dim=(0, 3)).reshape(-1).to(bias_dtype)
            return grad_x, grad_weight, grad_bias, *nones
        run = passes(x, d)
        # one blocked pass: sum gy and GX' = sum gy (xs - ms)^T
        gx, gsum = run.reduce_grad(grad_y, center, c)
        if has_bias and need_bias:
            grad_bias = gsum.reshape(-1).to(bias_dtype)
        if not need_x:
            grad_weight = weight_grad(gx, gsum, ms, w)[1].to(weight.dtype)
            return grad_x, grad_weight, grad_bias, *nones
        gw, s2, a_t, shift = passes.train_matrix_grad(gx, gsum, ms, w, a, weight if has_weight else None, inv_c, m,
                                                      tuple(rest), eps_s, method, T)
        if has_weight and need_weight:
            grad_weight = gw.to(weight.dtype)
        # dx = (A'^T (gy - mean(gy)) + (2/m) sym(dSe') (xs - ms)) / c, block by block
        grad_x = run.input_grad(grad_y, center, c, s2, a_t, shift)
        return grad_x, grad_weight, grad_bias, *nones


def whitening_matrices(cov, C: int, method: str, eps: float, T: int, eigh=torch.linalg.eigh):
    """W (G, d, d) of the groups of C channels from their covariances by differentiable torch ops:
    :func:`sdecor.reference.group_whitening_matrix` with ``eigh`` as the zca eigensolver (the
    training paths pick sdecor's Jacobi solver where the native backend runs)."""
    def of(cov):
        se = shifted_cov(cov, eps)
        if method == "zca":
            return ZCAWhitening.apply(se, float(eps), eigh)
        return ref.newton_schulz(se, T)

    d = cov.shape[-1]
    r = group_layout(C, d)[1]
    if r == d:
        return of(cov)
    cov_even, cov_last = split_groups(cov, r)
    return join_groups(of(cov_even), of(cov_last), d)


def train_composition(x, weight, bias, num_channels: int, method: str, eps: float, T: int,
                      eigh=torch.linalg.eigh):
    """y = weight * W(cov(x)) (x - mean) + bias by differentiable torch ops: the reference's composition,
    whose autograd gives the double backward of the training paths (``eigh``: the zca eigensolver)."""
    mean, cov = ref.group_cov_unchecked(x, num_channels)
    w = whitening_matrices(cov, x.shape[1], method, eps, T, eigh)
    return eval_torch(x, mean, w, weight, bias)


def train_graph_backward(grad_y, x, weight, bias, needs, num_channels: int, method: str, eps: float, T: int,
                         eigh=torch.linalg.eigh):
    """(grad_x, grad_weight, grad_bias) of the training path as a graph (create_graph=True), through
    :func:`train_composition` recomputed from the saved inputs."""
    def fn(x, weight, bias):
        return train_composition(x, weight, bias, num_channels, method, eps, T, eigh)

    return graph_backward(fn, (x, weight, bias), needs, (grad_y,))


def train_with_passes(passes, x: torch.Tensor, num_channels: int, method: str, eps: float, T: int,
                      weight=None, bias=None):
    """``(y, mean, wm)``: y = weight * W (x - mean) + bias with batch statistics (arguments checked
    by the caller), the passes over x those of ``passes`` (:class:`TorchPasses`, or the native
    backend's), the d x d math and the autograd of this module.

    y has x's shape, dtype and memory format and is differentiable w.r.t. x, weight and bias; mean
    (G, d) and wm (G, d, d) are the batch statistics (float32, float64 for float64 input), detached.
    A smaller last group (d does not divide C): see the module docstring.
    """
    if x.shape[1] % num_channels == 0:       # no smaller last group: x itself (no views to make)
        return _GroupWhitenTrain.apply(x, weight, bias, passes, num_channels, method, float(eps), int(T))
    x_even, x_last, r = split_channels(x, num_channels)
    # the full groups' channels and the last group's, each through the even path (views of x)
    d, c0 = num_channels, x_even.shape[1]
    parts = [(x_even, d, slice(0, c0)), (x_last, r, slice(c0, None))]
    if c0 == 0:                                                      # C < d: one group of C channels
        parts = parts[1:]
    outs = [_GroupWhitenTrain.apply(xp, None if weight is None else weight[sl],
                                    None if bias is None else bias[sl], passes, dp, method, float(eps), int(T))
            for xp, dp, sl in parts]
    y = like_format(torch.cat([o[0] for o in outs], 1).contiguous(), x)
    _, mean_r, wm_r = outs[-1]
    mean_e, wm_e = (outs[0][1], outs[0][2]) if c0 else (None, None)
    return y, join_groups(mean_e, mean_r, d), join_groups(wm_e, wm_r, d)


def train_torch(x: torch.Tensor, num_channels: int, method: str, eps: float, T: int, weight=None, bias=None):
    """:func:`train_with_passes` on the torch backend's passes (:class:`TorchPasses`)."""
    return train_with_passes(TorchPasses, x, num_channels, method, eps, T, weight, bias)


def eval_torch(x: torch.Tensor, mean: torch.Tensor, wm: torch.Tensor, weight=None, bias=None):
    """y = weight * wm (x - mean) + bias with given statistics mean (G, d) and wm (G, d, d), through
    autograd (arguments checked by the caller)."""
    sd = stats_dtype(x.dtype)
    y = ref.apply_whitening(x, mean.to(sd), wm.to(sd))
    shape = (1, y.shape[1]) + (1,) * (y.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape).to(y.dtype)
    if bias is not None:
        y = y + bias.reshape(shape).to(y.dtype)
    return like_format(y, x)
