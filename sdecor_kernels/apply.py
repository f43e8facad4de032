"""Group whitening with given statistics: y = gamma * W (x - mean) + beta per group.

Notation: see :mod:`sdecor_kernels._common` (x read as (N, C, L) by three strides, group g = channels
[g*d, (g+1)*d), tiles [BD, BM], fp32 accumulation).

- ``whiten_apply_kernel`` grid (P, G): one read of x, one write of y (in x's dtype and layout).

For BD > 64 the kernel reloads its d x d matrix inside the loop over samples, RB rows at a time (a
product of RB output rows per step; the whole product spills at BD = 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (BF16, SPEC_DS, X_ARGS, ProductPassConfig, _block_range, _group_size, _mm, _tile, _tile_rows,
                      flat_view, launch, pass_setup, signature)

__all__ = ["STATIC_SPECS", "whiten_apply"]


# ---------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _apply_matrix(w_ptr, weight_ptr, gd, d, dg, BD: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    return _apply_rows(w_ptr, weight_ptr, gd, d, dg, tl.arange(0, BD), BD, HAS_WEIGHT)


@triton.jit
def _apply_rows(w_ptr, weight_ptr, gd, d, dg, r, BD: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """Rows r of diag(weight) W, [len(r), BD], zero outside the group's dg x dg block."""
    c = tl.arange(0, BD)
    rm = r < dg
    W = tl.load(w_ptr + gd * d + r[:, None] * d + c[None, :], mask=rm[:, None] & (c < dg)[None, :], other=0.0)
    if HAS_WEIGHT:
        W = W * tl.load(weight_ptr + gd + r, mask=rm, other=0.0).to(tl.float32)[:, None]
    return W


@triton.jit
def whiten_apply_kernel(x_ptr, y_ptr, mean_ptr, w_ptr, weight_ptr, bias_ptr, d, C, m, L, sn, sc, sl,
                        n_blocks, bpp, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BD: tl.constexpr, BM: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
                        MAT_IN_LOOP: tl.constexpr, RB: tl.constexpr):
    s = tl.program_id(0)
    g = tl.program_id(1)
    c = tl.arange(0, BD)
    dg = _group_size(g, d, C)
    cm = c < dg
    gd = g.to(tl.int64) * d
    if not MAT_IN_LOOP:
        W = _apply_matrix(w_ptr, weight_ptr, gd, d, dg, BD, HAS_WEIGHT)
    mu = tl.load(mean_ptr + gd + c, mask=cm, other=0.0)
    if HAS_BIAS:
        beta = tl.load(bias_ptr + gd + c, mask=cm, other=0.0).to(tl.float32)
    else:
        beta = tl.zeros((BD,), dtype=tl.float32)
    b0, b1 = _block_range(s, n_blocks, bpp)
    for b in range(b0, b1):
        off, mask = _tile(g, b * BM, d, dg, m, L, sn, sc, sl, BD, BM)
        xt = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        xc = tl.where(mask, xt - mu[:, None], 0.0)                           # [BD, BM]
        if RB < BD:
            # output rows in blocks of RB: rows of W reloaded per block (L1/L2 hits), xc reused
            for rb in range(BD // RB):
                r = rb * RB + tl.arange(0, RB)
                Wr = _apply_rows(w_ptr, weight_ptr, gd, d, dg, r, BD, HAS_WEIGHT)
                yr = _mm(Wr, xc, USE_DOT, PREC)
                if HAS_BIAS:
                    yr += tl.load(bias_ptr + gd + r, mask=r < dg, other=0.0).to(tl.float32)[:, None]
                offr, maskr = _tile_rows(g, r, b * BM, d, dg, m, L, sn, sc, sl, BM)
                tl.store(y_ptr + offr, yr.to(y_ptr.dtype.element_ty), mask=maskr)
        else:
            if MAT_IN_LOOP:
                # d x d too large to stay in registers across the loop: reload it (L1/L2 hits)
                W = _apply_matrix(w_ptr, weight_ptr, gd, d, dg, BD, HAS_WEIGHT)
            yt = _mm(W, xc, USE_DOT, PREC) + beta[:, None]
            tl.store(y_ptr + off, yt.to(y_ptr.dtype.element_ty), mask=mask)



# ---------------------------------------------------------------------------------------------------
# launch configuration


# ---------------------------------------------------------------------------------------------------
# launcher


def whiten_apply(x: torch.Tensor, mean: torch.Tensor, w: torch.Tensor, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = weight * W (x - mean) + bias per group, in x's dtype and memory format (contiguous when x
    is neither contiguous nor channels_last); a smaller last group (C < G d) uses the top-left block
    of its entries of mean (G, d) and W (G, d, d)."""
    x, sn, sc, sl, L = flat_view(x, output_layout=True)
    G, d = mean.shape
    cfg, m, n_blocks, P, bpp = pass_setup(ProductPassConfig, x, L, d)
    y = torch.empty_like(x)
    mean = mean.to(torch.float32).contiguous()
    w = w.to(torch.float32).contiguous()
    launch(whiten_apply_kernel, (P, G), x, y, mean, w,
           weight.contiguous() if weight is not None else mean,
           bias.contiguous() if bias is not None else mean,
           d, x.shape[1], m, L, sn, sc, sl, n_blocks, bpp, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
           **cfg.meta())
    return y


# ---------------------------------------------------------------------------------------------------
# ahead-of-time compilation specs (see sdecor_kernels.static); d = group size

_APPLY_ARGS = f"x_ptr y_ptr mean_ptr w_ptr weight_ptr bias_ptr {X_ARGS}"

STATIC_SPECS = [
    dict(name="whiten_apply_kernel", kernel=whiten_apply_kernel, ds=SPEC_DS,
         signature=signature(_APPLY_ARGS),
         config=lambda d: dict(ProductPassConfig.for_group(d, True).meta(), HAS_WEIGHT=True, HAS_BIAS=True)),
    dict(name="whiten_apply_kernel[bf16]", kernel=whiten_apply_kernel, ds=SPEC_DS,
         signature=signature(_APPLY_ARGS, BF16),
         config=lambda d: dict(ProductPassConfig.for_group(d, True).meta(), HAS_WEIGHT=True, HAS_BIAS=True)),
]
