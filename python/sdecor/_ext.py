"""Lazy access to the optional native extension ``sdecor._C``.

The extension registers the ``torch.ops.sdecor`` operator library. It is imported on first use, never
at ``import sdecor`` time, so a broken or missing build only affects the ``native`` backend.
"""

from __future__ import annotations

import importlib
import threading

_lock = threading.Lock()
_state: dict = {}
# Python registrations on the extension's ops (e.g. their autograd), run once when it is imported
_hooks: list = []

_HOW_TO_BUILD = (
    "build it with `CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .` from the "
    "source tree (a C++ compiler is required; USE_CPP=0 skips it on purpose)"
)


def load():
    """Return the imported ``sdecor._C`` module, or None when it is not available."""
    if "module" in _state:  # decided already: no lock, so that torch.compile traces the call
        return _state["module"]
    with _lock:
        if "module" not in _state:
            try:
                module = importlib.import_module("sdecor._C")
            except ImportError as exc:  # not built, or built against another torch
                _state["error"] = f"the native extension sdecor._C is not available ({exc}); {_HOW_TO_BUILD}"
                _state["module"] = None
            else:
                for hook in _hooks:
                    hook()
                _hooks.clear()
                _state["error"] = None
                _state["module"] = module
        return _state["module"]


def on_load(hook) -> None:
    """Call ``hook()`` once the extension is imported (now, when it already is): the Python side of
    its ops, e.g. ``torch.library.register_autograd``. Never called when the extension is absent."""
    with _lock:
        if _state.get("module") is not None:
            hook()
        elif "module" not in _state:
            _hooks.append(hook)


def error() -> str | None:
    """Why the extension is unavailable (None when it loaded)."""
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
