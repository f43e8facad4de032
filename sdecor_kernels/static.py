"""Ahead-of-time compilation of sdecor's Triton kernels for a GPU target, without a GPU.

The Triton interpreter runs kernels that a GPU compile may reject or that spill registers (it checks
no shape, layout or resource limit), so this is the check of GPU validity on a machine without one,
and the source of the static figures of ``sdecor bench --static``.

STATIC_SPECS
------------
A kernel module (``sdecor_kernels.<name>``) lists what to compile in a module-level ``STATIC_SPECS``,
a list of dicts, one per kernel variant::

    STATIC_SPECS = [
        dict(
            name="whiten_apply_kernel",          # label in reports (unique per module; defaults to
                                                 # the kernel's __name__), e.g. "kernel[HAS_DY]"
            kernel=whiten_apply_kernel,          # the @triton.jit function itself
            signature={"x_ptr": "*fp32",         # every argument that is not a constexpr, with its
                       "d": "i32", ...},         # Triton type: "*fp32", "*fp16", "*bf16", "i32",
                                                 # "i64", "fp32", ...; a callable d -> dict is allowed
            config=lambda d: dict(BD=..., ...,   # d -> every constexpr argument by name, plus the
                                  num_warps=4),  # launch options num_warps / num_stages (optional)
            ds=(2, 4, 8, 16, 32, 64, 128),       # optional: the group sizes the kernel supports
        ),
        ...
    ]

``d`` is the problem size the module scales with (the group size for whitening kernels; a module is
free to read it as another size, e.g. a block of positions, and should say so in its docstring).

Use :func:`compile_report` (or ``python -m sdecor_kernels.static --arch 80 --d 16``), which returns
per kernel variant: registers per thread, spill stores/loads (bytes), static shared memory (bytes),
and whether tensor-core instructions appear (mma / wgmma in PTX, HMMA / HGMMA in SASS).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Iterable

__all__ = ["compile_report", "compile_spec", "kernel_modules", "report_all", "specs_of"]

ARCHS = (80, 90)


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _modules() -> dict:
    """The kernel modules of sdecor_kernels by dotted name: every public module but this one
    (tests/test_static_compile.py checks the list against the package's modules). Imported on first
    use, so that importing this module imports neither Triton nor the kernels."""
    from . import apply, backward, newton, stats, topk

    return {m.__name__: m for m in (apply, backward, newton, stats, topk)}


def kernel_modules() -> list[str]:
    """Names of the kernel modules of sdecor_kernels (those defining STATIC_SPECS are compiled)."""
    return sorted(_modules())


def specs_of(module) -> list[dict]:
    """The STATIC_SPECS of a kernel module (object or dotted name); [] when it defines none."""
    if isinstance(module, str):
        modules = _modules()
        if module not in modules:
            raise ValueError(f"{module!r} is not a kernel module of sdecor_kernels; they are {sorted(modules)}")
        module = modules[module]
    return list(getattr(module, "STATIC_SPECS", []))


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def _jit_function(kernel):
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        raise TypeError(
            f"STATIC_SPECS kernel {kernel!r} is not a triton.jit function; static compilation needs "
            "TRITON_INTERPRET unset (compile_report runs itself in a subprocess when it is set)")
    return kernel


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spills and shared memory from ptxas -v, run like Triton runs it."""
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([_tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}",
                              src, "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
    log = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu}:\n{log}")
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return dict(n_regs=int(regs.group(1)) if regs else 0,
                spill_stores=int(stores.group(1)) if stores else 0,
                spill_loads=int(loads.group(1)) if loads else 0,
                stack_frame=int(stack.group(1)) if stack else 0)


def _sass(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else ""


def compile_spec(spec: dict, arch: int, d: int) -> dict:
    """Compile one STATIC_SPECS entry for sm_<arch> at size d and report its resource use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _jit_function(spec["kernel"])
    name = spec.get("name", kernel.__name__)
    cfg = dict(spec["config"](d))
    options = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    signature = spec["signature"](d) if callable(spec["signature"]) else dict(spec["signature"])
    missing = [a for a in kernel.arg_names if a not in signature and a not in cfg]
    if missing:
        raise ValueError(f"STATIC_SPECS entry {name!r}: no type or constexpr value for {missing}")
    full_sig = {a: (signature[a] if a in signature else "constexpr") for a in kernel.arg_names}
    src = ASTSource(fn=kernel, signature=full_sig, constexprs=cfg)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    usage = _ptxas_usage(ptx, arch)
    sass = _sass(compiled.asm["cubin"])
    tc_ptx = bool(re.search(r"\b(w?gmma|mma)\.", ptx))
    tc_sass = bool(re.search(r"\b(HMMA|HGMMA|IMMA|WGMMA)\b", sass))
    return dict(name=name, arch=arch, d=d, num_warps=options.get("num_warps", 4),
                n_regs=usage["n_regs"], n_spills=usage["spill_stores"] + usage["spill_loads"],
                spill_stores=usage["spill_stores"], spill_loads=usage["spill_loads"],
                stack_frame=usage["stack_frame"], shared=int(compiled.metadata.shared),
                tensor_cores=tc_ptx or tc_sass)


def compile_report(module_or_specs, arch: int, d: int) -> list[dict]:
    """Compile every STATIC_SPECS entry of a kernel module for sm_<arch> at size d.

    ``module_or_specs``: a module, its dotted name (e.g. "sdecor_kernels.stats") or a list of
    STATIC_SPECS entries. Returns one dict per entry: name, arch, d, num_warps, n_regs, n_spills
    (spill stores + loads, bytes), spill_stores, spill_loads, stack_frame, shared (bytes of shared
    memory), tensor_cores (bool). Entries whose ``ds`` exclude d are skipped.

    With TRITON_INTERPRET set, triton.jit gives interpreted functions that cannot be compiled, so a
    module given by name or object is compiled in a subprocess without the interpreter.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}; got {arch!r}")
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be a positive int; got {d!r}")
    if _interpreter_on():
        if isinstance(module_or_specs, (list, tuple)):
            raise RuntimeError("compile_report on a list of specs needs TRITON_INTERPRET unset; "
                               "pass the module (or its name) to compile it in a subprocess")
        name = module_or_specs if isinstance(module_or_specs, str) else module_or_specs.__name__
        return _subprocess_report([name], [arch], [d])
    specs = module_or_specs if isinstance(module_or_specs, (list, tuple)) else specs_of(module_or_specs)
    return [compile_spec(s, arch, d) for s in specs if d in s.get("ds", (d,))]


def _subprocess_report(modules: Iterable[str], archs: Iterable[int], ds: Iterable[int]) -> list[dict]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "sdecor_kernels.static", "--json",
           "--module", *modules, "--arch", *map(str, archs), "--d", *map(str, ds)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"static compilation failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout)


def report_all(modules: Iterable[str] | None = None, archs: Iterable[int] = ARCHS,
               ds: Iterable[int] = (16, 32, 64)) -> list[dict]:
    """compile_report rows (plus "module") for every module x arch x d, in one subprocess when the
    interpreter is on. ``modules`` defaults to every sdecor_kernels module defining STATIC_SPECS."""
    modules = list(modules) if modules is not None else [m for m in kernel_modules() if specs_of(m)]
    archs, ds = list(archs), list(ds)
    if not modules:
        return []
    if _interpreter_on():
        return _subprocess_report(modules, archs, ds)
    rows = []
    for mod in modules:
        for arch in archs:
            for d in ds:
                rows.extend(dict(module=mod, **row) for row in compile_report(mod, arch, d))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdecor_kernels.static",
                                     description="Compile sdecor's Triton kernels for a GPU target "
                                                 "(no GPU needed) and report registers, spills and "
                                                 "shared memory.")
    parser.add_argument("--module", nargs="*", default=None,
                        help="kernel modules (default: every sdecor_kernels module with STATIC_SPECS)")
    parser.add_argument("--arch", nargs="*", type=int, default=list(ARCHS))
    parser.add_argument("--d", nargs="*", type=int, default=[16, 32, 64])
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args = parser.parse_args(argv)
    rows = report_all(args.module or None, args.arch, args.d)
    if args.json:
        print(json.dumps(rows))
    else:
        head = f"{'kernel':<40} {'arch':>4} {'d':>4} {'warps':>5} {'regs':>4} {'spill':>6} {'smem':>7} tc"
        print(head)
        for r in rows:
            print(f"{r['name']:<40} {r['arch']:>4} {r['d']:>4} {r['num_warps']:>5} {r['n_regs']:>4} "
                  f"{r['n_spills']:>6} {r['shared']:>7} {'yes' if r['tensor_cores'] else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
