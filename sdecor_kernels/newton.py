"""Newton-Schulz (IterNorm) whitening matrix of a group covariance, and its exact backward.

W = Newton-Schulz(cov + eps I, T), the coupled iteration on Se = cov + eps I (one program per group):
Y0 = Se / tr(Se), Z0 = I; step k: M = 1.5 I - 0.5 Z Y, Y' = Y M, Z' = M Z; W = Z_T / sqrt(tr(Se)).

- ``newton_fwd_kernel`` grid (G,): W of cov + eps I.
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
iteration (``_ns_forward``, also run by group_stats_finalize_kernel) and its reverse mode
(``_ns_backward``) are written once for both storages, through the ``_mat_*`` operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import SPEC_DS, MatrixConfig, _eye, _group_size, _inv_pow2, _mm, f32, launch, pow2, signature

__all__ = ["STATIC_SPECS", "NewtonBwdConfig", "NewtonFwdConfig", "newton_backward", "newton_forward"]

# Largest BD whose d x d matrices the Newton kernels keep in registers; above it, TILE x TILE tiles
# of a global scratch buffer (at BD = 64 registers spill on sm_80 and sm_90 otherwise).
REG_BD = 32
TILE = 32


# ---------------------------------------------------------------------------------------------------
# products and sums on BD x BD scratch, in BT x BT tiles


@triton.jit
def _tiled_mm(a_ptr, b_ptr, c_ptr, alpha, beta_eye, TA: tl.constexpr, TB: tl.constexpr,
              BD: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr):
    """C = alpha * op(A) @ op(B) + beta_eye * I on BD x BD row-major scratch, in BT x BT tiles.

    op(X) = X^T when the flag is set. Ends with a barrier so that C is visible to the whole program.
    """
    r = tl.arange(0, BT)
    for i in range(BD // BT):
        for jb in range(BD // BT):
            acc = tl.zeros((BT, BT), dtype=tl.float32)
            for k in range(BD // BT):
                if TA:
                    a = tl.load(a_ptr + (k * BT + r)[None, :] * BD + (i * BT + r)[:, None])
                else:
                    a = tl.load(a_ptr + (i * BT + r)[:, None] * BD + (k * BT + r)[None, :])
                if TB:
                    b = tl.load(b_ptr + (jb * BT + r)[None, :] * BD + (k * BT + r)[:, None])
                else:
                    b = tl.load(b_ptr + (k * BT + r)[:, None] * BD + (jb * BT + r)[None, :])
                acc = tl.dot(a, b, acc, input_precision=PREC)
            acc = alpha * acc
            if i == jb:
                acc += beta_eye * ((r[:, None] == r[None, :]).to(tl.float32))
            tl.store(c_ptr + (i * BT + r)[:, None] * BD + (jb * BT + r)[None, :], acc)
    tl.debug_barrier()


@triton.jit
def _tiled_axpy(x_ptr, y_ptr, out_ptr, a, b, BD: tl.constexpr, BT: tl.constexpr):
    """out = a * X + b * Y elementwise on BD x BD scratch (then a barrier)."""
    r = tl.arange(0, BT)
    for i in range(BD // BT):
        for jb in range(BD // BT):
            off = (i * BT + r)[:, None] * BD + (jb * BT + r)[None, :]
            tl.store(out_ptr + off, a * tl.load(x_ptr + off) + b * tl.load(y_ptr + off))
    tl.debug_barrier()


@triton.jit
def _tiled_dotsum(x_ptr, y_ptr, BD: tl.constexpr, BT: tl.constexpr):
    """sum(X * Y) over BD x BD scratch."""
    r = tl.arange(0, BT)
    total = 0.0
    for i in range(BD // BT):
        for jb in range(BD // BT):
            off = (i * BT + r)[:, None] * BD + (jb * BT + r)[None, :]
            total += tl.sum(tl.sum(tl.load(x_ptr + off) * tl.load(y_ptr + off), axis=1), axis=0)
    return total


# ---------------------------------------------------------------------------------------------------
# matrices in registers or in tiles of scratch
#
# A d x d matrix of the Newton kernels is either a [BD, BD] register tensor (REGS: BD <= BT) or a
# BD x BD row-major scratch buffer (zero padded) multiplied in BT x BT tiles. The _mat_* operations
# take and return either: in scratch they write the result to ``out`` (then a barrier) and return
# it, so the iteration and its backward below are written once for both. Their scalar coefficients
# are literals (constexprs in the callee). In registers a combination with a negative coefficient
# is formed as P - c Q, c > 0: P + (-c) Q gives other instructions, 1 to 5 more registers in
# newton_bwd_kernel at d = 16 on sm_80 / sm_90 (the PTX of the forward is unchanged either way).


@triton.jit
def _mat_mm(a, b, out, alpha, beta_eye, TA: tl.constexpr, TB: tl.constexpr, eye, BD: tl.constexpr,
            BT: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr, REGS: tl.constexpr):
    """alpha * op(a) @ op(b) + beta_eye * I, op(X) = X^T when the flag is set."""
    if REGS:
        if TA:
            a = tl.trans(a)
        if TB:
            b = tl.trans(b)
        res = _mm(a, b, USE_DOT, PREC)
        if beta_eye != 0.0:
            res = beta_eye * eye - (-alpha) * res
        elif alpha != 1.0:
            res = alpha * res
    else:
        _tiled_mm(a, b, out, alpha, beta_eye, TA, TB, BD, BT, PREC)
        res = out
    return res


@triton.jit
def _mat_mm2(a, b, c, e, out, t1, t2, s, TA: tl.constexpr, TB: tl.constexpr, TC: tl.constexpr,
             TE: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, USE_DOT: tl.constexpr,
             PREC: tl.constexpr, REGS: tl.constexpr):
    """op(a) @ op(b) + s * op(c) @ op(e); t1, t2: scratch for the two products."""
    if REGS:
        if TA:
            a = tl.trans(a)
        if TB:
            b = tl.trans(b)
        if TC:
            c = tl.trans(c)
        if TE:
            e = tl.trans(e)
        if s == 1.0:
            res = _mm(a, b, USE_DOT, PREC) + _mm(c, e, USE_DOT, PREC)
        else:
            res = _mm(a, b, USE_DOT, PREC) - (-s) * _mm(c, e, USE_DOT, PREC)
    else:
        _tiled_mm(a, b, t1, 1.0, 0.0, TA, TB, BD, BT, PREC)
        _tiled_mm(c, e, t2, 1.0, 0.0, TC, TE, BD, BT, PREC)
        _tiled_axpy(t1, t2, out, 1.0, s, BD, BT)
        res = out
    return res


@triton.jit
def _mat_scale(x, out, s, BD: tl.constexpr, BT: tl.constexpr, REGS: tl.constexpr):
    """s * x."""
    if REGS:
        res = x * s
    else:
        _tiled_axpy(x, x, out, s, 0.0, BD, BT)
        res = out
    return res


@triton.jit
def _mat_zero(like, out, BD: tl.constexpr, BT: tl.constexpr, REGS: tl.constexpr):
    """The zero matrix (in scratch: 0 * like)."""
    if REGS:
        res = tl.zeros((BD, BD), dtype=tl.float32)
    else:
        _tiled_axpy(like, like, out, 0.0, 0.0, BD, BT)
        res = out
    return res


@triton.jit
def _mat_dot(x, y, BD: tl.constexpr, BT: tl.constexpr, REGS: tl.constexpr):
    """sum(x * y)."""
    if REGS:
        res = tl.sum(tl.sum(x * y, axis=1), axis=0)
    else:
        res = _tiled_dotsum(x, y, BD, BT)
    return res


@triton.jit
def _hist_slot(hist, k, BD: tl.constexpr, REGS: tl.constexpr):
    """(Y_k, Z_k) kept by _ns_forward: loaded (REGS) or their scratch buffers."""
    sz = BD * BD
    if REGS:
        c = tl.arange(0, BD)
        off = c[:, None] * BD + c[None, :]
        Yk = tl.load(hist + (2 * k) * sz + off)
        Zk = tl.load(hist + (2 * k + 1) * sz + off)
    else:
        Yk = hist + (2 * k) * sz
        Zk = Yk + sz
    return Yk, Zk


# ---------------------------------------------------------------------------------------------------
# the coupled Newton-Schulz iteration and its reverse mode (written once for both storages)


@triton.jit
def _ns_forward(Y, Z, Mb, Fa, Fb, hist, T, eye, BD: tl.constexpr, BT: tl.constexpr,
                USE_DOT: tl.constexpr, PREC: tl.constexpr, REGS: tl.constexpr, HIST: tl.constexpr):
    """T steps M = 1.5 I - 0.5 Z Y, Y' = Y M, Z' = M Z from (Y, Z) = (Y0, Z0); returns Z_T.

    HIST: the iterates (Y_k, Z_k), k < T, are kept in hist (slots 2k, 2k+1) for the backward.
    Scratch (not REGS): M goes to Mb. Without HIST the new Y goes to the free buffer Fa, the new Z
    over the old Y (dead once Y M is formed) and the old Z becomes free; with HIST Y0, Z0 are given
    in hist slots 0, 1, each iterate goes to the next slots and the last one to (Fa, Fb).
    """
    sz = BD * BD
    for k in range(T):
        if REGS:
            if HIST:
                c = tl.arange(0, BD)
                off = c[:, None] * BD + c[None, :]
                tl.store(hist + (2 * k) * sz + off, Y)
                tl.store(hist + (2 * k + 1) * sz + off, Z)
            Yn = Y
            Zn = Z
        elif HIST:
            Y, Z = _hist_slot(hist, k, BD, REGS)
            if k + 1 < T:
                Yn = Y + 2 * sz
                Zn = Yn + sz
            else:
                Yn = Fa
                Zn = Fb
        else:
            Yn = Fa
            Zn = Y
            Fa = Z
        M = _mat_mm(Z, Y, Mb, -0.5, 1.5, False, False, eye, BD, BT, USE_DOT, PREC, REGS)
        Yn = _mat_mm(Y, M, Yn, 1.0, 0.0, False, False, eye, BD, BT, USE_DOT, PREC, REGS)
        Zn = _mat_mm(M, Z, Zn, 1.0, 0.0, False, False, eye, BD, BT, USE_DOT, PREC, REGS)
        Y = Yn
        Z = Zn
    if REGS and HIST:
        tl.debug_barrier()
    return Z


@triton.jit
def _ns_backward(gW, Z, S, tr, hist, T, eye, Mb, gYb, gZb, gMb, t1, t2, BD: tl.constexpr,
                 BT: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr, REGS: tl.constexpr):
    """(gY0, g_tr) from gW = dL/dW, W = Z_T / sqrt(tr), Y0 = Se / tr: dL/dSe = gY0 / tr + g_tr I.

    Reverse mode of step k (iterates from hist): gM = Y^T gY' + gZ' Z^T, gY = gY' M^T - 0.5 Z^T gM,
    gZ = M^T gZ' - 0.5 gM Y^T. Z: Z_T; S: Se. Scratch (not REGS): gW in gZb (scaled in place).
    """
    rs = 1.0 / tl.sqrt(tr)
    g_tr = -0.5 * rs / tr * _mat_dot(gW, Z, BD, BT, REGS)
    gZ = _mat_scale(gW, gZb, rs, BD, BT, REGS)
    gY = _mat_zero(gZ, gYb, BD, BT, REGS)
    for i in range(T):
        k = T - 1 - i
        Yk, Zk = _hist_slot(hist, k, BD, REGS)
        M = _mat_mm(Zk, Yk, Mb, -0.5, 1.5, False, False, eye, BD, BT, USE_DOT, PREC, REGS)
        gM = _mat_mm2(Yk, gY, gZ, Zk, gMb, t1, t2, 1.0, True, False, False, True, BD, BT, USE_DOT, PREC,
                      REGS)
        gY = _mat_mm2(gY, M, Zk, gM, gYb, t1, t2, -0.5, False, True, True, False, BD, BT, USE_DOT, PREC,
                      REGS)
        gZ = _mat_mm2(M, gZ, gM, Yk, gZb, t1, t2, -0.5, True, False, False, True, BD, BT, USE_DOT, PREC,
                      REGS)
    g_tr += -_mat_dot(gY, S, BD, BT, REGS) / (tr * tr)
    return gY, g_tr


@triton.jit
def _newton_regs(S, eye, T, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """W of Se = S in registers ([BD, BD], zero padded): Y0 = Se / tr, Z0 = I, W = Z_T / sqrt(tr)."""
    tr = tl.sum(tl.sum(S * eye, axis=1), axis=0)
    Z = _ns_forward(S / tr, eye, None, None, None, None, T, eye, S.shape[0], S.shape[0], USE_DOT, PREC,
                    True, False)
    return Z / tl.sqrt(tr)


@triton.jit
def _load_se_tiled(cov_ptr, Yp, Zp, d, dg, eps, BD: tl.constexpr, BT: tl.constexpr):
    """Y = Se / tr(Se), Z = I of the group's dg channels into scratch (zero padded); returns tr(Se)."""
    r = tl.arange(0, BT)
    tr = 0.0
    for i in range(BD // BT):
        ri = i * BT + r
        diag = tl.load(cov_ptr + ri * d + ri, mask=ri < dg, other=0.0) + eps
        tr += tl.sum(tl.where(ri < dg, diag, 0.0), axis=0)
    for i in range(BD // BT):
        for jb in range(BD // BT):
            ri = i * BT + r
            rj = jb * BT + r
            m2 = (ri < dg)[:, None] & (rj < dg)[None, :]
            eye = ((ri[:, None] == rj[None, :]) & m2).to(tl.float32)
            S = tl.load(cov_ptr + ri[:, None] * d + rj[None, :], mask=m2, other=0.0) + eps * eye
            off = ri[:, None] * BD + rj[None, :]
            tl.store(Yp + off, S / tr)
            tl.store(Zp + off, eye)
    tl.debug_barrier()
    return tr


@triton.jit
def _store_tiled(src, dst, scale, d, BD: tl.constexpr, BT: tl.constexpr):
    """dst (d x d, row-major) = scale * src (BD x BD scratch)."""
    r = tl.arange(0, BT)
    for i in range(BD // BT):
        for jb in range(BD // BT):
            ri = i * BT + r
            rj = jb * BT + r
            m2 = (ri < d)[:, None] & (rj < d)[None, :]
            v = tl.load(src + ri[:, None] * BD + rj[None, :])
            tl.store(dst + ri[:, None] * d + rj[None, :], scale * v, mask=m2)


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
        sz = BD * BD
        Yp = scratch_ptr + g.to(tl.int64) * 4 * sz
        Zp = Yp + sz
        Mp = Zp + sz
        Xp = Mp + sz
        tr = _load_se_tiled(cov_ptr + gd * d, Yp, Zp, d, dg, eps, BD, BT)
        Z = _ns_forward(Yp, Zp, Mp, Xp, None, None, T, None, BD, BT, USE_DOT, PREC, False, False)
        rs = 1.0 / tl.sqrt(tr)
        if HAS_SCALE:
            rs = rs * r
        _store_tiled(Z, w_ptr + gd * d, rs, d, BD, BT)


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
        tr = tl.sum(tl.sum(S * eye, axis=1), axis=0)
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


@triton.jit
def _load_padded_tiled(src, dst, d, dg, BD: tl.constexpr, BT: tl.constexpr):
    """dst (BD x BD scratch) = the dg x dg block of src (d x d), zero padded (then a barrier)."""
    r = tl.arange(0, BT)
    for i in range(BD // BT):
        for jb in range(BD // BT):
            ri = i * BT + r
            rj = jb * BT + r
            m2 = (ri < dg)[:, None] & (rj < dg)[None, :]
            v = tl.load(src + ri[:, None] * d + rj[None, :], mask=m2, other=0.0)
            tl.store(dst + ri[:, None] * BD + rj[None, :], v)
    tl.debug_barrier()


@triton.jit
def _store_grad_tiled(src, dst, scale, diag, d, dg, BD: tl.constexpr, BT: tl.constexpr):
    """dst (d x d) = scale * src + diag * I_dg (the identity of the group's dg channels)."""
    r = tl.arange(0, BT)
    for i in range(BD // BT):
        for jb in range(BD // BT):
            ri = i * BT + r
            rj = jb * BT + r
            m2 = (ri < d)[:, None] & (rj < d)[None, :]
            eye = ((ri[:, None] == rj[None, :]) & (ri < dg)[:, None]).to(tl.float32)
            v = scale * tl.load(src + ri[:, None] * BD + rj[None, :]) + diag * eye
            tl.store(dst + ri[:, None] * d + rj[None, :], v, mask=m2)


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
    # with a scale: the training path above REG_BD (below it, W comes from the statistics finalize)
    dict(name="newton_fwd_kernel[HAS_SCALE]", kernel=newton_fwd_kernel,
         ds=tuple(d for d in SPEC_DS if pow2(d) > REG_BD),
         signature=signature("cov_ptr w_ptr scratch_ptr scale_ptr d C eps T", {"eps": "fp32"}),
         config=lambda d: dict(NewtonFwdConfig.for_group(d).meta(), HAS_SCALE=True)),
    dict(name="newton_bwd_kernel", kernel=newton_bwd_kernel, ds=SPEC_DS,
         signature=signature(_BWD_ARGS, {"eps": "fp32"}),
         config=lambda d: dict(NewtonBwdConfig.for_group(d).meta(), HAS_SCALE=False)),
    dict(name="newton_bwd_kernel[HAS_SCALE]", kernel=newton_bwd_kernel, ds=SPEC_DS,
         signature=signature(_BWD_ARGS, {"eps": "fp32"}),
         config=lambda d: dict(NewtonBwdConfig.for_group(d).meta(), HAS_SCALE=True)),
]
