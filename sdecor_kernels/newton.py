"""Newton-Schulz (IterNorm) whitening matrix of a group covariance, and its exact backward.

W = Newton-Schulz(cov + eps I, T), the coupled iteration on Se = cov + eps I (one program per group):
Y0 = Se / tr(Se), Z0 = I; step k: M = 1.5 I - 0.5 Z Y, Y' = Y M, Z' = M Z; W = Z_T / sqrt(tr(Se)).

- ``newton_fwd_kernel`` grid (G,): W of cov + eps I, for whitening_matrix and for the W of
  SyncGroupWhitening's combined statistics (a GroupWhitening training forward gets W from the
  statistics finalize program instead, see :mod:`sdecor_kernels.stats`).
- ``newton_bwd_kernel`` grid (G,): dL/dcov from dL/dW (the exact derivative of the coupled
  iteration, iterates kept in a global scratch buffer).

Both take the channel count C: a smaller last group (dg = C - (G-1) d < d channels, zero padded in cov)
gets Se = cov + eps I over its own dg channels, the trace of those and the identity of those, so that
its padding stays zero in every iterate and the top-left dg x dg block is its own result (the padding
of W and dL/dcov is written as zeros). With HAS_SCALE both take the group's power-of-two scale c (see
:mod:`sdecor_kernels.stats`): cov is then cov / c^2, eps becomes eps / c^2, W is divided by c, dL/dcov
divided by c.

For BD > 32 the Newton kernels keep their d x d matrices in a global scratch buffer between steps and
multiply them in 32 x 32 tiles (three 64 x 64 fp32 matrices and the product operands spill). The
iteration (``_ns_forward``; with the scratch load and store, ``_newton_tiled``, also run by
group_stats_finalize_kernel) and its reverse mode (``_ns_backward``) are written once for both
storages, in :mod:`sdecor_kernels._newton_iteration`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import SPEC_DS, MatrixConfig, _eye, _group_size, _inv_pow2, f32, launch, signature
from ._newton_iteration import (_load_padded_tiled, _load_se_tiled, _newton_regs, _newton_tiled, _ns_backward,
                                _ns_forward, _store_grad_tiled, _tiled_axpy, _trace)

__all__ = ["STATIC_SPECS", "NewtonBwdConfig", "NewtonFwdConfig", "newton_backward", "newton_forward"]

# Largest BD whose d x d matrices the Newton kernels keep in registers; above it, TILE x TILE tiles
# of a global scratch buffer (at BD = 64 registers spill on sm_80 and sm_90 otherwise).
REG_BD = 32
TILE = 32


# ---------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def newton_fwd_kernel(cov_ptr, w_ptr, scratch_ptr, scale_ptr, d, C, eps, T, HAS_SCALE: tl.constexpr,
                      BD: tl.constexpr, BT: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """W of cov + eps I; HAS_SCALE: cov is in units of the group's power-of-two scale c (cov / c^2),
    and W = W(cov / c^2 + eps / c^2 I) / c."""
    g = tl.program_id(0)
    gd = g.to(tl.int64) * d
    dg = _group_size(g, d, C)
    r = 1.0
    if HAS_SCALE:
        r = _inv_pow2(tl.load(scale_ptr + g))
        eps = eps * r * r
    if BD <= BT:
        c = tl.arange(0, BD)
        m2 = (c < d)[:, None] & (c < d)[None, :]
        m2g = (c < dg)[:, None] & (c < dg)[None, :]
        eye = _eye(BD, dg)
        S = tl.load(cov_ptr + gd * d + c[:, None] * d + c[None, :], mask=m2g, other=0.0) + eps * eye
        W = _newton_regs(S, eye, T, USE_DOT, PREC)
        if HAS_SCALE:
            W = W * r
        tl.store(w_ptr + gd * d + c[:, None] * d + c[None, :], W, mask=m2)
    else:
        # scratch per group: Y, Z, M, tmp, each BD x BD (padded, zero outside d x d)
        _newton_tiled(cov_ptr + gd * d, w_ptr + gd * d, scratch_ptr + g.to(tl.int64) * 4 * BD * BD, d, dg, eps,
                      r, T, BD, BT, USE_DOT, PREC)


@triton.jit
def newton_bwd_kernel(cov_ptr, gw_ptr, gcov_ptr, hist_ptr, work_ptr, scale_ptr, d, C, eps, T,
                      HAS_SCALE: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, USE_DOT: tl.constexpr,
                      PREC: tl.constexpr):
    """dL/dcov of W = Newton-Schulz(cov + eps I, T): reverse mode through the coupled iteration
    (_ns_forward with its iterates kept in hist (G, T, 2, BD, BD), then _ns_backward).
    HAS_SCALE: cov is cov / c^2 and W the whitening matrix of cov / c^2 + eps / c^2 I (c the group's
    power-of-two scale), and the result is divided by c."""
    g = tl.program_id(0)
    gd = g.to(tl.int64) * d
    dg = _group_size(g, d, C)
    sz = BD * BD
    hist = hist_ptr + g.to(tl.int64) * T * 2 * sz
    r = 1.0
    if HAS_SCALE:
        r = _inv_pow2(tl.load(scale_ptr + g))
        eps = eps * r * r
    if BD <= BT:
        c = tl.arange(0, BD)
        m2 = (c < d)[:, None] & (c < d)[None, :]
        m2g = (c < dg)[:, None] & (c < dg)[None, :]
        eye = _eye(BD, dg)
        S = tl.load(cov_ptr + gd * d + c[:, None] * d + c[None, :], mask=m2g, other=0.0) + eps * eye
        tr = _trace(S, eye)
        Z = _ns_forward(S / tr, eye, None, None, None, hist, T, eye, BD, BT, USE_DOT, PREC, True, True)
        gW = tl.load(gw_ptr + gd * d + c[:, None] * d + c[None, :], mask=m2g, other=0.0)
        gY, g_tr = _ns_backward(gW, Z, S, tr, hist, T, eye, None, None, None, None, None, None, BD, BT,
                                USE_DOT, PREC, True)
        gS = gY / tr + g_tr * eye
        if HAS_SCALE:
            gS = gS * r
        tl.store(gcov_ptr + gd * d + c[:, None] * d + c[None, :], gS, mask=m2)
    else:
        # work per group: S, gY, gZ, M, gM, t1, t2, each BD x BD
        wk = work_ptr + g.to(tl.int64) * 7 * sz
        Sp = wk
        gYp = wk + sz
        gZp = wk + 2 * sz
        Mp = wk + 3 * sz
        gMp = wk + 4 * sz
        t1 = wk + 5 * sz
        t2 = wk + 6 * sz
        # Y0, Z0 in hist slots 0, 1; Z_T ends in t2
        tr = _load_se_tiled(cov_ptr + gd * d, hist, hist + sz, d, dg, eps, BD, BT)
        _tiled_axpy(hist, hist, Sp, tr, 0.0, BD, BT)                     # S = Y0 * tr
        Z = _ns_forward(hist, hist + sz, Mp, t1, t2, hist, T, None, BD, BT, USE_DOT, PREC, False, True)
        _load_padded_tiled(gw_ptr + gd * d, gZp, d, dg, BD, BT)
        gY, g_tr = _ns_backward(gZp, Z, Sp, tr, hist, T, None, Mp, gYp, gZp, gMp, t1, t2, BD, BT,
                                USE_DOT, PREC, False)
        rt = 1.0 / tr
        if HAS_SCALE:
            rt = rt * r
            g_tr = g_tr * r
        _store_grad_tiled(gY, gcov_ptr + gd * d, rt, g_tr, d, dg, BD, BT)


# ---------------------------------------------------------------------------------------------------
# launch configuration


@dataclass(frozen=True)
class _NewtonConfig(MatrixConfig):
    """Constexprs and launch options of a Newton-Schulz kernel for group size d (the same on every
    device): d x d matrices in registers for BD <= REG_BD, else in BT x BT tiles of a global scratch
    buffer. ``TABLE`` rows (largest BD, BT, num_warps, num_stages), spill-free on sm_80 and sm_90 in
    the static compile sweep."""

    BT: int = TILE
    TABLE = ()

    @classmethod
    def for_group(cls, d: int):
        blocks = cls.matrix_blocks(d)
        BT, warps, stages = next(row[1:] for row in cls.TABLE if blocks["BD"] <= row[0])
        return cls(**blocks, BT=BT, num_warps=warps, num_stages=stages)

    @property
    def in_registers(self) -> bool:
        """d x d matrices in registers (else in BT x BT tiles of a global scratch buffer)."""
        return self.BD <= self.BT


@dataclass(frozen=True)
class NewtonFwdConfig(_NewtonConfig):
    """newton_fwd_kernel (see _NewtonConfig)."""

    TABLE = ((16, TILE, 4, 1), (REG_BD, TILE, 8, 1), (64, 32, 4, 3), (math.inf, 32, 4, 1))


@dataclass(frozen=True)
class NewtonBwdConfig(_NewtonConfig):
    """newton_bwd_kernel (see _NewtonConfig)."""

    # num_stages=3 at BD <= 16: with 2, the HAS_SCALE variant spilled 8 bytes at 64 registers on sm_90
    # once the kernel took each group's channel count (3: 77-80 registers, no spill on sm_80 and sm_90)
    TABLE = ((16, TILE, 8, 3), (REG_BD, TILE, 8, 1), (64, 32, 4, 3), (math.inf, 16, 2, 3))


# ---------------------------------------------------------------------------------------------------
# launchers


def newton_forward(cov: torch.Tensor, eps: float, T: int, scale: torch.Tensor | None = None,
                   C: int | None = None) -> torch.Tensor:
    """W (G, d, d) = Newton-Schulz whitening matrix of cov (G, d, d) fp32 + eps I, T steps.

    ``C`` (default G d): channels of the G groups; a smaller last group of C - (G-1) d channels, zero
    padded in cov, gets the W of its own block (zeros in the padding).

    With ``scale`` (G,), powers of two c: cov holds cov_true / c^2, and W is the whitening matrix of
    cov_true + eps I in its own units, W(cov + eps / c^2 I) / c (finite where cov_true is not).
    """
    cov = cov.contiguous()
    G, d = cov.shape[0], cov.shape[-1]
    dev = cov.device
    cfg = NewtonFwdConfig.for_group(d)
    BD = cfg.BD
    w = f32(G, d, d, device=dev)
    scratch = f32(1, device=dev) if cfg.in_registers else f32(G, 4, BD, BD, device=dev)
    launch(newton_fwd_kernel, (G,), cov, w, scratch, _scale_arg(scale, w), d, G * d if C is None else int(C),
           float(eps), int(T),
           HAS_SCALE=scale is not None, **cfg.meta())
    return w


def newton_backward(cov: torch.Tensor, grad_w: torch.Tensor, eps: float, T: int,
                    scale: torch.Tensor | None = None, C: int | None = None) -> torch.Tensor:
    """dL/dcov (G, d, d) from dL/dW for W = newton_forward(cov, eps, T, scale, C) (the exact
    derivative; zeros in the padding of a smaller last group).

    With ``scale`` (G,), powers of two c: cov holds cov_true / c^2 and grad_w is dL/dW' for
    W' = W(cov + eps / c^2 I), the whitening matrix in units of c; returns dL/dSe' / c, Se' = cov +
    eps / c^2 I (dL/dSe' itself can exceed fp32 where c is large; divided by c it stays finite).
    """
    cov = cov.contiguous()
    grad_w = grad_w.to(torch.float32).contiguous()
    G, d = cov.shape[0], cov.shape[-1]
    dev = cov.device
    cfg = NewtonBwdConfig.for_group(d)
    BD = cfg.BD
    gcov = f32(G, d, d, device=dev)
    hist = f32(G, int(T), 2, BD, BD, device=dev)
    work = f32(1, device=dev) if cfg.in_registers else f32(G, 7, BD, BD, device=dev)
    launch(newton_bwd_kernel, (G,), cov, grad_w, gcov, hist, work, _scale_arg(scale, gcov), d,
           G * d if C is None else int(C), float(eps), int(T), HAS_SCALE=scale is not None, **cfg.meta())
    return gcov


def _scale_arg(scale: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The scale_ptr argument: the scale as fp32, or any fp32 tensor when there is none (unread)."""
    return like if scale is None else scale.to(torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------------
# ahead-of-time compilation specs (see sdecor_kernels.static); d = group size

_BWD_ARGS = "cov_ptr gw_ptr gcov_ptr hist_ptr work_ptr scale_ptr d C eps T"

STATIC_SPECS = [
    dict(name="newton_fwd_kernel", kernel=newton_fwd_kernel, ds=SPEC_DS,
         signature=signature("cov_ptr w_ptr scratch_ptr scale_ptr d C eps T", {"eps": "fp32"}),
         config=lambda d: dict(NewtonFwdConfig.for_group(d).meta(), HAS_SCALE=False)),
    # with a scale: SyncGroupWhitening's W of the combined statistics (TritonPasses.matrix), every d
    dict(name="newton_fwd_kernel[HAS_SCALE]", kernel=newton_fwd_kernel, ds=SPEC_DS,
         signature=signature("cov_ptr w_ptr scratch_ptr scale_ptr d C eps T", {"eps": "fp32"}),
         config=lambda d: dict(NewtonFwdConfig.for_group(d).meta(), HAS_SCALE=True)),
    dict(name="newton_bwd_kernel", kernel=newton_bwd_kernel, ds=SPEC_DS,
         signature=signature(_BWD_ARGS, {"eps": "fp32"}),
         config=lambda d: dict(NewtonBwdConfig.for_group(d).meta(), HAS_SCALE=False)),
    dict(name="newton_bwd_kernel[HAS_SCALE]", kernel=newton_bwd_kernel, ds=SPEC_DS,
         signature=signature(_BWD_ARGS, {"eps": "fp32"}),
         config=lambda d: dict(NewtonBwdConfig.for_group(d).meta(), HAS_SCALE=True)),
]
