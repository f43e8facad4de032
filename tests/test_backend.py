"""Backend selection: forcing, environment variable, clear errors, never a silent fallback."""

import json
import subprocess
import sys

import pytest
import torch

import sdecor
from sdecor import _backend, _ext

SUPPORTS = {"cuda": ("triton", "torch"), "cpu": ("native", "torch"), "interpret": ("triton",)}


def test_auto_selection_on_cpu_never_picks_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_ext, "error", lambda: "not built")
    assert _backend.select("op", (torch.zeros(1),), SUPPORTS) == "torch"


def test_auto_selection_prefers_native_on_cpu_when_built(monkeypatch):
    monkeypatch.setattr(_ext, "error", lambda: None)
    assert _backend.select("op", (torch.zeros(1),), SUPPORTS) == "native"


def test_use_backend_forces_and_nests(monkeypatch):
    monkeypatch.setattr(_ext, "error", lambda: None)
    x = torch.zeros(1)
    with sdecor.use_backend("torch"):
        assert _backend.select("op", (x,), SUPPORTS) == "torch"
        with sdecor.use_backend("native"):
            assert _backend.select("op", (x,), SUPPORTS) == "native"
        with sdecor.use_backend(None):
            assert _backend.select("op", (x,), SUPPORTS) == "native"
        assert _backend.select("op", (x,), SUPPORTS) == "torch"


def test_environment_variable_forces(monkeypatch):
    monkeypatch.setenv("SDECOR_BACKEND", "torch")
    assert _backend.forced() == "torch"
    monkeypatch.setenv("SDECOR_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SDECOR_BACKEND must be one of torch, triton, native"):
        _backend.forced()
    with sdecor.use_backend("torch"):                       # the context manager wins
        assert _backend.forced() == "torch"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with sdecor.use_backend("cudnn"):
            pass


def test_forced_triton_without_interpreter_explains(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with sdecor.use_backend("triton"):
        with pytest.raises(sdecor.BackendUnavailableError, match="TRITON_INTERPRET=1"):
            _backend.select("op", (torch.zeros(1),), SUPPORTS)


def test_forced_native_without_extension_explains(monkeypatch):
    monkeypatch.setattr(_ext, "error", lambda: "the native extension sdecor._C is not available (x)")
    with sdecor.use_backend("native"):
        with pytest.raises(sdecor.BackendUnavailableError, match="sdecor._C is not available"):
            _backend.select("op", (torch.zeros(1),), SUPPORTS)


def test_forced_backend_without_implementation_for_op():
    with sdecor.use_backend("native"):
        with pytest.raises(sdecor.BackendUnavailableError, match="no implementation for cpu tensors"):
            _backend.select("op", (torch.zeros(1),), {"cpu": ("torch",)})


def test_public_ops_run_on_forced_torch_backend():
    x = torch.randn(4, 8, 3)
    with sdecor.use_backend("torch"):
        y = sdecor.group_whiten(x, 4)
        torch.testing.assert_close(y, sdecor.reference.group_whiten(x, 4))


def test_info_reports_versions_and_backends():
    data = sdecor.info()
    assert data["torch"] == torch.__version__
    assert set(data["backends"]["cpu"]) == {"torch", "triton", "native"}
    assert data["backends"]["cpu"]["torch"] == "available"
    assert "extension" in data


def test_info_command_prints_json():
    out = subprocess.run([sys.executable, "-m", "sdecor", "info", "--json"], capture_output=True,
                         text=True, check=True).stdout
    data = json.loads(out)
    assert data["sdecor"] == sdecor.__version__ and "backends" in data
