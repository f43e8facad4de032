"""``python -m sdecor demo``: what SaliencyDecor does, in a few minutes on a laptop CPU.

Trains a tiny CNN on two embedded datasets (scikit-learn's 8x8 digits; procedural shapes on clutter
with ground-truth object masks) under five configurations, three seeds each:

* ``ce``:     plain cross-entropy (BatchNorm);
* ``mask``:   + the masking-consistency term (BatchNorm);
* ``whiten``: cross-entropy with GroupWhitening in place of BatchNorm, no decorrelation loss;
* ``decor``:  + decorrelation: GroupWhitening and the decorrelation loss;
* ``full``:   SaliencyDecor, both (GroupWhitening).

``mask`` vs ``ce`` and ``full`` vs ``decor`` isolate masking; ``decor`` vs ``ce`` and ``full`` vs
``mask`` isolate decorrelation as a whole (the ablation: does decorrelation, not just masking,
sharpen saliency?), which ``whiten`` splits in two: ``ce`` -> ``whiten`` is the whitening layers
alone, ``whiten`` -> ``decor`` the decorrelation loss alone. Each trained model is evaluated on
the test split: accuracy, and the saliency metrics of :mod:`sdecor.metrics`. The output folder
gets ``report.md``, ``results.json`` (every number) and PNG figures (saliency maps per
configuration, masking curves); it is made and proved writable before the first run, and a failing
write at the end puts the files into a temporary folder (:mod:`sdecor.cli.output`).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import sys
import time
from dataclasses import asdict

import torch

from . import data as data_mod
from .._optional import require
from .options import MAX_THREADS, Number, check_numbers
from .output import OutputDir
from .train import (AMP_DTYPES, TrainConfig, UsageError, batches, check_amp, check_device, check_out_dir,
                    evaluate, option_name, train_model)

CONFIGS = (
    # name, label, lambda_consistency, lambda_decor, norm layers (sdecor.cli.train's --norm)
    ("ce", "cross-entropy", 0.0, 0.0, "batch"),
    ("mask", "+ masking consistency", 1.0, 0.0, "batch"),
    ("whiten", "+ whitening layers", 0.0, 0.0, "whitening"),
    ("decor", "+ decorrelation loss", 0.0, 0.1, "whitening"),
    ("full", "SaliencyDecor (both)", 1.0, 0.1, "whitening"),
)
NORM_LABELS = {"batch": "BatchNorm", "whitening": "GroupWhitening"}

# The configuration pairs the ablation compares: (title, ((from, to), ...)). The first two split
# decorrelation into its parts (the layers alone, then the loss on top of the layers); the last two
# change one switch of the objective each, with the other switch off and on.
ABLATIONS = (
    ("whitening layers (ce->whiten)", (("ce", "whiten"),)),
    ("decorrelation loss (whiten->decor)", (("whiten", "decor"),)),
    ("decorrelation, layers + loss (ce->decor, mask->full)", (("ce", "decor"), ("mask", "full"))),
    ("masking (ce->mask, decor->full)", (("ce", "mask"), ("decor", "full"))),
)

# Per dataset: training settings (full run, --quick run) chosen to fit the demo's time budget of
# 5 minutes: with the five configurations, 6 shapes epochs took 356 s on a busy 2-core machine (the
# shapes training was 240 s of it); 4 epochs ran the whole demo in 230 s on the same machine, 281 s
# with the scaled statistics of the torch backend and the autocast guards.
SETTINGS = {
    "digits": {"full": dict(epochs=10, batch_size=64, lr=1e-2), "quick": dict(epochs=2, batch_size=64, lr=1e-2)},
    "shapes": {"full": dict(epochs=4, batch_size=64, lr=1e-2), "quick": dict(epochs=1, batch_size=64, lr=1e-2)},
}
QUICK_SHAPES = 600            # images generated for --quick
FRACTIONS = [i / 10 for i in range(11)]
MASKED_AT = 0.2               # the accuracy-under-masking level shown in the tables

# metric key, table header, which way is better ("up" / "down"), format
METRICS = (
    ("accuracy", "accuracy", "up", "{:.3f}"),
    ("gini", "Gini", "up", "{:.3f}"),
    ("entropy", "entropy", "down", "{:.3f}"),
    ("deletion_auc", "deletion AUC", "down", "{:.3f}"),
    ("insertion_auc", "insertion AUC", "up", "{:.3f}"),
    ("acc_masked", f"acc, top {int(MASKED_AT * 100)}% masked", "down", "{:.3f}"),
    ("mask_mass_share", "mass in object", "up", "{:.3f}"),
)
SALIENCY_METRICS = ("gini", "entropy", "deletion_auc", "insertion_auc", "mask_mass_share")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="sdecor-demo-output",
                        help="output folder (default %(default)s, in the current directory)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per configuration, 1 to 100 (default 3; 1 with --quick)")
    parser.add_argument("--datasets", default="digits,shapes",
                        help="comma-separated subset of digits,shapes (default %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: one seed, 1-2 epochs, a smaller shapes set")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="test images per run for the saliency metrics (default 200; 64 with --quick)")
    # One thread by default: these layers are too small for intra-op parallelism to pay much, and
    # on a busy machine two threads made a digits run 5-10x slower (60 s instead of 6 s) while one
    # thread ran the whole demo in 166 s next to other jobs.
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads, 1 to 1024 (default %(default)s; more helps only on an idle machine)")
    parser.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    parser.add_argument("--amp", default="off", metavar="{" + ",".join(AMP_DTYPES) + "}",
                        help="mixed precision of every run's training steps, as sdecor train's --amp "
                             "(default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")


# every numeric option (argparse dest -> the values it takes: sdecor.cli.options.Number)
NUMBERS = {
    "seeds": Number(1, 100, unit="seeds per configuration: 100 are 1000 training runs"),
    "eval_samples": Number(1),                       # more than a test split: all of it
    "threads": Number(1, MAX_THREADS),
}


def output_files(names: list, figures: bool) -> list:
    """The files ``sdecor demo`` writes into --out for these datasets."""
    return ["report.md", "results.json"] + ([f"saliency_{n}.png" for n in names] + ["masking_curves.png"]
                                            if figures else [])


def check_args(args: argparse.Namespace) -> list:
    """Every option of ``sdecor demo``, before any data is read or any folder made; returns the
    dataset names. Raises :class:`sdecor.cli.train.UsageError` naming the option."""
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [d for d in names if d not in data_mod.EMBEDDED]
    if not names or bad:
        raise UsageError("--datasets", f"--datasets must be a comma-separated subset of {data_mod.EMBEDDED}; "
                                       f"got {args.datasets!r}")
    for name in ("seeds", "eval_samples", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            option = option_name(name)
            raise UsageError(option, f"{option} must be >= 1; got {value}")
    check_numbers(args, NUMBERS)
    try:
        check_device(args.device)
    except ValueError as err:
        raise UsageError("--device", str(err)) from None
    try:
        check_amp(args.amp, args.device)
    except ValueError as err:
        raise UsageError("--amp", str(err)) from None
    try:
        check_out_dir(args.out, output_files(names, not args.no_figures))
    except ValueError as err:
        raise UsageError("--out", str(err)) from None
    return names


def load_dataset(name: str, quick: bool) -> data_mod.Dataset:
    if name == "shapes" and quick:
        return data_mod.load_shapes(n=QUICK_SHAPES)
    return data_mod.load(name)


def summarize(values: list) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max of finite numbers."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n": len(vals)}


def run(args: argparse.Namespace) -> int:
    try:
        names = check_args(args)
        out = OutputDir(args.out, output_files(names, not args.no_figures), command="demo")
    except UsageError as err:
        print(f"sdecor demo: error: {err}", file=sys.stderr)
        return 2
    require("tqdm.auto", "demo", "sdecor demo's progress bar")
    if not args.no_figures:
        # checked now rather than after minutes of training; render_figures imports it
        require("matplotlib", "demo", "sdecor demo's figures (--no-figures skips them)")
    try:
        out.prepare()                                # the last check: the folder made and written to
    except UsageError as err:
        print(f"sdecor demo: error: {err}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run_demo(args, names, out)
    except FloatingPointError as err:                # a run diverged
        print(f"sdecor demo: error: {err}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)
        out.discard()                                # only folders prepare made, still empty


def run_demo(args: argparse.Namespace, names: list, out: OutputDir) -> int:
    tqdm = require("tqdm.auto", "demo", "sdecor demo's progress bar").tqdm
    start = time.perf_counter()
    mode = "quick" if args.quick else "full"
    seeds = args.seeds or (1 if args.quick else 3)
    eval_samples = args.eval_samples or (64 if args.quick else 200)

    datasets = {name: load_dataset(name, args.quick) for name in names}
    plan = []
    for name, ds in datasets.items():
        for cfg_name, _, lc, ld, norm in CONFIGS:
            for seed in range(seeds):
                cfg = TrainConfig(dataset=name, model="tiny", norm=norm, lambda_consistency=lc, lambda_decor=ld,
                                  mask_ratio=0.5, fill="uniform", num_channels=16, device=args.device,
                                  seed=seed, amp=args.amp, **SETTINGS[name][mode])
                plan.append((name, cfg_name, cfg))
    total_steps = sum(cfg.epochs * len(list(batches(len(datasets[n].train.y), cfg.batch_size,
                                                    torch.Generator())))
                      for n, _, cfg in plan)
    print(f"sdecor demo: {len(datasets)} datasets x {len(CONFIGS)} configurations x {seeds} seed(s) = "
          f"{len(plan)} training runs on {args.device} ({plural(torch.get_num_threads(), 'thread')})"
          + (f", {args.amp} autocast" if args.amp != "off" else ""))
    for name, ds in datasets.items():
        print(f"  {name}: {ds.description}; train {len(ds.train.y)}, test {len(ds.test.y)}; "
              f"{SETTINGS[name][mode]['epochs']} epochs")

    results = {name: {c[0]: [] for c in CONFIGS} for name in names}
    examples = {}                                                    # (dataset, config) -> maps of seed 0
    disable = args.no_progress or not sys.stderr.isatty()
    with tqdm(total=total_steps, desc="training", unit="step", disable=disable) as bar:
        for name, cfg_name, cfg in plan:
            bar.set_postfix_str(f"{name}/{cfg_name} seed {cfg.seed}")
            ds = datasets[name]
            res = train_model(cfg, ds, progress=bar)
            t0 = time.perf_counter()
            ev = evaluate(res.model, ds.test, fractions=FRACTIONS, fill=cfg.fill, max_samples=eval_samples,
                          keep_maps=8 if cfg.seed == 0 else 0, seed=cfg.seed)
            maps = ev.pop("maps", None)
            if maps is not None:
                examples[(name, cfg_name)] = maps
            ev["acc_masked"] = ev["curves"]["accuracy_under_masking"][FRACTIONS.index(MASKED_AT)]
            ev.update(seed=cfg.seed, train_seconds=res.seconds, eval_seconds=time.perf_counter() - t0,
                      history=res.history, config=asdict(cfg))
            results[name][cfg_name].append(ev)
            if disable:
                print(f"  {name:7s} {cfg_name:6s} seed {cfg.seed}: accuracy {ev['accuracy']:.3f} "
                      f"(train {res.seconds:.1f} s, eval {ev['eval_seconds']:.1f} s)")

    summary = {name: {c: {key: summarize([r.get(key) for r in runs]) for key, *_ in METRICS if key in runs[0]}
                      for c, runs in per.items()} for name, per in results.items()}
    figures = {} if args.no_figures else render_figures(datasets, results, examples)
    wall = time.perf_counter() - start
    meta = {"wall_seconds": wall, "mode": mode, "seeds": seeds, "eval_samples": eval_samples,
            "fractions": FRACTIONS, "threads": torch.get_num_threads(), "device": args.device, "amp": args.amp,
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "configs": [list(c) for c in CONFIGS],
            "settings": {n: SETTINGS[n][mode] for n in names}}
    results_json = json.dumps({"meta": meta, "summary": summary, "runs": results,
                               "datasets": {n: ds.description for n, ds in datasets.items()}}, indent=1)
    report = format_report(meta, datasets, summary, list(figures))
    print()
    print(format_table(summary))
    print()
    for line in ablation_lines(summary):
        print(line)
    print()
    print(f"wall time {wall:.0f} s ({len(plan)} runs, {plural(torch.get_num_threads(), 'thread')})")
    saved = out.save({"report.md": report.encode(), "results.json": results_json.encode(), **figures},
                     show=("results.json",))
    if not saved.requested:
        return 1
    print(f"wrote {saved.folder}/: report.md, results.json" + "".join(f", {f}" for f in figures))
    return 0


# ---------------------------------------------------------------------------------------------------
# text


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def cell(stats: dict, fmt: str, spread: bool = True) -> str:
    if not stats or stats["n"] == 0:
        return "-"
    text = fmt.format(stats["mean"])
    return text + (" ± " + fmt.format(stats["std"]) if spread and stats["n"] > 1 else "")


def format_table(summary: dict) -> str:
    """The compact console table: mean (± std over seeds where several) per dataset and config."""
    keys = [m for m in METRICS]
    head = ["dataset", "config"] + [h for _, h, _, _ in keys]
    rows = []
    for name, per in summary.items():
        for cfg_name, stats in per.items():
            rows.append([name, cfg_name] + [cell(stats.get(k), f) for k, _, _, f in keys])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    arrows = ["", ""] + [{"up": "↑", "down": "↓"}[d] for _, _, d, _ in keys]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join(a.ljust(w) for a, w in zip(arrows, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def effect(summary_ds: dict, a: str, b: str, key: str):
    """Mean of b minus mean of a, and the larger of their seed spreads."""
    sa, sb = summary_ds[a].get(key), summary_ds[b].get(key)
    if not sa or not sb or sa["n"] == 0 or sb["n"] == 0:
        return None
    return sb["mean"] - sa["mean"], max(sa["std"], sb["std"])


def ablation_lines(summary: dict) -> list:
    """For every dataset, pair of :data:`ABLATIONS` and saliency metric: what the whitening layers,
    the decorrelation loss, decorrelation as a whole and masking changed, and whether the change is
    larger than the spread over seeds."""
    lines = []
    directions = {k: d for k, _, d, _ in METRICS}
    headers = {k: h for k, h, _, _ in METRICS}
    for name, per in summary.items():
        for title, pairs in ABLATIONS:
            parts = []
            for key in SALIENCY_METRICS + ("accuracy",):
                effs = [effect(per, a, b, key) for a, b in pairs]
                if any(e is None for e in effs):
                    continue
                verdicts = []
                for diff, spread in effs:
                    better = diff > 0 if directions[key] == "up" else diff < 0
                    size = "" if abs(diff) > spread else "~"
                    verdicts.append(f"{diff:+.3f}{size}{'+' if better else '-'}")
                parts.append(f"{headers[key]} {' / '.join(verdicts)}")
            lines.append(f"{name} {title}: " + "; ".join(parts))
    lines.append("(difference of means; + better, - worse; ~ within the spread over seeds)")
    return lines


def format_report(meta: dict, datasets: dict, summary: dict, figures: list) -> str:
    out = ["# sdecor demo: SaliencyDecor on embedded data", ""]
    out.append(f"{meta['mode']} run: {len(CONFIGS)} configurations x {meta['seeds']} seed(s) per dataset, "
               f"tiny CNN, {plural(meta['threads'], 'CPU thread')} on {meta['device']} "
               f"({meta['processor']}), torch {meta['torch']}"
               + (f", training steps under {meta['amp']} autocast" if meta.get("amp", "off") != "off" else "")
               + f"; wall time {meta['wall_seconds']:.0f} s.")
    out.append("")
    out.append("Configurations: " + "; ".join(f"`{n}` {label} (lambda_consistency {lc}, lambda_decor {ld}, "
                                            f"{NORM_LABELS[norm]})"
                                            for n, label, lc, ld, norm in CONFIGS) + ".")
    out.append("Masking: 50% least salient pixels, uniform fill. Saliency: |d logit_y / d x| averaged over "
               f"channels, on {meta['eval_samples']} test images.")
    out.append("")
    out.append("Metrics (arrows: which way is better): accuracy on the whole test split; Gini index of the map "
               "(sparser ↑); normalised entropy (more concentrated ↓); RISE deletion AUC (probability of the "
               "true class as the most salient pixels are set to 0, ↓) and insertion AUC (as they are put "
               "back into a blurred copy, ↑); accuracy with the most salient "
               f"{int(MASKED_AT * 100)}% of pixels replaced by uniform noise (saliency finds the evidence ↓); "
               "share of saliency mass inside the object mask (shapes only, ↑). Values: mean ± standard "
               "deviation over seeds.")
    out.append("")
    for name, per in summary.items():
        out.append(f"## {name}: {datasets[name].description}")
        out.append("")
        keys = [m for m in METRICS if m[0] in next(iter(per.values()))]
        out.append("| config | " + " | ".join(f"{h} {'↑' if d == 'up' else '↓'}" for _, h, d, _ in keys) + " |")
        out.append("|---|" + "---|" * len(keys))
        for cfg_name, stats in per.items():
            out.append(f"| {cfg_name} | " + " | ".join(cell(stats[k], f) for k, _, _, f in keys) + " |")
        out.append("")
    out.append("## Ablation: does decorrelation, not just masking, change saliency?")
    out.append("")
    out.append("Decorrelation is split into its two parts: `ce` -> `whiten` swaps BatchNorm for GroupWhitening "
               "layers with the objective unchanged; `whiten` -> `decor` adds the decorrelation loss with the "
               "layers unchanged.")
    out.append("")
    out.extend(f"- {line}" for line in ablation_lines(summary))
    out.append("")
    if figures:
        out.append("## Figures")
        out.append("")
        out.extend(f"![{f}]({f})" for f in figures)
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# figures


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def render_figures(datasets: dict, results: dict, examples: dict) -> dict:
    """The PNG figures, file name -> bytes: the saliency maps of each dataset, the masking curves."""
    matplotlib = require("matplotlib", "demo", "sdecor demo's figures (--no-figures skips them)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    for name, ds in datasets.items():
        maps = {c: examples.get((name, c)) for c, *_ in CONFIGS}
        n = min(m.shape[0] for m in maps.values() if m is not None)
        cols = 1 + len(CONFIGS)
        fig, axes = plt.subplots(n, cols, figsize=(1.55 * cols, 1.55 * n), squeeze=False)
        for i in range(n):
            img = ds.test.x[i]
            show = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
            axes[i, 0].imshow(show.numpy(), cmap="gray_r" if img.shape[0] == 1 else None,
                              interpolation="nearest")
            title = ds.classes[int(ds.test.y[i])]
            for j, (c, label, *_rest) in enumerate(CONFIGS, start=1):
                m = maps[c][i]
                m = m / m.max().clamp_min(1e-12)
                axes[i, j].imshow(m.numpy(), cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
                if ds.test.mask is not None:
                    axes[i, j].contour(ds.test.mask[i].numpy().astype(float), levels=[0.5], colors="cyan",
                                       linewidths=0.6)
                if i == 0:
                    axes[i, j].set_title(c, fontsize=9)
            if i == 0:
                axes[i, 0].set_title("input", fontsize=9)
            axes[i, 0].set_ylabel(title, fontsize=8)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"{name}: |d logit_y / d x| per configuration (seed 0)"
                     + (", object outline in cyan" if ds.test.mask is not None else ""), fontsize=9)
        fig.tight_layout()
        files[f"saliency_{name}.png"] = png_bytes(fig)
        plt.close(fig)

    panels = (("deletion", "deletion: p(true class)"), ("insertion", "insertion: p(true class)"),
              ("accuracy_under_masking", "accuracy, most salient masked"))
    fig, axes = plt.subplots(len(datasets), len(panels), figsize=(4.0 * len(panels), 3.0 * len(datasets)),
                             squeeze=False)
    for r, name in enumerate(datasets):
        for c, (key, title) in enumerate(panels):
            ax = axes[r, c]
            for cfg_name, label, *_ in CONFIGS:
                runs = results[name][cfg_name]
                curves = torch.tensor([run["curves"][key] for run in runs])
                mean = curves.mean(0)
                line, = ax.plot(FRACTIONS, mean.numpy(), marker=".", label=f"{cfg_name}: {label}")
                if len(runs) > 1:
                    ax.fill_between(FRACTIONS, curves.amin(0).numpy(), curves.amax(0).numpy(),
                                    color=line.get_color(), alpha=0.15)
            ax.set_title(f"{name} {title}", fontsize=9)
            ax.set_xlabel("fraction of pixels, most salient first", fontsize=8)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    files["masking_curves.png"] = png_bytes(fig)
    plt.close(fig)
    return files
