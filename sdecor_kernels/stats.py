"""Group statistics: mean (G, d) and biased covariance (G, d, d) of x in one read of x.

Notation: see :mod:`sdecor_kernels._common` (x read as (N, C, L) by three strides, group g = channels
[g*d, (g+1)*d), tiles [BD, BM], fp32 accumulation).

- ``group_stats_partial_kernel``  grid (P, G): program (s, g) reduces its contiguous range of sample
  blocks to a shifted sum and a shifted second moment (shift = the first sample of each channel, which
  keeps E[xx^T] - mean mean^T free of cancellation when |mean| >> std).
- ``group_stats_finalize_kernel`` grid (G,): sums the P partials in a fixed order (deterministic), writes
  mean and cov, and with NEWTON runs the Newton-Schulz steps and writes W as well.

No host synchronisation, no float atomics. For BD > 64 the partial kernel keeps its d x d accumulator
as two halves of BD/2 rows (the whole product spills at BD = 128).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import newton
from ._common import (BF16, SPEC_DS, X_ARGS, MatrixConfig, ReducePassConfig, _block_range, _eye, _mm, _tile,
                      _tile_rows, f32, flat_view, launch, pass_setup, pow2, signature)
from .newton import _newton_regs

__all__ = ["STATIC_SPECS", "FinalizeConfig", "group_stats", "group_stats_newton"]


# ---------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def group_stats_partial_kernel(x_ptr, s1_ptr, s2_ptr, d, m, L, sn, sc, sl, n_blocks, bpp, P,
                               BD: tl.constexpr, BM: tl.constexpr, USE_DOT: tl.constexpr,
                               PREC: tl.constexpr, HALVES: tl.constexpr):
    s = tl.program_id(0)
    g = tl.program_id(1)
    c = tl.arange(0, BD)
    # shift = sample j = 0 of each channel
    k = tl.load(x_ptr + (g * d + c).to(tl.int64) * sc, mask=c < d, other=0.0).to(tl.float32)
    base = (g * P + s).to(tl.int64)
    if HALVES:
        # the rows of the second moment in two accumulators of BD/2 rows (same sums)
        h = tl.arange(0, BD // 2)
        kT = tl.load(x_ptr + (g * d + h).to(tl.int64) * sc, mask=h < d, other=0.0).to(tl.float32)
        kB = tl.load(x_ptr + (g * d + BD // 2 + h).to(tl.int64) * sc, mask=h + BD // 2 < d,
                     other=0.0).to(tl.float32)
        accT = tl.zeros((BD // 2, BD), dtype=tl.float32)
        accB = tl.zeros((BD // 2, BD), dtype=tl.float32)
        accST = tl.zeros((BD // 2,), dtype=tl.float32)
        accSB = tl.zeros((BD // 2,), dtype=tl.float32)
        b0, b1 = _block_range(s, n_blocks, bpp)
        for b in range(b0, b1):
            off, mask = _tile(g, b * BM, d, m, L, sn, sc, sl, BD, BM)
            xt = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
            xsT = tl.trans(tl.where(mask, xt - k[:, None], 0.0))             # [BM, BD]
            offT, maskT = _tile_rows(g, h, b * BM, d, m, L, sn, sc, sl, BM)
            xT = tl.load(x_ptr + offT, mask=maskT, other=0.0).to(tl.float32)
            xT = tl.where(maskT, xT - kT[:, None], 0.0)
            accT += _mm(xT, xsT, USE_DOT, PREC)
            accST += tl.sum(xT, axis=1)
            offB, maskB = _tile_rows(g, h + BD // 2, b * BM, d, m, L, sn, sc, sl, BM)
            xB = tl.load(x_ptr + offB, mask=maskB, other=0.0).to(tl.float32)
            xB = tl.where(maskB, xB - kB[:, None], 0.0)
            accB += _mm(xB, xsT, USE_DOT, PREC)
            accSB += tl.sum(xB, axis=1)
        tl.store(s1_ptr + base * BD + h, accST)
        tl.store(s1_ptr + base * BD + BD // 2 + h, accSB)
        tl.store(s2_ptr + base * BD * BD + h[:, None] * BD + c[None, :], accT)
        tl.store(s2_ptr + base * BD * BD + (h + BD // 2)[:, None] * BD + c[None, :], accB)
        return
    acc1 = tl.zeros((BD,), dtype=tl.float32)
    acc2 = tl.zeros((BD, BD), dtype=tl.float32)
    b0, b1 = _block_range(s, n_blocks, bpp)
    for b in range(b0, b1):
        off, mask = _tile(g, b * BM, d, m, L, sn, sc, sl, BD, BM)
        xt = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        xs = tl.where(mask, xt - k[:, None], 0.0)                        # [BD, BM]
        acc1 += tl.sum(xs, axis=1)
        acc2 += _mm(xs, tl.trans(xs), USE_DOT, PREC)                      # [BD, BD]
    tl.store(s1_ptr + base * BD + c, acc1)
    tl.store(s2_ptr + base * BD * BD + c[:, None] * BD + c[None, :], acc2)


@triton.jit
def group_stats_finalize_kernel(x_ptr, s1_ptr, s2_ptr, mean_ptr, cov_ptr, w_ptr, d, m, sc, P, eps, T,
                                NEWTON: tl.constexpr, BD: tl.constexpr, USE_DOT: tl.constexpr,
                                PREC: tl.constexpr):
    g = tl.program_id(0)
    c = tl.arange(0, BD)
    cm = c < d
    m2 = cm[:, None] & cm[None, :]
    k = tl.load(x_ptr + (g * d + c).to(tl.int64) * sc, mask=cm, other=0.0).to(tl.float32)
    s1 = tl.zeros((BD,), dtype=tl.float32)
    s2 = tl.zeros((BD, BD), dtype=tl.float32)
    for s in range(0, P):                                                # fixed order: deterministic
        base = (g * P + s).to(tl.int64)
        s1 += tl.load(s1_ptr + base * BD + c)
        s2 += tl.load(s2_ptr + base * BD * BD + c[:, None] * BD + c[None, :])
    ms = s1 / m                                                          # mean - shift
    cov = s2 / m - ms[:, None] * ms[None, :]
    cov = tl.where(m2, cov, 0.0)
    gd = g.to(tl.int64) * d
    tl.store(mean_ptr + gd + c, k + ms, mask=cm)
    tl.store(cov_ptr + gd * d + c[:, None] * d + c[None, :], cov, mask=m2)
    if NEWTON:
        eye = _eye(BD, d)
        W = _newton_regs(cov + eps * eye, eye, T, USE_DOT, PREC)
        tl.store(w_ptr + gd * d + c[:, None] * d + c[None, :], W, mask=m2)



# ---------------------------------------------------------------------------------------------------
# launch configuration


@dataclass(frozen=True)
class FinalizeConfig(MatrixConfig):
    """Constexprs and launch options of group_stats_finalize_kernel for group size d (the same on
    every device; NEWTON is chosen per launch)."""

    @classmethod
    def for_group(cls, d: int) -> "FinalizeConfig":
        blocks = cls.matrix_blocks(d)
        return cls(**blocks, num_warps=4 if blocks["BD"] <= 16 else 8, num_stages=1)


# ---------------------------------------------------------------------------------------------------
# launchers


def group_stats(x: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mean (G, d), cov (G, d, d) fp32 of x (N, C, *S) in one read of x."""
    mean, cov, _ = _group_stats(x, d, None)
    return mean, cov


def group_stats_newton(x: torch.Tensor, d: int, eps: float, T: int):
    """mean (G, d), cov (G, d, d) and W (G, d, d), the Newton-Schulz whitening matrix of cov + eps I
    (T steps), fp32. W comes from the finalize launch when its matrices fit in registers
    (BD <= newton.REG_BD), else from newton.newton_forward."""
    mean, cov, w = _group_stats(x, d, (eps, T))
    if w is None:
        w = newton.newton_forward(cov, eps, T)
    return mean, cov, w


def _group_stats(x: torch.Tensor, d: int, newton_args: tuple[float, int] | None):
    """(mean, cov, W or None): W only when newton_args = (eps, T) is given and fused in finalize."""
    x, sn, sc, sl, L = flat_view(x)
    G, dev = x.shape[1] // d, x.device
    cfg, m, n_blocks, P, bpp = pass_setup(ReducePassConfig, x, L, d)
    BD = cfg.BD
    s1 = f32(G, P, BD, device=dev)
    s2 = f32(G, P, BD, BD, device=dev)
    launch(group_stats_partial_kernel, (P, G), x, s1, s2, d, m, L, sn, sc, sl, n_blocks, bpp, P,
           **cfg.meta())
    mean = f32(G, d, device=dev)
    cov = f32(G, d, d, device=dev)
    fused = newton_args is not None and BD <= newton.REG_BD
    w = f32(G, d, d, device=dev) if fused else cov
    eps, T = newton_args if newton_args is not None else (0.0, 0)
    launch(group_stats_finalize_kernel, (G,), x, s1, s2, mean, cov, w, d, m, sc, P, float(eps), int(T),
           NEWTON=fused, **FinalizeConfig.for_group(d).meta())
    return mean, cov, (w if fused else None)


# ---------------------------------------------------------------------------------------------------
# ahead-of-time compilation specs (see sdecor_kernels.static); d = group size

_PARTIAL_ARGS = f"x_ptr s1_ptr s2_ptr {X_ARGS} P"
_FINALIZE_ARGS = "x_ptr s1_ptr s2_ptr mean_ptr cov_ptr w_ptr d m sc P eps T"

STATIC_SPECS = [
    dict(name="group_stats_partial_kernel", kernel=group_stats_partial_kernel, ds=SPEC_DS,
         signature=signature(_PARTIAL_ARGS), config=lambda d: ReducePassConfig.for_group(d, True).meta()),
    dict(name="group_stats_partial_kernel[bf16]", kernel=group_stats_partial_kernel, ds=SPEC_DS,
         signature=signature(_PARTIAL_ARGS, BF16), config=lambda d: ReducePassConfig.for_group(d, True).meta()),
    dict(name="group_stats_finalize_kernel[NEWTON]", kernel=group_stats_finalize_kernel,
         ds=tuple(d for d in SPEC_DS if pow2(d) <= newton.REG_BD),
         signature=signature(_FINALIZE_ARGS, {"eps": "fp32"}),
         config=lambda d: dict(FinalizeConfig.for_group(d).meta(), NEWTON=True)),
    dict(name="group_stats_finalize_kernel", kernel=group_stats_finalize_kernel, ds=SPEC_DS,
         signature=signature(_FINALIZE_ARGS, {"eps": "fp32"}),
         config=lambda d: dict(FinalizeConfig.for_group(d).meta(), NEWTON=False)),
]
