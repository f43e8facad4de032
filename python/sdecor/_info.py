"""sdecor.info(): versions, backends, the CPU choice table and how the native extension was built."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import _backend, _cpu_choice, _ext
from ._version import __version__


def info() -> dict:
    """A dict describing this installation (printed by ``python -m sdecor info``)."""
    # the installed version, read without importing Triton (an import costs ~0.3 s)
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    backends = {}
    for dev in devices:
        device = torch.device(dev)
        backends[dev] = {b: (_backend.reason(b, device) or "available") for b in _backend.BACKENDS}
    return {
        "sdecor": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpreter": _backend.interpreter_on(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "forced_backend": _backend.forced(),
        "backends": backends,
        # the backend auto-selection runs on CPU tensors per op, dtype and range of d (where it can run)
        "cpu_choice": _cpu_choice.table(),
        "extension": _ext.build_info() or {"error": _ext.error()},
    }


def _inline(value) -> str:
    """A third level of the report on one line: "d<=32 native, d<=64 torch" for a dict."""
    return ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)


def format_info(data: dict) -> str:
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            for k, v in value.items():
                if isinstance(v, dict):
                    lines.append(f"  {k}:")
                    lines.extend(f"    {kk}: {_inline(vv)}" for kk, vv in v.items())
                else:
                    lines.append(f"  {k}: {v}")
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
