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
"""

from __future__ import annotations

import math

import torch

from .. import reference as ref
from .._common import (eye_like, grouped, like_format, no_autocast_function, shifted_cov, stats_dtype,
                       zca_backward, zca_from_eigh)

__all__ = ["group_whiten_eval", "group_whiten_train", "newton_forward", "newton_backward"]


# ---------------------------------------------------------------------------------------------------
# the d x d part: whitening matrix and its exact backward


def newton_forward(se: torch.Tensor, T: int):
    """IterNorm's W = P_T / sqrt(tr Se) by the coupled iteration of the reference.

    Returns (W, trace, Z_T, ys, zs, ms) where ys[k], zs[k], ms[k] are Y_k, Z_k and M_k of step k,
    kept for :func:`newton_backward`.
    """
    trace = se.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]   # tr(Se): (G, 1, 1)
    eye = eye_like(se)
    y = se / trace                                                   # Y_0 = Sn
    z = eye.expand_as(se)                                            # Z_0 = I
    ys, zs, ms = [], [], []
    for _ in range(T):
        m = 1.5 * eye - 0.5 * (z @ y)                                # M_k = (3I - Z_k Y_k) / 2
        ys.append(y)
        zs.append(z)
        ms.append(m)
        y = y @ m                                                    # Y_{k+1} = Y_k M_k
        z = m @ z                                                    # Z_{k+1} = M_k Z_k
    return z / trace.sqrt(), trace, z, ys, zs, ms


def newton_backward(grad_w: torch.Tensor, se: torch.Tensor, trace: torch.Tensor, z_last: torch.Tensor,
                    ys, zs, ms) -> torch.Tensor:
    """dL/dSe for W = Z_T / sqrt(tr Se): the recurrence of :func:`newton_forward` run in reverse."""
    rsqrt_tr = trace.rsqrt()
    gz = grad_w * rsqrt_tr                                           # through W = Z_T / sqrt(tr)
    g_tr = -0.5 * (grad_w * z_last).sum((-2, -1), keepdim=True) * rsqrt_tr / trace
    gy = torch.zeros_like(gz)
    for y, z, m in zip(reversed(ys), reversed(zs), reversed(ms)):
        # Y_{k+1} = Y_k M_k and Z_{k+1} = M_k Z_k
        gm = y.transpose(-1, -2) @ gy + gz @ z.transpose(-1, -2)
        gy_new = gy @ m.transpose(-1, -2)
        gz_new = m.transpose(-1, -2) @ gz
        # M_k = 1.5 I - 0.5 Z_k Y_k
        gz = gz_new - 0.5 * (gm @ y.transpose(-1, -2))
        gy = gy_new - 0.5 * (z.transpose(-1, -2) @ gm)
    # Y_0 = Se / tr(Se)
    g_tr = g_tr - (gy * se).sum((-2, -1), keepdim=True) / (trace * trace)
    return gy / trace + g_tr * eye_like(se)


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


@no_autocast_function
class _GroupWhitenTrain(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, num_channels, method, eps, T):
        sd = stats_dtype(x.dtype)
        N, C = x.shape[:2]
        d = num_channels
        G = C // d
        L = math.prod(x.shape[2:])
        m = N * L
        xg = grouped(x, d)
        if xg.dtype != sd:
            xg = xg.to(sd)
        blocks = _blocks(N, xg[0].numel() * xg.element_size())
        # covariance of the centred data, block by block (x - mean formed in cache, never stored)
        mean = xg.mean(dim=(0, 3))                                   # (G, d)
        mean4 = mean[None, :, :, None]
        buf = torch.empty((blocks[0][1],) + xg.shape[1:], dtype=sd, device=x.device)
        cov = torch.zeros(G, d, d, dtype=sd, device=x.device)
        for i, j in blocks:
            xc = torch.sub(xg[i:j], mean4, out=buf[:j - i])
            cov += torch.matmul(xc, xc.transpose(-1, -2)).sum(0)
        cov.div_(m)                                                  # Xc Xc^T / m: (G, d, d)
        se = shifted_cov(cov, eps)
        if method == "zca":
            evals, evecs = torch.linalg.eigh(se)
            w = zca_from_eigh(evals, evecs, eps)
            small = (evals, evecs)
            history = ()
        else:
            w, trace, z_last, ys, zs, ms = newton_forward(se, T)
            small = (se, trace, z_last)
            history = (*ys, *zs, *ms)
        wg = None if weight is None else weight.to(sd).reshape(G, d)
        a = w if wg is None else wg.unsqueeze(-1) * w                # diag(weight) W
        # y = A (x - mean) + b, block by block (x - mean formed in cache, as the reference does).
        # y is allocated with x's shape and written through a view, so that the output is not a view
        # (callers may modify it in place, e.g. ReLU(inplace=True)).
        y = torch.empty(x.shape, dtype=sd, device=x.device)
        yg = y.view(N, G, d, L)
        n0 = blocks[0][1]
        a_b = _batched(a, n0)
        b_b = None if bias is None else _batched(bias.to(sd).reshape(G, d, 1), n0)
        for i, j in blocks:
            n = j - i
            xc = torch.sub(xg[i:j], mean4, out=buf[:n]).view(n * G, d, L)
            out = yg[i:j].view(n * G, d, L)
            if b_b is None:
                torch.bmm(a_b[:n * G], xc, out=out)
            else:
                torch.baddbmm(b_b[:n * G], a_b[:n * G], xc, out=out)
        y = like_format(y.to(x.dtype), x)

        ctx.meta = (method, eps, T, N, G, d, m, weight is not None, bias is not None,
                    None if bias is None else bias.dtype)
        ctx.save_for_backward(xg, mean, w, a, weight, *small, *history)
        ctx.mark_non_differentiable(mean, w)
        return y, mean, w

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_w):
        method, eps, T, N, G, d, m, has_weight, has_bias, bias_dtype = ctx.meta
        xg, mean, w, a, weight, *rest = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        sd = xg.dtype
        shape = grad_y.shape
        L = xg.shape[-1]
        gy = grouped(grad_y, d)
        if gy.dtype != sd:
            gy = gy.to(sd)
        gy = gy.contiguous()
        grad_x = grad_weight = grad_bias = None
        need_gx = need_x or (has_weight and need_weight)
        if not need_gx:
            if has_bias and need_bias:
                grad_bias = gy.sum(dim=(0, 3)).reshape(-1).to(bias_dtype)
            return grad_x, grad_weight, grad_bias, None, None, None, None
        # one blocked pass: sum gy and GX = sum gy Xc^T, Xc formed block by block in cache
        blocks = _blocks(N, xg[0].numel() * xg.element_size())
        n0 = blocks[0][1]
        buf = torch.empty((n0,) + xg.shape[1:], dtype=sd, device=xg.device)
        mean4 = mean[None, :, :, None]
        gsum = torch.zeros(G, d, dtype=sd, device=xg.device)
        gx_t = torch.zeros(G, d, d, dtype=sd, device=xg.device)
        for i, j in blocks:
            gb = gy[i:j]
            xc = torch.sub(xg[i:j], mean4, out=buf[:j - i])
            gsum += gb.sum(dim=(0, 3))
            gx_t += torch.matmul(gb, xc.transpose(-1, -2)).sum(0)
        if has_bias and need_bias:
            grad_bias = gsum.reshape(-1).to(bias_dtype)
        if has_weight:
            wg = weight.to(sd).reshape(G, d)
            if need_weight:
                grad_weight = (gx_t * w).sum(-1).reshape(-1).to(weight.dtype)
            grad_w = wg.unsqueeze(-1) * gx_t
        else:
            grad_w = gx_t
        if not need_x:
            return grad_x, grad_weight, grad_bias, None, None, None, None
        if method == "zca":
            evals, evecs = rest
            grad_se = zca_backward(grad_w, evals, evecs, eps)
        else:
            se, trace, z_last = rest[:3]
            hist = rest[3:]
            grad_se = newton_backward(grad_w, se, trace, z_last, hist[:T], hist[T:2 * T], hist[2 * T:])
        s2 = (grad_se + grad_se.transpose(-1, -2)) / m               # (2/m) sym(dSe)
        a_t = a.transpose(-1, -2)
        shift = -(a_t @ (gsum / m).unsqueeze(-1))                    # -A^T mean(gy): (G, d, 1)
        # dx = A^T gy + (2/m) sym(dSe) Xc - A^T mean(gy), block by block
        dx = torch.empty((N, G, d, L), dtype=sd, device=xg.device)
        shift_b, a_t_b, s2_b = _batched(shift, n0), _batched(a_t, n0), _batched(s2, n0)
        for i, j in blocks:
            n = j - i
            k = n * G
            xc = torch.sub(xg[i:j], mean4, out=buf[:n]).view(k, d, L)
            out = dx[i:j].view(k, d, L)
            torch.baddbmm(shift_b[:k], a_t_b[:k], gy[i:j].reshape(k, d, L), out=out)
            out.baddbmm_(s2_b[:k], xc)
        grad_x = dx.reshape(shape).to(grad_y.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def group_whiten_train(x: torch.Tensor, num_channels: int, method: str, eps: float, T: int,
                       weight=None, bias=None):
    """``(y, mean, wm)``: y = weight * W (x - mean) + bias with batch statistics (arguments checked
    by the caller).

    y has x's shape, dtype and memory format and is differentiable w.r.t. x, weight and bias; mean
    (G, d) and wm (G, d, d) are the batch statistics (float32, float64 for float64 input), detached.
    """
    return _GroupWhitenTrain.apply(x, weight, bias, num_channels, method, float(eps), int(T))


def group_whiten_eval(x: torch.Tensor, mean: torch.Tensor, wm: torch.Tensor, weight=None, bias=None):
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
