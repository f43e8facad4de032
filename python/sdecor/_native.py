"""Python side of the native ops in ``sdecor._C``: fake (meta) implementations and checked wrappers.

``torch.ops.sdecor.eigh_small(a)`` is the batched Jacobi eigensolver of ``csrc/jacobi.h``: CPU and CUDA
kernels, one launch for the whole batch on CUDA and no host synchronisation. It reads the lower
triangle of each matrix (like ``torch.linalg.eigh``) and never checks symmetry itself, so that it can
run inside a training step; :func:`eigh_small` is the eager entry point with input validation.

The ops' fake (meta) implementations are C++ Meta kernels registered with the ops themselves
(``csrc/ops.cpp``), so ``torch.compile`` and ``torch.library.opcheck`` trace them however the extension
was loaded.
"""

from __future__ import annotations

import torch

from . import _backend, _ext

EIGH_SMALL_MAX_DIM = 128
EIGH_SMALL_DTYPES = (torch.float32, torch.float64)

# max|A - A^T| <= tol * max|A| per matrix. A covariance built by a GEMM is symmetric only up to the
# summation order of its two triangles: ~sqrt(m) unit roundoffs for m ~ 1e6 samples stays below these.
SYMMETRY_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def check_eigh_small_input(a, name: str = "a", check_symmetric: bool = True) -> None:
    """Raise TypeError/ValueError when ``a`` is not a batch of symmetric d x d matrices the solver takes.

    The symmetry test reads the tensor's values: on CUDA it synchronises with the host.
    """
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"eigh_small: {name} must be a torch.Tensor; got {type(a).__name__}")
    if a.dtype not in EIGH_SMALL_DTYPES:
        raise TypeError(f"eigh_small: {name} must be float32 or float64; got {a.dtype}")
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"eigh_small: {name} must have shape (..., d, d) (a batch of square matrices); "
                         f"got shape {tuple(a.shape)}")
    d = a.shape[-1]
    if not 1 <= d <= EIGH_SMALL_MAX_DIM:
        raise ValueError(f"eigh_small: {name} must hold d x d matrices with 1 <= d <= {EIGH_SMALL_MAX_DIM}; "
                         f"got d = {d} (use torch.linalg.eigh for larger matrices)")
    if a.device.type not in ("cpu", "cuda"):
        raise ValueError(f"eigh_small: {name} must be a CPU or CUDA tensor; got device {a.device}")
    if check_symmetric and a.numel() > 0:
        m = a.detach().reshape(-1, d, d)
        asym = (m - m.mT).abs().amax(dim=(-2, -1))
        scale = m.abs().amax(dim=(-2, -1))
        bad = asym > SYMMETRY_TOL[a.dtype] * scale
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"eigh_small: {name} must be symmetric: matrix {i} of the batch (flattened) has "
                f"max|{name} - {name}^T| = {float(asym[i]):.3e} > {SYMMETRY_TOL[a.dtype]:g} * max|{name}| "
                f"= {SYMMETRY_TOL[a.dtype] * float(scale[i]):.3e}")


def eigh_small(a: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a batch of small symmetric matrices with sdecor's Jacobi solver.

    ``a``: (..., d, d), float32 or float64, 1 <= d <= 128, on CPU or CUDA. Returns
    ``(eigenvalues (..., d) ascending, eigenvectors (..., d, d) as columns)``, like
    ``torch.linalg.eigh``; only the lower triangle of ``a`` is read.

    ``check=True`` (eager use) also rejects non-symmetric input with a ValueError; it reads the values,
    so on CUDA it synchronises with the host, and also checks that the extension can run on ``a``'s
    device. Code inside a training step (after backend selection) passes ``check=False``: then only
    shape, dtype and device type are checked, nothing waits for the GPU, and torch.compile traces the
    call without a graph break.

    No autograd: the outputs are detached (the ZCA backward has its own formula, see docs/design.md, "Semantics").
    Raises ImportError when the extension is not built, and BackendUnavailableError for a CUDA tensor
    when the extension was built without its CUDA part.
    """
    check_eigh_small_input(a, "a", check_symmetric=check)
    if check:
        why = _backend.native_reason(a.device)
        if why is not None:
            if _ext.error() is not None:
                raise ImportError(why)
            raise _backend.BackendUnavailableError(f"eigh_small: {why}")
    return _eigh_small_op()(a.detach())


def _eigh_small_op():
    # Plain attribute access on the fast path, so that torch.compile traces through this wrapper.
    try:
        return torch.ops.sdecor.eigh_small
    except AttributeError:  # the library is registered when sdecor._C is first imported
        _ext.require()
        return torch.ops.sdecor.eigh_small
