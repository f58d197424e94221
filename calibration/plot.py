"""The frontier as a picture: quality against latency and against FLOPs, levels and profile ranges
marked (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

import io
from pathlib import Path

from deploy.atomic import atomic_file
from deploy.extras import install_command
from deploy.frontier import primary_latency


def plot_frontier(frontier: dict, path: str | Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(f"--plot needs matplotlib: {install_command('plot')}") from None
    rows, levels = frontier["rows"], set(frontier["levels"])
    if any(r["quality"] is None for r in rows):
        raise ValueError("--plot draws quality, and this frontier has none (a decoder export without a tokenizer); "
                         "drop --plot or export with the tokenizer")
    figure, (by_latency, by_flops) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, x_of, label in ((by_latency, primary_latency, "latency, ms (median)"),
                              (by_flops, lambda r: r["flops_fraction"], "FLOPs fraction of the dense model")):
        axis.plot([x_of(r) for r in rows], [r["quality"] for r in rows], "o-", color="tab:blue", label="measured")
        chosen = [r for r in rows if r["rank"] in levels]
        axis.plot([x_of(r) for r in chosen], [r["quality"] for r in chosen], "s", color="tab:red", markersize=9,
                  fillstyle="none", label="level")
        for row in chosen:
            axis.annotate(str(row["rank"]), (x_of(row), row["quality"]), textcoords="offset points", xytext=(4, -10))
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    by_latency.set_ylabel(f"quality ({frontier['quality_metric']})")
    by_latency.legend(loc="lower right")
    figure.suptitle(f"rank frontier — TensorRT profiles {frontier['profiles']} — {frontier['backend']['runtime']}")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    atomic_file(path, buffer.getvalue())
