"""The measuring loop: generate inputs, check every path against the reference, then time it.

For each selected (op, shape, dtype): inputs are generated once (outside any timed region) and every
implementation gets its own copy. The reference runs first; each other implementation that computes
the same function is compared with it -- outputs, and for backward modes every gradient -- with
:func:`sdecor.testing.tol` of the dtype. One that disagrees is recorded as ``MISMATCH`` with its
largest error and is never timed. Timing (:mod:`.timing`): ``triton.testing.do_bench`` (median,
warm-up, gradients cleared) on GPU; on CPU a perf_counter loop (median of repeats, gradients cleared
between calls, outside the timed call).

Modes: ``fwd`` (a training forward: inputs require grad), ``bwd`` (backward of one retained forward),
``fwdbwd`` (both); an entry's ``modes`` narrows them (e.g. an eval-mode forward).

Flop floor: for entries whose op has one (:meth:`~sdecor.cli.bench.ops.Op.flops`, the GroupWhitening
entries with ``flop_floor``), a record ``floor`` per mode (float32): the time the op's d x d x m
products need at the rate of a large square float32 matmul (:func:`.timing.matmul_call`), timed in
the same interleaved rounds as the case's paths, so that a change of machine load moves both alike.
It is a baseline like the others: ``speedup["floor"]`` of a path is floor time / path time.
"""

from __future__ import annotations

import fnmatch
import gc
import sys
import zlib
from dataclasses import dataclass, field

import torch

from ... import _backend
from ...testing import tol
from .ops import BASELINES, MODES, OP_SPECS, Impl, Prepared, Unavailable
from .shapes import DTYPES, OPS, SHAPES, describe, numel
from .timing import MATMUL_N, clear_grads, matmul_call, time_cpu_interleaved, time_gpu

STATUS_OK, STATUS_MISMATCH, STATUS_SKIPPED, STATUS_ERROR = "ok", "MISMATCH", "skipped", "error"
TRITON_ON_CPU = "Triton runs on CPU tensors only through its interpreter, which is not a fast path"


@dataclass
class Settings:
    device: str = "cpu"
    ops: tuple = OPS
    shapes: tuple = ()                 # name patterns (substring or glob); empty = all
    dtypes: tuple = DTYPES
    modes: tuple = MODES
    backends: tuple = _backend.BACKENDS
    baselines: tuple = BASELINES
    compile: str = "all"               # "all", "smallest" (per op), "tagged" (shapes tagged compile), "off"
    quick: bool = False
    suites: tuple = ()                 # shape tags of focused comparisons (shapes.SUITES)
    min_time: float = 0.5              # CPU: seconds of timed calls per measurement (at least min_reps)
    min_reps: int = 5
    seed: int = 0
    matmul_n: int | None = None        # flop floor: side of the square fp32 matmul timed (None: per device)
    inject: dict = field(default_factory=dict)   # op -> extra fast-path Impls (candidates under test)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _matches(name: str, patterns) -> bool:
    return not patterns or any(p in name or fnmatch.fnmatch(name, p) for p in patterns)


def select_entries(settings: Settings, shapes=None) -> list[dict]:
    """The shape entries to run: by op, name pattern and tag.

    With --quick and/or --suite an entry runs when it carries one of the tags asked for ("quick",
    or a suite's name): ``--quick --suite topk-cpu`` is the union of the two sets.
    """
    tags = set(settings.suites) | ({"quick"} if settings.quick else set())
    entries = []
    for e in (SHAPES if shapes is None else shapes):
        if e["op"] not in settings.ops or not _matches(e["name"], settings.shapes):
            continue
        if tags and not tags & set(e.get("tags", ())):
            continue
        entries.append(e)
    return entries


# ---------------------------------------------------------------------------------------------------
# correctness


def compare(actual: tuple, expected: tuple, dtype: torch.dtype, names) -> dict:
    """Compare tensors with tol(dtype): {'ok', 'max_abs_err', 'err_ratio', 'where'}.

    err_ratio is the largest |a - e| / (atol + rtol |e|): above 1 means outside the tolerance.
    """
    t = tol(dtype)
    worst = dict(ok=True, max_abs_err=0.0, err_ratio=0.0, where="")
    if len(actual) != len(expected):
        return dict(ok=False, max_abs_err=float("inf"), err_ratio=float("inf"),
                    where=f"{len(actual)} outputs instead of {len(expected)}")
    for name, a, e in zip(names, actual, expected):
        if a is None:
            return dict(ok=False, max_abs_err=float("inf"), err_ratio=float("inf"), where=f"{name}: missing")
        if tuple(a.shape) != tuple(e.shape) or a.dtype != e.dtype:
            return dict(ok=False, max_abs_err=float("inf"), err_ratio=float("inf"),
                        where=f"{name}: {a.dtype} {tuple(a.shape)} instead of {e.dtype} {tuple(e.shape)}")
        a, e = a.detach(), e.detach()
        if a.dtype == torch.bool:
            wrong = int((a != e).sum())
            if wrong:
                return dict(ok=False, max_abs_err=1.0, err_ratio=float("inf"), where=f"{name}: {wrong} flags differ")
            continue
        a64, e64 = a.double(), e.double()
        fa, fe = torch.isfinite(a64), torch.isfinite(e64)
        if not torch.equal(fa, fe) or not torch.equal(a64[~fa], e64[~fe]):
            return dict(ok=False, max_abs_err=float("inf"), err_ratio=float("inf"),
                        where=f"{name}: non-finite values differ")
        if a64.numel() == 0:
            continue
        err = (a64 - e64).abs().where(fa, torch.zeros_like(a64))
        ratio = err / (t["atol"] + t["rtol"] * e64.abs())
        max_err, max_ratio = float(err.max()), float(ratio.max())
        if max_ratio > worst["err_ratio"]:
            worst.update(max_abs_err=max_err, err_ratio=max_ratio, where=name)
        if max_ratio > 1.0:
            worst["ok"] = False
            return worst
    return worst


# ---------------------------------------------------------------------------------------------------
# the loop


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fresh(master: dict, grad_keys) -> dict:
    return {k: v.detach().clone().requires_grad_(k in grad_keys) for k, v in master.items()}


def _backward(outs, dys, retain=False):
    torch.autograd.backward([o for o in outs], list(dys), retain_graph=retain)


def _compile_targets(settings: Settings, entries) -> set:
    """(op, name, dtype) triples on which the torch.compile baseline runs."""
    if settings.compile == "off" or "compile" not in settings.baselines:
        return set()
    out = set()
    for op in settings.ops:
        spec = OP_SPECS[op]
        dts = [d for d in settings.dtypes if d in spec.dtypes]
        es = [e for e in entries if e["op"] == op]
        if not es or not dts:
            continue
        if settings.compile == "all":
            out |= {(op, e["name"], d) for e in es for d in dts}
        elif settings.compile == "tagged":
            out |= {(op, e["name"], dts[0]) for e in es if "compile" in e.get("tags", ())}
        else:
            smallest = min(es, key=numel)
            out.add((op, smallest["name"], dts[0]))
    return out


def entry_modes(spec, e: dict, settings: Settings) -> list[str]:
    """The modes measured for an entry: those asked for, of the op's (or of the entry's own ``modes``)."""
    return [m for m in settings.modes if m in e.get("modes", spec.modes)]


def run(settings: Settings, shapes=None, log=_log) -> list[dict]:
    """Run the selected benchmarks; return one record per (op, shape, dtype, mode, implementation)."""
    device = torch.device(settings.device)
    entries = select_entries(settings, shapes)
    compile_on = _compile_targets(settings, entries)
    records = []
    mm: dict = {}                                # the matmul of the flop floor, made when first needed

    def matmul() -> dict:
        if not mm:
            mm.update(matmul_call(device, settings.matmul_n or MATMUL_N.get(device.type, 2048)))
        return mm

    jobs = [(e, dt) for e in entries for dt in settings.dtypes if dt in OP_SPECS[e["op"]].dtypes]
    for i, (e, dt) in enumerate(jobs):
        spec = OP_SPECS[e["op"]]
        modes = entry_modes(spec, e, settings)
        if not modes:
            continue
        log(f"[{i + 1}/{len(jobs)}] {e['op']} {e['name']} ({describe(e)}) {dt}")
        floor = matmul if "floor" in settings.baselines and dt == "float32" else None
        records += _run_case(settings, spec, e, _dtype(dt), modes, device, (e["op"], e["name"], dt) in compile_on, log,
                             floor)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_speedups(records)
    return records


def _run_case(settings, spec, e, dtype, modes, device, compile_here, log, matmul=None) -> list[dict]:
    gen = torch.Generator().manual_seed(settings.seed + zlib.crc32(f"{e['op']}/{e['name']}/{dtype}".encode()))
    master = spec.inputs(e, dtype, device, gen)
    need_grad = bool(spec.grad_inputs) and any(m != "fwd" for m in modes)
    grad_names = [f"grad {k}" for k in spec.grad_inputs]
    base = _base(e, str(dtype).replace("torch.", ""))

    def record(impl: Impl, mode: str, status: str, **kw) -> dict:
        r = dict(base, mode=mode, impl=impl.name, kind=impl.kind, backend=impl.backend, note=impl.note,
                 checked=impl.same and impl is not ref_impl, status=status, time_ms=None, p20_ms=None, p80_ms=None, reps=None,
                 bytes=spec.bytes(e, dtype, mode), gbps=None, peak_mem_bytes=None, minor_faults=None,
                 max_abs_err=None, err_ratio=None, reason="")
        r.update(kw)
        return r

    # the reference: outputs and gradients every other path is compared with
    ref_impl = spec.reference_impl(e)
    dys, ref_grads = (), ()
    try:
        ref_prep = ref_impl.build(_fresh(master, spec.grad_inputs))
        ref_outs = tuple(o.detach() for o in ref_prep.forward())
        if need_grad:
            diff = spec.diff_outputs(ref_prep.forward())
            dys = tuple(torch.ones_like(o) if o.dim() == 0 else
                        torch.randn(o.shape, generator=gen).to(o.dtype).to(device) for o in diff)
            _backward(diff, dys)
            ref_grads = tuple(leaf.grad.detach().clone() for leaf in ref_prep.leaves)
            clear_grads(ref_prep.leaves)
        ref_canon = spec.canon(ref_outs, e)
    except Exception as exc:  # without the oracle nothing of this case can be checked or timed
        why = f"the reference failed, nothing checked: {one_line(exc)}"
        log(f"    {why}")
        return [record(ref_impl, m, STATUS_ERROR, reason=why) for m in modes]
    out_names = [f"output {j}" for j in range(len(ref_canon))]

    impls = [ref_impl] + [i for i in spec.baselines(e)[1:] if i.name in settings.baselines]
    impls += [i for i in spec.fast_paths(e, device) if i.backend in settings.backends]
    impls += list(settings.inject.get(e["op"], ()))
    time_ref = "reference" in settings.baselines or ref_impl.name in settings.baselines

    out, ready = [], []
    for impl in impls:
        if impl is ref_impl and not time_ref:
            continue
        if impl.name == "compile" and not compile_here:
            why = {"off": "torch.compile baseline off (--compile off)",
                   "smallest": "torch.compile baseline measured on the smallest shape of each op only (--compile smallest)",
                   "tagged": "torch.compile baseline measured only on shapes tagged 'compile' (--compile tagged, "
                             "the --quick default: compile time on CPU); --compile all measures it everywhere",
                   }.get(settings.compile, "torch.compile baseline not selected for this case")
            out += [record(impl, m, STATUS_SKIPPED, reason=why) for m in modes]
            continue
        if impl.name == "iternorm-compile" and settings.compile == "off":
            why = "torch.compile baselines off (--compile off)"
            out += [record(impl, m, STATUS_SKIPPED, reason=why) for m in modes]
            continue
        if impl.backend == "triton" and device.type == "cpu":
            out += [record(impl, m, STATUS_SKIPPED, reason=TRITON_ON_CPU) for m in modes]
            continue
        if impl.backend is not None:
            why = _backend.reason(impl.backend, device)
            if why is not None:
                out += [record(impl, m, STATUS_SKIPPED, reason=why) for m in modes]
                continue
        prep = ref_prep if impl is ref_impl else None
        check = None
        try:
            if prep is None:
                prep = impl.build(_fresh(master, spec.grad_inputs))
                if impl.same:
                    check = _gate(spec, e, prep, need_grad, dtype, dys, ref_canon, ref_grads, out_names, grad_names)
                else:
                    _smoke(spec, prep, need_grad)
        except (_backend.BackendUnavailableError, Unavailable) as exc:
            out += [record(impl, m, STATUS_SKIPPED, reason=str(exc)) for m in modes]
            continue
        except Exception as exc:  # a path that fails is reported, and the other paths still run
            why = one_line(exc)
            out += [record(impl, m, STATUS_ERROR, reason=why) for m in modes]
            log(f"    {impl.name}: error, {why}")
            continue
        errs = {} if check is None else dict(max_abs_err=check["max_abs_err"], err_ratio=check["err_ratio"])
        if check is not None and not check["ok"]:
            why = (f"disagrees with the reference at {check['where']} (max |err| {check['max_abs_err']:.3g}, "
                   f"{check['err_ratio']:.3g}x the {str(dtype).replace('torch.', '')} tolerance)")
            out += [record(impl, m, STATUS_MISMATCH, reason=why, **errs) for m in modes]
            log(f"    {impl.name}: MISMATCH, {why}")
            continue
        ready.append((impl, prep, errs))

    for m in modes:
        fns, failed = [], {}
        for impl, prep, _ in ready:
            try:
                fn = _mode_fn(spec, prep, m, dys)
                clear_grads(prep.leaves)
                fn()                        # warm-up; a path that cannot run this mode is reported
                clear_grads(prep.leaves)
                fns.append((impl, fn, prep.leaves))
            except Exception as exc:
                failed[impl.name] = one_line(exc)
        flops = spec.flops(e, m) if matmul is not None else None
        mm = matmul() if flops is not None and fns else None
        timed, mm_time = {}, None
        if device.type == "cuda":
            for impl, fn, leaves in fns:
                try:
                    timed[impl.name] = time_gpu(fn, leaves)
                except Exception as exc:
                    failed[impl.name] = one_line(exc)
            if mm is not None:
                mm_time = time_gpu(mm["fn"], [])
        elif fns:
            extra = [(mm["fn"], [])] if mm is not None else []
            try:
                results = time_cpu_interleaved([(fn, leaves) for _, fn, leaves in fns] + extra, settings.min_time,
                                               settings.min_reps)
                timed = {impl.name: t for (impl, _, _), t in zip(fns, results)}
                mm_time = results[-1] if mm is not None else None
            except Exception as exc:
                failed.update({impl.name: one_line(exc) for impl, _, _ in fns})
        del fns
        nbytes = spec.bytes(e, dtype, m)
        for impl, _, errs in ready:
            if impl.name in failed:
                out.append(record(impl, m, STATUS_ERROR, reason=failed[impl.name], **errs))
                continue
            t = timed[impl.name]
            out.append(record(impl, m, STATUS_OK, time_ms=t["median"] * 1e3, p20_ms=t["p20"] * 1e3,
                              p80_ms=t["p80"] * 1e3, reps=t["reps"], gbps=nbytes / t["median"] / 1e9,
                              peak_mem_bytes=t["peak_mem"], minor_faults=t["faults"], **errs))
        line = ", ".join(f"{impl.name} {timed[impl.name]['median'] * 1e3:.3g} ms" for impl, _, _ in ready
                         if impl.name in timed)
        if mm_time is not None:
            out.append(floor_record(base, m, flops, mm["n"], mm["flops"] / mm_time["median"]))
            line += (f"; floor {out[-1]['time_ms']:.3g} ms ({flops / 1e9:.3g} GFLOP at "
                     f"{out[-1]['matmul_flops_per_s'] / 1e9:.3g} GFLOP/s, {mm['n']}^3 matmul {mm_time['median'] * 1e3:.3g} ms)")
        log("    " + m + ": " + line)
    return out


def _base(e: dict, dtype: str) -> dict:
    """The fields every record of one (entry, dtype) shares."""
    params = {k: v for k, v in e.items() if k not in ("op", "name", "tags", "modes", "targets")}
    return dict(op=e["op"], shape=e["name"], shape_desc=describe(e), params=params, dtype=dtype,
                targets=[dict(t) for t in e.get("targets", ())])


def floor_record(base: dict, mode: str, flops: int, n: int, rate: float) -> dict:
    """The ``floor`` record of one mode: ``flops`` at ``rate`` flop/s (of an n^3 float32 matmul)."""
    return dict(base, mode=mode, impl="floor", kind="baseline", backend=None,
                note=f"flop floor: the flops of the op's d x d x m products at the rate of a {n}^3 float32 matmul "
                     "timed in the same rounds",
                checked=False, status=STATUS_OK, time_ms=flops / rate * 1e3, p20_ms=None, p80_ms=None, reps=None,
                bytes=None, gbps=None, peak_mem_bytes=None, minor_faults=None, max_abs_err=None, err_ratio=None,
                reason="", flops=flops, matmul_n=n, matmul_flops_per_s=rate)


def one_line(exc: Exception) -> str:
    """The exception in one line of at most 300 characters: its type and the first line of its text."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _gate(spec, e, prep: Prepared, need_grad, dtype, dys, ref_canon, ref_grads, out_names, grad_names) -> dict:
    outs = prep.forward()
    res = compare(spec.canon(tuple(o.detach() for o in outs), e), ref_canon, dtype, out_names)
    if res["ok"] and need_grad:
        _backward(spec.diff_outputs(outs), dys)
        grads = tuple(leaf.grad for leaf in prep.leaves)
        g = compare(grads, ref_grads, dtype, grad_names)
        if not g["ok"] or g["err_ratio"] > res["err_ratio"]:
            res = g
    clear_grads(prep.leaves)
    return res


def _smoke(spec, prep: Prepared, need_grad) -> None:
    """Run a baseline that computes another function once (warm-up, and it must run)."""
    outs = spec.diff_outputs(prep.forward())
    if need_grad:
        _backward(outs, [torch.randn_like(o) for o in outs])
    clear_grads(prep.leaves)


def _mode_fn(spec, prep: Prepared, mode, dys):
    """The call to time for one mode (a retained forward for ``bwd`` is built here, untimed)."""
    if mode == "fwd":
        return prep.forward
    outs = spec.diff_outputs(prep.forward())
    grads = dys if [tuple(o.shape) for o in outs] == [tuple(g.shape) for g in dys] else [torch.randn_like(o) for o in outs]
    if mode == "bwd":
        return lambda: _backward(outs, grads, retain=True)
    del outs
    return lambda: _backward(spec.diff_outputs(prep.forward()), grads)


# ---------------------------------------------------------------------------------------------------
# speed-ups


def add_speedups(records: list[dict]) -> None:
    """speedup[b] = time of baseline b / time of this path, within one (op, shape, dtype, mode)."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["op"], r["shape"], r["dtype"], r["mode"]), []).append(r)
    for rs in groups.values():
        base = {r["impl"]: r["time_ms"] for r in rs if r["kind"] == "baseline" and r["status"] == STATUS_OK}
        for r in rs:
            r["speedup"] = ({b: t / r["time_ms"] for b, t in base.items() if b != r["impl"]}
                            if r["status"] == STATUS_OK else {})
