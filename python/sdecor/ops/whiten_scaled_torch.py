"""The d x d part of the torch backend's group whitening: the whitening matrix of each group from its
covariance in units of the group's power-of-two scale, and its exact backward (IterNorm's coupled
Newton-Schulz iteration run forward and in reverse, or the ZCA eigendecomposition with its stable
backward). :class:`sdecor.ops.whiten_torch.TorchPasses` runs it between the passes over the large
tensors; the native backend replaces the Newton steps by one C++ op each way.
"""

from __future__ import annotations

import torch

from .._layout import zero_padding
from .._zca import eye_like, zca_backward, zca_from_eigh

__all__ = ["newton_torch_backward", "newton_torch_forward", "scaled_eps", "whitening_scaled",
           "whitening_scaled_backward"]


def newton_torch_forward(se: torch.Tensor, T: int, eye: torch.Tensor | None = None):
    """IterNorm's W = P_T / sqrt(tr Se) by the coupled iteration of the reference.

    Returns (W, trace, Z_T, ys, zs, ms) where ys[k], zs[k], ms[k] are Y_k, Z_k and M_k of step k,
    kept for :func:`newton_torch_backward`. ``eye``: the identity of each group's own channels
    (G, d, d) where a smaller last group is zero padded (its padding then stays zero in every iterate).
    """
    trace = se.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]   # tr(Se): (G, 1, 1)
    eye = eye_like(se) if eye is None else eye
    y = se / trace                                                   # Y_0 = Sn
    z = eye.expand_as(se)                                            # Z_0 = I
    ys, zs, ms = [], [], []
    for _ in range(T):
        m = 1.5 * eye - 0.5 * (z @ y)                                # M_k = (3I - Z_k Y_k) / 2
        ys.append(y)
        zs.append(z)
        ms.append(m)
        y = y @ m                                                    # Y_{k+1} = Y_k M_k
        z = m @ z                                                    # Z_{k+1} = M_k Z_k
    return z / trace.sqrt(), trace, z, ys, zs, ms


def newton_torch_backward(grad_w: torch.Tensor, se: torch.Tensor, trace: torch.Tensor, z_last: torch.Tensor,
                          ys, zs, ms, eye: torch.Tensor | None = None) -> torch.Tensor:
    """dL/dSe for W = Z_T / sqrt(tr Se): the recurrence of :func:`newton_torch_forward` run in reverse
    (``eye`` as there)."""
    rsqrt_tr = trace.rsqrt()
    gz = grad_w * rsqrt_tr                                           # through W = Z_T / sqrt(tr)
    g_tr = -0.5 * (grad_w * z_last).sum((-2, -1), keepdim=True) * rsqrt_tr / trace
    gy = torch.zeros_like(gz)
    for y, z, m in zip(reversed(ys), reversed(zs), reversed(ms)):
        # Y_{k+1} = Y_k M_k and Z_{k+1} = M_k Z_k
        gm = y.transpose(-1, -2) @ gy + gz @ z.transpose(-1, -2)
        gy_new = gy @ m.transpose(-1, -2)
        gz_new = m.transpose(-1, -2) @ gz
        # M_k = 1.5 I - 0.5 Z_k Y_k
        gz = gz_new - 0.5 * (gm @ y.transpose(-1, -2))
        gy = gy_new - 0.5 * (z.transpose(-1, -2) @ gm)
    # Y_0 = Se / tr(Se)
    g_tr = g_tr - (gy * se).sum((-2, -1), keepdim=True) / (trace * trace)
    return gy / trace + g_tr * (eye_like(se) if eye is None else eye)



def scaled_eps(eps: float, inv_c: torch.Tensor) -> torch.Tensor:
    """eps / c^2 per group, at least sqrt(tiny) = 2^-63 (fp64: 2^-511): ~1e-19 of the group's scale,
    below the resolution of fp32 statistics; smaller, (eps / c^2)^-3/2 in the zca backward overflows
    (a dead channel in a group at 1e30 gives eps / c^2 ~ 1e-65)."""
    return (eps * inv_c * inv_c).clamp_min(torch.finfo(inv_c.dtype).tiny ** 0.5)


def whitening_scaled(cov: torch.Tensor, eps_s: torch.Tensor, method: str, T: int,
                     mask: torch.Tensor | None = None):
    """W' = f(cov' + eps' I) (G, d, d) in units of the scales, and what its backward
    (:func:`whitening_scaled_backward`) needs: (W', small, history).

    ``mask`` (G, d) (bool, :func:`sdecor._layout.last_group_mask`): a smaller last group, whose
    padding in cov is selected away (zero, whatever it held); its W' is that of its own block (eps' I
    and the trace over its channels), zeros in the padding. For zca the padding block of the matrix
    given to eigh is the identity (decoupled from the real block, and positive)."""
    if mask is None:
        eye = eye_like(cov)
    else:
        cov = zero_padding(cov, mask)
        eye = torch.diag_embed(mask.to(cov.dtype))
    se = cov + eps_s[:, None, None] * eye
    if method == "zca":
        evals, evecs = torch.linalg.eigh(se if mask is None else se + torch.diag_embed((~mask).to(se.dtype)))
        w = zca_from_eigh(evals, evecs, eps_s[:, None])
        return zero_padding(w, mask), (evals, evecs), ()
    w, trace, z_last, ys, zs, ms_hist = newton_torch_forward(se, T, None if mask is None else eye)
    return w, (se, trace, z_last), (*ys, *zs, *ms_hist)


def whitening_scaled_backward(grad_w: torch.Tensor, rest, eps_s: torch.Tensor, method: str,
                              T: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """dL/dSe' from dL/dW' for W' of :func:`whitening_scaled` (``rest``: its small and history;
    ``mask`` as there)."""
    grad_w = zero_padding(grad_w, mask)
    if method == "zca":
        evals, evecs = rest
        return zero_padding(zca_backward(grad_w, evals, evecs, eps_s[:, None]), mask)
    se, trace, z_last = rest[:3]
    hist = rest[3:]
    g = newton_torch_backward(grad_w, se, trace, z_last, hist[:T], hist[T:2 * T], hist[2 * T:],
                              None if mask is None else torch.diag_embed(mask.to(se.dtype)))
    return zero_padding(g, mask)
