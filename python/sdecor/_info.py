"""sdecor.info(): versions, backends and how the native extension was built."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import _backend, _ext
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
        "extension": _ext.build_info() or {"error": _ext.error()},
    }


def format_info(data: dict) -> str:
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            for k, v in value.items():
                if isinstance(v, dict):
                    lines.append(f"  {k}:")
                    lines.extend(f"    {kk}: {vv}" for kk, vv in v.items())
                else:
                    lines.append(f"  {k}: {v}")
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
