"""Figures of an evaluation: ID against OOD accuracy, coefficient histograms, and multi-task accuracy per task.

The functions draw on `matplotlib.figure.Figure` with the Agg canvas and never touch pyplot's global state, so
they work on machines without a display and leave the caller's backend unchanged.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import beta as beta_distribution
from transformers.utils import logging

from .mixture import BetaMixture
from .saving import move_into_place


logger = logging.get_logger(__name__)

__all__ = [
    "coefficient_histogram_figure",
    "id_ood_figure",
    "multitask_accuracy_figure",
    "plot_coefficient_histograms",
    "plot_id_ood",
    "plot_multitask_accuracy",
]

# Methods drawn as single points on the ID-OOD plane: (method key, label, marker, colour).
_POINT_METHODS = (
    ("zero_shot", "Zero-shot", "s", "#4d4d4d"),
    ("fine_tuned", "Fine-tuned", "D", "#000000"),
    ("output_ensemble", "Dynamic output ensemble", "^", "#2ca02c"),
    ("dawin_mixture", "DaWin (mixture)", "P", "#ff7f0e"),
    ("dawin_sample", "DaWin (sample)", "*", "#d62728"),
)
_SWEEP_COLOR = "#1f77b4"
# Multi-task methods drawn as bars, in order; the other fine-tuned endpoints stay in the table only.
_MULTITASK_BARS = (
    ("pretrained", "#9e9e9e"),
    ("fine_tuned_expert", "#000000"),
    ("weight_average", "#8c6d31"),
    ("task_arithmetic", "#1f77b4"),
    ("ties", "#9467bd"),
    ("dawin_dataset_mean", "#ff7f0e"),
    ("dawin_sample", "#d62728"),
)
_DPI = 150
_HISTOGRAM_BINS = 40
_DENSITY_POINTS = 2001


def _save(figure: Figure, path: str | Path) -> Path:
    """Write `figure` as a PNG through a temporary file, so an interrupted write leaves an earlier figure intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".png", delete=False) as handle:
        temporary = Path(handle.name)
        try:
            figure.savefig(handle, format="png", dpi=_DPI, bbox_inches="tight")
        except BaseException:
            handle.close()
            temporary.unlink()
            raise
    move_into_place(temporary, path)
    return path


def _percent(value: float) -> float:
    return 100.0 * float(value)


def plot_id_ood(results: Mapping, path: str | Path) -> Path:
    """Plot in-distribution accuracy against the OOD average, with the WiSE-FT sweep as a curve.

    The sweep's points are labelled with their alpha, the weight on the fine-tuned endpoint. The endpoints, the
    dynamic output ensemble and DaWin's sample and mixture modes are single points.

    Args:
        results (`Mapping`): Output of `hf_dawin.evaluation.evaluate_pair`, with at least one shifted set.
        path (`str` or `Path`): PNG file to write; parent folders are created.

    Returns:
        `Path` of the written file.

    Raises:
        ValueError: If the evaluation has no shifted (OOD) set.

    Example:

    ```python
    >>> results = evaluate_pair(model, sets)
    >>> plot_id_ood(results, "results/id_vs_ood.png")
    PosixPath('results/id_vs_ood.png')
    ```
    """
    return _save(id_ood_figure(results), path)


def id_ood_figure(results: Mapping) -> Figure:
    """Draw the figure of [`plot_id_ood`], with accuracies in percent, and return it without saving."""
    sweep = results["wise_ft_sweep"]
    id_name = results["in_distribution"]
    if not results.get("out_of_distribution") or sweep.get("ood_average") is None:
        raise ValueError("The ID-OOD plot needs at least one shifted (OOD) set, but the evaluation has none.")

    figure = Figure(figsize=(7.0, 5.5))
    axes = figure.add_subplot()

    # WiSE-FT sweep: one point per alpha, joined in alpha order.
    sweep_id = [_percent(value) for value in sweep["accuracy"][id_name]]
    sweep_ood = [_percent(value) for value in sweep["ood_average"]]
    axes.plot(sweep_id, sweep_ood, "-o", color=_SWEEP_COLOR, markersize=4, linewidth=1.5, label="WiSE-FT sweep", zorder=2)
    summary = results["summary"]
    plotted = [(x, y) for x, y in zip(sweep_id, sweep_ood)]
    for method, *_ in _POINT_METHODS:
        if method in summary:
            plotted.append((_percent(summary[method]["id"]), _percent(summary[method]["ood_average"])))
    spans = tuple(max(values) - min(values) or 1.0 for values in zip(*plotted))
    for (x, y), alphas in _alphas_by_point(sweep["alphas"], sweep_id, sweep_ood, spans).items():
        axes.annotate(
            "α=" + ", ".join(f"{alpha:g}" for alpha in alphas),
            (x, y),
            textcoords="offset points",
            xytext=(6, -11),
            fontsize=7,
            color=_SWEEP_COLOR,
        )

    # Single methods. The large star is drawn below the other markers, so a method scoring exactly as DaWin
    # (sample) stays visible inside it.
    for method, label, marker, color in _POINT_METHODS:
        if method not in summary:
            continue
        x, y = _percent(summary[method]["id"]), _percent(summary[method]["ood_average"])
        is_star = marker == "*"
        axes.scatter(
            [x], [y], marker=marker, s=320 if is_star else 70, color=color, edgecolors="white", linewidths=0.8,
            label=label, zorder=3 if is_star else 4,
        )

    ood_names = ", ".join(results["out_of_distribution"])
    axes.set_xlabel(f"ID accuracy (%) on {id_name}")
    axes.set_ylabel("OOD average accuracy (%)")
    axes.set_title(f"ID vs. OOD accuracy (OOD: {ood_names})", fontsize=10)
    axes.grid(True, linestyle=":", linewidth=0.6)
    axes.margins(0.12)
    axes.legend(loc="best", fontsize=8, framealpha=0.9)
    return figure


# Sweep points closer than this fraction of the plotted span share one label, whose text would otherwise overlap.
_LABEL_MERGE_DISTANCE = 0.04


def _alphas_by_point(
    alphas: Sequence[float], xs: Sequence[float], ys: Sequence[float], spans: tuple[float, float] = (1.0, 1.0)
) -> dict:
    """Group the sweep's alphas by plotted point, so alphas at equal or nearby points share one label.

    `spans` are the x and y extents of the plotted data. A point joins the first group whose labelled point is
    closer than `_LABEL_MERGE_DISTANCE`, with each axis measured in units of its span. The label stays at that
    first point.
    """
    groups: dict[tuple[float, float], list[float]] = {}
    for alpha, x, y in zip(alphas, xs, ys):
        for anchor_x, anchor_y in groups:
            if math.hypot((x - anchor_x) / spans[0], (y - anchor_y) / spans[1]) < _LABEL_MERGE_DISTANCE:
                groups[(anchor_x, anchor_y)].append(alpha)
                break
        else:
            groups[(x, y)] = [alpha]
    return groups


def _histogram_range(values: np.ndarray) -> tuple[float, float]:
    """Return [0, 1], or a window around the values when they span less than half of it."""
    low, high = float(values.min()), float(values.max())
    if high - low >= 0.5:
        return 0.0, 1.0
    padding = max(0.05, 0.25 * (high - low))
    return max(0.0, low - padding), min(1.0, high + padding)


def _mixture_density(mixture: BetaMixture, grid: np.ndarray) -> np.ndarray:
    density = np.zeros_like(grid)
    for weight, alpha, beta in zip(mixture.weights_, mixture.alphas_, mixture.betas_):
        density += weight * beta_distribution.pdf(grid, alpha, beta)
    return density


def plot_coefficient_histograms(
    results: Mapping, coefficients: Mapping[str, Sequence[float]], path: str | Path
) -> Path:
    """Plot each set's histogram of coefficients with the density of its fitted Beta mixture.

    Args:
        results (`Mapping`): Output of `hf_dawin.evaluation.evaluate_pair`; `results["sets"][name]["mixture"]`
            contains each set's fitted mixture.
        coefficients (`Mapping[str, Sequence[float]]`): Coefficients of each set, shape `(num_examples,)` (the
            `coefficients` entry of the evaluation results, or the arrays of `coefficients.npz`).
        path (`str` or `Path`): PNG file to write; parent folders are created.

    Returns:
        `Path` of the written file.

    Raises:
        ValueError: If `coefficients` has no set of `results`.
    """
    return _save(coefficient_histogram_figure(results, coefficients), path)


def coefficient_histogram_figure(results: Mapping, coefficients: Mapping[str, Sequence[float]]) -> Figure:
    """Draw the figure of [`plot_coefficient_histograms`], one panel per set, and return it without saving."""
    names = [name for name in results["sets"] if name in coefficients]
    if not names:
        raise ValueError(
            f"No coefficients were given for the evaluated sets {list(results['sets'])}. Received sets "
            f"{sorted(coefficients)}."
        )
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    panels = figure.subplots(rows, columns, squeeze=False)

    for index, name in enumerate(names):
        axes = panels[index // columns][index % columns]
        values = np.asarray(coefficients[name], dtype=np.float64)
        low, high = _histogram_range(values)
        heights, _, _ = axes.hist(
            values, bins=_HISTOGRAM_BINS, range=(low, high), density=True, color="#9ecae1", edgecolor="white",
            linewidth=0.4, label="coefficients",
        )
        mixture = BetaMixture.from_dict(results["sets"][name]["mixture"])
        if mixture.is_fitted:
            grid = np.linspace(low, high, _DENSITY_POINTS)[1:-1]
            density = _mixture_density(mixture, grid)
            axes.plot(grid, density, color="#d62728", linewidth=1.4, label=f"Beta mixture (K={mixture.n_components_})")
            for component, mean in enumerate(mixture.component_means):
                label = "component means" if component == 0 else None
                axes.axvline(mean, color="#d62728", linestyle="--", linewidth=0.8, label=label)
        # A near-constant component has a very tall, narrow density, so the axis is capped near the histogram.
        # The dashed lines still mark every component mean.
        top = max(float(np.max(heights)) if len(heights) else 0.0, 1.0)
        axes.set_ylim(0.0, 1.35 * top)
        axes.set_xlim(low, high)
        role = "ID" if name == results["in_distribution"] else "OOD"
        axes.set_title(f"{name} ({role}): n={values.size}, mean λ={values.mean():.3f}", fontsize=9)
        axes.set_xlabel("coefficient λ (weight on fine-tuned)", fontsize=8)
        axes.set_ylabel("density", fontsize=8)
        axes.tick_params(labelsize=7)
        if index == 0:
            axes.legend(fontsize=7, loc="upper left")

    for index in range(len(names), rows * columns):
        panels[index // columns][index % columns].set_visible(False)
    return figure


def plot_multitask_accuracy(results: Mapping, path: str | Path) -> Path:
    """Plot a multi-task evaluation as grouped bars: accuracy of each method per task and averaged over tasks.

    The bars are the pre-trained endpoint, the expert (the fine-tuned endpoint of each task, when every task has
    one), weight averaging, task arithmetic, TIES-merging and DaWin's two modes, as far as the evaluation has them.

    Args:
        results (`Mapping`): Output of `hf_dawin.evaluation_multitask.evaluate_multitask`.
        path (`str` or `Path`): PNG file to write; parent folders are created.

    Returns:
        `Path` of the written file.
    """
    return _save(multitask_accuracy_figure(results), path)


def multitask_accuracy_figure(results: Mapping) -> Figure:
    """Draw the figure of [`plot_multitask_accuracy`], with accuracies in percent, and return it without saving."""
    tasks = list(results["tasks"])
    groups = [*tasks, "Average"]
    bars = [(method, color) for method, color in _MULTITASK_BARS if method in results["methods"]]
    width = 0.8 / max(len(bars), 1)

    figure = Figure(figsize=(max(6.0, 1.6 * len(groups) + 2.0), 4.8))
    axes = figure.add_subplot()
    for position, (method, color) in enumerate(bars):
        summary = results["summary"][method]
        values = [_percent(summary["per_task"][task]) for task in tasks] + [_percent(summary["average"])]
        offsets = np.arange(len(groups)) - 0.4 + width * (position + 0.5)
        axes.bar(offsets, values, width=width * 0.92, color=color, label=results["method_labels"][method])
    axes.set_xticks(np.arange(len(groups)), groups)
    axes.set_ylabel("Accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_title(f"Accuracy per task, merging {len(results['fine_tuned_names'])} fine-tuned endpoints", fontsize=10)
    axes.grid(True, axis="y", linestyle=":", linewidth=0.6)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.9)
    return figure
