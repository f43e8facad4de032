"""The dispatch layer: argument checks run once per public call, every Python-defined op lives in the
``sdecor`` namespace, and ``import sdecor`` imports neither Triton nor the kernels."""

import collections
import functools
import subprocess
import sys

import pytest
import torch

import sdecor
from sdecor import _checks
from sdecor import reference as ref


@pytest.fixture
def check_calls(monkeypatch):
    """Counts of every call of a function of sdecor._checks, per checked argument where the check
    names it (check_affine checks weight and bias with one function, check_float_tensor mean and wm)."""
    calls = collections.Counter()
    for name in _checks.__all__:
        fn = getattr(_checks, name)
        if not callable(fn) or name in ("is_number", "divisors"):
            continue

        def counted(*args, _fn=fn, _name=name, **kwargs):
            names = [a for a in args if isinstance(a, str)]
            calls[":".join([_name] + names)] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(_checks, name, functools.wraps(fn)(counted))
    return calls


def _x():
    return torch.randn(4, 8, 3, 3)


CALLS = {
    "group_cov": lambda: sdecor.group_cov(_x(), 4),
    "whitening_matrix": lambda: sdecor.whitening_matrix(torch.eye(4).expand(2, 4, 4), "zca"),
    "group_whiten": lambda: sdecor.group_whiten(_x(), 4, "newton"),
    "group_whiten_train": lambda: sdecor.ops.group_whiten_train(_x(), 4, weight=torch.ones(8)),
    "group_whiten_eval": lambda: sdecor.ops.group_whiten_eval(_x(), torch.zeros(2, 4), torch.eye(4).repeat(2, 1, 1)),
    "topk_mask": lambda: sdecor.topk_mask(_x(), _x(), ratio=0.5, fill="uniform"),
    "decorrelation_loss": lambda: sdecor.decorrelation_loss(_x(), 4, "corr"),
    "GroupWhitening.train": lambda: sdecor.GroupWhitening(8, 4)(_x()),
    "GroupWhitening.eval": lambda: sdecor.GroupWhitening(8, 4).eval()(_x()),
    "reference.group_whiten": lambda: ref.group_whiten(_x(), 4, "zca"),
    "reference.topk_mask": lambda: ref.topk_mask(_x(), _x(), k=3, reduce=None),
    "reference.decorrelation_loss": lambda: ref.decorrelation_loss(_x(), 4),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_checks_run_once_per_public_call(call, check_calls):
    CALLS[call]()
    assert check_calls, "the call ran no argument check"
    assert max(check_calls.values()) == 1, dict(check_calls)


def test_module_forward_checks_only_its_input(check_calls):
    gw = sdecor.GroupWhitening(8, 4)
    check_calls.clear()                    # the options were checked once, in __init__
    gw(_x())
    # the input, and the layer's own tensors against it (device, floating point: metadata only)
    assert dict(check_calls) == {"check_module_input:GroupWhitening": 1, "check_state:GroupWhitening": 1,
                                 "check_training_samples": 1}


def test_python_ops_share_one_namespace():
    from sdecor.ops import _library, cov, topk, whiten

    ops = [v for mod in (cov, topk, whiten) for v in vars(mod).values()
           if isinstance(v, _library.TritonCustomOp)]
    assert {op.name for op in ops} == {
        "group_cov", "group_cov_backward", "newton", "newton_backward", "whiten_bwd_reduce",
        "whiten_bwd_dx", "whiten_train", "whiten_apply", "topk_mask"}
    assert all(op.qualname == f"sdecor::{op.name}" for op in ops)


def test_import_loads_no_triton():
    code = ("import sys, sdecor; sdecor.GroupWhitening(8, 4); "
            "print(sorted(m for m in ('triton', 'sdecor_kernels') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
