"""Figures of an evaluation: what they draw, that they are written, and their wiring into `hf-dawin evaluate`."""

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import beta as beta_distribution

from hf_dawin import BetaMixture, DaWinCLIPModel
from hf_dawin.cli import main, write_results
from hf_dawin.evaluation import EvaluationSet, EvaluationSettings, evaluate_pair
from hf_dawin.plots import (
    coefficient_histogram_figure,
    id_ood_figure,
    multitask_accuracy_figure,
    plot_coefficient_histograms,
    plot_id_ood,
    plot_multitask_accuracy,
)

from .conftest import TINY_CLASS_NAMES, TINY_IMAGE_SIZE, TINY_TEMPLATES


def tensor_set(name, pixel_values, labels, *, in_distribution=False):
    def batches():
        for start in range(0, len(labels), 8):
            stop = min(start + 8, len(labels))
            yield pixel_values[start:stop], labels[start:stop], torch.arange(start, stop)

    return EvaluationSet(name, batches, len(labels), in_distribution=in_distribution)


@pytest.fixture(scope="module")
def results(tiny_pair_dirs):
    model = DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], tiny_pair_dirs[1], class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES
    )
    generator = torch.Generator().manual_seed(9)
    pixel_values = torch.randn(36, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)
    labels = torch.randint(0, len(TINY_CLASS_NAMES), (36,), generator=generator)
    sets = [
        tensor_set("clean", pixel_values[:12], labels[:12], in_distribution=True),
        tensor_set("noisy", pixel_values[12:24] * 3.0, labels[12:24]),
        tensor_set("inverted", -pixel_values[24:], labels[24:]),
    ]
    return evaluate_pair(model, sets, EvaluationSettings(alphas=(0.0, 0.25, 0.5, 0.75, 1.0), progress=False))


def test_id_ood_figure_draws_sweep_and_methods(results):
    figure = id_ood_figure(results)

    axes = figure.axes[0]
    sweep_line = axes.lines[0]
    np.testing.assert_allclose(sweep_line.get_xdata(), [100 * v for v in results["wise_ft_sweep"]["accuracy"]["clean"]])
    np.testing.assert_allclose(sweep_line.get_ydata(), [100 * v for v in results["wise_ft_sweep"]["ood_average"]])
    labels = [text.get_text() for text in axes.texts]
    alphas_in_labels = [alpha for label in labels for alpha in label.removeprefix("α=").split(", ")]
    assert sorted(alphas_in_labels, key=float) == ["0", "0.25", "0.5", "0.75", "1"]

    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend == ["WiSE-FT sweep", "Zero-shot", "Fine-tuned", "Dynamic output ensemble", "DaWin (mixture)", "DaWin (sample)"]
    points = {collection.get_label(): collection.get_offsets()[0] for collection in axes.collections}
    for method, label in (("dawin_sample", "DaWin (sample)"), ("zero_shot", "Zero-shot"), ("output_ensemble", "Dynamic output ensemble")):
        summary = results["summary"][method]
        np.testing.assert_allclose(points[label], [100 * summary["id"], 100 * summary["ood_average"]])
    assert "OOD: noisy, inverted" in axes.get_title()


def test_equal_sweep_points_share_one_label():
    results = {
        "in_distribution": "a",
        "out_of_distribution": ["b"],
        "wise_ft_sweep": {"alphas": [0.0, 0.5, 1.0], "accuracy": {"a": [0.5, 0.5, 0.9]}, "ood_average": [0.4, 0.4, 0.2]},
        "summary": {"zero_shot": {"id": 0.5, "ood_average": 0.4}},
    }

    axes = id_ood_figure(results).axes[0]

    assert sorted(text.get_text() for text in axes.texts) == ["α=0, 0.5", "α=1"]


def test_nearby_sweep_points_share_one_label():
    # Alphas 0.6 to 1 lie within a fraction of a point of each other on axes spanning 30 points.
    results = {
        "in_distribution": "a",
        "out_of_distribution": ["b"],
        "wise_ft_sweep": {
            "alphas": [0.0, 0.3, 0.6, 0.7, 0.8, 0.9, 1.0],
            "accuracy": {"a": [0.60, 0.75, 0.899, 0.900, 0.901, 0.902, 0.903]},
            "ood_average": [0.50, 0.45, 0.300, 0.299, 0.298, 0.297, 0.296],
        },
        "summary": {"zero_shot": {"id": 0.6, "ood_average": 0.5}},
    }

    axes = id_ood_figure(results).axes[0]

    assert sorted(text.get_text() for text in axes.texts) == ["α=0", "α=0.3", "α=0.6, 0.7, 0.8, 0.9, 1"]

def test_id_ood_needs_shifted_sets(results, tmp_path):
    id_only = dict(results, out_of_distribution=[], wise_ft_sweep=dict(results["wise_ft_sweep"], ood_average=None))

    with pytest.raises(ValueError, match="at least one shifted"):
        plot_id_ood(id_only, tmp_path / "plot.png")
    assert not (tmp_path / "plot.png").exists()


def test_histograms_overlay_mixture_density(results):
    figure = coefficient_histogram_figure(results, results["coefficients"])

    visible = [axes for axes in figure.axes if axes.get_visible()]
    assert [axes.get_title().split(" ")[0] for axes in visible] == ["clean", "noisy", "inverted"]
    for axes, name in zip(visible, ["clean", "noisy", "inverted"]):
        values = np.asarray(results["coefficients"][name])
        bar_heights = np.array([patch.get_height() for patch in axes.patches])
        bar_widths = np.array([patch.get_width() for patch in axes.patches])
        # A density histogram: bar areas sum to one and every value lies in the plotted window.
        assert float((bar_heights * bar_widths).sum()) == pytest.approx(1.0, rel=1e-6)
        low, high = axes.get_xlim()
        assert low <= values.min()
        assert values.max() <= high

        mixture = BetaMixture.from_dict(results["sets"][name]["mixture"])
        density_line = axes.lines[0]
        grid = density_line.get_xdata()
        expected = sum(
            weight * beta_distribution.pdf(grid, alpha, beta)
            for weight, alpha, beta in zip(mixture.weights_, mixture.alphas_, mixture.betas_)
        )
        np.testing.assert_allclose(density_line.get_ydata(), expected, rtol=1e-10)
        mean_lines = sorted(line.get_xdata()[0] for line in axes.lines[1:])
        np.testing.assert_allclose(mean_lines, sorted(mixture.component_means))
        assert f"n={values.size}" in axes.get_title()


def test_histogram_window_for_spread_values():
    coefficients = {"a": np.linspace(0.05, 0.95, 50)}
    mixture = BetaMixture(n_components=2).fit(coefficients["a"])
    results = {"in_distribution": "a", "sets": {"a": {"mixture": mixture.to_dict()}}}

    axes = coefficient_histogram_figure(results, coefficients).axes[0]

    assert axes.get_xlim() == (0.0, 1.0)


def test_histograms_need_known_sets(results, tmp_path):
    with pytest.raises(ValueError, match="No coefficients were given"):
        plot_coefficient_histograms(results, {"elsewhere": [0.5]}, tmp_path / "plot.png")


def test_plot_files_are_pngs(results, tmp_path):
    id_ood = plot_id_ood(results, tmp_path / "figures" / "id_vs_ood.png")
    histograms = plot_coefficient_histograms(results, results["coefficients"], tmp_path / "coefficients.png")

    for path in (id_ood, histograms):
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width > 600
            assert image.height > 300


def _image_dataset(path, seed, count=8):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in range(count)]
    dataset = datasets.Dataset.from_dict(
        {"image": images, "label": [i % len(TINY_CLASS_NAMES) for i in range(count)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=TINY_CLASS_NAMES)}),
    )
    dataset.save_to_disk(str(path))
    return path


def test_cli_writes_figures(tiny_pair_dirs, tmp_path, capsys):
    id_dir = _image_dataset(tmp_path / "clean", 0)
    shift_dir = _image_dataset(tmp_path / "shift", 1)
    pair = ["--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1])]

    main(["evaluate", *pair, "--id-dataset", str(id_dir), "--shift-dataset", f"shift={shift_dir}",
          "--alphas", "0,1", "--output-dir", str(tmp_path / "with"), "--no-progress"])
    main(["evaluate", *pair, "--id-dataset", str(id_dir), "--shift-dataset", f"shift={shift_dir}",
          "--alphas", "0,1", "--output-dir", str(tmp_path / "without"), "--no-progress", "--no-plots"])

    assert (tmp_path / "with" / "id_vs_ood.png").is_file()
    assert (tmp_path / "with" / "coefficients.png").is_file()
    assert "id_vs_ood.png" in capsys.readouterr().out
    assert not (tmp_path / "without" / "id_vs_ood.png").exists()
    assert not (tmp_path / "without" / "coefficients.png").exists()
    assert (tmp_path / "without" / "results.json").is_file()


def test_write_results_without_shifts(results, tmp_path):
    id_only = json.loads(json.dumps(results))
    id_only["out_of_distribution"] = []
    id_only["wise_ft_sweep"]["ood_average"] = None

    paths = write_results(id_only, tmp_path)

    assert "id_vs_ood" not in paths
    assert not (tmp_path / "id_vs_ood.png").exists()
    assert paths["coefficient_histograms"] == tmp_path / "coefficients.png"
    assert (tmp_path / "coefficients.png").is_file()
    assert id_only["coefficients"] == results["coefficients"]


@pytest.mark.parametrize("failing_step", ["coefficients", "figure"])
def test_failed_results_write_keeps_earlier_run(results, tmp_path, monkeypatch, failing_step):
    import hf_dawin.cli
    import hf_dawin.plots

    output_dir = tmp_path / "results"
    write_results(json.loads(json.dumps(results)), output_dir)
    before = {path.name: path.read_bytes() for path in output_dir.iterdir()}
    changed = json.loads(json.dumps(results))
    changed["runtime_seconds"] = 12345.0

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if failing_step == "coefficients":
        monkeypatch.setattr(hf_dawin.cli.np, "savez", disk_full)
    else:
        monkeypatch.setattr(hf_dawin.plots, "plot_coefficient_histograms", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_results(changed, output_dir)

    assert {path.name: path.read_bytes() for path in output_dir.iterdir()} == before
    assert [path.name for path in tmp_path.iterdir()] == ["results"]


def _multitask_results(methods):
    tasks = {"digits": 0.5, "fashion": 0.25}
    summary = {}
    for offset, method in enumerate(methods):
        per_task = {task: value + 0.05 * offset for task, value in tasks.items()}
        summary[method] = {"per_task": per_task, "average": sum(per_task.values()) / len(per_task)}
    return {
        "tasks": {task: {} for task in tasks},
        "methods": list(methods),
        "method_labels": {method: method.replace("_", " ") for method in methods},
        "fine_tuned_names": ["digits", "fashion"],
        "summary": summary,
    }


def test_multitask_figure_bars(tmp_path):
    methods = ["pretrained", "fine_tuned:digits", "fine_tuned_expert", "task_arithmetic", "dawin_sample"]
    results = _multitask_results(methods)

    figure = multitask_accuracy_figure(results)

    axes = figure.axes[0]
    # Individual fine-tuned endpoints other than the expert are left to the table.
    assert [text.get_text() for text in axes.get_legend().get_texts()] == [
        "pretrained", "fine tuned expert", "task arithmetic", "dawin sample"
    ]
    assert [label.get_text() for label in axes.get_xticklabels()] == ["digits", "fashion", "Average"]
    heights = {round(patch.get_height(), 6) for patch in axes.patches}
    assert len(axes.patches) == 4 * 3
    assert round(100 * results["summary"]["dawin_sample"]["average"], 6) in heights
    assert round(100 * results["summary"]["pretrained"]["per_task"]["fashion"], 6) in heights
    path = plot_multitask_accuracy(results, tmp_path / "figures" / "accuracy.png")
    assert path.read_bytes().startswith(b"\x89PNG")
