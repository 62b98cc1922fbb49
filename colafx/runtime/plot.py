"""Small matplotlib helpers (Agg backend, no display needed) for training curves and bench plots."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence


def plot_curves(series: Mapping[str, Sequence[tuple[float, float]]], path: str | os.PathLike,
                xlabel: str = "step", ylabel: str = "loss", title: str = "", logy: bool = False) -> Path:
    """Draw one line per entry of ``series`` (name -> [(x, y), ...]) and save a PNG to ``path``.

    Series with no points are left out. The file is written atomically.

    Returns:
        the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from colafx.files import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, marker="o" if len(xs) < 20 else None, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(series.values()):
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
