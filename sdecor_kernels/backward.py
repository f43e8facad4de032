"""The passes over x of the whitening backward (and of group_cov's backward).

Notation: see :mod:`sdecor_kernels._common` (x read as (N, C, L) by three strides, group g = channels
[g*d, (g+1)*d), tiles [BD, BM], fp32 accumulation); dy is read through its own strides (tn, tc, tl_).

- ``whiten_bwd_reduce_kernel`` grid (P, G): partials of D = sum_j dy_j (x_j - mean)^T and of
  sum_j dy_j, summed over the P programs in a fixed order afterwards (deterministic).
- ``whiten_bwd_dx_kernel`` grid (P, G): dx = B dy + A (x - mean) + v (group_cov's backward without dy).

With HAS_SCALE both read x - mean as (x - mean) / c, c the group's power-of-two scale of the statistics
(see :mod:`sdecor_kernels.stats`): the whitening backward then stays in fp32's range up to |x| ~ 3e38.

For BD > 64 the dx kernel reloads its d x d matrices inside the loop over samples, RB rows at a time,
and the reduce kernel keeps its d x d accumulator as two halves of BD/2 rows (the whole products spill
at BD = 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (BF16, SPEC_DS, XT_ARGS, ProductPassConfig, ReducePassConfig, _block_range, _group_size,
                      _inv_pow2, _mm, _tile, _tile_rows, f32, flat_view, launch, pass_setup, signature)

__all__ = ["STATIC_SPECS", "whiten_bwd_dx", "whiten_bwd_reduce"]


# ---------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def whiten_bwd_reduce_kernel(dy_ptr, x_ptr, mean_ptr, scale_ptr, dp_ptr, sp_ptr, d, C, m, L, sn, sc, sl, tn,
                             tc, tl_, n_blocks, bpp, P, HAS_SCALE: tl.constexpr, BD: tl.constexpr,
                             BM: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
                             HALVES: tl.constexpr):
    s = tl.program_id(0)
    g = tl.program_id(1)
    c = tl.arange(0, BD)
    dg = _group_size(g, d, C)
    mu = tl.load(mean_ptr + g.to(tl.int64) * d + c, mask=c < dg, other=0.0)
    if HAS_SCALE:
        # (x - mean) / c = x / c - mean / c (one FMA, exact), c the group's power-of-two scale: D / c
        # stays finite where D would not
        rc = _inv_pow2(tl.load(scale_ptr + g))
        mu = mu * rc
    base = (g * P + s).to(tl.int64)
    b0, b1 = _block_range(s, n_blocks, bpp)
    if HALVES:
        # the rows of D in two accumulators of BD/2 rows, each from its half of dy (same sums)
        h = tl.arange(0, BD // 2)
        accT = tl.zeros((BD // 2, BD), dtype=tl.float32)
        accB = tl.zeros((BD // 2, BD), dtype=tl.float32)
        accST = tl.zeros((BD // 2,), dtype=tl.float32)
        accSB = tl.zeros((BD // 2,), dtype=tl.float32)
        for b in range(b0, b1):
            j0 = b * BM
            off, mask = _tile(g, j0, d, dg, m, L, sn, sc, sl, BD, BM)
            xt = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
            if HAS_SCALE:
                xt = xt * rc
            xcT = tl.trans(tl.where(mask, xt - mu[:, None], 0.0))
            offT, maskT = _tile_rows(g, h, j0, d, dg, m, L, tn, tc, tl_, BM)
            dyT = tl.load(dy_ptr + offT, mask=maskT, other=0.0).to(tl.float32)
            accST += tl.sum(dyT, axis=1)
            accT += _mm(dyT, xcT, USE_DOT, PREC)
            offB, maskB = _tile_rows(g, h + BD // 2, j0, d, dg, m, L, tn, tc, tl_, BM)
            dyB = tl.load(dy_ptr + offB, mask=maskB, other=0.0).to(tl.float32)
            accSB += tl.sum(dyB, axis=1)
            accB += _mm(dyB, xcT, USE_DOT, PREC)
        tl.store(sp_ptr + base * BD + h, accST)
        tl.store(sp_ptr + base * BD + BD // 2 + h, accSB)
        tl.store(dp_ptr + base * BD * BD + h[:, None] * BD + c[None, :], accT)
        tl.store(dp_ptr + base * BD * BD + (h + BD // 2)[:, None] * BD + c[None, :], accB)
        return
    accD = tl.zeros((BD, BD), dtype=tl.float32)
    accS = tl.zeros((BD,), dtype=tl.float32)
    for b in range(b0, b1):
        j0 = b * BM
        off, mask = _tile(g, j0, d, dg, m, L, sn, sc, sl, BD, BM)
        offd, _ = _tile(g, j0, d, dg, m, L, tn, tc, tl_, BD, BM)
        xt = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        dyt = tl.load(dy_ptr + offd, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            xt = xt * rc
        xc = tl.where(mask, xt - mu[:, None], 0.0)
        accD += _mm(dyt, tl.trans(xc), USE_DOT, PREC)                        # sum dy xc^T
        accS += tl.sum(dyt, axis=1)
    tl.store(sp_ptr + base * BD + c, accS)
    tl.store(dp_ptr + base * BD * BD + c[:, None] * BD + c[None, :], accD)


@triton.jit
def whiten_bwd_dx_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, a_ptr, b_ptr, v_ptr, scale_ptr, d, C, m, L, sn, sc,
                         sl, tn, tc, tl_, n_blocks, bpp, HAS_DY: tl.constexpr, HAS_SCALE: tl.constexpr,
                         BD: tl.constexpr, BM: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
                         MAT_IN_LOOP: tl.constexpr, RB: tl.constexpr):
    s = tl.program_id(0)
    g = tl.program_id(1)
    c = tl.arange(0, BD)
    dg = _group_size(g, d, C)
    cm = c < dg
    m2 = cm[:, None] & cm[None, :]
    gd = g.to(tl.int64) * d
    mat = gd * d + c[:, None] * d + c[None, :]
    if not MAT_IN_LOOP:
        A = tl.load(a_ptr + mat, mask=m2, other=0.0)
        if HAS_DY:
            B = tl.load(b_ptr + mat, mask=m2, other=0.0)
    mu = tl.load(mean_ptr + gd + c, mask=cm, other=0.0)
    v = tl.load(v_ptr + gd + c, mask=cm, other=0.0)
    if HAS_SCALE:
        # A (x - mean) as (c A) ((x - mean) / c), c the group's power-of-two scale: at |x| ~ 1e30, A
        # (~1e-60) is below fp32's range and c A is not. (x - mean) / c as one FMA per element,
        # x / c - mean / c (exact: c is a power of two).
        rc = _inv_pow2(tl.load(scale_ptr + g))
        mu = mu * rc
    b0, b1 = _block_range(s, n_blocks, bpp)
    for b in range(b0, b1):
        j0 = b * BM
        off, mask = _tile(g, j0, d, dg, m, L, sn, sc, sl, BD, BM)
        xt = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            xc = tl.where(mask, xt * rc - mu[:, None], 0.0)
        else:
            xc = tl.where(mask, xt - mu[:, None], 0.0)
        if RB < BD:
            if HAS_DY:
                offd, _ = _tile(g, j0, d, dg, m, L, tn, tc, tl_, BD, BM)
                dyt = tl.load(dy_ptr + offd, mask=mask, other=0.0).to(tl.float32)
            # output rows in blocks of RB: rows of A (and B) reloaded per block, xc and dy reused
            for rb in range(BD // RB):
                r = rb * RB + tl.arange(0, RB)
                rm = r < dg
                matr = gd * d + r[:, None] * d + c[None, :]
                m2r = rm[:, None] & cm[None, :]
                out = _mm(tl.load(a_ptr + matr, mask=m2r, other=0.0), xc, USE_DOT, PREC)
                out += tl.load(v_ptr + gd + r, mask=rm, other=0.0)[:, None]
                if HAS_DY:
                    out += _mm(tl.load(b_ptr + matr, mask=m2r, other=0.0), dyt, USE_DOT, PREC)
                offr, maskr = _tile_rows(g, r, j0, d, dg, m, L, sn, sc, sl, BM)
                tl.store(dx_ptr + offr, out.to(dx_ptr.dtype.element_ty), mask=maskr)
        else:
            if MAT_IN_LOOP:
                A = tl.load(a_ptr + mat, mask=m2, other=0.0)
            out = _mm(A, xc, USE_DOT, PREC) + v[:, None]
            if HAS_DY:
                offd, _ = _tile(g, j0, d, dg, m, L, tn, tc, tl_, BD, BM)
                dyt = tl.load(dy_ptr + offd, mask=mask, other=0.0).to(tl.float32)
                if MAT_IN_LOOP:
                    B = tl.load(b_ptr + mat, mask=m2, other=0.0)
                out += _mm(B, dyt, USE_DOT, PREC)
            tl.store(dx_ptr + off, out.to(dx_ptr.dtype.element_ty), mask=mask)



# ---------------------------------------------------------------------------------------------------
# launch configuration


# ---------------------------------------------------------------------------------------------------
# launchers


def whiten_bwd_reduce(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor | None = None):
    """D = sum_j dy_j (x_j - mean)^T (G, d, d) and sum_j dy_j (G, d), fp32, in one read of (dy, x).

    With ``scale`` (G,), powers of two c: D / c instead of D (finite where D is not).
    Two stages: per-program partials, then a fixed-order sum over the programs (deterministic).
    """
    x, sn, sc, sl, L = flat_view(x, output_layout=True)
    dy, tn, tc, tl_, _ = flat_view(dy)
    G, d = mean.shape
    dev = x.device
    cfg, m, n_blocks, P, bpp = pass_setup(ReducePassConfig, x, L, d)
    BD = cfg.BD
    dp = f32(G, P, BD, BD, device=dev)
    sp = f32(G, P, BD, device=dev)
    mean = mean.to(torch.float32).contiguous()
    launch(whiten_bwd_reduce_kernel, (P, G), dy, x, mean, _scale_arg(scale, mean), dp, sp,
           d, x.shape[1], m, L, sn, sc, sl, tn, tc, tl_, n_blocks, bpp, P, HAS_SCALE=scale is not None, **cfg.meta())
    return dp.sum(1)[:, :d, :d], sp.sum(1)[:, :d]


def whiten_bwd_dx(dy: torch.Tensor | None, x: torch.Tensor, mean: torch.Tensor, a: torch.Tensor,
                  b: torch.Tensor | None, v: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """dx_j = B dy_j + A (x_j - mean) + v per group (without the B term when dy is None, b then
    unused), in x's dtype and layout, in one read of (dy, x) and one write.

    With ``scale`` (G,), powers of two c: A (x_j - mean) / c instead of A (x_j - mean).
    """
    x, sn, sc, sl, L = flat_view(x, output_layout=True)
    dy_given = dy is not None
    if dy_given:
        if b is None:
            raise ValueError("whiten_bwd_dx: b is required when dy is given")
        dy, tn, tc, tl_, _ = flat_view(dy)
    else:
        dy, tn, tc, tl_ = x, sn, sc, sl
    G, d = mean.shape
    cfg, m, n_blocks, P, bpp = pass_setup(ProductPassConfig, x, L, d)
    dx = torch.empty_like(x)
    a = a.to(torch.float32).contiguous()
    mean = mean.to(torch.float32).contiguous()
    launch(whiten_bwd_dx_kernel, (P, G), dy, x, dx, mean, a,
           b.to(torch.float32).contiguous() if b is not None else a,
           v.to(torch.float32).contiguous(), _scale_arg(scale, mean),
           d, x.shape[1], m, L, sn, sc, sl, tn, tc, tl_, n_blocks, bpp, HAS_DY=dy_given, HAS_SCALE=scale is not None,
           **cfg.meta())
    return dx


def _scale_arg(scale: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The scale_ptr argument: the scale as fp32, or any fp32 tensor when there is none (unread)."""
    return like if scale is None else scale.to(torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------------
# ahead-of-time compilation specs (see sdecor_kernels.static); d = group size

_REDUCE_ARGS = f"dy_ptr x_ptr mean_ptr scale_ptr dp_ptr sp_ptr {XT_ARGS} P"
_DX_ARGS = f"dy_ptr x_ptr dx_ptr mean_ptr a_ptr b_ptr v_ptr scale_ptr {XT_ARGS}"

# The training variants (HAS_SCALE) of the reduce and of the dx pass with dy; without a scale (eval,
# group_cov's backward) the same code less one multiply per element.
STATIC_SPECS = [
    dict(name="whiten_bwd_reduce_kernel", kernel=whiten_bwd_reduce_kernel, ds=SPEC_DS,
         signature=signature(_REDUCE_ARGS),
         config=lambda d: dict(ReducePassConfig.for_group(d, True).meta(), HAS_SCALE=True)),
    dict(name="whiten_bwd_reduce_kernel[bf16]", kernel=whiten_bwd_reduce_kernel, ds=SPEC_DS,
         signature=signature(_REDUCE_ARGS, BF16),
         config=lambda d: dict(ReducePassConfig.for_group(d, True).meta(), HAS_SCALE=True)),
    dict(name="whiten_bwd_dx_kernel[HAS_DY]", kernel=whiten_bwd_dx_kernel, ds=SPEC_DS,
         signature=signature(_DX_ARGS),
         config=lambda d: dict(ProductPassConfig.for_group(d, True).meta(), HAS_DY=True, HAS_SCALE=True)),
    dict(name="whiten_bwd_dx_kernel", kernel=whiten_bwd_dx_kernel, ds=SPEC_DS,
         signature=signature(_DX_ARGS),
         config=lambda d: dict(ProductPassConfig.for_group(d, True).meta(), HAS_DY=False, HAS_SCALE=False)),
]
