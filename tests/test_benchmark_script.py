"""scripts/benchmark.py on the tiny size: every measurement lands in the JSON, with a plot beside it."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
MODES = ("forward", "endpoints", "sample", "mixture", "static", "zero_shot", "output_ensemble")


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # Dataclasses resolve their annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("benchmark") / "tiny.json"
    command = [
        sys.executable, str(SCRIPT), "--sizes", "tiny", "--batch-size", "4", "--repeats", "2", "--warmup", "1",
        "--num-classes", "10", "--reference-images", "2", "--memory-batch-sizes", "1", "4",
        "--mixture-fit-size", "3000", "--threads", "1", "--output", str(output),
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return output, completed.stdout


def test_json_has_every_measurement(tiny_run):
    output, _ = tiny_run
    results = json.loads(output.read_text())
    assert set(results["machine"]) >= {"cpu_model", "logical_cpus", "torch_threads", "torch", "transformers"}
    assert results["machine"]["torch_threads"] == 1
    assert results["machine"]["device"] == "cpu"
    tiny = results["sizes"]["tiny"]
    assert tiny["batch_size"] == 4
    assert set(tiny["modes"]) == set(MODES)
    for name, values in tiny["modes"].items():
        assert values["repeats"] == 2, name
        assert values["seconds"] > 0, name
        assert values["cpu_seconds"] > 0, name
        assert values["images_per_second"] == pytest.approx(4 / values["seconds"])
    assert tiny["modes"]["forward"]["ratio_to_forward"] == pytest.approx(1.0)
    sample = tiny["modes"]["sample"]
    assert sample["ratio_to_forward"] == pytest.approx(sample["seconds"] / tiny["modes"]["forward"]["seconds"])
    for name in ("reference", "reference_image_classifier", "reference_inplace"):
        reference = tiny[name]
        assert reference["images_timed"] == 2
        assert reference["sample_speedup"] == pytest.approx(reference["seconds"] / sample["seconds"])
    assert tiny["builds"]["components"]["n_components"] == 3
    assert tiny["used_components"] >= 2
    fit = results["mixture_fit"]
    assert fit["num_values"] == 3000
    assert fit["seconds"] > 0
    # Targets are checked only for the ViT-B/32 size at batch 32.
    assert results["targets"] is None


def test_memory_measured_in_subprocess(tiny_run):
    output, _ = tiny_run
    memory = json.loads(output.read_text())["sizes"]["tiny"]["memory"]
    assert "clear_refs" in memory["method"]
    assert set(memory["peak_increase_mib"]) == set(MODES) | {"reference", "reference_image_classifier", "reference_inplace"}
    assert set(memory["batch_sweep"]["sample"]) == {"1", "4"}
    assert memory["weights_mib"] > 0
    # The per-sample mixed classifier stores one task vector per weight: about one image classifier's size.
    assert 0 < memory["derived"]["mixed_classifier_mib"] < memory["weights_mib"]


def test_plot_and_summary_written(tiny_run):
    output, stdout = tiny_run
    plot = output.with_suffix(".png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Beta mixture fit on 3000 coefficients" in stdout
    assert "reference_image_classifier" in stdout
    assert "reference_inplace" in stdout


def test_reference_procedures_agree_with_sample_mode():
    import torch

    script = _load_script()
    arguments = script.parse_arguments(["--sizes", "tiny", "--num-classes", "10"])
    model = script.build_pair("tiny", arguments)
    pixel_values, coefficients = script.batch_inputs(model, 3, seed=1)
    in_place = script.InPlaceReference(model)
    with torch.inference_mode():
        sample = model.interpolated_logits(pixel_values, coefficients)
        for index in range(3):
            image, coefficient = pixel_values[index : index + 1], float(coefficients[index])
            copied = script.reference_single_image(model, image, coefficient)
            torch.testing.assert_close(copied, sample[index : index + 1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(in_place(image, coefficient), copied, atol=1e-4, rtol=1e-4)


def test_arguments_validated():
    script = _load_script()
    arguments = script.parse_arguments(["--sizes", "tiny", "--batch-size-for", "tiny=2", "--output", "x/out.json"])
    assert arguments.batch_size_for == {"tiny": 2}
    assert arguments.plot == Path("x/out.png")
    with pytest.raises(SystemExit):
        script.parse_arguments(["--repeats", "0"])
    with pytest.raises(SystemExit):
        script.parse_arguments(["--batch-size-for", "vit-h-14=4"])
    with pytest.raises(SystemExit):
        script.parse_arguments(["--device", "not-a-device"])
    assert script.parse_arguments(["--device", "cpu"]).device == "cpu"


def test_targets_compare_both_clocks():
    script = _load_script()
    mode = {"ratio_to_forward": 4.0, "cpu_ratio_to_forward": 5.0}
    results = {
        "sizes": {"vit-b-32": {
            "batch_size": 32,
            "modes": {"sample": mode, "mixture": {"ratio_to_forward": 3.0, "cpu_ratio_to_forward": 3.6}},
            "reference": {"sample_speedup": 6.0, "sample_cpu_speedup": 4.0},
            "builds": {"components": {"ratio_to_forward": 0.5, "cpu_ratio_to_forward": 0.5}},
        }},
        "mixture_fit": {"seconds": 0.5, "cpu_seconds": 1.5},
    }
    targets = script.check_targets(results)
    assert all(check["met"] for check in targets["wall"].values())
    assert {name for name, check in targets["cpu"].items() if not check["met"]} == {
        "sample_ratio", "mixture_ratio", "sample_speedup_over_reference", "mixture_fit_seconds"
    }


@pytest.mark.parametrize(
    ("machine", "clock"),
    [
        ({"device": "cpu", "torch_threads": 1}, "cpu"),
        ({"device": "cpu", "torch_threads": 2}, "wall"),
        ({"device": "cuda", "torch_threads": 1}, "wall"),
        ({}, "wall"),
    ],
)
def test_ratio_clock_cpu_only_single_thread(machine, clock):
    script = _load_script()
    assert script.ratio_clock({"machine": machine}) == clock


def test_plot_axis_names_clock(tiny_run, tmp_path, monkeypatch):
    import matplotlib.axes

    script = _load_script()
    output, _ = tiny_run
    results = json.loads(output.read_text())
    labels = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", lambda axis, label, **kwargs: labels.append(label))

    script.plot_results(results, tmp_path / "one_thread.png")
    results["machine"]["torch_threads"] = 2
    script.plot_results(results, tmp_path / "two_threads.png")

    assert labels[0] == "CPU time / one endpoint forward (log scale)"
    assert labels[2] == "wall time / one endpoint forward (log scale)"
