"""Group statistics: mean (G, d) and biased covariance (G, d, d) of x in one read of x.

Notation: see :mod:`sdecor_kernels._common` (x read as (N, C, L) by three strides, group g = channels
[g*d, (g+1)*d), tiles [BD, BM], fp32 accumulation).

- ``group_stats_partial_kernel``  grid (P, G): program (s, g) reduces its contiguous range of sample
  blocks to a shifted sum and a shifted second moment (shift = the first sample of each channel, which
  keeps E[xx^T] - mean mean^T free of cancellation when |mean| >> std), both of (x - shift) / 2^e,
  2^e a power-of-two scale grown with the largest |x - shift| seen (see ``_common._scale_exp``).
- ``group_stats_finalize_kernel`` grid (G,): brings the P partials to the group's largest scale c and
  sums them in a fixed order (deterministic), writes mean, c and cov (or cov / c^2 with SCALED), and
  with NEWTON runs the Newton-Schulz steps on cov / c^2 + eps / c^2 I and writes W (divided by c):
  in registers for BD <= newton.REG_BD, above it in 32 x 32 tiles of a global scratch buffer of 4 d x d
  matrices per group (as newton_fwd_kernel), so that a training forward is these two launches and the
  apply for every d.

The scale keeps the statistics finite up to |x| ~ 3e38 (unscaled, xx^T overflows fp32 from |x| ~ 1e19);
every factor is an exact power of two, so the sums are exactly those of the unscaled data times 4^-e,
and W (homogeneous of degree -1/2 in Se) is the unscaled one up to the rounding of eps / c^2 (exact
while that is a normal fp32 number: c < 2^54 at eps = 1e-5) and of the square root of tr(Se).

No host synchronisation, no float atomics. For BD > 64 the partial kernel keeps its d x d accumulator
as two halves of BD/2 rows (the whole product spills at BD = 128).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import newton
from ._common import (BF16, SPEC_DS, X_ARGS, MatrixConfig, ReducePassConfig, _block_range, _exp2i, _eye,
                      _group_size, _mm, _scale_exp, _tile, _tile_rows, f32, flat_view, launch, pass_setup, signature)
from ._newton_iteration import _newton_regs, _newton_tiled

__all__ = ["STATIC_SPECS", "FinalizeConfig", "group_stats", "group_stats_newton"]


# ---------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _rescaled(e_run, xs):
    """(e, f): the scale exponent after a tile of shifted samples xs, at least e_run, and the exact
    factor f = 2^(e_run - e) that brings sums at scale 2^e_run to scale 2^e (1 when e did not grow)."""
    e = tl.maximum(_scale_exp(tl.max(tl.abs(xs))), e_run)
    return e, _exp2i(e_run - e)


@triton.jit
def group_stats_partial_kernel(x_ptr, s1_ptr, s2_ptr, ep_ptr, d, C, m, L, sn, sc, sl, n_blocks, bpp, P,
                               BD: tl.constexpr, BM: tl.constexpr, USE_DOT: tl.constexpr,
                               PREC: tl.constexpr, HALVES: tl.constexpr):
    s = tl.program_id(0)
    g = tl.program_id(1)
    c = tl.arange(0, BD)
    dg = _group_size(g, d, C)
    # shift = sample j = 0 of each channel
    k = tl.load(x_ptr + (g * d + c).to(tl.int64) * sc, mask=c < dg, other=0.0).to(tl.float32)
    base = (g * P + s).to(tl.int64)
    # The sums are of xs / 2^e, e the running scale exponent of this program (_scale_exp of the
    # largest |x - shift| so far): grown like a running max, the sums rescaled by exact powers of two.
    # Why: at |x| ~ 1e19 one product xs xs^T is ~1e38, and fp32 ends at 3.4e38; with |x - shift| < 1
    # (e = 0) every factor is 1 and the sums are bit for bit the unscaled ones. The rescale is
    # unconditional (by 1 when e did not grow: BD^2 multiplies per tile of BD^2 BM products); under a
    # branch the kernel took 39 instead of 32 registers at d = 2 (12 instead of 16 programs per SM).
    e_run = 0
    if HALVES:
        # the rows of the second moment in two accumulators of BD/2 rows (same sums)
        h = tl.arange(0, BD // 2)
        kT = tl.load(x_ptr + (g * d + h).to(tl.int64) * sc, mask=h < dg, other=0.0).to(tl.float32)
        kB = tl.load(x_ptr + (g * d + BD // 2 + h).to(tl.int64) * sc, mask=h + BD // 2 < dg,
                     other=0.0).to(tl.float32)
        accT = tl.zeros((BD // 2, BD), dtype=tl.float32)
        accB = tl.zeros((BD // 2, BD), dtype=tl.float32)
        accST = tl.zeros((BD // 2,), dtype=tl.float32)
        accSB = tl.zeros((BD // 2,), dtype=tl.float32)
        b0, b1 = _block_range(s, n_blocks, bpp)
        for b in range(b0, b1):
            off, mask = _tile(g, b * BM, d, dg, m, L, sn, sc, sl, BD, BM)
            xt = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
            xs = tl.where(mask, xt - k[:, None], 0.0)
            e, f = _rescaled(e_run, xs)
            accT = accT * f * f
            accB = accB * f * f
            accST = accST * f
            accSB = accSB * f
            e_run = e
            r = _exp2i(-e_run)
            xsT = tl.trans(xs * r)                                           # [BM, BD]
            offT, maskT = _tile_rows(g, h, b * BM, d, dg, m, L, sn, sc, sl, BM)
            xT = tl.load(x_ptr + offT, mask=maskT, other=0.0).to(tl.float32)
            xT = tl.where(maskT, xT - kT[:, None], 0.0) * r
            accT += _mm(xT, xsT, USE_DOT, PREC)
            accST += tl.sum(xT, axis=1)
            offB, maskB = _tile_rows(g, h + BD // 2, b * BM, d, dg, m, L, sn, sc, sl, BM)
            xB = tl.load(x_ptr + offB, mask=maskB, other=0.0).to(tl.float32)
            xB = tl.where(maskB, xB - kB[:, None], 0.0) * r
            accB += _mm(xB, xsT, USE_DOT, PREC)
            accSB += tl.sum(xB, axis=1)
        tl.store(s1_ptr + base * BD + h, accST)
        tl.store(s1_ptr + base * BD + BD // 2 + h, accSB)
        tl.store(s2_ptr + base * BD * BD + h[:, None] * BD + c[None, :], accT)
        tl.store(s2_ptr + base * BD * BD + (h + BD // 2)[:, None] * BD + c[None, :], accB)
        tl.store(ep_ptr + base, e_run)
        return
    acc1 = tl.zeros((BD,), dtype=tl.float32)
    acc2 = tl.zeros((BD, BD), dtype=tl.float32)
    b0, b1 = _block_range(s, n_blocks, bpp)
    for b in range(b0, b1):
        off, mask = _tile(g, b * BM, d, dg, m, L, sn, sc, sl, BD, BM)
        xt = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        xs = tl.where(mask, xt - k[:, None], 0.0)                        # [BD, BM]
        e, f = _rescaled(e_run, xs)
        acc1 = acc1 * f
        acc2 = acc2 * f * f
        e_run = e
        xs = xs * _exp2i(-e_run)
        acc1 += tl.sum(xs, axis=1)
        acc2 += _mm(xs, tl.trans(xs), USE_DOT, PREC)                      # [BD, BD]
    tl.store(s1_ptr + base * BD + c, acc1)
    tl.store(s2_ptr + base * BD * BD + c[:, None] * BD + c[None, :], acc2)
    tl.store(ep_ptr + base, e_run)


@triton.jit
def group_stats_finalize_kernel(x_ptr, s1_ptr, s2_ptr, ep_ptr, mean_ptr, cov_ptr, scale_ptr, w_ptr, scratch_ptr,
                                d, C, m, sc, P, eps, T, SCALED: tl.constexpr, NEWTON: tl.constexpr,
                                BD: tl.constexpr, BT: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    g = tl.program_id(0)
    c = tl.arange(0, BD)
    cm = c < d
    m2 = cm[:, None] & cm[None, :]
    dg = _group_size(g, d, C)
    k = tl.load(x_ptr + (g * d + c).to(tl.int64) * sc, mask=c < dg, other=0.0).to(tl.float32)
    # the group's scale 2^e: the largest of its programs'
    e = 0
    for s in range(0, P):
        e = tl.maximum(e, tl.load(ep_ptr + g * P + s))
    s1 = tl.zeros((BD,), dtype=tl.float32)
    s2 = tl.zeros((BD, BD), dtype=tl.float32)
    for s in range(0, P):                                                # fixed order: deterministic
        base = (g * P + s).to(tl.int64)
        f = _exp2i(tl.load(ep_ptr + base) - e)                           # partial at scale 2^e
        s1 += tl.load(s1_ptr + base * BD + c) * f
        s2 += tl.load(s2_ptr + base * BD * BD + c[:, None] * BD + c[None, :]) * f * f
    ms = s1 / m                                                          # (mean - shift) / 2^e
    cov = s2 / m - ms[:, None] * ms[None, :]                             # cov / 4^e
    cov = tl.where(m2, cov, 0.0)
    scale = _exp2i(e)
    gd = g.to(tl.int64) * d
    tl.store(mean_ptr + gd + c, k + ms * scale, mask=cm)
    tl.store(scale_ptr + g, scale)
    if SCALED:
        tl.store(cov_ptr + gd * d + c[:, None] * d + c[None, :], cov, mask=m2)
    else:
        # the covariance itself (inf where it exceeds fp32)
        tl.store(cov_ptr + gd * d + c[:, None] * d + c[None, :], cov * scale * scale, mask=m2)
    if NEWTON:
        # W = W(cov / 4^e + eps / 4^e I) / 2^e: Newton-Schulz is homogeneous of degree -1/2 in Se
        r = _exp2i(-e)
        if BD <= BT:
            # the identity of the group's own dg channels: a smaller last group's padding stays zero
            eye = _eye(BD, dg)
            W = _newton_regs(cov + (eps * r * r) * eye, eye, T, USE_DOT, PREC)
            tl.store(w_ptr + gd * d + c[:, None] * d + c[None, :], W * r, mask=m2)
        else:
            # the steps in BT x BT tiles of the group's scratch (Y, Z, M, tmp: 4 BD^2), from the
            # cov / 4^e just stored: the barrier makes every thread's stores visible to the program
            tl.static_assert(SCALED, "the tiled Newton-Schulz steps read the stored cov / 4^e")
            tl.debug_barrier()
            _newton_tiled(cov_ptr + gd * d, w_ptr + gd * d, scratch_ptr + g.to(tl.int64) * 4 * BD * BD, d, dg,
                          eps * r * r, r, T, BD, BT, USE_DOT, PREC)


# ---------------------------------------------------------------------------------------------------
# launch configuration


@dataclass(frozen=True)
class FinalizeConfig(MatrixConfig):
    """Constexprs and launch options of group_stats_finalize_kernel for group size d (the same on
    every device; NEWTON is chosen per launch). With NEWTON, the d x d matrices of the steps are in
    registers for BD <= BT (BT = newton.TILE = newton.REG_BD), else in BT x BT tiles of a global
    scratch buffer, as in newton_fwd_kernel. ``TABLE`` rows (largest BD, num_warps, num_stages), spill-free on sm_80 and
    sm_90 in the static compile sweep, with and without NEWTON."""

    BT: int = newton.TILE
    # With NEWTON above BD = 32: at BD = 64, 8 warps and num_stages=1 spilled 72 bytes at 64 registers
    # on sm_90 (2 stages: 80-122 registers, no spill); at BD = 128, 8 warps spilled at 128 registers
    # (32 bytes on sm_80 with 1 stage, 92-96 with 2), 16 warps and 2 stages take 72-124 registers, no
    # spill (without NEWTON 102-112, where 8 warps took 255).
    TABLE = ((16, 4, 1), (32, 8, 1), (64, 8, 2), (math.inf, 16, 2))

    @classmethod
    def for_group(cls, d: int) -> "FinalizeConfig":
        blocks = cls.matrix_blocks(d)
        warps, stages = next(row[1:] for row in cls.TABLE if blocks["BD"] <= row[0])
        return cls(**blocks, BT=newton.TILE, num_warps=warps, num_stages=stages)

    @property
    def in_registers(self) -> bool:
        """The Newton-Schulz matrices in registers (else in BT x BT tiles of a global scratch buffer)."""
        return self.BD <= self.BT


# ---------------------------------------------------------------------------------------------------
# launchers


def group_stats(x: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mean (G, d), cov (G, d, d) fp32 of x (N, C, *S) in one read of x (cov is inf where it exceeds
    fp32)."""
    mean, cov, _, _ = _group_stats(x, d, None, scaled=False)
    return mean, cov


def group_stats_scaled(x: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mean (G, d), cov / scale^2 (G, d, d) and scale (G,) fp32 of x (N, C, *S) in one read of x.

    scale = 2^e per group, e in [0, 126], above max |x - shift| (shift: the group's first sample),
    or 1 when that is below 1: cov / scale^2 is finite, and exactly cov where scale = 1.
    """
    mean, cov, scale, _ = _group_stats(x, d, None, scaled=True)
    return mean, cov, scale


def group_stats_newton(x: torch.Tensor, d: int, eps: float, T: int):
    """mean (G, d), cov / scale^2 (G, d, d), scale (G,) (see :func:`group_stats_scaled`) and W
    (G, d, d), the Newton-Schulz whitening matrix of cov + eps I (T steps), fp32, computed as
    W(cov / scale^2 + eps / scale^2 I) / scale, in the finalize launch for every d (its matrices in
    registers for BD <= newton.REG_BD, else in tiles of a global scratch buffer)."""
    return _group_stats(x, d, (eps, T), scaled=True)


def _group_stats(x: torch.Tensor, d: int, newton_args: tuple[float, int] | None, scaled: bool):
    """(mean, cov, scale, W or None): cov / scale^2 when ``scaled``; W when newton_args = (eps, T) is
    given (then ``scaled`` must be set: above REG_BD the steps read the stored cov / scale^2)."""
    x, sn, sc, sl, L = flat_view(x)
    C, dev = x.shape[1], x.device
    G = -(-C // d)
    cfg, m, n_blocks, P, bpp = pass_setup(ReducePassConfig, x, L, d)
    BD = cfg.BD
    s1 = f32(G, P, BD, device=dev)
    s2 = f32(G, P, BD, BD, device=dev)
    ep = torch.empty(G, P, dtype=torch.int32, device=dev)
    launch(group_stats_partial_kernel, (P, G), x, s1, s2, ep, d, C, m, L, sn, sc, sl, n_blocks, bpp, P,
           **cfg.meta())
    mean = f32(G, d, device=dev)
    cov = f32(G, d, d, device=dev)
    scale = f32(G, device=dev)
    fin = FinalizeConfig.for_group(d)
    fused = newton_args is not None
    w = f32(G, d, d, device=dev) if fused else cov
    # the Newton-Schulz scratch of the tiled steps (else any fp32 tensor: not read)
    scratch = f32(G, 4, BD, BD, device=dev) if fused and not fin.in_registers else scale
    eps, T = newton_args if fused else (0.0, 0)
    launch(group_stats_finalize_kernel, (G,), x, s1, s2, ep, mean, cov, scale, w, scratch, d, C, m, sc, P,
           float(eps), int(T), SCALED=scaled, NEWTON=fused, **fin.meta())
    return mean, cov, scale, (w if fused else None)


# ---------------------------------------------------------------------------------------------------
# ahead-of-time compilation specs (see sdecor_kernels.static); d = group size

_PARTIAL_ARGS = f"x_ptr s1_ptr s2_ptr ep_ptr {X_ARGS} P"
_FINALIZE_ARGS = "x_ptr s1_ptr s2_ptr ep_ptr mean_ptr cov_ptr scale_ptr w_ptr scratch_ptr d C m sc P eps T"
_EP = {"ep_ptr": "*i32", "eps": "fp32"}

STATIC_SPECS = [
    dict(name="group_stats_partial_kernel", kernel=group_stats_partial_kernel, ds=SPEC_DS,
         signature=signature(_PARTIAL_ARGS, _EP), config=lambda d: ReducePassConfig.for_group(d, True).meta()),
    dict(name="group_stats_partial_kernel[bf16]", kernel=group_stats_partial_kernel, ds=SPEC_DS,
         signature=signature(_PARTIAL_ARGS, {**BF16, **_EP}),
         config=lambda d: ReducePassConfig.for_group(d, True).meta()),
    dict(name="group_stats_finalize_kernel[NEWTON]", kernel=group_stats_finalize_kernel, ds=SPEC_DS,
         signature=signature(_FINALIZE_ARGS, _EP),
         config=lambda d: dict(FinalizeConfig.for_group(d).meta(), SCALED=True, NEWTON=True)),
    dict(name="group_stats_finalize_kernel", kernel=group_stats_finalize_kernel, ds=SPEC_DS,
         signature=signature(_FINALIZE_ARGS, _EP),
         config=lambda d: dict(FinalizeConfig.for_group(d).meta(), SCALED=False, NEWTON=False)),
]
