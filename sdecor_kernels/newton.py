"""Newton-Schulz (IterNorm) whitening matrix of a group covariance, and its exact backward.

W = Newton-Schulz(cov + eps I, T), the coupled iteration on Se = cov + eps I (one program per group):
Y0 = Se / tr(Se), Z0 = I; step k: M = 1.5 I - 0.5 Z Y, Y' = Y M, Z' = M Z; W = Z_T / sqrt(tr(Se)).

- ``newton_fwd_kernel`` grid (G,): W of cov + eps I.
- ``newton_bwd_kernel`` grid (G,): dL/dcov from dL/dW (the exact derivative of the coupled
  iteration, iterates kept in a global scratch buffer).

For BD > 32 the Newton kernels keep their d x d matrices in a global scratch buffer between steps and
multiply them in 32 x 32 tiles (three 64 x 64 fp32 matrices and the product operands spill).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import SPEC_DS, LaunchConfig, _eye, _mm, f32, launch, pow2, signature

__all__ = ["STATIC_SPECS", "NewtonBwdConfig", "NewtonFwdConfig", "newton_backward", "newton_forward"]

# Largest BD whose d x d matrices the Newton kernels keep in registers; above it, TILE x TILE tiles
# of a global scratch buffer (at BD = 64 registers spill on sm_80 and sm_90 otherwise).
REG_BD = 32
TILE = 32


# ---------------------------------------------------------------------------------------------------
# helpers


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
# kernels


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
# launch configuration


@dataclass(frozen=True)
class NewtonFwdConfig(LaunchConfig):
    """Constexprs and launch options of newton_fwd_kernel for group size d (the same on every
    device): spill-free on sm_80 and sm_90 in the static compile sweep (registers for BD <= 32,
    BT x BT tiles of scratch above)."""

    BD: int
    BT: int
    USE_DOT: bool
    PREC: str
    num_warps: int
    num_stages: int

    @classmethod
    def for_group(cls, d: int) -> "NewtonFwdConfig":
        BD = max(2, pow2(d))
        if BD <= REG_BD:
            BT, warps, stages = TILE, (4 if BD <= 16 else 8), 1
        elif BD <= 64:
            BT, warps, stages = 32, 4, 3
        else:
            BT, warps, stages = 32, 4, 1
        # d x d products: FMA ("ieee") on every device, whose operands take half the registers of
        # tf32x3's (the flops of one program per group are negligible next to the passes over x)
        return cls(BD=BD, BT=BT, USE_DOT=BD >= 16, PREC="ieee", num_warps=warps, num_stages=stages)

    @property
    def in_registers(self) -> bool:
        """d x d matrices in registers (else in BT x BT tiles of a global scratch buffer)."""
        return self.BD <= self.BT


@dataclass(frozen=True)
class NewtonBwdConfig(LaunchConfig):
    """Constexprs and launch options of newton_bwd_kernel for group size d (see NewtonFwdConfig)."""

    BD: int
    BT: int
    USE_DOT: bool
    PREC: str
    num_warps: int
    num_stages: int

    @classmethod
    def for_group(cls, d: int) -> "NewtonBwdConfig":
        BD = max(2, pow2(d))
        if BD <= REG_BD:
            BT, warps, stages = TILE, 8, (2 if BD <= 16 else 1)
        elif BD <= 64:
            BT, warps, stages = 32, 4, 3
        else:
            BT, warps, stages = 16, 2, 3
        # d x d products: FMA ("ieee") on every device, whose operands take half the registers of
        # tf32x3's (the flops of one program per group are negligible next to the passes over x)
        return cls(BD=BD, BT=BT, USE_DOT=BD >= 16, PREC="ieee", num_warps=warps, num_stages=stages)

    @property
    def in_registers(self) -> bool:
        """d x d matrices in registers (else in BT x BT tiles of a global scratch buffer)."""
        return self.BD <= self.BT


# ---------------------------------------------------------------------------------------------------
# launchers


def newton_forward(cov: torch.Tensor, eps: float, T: int) -> torch.Tensor:
    """W (G, d, d) = Newton-Schulz whitening matrix of cov (G, d, d) fp32 + eps I, T steps."""
    cov = cov.contiguous()
    G, d = cov.shape[0], cov.shape[-1]
    dev = cov.device
    cfg = NewtonFwdConfig.for_group(d)
    BD = cfg.BD
    w = f32(G, d, d, device=dev)
    scratch = f32(1, device=dev) if cfg.in_registers else f32(G, 4, BD, BD, device=dev)
    launch(newton_fwd_kernel, (G,), cov, w, scratch, d, float(eps), int(T), **cfg.meta())
    return w


def newton_backward(cov: torch.Tensor, grad_w: torch.Tensor, eps: float, T: int) -> torch.Tensor:
    """dL/dcov (G, d, d) from dL/dW for W = newton_forward(cov, eps, T) (the exact derivative)."""
    cov = cov.contiguous()
    grad_w = grad_w.to(torch.float32).contiguous()
    G, d = cov.shape[0], cov.shape[-1]
    dev = cov.device
    cfg = NewtonBwdConfig.for_group(d)
    BD = cfg.BD
    gcov = f32(G, d, d, device=dev)
    hist = f32(G, int(T), 2, BD, BD, device=dev)
    work = f32(1, device=dev) if cfg.in_registers else f32(G, 7, BD, BD, device=dev)
    launch(newton_bwd_kernel, (G,), cov, grad_w, gcov, hist, work, d, float(eps), int(T), **cfg.meta())
    return gcov


# ---------------------------------------------------------------------------------------------------
# ahead-of-time compilation specs (see sdecor_kernels.static); d = group size

STATIC_SPECS = [
    dict(name="newton_fwd_kernel", kernel=newton_fwd_kernel, ds=SPEC_DS,
         signature=signature("cov_ptr w_ptr scratch_ptr d eps T", {"eps": "fp32"}),
         config=lambda d: NewtonFwdConfig.for_group(d).meta()),
    dict(name="newton_bwd_kernel", kernel=newton_bwd_kernel, ds=SPEC_DS,
         signature=signature("cov_ptr gw_ptr gcov_ptr hist_ptr work_ptr d eps T", {"eps": "fp32"}),
         config=lambda d: NewtonBwdConfig.for_group(d).meta()),
]
