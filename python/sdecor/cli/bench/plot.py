"""One PNG per op: median time of every measured path, per shape, dtype and mode (log scale).

matplotlib comes with the ``bench`` extra (``pip install 'sdecor[bench]'``).
"""

from __future__ import annotations

import io
from pathlib import Path

from ..._optional import require

_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def require_matplotlib():
    """matplotlib, or MissingDependencyError naming the ``bench`` extra."""
    return require("matplotlib", "bench", "sdecor bench's plots")


def plot_op(records: list[dict], op: str, env: dict, path: Path) -> Path | None:
    """Write :func:`render_op`'s PNG to path; returns the path, or None when nothing was timed."""
    png = render_op(records, op, env)
    if png is None:
        return None
    path = Path(path)
    path.write_bytes(png)
    return path


def render_op(records: list[dict], op: str, env: dict) -> bytes | None:
    """Grouped horizontal bars, as PNG bytes; None when nothing was timed.

    Raises MissingDependencyError, naming the extra, when matplotlib is not installed.
    """
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in records if r["op"] == op and r["status"] == "ok"]
    if not rs:
        return None
    cases = list(dict.fromkeys((r["shape_desc"], r["dtype"], r["mode"]) for r in rs))
    impls = list(dict.fromkeys(r["impl"] for r in rs))
    t = {(r["shape_desc"], r["dtype"], r["mode"], r["impl"]): r["time_ms"] for r in rs}
    bar = 0.8 / len(impls)
    height = min(60.0, 1.2 + 0.18 * len(cases) * max(2, len(impls)))
    fig, ax = plt.subplots(figsize=(9, height), dpi=72)
    cmap = plt.get_cmap("tab10")
    for j, impl in enumerate(impls):
        ys, xs = [], []
        for i, c in enumerate(cases):
            if (*c, impl) in t:
                ys.append(i + (j - (len(impls) - 1) / 2) * bar)
                xs.append(t[(*c, impl)])
        ax.barh(ys, xs, height=bar, label=impl, color=cmap(j % 10))
    ax.set_yticks(range(len(cases)))
    ax.set_yticklabels([f"{s} {_SHORT.get(d, d)} {m}" for s, d, m in cases], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median time (ms), log scale")
    threads = f", {env['torch_threads']} thread(s)" if env.get("device") == "cpu" else ""
    ax.set_title(f"{op} on {env['device_name']}{threads}\n"
                 f"torch {env['torch']}, {env['timestamp']}", fontsize=9)
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
