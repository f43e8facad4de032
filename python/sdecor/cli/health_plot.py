"""The figure of ``sdecor inspect --out``: per whitening layer, the whitening error of T Newton-Schulz
steps against T (log scale), and the eigenvalue spectrum of the layer's worst group.

matplotlib comes with the ``demo`` extra (``pip install 'sdecor[demo]'``).
"""

from __future__ import annotations

from .._optional import require

# the floor of the log scales: float64 rounding (errors) and a share of eps (eigenvalues), so that a
# value of exactly 0 stays on the plot
ERROR_FLOOR = 1e-17


def plot_health(curves, report, path, title: str = "", dpi: int = 90) -> None:
    """Write the figure of :func:`sdecor.cli.inspect.layer_curves` ``curves`` and their ``report`` to
    ``path`` (PNG). Left: the largest whitening error over each layer's groups after T steps, with the
    report's tol and each layer's T. Right: lambda_i(Sigma) + eps of each layer's worst group,
    descending, with eps: directions on the eps line are scaled by eps, not by the data."""
    matplotlib = require("matplotlib", "demo", "sdecor inspect's figure (--out)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curves)
    many = n > 8
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12.5 if many else 10.5, 4.2))
    cmap = plt.get_cmap("viridis")
    colors = [cmap(0.9 * i / max(1, n - 1)) for i in range(n)]
    for c, color in zip(curves, colors):
        steps = range(1, len(c.errors) + 1)
        ax_t.semilogy(steps, c.errors.clamp_min(ERROR_FLOOR).numpy(), color=color, lw=1.2, label=c.name)
        values = (c.eigenvalues.clamp_min(0.0) + c.eps).numpy()
        ax_s.semilogy(range(1, len(values) + 1), values, marker="o", ms=2.5, lw=1.0, color=color,
                      label=f"{c.name} (group {c.group})")
    ax_t.axhline(report.tol, color="black", ls="--", lw=0.8, label=f"tol {report.tol:g}")
    for T in sorted({c.T for c in curves}):
        ax_t.axvline(T, color="gray", ls=":", lw=0.9, label=f"layer T={T}")
    ax_t.set_xlabel("Newton-Schulz steps T")
    ax_t.set_ylabel("whitening error ||W S W^T - I||_F / sqrt(d)")
    ax_t.set_title("whitening error after T steps (largest over the groups, float64)", fontsize=9)
    for eps in sorted({c.eps for c in curves}):
        ax_s.axhline(eps, color="black", ls="--", lw=0.8, label=f"eps {eps:g}")
    ax_s.set_xlabel("eigenvalue index (descending)")
    ax_s.set_ylabel("eigenvalue of Sigma + eps I")
    ax_s.set_title("spectrum of each layer's worst group", fontsize=9)
    for ax in (ax_t, ax_s):
        ax.grid(True, which="major", alpha=0.3)
        ax.tick_params(labelsize=8)
    if many:
        ax_s.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=1 if n <= 24 else 2,
                    frameon=False)
        ax_t.legend(handles=ax_t.get_legend_handles_labels()[0][n:], fontsize=7, loc="upper right")
    else:
        ax_t.legend(fontsize=7, loc="upper right")
        ax_s.legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
