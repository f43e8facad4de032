"""Results: the environment they were measured in, the printed table, and the JSON / CSV files."""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import torch

from ..._backend import BACKENDS
from ..output import write_file
from .ops import BASELINES

DEFAULT_OUT = "sdecor-bench-output"         # under the working directory, like sdecor-demo-output
PACKAGE_DIR = Path(__file__).resolve().parents[2]     # .../sdecor (this file: sdecor/cli/bench/report.py)
_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({os.cpu_count()} cores)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return slug(f"cpu {_cpu_name()} {os.cpu_count()}c")


def source_root() -> Path | None:
    """The source checkout this sdecor runs from, or None for an installed copy.

    In a checkout the package is python/sdecor beside setup.py and benchmarks/ (an editable install
    runs from there too); an installed copy lives in site-packages, with neither.
    """
    root = PACKAGE_DIR.parent.parent
    if PACKAGE_DIR.parent.name == "python" and (root / "setup.py").is_file() and (root / "benchmarks").is_dir():
        return root
    return None


class NotASourceTree(RuntimeError):
    """--save-results outside a source checkout: there is no benchmarks/results to write to."""


def results_dir() -> Path:
    """benchmarks/results of the source checkout: where ``--save-results`` writes the curated files."""
    root = source_root()
    if root is None:
        raise NotASourceTree(
            "--save-results writes the curated results into benchmarks/results/ of a source checkout of "
            f"sdecor, but this sdecor runs from {PACKAGE_DIR}, which is not in one; run it from a checkout "
            "(pip install -e .) or write elsewhere with --out DIR")
    return root / "benchmarks" / "results"


def default_out_dir() -> Path:
    """Where a run writes without --out or --save-results: ./sdecor-bench-output (git-ignored)."""
    return Path.cwd() / DEFAULT_OUT


def git_revision(root: Path | None = None) -> dict:
    """{'revision': sha or None, 'dirty': bool or None} of the source tree the package runs from."""
    root = root or source_root()
    if root is None or not (root / ".git").exists() or shutil.which("git") is None:
        return dict(revision=None, dirty=None)
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=20).stdout.strip() or None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=20).stdout
        return dict(revision=rev, dirty=bool(status.strip()))
    except (OSError, subprocess.SubprocessError):
        return dict(revision=None, dirty=None)


def load_average():
    """The 1, 5 and 15 minute load averages of the machine (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(device: torch.device, timer: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from ... import _ext
    from ..._version import __version__

    env = dict(
        device=device.type,
        device_name=device_name(device),
        device_slug=device_slug(device),
        capability=(".".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else None),
        cpu=_cpu_name(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        triton=triton_version,
        sdecor=__version__,
        extension=_ext.build_info() or None,
        timestamp=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        timer=timer,
        load_average=load_average(),
        env={k: os.environ[k] for k in ("SDECOR_BACKEND", "TRITON_INTERPRET", "OMP_NUM_THREADS",
                                         "CUDA_VISIBLE_DEVICES") if k in os.environ},
    )
    env.update(git_revision())
    return env


# ---------------------------------------------------------------------------------------------------
# table


def _fmt_time(ms) -> str:
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 0.1 else f"{ms:.3g} ms" if ms < 1000 else f"{ms / 1e3:.3g} s"


def _fmt_x(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def _baselines_of(rs) -> list[str]:
    seen = {r["impl"] for r in rs if r["kind"] == "baseline" and r["status"] == "ok"}
    order = [b for b in BASELINES if b in seen]
    return order + sorted(seen - set(order))


def allocations_text(env: dict) -> str:
    """The sentence on how the run kept (or did not keep) freed memory in the process."""
    alloc = env.get("allocations")
    if not alloc:
        return "Allocations: not recorded (this run's harness did not keep them in the process)"
    return alloc["text"]


def allocations_short(env: dict) -> str:
    alloc = env.get("allocations") or {}
    return {True: "allocations kept in the process", None: "allocator thresholds as the environment sets them",
            False: "allocations NOT kept in the process"}.get(alloc.get("kept", False)) if alloc else \
        "allocations not recorded"


def threads_text(env: dict) -> str:
    n = env["torch_threads"]
    how = env.get("threads_from") or "torch's default"
    return f"Threads: torch.get_num_threads() = {n} ({how})"


def format_table(records: list[dict], env: dict, markdown: bool = False) -> str:
    """Per op: time, GB/s against the bytes floor, peak memory (GPU) and speed-up over each baseline;
    then, where the entries carry targets (suites), each path's ratio to the target's baseline."""
    lines = [f"Device: {env['device_name']} ({env['device']}); torch {env['torch']}, "
             f"{env['torch_threads']} thread{'' if env['torch_threads'] == 1 else 's'}, load average {env.get('load_average')} at the start, {env.get('load_average_end')} at the end; sdecor {env['sdecor']} at {str(env.get('revision'))[:10]}"
             f"{' (modified)' if env.get('dirty') else ''}; {env['timestamp']}",
             f"Times: {env['timer']}. GB/s: bytes floor (docs/design.md) / time. "
             f"Speed-up = baseline time / path time, same inputs and run."
             + (" Faults: minor page faults per call (median; 4 KiB each), memory the call had to get back "
                "from the OS." if any(r.get("minor_faults") is not None for r in records) else ""),
             threads_text(env) + ". " + allocations_text(env) + "."]
    if markdown:                                    # one paragraph each
        lines = [lines[0], "", lines[1], "", lines[2]]
    ops = list(dict.fromkeys(r["op"] for r in records))
    show_mem = any(r.get("peak_mem_bytes") is not None for r in records)
    show_faults = any(r.get("minor_faults") is not None for r in records)
    for op in ops:
        rs = [r for r in records if r["op"] == op]
        bases = _baselines_of(rs)
        head = ["shape", "dtype", "mode", "path", "time", "GB/s"] + (["peak MB"] if show_mem else []) \
            + (["faults"] if show_faults else []) + [f"vs {b}" for b in bases] + ["note"]
        rows = []
        for r in rs:
            if r["status"] == "skipped":
                continue
            if r["status"] == "ok":
                cells = [_fmt_time(r["time_ms"]), "-" if r.get("gbps") is None else f"{r['gbps']:.3g}"]
                note = floor_text(r)
            else:
                cells = [r["status"], "-"]
                note = r["reason"] if len(r["reason"]) <= 120 else r["reason"][:117] + "..."
            mem = [f"{r['peak_mem_bytes'] / 2**20:.1f}" if r.get("peak_mem_bytes") is not None else "-"] if show_mem else []
            if show_faults:
                mem.append(f"{r['minor_faults']:.0f}" if r.get("minor_faults") is not None else "-")
            sp = [_fmt_x(r.get("speedup", {}).get(b)) for b in bases]
            rows.append([r["shape_desc"], _SHORT.get(r["dtype"], r["dtype"]), r["mode"], r["impl"]] + cells + mem + sp + [note])
        lines.append("")
        lines.append(f"### {op}" if markdown else f"== {op} ==")
        if markdown:
            lines.append("")
        lines += render_rows(head, rows, markdown)
        legend = {}
        for r in rs:
            if r["status"] != "skipped":
                what = r["note"] or ("sdecor's public API, backend forced" if r["kind"] == "fast" else "")
                if r["impl"] == "reference" or r["impl"] == "eigh":
                    check = "the correctness oracle"
                elif r["impl"] == "floor":
                    check = "a time computed from the flops, not a run"
                elif r.get("check"):
                    check = r["check"]
                else:
                    checked = r.get("checked", r.get("err_ratio") is not None)
                    check = "checked against the reference" if checked else "not checked: computes another function"
                legend.setdefault(r["impl"], f"{what}; {check}" if what else check)
        if legend:
            if markdown:
                lines.append("")
            lines += [f"{'- ' if markdown else '  '}{impl}: {text}" for impl, text in legend.items()]
        skipped = {}
        for r in rs:
            if r["status"] == "skipped":
                skipped.setdefault((r["impl"], r["reason"]), None)
        if skipped:
            for impl, why in skipped:
                lines.append(f"{'- ' if markdown else '  '}not measured: {impl}: {why}")
    lines += format_targets(records, env, markdown)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# targets

TARGET_THREADS = 2          # the suites' targets are set for this many CPU threads


def target_ratio(path_ms: float, base_ms: float, ratio: str) -> float:
    """"time": path time / baseline time (a target is at most its bound); "speedup": baseline time /
    path time (a target is at least its bound)."""
    return path_ms / base_ms if ratio == "time" else base_ms / path_ms


def target_met(value: float, t: dict) -> bool | None:
    if t.get("bound") is None:
        return None
    return value <= t["bound"] if t["ratio"] == "time" else value >= t["bound"]


def _target_head(t: dict) -> str:
    text = f"time/{t['baseline']}" if t["ratio"] == "time" else f"{t['baseline']}/time"
    if t.get("path"):                              # a target of one path only
        text = f"{t['path']} {text}"
    if t.get("bound") is not None:
        text += f" ({'<=' if t['ratio'] == 'time' else '>='} {t['bound']:g}x)"
    return text


def format_targets(records: list[dict], env: dict, markdown: bool = False) -> list[str]:
    """Per case with targets (float32): every path's time and its ratio to each target's baseline
    (a target with a ``path`` is that path's only); for sdecor's paths whether the target is met.
    Paths not measured show why."""
    cases: dict = {}
    for r in records:
        for t in r.get("targets") or ():
            if r["mode"] == t["mode"] and r["dtype"] == "float32":
                cases.setdefault((r["op"], r["shape"], r["mode"]), []).append(r)
                break
    if not cases:
        return []
    threads = env.get("torch_threads")
    lines = ["", "### Targets" if markdown else "== targets ==", ""]
    lines.append(f"float32, set for {TARGET_THREADS} threads; this run: {threads} thread{'' if threads == 1 else 's'}"
                 + ("" if threads == TARGET_THREADS or env.get("device") != "cpu" else
                    f" (rerun with --threads {TARGET_THREADS} to compare with the targets)")
                 + f"; {allocations_short(env)}. Ratios: time/B = path time / B's time (the target is at most "
                   "the bound), B/time = B's time / path time (at least the bound); met / NOT met for sdecor's paths.")
    for (op, shape, mode), rs in cases.items():
        targets = [t for t in rs[0]["targets"] if t["mode"] == mode]
        times = {r["impl"]: r["time_ms"] for r in rs if r["status"] == "ok"}
        faults = any(r.get("minor_faults") is not None for r in rs)
        head = ["path", "time"] + (["faults"] if faults else []) + [_target_head(t) for t in targets] + ["note"]
        rows = []
        # sdecor's paths first, each backend shown (measured or why not), then the measured baselines
        order = {f"sdecor[{b}]": i for i, b in enumerate(BACKENDS)}
        shown = sorted((r for r in rs if r["kind"] == "fast"), key=lambda r: order.get(r["impl"], len(order))) \
            + [r for r in rs if r["kind"] != "fast" and r["status"] != "skipped"]
        for r in shown:
            if r["status"] != "ok":
                rows.append([r["impl"], r["status"]] + ["-"] * (len(targets) + faults) + [_short(r["reason"])])
                continue
            cells = []
            for t in targets:
                base = times.get(t["baseline"])
                if base is None or r["impl"] == t["baseline"] or t.get("path", r["impl"]) != r["impl"]:
                    cells.append("-")
                    continue
                value = target_ratio(r["time_ms"], base, t["ratio"])
                met = target_met(value, t) if r["kind"] == "fast" else None
                cells.append(f"{value:.3g}x" + ("" if met is None else " met" if met else " NOT met"))
            fl = ([f"{r['minor_faults']:.0f}" if r.get("minor_faults") is not None else "-"] if faults else [])
            rows.append([r["impl"], _fmt_time(r["time_ms"])] + fl + cells + [floor_text(r)])
        missing = list(dict.fromkeys(t["baseline"] for t in targets if t["baseline"] not in times))
        lines.append("")
        lines.append(f"{op} {rs[0]['shape_desc']}, {mode}" + (f" (not measured: {', '.join(missing)})" if missing else ""))
        if markdown:
            lines.append("")
        lines += render_rows(head, rows, markdown)
    return lines


def floor_text(r: dict) -> str:
    """For a ``floor`` record: its flops and the matmul rate they were divided by; else ''."""
    if r["impl"] != "floor" or r.get("flops") is None:
        return ""
    return (f"{r['flops'] / 1e9:.3g} GFLOP at {r['matmul_flops_per_s'] / 1e9:.3g} GFLOP/s "
            f"({r['matmul_n']}^3 float32 matmul, same rounds)")


def _short(text: str, n: int = 100) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def render_rows(head, rows, markdown) -> list[str]:
    """A table as lines: Markdown, or columns padded to their widest cell."""
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        return out
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


# ---------------------------------------------------------------------------------------------------
# files

CSV_FIELDS = ["device", "device_name", "op", "shape", "shape_desc", "dtype", "mode", "impl", "kind", "backend",
              "status", "checked", "time_ms", "p20_ms", "p80_ms", "reps", "bytes", "gbps", "peak_mem_bytes", "minor_faults",
              "max_abs_err", "err_ratio"] + [f"speedup_vs_{b}" for b in BASELINES] + \
             ["note", "reason", "params", "torch", "triton", "sdecor", "revision", "dirty", "timestamp",
              "torch_threads", "allocations"]


def static_name(archs) -> str:
    """File name of the static report: static-sm80-sm90.json for --arch 80,90."""
    return "static-" + "-".join(f"sm{a}" for a in archs) + ".json"


def result_files(records: list[dict], env: dict, settings: dict, with_csv: bool = True) -> dict:
    """The result files of a run, name -> bytes: <device>.json (and <device>.csv)."""
    name = env["device_slug"]
    doc = dict(environment=env, settings=settings, results=records)
    files = {f"{name}.json": (json.dumps(doc, indent=1, default=str) + "\n").encode()}
    if with_csv:
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in records:
            row = {k: r.get(k) for k in CSV_FIELDS}
            for b in BASELINES:
                row[f"speedup_vs_{b}"] = r.get("speedup", {}).get(b)
            row["params"] = json.dumps(r["params"])
            for k in ("device", "device_name", "torch", "triton", "sdecor", "revision", "dirty", "timestamp",
                      "torch_threads"):
                row[k] = env.get(k)
            row["allocations"] = allocations_text(env)
            w.writerow(row)
        files[f"{name}.csv"] = buf.getvalue().encode()
    return files


def write_results(records: list[dict], env: dict, settings: dict, out_dir: Path, with_csv: bool = True) -> dict:
    """Write <device>.json (and <device>.csv) into out_dir, replacing an earlier run's; return the paths.

    One name per device: a folder holds the latest run of each device, never timestamped copies.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in result_files(records, env, settings, with_csv).items():
        write_file(str(out_dir), name, data)
        paths[name.rsplit(".", 1)[1]] = out_dir / name
    return paths
