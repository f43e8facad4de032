"""Triton kernels of group-wise statistics and whitening, and their launchers.

Notation (see DESIGN.md): x (N, C, *S) is read as (N, C, L), L = prod(S), through three strides
(sn, sc, sl), so contiguous NCHW-style inputs (sl = 1) and channels_last inputs (sc = 1, sl = C) are
both read in place, without a transposed copy. Sample j in [0, m), m = N * L, is (n, l) = divmod(j, L).
Group g holds channels [g*d, (g+1)*d); every kernel works on tiles [BD, BM] (channels x samples) with
BD = next power of two >= d (masked), and accumulates in fp32.

Kernels (one launch each, no host synchronisation, no float atomics):

- ``group_stats_partial_kernel``  grid (P, G): program (s, g) reduces its contiguous range of sample
  blocks to a shifted sum and a shifted second moment (shift = the first sample of each channel, which
  keeps E[xx^T] - mean mean^T free of cancellation when |mean| >> std).
- ``group_stats_finalize_kernel`` grid (G,): sums the P partials in a fixed order (deterministic), writes
  mean and cov, and with NEWTON runs the Newton-Schulz steps and writes W as well.
- ``newton_fwd_kernel`` / ``newton_bwd_kernel`` grid (G,): W of cov + eps I, and dL/dcov from dL/dW
  (the exact derivative of the coupled iteration, iterates kept in a global scratch buffer).
- ``whiten_apply_kernel`` grid (P, G): y = gamma * W (x - mean) + beta, one read of x, one write of y.
- ``whiten_bwd_reduce_kernel`` grid (P, G): partials of D = sum_j dy_j (x_j - mean)^T and of sum_j dy_j.
- ``whiten_bwd_dx_kernel`` grid (P, G): dx = B dy + A (x - mean) + v (group_cov's backward without dy).

Matrix products use ``tl.dot`` when BD >= 16 and a broadcast-and-sum otherwise (tl.dot needs 16).
For BD > 32 the Newton kernels keep their d x d matrices in a global scratch buffer between steps and
multiply them in 32 x 32 tiles (three 64 x 64 fp32 matrices and the product operands spill).
For BD > 64 the apply / dx kernels reload their d x d matrices inside the loop over samples, RB rows
at a time (a product of RB output rows per step), and the partial-statistics and bwd-reduce kernels
keep their d x d accumulators as two halves of BD/2 rows (the whole products spill at BD = 128).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = [
    "STATIC_SPECS",
    "flat_view",
    "group_stats",
    "newton",
    "newton_backward",
    "apply",
    "bwd_reduce",
    "bwd_dx",
]

# Largest BD whose d x d matrices the Newton kernels keep in registers; above it, TILE x TILE tiles
# of a global scratch buffer (at BD = 64 registers spill on sm_80 and sm_90 otherwise).
REG_BD = 32
TILE = 32
# Output rows per product in the apply / dx kernels above BD = 64 (see config).
RB_ROWS = 16


# ---------------------------------------------------------------------------------------------------
# helpers


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """a @ b in fp32: tl.dot for dims >= 16, else broadcast-and-sum."""
    if USE_DOT:
        return tl.dot(a, b, input_precision=PREC)
    else:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _tile(g, j0, d, m, L, sn, sc, sl, BD: tl.constexpr, BM: tl.constexpr):
    """Offsets [BD, BM] (int64) and mask of the samples j0 .. j0+BM of group g."""
    return _tile_rows(g, tl.arange(0, BD), j0, d, m, L, sn, sc, sl, BM)


@triton.jit
def _tile_rows(g, c, j0, d, m, L, sn, sc, sl, BM: tl.constexpr):
    """Offsets [len(c), BM] (int64) and mask of the channels c (of group g) of samples j0 .. j0+BM."""
    j = j0 + tl.arange(0, BM).to(tl.int64)
    n = j // L
    l = j - n * L
    off = (g * d + c).to(tl.int64)[:, None] * sc + (n * sn + l * sl)[None, :]
    mask = (c < d)[:, None] & (j < m)[None, :]
    return off, mask


@triton.jit
def _block_range(s, n_blocks, bpp):
    b0 = s.to(tl.int64) * bpp
    b1 = tl.minimum(b0 + bpp, n_blocks)
    return b0, b1


@triton.jit
def _eye(BD: tl.constexpr, d):
    r = tl.arange(0, BD)
    return ((r[:, None] == r[None, :]) & (r < d)[:, None]).to(tl.float32)


@triton.jit
def _newton_regs(S, eye, T, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """Coupled Newton-Schulz on Se (registers): Y0 = Se/tr, Z0 = I, M = (3I - ZY)/2, Y = YM, Z = MZ."""
    tr = tl.sum(tl.sum(S * eye, axis=1), axis=0)
    Y = S / tr
    Z = eye
    for _ in range(T):
        M = 1.5 * eye - 0.5 * _mm(Z, Y, USE_DOT, PREC)
        Y = _mm(Y, M, USE_DOT, PREC)
        Z = _mm(M, Z, USE_DOT, PREC)
    return Z / tl.sqrt(tr)


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
# statistics


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
# Newton-Schulz (IterNorm) whitening matrix and its backward


@triton.jit
def newton_fwd_kernel(cov_ptr, w_ptr, scratch_ptr, d, eps, T, BD: tl.constexpr, BT: tl.constexpr,
                      USE_DOT: tl.constexpr, PREC: tl.constexpr):
    g = tl.program_id(0)
    gd = g.to(tl.int64) * d
    if BD <= BT:
        c = tl.arange(0, BD)
        m2 = (c < d)[:, None] & (c < d)[None, :]
        eye = _eye(BD, d)
        S = tl.load(cov_ptr + gd * d + c[:, None] * d + c[None, :], mask=m2, other=0.0) + eps * eye
        W = _newton_regs(S, eye, T, USE_DOT, PREC)
        tl.store(w_ptr + gd * d + c[:, None] * d + c[None, :], W, mask=m2)
    else:
        # scratch per group: Y, Z, M, tmp, each BD x BD (padded, zero outside d x d)
        sz = BD * BD
        Yp = scratch_ptr + g.to(tl.int64) * 4 * sz
        Zp = Yp + sz
        Mp = Zp + sz
        Xp = Mp + sz
        tr = _load_se_tiled(cov_ptr + gd * d, Yp, Zp, d, eps, BD, BT)
        for _ in range(T):
            _tiled_mm(Zp, Yp, Mp, -0.5, 1.5, False, False, BD, BT, PREC)    # M = 1.5 I - 0.5 Z Y
            _tiled_mm(Yp, Mp, Xp, 1.0, 0.0, False, False, BD, BT, PREC)     # tmp = Y M
            _tiled_mm(Mp, Zp, Yp, 1.0, 0.0, False, False, BD, BT, PREC)     # Y <- M Z (new Z)
            t = Yp                                                            # swap roles
            Yp = Xp
            Xp = Zp
            Zp = t
        _store_tiled(Zp, w_ptr + gd * d, 1.0 / tl.sqrt(tr), d, BD, BT)


@triton.jit
def _load_se_tiled(cov_ptr, Yp, Zp, d, eps, BD: tl.constexpr, BT: tl.constexpr):
    """Y = Se / tr(Se), Z = I into scratch (zero padded); returns tr(Se)."""
    r = tl.arange(0, BT)
    tr = 0.0
    for i in range(BD // BT):
        ri = i * BT + r
        diag = tl.load(cov_ptr + ri * d + ri, mask=ri < d, other=0.0) + eps
        tr += tl.sum(tl.where(ri < d, diag, 0.0), axis=0)
    for i in range(BD // BT):
        for jb in range(BD // BT):
            ri = i * BT + r
            rj = jb * BT + r
            m2 = (ri < d)[:, None] & (rj < d)[None, :]
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
def newton_bwd_kernel(cov_ptr, gw_ptr, gcov_ptr, hist_ptr, work_ptr, d, eps, T, BD: tl.constexpr,
                      BT: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """dL/dcov of W = Newton-Schulz(cov + eps I, T): reverse mode through the coupled iteration.

    Step k: M = 1.5 I - 0.5 Z Y, Y' = Y M, Z' = M Z. With gY', gZ' given:
    gM = Y^T gY' + gZ' Z^T, gY = gY' M^T - 0.5 Z^T gM, gZ = M^T gZ' - 0.5 gM Y^T.
    The iterates (Y_k, Z_k), k < T, go to hist (G, T, 2, BD, BD) on the way forward.
    """
    g = tl.program_id(0)
    gd = g.to(tl.int64) * d
    sz = BD * BD
    hist = hist_ptr + g.to(tl.int64) * T * 2 * sz
    if BD <= BT:
        c = tl.arange(0, BD)
        m2 = (c < d)[:, None] & (c < d)[None, :]
        off = c[:, None] * BD + c[None, :]
        eye = _eye(BD, d)
        S = tl.load(cov_ptr + gd * d + c[:, None] * d + c[None, :], mask=m2, other=0.0) + eps * eye
        tr = tl.sum(tl.sum(S * eye, axis=1), axis=0)
        Y = S / tr
        Z = eye
        for k in range(T):
            tl.store(hist + (2 * k) * sz + off, Y)
            tl.store(hist + (2 * k + 1) * sz + off, Z)
            M = 1.5 * eye - 0.5 * _mm(Z, Y, USE_DOT, PREC)
            Y = _mm(Y, M, USE_DOT, PREC)
            Z = _mm(M, Z, USE_DOT, PREC)
        tl.debug_barrier()
        rs = 1.0 / tl.sqrt(tr)
        gW = tl.load(gw_ptr + gd * d + c[:, None] * d + c[None, :], mask=m2, other=0.0)
        gZ = gW * rs
        g_tr = -0.5 * rs / tr * tl.sum(tl.sum(gW * Z, axis=1), axis=0)
        gY = tl.zeros((BD, BD), dtype=tl.float32)
        for i in range(T):
            k = T - 1 - i
            Yk = tl.load(hist + (2 * k) * sz + off)
            Zk = tl.load(hist + (2 * k + 1) * sz + off)
            M = 1.5 * eye - 0.5 * _mm(Zk, Yk, USE_DOT, PREC)
            gM = _mm(tl.trans(Yk), gY, USE_DOT, PREC) + _mm(gZ, tl.trans(Zk), USE_DOT, PREC)
            gY = _mm(gY, tl.trans(M), USE_DOT, PREC) - 0.5 * _mm(tl.trans(Zk), gM, USE_DOT, PREC)
            gZ = _mm(tl.trans(M), gZ, USE_DOT, PREC) - 0.5 * _mm(gM, tl.trans(Yk), USE_DOT, PREC)
        # Y0 = Se / tr
        g_tr += -tl.sum(tl.sum(gY * S, axis=1), axis=0) / (tr * tr)
        gS = gY / tr + g_tr * eye
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
        # forward: Y, Z live in hist slots k (read), next iterate written to slot k+1 or t1/t2
        tr = _load_se_tiled(cov_ptr + gd * d, hist, hist + sz, d, eps, BD, BT)
        _tiled_axpy(hist, hist, Sp, tr, 0.0, BD, BT)                     # S = Y0 * tr
        for k in range(T):
            Yk = hist + (2 * k) * sz
            Zk = Yk + sz
            if k + 1 < T:
                Yn = Yk + 2 * sz
                Zn = Yn + sz
            else:
                Yn = t1
                Zn = t2
            _tiled_mm(Zk, Yk, Mp, -0.5, 1.5, False, False, BD, BT, PREC)
            _tiled_mm(Yk, Mp, Yn, 1.0, 0.0, False, False, BD, BT, PREC)
            _tiled_mm(Mp, Zk, Zn, 1.0, 0.0, False, False, BD, BT, PREC)
        # t2 = Z_T; gZ = gW / sqrt(tr); gY = 0
        rs = 1.0 / tl.sqrt(tr)
        _load_padded_tiled(gw_ptr + gd * d, gZp, d, BD, BT)
        g_tr = -0.5 * rs / tr * _tiled_dotsum(gZp, t2, BD, BT)
        _tiled_axpy(gZp, gZp, gZp, rs, 0.0, BD, BT)
        _tiled_axpy(gZp, gZp, gYp, 0.0, 0.0, BD, BT)
        for i in range(T):
            k = T - 1 - i
            Yk = hist + (2 * k) * sz
            Zk = Yk + sz
            _tiled_mm(Zk, Yk, Mp, -0.5, 1.5, False, False, BD, BT, PREC)        # M
            _tiled_mm(Yk, gYp, t1, 1.0, 0.0, True, False, BD, BT, PREC)         # Y^T gY
            _tiled_mm(gZp, Zk, t2, 1.0, 0.0, False, True, BD, BT, PREC)         # gZ Z^T
            _tiled_axpy(t1, t2, gMp, 1.0, 1.0, BD, BT)                          # gM
            _tiled_mm(gYp, Mp, t1, 1.0, 0.0, False, True, BD, BT, PREC)         # gY M^T
            _tiled_mm(Zk, gMp, t2, 1.0, 0.0, True, False, BD, BT, PREC)         # Z^T gM
            _tiled_axpy(t1, t2, gYp, 1.0, -0.5, BD, BT)                         # gY
            _tiled_mm(Mp, gZp, t1, 1.0, 0.0, True, False, BD, BT, PREC)         # M^T gZ
            _tiled_mm(gMp, Yk, t2, 1.0, 0.0, False, True, BD, BT, PREC)         # gM Y^T
            _tiled_axpy(t1, t2, gZp, 1.0, -0.5, BD, BT)                         # gZ
        g_tr += -_tiled_dotsum(gYp, Sp, BD, BT) / (tr * tr)
        _store_grad_tiled(gYp, gcov_ptr + gd * d, 1.0 / tr, g_tr, d, BD, BT)


@triton.jit
def _load_padded_tiled(src, dst, d, BD: tl.constexpr, BT: tl.constexpr):
    """dst (BD x BD scratch) = src (d x d) zero padded (then a barrier)."""
    r = tl.arange(0, BT)
    for i in range(BD // BT):
        for jb in range(BD // BT):
            ri = i * BT + r
            rj = jb * BT + r
            m2 = (ri < d)[:, None] & (rj < d)[None, :]
            v = tl.load(src + ri[:, None] * d + rj[None, :], mask=m2, other=0.0)
            tl.store(dst + ri[:, None] * BD + rj[None, :], v)
    tl.debug_barrier()


@triton.jit
def _store_grad_tiled(src, dst, scale, diag, d, BD: tl.constexpr, BT: tl.constexpr):
    """dst (d x d) = scale * src + diag * I."""
    r = tl.arange(0, BT)
    for i in range(BD // BT):
        for jb in range(BD // BT):
            ri = i * BT + r
            rj = jb * BT + r
            m2 = (ri < d)[:, None] & (rj < d)[None, :]
            eye = (ri[:, None] == rj[None, :]).to(tl.float32)
            v = scale * tl.load(src + ri[:, None] * BD + rj[None, :]) + diag * eye
            tl.store(dst + ri[:, None] * d + rj[None, :], v, mask=m2)


# ---------------------------------------------------------------------------------------------------
# apply and backward passes over x


@triton.jit
def _apply_matrix(w_ptr, weight_ptr, gd, d, BD: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    return _apply_rows(w_ptr, weight_ptr, gd, d, tl.arange(0, BD), BD, HAS_WEIGHT)


@triton.jit
def _apply_rows(w_ptr, weight_ptr, gd, d, r, BD: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """Rows r of diag(weight) W, [len(r), BD], zero outside d x d."""
    c = tl.arange(0, BD)
    rm = r < d
    W = tl.load(w_ptr + gd * d + r[:, None] * d + c[None, :], mask=rm[:, None] & (c < d)[None, :], other=0.0)
    if HAS_WEIGHT:
        W = W * tl.load(weight_ptr + gd + r, mask=rm, other=0.0).to(tl.float32)[:, None]
    return W


@triton.jit
def whiten_apply_kernel(x_ptr, y_ptr, mean_ptr, w_ptr, weight_ptr, bias_ptr, d, m, L, sn, sc, sl,
                        n_blocks, bpp, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BD: tl.constexpr, BM: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
                        MAT_IN_LOOP: tl.constexpr, RB: tl.constexpr):
    s = tl.program_id(0)
    g = tl.program_id(1)
    c = tl.arange(0, BD)
    cm = c < d
    gd = g.to(tl.int64) * d
    if not MAT_IN_LOOP:
        W = _apply_matrix(w_ptr, weight_ptr, gd, d, BD, HAS_WEIGHT)
    mu = tl.load(mean_ptr + gd + c, mask=cm, other=0.0)
    if HAS_BIAS:
        beta = tl.load(bias_ptr + gd + c, mask=cm, other=0.0).to(tl.float32)
    else:
        beta = tl.zeros((BD,), dtype=tl.float32)
    b0, b1 = _block_range(s, n_blocks, bpp)
    for b in range(b0, b1):
        off, mask = _tile(g, b * BM, d, m, L, sn, sc, sl, BD, BM)
        xt = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        xc = tl.where(mask, xt - mu[:, None], 0.0)                           # [BD, BM]
        if RB < BD:
            # output rows in blocks of RB: rows of W reloaded per block (L1/L2 hits), xc reused
            for rb in range(BD // RB):
                r = rb * RB + tl.arange(0, RB)
                Wr = _apply_rows(w_ptr, weight_ptr, gd, d, r, BD, HAS_WEIGHT)
                yr = _mm(Wr, xc, USE_DOT, PREC)
                if HAS_BIAS:
                    yr += tl.load(bias_ptr + gd + r, mask=r < d, other=0.0).to(tl.float32)[:, None]
                offr, maskr = _tile_rows(g, r, b * BM, d, m, L, sn, sc, sl, BM)
                tl.store(y_ptr + offr, yr.to(y_ptr.dtype.element_ty), mask=maskr)
        else:
            if MAT_IN_LOOP:
                # d x d too large to stay in registers across the loop: reload it (L1/L2 hits)
                W = _apply_matrix(w_ptr, weight_ptr, gd, d, BD, HAS_WEIGHT)
            yt = _mm(W, xc, USE_DOT, PREC) + beta[:, None]
            tl.store(y_ptr + off, yt.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def whiten_bwd_reduce_kernel(dy_ptr, x_ptr, mean_ptr, dp_ptr, sp_ptr, d, m, L, sn, sc, sl, tn, tc, tl_,
                             n_blocks, bpp, P, BD: tl.constexpr, BM: tl.constexpr,
                             USE_DOT: tl.constexpr, PREC: tl.constexpr, HALVES: tl.constexpr):
    s = tl.program_id(0)
    g = tl.program_id(1)
    c = tl.arange(0, BD)
    mu = tl.load(mean_ptr + g.to(tl.int64) * d + c, mask=c < d, other=0.0)
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
            off, mask = _tile(g, j0, d, m, L, sn, sc, sl, BD, BM)
            xt = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
            xcT = tl.trans(tl.where(mask, xt - mu[:, None], 0.0))
            offT, maskT = _tile_rows(g, h, j0, d, m, L, tn, tc, tl_, BM)
            dyT = tl.load(dy_ptr + offT, mask=maskT, other=0.0).to(tl.float32)
            accST += tl.sum(dyT, axis=1)
            accT += _mm(dyT, xcT, USE_DOT, PREC)
            offB, maskB = _tile_rows(g, h + BD // 2, j0, d, m, L, tn, tc, tl_, BM)
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
        off, mask = _tile(g, j0, d, m, L, sn, sc, sl, BD, BM)
        offd, _ = _tile(g, j0, d, m, L, tn, tc, tl_, BD, BM)
        xt = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        dyt = tl.load(dy_ptr + offd, mask=mask, other=0.0).to(tl.float32)
        xc = tl.where(mask, xt - mu[:, None], 0.0)
        accD += _mm(dyt, tl.trans(xc), USE_DOT, PREC)                        # sum dy xc^T
        accS += tl.sum(dyt, axis=1)
    tl.store(sp_ptr + base * BD + c, accS)
    tl.store(dp_ptr + base * BD * BD + c[:, None] * BD + c[None, :], accD)


@triton.jit
def whiten_bwd_dx_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, a_ptr, b_ptr, v_ptr, d, m, L, sn, sc, sl,
                         tn, tc, tl_, n_blocks, bpp, HAS_DY: tl.constexpr, BD: tl.constexpr,
                         BM: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
                         MAT_IN_LOOP: tl.constexpr, RB: tl.constexpr):
    s = tl.program_id(0)
    g = tl.program_id(1)
    c = tl.arange(0, BD)
    cm = c < d
    m2 = cm[:, None] & cm[None, :]
    gd = g.to(tl.int64) * d
    mat = gd * d + c[:, None] * d + c[None, :]
    if not MAT_IN_LOOP:
        A = tl.load(a_ptr + mat, mask=m2, other=0.0)
        if HAS_DY:
            B = tl.load(b_ptr + mat, mask=m2, other=0.0)
    mu = tl.load(mean_ptr + gd + c, mask=cm, other=0.0)
    v = tl.load(v_ptr + gd + c, mask=cm, other=0.0)
    b0, b1 = _block_range(s, n_blocks, bpp)
    for b in range(b0, b1):
        j0 = b * BM
        off, mask = _tile(g, j0, d, m, L, sn, sc, sl, BD, BM)
        xt = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        xc = tl.where(mask, xt - mu[:, None], 0.0)
        if RB < BD:
            if HAS_DY:
                offd, _ = _tile(g, j0, d, m, L, tn, tc, tl_, BD, BM)
                dyt = tl.load(dy_ptr + offd, mask=mask, other=0.0).to(tl.float32)
            # output rows in blocks of RB: rows of A (and B) reloaded per block, xc and dy reused
            for rb in range(BD // RB):
                r = rb * RB + tl.arange(0, RB)
                rm = r < d
                matr = gd * d + r[:, None] * d + c[None, :]
                m2r = rm[:, None] & cm[None, :]
                out = _mm(tl.load(a_ptr + matr, mask=m2r, other=0.0), xc, USE_DOT, PREC)
                out += tl.load(v_ptr + gd + r, mask=rm, other=0.0)[:, None]
                if HAS_DY:
                    out += _mm(tl.load(b_ptr + matr, mask=m2r, other=0.0), dyt, USE_DOT, PREC)
                offr, maskr = _tile_rows(g, r, j0, d, m, L, sn, sc, sl, BM)
                tl.store(dx_ptr + offr, out.to(dx_ptr.dtype.element_ty), mask=maskr)
        else:
            if MAT_IN_LOOP:
                A = tl.load(a_ptr + mat, mask=m2, other=0.0)
            out = _mm(A, xc, USE_DOT, PREC) + v[:, None]
            if HAS_DY:
                offd, _ = _tile(g, j0, d, m, L, tn, tc, tl_, BD, BM)
                dyt = tl.load(dy_ptr + offd, mask=mask, other=0.0).to(tl.float32)
                if MAT_IN_LOOP:
                    B = tl.load(b_ptr + mat, mask=m2, other=0.0)
                out += _mm(B, dyt, USE_DOT, PREC)
            tl.store(dx_ptr + off, out.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# launch configuration


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def config(d: int, on_gpu: bool) -> dict:
    """Block sizes and launch options of the kernels for group size d.

    Chosen from the static compile figures (python -m sdecor_kernels.static) for sm_80 and sm_90: no
    spills, and registers low enough for >= 2 programs of 8 warps per SM up to d = 32.
    num_stages=1: the loops stream x once, and prefetch stages cost registers and shared memory that
    occupancy (many programs per SM) makes up for.
    """
    BD = max(2, _pow2(d))
    use_dot = BD >= 16
    if not use_dot:
        # the broadcast product [BD, BM, BD] kept at <= 4096 elements
        BM, warps = max(16, min(128, 4096 // (BD * BD))), 4
    elif BD <= 16:
        BM, warps = 64, 8
    elif BD <= 32:
        BM, warps = 32, 8
    else:
        # at BD = 64, BM = 32 spills in the dx kernel on sm_80 (255 registers)
        BM, warps = 16, 8
    # fp32 products: FMA ("ieee") keeps up with memory below d = 64 (2d flops per 4-byte element);
    # above it, three tf32 tensor-core products give ~fp32 accuracy. The interpreter's dot is
    # exact fp32 whatever is asked.
    prec = "tf32x3" if (on_gpu and BD >= 64) else "ieee"
    # d x d products of the one-program-per-group kernels: FMA, whose operands take half the
    # registers of tf32x3's (the flops are negligible next to the passes over x)
    # Newton kernels (one program per group): launch options per BD, spill-free on sm_80 and sm_90
    # in the static compile sweep (registers for BD <= 32, TILE-sized tiles of scratch above)
    if BD <= 32:
        nfwd = dict(BT=TILE, num_warps=4 if BD <= 16 else 8, num_stages=1)
        nbwd = dict(BT=TILE, num_warps=8, num_stages=2 if BD <= 16 else 1)
    elif BD <= 64:
        nfwd = dict(BT=32, num_warps=4, num_stages=3)
        nbwd = dict(BT=32, num_warps=4, num_stages=3)
    else:
        nfwd = dict(BT=32, num_warps=4, num_stages=1)
        nbwd = dict(BT=16, num_warps=2, num_stages=3)
    # apply / dx: above BD = 64 the d x d x BM products are formed RB output rows at a time (the
    # whole product spills at BD = 128 on sm_80 and sm_90)
    RB = BD if BD <= 64 else RB_ROWS
    return dict(BD=BD, BM=BM, USE_DOT=use_dot, PREC=prec, SMALL_PREC="ieee", MAT_IN_LOOP=BD > 64, RB=RB,
                HALVES=BD > 64,
                num_warps=warps, SMALL_WARPS=4 if BD <= 16 else 8, num_stages=1,
                NEWTON_FWD=nfwd, NEWTON_BWD=nbwd)


def _splits(n_blocks: int, G: int, device: torch.device) -> tuple[int, int]:
    """(P, blocks per program): enough programs to fill the device even when G is small."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8
    P = max(1, min(n_blocks, -(-target // G)))
    bpp = -(-n_blocks // P)
    return -(-n_blocks // bpp), bpp


def flat_view(t: torch.Tensor, output_layout: bool = False):
    """(t', sn, sc, sl, L): t (N, C, *S) addressed as (N, C, L) by three strides.

    Any layout whose trailing dims merge into one stride is read in place (contiguous, channels_last,
    expanded gradients); others are copied. With ``output_layout`` t' is also dense (contiguous or
    channels_last), so that ``torch.empty_like(t')`` has the same strides.
    """
    if output_layout and not (t.is_contiguous() or _channels_last(t)):
        t = t.contiguous()
    spatial = [(n, s) for n, s in zip(t.shape[2:], t.stride()[2:]) if n != 1]
    if any(spatial[i][1] != spatial[i + 1][1] * spatial[i + 1][0] for i in range(len(spatial) - 1)):
        t = t.contiguous()
        spatial = [(n, s) for n, s in zip(t.shape[2:], t.stride()[2:]) if n != 1]
    sl = spatial[-1][1] if spatial else 1
    return t, t.stride(0), t.stride(1), sl, math.prod(t.shape[2:])


def _channels_last(t: torch.Tensor) -> bool:
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def _interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(kernel, InterpretedFunction)


def _launch(kernel, grid, *args, **meta):
    """Launch through torch.library.wrap_triton (traceable by torch.compile / export).

    Under the interpreter with fake tensors (shape propagation), no kernel runs.
    """
    if _interpreted(kernel):
        from torch._subclasses.fake_tensor import is_fake

        if any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
            return
    torch.library.wrap_triton(kernel)[grid](*args, **meta)


def _f32(*shape, device):
    return torch.empty(shape, dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------------
# launchers


def group_stats(x: torch.Tensor, d: int, newton: tuple[float, int] | None = None):
    """mean (G, d), cov (G, d, d) fp32 of x (N, C, *S) in one read of x; with ``newton=(eps, T)``
    also W (G, d, d), the Newton-Schulz whitening matrix of cov + eps I."""
    x, sn, sc, sl, L = flat_view(x)
    N, C = x.shape[:2]
    G, m, dev = C // d, N * L, x.device
    cfg = config(d, dev.type == "cuda")
    BD, BM = cfg["BD"], cfg["BM"]
    n_blocks = -(-m // BM)
    P, bpp = _splits(n_blocks, G, dev)
    s1 = _f32(G, P, BD, device=dev)
    s2 = _f32(G, P, BD, BD, device=dev)
    _launch(group_stats_partial_kernel, (P, G), x, s1, s2, d, m, L, sn, sc, sl, n_blocks, bpp, P,
            BD=BD, BM=BM, USE_DOT=cfg["USE_DOT"], PREC=cfg["PREC"], HALVES=cfg["HALVES"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    mean = _f32(G, d, device=dev)
    cov = _f32(G, d, d, device=dev)
    fused = newton is not None and BD <= REG_BD
    w = _f32(G, d, d, device=dev) if fused else cov
    eps, T = newton if newton is not None else (0.0, 0)
    _launch(group_stats_finalize_kernel, (G,), x, s1, s2, mean, cov, w, d, m, sc, P, float(eps), int(T),
            NEWTON=fused, BD=BD, USE_DOT=cfg["USE_DOT"], PREC=cfg["SMALL_PREC"], num_warps=cfg["SMALL_WARPS"], num_stages=cfg["num_stages"])
    if newton is None:
        return mean, cov
    if not fused:
        w = globals()["newton"](cov, eps, T)
    return mean, cov, w


def newton(cov: torch.Tensor, eps: float, T: int) -> torch.Tensor:
    """W (G, d, d) = Newton-Schulz whitening matrix of cov (G, d, d) fp32 + eps I, T steps."""
    cov = cov.contiguous()
    G, d = cov.shape[0], cov.shape[-1]
    dev = cov.device
    cfg = config(d, dev.type == "cuda")
    BD = cfg["BD"]
    w = _f32(G, d, d, device=dev)
    scratch = _f32(G, 4, BD, BD, device=dev) if BD > REG_BD else _f32(1, device=dev)
    _launch(newton_fwd_kernel, (G,), cov, w, scratch, d, float(eps), int(T), BD=BD,
            USE_DOT=cfg["USE_DOT"], PREC=cfg["SMALL_PREC"], **cfg["NEWTON_FWD"])
    return w


def newton_backward(cov: torch.Tensor, grad_w: torch.Tensor, eps: float, T: int) -> torch.Tensor:
    """dL/dcov (G, d, d) from dL/dW for W = newton(cov, eps, T) (the exact derivative)."""
    cov = cov.contiguous()
    grad_w = grad_w.to(torch.float32).contiguous()
    G, d = cov.shape[0], cov.shape[-1]
    dev = cov.device
    cfg = config(d, dev.type == "cuda")
    BD = cfg["BD"]
    gcov = _f32(G, d, d, device=dev)
    hist = _f32(G, int(T), 2, BD, BD, device=dev)
    work = _f32(G, 7, BD, BD, device=dev) if BD > REG_BD else _f32(1, device=dev)
    _launch(newton_bwd_kernel, (G,), cov, grad_w, gcov, hist, work, d, float(eps), int(T), BD=BD,
            USE_DOT=cfg["USE_DOT"], PREC=cfg["SMALL_PREC"], **cfg["NEWTON_BWD"])
    return gcov


def apply(x: torch.Tensor, mean: torch.Tensor, w: torch.Tensor, weight: torch.Tensor | None = None,
          bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = weight * W (x - mean) + bias per group, in x's dtype and memory format (contiguous when x
    is neither contiguous nor channels_last)."""
    x, sn, sc, sl, L = flat_view(x, output_layout=True)
    N, C = x.shape[:2]
    G, d = mean.shape
    m, dev = N * L, x.device
    cfg = config(d, dev.type == "cuda")
    n_blocks = -(-m // cfg["BM"])
    P, bpp = _splits(n_blocks, G, dev)
    y = torch.empty_like(x)
    mean = mean.to(torch.float32).contiguous()
    w = w.to(torch.float32).contiguous()
    _launch(whiten_apply_kernel, (P, G), x, y, mean, w,
            weight.contiguous() if weight is not None else mean,
            bias.contiguous() if bias is not None else mean,
            d, m, L, sn, sc, sl, n_blocks, bpp, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BD=cfg["BD"], BM=cfg["BM"], USE_DOT=cfg["USE_DOT"], PREC=cfg["PREC"],
            MAT_IN_LOOP=cfg["MAT_IN_LOOP"], RB=cfg["RB"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def bwd_reduce(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor):
    """D = sum_j dy_j (x_j - mean)^T (G, d, d) and sum_j dy_j (G, d), fp32, in one read of (dy, x).

    Two stages: per-program partials, then a fixed-order sum over the programs (deterministic).
    """
    x, sn, sc, sl, L = flat_view(x, output_layout=True)
    dy, tn, tc, tl_, _ = flat_view(dy)
    N, C = x.shape[:2]
    G, d = mean.shape
    m, dev = N * L, x.device
    cfg = config(d, dev.type == "cuda")
    BD, BM = cfg["BD"], cfg["BM"]
    n_blocks = -(-m // BM)
    P, bpp = _splits(n_blocks, G, dev)
    dp = _f32(G, P, BD, BD, device=dev)
    sp = _f32(G, P, BD, device=dev)
    _launch(whiten_bwd_reduce_kernel, (P, G), dy, x, mean.to(torch.float32).contiguous(), dp, sp,
            d, m, L, sn, sc, sl, tn, tc, tl_, n_blocks, bpp, P, BD=BD, BM=BM, USE_DOT=cfg["USE_DOT"],
            PREC=cfg["PREC"], HALVES=cfg["HALVES"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
    return dp.sum(1)[:, :d, :d], sp.sum(1)[:, :d]


def bwd_dx(dy: torch.Tensor | None, x: torch.Tensor, mean: torch.Tensor, a: torch.Tensor,
           b: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """dx_j = B dy_j + A (x_j - mean) + v per group (without the B term when dy is None), in x's
    dtype and layout, in one read of (dy, x) and one write."""
    x, sn, sc, sl, L = flat_view(x, output_layout=True)
    dy_given = dy is not None
    if dy_given:
        if b is None:
            raise ValueError("bwd_dx: b is required when dy is given")
        dy, tn, tc, tl_, _ = flat_view(dy)
    else:
        dy, tn, tc, tl_ = x, sn, sc, sl
    N, C = x.shape[:2]
    G, d = mean.shape
    m, dev = N * L, x.device
    cfg = config(d, dev.type == "cuda")
    n_blocks = -(-m // cfg["BM"])
    P, bpp = _splits(n_blocks, G, dev)
    dx = torch.empty_like(x)
    a = a.to(torch.float32).contiguous()
    _launch(whiten_bwd_dx_kernel, (P, G), dy, x, dx, mean.to(torch.float32).contiguous(), a,
            b.to(torch.float32).contiguous() if b is not None else a, v.to(torch.float32).contiguous(),
            d, m, L, sn, sc, sl, tn, tc, tl_, n_blocks, bpp, HAS_DY=dy_given, BD=cfg["BD"],
            BM=cfg["BM"], USE_DOT=cfg["USE_DOT"], PREC=cfg["PREC"], MAT_IN_LOOP=cfg["MAT_IN_LOOP"],
            RB=cfg["RB"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dx


# ---------------------------------------------------------------------------------------------------
# ahead-of-time compilation specs (see sdecor_kernels.static); d = group size


def _gpu_cfg(kernel, **fixed):
    """d -> the constexprs of ``kernel`` (and launch options) as the launchers pick them on a GPU."""
    def cfg(d: int) -> dict:
        full = {**config(d, on_gpu=True), **fixed}
        if "T" in kernel.arg_names:                      # the d x d kernels
            full["PREC"] = full["SMALL_PREC"]
            full["num_warps"] = full["SMALL_WARPS"]
        if kernel is newton_fwd_kernel:
            full.update(full["NEWTON_FWD"])
        if kernel is newton_bwd_kernel:
            full.update(full["NEWTON_BWD"])
        keep = set(kernel.arg_names) | {"num_warps", "num_stages"}
        return {k: v for k, v in full.items() if k in keep}
    return cfg


def _sig(names: str, types: dict | None = None) -> dict:
    """Signature: *_ptr arguments are fp32 pointers, the rest i32 unless ``types`` says otherwise."""
    types = types or {}
    return {a: types.get(a, "*fp32" if a.endswith("_ptr") else "i32") for a in names.split()}


_X = "d m L sn sc sl n_blocks bpp"
_XT = "d m L sn sc sl tn tc tl_ n_blocks bpp"
_SPEC_DS = (2, 3, 4, 8, 16, 32, 48, 64, 128)
_BF16 = {"x_ptr": "*bf16", "y_ptr": "*bf16", "dy_ptr": "*bf16", "dx_ptr": "*bf16", "weight_ptr": "*bf16",
         "bias_ptr": "*bf16"}


def _spec(name, kernel, args, types=None, ds=_SPEC_DS, **fixed):
    return dict(name=name, kernel=kernel, ds=ds, signature=_sig(args, types), config=_gpu_cfg(kernel, **fixed))


STATIC_SPECS = [
    _spec("group_stats_partial_kernel", group_stats_partial_kernel, f"x_ptr s1_ptr s2_ptr {_X} P"),
    _spec("group_stats_partial_kernel[bf16]", group_stats_partial_kernel, f"x_ptr s1_ptr s2_ptr {_X} P", _BF16),
    _spec("group_stats_finalize_kernel[NEWTON]", group_stats_finalize_kernel,
          "x_ptr s1_ptr s2_ptr mean_ptr cov_ptr w_ptr d m sc P eps T", {"eps": "fp32"},
          ds=tuple(d for d in _SPEC_DS if _pow2(d) <= REG_BD), NEWTON=True),
    _spec("group_stats_finalize_kernel", group_stats_finalize_kernel,
          "x_ptr s1_ptr s2_ptr mean_ptr cov_ptr w_ptr d m sc P eps T", {"eps": "fp32"}, NEWTON=False),
    _spec("newton_fwd_kernel", newton_fwd_kernel, "cov_ptr w_ptr scratch_ptr d eps T", {"eps": "fp32"}),
    _spec("newton_bwd_kernel", newton_bwd_kernel, "cov_ptr gw_ptr gcov_ptr hist_ptr work_ptr d eps T",
          {"eps": "fp32"}),
    _spec("whiten_apply_kernel", whiten_apply_kernel, f"x_ptr y_ptr mean_ptr w_ptr weight_ptr bias_ptr {_X}",
          HAS_WEIGHT=True, HAS_BIAS=True),
    _spec("whiten_apply_kernel[bf16]", whiten_apply_kernel,
          f"x_ptr y_ptr mean_ptr w_ptr weight_ptr bias_ptr {_X}", _BF16, HAS_WEIGHT=True, HAS_BIAS=True),
    _spec("whiten_bwd_reduce_kernel", whiten_bwd_reduce_kernel, f"dy_ptr x_ptr mean_ptr dp_ptr sp_ptr {_XT} P"),
    _spec("whiten_bwd_reduce_kernel[bf16]", whiten_bwd_reduce_kernel,
          f"dy_ptr x_ptr mean_ptr dp_ptr sp_ptr {_XT} P", _BF16),
    _spec("whiten_bwd_dx_kernel[HAS_DY]", whiten_bwd_dx_kernel,
          f"dy_ptr x_ptr dx_ptr mean_ptr a_ptr b_ptr v_ptr {_XT}", HAS_DY=True),
    _spec("whiten_bwd_dx_kernel", whiten_bwd_dx_kernel,
          f"dy_ptr x_ptr dx_ptr mean_ptr a_ptr b_ptr v_ptr {_XT}", HAS_DY=False),
]
