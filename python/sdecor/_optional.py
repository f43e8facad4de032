"""Optional dependencies: import one, or fail with the pip line of the extra that installs it.

The core package needs only torch and numpy. The demo, the training CLI and the benchmark plots use
packages from extras (``pip install 'sdecor[demo]'``, ``'sdecor[bench]'``); a command that needs one
that is missing stops with a message that names the extra, never with a bare ModuleNotFoundError.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingDependencyError", "require"]

# import name -> the name pip installs it under, where the two differ
PIP_NAMES = {"sklearn": "scikit-learn"}


class MissingDependencyError(ImportError):
    """An optional package that a command needs is not installed."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``; if it is missing, raise MissingDependencyError naming ``extra``.

    ``purpose`` says what needs it, e.g. "sdecor demo's progress bars".
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".")[0]
        if err.name is not None and err.name.split(".")[0] != top:
            raise                                      # the package is there but broken inside
        raise MissingDependencyError(
            f"{purpose} needs the package {top!r}, which is not installed; install it with "
            f"pip install 'sdecor[{extra}]' (or pip install {PIP_NAMES.get(top, top)})") from err
