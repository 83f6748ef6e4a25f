"""Pictures people would rather see than read: kept-token overlays and training curves (PNG)."""

from __future__ import annotations

import csv
from pathlib import Path

from .models.sequence import KeptTokens


def kept_tokens(handle, sample: int = 0) -> KeptTokens:
    """The last forward's selection for the first image of `sample` (a hard-mode handle)."""
    return handle.kept.first_image_of(sample)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


OVERLAY_IMAGE_WIDTH, OVERLAY_ROW_HEIGHT = 2.2, 2.3  # inches per image column / per pruner row
OVERLAY_MIN_WIDTH = 5.0  # inches: the one-line legend above the images


def plot_kept_tokens(
    images: list, rows: list[tuple[str, list[KeptTokens]]], grid: tuple[int, int], path: str | Path
) -> Path:
    """One row per pruner, one column per image: kept tokens outlined, pillars filled, stage-2 survivors red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    height, width = grid
    width = max(OVERLAY_MIN_WIDTH, OVERLAY_IMAGE_WIDTH * len(images))  # one image: the legend still fits
    fig, axes = plt.subplots(len(rows), len(images), figsize=(width, OVERLAY_ROW_HEIGHT * len(rows)), squeeze=False)
    for r, (name, kept_per_image) in enumerate(rows):
        for c, (image, kept) in enumerate(zip(images, kept_per_image)):
            ax = axes[r][c]
            ax.imshow(image)
            cell_w, cell_h = image.size[0] / width, image.size[1] / height
            pillars = set(kept.pillars)
            for index in kept.stage1:
                top, left = divmod(index, width)
                ax.add_patch(
                    Rectangle(
                        (left * cell_w, top * cell_h),
                        cell_w,
                        cell_h,
                        fill=index in pillars,
                        alpha=0.45 if index in pillars else 0.9,
                        edgecolor="cyan",
                        facecolor="orange",
                        linewidth=0.8,
                    )
                )
            for index in kept.stage2 or []:
                top, left = divmod(index, width)
                ax.add_patch(
                    Rectangle((left * cell_w, top * cell_h), cell_w, cell_h, fill=False, edgecolor="red", linewidth=1.6)
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle("kept tokens: cyan = after stage 1, orange = pillar, red = after stage 2", fontsize=9)
    return _save(fig, path)


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning CSVLogger metrics.csv -> {metric: [(step, value), ...]} (empty cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(row["step"])
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((step, float(value)))
    return series


EMA_SMOOTHING = 0.9  # TensorBoard's default weight: each point keeps 90% of the running average
SMOOTHED_METRICS = ("train/lm_loss", "train/loss", "train/distill_loss")  # per-batch noise hides their trend


def exponential_moving_average(values: list[float], smoothing: float = EMA_SMOOTHING) -> list[float]:
    """TensorBoard's smoothing: an EMA debiased at the start (the first points are not pulled towards zero)."""
    average, smoothed = 0.0, []
    for count, value in enumerate(values, start=1):
        average = smoothing * average + (1 - smoothing) * value
        smoothed.append(average / (1 - smoothing**count))
    return smoothed


def plot_training_curves(
    runs: dict[str, str | Path],
    path: str | Path,
    metrics=("train/lm_loss", "train/temperature", "train/vision_tokens_per_layer"),
) -> Path:
    """Loss, temperature and (expected) vision tokens per image per decoder layer against step, one line per run.

    Losses are drawn as a smoothed line over their faint raw values; a dotted line marks where a run's training
    switches to hard (physically dropped) steps, where a soft form that differs from its hard one shows a jump.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False, sharex=True)
    for index, (name, csv_path) in enumerate(runs.items()):
        if not Path(csv_path).is_file():  # a run too short to log anything
            continue
        series = read_metrics_csv(csv_path)
        hard_steps = {step for step, hard in series.get("train/hard", []) if hard}
        for ax, metric in zip(axes[0], metrics):
            points = series.get(metric, [])
            if metric == "train/temperature":  # it only acts on soft steps: where a line ends, hard training begins
                points = [(step, value) for step, value in points if step not in hard_steps]
            if not points:
                continue
            steps, values = zip(*points)
            colour = f"C{index}"  # one colour per run in every panel
            if metric in SMOOTHED_METRICS:
                ax.plot(steps, values, color=colour, alpha=0.2, linewidth=0.8)
                ax.plot(steps, exponential_moving_average(list(values)), label=name, color=colour)
                soft_steps = [step for step, hard in series.get("train/hard", []) if not hard]
                if soft_steps and hard_steps:
                    ax.axvline(min(hard_steps), color=colour, linestyle=":", linewidth=1)
            else:
                ax.plot(steps, values, label=name, color=colour)
    for ax, metric in zip(axes[0], metrics):
        ax.set_title(f"{metric} (soft steps)" if metric == "train/temperature" else metric)
        ax.set_xlabel("step")
        if metric == "train/temperature":
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, path)
