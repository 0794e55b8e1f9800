"""The report's figures, drawn with matplotlib's object API onto the Agg canvas: no display, no pyplot state.

Each function takes what it draws (labels, probabilities, histories, images) and a PNG path, and returns the
path. Colours follow one order everywhere, so a model keeps its colour across figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay, brier_score_loss

CLASS_NAMES = ("hem", "all")  # label 0, label 1
DPI = 100


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
    except OSError as e:  # a full disk or a file-size limit: an error that names the file (write() does not)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    return path


def confusion_figure(confusions: dict[str, np.ndarray], path: Path) -> Path:
    """One column per model (scikit-learn's ConfusionMatrixDisplay): counts on top, row-normalised shares below
    (rows true, columns predicted)."""
    n = len(confusions)
    fig = Figure(figsize=(3.0 * n + 0.5, 5.8))
    axes = np.asarray(fig.subplots(2, n, squeeze=False))
    for j, (name, matrix) in enumerate(confusions.items()):
        matrix = np.asarray(matrix, dtype=float)
        rows = matrix.sum(axis=1, keepdims=True)
        shares = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
        for i, (values, fmt, title) in enumerate(((matrix.astype(int), "d", "counts"),
                                                  (shares, ".1%", "row-normalised"))):
            ax = axes[i, j]
            ConfusionMatrixDisplay(values, display_labels=list(CLASS_NAMES)).plot(
                ax=ax, cmap="Blues", colorbar=False, values_format=fmt, im_kw={"vmin": 0} if i == 0 else
                {"vmin": 0, "vmax": 1}, text_kw={"fontsize": 11})
            ax.set_title(f"{name}\n{title}" if i == 0 else title, fontsize=10)
            ax.set_xlabel("predicted", fontsize=9)
            ax.set_ylabel("true", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def roc_pr_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """ROC (left) and precision-recall of `all` (right), one curve per model, on pooled OOF predictions
    (scikit-learn's RocCurveDisplay and PrecisionRecallDisplay; AUC and average precision in the legend)."""
    fig = Figure(figsize=(11, 4.6))
    roc_ax, pr_ax = fig.subplots(1, 2)
    drawn = [(name, labels, prob) for name, (labels, prob) in curves.items() if len(np.unique(labels)) > 1]
    for i, (name, labels, prob) in enumerate(drawn):
        last = i == len(drawn) - 1  # the chance level once, after the curves
        style = {"color": _colour(i), "lw": 1.6}
        RocCurveDisplay.from_predictions(labels, prob, name=name, ax=roc_ax, curve_kwargs=style,
                                         plot_chance_level=last, chance_level_kw={"color": "grey", "ls": ":"})
        PrecisionRecallDisplay.from_predictions(labels, prob, name=name, ax=pr_ax, curve_kwargs=style,
                                                plot_chance_level=last, chance_level_kw={"color": "grey", "ls": ":"})
    roc_ax.set(xlabel="false positive rate (hem called all)", ylabel="true positive rate (recall of all)",
               title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    pr_ax.set(xlabel="recall of all", ylabel="precision of all", title="precision-recall", xlim=(0, 1),
              ylim=(0, 1.01))
    for ax in (roc_ax, pr_ax):
        ax.legend(loc="lower right" if ax is roc_ax else "lower left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def calibration_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, bins: int = 10) -> Path:
    """Reliability diagram (scikit-learn's CalibrationDisplay: share of `all` per bin of predicted probability)
    over a histogram of the predicted probabilities; the legend gives each model's Brier score."""
    fig = Figure(figsize=(6.4, 6.8))
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1.3], sharex=True)
    edges = np.linspace(0, 1, bins + 1)
    for i, (name, (labels, prob)) in enumerate(curves.items()):
        CalibrationDisplay.from_predictions(labels, prob, n_bins=bins, strategy="uniform", ax=top, ref_line=i == 0,
                                            name=f"{name} (Brier {brier_score_loss(labels, prob):.3f})",
                                            marker="o", ms=4, color=_colour(i), lw=1.4)
        bottom.hist(prob, bins=edges, histtype="step", color=_colour(i), lw=1.4)
    top.set(xlabel="", ylabel="share of all (true)", title=f"calibration ({bins} bins of equal width)",
            ylim=(-0.02, 1.02))
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.set(xlabel="predicted probability of all", ylabel="images", xlim=(0, 1))
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def training_figure(name: str, histories: dict[int, pd.DataFrame], monitor: str, best_epochs: Mapping[int, int | None],
                    path: Path) -> Path:
    """Loss (training solid, validation dashed) and the validation score per epoch, one colour per fold;
    a dot marks each fold's kept epoch: the one its best.pt and oof.csv come from (`best_epochs`, 0-based). With
    select=inner, the inner split's score (which chose that epoch) is drawn dotted beside the fold's."""
    fig = Figure(figsize=(11, 4.2))
    loss_ax, score_ax = fig.subplots(1, 2)
    score_col = monitor if monitor != "loss" else "f1"
    for i, (fold, h) in enumerate(sorted(histories.items())):
        epoch = h["epoch"].to_numpy() + 1
        loss_ax.plot(epoch, h["train_loss"], color=_colour(i), lw=1.4, label=f"fold{fold}")
        loss_ax.plot(epoch, h["val_loss"], color=_colour(i), lw=1.4, ls="--")
        score_ax.plot(epoch, h[score_col], color=_colour(i), lw=1.4, label=f"fold{fold}")
        if f"inner_{score_col}" in h:  # select=inner: the curve that chose the epoch, beside the fold's
            score_ax.plot(epoch, h[f"inner_{score_col}"], color=_colour(i), lw=1.2, ls=":")
        best = h[h["epoch"] == best_epochs.get(fold)]
        if len(best):
            score_ax.plot(best["epoch"] + 1, best[score_col], "o", color=_colour(i), ms=6)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy (log scale)", yscale="log",
                title=f"{name}: loss (solid: training, dashed: validation)")
    label = {"f1": "weighted F1"}.get(score_col, score_col)
    score_ax.set(xlabel="epoch", ylabel=f"validation {label}", title=f"{name}: validation {label} (dot: weights kept)")
    loss_ax.legend(fontsize=8, loc="upper right")
    score_ax.legend(fontsize=8, loc="lower right")
    for ax in (loss_ax, score_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return _save(fig, path)


def image_grid(tiles: list[tuple[np.ndarray | None, str]], path: Path, title: str, cols: int = 4) -> Path:
    """Images with a caption each; None draws an empty tile (an image that could not be read)."""
    cols = max(1, min(cols, len(tiles)))
    rows = max(1, -(-len(tiles) // cols))
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows + 0.4))
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (img, caption) in zip(axes, tiles):
        if img is not None:
            ax.imshow(img)
        else:
            ax.text(0.5, 0.5, "cannot read\nthis image", ha="center", va="center", fontsize=9, color="darkred")
        ax.set_title(caption, fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(tiles):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def feature_grid(maps: np.ndarray, channels: list[int], title: str, path: Path, cols: int = 8) -> Path:
    """Feature maps (n x h x w, each already scaled to [0, 1]) tiled into one picture (viridis: dark low,
    yellow high), each labelled with its channel. One image, not n axes: ten times quicker to draw."""
    n, h, w = maps.shape
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    gap = max(1, h // 16)
    sheet = np.ones((rows * (h + gap) - gap, cols * (w + gap) - gap, 4))  # white between the tiles
    colours = colormaps["viridis"](maps)
    for i in range(n):
        r, c = divmod(i, cols)
        sheet[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = colours[i]
    fig = Figure(figsize=(1.5 * cols, 1.5 * rows * h / w + 0.5))
    ax = fig.subplots()
    ax.imshow(sheet, interpolation="nearest")
    for i, ch in enumerate(channels):
        r, c = divmod(i, cols)
        ax.text(c * (w + gap) + 0.5, r * (h + gap) + 0.5, f"{ch}", fontsize=6, color="white", va="top",
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "lw": 0})
    ax.axis("off")
    ax.set_title(f"{title}\n(the {n} most active channels, numbered, each scaled to its own range)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def gradcam_figure(image: np.ndarray, cam: np.ndarray, overlay: np.ndarray, title: str, path: Path) -> Path:
    """The network's input, the Grad-CAM heat map and the two overlaid, side by side."""
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 3)
    axes[0].imshow(image)
    axes[0].set_title("input (cropped, resized)", fontsize=9)
    shown = axes[1].imshow(cam, cmap="jet", vmin=0, vmax=1)
    axes[1].set_title("Grad-CAM (0 to 1)", fontsize=9)
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(overlay)
    axes[2].set_title("overlay", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def probability_text(p: float) -> str:
    """'= 0.123', for `p(all) = 0.123`; extremes as '< 0.001' and '> 0.999', not a misleading 0.000 or 1.000."""
    return "< 0.001" if p < 0.001 else "> 0.999" if p > 0.999 else f"= {p:.3f}"
