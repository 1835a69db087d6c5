"""The report's pictures: per-layer drift of the quantized stream (paper, Fig. 4), the
alpha x beta perplexity heatmap of a sweep, and the per-layer strengths of a searched run. Matplotlib only, written to PNG, no display needed."""

from __future__ import annotations

import math


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_divergence(series: dict[str, list[dict]], path: str, title: str = "") -> None:
    """One line per variant: clean-vs-quantized MSE after each decoder layer, raw and RMS-normalised
    (outlier tokens excluded). Log scale: the drift grows over decades from the first layer to the last."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("tab10" if len(series) <= 10 else "viridis")
    for i, (label, layers) in enumerate(series.items()):
        color = cmap(i if len(series) <= 10 else i / max(1, len(series) - 1))
        x = [row["layer"] for row in layers]
        for ax, field in zip(axes, ("mse", "mse_normalized")):
            ax.plot(x, [row[field] for row in layers], marker="o", ms=3, lw=1.3, color=color, label=label)
    from matplotlib.ticker import MaxNLocator

    for ax, sub in zip(axes, ("hidden states", "RMS-normalised hidden states")):
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("MSE vs clean stream (outliers excluded)")
        ax.set_title(f"{title}: {sub}" if title else sub)
        ax.grid(alpha=0.3, which="both")
    if len(series) <= 6:
        for ax in axes:
            ax.legend(fontsize=8)
        fig.tight_layout()
    else:  # many variants: one legend beside the plots instead of covering the lines
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=7)
        fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heatmaps(panels: list[dict], path: str) -> None:
    """One heatmap per panel: ``{"title", "alphas", "betas", "ppl": {(alpha, beta): value}}``.
    Rows are alpha, columns beta; every cell is annotated; the colour scale is logarithmic and
    reversed so that the best (lowest) perplexity is the brightest."""
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 + 1.1 * max(len(p["betas"]) for p in panels) * len(panels),
                                                        1.6 + 0.7 * max(len(p["alphas"]) for p in panels)),
                             squeeze=False)
    for ax, panel in zip(axes[0], panels):
        alphas, betas = panel["alphas"], panel["betas"]
        grid = [[panel["ppl"].get((a, b), math.nan) for b in betas] for a in alphas]
        values = [v for row in grid for v in row if math.isfinite(v)]
        image = ax.imshow(grid, cmap="viridis_r", aspect="auto",
                          norm=LogNorm(vmin=min(values), vmax=max(values)) if len(set(values)) > 1 else None)
        best = min(values)
        for r, row in enumerate(grid):
            for c, v in enumerate(row):
                if math.isfinite(v):
                    ax.text(c, r, f"{v:.1f}", ha="center", va="center", fontsize=8,
                            fontweight="bold" if v == best else "normal",
                            color="black" if v < (best * max(values)) ** 0.5 else "white")
        ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("beta")
        ax.set_ylabel("alpha (alpha_in = alpha_out)")
        ax.set_title(panel["title"], fontsize=9)
        bar = fig.colorbar(image, ax=ax, label="perplexity")
        from matplotlib.ticker import FormatStrFormatter

        bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%.4g"))
        bar.ax.yaxis.set_minor_formatter(FormatStrFormatter("%.4g"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_strengths(layers: list[dict], path: str, title: str = "", drift: dict[str, list[dict]] | None = None) -> None:
    """Each layer's strengths (rows of ``layer_rows`` with ``strengths``: sub-layer -> [alpha_in,
    alpha_out, beta]): alpha and beta per sub-layer, as steps over depth; with ``drift`` (label ->
    rows), a third panel of those variants' RMS-normalised drift beside them."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    panels = 3 if drift else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 3.8))
    x = [row["layer"] for row in layers]
    subs = list(layers[0]["strengths"]) if layers else []
    for ax, (name, column) in zip(axes, (("alpha_out", 1), ("beta", 2))):
        for i, sub in enumerate(subs):
            values = [row["strengths"][sub][column] for row in layers]
            ax.step(x, [v + (i - 0.5) * 0.012 for v in values], where="mid", marker="o", ms=3, lw=1.2, label=sub)
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel(name)
        ax.set_title(f"{title}: {name.split()[0]} per layer" if title else f"{name.split()[0]} per layer", fontsize=9)
    for label, rows in (drift or {}).items():
        axes[2].plot([r["layer"] for r in rows], [r["mse_normalized"] for r in rows], marker="o", ms=3, lw=1.2,
                     label=label)
    if drift:
        axes[2].set_yscale("log")
        axes[2].set_ylabel("normalised MSE vs clean stream")
        axes[2].set_title("drift of the quantized stream", fontsize=9)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("decoder layer")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
