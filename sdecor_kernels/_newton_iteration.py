"""The coupled Newton-Schulz iteration and its reverse mode as jit helpers, for matrices in registers
or in tiles of a global scratch buffer; run by the kernels of :mod:`sdecor_kernels.newton` and by the
statistics finalize kernel of :mod:`sdecor_kernels.stats` (W in the same program, for every BD).

Se = cov + eps I; Y0 = Se / tr(Se), Z0 = I; step k: M = 1.5 I - 0.5 Z Y, Y' = Y M, Z' = M Z;
W = Z_T / sqrt(tr(Se)). :func:`_ns_forward` runs the steps (keeping the iterates for the backward
when asked), :func:`_ns_backward` their reverse mode, :func:`_newton_regs` W of a matrix in
registers and :func:`_newton_tiled` W of a group's matrix in scratch tiles; the ``_mat_*`` operations
take and return either storage, the ``_tiled_*`` ones work on BD x BD scratch in BT x BT tiles, and
the ``_load_*`` / ``_store_*`` ones move a group's matrices between its d x d rows and the scratch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import _mm


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
def _trace(S, eye):
    """The trace of S over the diagonal of ``eye`` (the identity of a group's own channels), its
    entries selected, not multiplied by eye (0 * inf off the diagonal would be NaN)."""
    return tl.sum(tl.sum(tl.where(eye != 0.0, S, 0.0), axis=1), axis=0)


@triton.jit
def _newton_regs(S, eye, T, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """W of Se = S in registers ([BD, BD], zero padded): Y0 = Se / tr, Z0 = I, W = Z_T / sqrt(tr)."""
    tr = _trace(S, eye)
    Z = _ns_forward(S / tr, eye, None, None, None, None, T, eye, S.shape[0], S.shape[0], USE_DOT, PREC,
                    True, False)
    return Z / tl.sqrt(tr)


@triton.jit
def _newton_tiled(cov_ptr, w_ptr, scratch, d, dg, eps, r, T, BD: tl.constexpr, BT: tl.constexpr,
                  USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """w (d x d) = r W of Se = cov + eps I over the group's dg channels (cov: its d x d rows), the steps
    on BD x BD scratch (Y, Z, M and a free buffer, 4 BD^2) in BT x BT tiles: W = Z_T / sqrt(tr(Se))."""
    sz = BD * BD
    Yp = scratch
    Zp = Yp + sz
    Mp = Zp + sz
    Xp = Mp + sz
    tr = _load_se_tiled(cov_ptr, Yp, Zp, d, dg, eps, BD, BT)
    Z = _ns_forward(Yp, Zp, Mp, Xp, None, None, T, None, BD, BT, USE_DOT, PREC, False, False)
    rs = 1.0 / tl.sqrt(tr)
    _store_tiled(Z, w_ptr, rs * r, d, BD, BT)


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
