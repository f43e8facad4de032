"""Every Triton kernel of sdecor_kernels compiles for sm_80 and sm_90 without a GPU, without spills.

The interpreter checks no shape, layout or resource limit, so this is the guard of GPU validity on a
machine without a GPU. Kernel modules list what to compile in STATIC_SPECS (see
sdecor_kernels.static). Spill-free at d = 16, 32, 64; compiling at all for the other sizes of
d in [2, 128] each module declares (non powers of two included).
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("triton")

from sdecor_kernels import static  # noqa: E402

# shared memory per block on the targets (opt-in maximum): sm_80 163 KiB, sm_90 227 KiB
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
SPILL_FREE_DS = (16, 32, 64)
OTHER_DS = (2, 3, 48, 128)

MODULES = [m for m in static.kernel_modules() if static.specs_of(m)]
# the kernel families of group whitening (statistics, Newton-Schulz, apply, backward)
WHITEN_MODULES = ["sdecor_kernels.stats", "sdecor_kernels.newton", "sdecor_kernels.apply",
                  "sdecor_kernels.backward"]


def _label(row):
    return f"{row['module']}:{row['name']} sm_{row['arch']} d={row['d']}"


# one report_all per (arch, d), largest d first; under the interpreter (no GPU) each compiles in a
# subprocess of its own (~4 min of CPU in all on CI's 2 cores)
_JOBS = sorted([("spill_free", MODULES, arch, d) for arch in static.ARCHS for d in SPILL_FREE_DS]
               + [("other", WHITEN_MODULES, 90, d) for d in OTHER_DS], key=lambda j: -j[3])
_run = {}          # the pool, the futures and the permits of the compiles once started


def _start(permits: int):
    """Submit every job once; ``permits`` of them compile at a time (more: _allow)."""
    if "futures" not in _run:
        slots, stopped = threading.Semaphore(0), threading.Event()

        def job(mods, arch, d):
            with slots:
                if stopped.is_set():
                    raise RuntimeError("static compiles stopped before this one started")
                return static.report_all(mods, [arch], [d])

        pool = ThreadPoolExecutor(max_workers=len(_JOBS), thread_name_prefix="static-compile")
        _run.update(pool=pool, slots=slots, stopped=stopped, permits=0,
                    futures=[(kind, pool.submit(job, mods, arch, d)) for kind, mods, arch, d in _JOBS])
    _allow(permits)
    return _run["futures"]


def _allow(permits: int):
    if permits > _run["permits"]:
        _run["slots"].release(permits - _run["permits"])
        _run["permits"] = permits


def start_early(only_this_module: bool):
    """Called by tests/conftest.py once the session's tests are collected, when tests of this module
    are among them: under the interpreter the compiles start at once, one at a time (all of them
    when nothing else runs), on the core that the rest of the suite mostly leaves idle (the Triton
    interpreter and small CPU ops run on one)."""
    if static._interpreter_on():
        _start(_workers() if only_this_module else 1)


def stop():
    """Wait for the compiles that run, drop those not started (conftest: at the end of the session)."""
    pool = _run.pop("pool", None)
    if pool is not None:
        _run["stopped"].set()
        _allow(len(_JOBS))                       # the waiting jobs wake up and return at once
        pool.shutdown(wait=True)
    _run.clear()


def _workers():
    # in process (GPU machine: no interpreter) one after another (triton.compile in threads is not
    # promised to be safe); subprocesses side by side on the cores
    return min(4, os.cpu_count() or 1) if static._interpreter_on() else 1


@pytest.fixture(scope="module")
def _compiles():
    """The futures of every compile of this module, started here if not yet (see start_early), now
    on every core."""
    yield _start(_workers())
    stop()


def _rows(futures, kind):
    return [row for k, f in futures if k == kind for row in f.result()]


@pytest.fixture(scope="module")
def spill_free_rows(_compiles):
    return _rows(_compiles, "spill_free")


@pytest.fixture(scope="module")
def other_size_rows(_compiles):
    return _rows(_compiles, "other")


def test_modules_with_specs_exist():
    for mod in WHITEN_MODULES + ["sdecor_kernels.topk"]:
        assert mod in MODULES


def test_kernel_module_list_is_every_module_of_the_package():
    """static imports the kernel modules by an explicit list: it must hold every public module of
    sdecor_kernels but static itself, so that no kernel is left out of the compile checks."""
    import pkgutil

    import sdecor_kernels

    found = sorted(f"sdecor_kernels.{m.name}" for m in pkgutil.iter_modules(sdecor_kernels.__path__)
                   if m.name != "static" and not m.name.startswith("_"))
    assert static.kernel_modules() == found
    with pytest.raises(ValueError, match="not a kernel module"):
        static.specs_of("sdecor_kernels.nonexistent")


def test_every_spec_compiled(spill_free_rows):
    for mod in MODULES:
        for spec in static.specs_of(mod):
            name = spec.get("name", getattr(spec["kernel"], "__name__", "?"))
            for arch in static.ARCHS:
                for d in SPILL_FREE_DS:
                    if d not in spec.get("ds", (d,)):
                        continue
                    assert any(r["module"] == mod and r["name"] == name and r["arch"] == arch and r["d"] == d
                               for r in spill_free_rows), f"{mod}:{name} sm_{arch} d={d} not compiled"


def test_no_register_spills(spill_free_rows):
    spilled = [f"{_label(r)}: {r['n_spills']} bytes spilled ({r['n_regs']} registers)"
               for r in spill_free_rows if r["n_spills"] > 0]
    assert not spilled, "register spills:\n" + "\n".join(spilled)


def test_resources_within_limits(spill_free_rows):
    for r in spill_free_rows:
        assert 0 < r["n_regs"] <= 255, _label(r)
        assert r["shared"] <= SMEM_LIMIT[r["arch"]], f"{_label(r)}: {r['shared']} bytes of shared memory"


def test_whiten_uses_tensor_cores_at_d64(spill_free_rows):
    """The passes over x use tl.dot on tensor cores (tf32x3) from d = 64 up."""
    rows = [r for r in spill_free_rows if r["module"] in WHITEN_MODULES and r["d"] == 64
            and r["name"].startswith(("group_stats_partial", "whiten_apply", "whiten_bwd"))]
    assert rows and all(r["tensor_cores"] for r in rows), [_label(r) for r in rows if not r["tensor_cores"]]


def test_other_sizes_compile(other_size_rows):
    """d not a power of two and d up to 128 compile on sm_90 (masking; tiled d x d kernels)."""
    rows = other_size_rows
    for d in OTHER_DS:
        assert any(r["d"] == d for r in rows), f"no kernel compiled at d={d}"
    for r in rows:
        assert r["shared"] <= SMEM_LIMIT[r["arch"]], f"{_label(r)}: {r['shared']} bytes of shared memory"


def test_bad_arguments():
    with pytest.raises(ValueError, match="arch"):
        static.compile_report("sdecor_kernels.stats", 75, 16)
    with pytest.raises(ValueError, match="d must be"):
        static.compile_report("sdecor_kernels.stats", 80, 0)
