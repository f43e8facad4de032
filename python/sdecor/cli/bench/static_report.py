"""``sdecor bench --static``: what the kernels cost on a GPU, worked out without one.

Three parts:

1. every Triton kernel variant listed in a ``sdecor_kernels`` module's ``STATIC_SPECS``, compiled
   for sm_80 and sm_90 by :mod:`sdecor_kernels.static`: registers per thread, spilled bytes, shared
   memory, and whether tensor-core instructions appear;
2. per benchmark shape, the bytes floor of docs/design.md ("Floors") and the time an H100 SXM would
   need to move those bytes at its 3.35 TB/s of HBM3 bandwidth: the time no kernel can beat;
3. launches per call of the Triton path (GroupWhitening forward and backward, topk_mask per fill),
   counted under the Triton interpreter by :mod:`sdecor.cli.bench.launches`: the Triton kernels and
   the other device ops beside them.
"""

from __future__ import annotations

import torch

from .ops import OP_SPECS

H100_BYTES_PER_S = 3.35e12


def bandwidth_rows(entries, dtypes, modes) -> list[dict]:
    rows = []
    for e in entries:
        spec = OP_SPECS[e["op"]]
        for dt in dtypes:
            if dt not in spec.dtypes:
                continue
            for m in modes:
                if m not in spec.modes:
                    continue
                nbytes = spec.bytes(e, getattr(torch, dt), m)
                rows.append(dict(op=e["op"], shape=e["name"], dtype=dt, mode=m, bytes=nbytes,
                                 h100_bound_us=nbytes / H100_BYTES_PER_S * 1e6))
    return rows


def kernel_rows(archs=(80, 90), ds=(16, 64), modules=None) -> list[dict]:
    """Compile every STATIC_SPECS kernel; one row per (module, kernel, arch, d), or an error row
    for a module that fails (the other modules are still compiled).

    Raises ImportError when sdecor_kernels.static is missing.
    """
    from sdecor_kernels import static

    modules = modules or [m for m in static.kernel_modules() if _has_specs(static, m)]
    rows = []
    for mod in modules:
        try:
            rows += static.report_all([mod], archs, ds)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            rows.append(dict(module=mod, name="*", arch=",".join(map(str, archs)), d=None,
                             error=f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]))
    return rows


def _has_specs(static, module: str) -> bool:
    try:
        return bool(static.specs_of(module))
    except Exception:
        return True          # compile it, so that the failure to import shows as an error row


def format_static(kernels: list[dict], bandwidth: list[dict], kernel_error: str | None = None) -> str:
    lines = ["== Triton kernels compiled for sm_80 / sm_90 (no GPU needed) =="]
    if kernel_error:
        lines.append(f"  not compiled: {kernel_error}")
    else:
        head = f"{'module':<24} {'kernel':<44} {'arch':>4} {'d':>4} {'warps':>5} {'regs':>4} {'spill B':>7} {'smem B':>7}  tensor cores"
        lines += [head, "-" * len(head)]
        for r in kernels:
            if r.get("error"):
                lines.append(f"{r['module']:<24} {r['name']:<44} {r['arch']:>4} {str(r.get('d')):>4}  ERROR {r['error']}")
                continue
            lines.append(f"{r['module']:<24} {r['name']:<44} {r['arch']:>4} {r['d']:>4} {r['num_warps']:>5} "
                         f"{r['n_regs']:>4} {r['n_spills']:>7} {r['shared']:>7}  {'yes' if r['tensor_cores'] else 'no'}")
    lines += ["", f"== Bytes floor (docs/design.md) and H100 bandwidth-bound time ({H100_BYTES_PER_S / 1e12:.2f} TB/s) =="]
    head = f"{'op':<20} {'shape':<34} {'dtype':<9} {'mode':<7} {'MB':>10} {'H100 bound us':>14}"
    lines += [head, "-" * len(head)]
    for r in bandwidth:
        lines.append(f"{r['op']:<20} {r['shape']:<34} {r['dtype']:<9} {r['mode']:<7} "
                     f"{r['bytes'] / 1e6:>10.3f} {r['h100_bound_us']:>14.2f}")
    return "\n".join(lines)


WHITEN_KERNEL_MODULES = ("sdecor_kernels.stats", "sdecor_kernels.newton", "sdecor_kernels.apply",
                         "sdecor_kernels.backward")


def launch_counts(modules=None) -> tuple[dict | None, str | None]:
    """(counts, None) or (None, why not) of :func:`sdecor.cli.bench.launches.measure`, for the calls whose
    kernel modules are selected (``modules`` None: all): GroupWhitening for the whitening families,
    topk_mask for ``sdecor_kernels.topk``."""
    from . import launches

    whitening = modules is None or any(m in WHITEN_KERNEL_MODULES for m in modules)
    topk = modules is None or "sdecor_kernels.topk" in modules
    if not (whitening or topk):
        return dict(whitening=[], topk_mask=[]), None
    try:
        return launches.measure(whitening, topk), None
    except Exception as exc:
        text = str(exc).strip().splitlines()
        return None, f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]


def format_launch_counts(doc: dict | None, error: str | None = None) -> str:
    from . import launches

    return "\n".join(launches.format_launches(doc, error))


def launch_rows(doc: dict) -> list[dict]:
    """The counts as rows for the static results JSON (one per forward, backward or call)."""
    from . import launches

    return launches.rows(doc)
