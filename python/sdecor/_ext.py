"""Lazy access to the optional native extension ``sdecor._C``.

The extension registers the ``torch.ops.sdecor`` operator library. It is imported on first use, never
at ``import sdecor`` time, so a broken or missing build only affects the ``native`` backend.
"""

from __future__ import annotations

import importlib
import threading

import torch

_lock = threading.Lock()
_state: dict = {}

_HOW_TO_BUILD = (
    "build it with `CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .` from the "
    "source tree (a C++ compiler is required; USE_CPP=0 skips it on purpose)"
)


def load():
    """Return the imported ``sdecor._C`` module, or None when it is not available."""
    if "module" in _state:                                          # settled: no lock (torch.compile traces this)
        return _state["module"]
    with _lock:
        if "module" not in _state:
            try:
                _state["module"] = importlib.import_module("sdecor._C")
                _state["error"] = None
            except ImportError as exc:  # not built, or built against another torch
                _state["module"] = None
                _state["error"] = f"the native extension sdecor._C is not available ({exc}); {_HOW_TO_BUILD}"
        return _state["module"]


@torch.compiler.assume_constant_result
def error() -> str | None:
    """Why the extension is unavailable (None when it loaded); a constant of a torch.compile trace
    (run outside the graph, the import included when it has not happened yet)."""
    load()
    return _state["error"]


def available() -> bool:
    return load() is not None


def require():
    """Return the extension module or raise an ImportError that says how to build it."""
    mod = load()
    if mod is None:
        raise ImportError(_state["error"])
    return mod


def build_info() -> dict:
    """How the extension was built: {'cuda': version or None, 'archs': [...], ...}; {} when absent."""
    if not available():
        return {}
    import torch

    raw = torch.ops.sdecor.build_info()
    info: dict = {}
    for item in raw.split(";"):
        if "=" in item:
            key, value = item.split("=", 1)
            info[key.strip()] = value.strip()
    return info


def has_cuda() -> bool:
    """True when the extension holds CUDA kernels."""
    return build_info().get("cuda", "none") not in ("", "none")
