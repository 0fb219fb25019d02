"""Shift evaluation: every method scored from one endpoint pass per set, checked against direct model calls."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_dawin import cli as cli_module
from hf_dawin.cli import main
from hf_dawin import evaluation as evaluation_module
from hf_dawin.distributed import DistributedState
from hf_dawin.evaluation import (
    METHODS,
    EvaluationSet,
    EvaluationSettings,
    evaluate_pair,
    run_method_pass,
    summarize,
    sweep_groups,
)
from hf_dawin.label_spaces import LabelSpaceProjection

from .conftest import TINY_CLASS_NAMES


def tensor_set(name, pixel_values, labels, *, in_distribution=False, batch_size=4, projection=None, skip=()):
    def batches():
        for start in range(0, len(labels), batch_size):
            rows = [row for row in range(start, min(start + batch_size, len(labels))) if row not in skip]
            yield pixel_values[rows], labels[rows], torch.tensor(rows)

    return EvaluationSet(name, batches, len(labels), in_distribution=in_distribution, projection=projection)


@pytest.fixture()
def sets():
    generator = torch.Generator().manual_seed(7)
    pixel_values = torch.randn(20, 3, 16, 16, generator=generator)
    labels = torch.randint(0, len(TINY_CLASS_NAMES), (20,), generator=generator)
    return [
        tensor_set("id", pixel_values[:10], labels[:10], in_distribution=True),
        tensor_set("shift", pixel_values[10:] * 2.0, labels[10:], batch_size=3),
    ]


@torch.no_grad()
def test_methods_match_direct_model_calls(tiny_model, sets):
    results = evaluate_pair(tiny_model, sets, EvaluationSettings(alphas=(0.0, 0.3, 1.0), progress=False))
    assert results["in_distribution"] == "id"
    assert results["out_of_distribution"] == ["shift"]
    assert set(results["sets"]["id"]["scores"]) == set(METHODS)

    pixel_values, labels, _ = next(iter(tensor_set("all", *_stack(sets[1]), batch_size=100).batches()))
    outputs = tiny_model(pixel_values=pixel_values, mode="sample")
    expected_sample = (outputs.logits.argmax(-1) == labels).float().mean().item()
    assert results["sets"]["shift"]["scores"]["dawin_sample"]["accuracy"] == pytest.approx(expected_sample)
    zero_shot = (outputs.zero_shot_logits.argmax(-1) == labels).float().mean().item()
    assert results["sets"]["shift"]["scores"]["zero_shot"]["accuracy"] == pytest.approx(zero_shot)
    static = tiny_model(pixel_values=pixel_values, mode="static", alpha=0.3).logits
    assert results["wise_ft_sweep"]["accuracy"]["shift"][1] == pytest.approx((static.argmax(-1) == labels).float().mean().item())
    assert results["wise_ft_sweep"]["alphas"] == [0.0, 0.3, 0.5, 1.0]
    np.testing.assert_allclose(results["coefficients"]["shift"], outputs.coefficients.numpy(), atol=1e-6)

    table = summarize(results)
    assert "DaWin (sample)" in table
    assert "OOD avg" in table
    assert summarize(results, markdown=True).startswith("| Method |")


@torch.no_grad()
def test_summary_ood_average_best_alpha(tiny_model):
    # Labels taken from the endpoints' own predictions make each endpoint perfect on its sets: the fine-tuned one
    # on the ID set, the zero-shot one on both shifted sets. The ID accuracy then peaks at alpha = 1 and the OOD
    # average at alpha = 0, so choosing the best alpha on the wrong sets changes the result.
    generator = torch.Generator().manual_seed(11)
    pixel_values = torch.randn(36, 3, 16, 16, generator=generator)
    zero_shot_logits, fine_tuned_logits = tiny_model.endpoint_logits(pixel_values)
    labels = torch.cat([fine_tuned_logits[:12].argmax(-1), zero_shot_logits[12:].argmax(-1)])
    sets = [
        tensor_set("id", pixel_values[:12], labels[:12], in_distribution=True),
        tensor_set("shift_a", pixel_values[12:24], labels[12:24]),
        tensor_set("shift_b", pixel_values[24:], labels[24:]),
    ]
    results = evaluate_pair(tiny_model, sets, EvaluationSettings(alphas=(0.0, 0.5, 1.0), progress=False))

    sweep = results["wise_ft_sweep"]
    assert sweep["alphas"] == [0.0, 0.5, 1.0]
    accuracy = sweep["accuracy"]
    assert accuracy["id"][2] == 1.0
    assert accuracy["id"][0] < 1.0
    ood_by_alpha = [(accuracy["shift_a"][i] + accuracy["shift_b"][i]) / 2 for i in range(3)]
    assert sweep["ood_average"] == pytest.approx(ood_by_alpha)
    assert ood_by_alpha[0] == 1.0
    assert ood_by_alpha[1] < 1.0
    assert sweep["best_alpha"] == 0.0
    assert sweep["best_alpha_criterion"] == "OOD average accuracy"

    for name in ("id", "shift_a", "shift_b"):
        scores = results["sets"][name]["scores"]
        assert scores["wise_ft_0.5"]["accuracy"] == pytest.approx(accuracy[name][1]), name
        assert scores["wise_ft_best"]["accuracy"] == pytest.approx(accuracy[name][0]), name
    for method, summary in results["summary"].items():
        per_set = {name: results["sets"][name]["scores"][method]["accuracy"] for name in ("id", "shift_a", "shift_b")}
        assert summary["id"] == per_set["id"], method
        assert summary["ood_average"] == pytest.approx((per_set["shift_a"] + per_set["shift_b"]) / 2), method
    assert results["summary"]["zero_shot"]["ood_average"] == 1.0
    assert results["summary"]["zero_shot"]["id"] != 1.0


class _RecordingState:
    """A stand-in for one rank of a two-process run that records its collective calls."""

    def __init__(self, rank: int, broadcast_value: dict):
        self.is_main_process = rank == 0
        self.broadcast_value = broadcast_value
        self.calls = []

    def run(self, step, function):
        self.calls.append(("run", step))
        return function()

    def check_all_ranks(self, error, step):
        self.calls.append(("check_all_ranks", step))

    def broadcast_json(self, value, step):
        self.calls.append(("broadcast_json", step, value))
        return value if self.is_main_process else self.broadcast_value


@pytest.mark.parametrize("rank", [0, 1])
def test_fits_run_on_main_process(rank):
    fits = []

    def fit():
        fits.append(rank)
        return {"fitted_by": rank}

    state = _RecordingState(rank, broadcast_value={"fitted_by": 0})
    loaded = evaluation_module._fit_on_main(state, "the mixture fit", fit, lambda value: ("loaded", value))

    # Every rank uses the main process's fit, received through the broadcast.
    assert loaded == ("loaded", {"fitted_by": 0})
    assert fits == ([0] if rank == 0 else [])
    sent = {"fitted_by": 0} if rank == 0 else None
    assert state.calls[-1] == ("broadcast_json", "the mixture fit", sent)


def _stack(evaluation_set):
    chunks = list(evaluation_set.batches())
    return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])


@torch.no_grad()
def test_projection_applied_before_entropies(tiny_model, sets):
    projection = LabelSpaceProjection(num_model_classes=len(TINY_CLASS_NAMES), indices=[0, 2])
    pixel_values, labels = _stack(sets[1])
    projected_set = tensor_set("subset", pixel_values, labels % 2, projection=projection)
    results = evaluate_pair(tiny_model, [sets[0], projected_set], EvaluationSettings(alphas=(0.5,), progress=False))
    assert results["sets"]["subset"]["num_classes"] == 2
    outputs = tiny_model(pixel_values=pixel_values, mode="sample")
    zero_shot = projection.project(outputs.zero_shot_logits)
    fine_tuned = projection.project(outputs.fine_tuned_logits)
    from hf_dawin import compute_coefficients

    expected = compute_coefficients(zero_shot, fine_tuned)
    np.testing.assert_allclose(results["coefficients"]["subset"], expected.numpy(), atol=1e-6)


def test_skipped_examples_reported(tiny_model, sets):
    pixel_values, labels = _stack(sets[1])
    with_skips = tensor_set("shift", pixel_values, labels, skip={2, 5})
    results = evaluate_pair(tiny_model, [sets[0], with_skips], EvaluationSettings(alphas=(0.5,), progress=False))
    assert results["sets"]["shift"]["num_examples"] == 8
    assert results["sets"]["shift"]["num_skipped"] == 2
    assert results["sets"]["shift"]["skipped_positions"] == [2, 5]
    assert len(results["coefficients"]["shift"]) == 8
    assert results["sets"]["id"]["skipped_positions"] == []


def _counting(evaluation_set):
    """Wrap a set so that `reads[0]` counts how often its batches are read."""
    reads = [0]
    source = evaluation_set.batches

    def batches():
        reads[0] += 1
        return source()

    evaluation_set.batches = batches
    return reads


SWEEP = (0.0, 0.1, 0.2, 0.3, 0.7, 0.9, 1.0)


@torch.no_grad()
def test_methods_share_one_pass_per_set(tiny_model, sets):
    reads = [_counting(evaluation_set) for evaluation_set in sets]
    results = evaluate_pair(tiny_model, sets, EvaluationSettings(alphas=SWEEP, progress=False))
    # The endpoint pass, then one pass for DaWin's two modes and the six merged WiSE-FT models.
    assert [count[0] for count in reads] == [2, 2]
    assert results["wise_ft_sweep"]["alphas"] == [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]


@torch.no_grad()
@pytest.mark.parametrize("per_pass", [1, 4, np.int64(2)])
def test_sweep_grouping_keeps_results(tiny_model, sets, per_pass):
    shared = evaluate_pair(tiny_model, sets, EvaluationSettings(alphas=SWEEP, progress=False))
    reads = [_counting(evaluation_set) for evaluation_set in sets]
    grouped = evaluate_pair(
        tiny_model, sets, EvaluationSettings(alphas=SWEEP, progress=False, sweep_models_per_pass=per_pass)
    )
    # Six merged models in groups of `per_pass`, after the endpoint pass.
    assert [count[0] for count in reads] == [1 + -(-6 // int(per_pass))] * 2
    assert grouped["settings"].pop("sweep_models_per_pass") == per_pass
    assert shared["settings"].pop("sweep_models_per_pass") is None
    assert grouped == shared
    json.dumps(grouped)


@torch.no_grad()
def test_method_pass_equals_separate_passes(tiny_model, sets):
    expected = torch.arange(10)
    coefficients = torch.linspace(0.0, 1.0, 10)
    methods = {
        "sample": lambda pixel_values, rows: tiny_model.interpolated_logits(pixel_values, coefficients[rows]),
        "static": lambda pixel_values, rows: tiny_model.static_logits(pixel_values, 0.4),
    }
    num_classes = tiny_model.config.num_classes
    shared = run_method_pass(sets[0], expected, "both", methods, num_classes=num_classes, progress=False)
    for name, classify in methods.items():
        alone = run_method_pass(sets[0], expected, name, {name: classify}, num_classes=num_classes, progress=False)
        assert torch.equal(shared[name], alone[name])
    with pytest.raises(ValueError, match="The method name 'indices' is reserved"):
        run_method_pass(sets[0], expected, "bad", {"indices": methods["static"]}, num_classes=num_classes)


def test_sweep_groups_sized_by_free_memory(tiny_model, monkeypatch):
    state = DistributedState()
    alphas = [0.0, 0.1, 0.2, 0.3, 0.5, 1.0]
    settings = EvaluationSettings(n_components=3)
    classifier_bytes = evaluation_module.module_bytes(tiny_model.endpoint_classifiers()[0])
    # Half the free memory has room for the mixed model, the 3 components and two merged models.
    monkeypatch.setattr(evaluation_module, "free_memory", lambda device: 2 * 6 * classifier_bytes)
    assert sweep_groups(tiny_model, alphas, settings, state) == [[0.1, 0.2], [0.3, 0.5]]
    monkeypatch.setattr(evaluation_module, "free_memory", lambda device: 10**15)
    assert sweep_groups(tiny_model, alphas, settings, state) == [[0.1, 0.2, 0.3, 0.5]]
    # Too little memory, or none known, still runs one merged model per pass.
    monkeypatch.setattr(evaluation_module, "free_memory", lambda device: 0)
    assert sweep_groups(tiny_model, alphas, settings, state) == [[0.1], [0.2], [0.3], [0.5]]
    monkeypatch.setattr(evaluation_module, "free_memory", lambda device: None)
    assert sweep_groups(tiny_model, alphas, settings, state) == [[0.1], [0.2], [0.3], [0.5]]
    assert sweep_groups(tiny_model, [0.0, 1.0], settings, state) == []
    # Processes on one machine share its memory.
    monkeypatch.setattr(evaluation_module, "free_memory", lambda device: 2 * 8 * classifier_bytes)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert sweep_groups(tiny_model, alphas, settings, state) == [[0.1], [0.2], [0.3], [0.5]]


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_bad_sweep_group_size_rejected(tiny_model, sets, value):
    reads = [_counting(evaluation_set) for evaluation_set in sets]
    with pytest.raises(ValueError, match="sweep_models_per_pass must be a positive integer or None"):
        evaluate_pair(tiny_model, sets, EvaluationSettings(progress=False, sweep_models_per_pass=value))
    assert [count[0] for count in reads] == [0, 0]


def test_bad_sets_rejected(tiny_model, sets):
    with pytest.raises(ValueError, match="exactly one in-distribution set"):
        evaluate_pair(tiny_model, [sets[1]], EvaluationSettings(progress=False))
    empty = tensor_set("empty", torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="'empty' is empty"):
        evaluate_pair(tiny_model, [sets[0], empty], EvaluationSettings(progress=False))
    pixel_values, labels = _stack(sets[1])
    bad_labels = tensor_set("bad", pixel_values, labels + 10)
    with pytest.raises(ValueError, match="outside its label space"):
        evaluate_pair(tiny_model, [sets[0], bad_labels], EvaluationSettings(progress=False))


def _image_dataset(path, seed, count=12, invert=False):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in range(count)]
    if invert:
        images = [Image.fromarray(255 - np.asarray(image)) for image in images]
    dataset = datasets.Dataset.from_dict(
        {"image": images, "label": [i % len(TINY_CLASS_NAMES) for i in range(count)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=TINY_CLASS_NAMES)}),
    )
    dataset.save_to_disk(str(path))
    return path


def test_cli_evaluate_on_local_datasets(tiny_pair_dirs, tmp_path, capsys):
    id_dir = _image_dataset(tmp_path / "id", 0)
    shift_dir = _image_dataset(tmp_path / "shift", 1, invert=True)
    output_dir = tmp_path / "results"
    exit_code = main([
        "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1]),
        "--id-dataset", str(id_dir), "--shift-dataset", f"inverted={shift_dir}", "--batch-size", "5",
        "--alphas", "0,0.2,0.5,1", "--output-dir", str(output_dir), "--no-progress",
    ])
    assert exit_code == 0
    printed = capsys.readouterr().out
    assert "DaWin (sample)" in printed
    results = json.loads((output_dir / "results.json").read_text())
    assert results["sets"]["inverted"]["num_examples"] == 12
    assert set(results["summary"]) == set(METHODS)
    assert (output_dir / "results.md").read_text().startswith("| Method |")
    assert np.load(output_dir / "coefficients.npz")["inverted"].shape == (12,)

    # One merged model per pass reads each set more often and scores the same.
    grouped_dir = tmp_path / "grouped"
    exit_code = main([
        "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1]),
        "--id-dataset", str(id_dir), "--shift-dataset", f"inverted={shift_dir}", "--batch-size", "5",
        "--alphas", "0,0.2,0.5,1", "--output-dir", str(grouped_dir), "--no-progress", "--sweep-models-per-pass", "1",
    ])
    assert exit_code == 0
    grouped = json.loads((grouped_dir / "results.json").read_text())
    assert grouped["settings"]["sweep_models_per_pass"] == 1
    for name in ("id", "inverted"):
        assert grouped["sets"][name]["scores"] == results["sets"][name]["scores"]
    assert grouped["wise_ft_sweep"] == results["wise_ft_sweep"]


def test_cli_split_per_dataset(tiny_pair_dirs, tmp_path):
    # The ID set has validation and test splits; the shifted set only a train split, as on the Hub for ImageNet
    # and ImageNet-Sketch.
    id_splits = {"validation": _image_dataset(tmp_path / "v", 0, count=8), "test": _image_dataset(tmp_path / "t", 1)}
    datasets.DatasetDict({name: datasets.load_from_disk(str(path)) for name, path in id_splits.items()}).save_to_disk(
        str(tmp_path / "id")
    )
    shift = datasets.load_from_disk(str(_image_dataset(tmp_path / "s", 2, count=10, invert=True)))
    datasets.DatasetDict({"train": shift}).save_to_disk(str(tmp_path / "sketch"))
    output_dir = tmp_path / "results"

    exit_code = main([
        "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1]),
        "--id-dataset", f"{tmp_path / 'id'}:validation", "--shift-dataset", f"sketch={tmp_path / 'sketch'}:train",
        "--alphas", "0,1", "--output-dir", str(output_dir), "--no-progress", "--no-plots",
    ])  # fmt: skip

    assert exit_code == 0
    results = json.loads((output_dir / "results.json").read_text())
    assert list(results["sets"]) == ["id", "sketch"]
    assert results["sets"]["id"]["num_examples"] == 8
    assert results["sets"]["sketch"]["num_examples"] == 10
    assert results["dataset_sources"] == {"id": str(tmp_path / "id"), "sketch": str(tmp_path / "sketch")}
    assert results["dataset_splits"] == {"id": "validation", "sketch": "train"}

@pytest.mark.parametrize(("flag", "expected"), [([], True), (["--no-offset-adjustment"], False)])
def test_cli_saved_model_offset_default(tiny_model, tmp_path, flag, expected):
    tiny_model.config.offset_adjustment = True
    tiny_model.save_pretrained(tmp_path / "model")
    output_dir = tmp_path / "results"

    exit_code = main([
        "evaluate", "--model", str(tmp_path / "model"), "--id-dataset", str(_image_dataset(tmp_path / "id", 3)),
        "--alphas", "0,1", "--output-dir", str(output_dir), "--no-progress", "--no-plots", *flag,
    ])  # fmt: skip

    assert exit_code == 0
    results = json.loads((output_dir / "results.json").read_text())
    assert results["settings"]["offset_adjustment"] is expected
    assert (results["sets"]["id"]["entropy_statistics"] is not None) is expected


def test_cli_max_examples_samples_across_classes(tiny_pair_dirs, tmp_path, monkeypatch):
    # Rows ordered by class, as imagefolder orders them: the first 6 rows all have label 0.
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in range(24)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=TINY_CLASS_NAMES)})
    labels = sorted(i % len(TINY_CLASS_NAMES) for i in range(24))
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(tmp_path / "id"))
    evaluated = []
    original = cli_module.build_evaluation_set

    def record(name, dataset, *args, **kwargs):
        evaluated.append(list(dataset["label"]))
        return original(name, dataset, *args, **kwargs)

    monkeypatch.setattr(cli_module, "build_evaluation_set", record)

    exit_code = main([
        "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1]),
        "--id-dataset", str(tmp_path / "id"), "--max-examples", "6", "--alphas", "0,1",
        "--output-dir", str(tmp_path / "results"), "--no-progress", "--no-plots",
    ])  # fmt: skip

    assert exit_code == 0
    assert len(evaluated[0]) == 6
    assert len(set(evaluated[0])) > 1


@pytest.mark.parametrize(
    ("flag", "environment", "expected"),
    [([], None, "float32"), (["--dtype", "bfloat16"], None, "bfloat16"), ([], "fp16", "float16")],
)
def test_cli_dtype_from_flag_or_accelerate(tiny_pair_dirs, tmp_path, monkeypatch, flag, environment, expected):
    if environment is not None:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", environment)  # what accelerate launch --mixed_precision sets
    output_dir = tmp_path / "results"

    exit_code = main([
        "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1]),
        "--id-dataset", str(_image_dataset(tmp_path / "id", 4)), "--alphas", "0,1", "--output-dir", str(output_dir),
        "--no-progress", "--no-plots", *flag,
    ])  # fmt: skip

    assert exit_code == 0
    settings = json.loads((output_dir / "results.json").read_text())["settings"]
    assert settings["dtype"] == expected
    assert settings["num_processes"] == 1
    assert settings["max_examples"] is None
    assert settings["seed"] == 0


def test_cli_pickled_endpoint_needs_flag(tiny_pair_dirs, tiny_endpoints, tmp_path, capsys):
    pickled = tmp_path / "fine_tuned_bin"
    tiny_endpoints[1].config.save_pretrained(pickled)
    torch.save(tiny_endpoints[1].state_dict(), pickled / "pytorch_model.bin")
    arguments = [
        "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(pickled),
        "--id-dataset", str(_image_dataset(tmp_path / "id", 4)), "--alphas", "0,1", "--no-progress", "--no-plots",
    ]  # fmt: skip

    assert main([*arguments, "--output-dir", str(tmp_path / "refused")]) == 1
    assert "safetensors files only" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()

    assert main([*arguments, "--output-dir", str(tmp_path / "results"), "--allow-torch-load"]) == 0
    assert (tmp_path / "results" / "results.json").is_file()


def test_cli_rejects_fp8_mixed_precision(tiny_pair_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(SystemExit, match="requested mixed precision 'fp8', which hf-dawin cannot run"):
        main([
            "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1]),
            "--id-dataset", str(_image_dataset(tmp_path / "id", 4)), "--output-dir", str(tmp_path / "results"),
        ])  # fmt: skip
    assert not (tmp_path / "results").exists()


def _reject_constant(name):
    raise ValueError(f"results.json contains {name}, which is not JSON")


def test_cli_id_only_writes_strict_json(tiny_pair_dirs, tmp_path, capsys):
    output_dir = tmp_path / "results"
    # A figure of an earlier run with shifted sets, which this run cannot draw.
    output_dir.mkdir()
    (output_dir / "id_vs_ood.png").write_bytes(b"earlier figure")
    exit_code = main([
        "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1]),
        "--id-dataset", str(_image_dataset(tmp_path / "id", 2)), "--batch-size", "6", "--alphas", "0,1",
        "--output-dir", str(output_dir), "--no-progress",
    ])  # fmt: skip

    assert exit_code == 0
    results = json.loads((output_dir / "results.json").read_text(), parse_constant=_reject_constant)
    assert results["summary"]["dawin_sample"]["ood_average"] is None
    assert results["wise_ft_sweep"]["ood_average"] is None
    for name in ("results.json", "results.md", "coefficients.npz", "coefficients.png"):
        assert (output_dir / name).stat().st_mode & 0o044 == 0o044, name
    assert not (output_dir / "id_vs_ood.png").exists()
    assert not list(output_dir.glob(".*"))


def test_cli_rejects_output_file_before_running(tiny_pair_dirs, tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("not a folder")

    with pytest.raises(SystemExit, match="--output-dir .* is a file"):
        main([
            "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1]),
            "--id-dataset", str(tmp_path / "missing"), "--output-dir", str(target),
        ])  # fmt: skip
    assert target.read_text() == "not a folder"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs the Linux /proc file system")
def test_cli_rejects_unwritable_output_dir(tiny_pair_dirs, tmp_path):
    # Nothing can be created under /proc, whatever the user's permissions.
    with pytest.raises(SystemExit, match="hf-dawin evaluate: error: --output-dir /proc/hf-dawin-results cannot be written"):
        main([
            "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1]),
            "--id-dataset", str(tmp_path / "missing"), "--output-dir", "/proc/hf-dawin-results",
        ])  # fmt: skip


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--class-names", "missing.txt"], "--class-names missing.txt is not a file. Pass a text file with one class"),
        (["--wordnet-ids", "missing.txt"], "--wordnet-ids missing.txt is not a file"),
        (["--model", "saved"], "give either --model or --zero-shot/--fine-tuned, not both"),
    ],
)
def test_cli_rejects_pair_arguments(tiny_pair_dirs, tmp_path, arguments, message):
    with pytest.raises(SystemExit, match=f"^hf-dawin evaluate: error: {message}"):
        main([
            "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), *arguments, "--id-dataset", str(tmp_path / "missing"),
            *(["--fine-tuned", str(tiny_pair_dirs[1])] if "--model" not in arguments else []),
            "--output-dir", str(tmp_path / "out"),
        ])  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_cli_without_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: hf-dawin" in capsys.readouterr().out


def test_cli_rejects_malformed_alphas(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--alphas", "a,b"])
    assert "expected comma-separated numbers in [0, 1] such as 0,0.5,1, received 'a,b'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--alphas", "0,1.5,-0.1"], r"--alphas values must lie in \[0, 1\], received \[1.5, -0.1\]"),
        (["--n-components", "0"], "--n-components must be at least 1, received 0"),
        (["--sweep-models-per-pass", "0"], "--sweep-models-per-pass must be at least 1, received 0"),
        (["--split", "validation"], "--split is used only with your own model and datasets"),
        (["--templates", "t.txt", "--class-names", "c.txt"], "--class-names, --templates are used only with"),
        (["--shift-dataset", "a=b"], "--shift-dataset is used only with"),
        (
            ["--zero-shot", "z", "--fine-tuned", "f", "--id-dataset", "data/pets", "--shift-dataset", "s=x",
             "--shift-dataset", "s=y"],
            r"set names must be distinct, but \['s'\] appear more than once in \['pets', 's', 's'\]",
        ),
        (
            ["--zero-shot", "z", "--fine-tuned", "f", "--id-dataset", "data/pets", "--shift-dataset", "pets=x"],
            r"\['pets'\] appear more than once .* named after the last part of --id-dataset",
        ),
        (
            ["--zero-shot", "z", "--fine-tuned", "f", "--id-dataset", "data/pets", "--shift-dataset", "s=sketch:"],
            "--shift-dataset sketch:: 'sketch:' ends with ':' but names no split",
        ),
    ],
)
def test_cli_rejects_arguments_before_loading(arguments, message, tmp_path):
    # The embedded benchmark's cache stays empty: each error comes before any training or download.
    with pytest.raises(SystemExit, match=message):
        main(["evaluate", *arguments, "--cache-dir", str(tmp_path / "cache")])
    assert not (tmp_path / "cache").exists()


def _string_label_dataset(path, seed, labels):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in labels]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": images, "label": list(labels)}, features=features).save_to_disk(str(path))
    return path


def test_cli_string_labels_with_class_names(tiny_pair_dirs, tmp_path, capsys):
    names_file = tmp_path / "classes.txt"
    names_file.write_text("\n".join(TINY_CLASS_NAMES) + "\n")
    labels = [TINY_CLASS_NAMES[i % len(TINY_CLASS_NAMES)] for i in range(8)]
    common = [
        "evaluate", "--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1]),
        "--class-names", str(names_file), "--batch-size", "4", "--alphas", "0,1", "--no-progress",
    ]  # fmt: skip

    exit_code = main([
        *common, "--id-dataset", str(_string_label_dataset(tmp_path / "id", 0, labels)),
        "--output-dir", str(tmp_path / "results"),
    ])  # fmt: skip

    assert exit_code == 0
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["sets"]["id"]["num_examples"] == 8
    assert results["sets"]["id"]["num_classes"] == len(TINY_CLASS_NAMES)
    unknown = _string_label_dataset(tmp_path / "unknown", 1, ["cat", "zebra"])
    assert main([*common, "--id-dataset", str(unknown), "--output-dir", str(tmp_path / "other")]) == 1
    assert f"error: --id-dataset {unknown}: Labels ['zebra'] in column 'label' are not among the class names" in (
        capsys.readouterr().err
    )
