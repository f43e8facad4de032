"""Test setup: the Triton interpreter without a GPU, seeding, and output poisoning.

TRITON_INTERPRET must be set before Triton is first imported, hence at the top of this file.
"""

import os
import random
import subprocess
from pathlib import Path


def _gpu_present() -> bool:
    # Decide without importing torch (importing torch may import triton).
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


HAS_GPU = _gpu_present()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from sdecor.testing import poison as _poison  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    """Where Triton kernels run: the GPU when there is one, else CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def poison(monkeypatch):
    """Make torch.empty / torch.empty_like return NaN-filled tensors inside a test, so that an op
    output left partly unwritten fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    # Dynamo caches its table of torch functions (trace_rules.get_torch_obj_rule_map) the first time
    # it is consulted; built while torch.empty is patched, it lacks the real torch.empty, and a later
    # torch.compile(fullgraph=True) of code that calls it fails (test_compile.py after
    # test_whiten_triton.py). Built here first, it holds the real functions.
    from torch._dynamo import trace_rules

    trace_rules.get_torch_obj_rule_map()

    def empty(*args, **kwargs):
        return _poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(real_empty_like(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    return _poison


# The instruction-set paths of the CPU microkernels (csrc/cpu/), best first.
ISAS = ("avx512", "avx2", "portable")


def runnable_isas() -> list[str]:
    """The paths this CPU and build run (none without the extension)."""
    from sdecor import _ext

    return _ext.build_info().get("cpu_isas", "").split(",") if _ext.available() else []


@pytest.fixture(params=ISAS)
def isa(request):
    """Every test taking this fixture runs once per path, that path forced for its duration."""
    name = request.param
    if name not in runnable_isas():
        pytest.skip(f"this CPU (or build) cannot run the {name} path; it runs {runnable_isas()}")
    torch.ops.sdecor.set_cpu_isa(name)
    try:
        assert torch.ops.sdecor.cpu_isa() == name
        yield name
    finally:
        torch.ops.sdecor.set_cpu_isa("auto")


def train_path(backend, x, d, method, weight, bias):
    """(y, mean, wm, grad x, grad weight, grad bias) of group_whiten_train on ``backend``."""
    import sdecor
    from sdecor.ops import whiten

    C = x.shape[1]
    last = "even" if C % d == 0 else "smaller"
    xx, ww, bb = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    with sdecor.use_backend(backend):
        y, mean, wm = whiten.group_whiten_train(xx, d, method, 1e-5, 5, ww, bb, last_group=last)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
        (y * gy).sum().backward()
    return y, mean, wm, xx.grad, ww.grad, bb.grad


ROOT = Path(__file__).resolve().parents[1]


def source_modules() -> set[str]:
    """Every module of the source tree's packages as a wheel names it: sdecor/... (from python/) and
    sdecor_kernels/..."""
    found = set()
    for top, base in (("sdecor", ROOT / "python"), ("sdecor_kernels", ROOT)):
        for path in (base / top).rglob("*.py"):
            if "__pycache__" not in path.parts:
                found.add(path.relative_to(base).as_posix())
    return found


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def fake_world_of_two():
    """torch.distributed initialised in this process on torch's fake backend, world size 2 (the
    collectives communicate nothing): real ProcessGroup objects for the process_group arguments, and
    the synchronised paths of layers taken without worker processes. Yields the default group."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def pytest_collection_modifyitems(config, items):
    """Mark as ``gpu`` every test that runs on the GPU when there is one: those taking the ``device``
    fixture and those parametrized with a CUDA device, beside the ones marked by hand. ``pytest -m
    gpu`` (``make gpu-check``) then selects every test a GPU machine has to confirm."""
    for item in items:
        params = getattr(item, "callspec", None)
        on_cuda = params is not None and any(
            (isinstance(v, str) and v == "cuda") or (isinstance(v, torch.device) and v.type == "cuda")
            for v in params.params.values())
        if "device" in getattr(item, "fixturenames", ()) or on_cuda:
            item.add_marker(pytest.mark.gpu)


def _static_compile_module(items):
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "start_early") and hasattr(module, "stop"):
            return module
    return None


def pytest_collection_finish(session):
    """test_static_compile.py compiles every Triton kernel for sm_80 / sm_90 in subprocesses, minutes
    of CPU: when its tests are selected, the compiles start now, beside the rest of the suite (see
    start_early there), and its tests only collect the results."""
    if session.config.option.collectonly:
        return
    module = _static_compile_module(session.items)
    if module is not None:
        alone = all(getattr(item, "module", None) is module for item in session.items)
        module.start_early(only_this_module=alone)


def pytest_sessionfinish(session):
    module = _static_compile_module(getattr(session, "items", ()))
    if module is not None:
        module.stop()
