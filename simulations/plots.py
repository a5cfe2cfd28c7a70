"""Pictures for reports: training curves (one figure, stage by stage)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_curves(history: list[dict], path: Path | str) -> Path:
    """Train loss and validation Dice / macro-AUC per epoch, stage 1 then stage 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = np.arange(1, len(history) + 1)
    stage = np.asarray([h["stage"] for h in history])
    for ax, key, title in zip(
        axes,
        ("train_loss", "val/dice", "val/macro_auc_study"),
        ("training loss", "validation Dice", "validation macro-AUC (study)"),
    ):
        y = np.asarray([h.get(key, np.nan) for h in history], dtype=float)
        for s, colour in ((1, "tab:blue"), (2, "tab:orange")):
            sel = stage == s
            if sel.any():
                ax.plot(x[sel], y[sel], "o-", color=colour, label=f"stage {s}")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
