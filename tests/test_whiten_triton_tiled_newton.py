"""Triton group whitening in training above d = 32, where the statistics finalize program runs the
Newton-Schulz steps in 32 x 32 tiles of a scratch buffer (in registers up to d = 32): d = 48 and 64,
and d = 96 (padded to 128) with a smaller last group. Output, batch statistics and every gradient
against the reference, and 3 Triton launches per pass as at d <= 32 (counted under the interpreter)."""

import contextlib

import pytest
import torch

import sdecor
from sdecor import reference as ref
from sdecor.cli.bench import launches
from sdecor.ops import whiten as wh
from sdecor.testing import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Two steps run every branch of the tiled iteration (and of its reverse in the backward kernel).
T = 2
EPS = 1e-3
FORWARD = {"group_stats_partial_kernel": 1, "group_stats_finalize_kernel": 1, "whiten_apply_kernel": 1}
BACKWARD = {"whiten_bwd_reduce_kernel": 1, "newton_bwd_kernel": 1, "whiten_bwd_dx_kernel": 1}

# (shape, d, last_group): two groups of 48 (BD = 64); a group of 64 and a last one of 24; a group of
# 96 and a last one of 40 (BD = 128)
CASES = [
    ((3, 96, 5), 48, "even"),
    ((2, 88, 3, 3), 64, "smaller"),
    ((2, 136, 3, 3), 96, "smaller"),
]


def _id(case):
    shape, d, last_group = case
    return "x".join(map(str, shape)) + f"-d{d}-{last_group}"


def _affine(t, x):
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def _grad_out(y):
    return torch.linspace(-1.0, 1.0, y.numel(), device=y.device).reshape(y.shape).sin()


def _reference(x, d, last_group, w, b):
    mean, cov = ref.group_cov(x, d, last_group=last_group)
    wm = ref.group_whitening_matrix(cov, x.shape[1], "newton", EPS, T)
    return ref.apply_whitening(x, mean, wm) * _affine(w, x) + _affine(b, x), mean, wm


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_tiled_newton_in_the_statistics_matches_reference(case, device, poison):
    shape, d, last_group = case
    C = shape[1]
    x = torch.randn(shape, device=device) * 1.5 + 0.5
    weight, bias = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    results = []
    for backend in ("triton", "reference"):
        xx, w, b = (t.clone().requires_grad_() for t in (x, weight, bias))
        if backend == "reference":
            y, mean, wm = _reference(xx, d, last_group, w, b)
            (y * _grad_out(y)).sum().backward()
        else:
            with sdecor.use_backend("triton"), _counting() as forward:
                y, mean, wm = wh.group_whiten_train(xx, d, "newton", EPS, T, w, b, last_group=last_group)
            with _counting() as backward:
                (y * _grad_out(y)).sum().backward()
        results.append((y, mean, wm, xx.grad, w.grad, b.grad))
    for name, got, want in zip(["y", "mean", "wm", "grad x", "grad weight", "grad bias"], *results):
        assert torch.isfinite(got).all(), name                        # every element written (poisoned)
        assert_close(got, want.detach(), msg=f"{name} differs from the reference at d={d}")
    if launches.interpreter_on():
        # the Newton steps run in the finalize program: 3 launches per pass, as at d <= 32
        assert dict(forward) == FORWARD
        assert dict(backward) == BACKWARD


def _counting():
    """The interpreter's launches by kernel (launches.counting_launches); on a GPU, nothing counted."""
    return launches.counting_launches() if launches.interpreter_on() else contextlib.nullcontext({})
