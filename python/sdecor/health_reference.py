"""Float64 reference of the whitening health report: the definition of every field of
:func:`sdecor.whitening_report`, one group at a time, with ``torch.linalg.eigh``.

Notation, for a whitening layer with input x of shape (N, C, *S), m = N * prod(S) samples per channel,
groups of d = ``num_channels`` contiguous channels (with ``last_group="smaller"`` the last group holds
the r = C - (G - 1) d remaining channels and is a group of its own, of size r), and each group g of
size d_g:

- Sigma_g: the biased covariance of the group's channels over the m samples, in float64,
- S_g = Sigma_g + eps I (d_g x d_g),
- W_g: the whitening matrix the layer uses in training (given, or by default the design contract's:
  :func:`sdecor.reference.whitening_matrix` of :func:`sdecor.reference.group_cov` in the statistics
  dtype of x, float32 for float16 / bfloat16 / float32 input and float64 for float64 input),
- R_g: the layer's running whitening matrix (its block of ``running_wm``),

and the fields

- ``condition`` = lambda_max(S_g) / lambda_min(S_g) (eigenvalues clamped at eps, as ZCA does),
- ``whitening_error`` = ||W_g S_g W_g^T - I||_F / sqrt(d_g),
- ``running_error`` = the same with R_g (a layer without running statistics whitens with batch
  statistics in eval mode too: its running_error is its whitening_error),
- ``newton_residual`` = ||W_g - S_g^(-1/2)||_F / ||S_g^(-1/2)||_F (0 for ``method="zca"``),
- ``effective_rank`` = exp(-sum_i p_i log p_i), p_i = lambda_i(Sigma_g) / sum_j lambda_j(Sigma_g)
  (eigenvalues clamped at 0; 0 for a group without variance, Sigma_g = 0),
- ``eps_share`` = the fraction of the eigenvalues of Sigma_g below eps,
- ``t_needed`` = the smallest T in 1..100 for which the Newton-Schulz matrix of S_g
  (:func:`sdecor.reference.newton_schulz`, in float64) has whitening error < tol; -1 if none.

Everything here is written for clarity, not speed: a Python loop over the groups and, for
``t_needed``, the iteration rerun from the start for every T. The fast path
(:func:`sdecor.whitening_report`) computes the same fields batched and is tested against these.
"""

from __future__ import annotations

import math

import torch

from . import reference

__all__ = [
    "FIELDS",
    "MAX_T",
    "group_covariances",
    "group_health",
    "group_sizes",
    "inverse_sqrt",
    "layer_health",
    "layer_matrices",
    "t_needed",
    "whitening_error",
]

# The per-group fields of a report record, in order.
FIELDS = ("condition", "whitening_error", "running_error", "newton_residual", "effective_rank",
          "eps_share", "t_needed")

# The largest Newton-Schulz step count that t_needed tries (sdecor's limit on T).
MAX_T = 100


def group_sizes(num_features: int, num_channels: int, last_group: str = "even") -> tuple[int, ...]:
    """The size of every group of ``num_features`` channels: G - 1 groups of ``num_channels`` and a
    last group of the r = C - (G - 1) d remaining ones (r = d when d divides C)."""
    if last_group == "even" and num_features % num_channels:
        raise ValueError(f"num_channels={num_channels} does not divide num_features={num_features} "
                         f"and last_group is 'even'")
    G = -(-num_features // num_channels)
    return (num_channels,) * (G - 1) + (num_features - (G - 1) * num_channels,)


def group_covariances(x: torch.Tensor, num_channels: int, last_group: str = "even") -> list[torch.Tensor]:
    """Sigma_g (d_g x d_g, float64) of every group of x (N, C, *S): Xc Xc^T / m with Xc the group's
    channels (one row per channel, one column per sample) minus their means."""
    x64 = x.detach().to(torch.float64)
    C = x64.shape[1]
    samples = x64.transpose(0, 1).reshape(C, -1)                    # (C, m)
    m = samples.shape[1]
    out, start = [], 0
    for k in group_sizes(C, num_channels, last_group):
        xg = samples[start:start + k]
        xc = xg - xg.mean(dim=1, keepdim=True)
        out.append(xc @ xc.T / m)
        start += k
    return out


def layer_matrices(x: torch.Tensor, num_channels: int, method: str = "newton", eps: float = 1e-5,
                   T: int = 5, last_group: str = "even") -> list[torch.Tensor]:
    """W_g (d_g x d_g) of the design contract for a layer's training forward on x: the statistics of
    :func:`sdecor.reference.group_cov` and :func:`sdecor.reference.whitening_matrix`, in the
    statistics dtype of x, each group on its own block."""
    _, cov = reference.group_cov(x.detach(), num_channels, last_group)
    sizes = group_sizes(x.shape[1], num_channels, last_group)
    return [reference.whitening_matrix(cov[g, :k, :k], method, eps, T) for g, k in enumerate(sizes)]


def whitening_error(w: torch.Tensor, s: torch.Tensor) -> float:
    """||W S W^T - I||_F / sqrt(d) in float64."""
    w = w.to(torch.float64)
    d = s.shape[-1]
    e = w @ s @ w.T - torch.eye(d, dtype=torch.float64, device=s.device)
    return (torch.linalg.matrix_norm(e) / math.sqrt(d)).item()


def inverse_sqrt(s: torch.Tensor, eps: float) -> torch.Tensor:
    """S^(-1/2) = U diag(l^(-1/2)) U^T from eigh (eigenvalues clamped at eps)."""
    evals, evecs = torch.linalg.eigh(s)
    return evecs @ torch.diag(evals.clamp_min(eps).rsqrt()) @ evecs.T


def t_needed(s: torch.Tensor, tol: float, max_T: int = MAX_T) -> int:
    """The smallest T <= max_T at which the Newton-Schulz matrix of S (float64) whitens S to
    whitening error < tol; -1 if none does."""
    for T in range(1, max_T + 1):
        if whitening_error(reference.newton_schulz(s, T), s) < tol:
            return T
    return -1


def group_health(sigma: torch.Tensor, w: torch.Tensor, running: torch.Tensor | None, *, method: str,
                 eps: float, tol: float) -> dict[str, float]:
    """The fields of one group from its covariance Sigma (float64), the layer's training matrix W and
    its running matrix R (None: the layer has no running statistics)."""
    d = sigma.shape[-1]
    s = sigma + eps * torch.eye(d, dtype=torch.float64, device=sigma.device)
    s_evals = torch.linalg.eigvalsh(s).clamp_min(eps)
    sigma_evals = torch.linalg.eigvalsh(sigma)
    error = whitening_error(w, s)
    if method == "zca":
        residual = 0.0
    else:
        target = inverse_sqrt(s, eps)
        residual = (torch.linalg.matrix_norm(w.to(torch.float64) - target)
                    / torch.linalg.matrix_norm(target)).item()
    lam = sigma_evals.clamp_min(0.0)
    total = lam.sum()
    if total > 0:
        p = lam[lam > 0] / total
        rank = math.exp(-(p * p.log()).sum().item())
    else:
        rank = 0.0
    return {
        "condition": (s_evals.max() / s_evals.min()).item(),
        "whitening_error": error,
        "running_error": error if running is None else whitening_error(running, s),
        "newton_residual": residual,
        "effective_rank": rank,
        "eps_share": (sigma_evals < eps).sum().item() / d,
        "t_needed": float(t_needed(s, tol)),
    }


def layer_health(x: torch.Tensor, num_channels: int, *, method: str = "newton", eps: float = 1e-5,
                 T: int = 5, last_group: str = "even", w: torch.Tensor | None = None,
                 running_wm: torch.Tensor | None = None, tol: float = 1e-3) -> dict:
    """Every field of a layer's record for its input x: ``num_groups``, ``group_sizes`` and the
    per-group fields (float64 tensors of shape (G,), :data:`FIELDS`).

    ``w``: the layer's training matrices in its layout (G, d, d), a smaller last group in the top-left
    block of its entry; None: :func:`layer_matrices`. ``running_wm``: its running matrices, same
    layout; None for a layer without running statistics.
    """
    sizes = group_sizes(x.shape[1], num_channels, last_group)
    sigmas = group_covariances(x, num_channels, last_group)
    if w is None:
        ws = layer_matrices(x, num_channels, method, eps, T, last_group)
    else:
        ws = [w[g, :k, :k] for g, k in enumerate(sizes)]
    rows = []
    for g, k in enumerate(sizes):
        running = None if running_wm is None else running_wm[g, :k, :k]
        rows.append(group_health(sigmas[g], ws[g], running, method=method, eps=eps, tol=tol))
    out = {"num_groups": len(sizes), "group_sizes": sizes}
    for field in FIELDS:
        out[field] = torch.tensor([row[field] for row in rows], dtype=torch.float64)
    return out
