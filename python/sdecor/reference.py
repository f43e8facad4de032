"""Pure-PyTorch reference implementations: the definition of "correct" for every backend.

Each function follows the equations in the design contract line by line; read it next to them.
Notation: x has shape (N, C, *S) with 0 to 3 trailing dims, m = N * prod(S) samples per channel,
d = ``num_channels`` channels per group, G = C / d groups, group g = channels [g*d, (g+1)*d).

These functions run anywhere (CPU or GPU, float32 or float64; float16/bfloat16 inputs are computed
in float32). They are the ``torch`` backend of :mod:`sdecor` and the oracle of the tests.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "group_cov",
    "whitening_matrix",
    "group_whiten",
    "topk_mask",
    "decorrelation_loss",
    "FILLS",
    "METHODS",
    "DECOR_KINDS",
]

METHODS = ("zca", "newton")
FILLS = ("zero", "constant", "mean", "uniform", "baseline")
DECOR_KINDS = ("decov", "corr")
MAX_NEWTON_STEPS = 100


# ---------------------------------------------------------------------------------------------------
# argument checks shared by every backend


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def check_input(x, name: str = "x", min_dim: int = 2, max_dim: int = 5) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not (min_dim <= x.dim() <= max_dim):
        raise ValueError(
            f"{name} must have shape (N, C, *S) with 0 to {max_dim - 2} trailing dims "
            f"({min_dim} to {max_dim} dims); got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")


def check_groups(num_channels: int, C: int) -> int:
    """Validate the group size d against C channels and return G = C // d."""
    if isinstance(num_channels, bool) or not isinstance(num_channels, int):
        raise TypeError(f"num_channels must be an int; got {type(num_channels).__name__}")
    if num_channels < 1 or C % num_channels != 0:
        raise ValueError(
            f"num_channels (group size d={num_channels}) must divide the channel count C={C}; "
            f"valid group sizes for C={C} are {divisors(C)}")
    return C // num_channels


def samples_per_channel(x: torch.Tensor) -> int:
    """m = N * prod(S)."""
    return x.shape[0] * math.prod(x.shape[2:])


def check_affine(t, name: str, x: torch.Tensor) -> None:
    """An optional per-channel affine parameter (weight or bias): None or a float tensor (C,) on x's device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None; got {type(t).__name__}")
    C = x.shape[1]
    if t.shape != (C,):
        raise ValueError(f"{name} must have shape (C,) = ({C},); got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}; got {t.device}")


def check_training_samples(x: torch.Tensor) -> int:
    m = samples_per_channel(x)
    if m < 2:
        raise ValueError(
            f"training statistics need more than 1 value per channel (m = N * prod(S) >= 2); "
            f"got x of shape {tuple(x.shape)} (m={m})")
    return m


def check_whitening_args(method: str, eps: float, T: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float; got {eps!r}")
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_NEWTON_STEPS:
        raise ValueError(f"T (Newton-Schulz steps) must be an int in [1, {MAX_NEWTON_STEPS}]; got {T!r}")


def check_cov(cov) -> None:
    if not isinstance(cov, torch.Tensor):
        raise TypeError(f"cov must be a torch.Tensor; got {type(cov).__name__}")
    if cov.dim() < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"cov must have shape (..., d, d); got {tuple(cov.shape)}")
    if not cov.is_floating_point():
        raise TypeError(f"cov must be a floating-point tensor; got dtype {cov.dtype}")


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and output dtype of statistics: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grouped(x: torch.Tensor, num_channels: int) -> torch.Tensor:
    """View x (N, C, *S) as (N, G, d, L) with L = prod(S) (copies only for non-contiguous x)."""
    N, C = x.shape[:2]
    return x.reshape(N, C // num_channels, num_channels, math.prod(x.shape[2:]))


def like_format(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return y (contiguous, shaped like x) in x's memory format (channels_last where x is)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return y.contiguous(memory_format=torch.channels_last_3d)
    return y


# ---------------------------------------------------------------------------------------------------
# group-wise covariance


def group_cov(x: torch.Tensor, num_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (G, d) and biased covariance (G, d, d) = Xc Xc^T / m of every channel group.

    Accumulates in float32 (float64 for float64 input); the outputs have that dtype.
    """
    check_input(x)
    check_groups(num_channels, x.shape[1])
    m = check_training_samples(x)
    xg = grouped(x, num_channels).to(stats_dtype(x.dtype))       # (N, G, d, L)
    mean = xg.mean(dim=(0, 3))                                    # (G, d)
    xc = xg - mean[None, :, :, None]                              # X - mean
    cov = torch.matmul(xc, xc.transpose(-1, -2)).sum(0) / m       # Xc Xc^T / m: (G, d, d)
    return mean, cov


# ---------------------------------------------------------------------------------------------------
# whitening matrices


def sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.transpose(-1, -2))


def eye_like(a: torch.Tensor) -> torch.Tensor:
    """Identity matrices broadcastable against a (..., d, d)."""
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)


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


class ZCAWhitening(torch.autograd.Function):
    """W = Se^-1/2 through an eigendecomposition, with the stable backward above.

    ``eigh`` is the eigensolver (ascending eigenvalues, eigenvectors as columns); the reference uses
    torch.linalg.eigh, the native backend its batched Jacobi solver.
    """

    @staticmethod
    def forward(ctx, se: torch.Tensor, eps: float, eigh=None):
        evals, evecs = (eigh or torch.linalg.eigh)(se)
        ctx.eps = eps
        ctx.save_for_backward(evals, evecs)
        return zca_from_eigh(evals, evecs, eps)

    @staticmethod
    def backward(ctx, grad_w):
        evals, evecs = ctx.saved_tensors
        return zca_backward(grad_w, evals, evecs, ctx.eps), None, None


def newton_schulz(se: torch.Tensor, T: int) -> torch.Tensor:
    """IterNorm's W = P_T / sqrt(tr Se), P_{k+1} = 1.5 P_k - 0.5 P_k^3 Sn, Sn = Se / tr(Se), P_0 = I.

    Computed as the coupled iteration Y_0 = Sn, Z_0 = I, M = (3I - Z_k Y_k) / 2, Y_{k+1} = Y_k M,
    Z_{k+1} = M Z_k, for which Z_k = P_k and Y_k = P_k Sn in exact arithmetic. The uncoupled form
    loses the commutation of P_k and Sn to rounding and diverges after ~25 steps; this one does not.
    Differentiable by autograd (the exact derivative of the recurrence).
    """
    trace = se.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]   # tr(Se)
    eye = eye_like(se)
    y = se / trace                                                   # Y_0 = Sn
    z = eye.expand_as(se)                                            # Z_0 = I
    for _ in range(T):
        m = 0.5 * (3.0 * eye - z @ y)
        y = y @ m
        z = m @ z
    return z / trace.sqrt()


def whitening_matrix(cov: torch.Tensor, method: str = "newton", eps: float = 1e-5, T: int = 5,
                     *, eigh=None) -> torch.Tensor:
    """Whitening matrices W (..., d, d) of Se = cov + eps I.

    "zca": W = Se^-1/2 exactly (U diag(l^-1/2) U^T, eigenvalues clamped at eps).
    "newton": IterNorm's T Newton-Schulz steps (see :func:`newton_schulz`).
    """
    check_cov(cov)
    check_whitening_args(method, eps, T)
    se = cov.to(stats_dtype(cov.dtype)) + eps * eye_like(cov).to(stats_dtype(cov.dtype))
    if method == "zca":
        return ZCAWhitening.apply(se, float(eps), eigh)
    return newton_schulz(se, T)


# ---------------------------------------------------------------------------------------------------
# group whitening


def group_whiten(x: torch.Tensor, num_channels: int, method: str = "newton", eps: float = 1e-5,
                 T: int = 5) -> torch.Tensor:
    """y_g = W_g (x_g - mean_g) with batch statistics; same shape, dtype and memory format as x.

    Gradients flow through the mean, the covariance and W.
    """
    check_input(x)
    check_groups(num_channels, x.shape[1])
    check_whitening_args(method, eps, T)
    mean, cov = group_cov(x, num_channels)
    w = whitening_matrix(cov, method, eps, T)                         # (G, d, d)
    return apply_whitening(x, mean, w)


def apply_whitening(x: torch.Tensor, mean: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y_g = W_g (x_g - mean_g) for given statistics mean (G, d) and W (G, d, d)."""
    G, d = mean.shape
    xg = grouped(x, d).to(mean.dtype)                                 # (N, G, d, L)
    y = torch.matmul(w, xg - mean[None, :, :, None])                  # (N, G, d, L)
    return like_format(y.reshape(x.shape).to(x.dtype), x)


# ---------------------------------------------------------------------------------------------------
# top-k saliency masking


def resolve_k(D: int, ratio, k) -> int:
    """k = floor(ratio * D) or k itself; exactly one of them, within [0, D]."""
    if (ratio is None) == (k is None):
        raise ValueError(f"give exactly one of ratio and k; got ratio={ratio!r}, k={k!r}")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be a number in [0, 1]; got {ratio!r}")
        return int(math.floor(ratio * D))
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= D:
        raise ValueError(f"k must be an int in [0, D={D}] (D = scores per sample); got {k!r}")
    return k


def check_mask_args(x, saliency, reduce, fill, value, baseline) -> None:
    check_input(x, "x", min_dim=2, max_dim=5)
    if not isinstance(saliency, torch.Tensor):
        raise TypeError(f"saliency must be a torch.Tensor; got {type(saliency).__name__}")
    if saliency.shape != x.shape:
        raise ValueError(f"saliency must have the shape of x {tuple(x.shape)}; got {tuple(saliency.shape)}")
    if saliency.device != x.device:
        raise ValueError(f"saliency must be on x's device {x.device}; got {saliency.device}")
    if reduce not in ("mean", None):
        raise ValueError(f"reduce must be 'mean' or None; got {reduce!r}")
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}; got {fill!r}")
    if fill == "constant" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"value must be a number for fill='constant'; got {value!r}")
    if fill == "baseline":
        if not isinstance(baseline, torch.Tensor) or baseline.shape != x.shape:
            got = tuple(baseline.shape) if isinstance(baseline, torch.Tensor) else type(baseline).__name__
            raise ValueError(f"fill='baseline' needs baseline, a tensor shaped like x {tuple(x.shape)}; got {got}")
        if baseline.device != x.device:
            raise ValueError(f"baseline must be on x's device {x.device}; got {baseline.device}")
    elif baseline is not None:
        raise ValueError(f"baseline is only used with fill='baseline'; got fill={fill!r}")


def mask_scores(saliency: torch.Tensor, reduce, abs: bool) -> torch.Tensor:
    """Scores per sample, flattened: (N, prod(S)) for reduce="mean", (N, C*prod(S)) for None."""
    score = saliency.abs() if abs else saliency
    if reduce == "mean":
        # Mean over channels, pinned to one rounding on every device: accumulate channel by channel
        # in fp32 (fp64 for fp64), divide by C once, round to the saliency's dtype.
        acc = score[:, 0].to(stats_dtype(score.dtype))
        for c in range(1, score.shape[1]):
            acc = acc + score[:, c]
        score = (acc / score.shape[1]).to(score.dtype)
    return score.reshape(score.shape[0], -1)


def rank_order(score: torch.Tensor, largest: bool) -> torch.Tensor:
    """Per-row positions in selection order: the k first are the selected set.

    Order: by value (ascending, or descending for largest=True), NaN ranked as the largest value,
    equal values by lower flat index. Two stable sorts: by value, then by NaN-ness.
    """
    nan = torch.isnan(score)
    value = torch.where(nan, torch.zeros_like(score), score)
    order = torch.sort(-value if largest else value, dim=1, stable=True).indices
    nan_key = nan.gather(1, order).to(torch.int8)
    regroup = torch.sort(-nan_key if largest else nan_key, dim=1, stable=True).indices
    return order.gather(1, regroup)


def fill_values(x: torch.Tensor, fill: str, value: float, baseline, generator) -> torch.Tensor:
    """What the selected positions become, as a tensor broadcastable to x."""
    spatial = tuple(range(2, x.dim()))
    if fill == "zero":
        return torch.zeros((), dtype=x.dtype, device=x.device)
    if fill == "constant":
        return torch.full((), value, dtype=x.dtype, device=x.device)
    if fill == "baseline":
        return baseline.to(x.dtype)
    if fill == "mean":                                               # per sample, per channel
        return x.mean(dim=spatial, keepdim=True) if spatial else x
    # "uniform": i.i.d. U[min, max] with per-sample, per-channel min and max of x over S
    lo = x.amin(dim=spatial, keepdim=True) if spatial else x
    hi = x.amax(dim=spatial, keepdim=True) if spatial else x
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=stats_dtype(x.dtype))
    return (lo + (hi - lo) * u).to(x.dtype)


def topk_mask(x: torch.Tensor, saliency: torch.Tensor, *, ratio=None, k=None, largest: bool = False,
              reduce="mean", abs: bool = True, fill: str = "zero", value: float = 0.0,
              baseline=None, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the k least (largest=True: most) salient positions of every sample.

    Returns (x_masked, mask); mask is bool, True = replaced, shaped (N, *S) for reduce="mean" (one
    mask shared by all channels) or like x for reduce=None.
    """
    check_mask_args(x, saliency, reduce, fill, value, baseline)
    score = mask_scores(saliency, reduce, abs)                       # (N, D)
    k = resolve_k(score.shape[1], ratio, k)
    order = rank_order(score, largest)
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    mask = mask.reshape((x.shape[0],) + tuple(x.shape[2:]) if reduce == "mean" else x.shape)
    where = mask.unsqueeze(1) if reduce == "mean" else mask
    x_masked = torch.where(where, fill_values(x, fill, value, baseline, generator), x)
    return x_masked, mask


# ---------------------------------------------------------------------------------------------------
# decorrelation loss

CORR_VAR_FLOOR = 1e-12


def decorrelation_loss(x: torch.Tensor, num_channels: int, kind: str = "decov") -> torch.Tensor:
    """Mean over groups of a decorrelation penalty on the group covariance.

    "decov": 0.5 (||cov||_F^2 - ||diag cov||^2).
    "corr":  ||R - I||_F^2 / (d (d - 1)), R the correlation matrix (variances floored at 1e-12).
    """
    check_decor_args(num_channels, kind)
    _, cov = group_cov(x, num_channels)
    return decorrelation_from_cov(cov, kind)


def check_decor_args(num_channels, kind: str) -> None:
    if kind not in DECOR_KINDS:
        raise ValueError(f"kind must be one of {DECOR_KINDS}; got {kind!r}")
    if kind == "corr" and isinstance(num_channels, int) and num_channels < 2:
        raise ValueError(f"kind='corr' needs groups of at least 2 channels; got num_channels={num_channels}")


def decorrelation_from_cov(cov: torch.Tensor, kind: str) -> torch.Tensor:
    diag = cov.diagonal(dim1=-2, dim2=-1)                            # (G, d)
    if kind == "decov":
        # 0.5 (||cov||_F^2 - ||diag cov||^2) summed as the off-diagonal squares (no cancellation)
        off = cov - torch.diag_embed(diag)
        per_group = 0.5 * off.square().sum((-2, -1))
    else:
        d = cov.shape[-1]
        std = diag.clamp_min(CORR_VAR_FLOOR).sqrt()
        corr = cov / (std.unsqueeze(-1) * std.unsqueeze(-2))
        per_group = (corr - eye_like(corr)).square().sum((-2, -1)) / (d * (d - 1))
    return per_group.mean()
