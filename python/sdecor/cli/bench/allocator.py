"""Keep freed memory in the process while timing (glibc Linux).

glibc returns every freed block of at least its mmap threshold (128 KiB by default) to the operating
system, and trims the top of the heap once more than its trim threshold is free; the next call then
page-faults the same memory back, and a CPU timing swings with how the kernel serves those faults.
:func:`keep_allocations` raises both thresholds at start-up with ``mallopt`` (the values
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296`` would set from the
environment), unless the user set them there: then theirs hold and nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1            # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20      # blocks below 32 MiB come from the heap and go back to it
TRIM_THRESHOLD = -1              # never trim the heap (mallopt takes an int: the 4 GiB of the
                                 # environment variable does not fit; -1 disables trimming, mallopt(3))
_ENV = (("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold", M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def glibc_version() -> str | None:
    """The C library's glibc version ("2.36"), or None for another C library (musl, macOS's)."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION")      # "glibc 2.36"; absent on musl and elsewhere
    except (AttributeError, ValueError, OSError):
        return None
    return text.split()[-1] if text and text.startswith("glibc") else None


def _from_environment(env_var: str, tunable: str, environ) -> str | None:
    """``NAME=value`` when the user set this threshold (variable or GLIBC_TUNABLES), else None."""
    if environ.get(env_var, "").strip():
        return f"{env_var}={environ[env_var].strip()}"
    for item in environ.get("GLIBC_TUNABLES", "").split(":"):
        if item.split("=", 1)[0].strip() == tunable:
            return f"GLIBC_TUNABLES {item.strip()}"
    return None


def _mallopt():
    fn = ctypes.CDLL(None).mallopt
    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return fn


def keep_allocations(environ=None, mallopt=None) -> dict:
    """Raise glibc's mmap and trim thresholds for this process; return what was done.

    Returns ``{"kept": True | False | None, "how": str, "text": str}``: True when sdecor set both
    thresholds (or set one and the environment the other), None when both come from the user's
    environment (their values, not judged here), False when it could not be done (not glibc, or
    mallopt refused); ``text`` is the sentence the table and the result files carry.
    """
    environ = os.environ if environ is None else environ
    version = glibc_version() if sys.platform.startswith("linux") else None
    if version is None:
        why = f"not glibc Linux ({sys.platform})" if not sys.platform.startswith("linux") else "the C library is not glibc"
        return dict(kept=False, how=why,
                    text=f"Allocations: not kept in the process ({why}): freed memory may go back to the OS "
                         f"between calls and be page-faulted back")
    user, done = [], []
    for env_var, tunable, param, value in _ENV:
        given = _from_environment(env_var, tunable, environ)
        if given is not None:
            user.append(given)
            continue
        try:
            ok = (mallopt or _mallopt())(param, value)
        except (OSError, AttributeError) as exc:
            ok, why = 0, f"{type(exc).__name__}: {exc}"
        else:
            why = "mallopt returned 0"
        name = "M_MMAP_THRESHOLD" if param == M_MMAP_THRESHOLD else "M_TRIM_THRESHOLD"
        if not ok:
            how = f"mallopt({name}, {value}) failed ({why}) on glibc {version}"
            return dict(kept=False, how=how, text=f"Allocations: not kept in the process: {how}")
        done.append(f"mallopt({name}, {value})")
    if not done:
        how = "thresholds from the environment: " + ", ".join(user)
        return dict(kept=None, how=how,
                    text=f"Allocations: as the environment sets them ({', '.join(user)}); sdecor bench changed nothing")
    how = " and ".join(done) + f" at start-up (glibc {version})" + ("; " + ", ".join(user) + " from the environment" if user else "")
    mib = MMAP_THRESHOLD // 2**20
    text = f"Allocations kept in the process: {how}"
    if any("M_MMAP" in d for d in done):
        text += (f": freed blocks under {mib} MiB are reused, not returned to the OS and page-faulted back "
                 f"(blocks of {mib} MiB and more are still mapped per call)")
    return dict(kept=True, how=how, text=text)
