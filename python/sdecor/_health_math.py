"""The fields of a whitening health report, batched over the groups of one size (float64), and the
context that leaves a model exactly as it was around the report's forward (:mod:`sdecor.health`)."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .health_reference import MAX_T

__all__ = ["model_kept", "newton_step_errors", "part_fields", "parts", "t_needed", "whitening_error"]


# ---------------------------------------------------------------------------------------------------
# the model left as it was


@contextlib.contextmanager
def model_kept(model: nn.Module):
    """Restore on exit every module's training flag, parameter and buffer entries (the same tensor
    objects, with their values of entry: copied back only where they changed, so that an unchanged
    tensor keeps its version counter) and the CPU and CUDA random states."""
    modules = list(model.modules())
    flags = [(m, m.training) for m in modules]
    entries = [(table, dict(table)) for m in modules for table in (m._parameters, m._buffers)]
    saved, seen = [], set()
    for _, table in entries:
        for t in table.values():
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                saved.append((t, t.detach().clone()))
    cpu_rng = torch.get_rng_state()
    cuda_rng = (torch.cuda.get_rng_state_all()
                if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    try:
        yield
    finally:
        for table, items in entries:
            if list(table.keys()) != list(items) or any(table[k] is not v for k, v in items.items()):
                table.clear()
                table.update(items)
        with torch.no_grad():
            for t, value in saved:
                if not torch.equal(t, value):
                    t.copy_(value)
        for m, flag in flags:
            m.training = flag
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


# ---------------------------------------------------------------------------------------------------
# the fields, batched over groups


def parts(layer: nn.Module) -> list[tuple[slice, int]]:
    """(groups, size) of the layer's parts: the groups of size d, and a smaller last group alone."""
    G, d, C = layer.num_groups, layer.num_channels, layer.num_features
    r = C - (G - 1) * d
    if r == d:
        return [(slice(0, G), d)]
    return [(slice(0, G - 1), d), (slice(G - 1, G), r)]


def whitening_error(w: torch.Tensor, s: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """||W S W^T - I||_F / sqrt(d) per matrix of a batch (float64)."""
    return torch.linalg.matrix_norm(w @ s @ w.mT - eye) / math.sqrt(s.shape[-1])


def part_fields(sigma, w, running, method: str, eps: float) -> dict[str, torch.Tensor]:
    """Every field but t_needed for a batch of groups of one size: sigma, w, running (B, k, k);
    running None without running statistics. Also returns S (for t_needed)."""
    k = sigma.shape[-1]
    eye = torch.eye(k, dtype=torch.float64, device=sigma.device)
    s = sigma + eps * eye
    evals, evecs = torch.linalg.eigh(sigma)                          # Sigma = U diag(l) U^T
    lam = evals.clamp_min(0.0)
    s_evals = lam + eps                                              # S = U diag(l + eps) U^T
    w64 = w.to(torch.float64)
    error = whitening_error(w64, s, eye)
    if method == "zca":
        residual = torch.zeros_like(error)
    else:
        target = (evecs * s_evals.rsqrt().unsqueeze(-2)) @ evecs.mT  # S^(-1/2)
        residual = torch.linalg.matrix_norm(w64 - target) / torch.linalg.matrix_norm(target)
    total = lam.sum(-1)
    p = lam / torch.where(total > 0, total, 1.0).unsqueeze(-1)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    return {
        "s": s,
        "condition": s_evals[..., -1] / s_evals[..., 0],
        "whitening_error": error,
        "running_error": error if running is None else whitening_error(running.to(torch.float64), s, eye),
        "newton_residual": residual,
        "effective_rank": torch.where(total > 0, entropy.exp(), 0.0),
        "eps_share": (evals < eps).sum(-1).to(torch.float64) / k,
    }


def newton_step_errors(s: torch.Tensor):
    """The whitening error after each Newton-Schulz step (1, 2, ...) of every S of the batch s
    (B, k, k, float64): one coupled iteration for the whole batch, with W_T S W_T^T = Z_T Sn Z_T^T."""
    k = s.shape[-1]
    eye = torch.eye(k, dtype=torch.float64, device=s.device)
    trace = s.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    sn = s / trace                                                   # Y_0 = Sn
    y, z = sn, eye.expand(s.shape).clone()                          # Z_0 = I (not a stride-0 batch in matmul)
    while True:
        m = 0.5 * (3.0 * eye - z @ y)
        y = y @ m
        z = m @ z
        yield torch.linalg.matrix_norm(z @ sn @ z.mT - eye) / math.sqrt(k)


def t_needed(s: torch.Tensor, tol: float) -> torch.Tensor:
    """The smallest T <= MAX_T at which Newton-Schulz whitens each S of the batch s (B, k, k, float64)
    to whitening error < tol, -1 where none does (:func:`newton_step_errors`, stopped once every
    matrix has reached tol)."""
    needed = torch.full(s.shape[:1], -1.0, dtype=torch.float64, device=s.device)
    for step, err in zip(range(1, MAX_T + 1), newton_step_errors(s)):
        needed = torch.where((needed < 0) & (err < tol), float(step), needed)
        if bool((needed >= 0).all()):
            break
    return needed
