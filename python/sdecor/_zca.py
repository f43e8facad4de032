"""ZCA whitening math, written once for the reference and every backend.

Se = cov + eps I (:func:`shifted_cov`); W = Se^-1/2 = U diag(l^-1/2) U^T from an eigendecomposition
Se = U diag(l) U^T (eigenvalues clamped at eps, never NaN), and its stable backward
dL/dSe = U (F o (U^T sym(G) U)) U^T, F_ij = -1 / (s_i s_j (s_i + s_j)), s = sqrt(l) (docs/design.md,
"Semantics"): exact and finite for repeated eigenvalues, where autograd through eigh is not.

- :class:`ZCAWhitening`: W of Se as an autograd Function that takes the eigensolver
  (torch.linalg.eigh in the reference, sdecor's Jacobi solver where the native backend picks it),
  differentiable twice (:func:`zca_backward_dse`, the second-order term).
- :func:`zca_from_eigh_scaled` / :func:`zca_backward_scaled`: the same in units of a per-group
  power-of-two scale c (Se / c^2), finite where Se itself is not; :func:`zca_scaled` /
  :func:`zca_backward_masked` add the padded layout of a smaller last group (the triton backend's
  training path and the synchronised one).
- :func:`sym`, :func:`eye_like`, :func:`shifted_cov`: the d x d helpers they are written with (the
  Newton-Schulz iteration uses them too).
"""

from __future__ import annotations

import torch

from ._double_backward import NoThirdDerivative
from ._layout import last_group_mask, zero_padding
from ._precision import no_autocast_function, stats_dtype

__all__ = [
    "ZCAWhitening",
    "eye_like",
    "shifted_cov",
    "sym",
    "zca_backward",
    "zca_backward_dse",
    "zca_backward_masked",
    "zca_backward_scaled",
    "zca_from_eigh",
    "zca_from_eigh_scaled",
    "zca_scaled",
]


def sym(a: torch.Tensor) -> torch.Tensor:
    """The symmetric part (a + a^T) / 2 of matrices a (..., d, d)."""
    return 0.5 * (a + a.transpose(-1, -2))


def eye_like(a: torch.Tensor) -> torch.Tensor:
    """Identity matrices broadcastable against a (..., d, d)."""
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)


def shifted_cov(cov: torch.Tensor, eps: float) -> torch.Tensor:
    """Se = cov + eps I, in the statistics dtype of cov (the matrix every whitening method works on)."""
    sd = stats_dtype(cov.dtype)
    return cov.to(sd) + eps * eye_like(cov).to(sd)


def zca_from_eigh(evals: torch.Tensor, evecs: torch.Tensor, eps: float) -> torch.Tensor:
    """W = U diag(l^-1/2) U^T with the eigenvalues clamped at eps (never NaN)."""
    s_inv = evals.clamp_min(eps).rsqrt()
    return (evecs * s_inv.unsqueeze(-2)) @ evecs.transpose(-1, -2)


def zca_backward(grad_w: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor, eps: float) -> torch.Tensor:
    """dL/dSe = U (F o (U^T sym(G) U)) U^T, F_ij = -1 / (s_i s_j (s_i + s_j)), s = sqrt(l).

    F is the divided difference of f(l) = l^-1/2 at (l_i, l_j); written this way it stays finite
    when eigenvalues repeat, where autograd through eigh divides by l_i - l_j = 0.
    """
    s = evals.clamp_min(eps).sqrt()
    si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
    F = -1.0 / (si * sj * (si + sj))
    inner = evecs.transpose(-1, -2) @ sym(grad_w) @ evecs
    return evecs @ (F * inner) @ evecs.transpose(-1, -2)


def zca_backward_dse(grad_w: torch.Tensor, grad_z: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor,
                     eps: float) -> torch.Tensor:
    """d<grad_z, Z>/dSe for Z = :func:`zca_backward` (grad_w, Se): the second-order term of ZCA.

    Z = Df(Se)[sym G] is the derivative of f(Se) = Se^-1/2 in the direction sym G (G = grad_w), so
    this is the second derivative D^2 f(Se)[sym G, .] read against sym H (H = grad_z). In the
    eigenbasis, with Ĝ = U^T sym(G) U and Ĥ = U^T sym(H) U (Daleckii-Krein):
        dSe^ = T + T^T,  T_pq = sum_a f[a,p,q] Ĝ_ap Ĥ_aq,
    f[a,p,q] the second divided difference of f(l) = l^-1/2, with s = sqrt(l):
        f[a,p,q] = (s_a + s_p + s_q) / (s_a s_p s_q (s_a + s_p) (s_p + s_q) (s_a + s_q)),
    finite for repeated eigenvalues (a = p = q gives f''/2 = 3/8 l^-5/2).
    """
    s = evals.clamp_min(eps).sqrt()
    sa, sp, sq = s[..., :, None, None], s[..., None, :, None], s[..., None, None, :]
    f3 = (sa + sp + sq) / (sa * sp * sq * (sa + sp) * (sp + sq) * (sa + sq))      # (..., a, p, q)
    evecs_t = evecs.transpose(-1, -2)
    g_hat = evecs_t @ sym(grad_w) @ evecs
    h_hat = evecs_t @ sym(grad_z) @ evecs
    t = (f3 * g_hat.unsqueeze(-1) * h_hat.unsqueeze(-2)).sum(-3)
    return evecs @ (t + t.transpose(-1, -2)) @ evecs_t


@no_autocast_function
class _ZCABackward(torch.autograd.Function):
    """Z = :func:`zca_backward` (grad_w, Se) as a function of both grad_w and Se, so that the ZCA
    backward can itself be differentiated (double backward). Its own backward: d/dgrad_w is the same
    self-adjoint map applied to the incoming gradient; d/dSe is :func:`zca_backward_dse`. A third
    derivative raises."""

    @staticmethod
    def forward(ctx, grad_w, se, evals, evecs, eps):
        ctx.eps = eps
        ctx.save_for_backward(grad_w, se, evals, evecs)
        return zca_backward(grad_w, evals, evecs, eps)

    @staticmethod
    def backward(ctx, grad_z):
        grad_w, se, evals, evecs = ctx.saved_tensors
        need_grad_w, need_se = ctx.needs_input_grad[:2]
        with torch.no_grad():
            gg = zca_backward(grad_z, evals, evecs, ctx.eps) if need_grad_w else None
            gse = zca_backward_dse(grad_w, grad_z, evals, evecs, ctx.eps) if need_se else None
        sources = [t for t in (grad_z, grad_w, se) if t.requires_grad]
        if torch.is_grad_enabled() and sources:
            index = [i for i, g in enumerate((gg, gse)) if g is not None]
            copies = NoThirdDerivative.apply("ZCA whitening", [(gg, gse)[i] for i in index], *sources)
            gg, gse = (copies[index.index(i)] if i in index else None for i in range(2))
        return gg, gse, None, None, None


def _zca_sigma(evals: torch.Tensor, eps: float, scale: torch.Tensor):
    """(sigma, sigma / c): square roots of Se's eigenvalues clamped at eps, from the eigenvalues of
    Se' = Se / c^2 (c = scale (G,), powers of two), in Se's units and in units of c."""
    c = scale.to(evals.dtype).unsqueeze(-1)
    root_eps = torch.full((), eps, dtype=evals.dtype, device=evals.device).sqrt()
    sigma = torch.maximum(c * evals.clamp_min(0).sqrt(), root_eps)
    return sigma, sigma / c


def zca_from_eigh_scaled(evals: torch.Tensor, evecs: torch.Tensor, eps: float,
                         scale: torch.Tensor) -> torch.Tensor:
    """W of Se = c^2 Se' from eigh(Se'), c = scale (G,) (powers of two): U diag(1 / sigma) U^T, sigma
    the square roots of Se's eigenvalues clamped at eps. Finite where Se is not (and where eps / c^2
    underflows); where c = 1 exactly :func:`zca_from_eigh`."""
    sigma, _ = _zca_sigma(evals, eps, scale)
    unscaled = (scale == 1).unsqueeze(-1)
    s_inv = torch.where(unscaled, evals.clamp_min(eps).rsqrt(), sigma.reciprocal())
    return (evecs * s_inv.unsqueeze(-2)) @ evecs.transpose(-1, -2)


def zca_backward_scaled(grad_w: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor, eps: float,
                        scale: torch.Tensor) -> torch.Tensor:
    """dL/dSe' / c from grad_w = dL/dW' for W' = c W = Se'^-1/2, Se' = Se / c^2 = U diag(l) U^T,
    c = scale (G,) (powers of two): :func:`zca_backward` in units of c, U ((F / c) o (U^T sym(G) U))
    U^T with F / c = -1 / (sigma_i s_j (s_i + s_j)), s = sigma / c (see zca_from_eigh_scaled).

    Divided by c it stays in fp32's range except between two eigenvalues both at the clamp (F / c ~
    c^2 / eps^1.5, e.g. 1e67 at c = 1e30): those entries are bounded by fp32's largest number, so
    that they give 0, not NaN, against the zero entries of U^T sym(G) U of a constant channel whose
    axis eigh returns exactly. Where c = 1 exactly :func:`zca_backward`.
    """
    sigma, s = _zca_sigma(evals, eps, scale)
    F = -1.0 / (sigma.unsqueeze(-1) * s.unsqueeze(-2) * (s.unsqueeze(-1) + s.unsqueeze(-2)))
    F = F.clamp_min(-torch.finfo(F.dtype).max)
    inner = evecs.transpose(-1, -2) @ sym(grad_w) @ evecs
    return evecs @ (F * inner) @ evecs.transpose(-1, -2)


@no_autocast_function
class ZCAWhitening(torch.autograd.Function):
    """W = Se^-1/2 through an eigendecomposition by ``eigh`` (ascending eigenvalues, eigenvectors as
    columns), with the stable backward :func:`zca_backward`, itself differentiable w.r.t. grad_w and
    Se when a graph of the backward is requested (double backward, see :class:`_ZCABackward`)."""

    @staticmethod
    def forward(ctx, se: torch.Tensor, eps: float, eigh):
        evals, evecs = eigh(se)
        ctx.eps = eps
        ctx.save_for_backward(se, evals, evecs)
        return zca_from_eigh(evals, evecs, eps)

    @staticmethod
    def backward(ctx, grad_w):
        se, evals, evecs = ctx.saved_tensors
        if torch.is_grad_enabled():                                   # create_graph=True
            return _ZCABackward.apply(grad_w, se, evals, evecs, ctx.eps), None, None
        return zca_backward(grad_w, evals, evecs, ctx.eps), None, None


# ---------------------------------------------------------------------------------------------------
# in units of a power-of-two scale, with the padded layout of a smaller last group


def zca_scaled(cov: torch.Tensor, eps: float, scale: torch.Tensor, C: int, eigh):
    """(evals, evecs, W) of zca on cov / c^2 (G, d, d) (c = scale), for C channels, by the
    eigensolver ``eigh``.

    A smaller last group (zero padded in cov): its padding block of Se / c^2 is the identity, decoupled
    from its own block (eps / c^2 added to its own channels only) and positive; eigh of the block
    diagonal matrix gives the eigenpairs of both blocks, W of its own block is exact, and the padding
    of W is set to zero. Whatever cov holds in its padding is selected away first."""
    inv = scale.reciprocal()
    se = shifted_cov(cov, (eps * inv * inv)[:, None, None])
    mask = last_group_mask(cov, C)
    if mask is None:
        evals, evecs = eigh(se)
        return evals, evecs, zca_from_eigh_scaled(evals, evecs, eps, scale)
    evals, evecs = eigh(zero_padding(se, mask) + torch.diag_embed((~mask).to(se.dtype)))
    return evals, evecs, zero_padding(zca_from_eigh_scaled(evals, evecs, eps, scale), mask)


def zca_backward_masked(grad_w: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor, eps: float,
                        scale: torch.Tensor, C: int) -> torch.Tensor:
    """:func:`zca_backward_scaled` of :func:`zca_scaled`'s eigenpairs: the padding of a smaller last
    group set to zero (the block-diagonal derivative is zero there in exact arithmetic), and whatever
    the padding of grad_w holds selected away first."""
    mask = last_group_mask(grad_w, C)
    g = zca_backward_scaled(zero_padding(grad_w, mask), evals, evecs, eps, scale)
    return zero_padding(g, mask)
