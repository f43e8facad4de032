"""``python -m sdecor bench``: microbenchmarks of every op against its baselines.

Measures group_cov, whitening_matrix, group_whiten, GroupWhitening (forward, backward, both),
topk_mask, decorrelation_loss and eigh_small on every backend that can run here, beside the
reference, ``torch.compile`` of the reference, BatchNorm, a naive IterNorm, Saliency Guided
Training's masking and ``torch.linalg.eigh``. Every fast path is checked against the reference on
the same inputs before it is timed; one that disagrees is reported as MISMATCH and never timed.
Shapes and suites (focused comparisons, ``--suite``): :mod:`sdecor.cli.bench.shapes`; the suite of
whole training steps (``--suite steps-cpu``): :mod:`sdecor.cli.bench.steps`; the measurement of the
CPU choice table, native against torch per (op, d, dtype) (``--suite choice-cpu``):
:mod:`sdecor.cli.bench.choice`.

CPU timing keeps freed memory in the process (glibc's mmap and trim thresholds raised with mallopt at
start-up, unless MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ are set: :mod:`sdecor.cli.bench.allocator`),
and the table and the result files say so, with the thread count (``--threads``).

Results: <device>.json/.csv and a PNG per op, <device>-<op>.png, in ./sdecor-bench-output/ (``--out
DIR`` elsewhere); a later run of the same device replaces them. The folder is made and proved
writable before the run, and a failing write at the end puts the files into a temporary folder
(:mod:`sdecor.cli.output`). A run never writes into the source
tree unless asked: ``--save-results`` writes the curated set that the README quotes, <device>.json
and the PNGs, into benchmarks/results/ of the source checkout. ``--static`` compiles the Triton
kernels for sm_80 and sm_90 without a GPU and estimates H100 bandwidth-bound times
(static-sm80-sm90.json), and counts the launches per call of the Triton path under the interpreter
(:mod:`sdecor.cli.bench.launches`).

Importing this module costs little beyond ``import sdecor``: the harness, matplotlib and Triton are
imported when a run starts.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

from ..._backend import BACKENDS
from ..options import MAX_SEED, MAX_THREADS, Number, Parser, UsageError, check_numbers, int_list
from ..output import OutputDir
from . import choice, steps
from .ops import BASELINES, MODES
from .shapes import DTYPES, OPS, SHAPES, SUITES

_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
                  "float": "float32", **{d: d for d in DTYPES}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sel = parser.add_argument_group("what to run (comma-separated lists)")
    sel.add_argument("--quick", action="store_true",
                     help="one real shape per op, float32, short timing, torch.compile for two ops only, "
                          "one CPU thread (under 2 minutes on a small CPU)")
    sel.add_argument("--ops", default=None, help=f"ops to run: {','.join(OPS)} (default: all)")
    sel.add_argument("--shapes", default=None,
                     help="shape names to run: substrings or globs, e.g. 'resnet50,cifar10-*' (see --list)")
    sel.add_argument("--suite", default=None,
                     help=f"focused comparisons to run, by name: {','.join(SUITES)} (see "
                          "sdecor/cli/bench/shapes.py); with --quick, the union of both selections")
    sel.add_argument("--dtypes", default=None,
                     help="fp32,fp16,bf16 (default: all three; float32 with --quick or --suite); ops whose "
                          "inputs are float32 statistics run float32 only")
    sel.add_argument("--modes", default=None, help=f"{','.join(MODES)} (default: all)")
    sel.add_argument("--backends", default=None, help=f"sdecor backends to measure: {','.join(BACKENDS)} "
                                                     "(default: every one that can run here)")
    sel.add_argument("--baselines", default=None,
                     help=f"baselines to measure: {','.join(BASELINES)} or 'none' (default: all; the "
                          "reference always runs, as the correctness oracle)")
    sel.add_argument("--compile", choices=("all", "smallest", "tagged", "off"), default=None,
                     help="torch.compile baseline on every case, on the smallest shape of each op, on the "
                          "shapes tagged 'compile' in sdecor/cli/bench/shapes.py, or never (default: all; "
                          "tagged with --quick)")
    sel.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where to run (default: cuda when available)")
    sel.add_argument("--list", action="store_true", help="list the selected shapes and exit")
    tim = parser.add_argument_group("timing (CPU; the GPU uses triton.testing.do_bench)")
    tim.add_argument("--min-time", type=float, default=None,
                     help="seconds of timed calls per path and mode, > 0 and <= 3600 (default 0.5; 0.1 with "
                          "--quick)")
    tim.add_argument("--reps", type=int, default=None,
                     help="at least this many timed rounds, 1 to 100000 (default 5; 3 with --quick)")
    tim.add_argument("--threads", type=int, default=None,
                     help="CPU: torch.set_num_threads for the run, 1 to 1024 (default: torch's default; 1 with "
                          "--quick, whose times stay steady when other work shares a small CPU); the "
                          "targets of the CPU suites are set for --threads 2")
    tim.add_argument("--seed", type=int, default=0, help="seed of the generated inputs, 0 to 2**63 - 2")
    out = parser.add_argument_group("output")
    where = out.add_mutually_exclusive_group()
    where.add_argument("--out", default=None, metavar="DIR",
                       help="results folder (default: ./sdecor-bench-output): <device>.json/.csv and "
                            "<device>-<op>.png, replacing the same device's earlier run")
    where.add_argument("--save-results", action="store_true",
                       help="write the curated results into benchmarks/results/ of the source checkout: "
                            "<device>.json and <device>-<op>.png (static-sm80-sm90.json with --static)")
    where.add_argument("--no-save", action="store_true", help="print the table only; write no files")
    out.add_argument("--no-plot", action="store_true", help="write no PNG plots")
    out.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    out.add_argument("--show", metavar="JSON", default=None,
                     help="print the table of a saved results file (e.g. benchmarks/results/<device>.json) "
                          "instead of running; --ops filters it")
    ds = parser.add_argument_group("synchronised statistics")
    ds.add_argument("--distributed", type=int, default=None, metavar="N",
                    help="time a training step of SyncGroupWhitening against GroupWhitening, and the decorrelation "
                         "term of each process's batch against that of the global batch, on N processes (2 to 64) "
                         "(gloo with CPU tensors on the loopback interface; nccl with --device cuda and N "
                         "GPUs) and report what each layer communicates per step; writes <device>-distributed.json")
    st = parser.add_argument_group("static report")
    st.add_argument("--static", action="store_true",
                    help="compile every Triton kernel for sm_80 and sm_90 (no GPU needed): registers, "
                         "spills, shared memory, tensor-core use; bytes moved and H100 bandwidth-bound time")
    st.add_argument("--arch", default="80,90", help="with --static: GPU architectures (default 80,90)")
    st.add_argument("--d", default="16,64",
                    help="with --static: group sizes to compile for, 1 to 1024 each (default 16,64)")
    st.add_argument("--kernels", default=None,
                    help="with --static: kernel modules to compile, e.g. 'whiten,topk' (default: every "
                         "sdecor_kernels module with STATIC_SPECS)")


# every numeric option (argparse dest -> the values it takes: sdecor.cli.options.Number)
NUMBERS = {
    "min_time": Number(0, 3600, lo_open=True, unit="seconds of timed calls per path and mode"),
    "reps": Number(1, 100_000),
    "threads": Number(1, MAX_THREADS),
    "seed": Number(0, MAX_SEED),
    "distributed": Number(2, 64, unit="processes on this machine"),
}
D_RANGE = Number(1, 1024, unit="channels per group")      # --d: each of its group sizes


def check_args(args: argparse.Namespace) -> None:
    """The options that need no harness, before anything is read, made or run: every number against
    :data:`NUMBERS`, and --static's --d, --arch and --kernels (also when given without --static).
    Raises :class:`UsageError`."""
    if args.distributed is not None and args.distributed < 2:
        raise UsageError("--distributed", f"--distributed needs at least 2 processes; got {args.distributed}")
    check_numbers(args, NUMBERS)
    int_list("--d", args.d, D_RANGE)
    _split(args.arch, ("80", "90"), "arch")
    if args.kernels is not None:
        try:
            from sdecor_kernels.static import kernel_modules
        except ImportError:                           # reported by --static itself
            return
        known = [m.rsplit(".", 1)[1] for m in kernel_modules()]
        _split(args.kernels.replace("sdecor_kernels.", ""), known, "kernels")


def _split(text, allowed, what, aliases=None) -> tuple:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    out = []
    for t in items:
        name = (aliases or {}).get(t.lower(), t)
        if allowed is not None and name not in allowed:
            raise UsageError(f"--{what}", f"--{what}: unknown {what[:-1] if what.endswith('s') else what} "
                                          f"{t!r}; choose from {', '.join(allowed)}")
        out.append(name)
    if not out:
        raise UsageError(f"--{what}", f"--{what} is empty")
    return tuple(dict.fromkeys(out))


def settings_from_args(args: argparse.Namespace):
    """The harness Settings for parsed arguments (raises UsageError for bad values)."""
    import torch

    from .harness import Settings

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device", "--device cuda: no CUDA device is available")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    baselines = ("reference",) if (args.baselines or "").strip().lower() == "none" else \
        _split(args.baselines, BASELINES, "baselines")
    suites = _split(args.suite, SUITES, "suite") or ()
    if choice.SUITE in suites and device != "cpu":
        raise UsageError("--suite", f"--suite {choice.SUITE} measures the CPU backends; add --device cpu")
    shapes = _split(args.shapes, None, "shapes") or ()
    names = [e["name"] for e in SHAPES]
    for pattern in shapes:
        if not any(pattern in n or fnmatch.fnmatch(n, pattern) for n in names):
            raise UsageError("--shapes", f"--shapes: {pattern!r} matches no shape name (see --list)")
    min_time = args.min_time if args.min_time is not None else (0.1 if args.quick else 0.5)
    reps = args.reps if args.reps is not None else (3 if args.quick else 5)
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads", f"--threads must be >= 1; got {args.threads}")
    if not min_time > 0 or reps < 1:
        raise UsageError("--min-time" if not min_time > 0 else "--reps",
                         f"--min-time must be > 0 and --reps >= 1; got {min_time}, {reps}")
    return Settings(
        device=device,
        ops=_split(args.ops, OPS, "ops") or OPS,
        shapes=shapes,
        dtypes=_split(args.dtypes, DTYPES, "dtypes", _DTYPE_ALIASES) or
        (("float32",) if args.quick or suites else DTYPES),
        modes=_split(args.modes, MODES, "modes") or MODES,
        backends=_split(args.backends, BACKENDS, "backends") or BACKENDS,
        baselines=baselines or BASELINES,
        compile=args.compile or ("tagged" if args.quick else "all"),
        quick=args.quick,
        suites=suites,
        min_time=min_time,
        min_reps=reps,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark (or the static report); 1 when a fast path disagrees with the reference or fails."""
    from ..._optional import MissingDependencyError
    from .report import NotASourceTree

    try:
        check_args(args)
    except UsageError as exc:
        print(f"sdecor bench: error: {exc}", file=sys.stderr)
        return 2
    if args.show is not None:
        from .show import show

        return show(args)
    try:
        settings = settings_from_args(args)
        if args.distributed is not None:
            return _run_distributed(args, settings)
        if args.static:
            return _run_static(args, settings)
        return _run_selected(args, settings)
    except (UsageError, NotASourceTree, MissingDependencyError) as exc:
        print(f"sdecor bench: error: {exc}", file=sys.stderr)
        return 2


def _output(args, files=()):
    """(OutputDir, curated) the results go to, or (None, False) with --no-save; the folder is checked
    here (nothing touched) and made and written to by OutputDir.prepare, before the run."""
    from . import report

    if args.no_save:
        return None, False
    if args.save_results:
        return OutputDir(report.results_dir(), files, command="bench", option="--save-results"), True
    return OutputDir(args.out if args.out is not None else report.default_out_dir(), files, command="bench"), False


def _device_slug(settings) -> str:
    import torch

    from . import report

    return report.device_slug(torch.device(settings.device))


def _run_selected(args, settings) -> int:
    from .harness import select_entries
    from .shapes import describe

    entries = select_entries(settings)
    if args.list:
        for e in entries:
            print(f"{e['op']:<20} {e['name']:<36} {describe(e)}")
        if steps.SUITE in settings.suites:
            for name in steps.PATHS:
                print(f"{steps.OP:<20} {name:<36} {steps.StepConfig().describe()}")
        if choice.SUITE in settings.suites:
            for case in choice.cases(choice.QUICK if settings.quick else choice.ChoiceConfig()):
                print(f"{choice.OP:<20} {case.name() + '-' + case.dtype:<36} {case.describe()} {case.mode}")
        return 0
    if not entries and not {steps.SUITE, choice.SUITE} & set(settings.suites):
        print("sdecor bench: error: --ops, --shapes, --suite, --quick: nothing selected together (see --list)",
              file=sys.stderr)
        return 2
    return _run_bench(args, settings)


def _run_bench(args, settings) -> int:
    import torch

    from . import harness, report

    slug = _device_slug(settings)
    out, curated = _output(args, [f"{slug}.json", f"{slug}.csv"] + [f"{slug}-{op}.png" for op in (*OPS, steps.OP)])
    if out is not None and not args.no_plot:
        from .plot import require_matplotlib

        require_matplotlib()
    if steps.SUITE in settings.suites:
        steps.require_torchvision()
    if out is not None:
        out.prepare()                             # before the run: a wrong flag fails in a second
    from .allocator import keep_allocations

    allocations = keep_allocations()             # before the inputs are made: every timed call reuses memory
    device = torch.device(settings.device)
    threads = args.threads if args.threads is not None else (1 if args.quick and device.type == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    threads_from = ("--threads" if args.threads is not None else "--quick's default" if threads is not None
                    else "torch's default")
    timer = ("triton.testing.do_bench median (25 ms warm-up, 100 ms of repeats, gradients cleared)"
             if device.type == "cuda" else
             f"perf_counter median over >= {settings.min_reps} interleaved rounds and >= "
             f"{settings.min_time:g} s per path, gradients cleared between calls")
    env = dict(report.environment(device, timer), allocations=allocations, threads_from=threads_from)
    print(report.threads_text(env) + ". " + allocations["text"] + ".", file=sys.stderr, flush=True)
    try:
        records = harness.run(settings)
        if steps.SUITE in settings.suites:
            records += steps.run(settings)
        if choice.SUITE in settings.suites:
            records += choice.run(settings)
    except BaseException:
        if out is not None:
            out.discard()                         # only folders prepare made, still empty
        raise
    env["load_average_end"] = report.load_average()
    if not records:
        if out is not None:
            out.discard()
        print("sdecor bench: error: --ops, --shapes, --suite, --quick: nothing selected together (see --list)",
              file=sys.stderr)
        return 2
    # the choice suite's cases have their own tables: both backends per row, and the choice table
    print(report.format_table([r for r in records if r["op"] != choice.OP], env, markdown=args.markdown))
    if any(r["op"] == choice.OP for r in records):
        print(choice.format_choice(records))
    code = 0
    if out is not None:
        # the curated set is the JSON and the plots; the CSV (the same numbers) stays in run folders
        files = report.result_files(records, env, _settings_dict(settings), with_csv=not curated)
        if not args.no_plot:
            from .plot import render_op

            for op in dict.fromkeys(r["op"] for r in records if r["op"] != choice.OP):
                png = render_op(records, op, env)
                if png is not None:
                    files[f"{env['device_slug']}-{op}.png"] = png
        saved = out.save(files, show=(f"{env['device_slug']}.json",))
        if saved.requested:
            for op in (*OPS, steps.OP):           # an earlier run's plot would not match the new JSON
                name = f"{env['device_slug']}-{op}.png"
                if name not in files:
                    (Path(saved.folder) / name).unlink(missing_ok=True)
            print("\nwrote " + ", ".join(str(Path(saved.folder) / name) for name in files))
        else:
            code = 1
    bad = [r for r in records if r["kind"] == "fast" and r["status"] in ("MISMATCH", "error")]
    if bad:
        names = sorted({f"{r['op']} {r['impl']} ({r['status']})" for r in bad})
        print(f"\n{len(names)} fast path(s) failed the check or the run: " + "; ".join(names), file=sys.stderr)
        return 1
    return code


def _settings_dict(settings) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items() if k != "inject"}


def _run_distributed(args, settings) -> int:
    import json

    import torch

    from . import distributed, report

    if args.distributed < 2:
        raise UsageError("--distributed", f"--distributed needs at least 2 processes; got {args.distributed}")
    threads = args.threads if args.threads is not None else 1
    if threads < 1:
        raise UsageError("--threads", f"--threads must be >= 1; got {threads}")
    name = f"{_device_slug(settings)}-distributed.json"
    out, _ = _output(args, (name,))
    if out is not None:
        out.prepare()                            # before the run: a wrong flag fails at once
    device = torch.device(settings.device)
    try:
        doc = distributed.measure(args.distributed, quick=args.quick, device=device.type, reps=args.reps,
                                  threads=threads)
    except BaseException as exc:
        if out is not None:
            out.discard()
        if isinstance(exc, ValueError):
            raise UsageError("--distributed", str(exc)) from None
        raise
    print(distributed.format_rows(doc))
    if out is not None:
        env = report.environment(device, "perf_counter median per process, slowest process")
        saved = out.save({name: (json.dumps({"environment": env, **doc}, indent=1) + "\n").encode()}, show=(name,))
        if not saved.requested:
            return 1
        print(f"\nwrote {Path(saved.folder) / name}")
    return 0


def _run_static(args, settings) -> int:
    import datetime as _dt
    import json

    from . import report, static_report
    from .harness import select_entries

    archs = tuple(int(a) for a in _split(args.arch, ("80", "90"), "arch"))
    ds = int_list("--d", args.d, D_RANGE)
    modules = None
    if args.kernels:
        modules = [m if m.startswith("sdecor_kernels.") else f"sdecor_kernels.{m}"
                   for m in _split(args.kernels, None, "kernels")]
    name = report.static_name(archs)
    out, _ = _output(args, (name,))
    if out is not None:
        out.prepare()                            # before compiling: a wrong flag fails at once
    bandwidth = static_report.bandwidth_rows(select_entries(settings), settings.dtypes, settings.modes)
    kernels, kernel_error = [], None
    try:
        kernels = static_report.kernel_rows(archs, ds, modules)
    except ImportError as exc:
        kernel_error = f"sdecor_kernels.static is not available ({exc})"
    except BaseException:
        if out is not None:
            out.discard()
        raise
    print(static_report.format_static(kernels, bandwidth, kernel_error))
    launches, launch_error = static_report.launch_counts(modules)
    print(static_report.format_launch_counts(launches, launch_error))
    code = 1 if any(r.get("error") for r in kernels) or kernel_error or launch_error else 0
    if out is not None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        doc = dict(environment=dict(report.git_revision(), timestamp=stamp, archs=list(archs), ds=list(ds),
                                    h100_bytes_per_s=static_report.H100_BYTES_PER_S,
                                    kernel_error=kernel_error, launch_error=launch_error),
                   kernels=kernels, bandwidth=bandwidth,
                   launches=None if launches is None else static_report.launch_rows(launches))
        # one row per line: readable in a diff, a third of the size of an indented dump
        text = "{\n" + ",\n".join(
            f"{json.dumps(k)}: " + (json.dumps(v) if not isinstance(v, list) else
                                    "[\n" + ",\n".join(json.dumps(r) for r in v) + "\n]")
            for k, v in doc.items()) + "\n}\n"
        saved = out.save({name: text.encode()}, show=(name,))
        if not saved.requested:
            return 1
        print(f"\nwrote {Path(saved.folder) / name}")
    return code


def main(argv=None) -> int:
    parser = Parser(prog="sdecor bench", description=__doc__.splitlines()[0].strip("`: "))
    add_arguments(parser)
    return run(parser.parse_args(argv))
