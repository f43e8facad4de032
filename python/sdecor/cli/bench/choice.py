"""``--suite choice-cpu``: native against torch on the CPU, per (op, d, dtype), the data of the CPU choice table.

Auto-selection on CPU tensors runs the backend that :data:`sdecor._cpu_choice.CHOICE` names per op,
input dtype and range of the group size d. This suite measures every cell of that table: for each
op with a native and a torch implementation, each dtype of its rows and each group size of
``ChoiceConfig.ds``, both backends through sdecor's public functions with the backend forced, on
representative inputs:

* ``group_cov``: forward and backward (dense upstream gradients of mean and cov), as the
  decorrelation loss runs it;
* ``group_whiten_train``: GroupWhitening's training path (newton, T=5, affine), forward and backward
  with a dense upstream gradient;
* ``group_whiten_eval``: the eval-mode forward under torch.no_grad, statistics given;
* ``whitening_matrix``: method="zca" on the G = C / d covariances of the map (the native Jacobi
  eigensolver against LAPACK's eigh), forward and backward;
* ``topk_mask``: no group size; CIFAR-10 and ImageNet image batches, ratio 0.5, uniform fill, one
  mask per sample (reduce="mean") and per element (reduce=None).

The whitening ops run on a 32x256x28x28 activation (ResNet stage of an ImageNet network) and on a
64x128x8x8 one (a CIFAR-size map). Before timing, each backend's outputs and gradients are compared
with the reference's (:func:`.harness.compare`, the tolerance of the dtype); one that disagrees is
reported and not timed. The two backends of a case are then timed round-robin
(:func:`.timing.time_cpu_interleaved`, median). A cell of the table (op, dtype, range of d) gets the
median over its cases (shapes, the measured d in the range) of native time / torch time (for an
even count the geometric mean of the middle two), so that one case slowed by other work on the
machine does not turn the cell; native is the measured choice where it is below 1. A backend that
does not take a case's d (:data:`sdecor._cpu_choice.MAX_D`) is reported as skipped. The suite prints every case, the measured table beside
the current one with the cells where they disagree flagged, and the measured table as a literal for
``sdecor/_cpu_choice.py``. ``--quick``: the small map at d = 16 and 64, and the CIFAR-10 batch.
"""

from __future__ import annotations

import math
import statistics
import sys
import zlib
from dataclasses import dataclass, field

import torch

from ... import _backend, _cpu_choice
from ... import reference as ref
from ...ops import cov as cov_ops
from ...ops import topk as topk_ops
from ...ops import whiten as whiten_ops

SUITE = "choice-cpu"
OP = "cpu_choice"
BACKENDS = ("native", "torch")
DTYPES = ("float32", "float64", "bfloat16", "float16")
OPS = tuple(_cpu_choice.CHOICE)
MODES = {"group_cov": "fwdbwd", "group_whiten_train": "fwdbwd", "group_whiten_eval": "fwd",
         "whitening_matrix": "fwdbwd", "topk_mask": "fwd"}
EPS, T = 1e-5, 5


@dataclass(frozen=True)
class ChoiceConfig:
    """What the suite measures (the defaults are the suite's)."""

    maps: tuple = ((32, 256, (28, 28)), (64, 128, (8, 8)))      # (N, C, S) of the whitening ops
    images: tuple = ((128, 3, (32, 32)), (32, 3, (224, 224)))    # (N, C, S) of topk_mask
    ds: tuple = (8, 16, 32, 64, 128, 256)                        # group sizes (those dividing C)
    dtypes: tuple = DTYPES
    ops: tuple = OPS


QUICK = ChoiceConfig(maps=((64, 128, (8, 8)),), images=((128, 3, (32, 32)),), ds=(16, 64))


@dataclass(frozen=True)
class Case:
    op: str
    N: int
    C: int
    S: tuple
    d: int | None
    dtype: str
    reduce: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def mode(self) -> str:
        return MODES[self.op]

    @property
    def column(self) -> str:
        return "any d" if self.d is None else _cpu_choice.COLUMNS[_cpu_choice.column(self.d)]

    def dims(self) -> str:
        return "x".join(str(v) for v in (self.N, self.C, *self.S))

    def name(self) -> str:
        tail = f"d{self.d}" if self.d is not None else (self.reduce or "elem")
        return f"{self.op}-{self.dims()}-{tail}"

    def describe(self) -> str:
        if self.op == "whitening_matrix":
            G = self.C // self.d
            return f"whitening_matrix zca {G}x{self.d}x{self.d} (x {self.dims()})"
        if self.op == "topk_mask":
            return f"topk_mask {self.dims()} r0.5 {self.reduce or 'elem'} uniform"
        return f"{self.op} {self.dims()} d{self.d}"


def cases(config: ChoiceConfig) -> list[Case]:
    """Every case of the table's cells: per op, each dtype of its rows, each shape and d."""
    out = []
    for op in config.ops:
        for dtype in config.dtypes:
            if dtype not in _cpu_choice.CHOICE[op]:
                continue
            if op == "topk_mask":
                out += [Case(op, N, C, S, None, dtype, reduce) for N, C, S in config.images for reduce in ("mean", None)]
                continue
            out += [Case(op, N, C, S, d, dtype) for N, C, S in config.maps for d in config.ds if d <= C and C % d == 0]
    return out


# ---------------------------------------------------------------------------------------------------
# inputs, the call of each backend and the reference


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def inputs(case: Case, gen: torch.Generator) -> dict:
    """The inputs of a case (those that take gradients are the leaves)."""
    dtype = getattr(torch, case.dtype)
    sd = _stats_dtype(dtype)
    shape = (case.N, case.C, *case.S)
    if case.op == "topk_mask":
        return {"x": torch.randn(shape, generator=gen).to(dtype), "saliency": torch.randn(shape, generator=gen).to(dtype)}
    if case.op == "whitening_matrix":
        G, d = case.C // case.d, case.d
        a = torch.randn(G, d, 4 * d, generator=gen, dtype=torch.float64)
        return {"cov": (a @ a.transpose(-1, -2) / (4 * d)).to(sd)}
    # channels with distinct scales and offsets, like real activations
    scale = torch.rand((1, case.C) + (1,) * len(case.S), generator=gen) + 0.5
    shift = 0.5 * torch.randn((1, case.C) + (1,) * len(case.S), generator=gen)
    inp = {"x": (torch.randn(shape, generator=gen) * scale + shift).to(dtype)}
    if case.op in ("group_whiten_train", "group_whiten_eval"):
        inp["weight"] = (1.0 + 0.1 * torch.randn(case.C, generator=gen)).to(sd)
        inp["bias"] = (0.1 * torch.randn(case.C, generator=gen)).to(sd)
    if case.op == "group_whiten_eval":
        mean, cov = ref.group_cov(inp["x"].to(sd), case.d)
        inp["mean"], inp["wm"] = mean, ref.whitening_matrix(cov, "newton", EPS, T)
    return inp


LEAVES = {"group_cov": ("x",), "group_whiten_train": ("x", "weight", "bias"), "group_whiten_eval": (),
          "whitening_matrix": ("cov",), "topk_mask": ()}


def _affine(y, inp):
    shape = (1, -1) + (1,) * (inp["x"].dim() - 2)
    return (y * inp["weight"].view(shape) + inp["bias"].view(shape)).to(inp["x"].dtype)


def call(case: Case, inp: dict, generator=None) -> tuple:
    """The op through sdecor's public functions, on the backend in force."""
    if case.op == "group_cov":
        return cov_ops.group_cov(inp["x"], case.d)
    if case.op == "group_whiten_train":
        return whiten_ops.group_whiten_train(inp["x"], case.d, "newton", EPS, T, inp["weight"], inp["bias"])[:1]
    if case.op == "group_whiten_eval":
        with torch.no_grad():
            return (whiten_ops.group_whiten_eval(inp["x"], inp["mean"], inp["wm"], inp["weight"], inp["bias"]),)
    if case.op == "whitening_matrix":
        return (whiten_ops.whitening_matrix(inp["cov"], "zca", EPS),)
    return topk_ops.topk_mask(inp["x"], inp["saliency"], ratio=0.5, reduce=case.reduce, fill="uniform",
                              generator=generator)


def reference(case: Case, inp: dict) -> tuple:
    """The same outputs from :mod:`sdecor.reference` (the statistics' dtype, then x's)."""
    sd = _stats_dtype(inp["x"].dtype) if "x" in inp else None
    if case.op == "group_cov":
        return ref.group_cov(inp["x"], case.d)
    if case.op == "group_whiten_train":
        return (_affine(ref.group_whiten(inp["x"].to(sd), case.d, "newton", EPS, T), inp),)
    if case.op == "group_whiten_eval":
        with torch.no_grad():
            return (_affine(ref.apply_whitening(inp["x"].to(sd), inp["mean"], inp["wm"]), inp),)
    if case.op == "whitening_matrix":
        return (ref.whitening_matrix(inp["cov"], "zca", EPS),)
    return ref.topk_mask(inp["x"], inp["saliency"], ratio=0.5, reduce=case.reduce, fill="uniform",
                         generator=torch.Generator().manual_seed(0))


def canon(case: Case, outs: tuple) -> tuple:
    """Outputs as compared: topk_mask's uniform fill differs between generators, so its masked
    positions are left out (the mask itself is compared)."""
    if case.op != "topk_mask":
        return tuple(o.detach() for o in outs)
    x_masked, mask = outs
    where = mask.unsqueeze(1) if case.reduce == "mean" else mask
    return x_masked.masked_fill(where, 0), mask


def _fresh(case: Case, master: dict) -> dict:
    leaves = LEAVES[case.op]
    return {k: (v.detach().clone().requires_grad_() if k in leaves else v) for k, v in master.items()}


class _Path:
    """One backend of one case: its inputs, the call to time, its gradients' leaves."""

    def __init__(self, case: Case, backend: str, master: dict, dys: tuple):
        self.case, self.backend, self.dys = case, backend, dys
        self.inp = _fresh(case, master)
        self.leaves = [self.inp[k] for k in LEAVES[case.op]]
        self.gen = torch.Generator().manual_seed(1)

    def forward(self) -> tuple:
        with _backend.use_backend(self.backend):
            return call(self.case, self.inp, self.gen)

    def step(self) -> None:
        outs = self.forward()
        if self.dys:
            torch.autograd.backward(outs, self.dys)


# ---------------------------------------------------------------------------------------------------
# the run


def _record(case: Case, backend: str | None, status: str, **kw) -> dict:
    r = dict(op=OP, shape=case.name(), shape_desc=case.describe(),
             params=dict(op=case.op, N=case.N, C=case.C, S=list(case.S), d=case.d, reduce=case.reduce,
                         column=case.column),
             dtype=case.dtype, targets=[], mode=case.mode, impl=f"sdecor[{backend}]", kind="fast", backend=backend,
             note=f"sdecor.{case.op} through its public function, backend forced", checked=False,
             check="checked against the reference", status=status, time_ms=None, p20_ms=None, p80_ms=None,
             reps=None, bytes=None, gbps=None, peak_mem_bytes=None, minor_faults=None, max_abs_err=None,
             err_ratio=None, reason="")
    r.update(kw)
    return r


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_case(settings, case: Case, log=_log) -> list[dict]:
    """Check both backends against the reference, time those that agree round-robin; a record each."""
    from .harness import STATUS_ERROR, STATUS_MISMATCH, STATUS_OK, STATUS_SKIPPED, one_line, compare
    from .timing import time_cpu_interleaved

    gen = torch.Generator().manual_seed(settings.seed + zlib.crc32(f"{OP}/{case.name()}/{case.dtype}".encode()))
    master = inputs(case, gen)
    dtype = getattr(torch, case.dtype)
    try:
        ref_inp = _fresh(case, master)
        outs = reference(case, ref_inp)
        dys = ()
        if LEAVES[case.op]:
            dys = tuple(torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs)
            torch.autograd.backward(outs, dys)
        want = canon(case, outs)
        want_grads = tuple(ref_inp[k].grad for k in LEAVES[case.op])
    except Exception as exc:                 # without the oracle nothing of this case is checked or timed
        why = f"the reference failed, nothing checked: {one_line(exc)}"
        return [_record(case, b, STATUS_ERROR, reason=why) for b in BACKENDS]
    records, ready = {}, []
    for backend in BACKENDS:
        why = _backend.reason(backend, torch.device("cpu"))
        limit = _cpu_choice.MAX_D.get((case.op, backend))
        if why is None and limit is not None and case.d > limit:
            why = f"the {backend} backend of {case.op} takes d <= {limit}"
        if why is not None:
            records[backend] = _record(case, backend, STATUS_SKIPPED, reason=why)
            continue
        path = _Path(case, backend, master, dys)
        try:
            got = path.forward()
            res = compare(canon(case, got), want, dtype, [f"output {i}" for i in range(len(want))])
            if res["ok"] and dys:
                torch.autograd.backward(got, dys)
                g = compare(tuple(leaf.grad for leaf in path.leaves), want_grads, dtype,
                            [f"grad {k}" for k in LEAVES[case.op]])
                res = g if not g["ok"] or g["err_ratio"] > res["err_ratio"] else res
        except Exception as exc:             # a path that fails is reported, the other one still runs
            records[backend] = _record(case, backend, STATUS_ERROR, reason=one_line(exc))
            continue
        errs = dict(max_abs_err=res["max_abs_err"], err_ratio=res["err_ratio"], checked=True)
        if not res["ok"]:
            why = (f"disagrees with the reference at {res['where']} (max |err| {res['max_abs_err']:.3g}, "
                   f"{res['err_ratio']:.3g}x the {case.dtype} tolerance)")
            records[backend] = _record(case, backend, STATUS_MISMATCH, reason=why, **errs)
            log(f"    {backend}: MISMATCH, {why}")
            continue
        ready.append((path, errs))
    if ready:
        timed = time_cpu_interleaved([(p.step, p.leaves) for p, _ in ready], settings.min_time, settings.min_reps)
        for (path, errs), t in zip(ready, timed):
            records[path.backend] = _record(case, path.backend, STATUS_OK, time_ms=t["median"] * 1e3,
                                            p20_ms=t["p20"] * 1e3, p80_ms=t["p80"] * 1e3, reps=t["reps"],
                                            minor_faults=t["faults"], **errs)
    return [records[b] for b in BACKENDS]


def run(settings, config: ChoiceConfig | None = None, log=_log) -> list[dict]:
    """Every case of ``config`` (default: :data:`QUICK` with --quick, else the suite's), on the CPU."""
    if settings.device != "cpu":
        raise ValueError(f"the {SUITE} suite measures CPU backends; got device {settings.device!r} (use --device cpu)")
    config = config or (QUICK if settings.quick else ChoiceConfig())
    all_cases = cases(config)
    log(f"[{SUITE}] {len(all_cases)} cases, native against torch")
    records = []
    for i, case in enumerate(all_cases):
        rs = run_case(settings, case, log)
        records += rs
        times = ", ".join(f"{r['backend']} {r['time_ms']:.3g} ms" if r["status"] == "ok" else f"{r['backend']} {r['status']}"
                          for r in rs)
        log(f"  [{i + 1}/{len(all_cases)}] {case.describe()} {case.dtype} {case.mode}: {times}")
    return records


# ---------------------------------------------------------------------------------------------------
# the measured table


def measured(records: list[dict]) -> dict:
    """(op, dtype, column) -> {'ratio': median of native / torch time, 'cases', 'choice'} over the
    cases where both backends were timed (an even count: the geometric mean of the middle two)."""
    pairs: dict = {}
    for r in records:
        if r["op"] == OP and r["status"] == "ok":
            p = r["params"]
            pairs.setdefault((p["op"], r["dtype"], p["column"], r["shape"]), {})[r["backend"]] = r["time_ms"]
    logs: dict = {}
    for (op, dtype, col, _), t in pairs.items():
        if set(t) >= set(BACKENDS):
            logs.setdefault((op, dtype, col), []).append(math.log(t["native"] / t["torch"]))
    mid = {k: statistics.median(v) for k, v in logs.items()}
    return {k: dict(ratio=math.exp(mid[k]), cases=len(v), choice="native" if mid[k] < 0 else "torch")
            for k, v in logs.items()}


def _cells():
    """(op, dtype, column, current choice) of every cell of the table."""
    for op, rows in _cpu_choice.CHOICE.items():
        for dtype, row in rows.items():
            if isinstance(row, str):
                yield op, dtype, "any d", row
            else:
                yield from ((op, dtype, col, b) for col, b in zip(_cpu_choice.COLUMNS, row))


def format_choice(records: list[dict]) -> str:
    """Every case (both backends' times), the measured table beside sdecor._cpu_choice.CHOICE with the
    cells that disagree flagged, and the measured table as a literal."""
    from .report import render_rows

    rs = [r for r in records if r["op"] == OP]
    lines = ["", "== cpu_choice: native against torch per case (median ms) =="]
    by_case: dict = {}
    for r in rs:
        by_case.setdefault((r["shape"], r["dtype"]), {})[r["backend"]] = r
    rows = []
    for (_, dtype), pair in by_case.items():
        first = next(iter(pair.values()))
        cells = [f"{pair[b]['time_ms']:.3f}" if b in pair and pair[b]["status"] == "ok" else
                 (pair[b]["status"] if b in pair else "-") for b in BACKENDS]
        both = all(b in pair and pair[b]["status"] == "ok" for b in BACKENDS)
        ratio = f"{pair['native']['time_ms'] / pair['torch']['time_ms']:.2f}x" if both else "-"
        why = "; ".join(f"{b}: {pair[b]['reason']}" for b in BACKENDS if b in pair and pair[b]["reason"])
        rows.append([first["shape_desc"], dtype, first["mode"], first["params"]["column"], *cells, ratio, why[:100]])
    lines += render_rows(["case", "dtype", "mode", "cell", "native ms", "torch ms", "native/torch", "note"], rows, False)
    m = measured(rs)
    lines += ["", "== cpu_choice: measured table beside sdecor._cpu_choice.CHOICE ==",
              "native/torch: median over the cell's cases of native time / torch time; measured: the faster"]
    rows, differ = [], 0
    for op, dtype, col, current in _cells():
        cell = m.get((op, dtype, col))
        if cell is None:
            rows.append([op, dtype, col, "-", "-", "not measured", current, ""])
            continue
        flag = "" if cell["choice"] == current else "DIFFERS"
        differ += bool(flag)
        rows.append([op, dtype, col, cell["cases"], f"{cell['ratio']:.2f}x", cell["choice"], current, flag])
    lines += render_rows(["op", "dtype", "d", "cases", "native/torch", "measured", "table", ""], rows, False)
    lines.append(f"{differ} cell(s) of the table differ from this measurement")
    lines += ["", "== cpu_choice: the measured table, for sdecor/_cpu_choice.py (cells not measured: as now) ==",
              literal(m)]
    return "\n".join(lines)


def literal(m: dict) -> str:
    """CHOICE as a Python literal with the measured choices (the current one where a cell was not measured)."""
    out = ["CHOICE = {", "    #" + " " * 23 + "".join(f"{c:<10}" for c in _cpu_choice.COLUMNS).rstrip()]
    for op, rows in _cpu_choice.CHOICE.items():
        out.append(f'    "{op}": {{')
        for dtype, row in rows.items():
            key = f'"{dtype}":'
            if isinstance(row, str):
                cell = m.get((op, dtype, "any d"))
                out.append(f'        {key:<19}"{cell["choice"] if cell else row}",')
                continue
            picks = [(m.get((op, dtype, col)) or {}).get("choice", b) for col, b in zip(_cpu_choice.COLUMNS, row)]
            out.append(f"        {key:<19}(" + ", ".join(f'"{p}"' for p in picks) + "),")
        out.append("    },")
    out.append("}")
    return "\n".join(out)
