"""Tolerances per dtype, in one place, for sdecor's tests and benchmark correctness checks."""

from __future__ import annotations

import torch

# Comparison of a fast path against the reference computed from the same inputs. fp32 leaves room for
# a different summation order over m (up to ~1e5 terms) and for T Newton-Schulz steps; half
# precisions are bounded by their unit roundoff (fp16 ~1e-3, bf16 ~8e-3) times a few operations.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}


def tol(dtype: torch.dtype) -> dict:
    """The (atol, rtol) for comparing results of ``dtype`` against the reference."""
    return dict(TOLERANCES[dtype])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 msg: str | None = None) -> None:
    """torch.testing.assert_close with the tolerance of ``dtype`` (default: actual's dtype)."""
    t = tol(dtype or actual.dtype)
    torch.testing.assert_close(actual, expected.to(actual.dtype), **t, msg=msg)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a freshly allocated output with NaN (True for bool) so that unwritten elements show."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(-1)
