"""Multi-task evaluation: every reported method against the model's own forward modes, tables and the command."""

import copy
import io
import json
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hf_dawin.cli import main
from hf_dawin.evaluation import EvaluationSet
from hf_dawin.evaluation_multitask import (
    MultiTaskEvaluationSettings,
    evaluate_multitask,
    main_multitask,
    parse_multitask_arguments,
    run_evaluate_multitask,
    summarize_multitask,
)
from hf_dawin.modeling_multitask import DaWinMultiTaskCLIPModel

from .conftest import TINY_CLASS_NAMES, TINY_IMAGE_SIZE, make_clip


TASKS = {"animals": list(TINY_CLASS_NAMES), "colours": ["red", "green", "blue"]}
TEMPLATES = {"animals": ["a photo of a {}."], "colours": ["the colour {}."]}


@pytest.fixture(scope="module")
def shared_model(tiny_processor):
    pretrained = make_clip(0)
    # Endpoints named like the tasks, plus one extra, so the expert row is reported.
    fine_tuned = [make_clip(20 + index, base=pretrained, noise=0.3) for index in range(3)]
    return DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
        pretrained, fine_tuned, tasks=TASKS, templates=TEMPLATES, processor=tiny_processor,
        fine_tuned_names=["animals", "colours", "extra"],
    )  # fmt: skip


@pytest.fixture()
def model(shared_model):
    # Evaluation fits dataset-mean task weights into the config, so each test gets its own copy.
    return copy.deepcopy(shared_model)


def tensor_set(name: str, pixel_values: torch.Tensor, labels: torch.Tensor, batch_size: int = 3) -> EvaluationSet:
    def batches():
        # Yield the batches out of order, so results must be put back in example order.
        starts = list(range(0, len(labels), batch_size))[::-1]
        for start in starts:
            indices = torch.arange(start, min(start + batch_size, len(labels)))
            yield pixel_values[indices], labels[indices], indices

    return EvaluationSet(name=name, batches=batches, num_examples=len(labels), in_distribution=True)


@pytest.fixture()
def task_data():
    generator = torch.Generator().manual_seed(3)
    data = {}
    for task, num_classes in (("animals", 4), ("colours", 3)):
        pixel_values = torch.randn(8, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)
        labels = torch.randint(0, num_classes, (8,), generator=generator)
        data[task] = (pixel_values, labels)
    return data


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == labels).float().mean())


@torch.no_grad()
def test_scores_match_forward_modes(model, task_data):
    sets = {task: tensor_set(task, *values) for task, values in task_data.items()}
    results = evaluate_multitask(model, sets, MultiTaskEvaluationSettings(progress=False))

    assert results["methods"] == [
        "pretrained", "fine_tuned:animals", "fine_tuned:colours", "fine_tuned:extra", "fine_tuned_expert",
        "weight_average", "task_arithmetic", "ties", "dawin_dataset_mean", "dawin_sample",
    ]  # fmt: skip
    for task, (pixel_values, labels) in task_data.items():
        scores = results["tasks"][task]["scores"]
        fine_tuned = model.fine_tuned_logits(pixel_values, task)
        expected = {
            "pretrained": accuracy(model(pixel_values=pixel_values, task=task, mode="pretrained").logits, labels),
            "fine_tuned:animals": accuracy(fine_tuned[:, 0], labels),
            "fine_tuned:colours": accuracy(fine_tuned[:, 1], labels),
            "fine_tuned:extra": accuracy(fine_tuned[:, 2], labels),
            "fine_tuned_expert": accuracy(fine_tuned[:, ["animals", "colours"].index(task)], labels),
        }
        for mode in ("weight_average", "task_arithmetic", "ties"):
            expected[mode] = accuracy(model(pixel_values=pixel_values, task=task, mode=mode).logits, labels)
        sample = model(pixel_values=pixel_values, task=task, mode="sample")
        expected["dawin_sample"] = accuracy(sample.logits, labels)
        model.fit_dataset_coefficients(task, [pixel_values])
        dataset_mean = model(pixel_values=pixel_values, task=task, mode="dataset_mean")
        expected["dawin_dataset_mean"] = accuracy(dataset_mean.logits, labels)
        for method, value in expected.items():
            assert scores[method]["accuracy"] == pytest.approx(value), f"{task}: {method}"

        weights = results["tasks"][task]["task_weights"]
        assert weights["mean"] == pytest.approx(sample.task_weights.mean(dim=0).tolist(), abs=1e-5)
        assert results["tasks"][task]["dataset_mean_coefficients"] == pytest.approx(
            dataset_mean.coefficients[0].tolist(), abs=1e-5
        )
        assert results["tasks"][task]["num_classes"] == len(TASKS[task])

    for method in results["methods"]:
        per_task = [results["tasks"][task]["scores"][method]["accuracy"] for task in task_data]
        assert results["summary"][method]["average"] == pytest.approx(np.mean(per_task))
    json.dumps(results)


@torch.no_grad()
def test_merged_models_share_one_pass(model, task_data):
    sets = {task: tensor_set(task, *values) for task, values in task_data.items()}
    reads = {task: 0 for task in sets}
    for task, evaluation_set in sets.items():
        source = evaluation_set.batches

        def counted(task=task, source=source):
            reads[task] += 1
            return source()

        evaluation_set.batches = counted
    evaluate_multitask(model, sets, MultiTaskEvaluationSettings(progress=False))
    # The endpoint pass, then one pass for the four static merges and per-sample DaWin.
    assert reads == {"animals": 2, "colours": 2}


@torch.no_grad()
def test_ties_can_be_skipped(model, task_data):
    sets = {"colours": tensor_set("colours", *task_data["colours"])}
    results = evaluate_multitask(model, sets, MultiTaskEvaluationSettings(include_ties=False, progress=False))
    assert "ties" not in results["methods"]
    assert "ties" not in results["tasks"]["colours"]["scores"]


def test_unknown_task_set_rejected(model, task_data):
    sets = {"shapes": tensor_set("shapes", *task_data["colours"])}
    with pytest.raises(ValueError, match=r"Unknown task 'shapes'.*'animals', 'colours'"):
        evaluate_multitask(model, sets, MultiTaskEvaluationSettings(progress=False))
    with pytest.raises(ValueError, match="task_sets is empty"):
        evaluate_multitask(model, {}, MultiTaskEvaluationSettings(progress=False))


def test_out_of_range_labels_rejected(model, task_data):
    pixel_values, labels = task_data["colours"]
    sets = {"colours": tensor_set("colours", pixel_values, torch.full_like(labels, 5))}
    with pytest.raises(ValueError, match=r"labels \[5\] outside its label space of 3 classes"):
        evaluate_multitask(model, sets, MultiTaskEvaluationSettings(progress=False))


def test_summary_table_lists_every_method(model, task_data):
    sets = {task: tensor_set(task, *values) for task, values in task_data.items()}
    results = evaluate_multitask(model, sets, MultiTaskEvaluationSettings(include_ties=False, progress=False))
    text = summarize_multitask(results)
    lines = text.splitlines()
    assert lines[0].split() == ["Method", "animals", "colours", "Average"]
    assert len(lines) == 2 + len(results["methods"])
    task_arithmetic = next(line for line in lines if line.startswith("Task arithmetic"))
    expected = results["summary"]["task_arithmetic"]["average"]
    assert task_arithmetic.split()[-1] == f"{100 * expected:.2f}"

    markdown = summarize_multitask(results, markdown=True).splitlines()
    assert markdown[0] == "| Method | animals | colours | Average |"
    assert markdown[1] == "|---|---:|---:|---:|"
    assert any(line.startswith("| DaWin (per sample) |") for line in markdown)
    assert any(line.startswith("| Fine-tuned: extra |") for line in markdown)


def save_image_dataset(path, class_names, num_examples: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(num_examples)]
    labels = rng.integers(0, len(class_names), num_examples).tolist()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(path))


def test_command_on_saved_model(model, tmp_path, capsys):
    model.save_pretrained(tmp_path / "model")
    save_image_dataset(tmp_path / "animals", list(TINY_CLASS_NAMES), 7, seed=0)
    # A subset of the task's classes, in another order: scored through a label-space projection.
    save_image_dataset(tmp_path / "colours", ["blue", "red"], 5, seed=1)
    output_dir = tmp_path / "results"
    status = main_multitask([
        "--model", str(tmp_path / "model"),
        "--task-dataset", f"animals={tmp_path / 'animals'}",
        "--task-dataset", f"colours={tmp_path / 'colours'}",
        "--batch-size", "3", "--no-ties", "--no-progress", "--output-dir", str(output_dir),
    ])  # fmt: skip
    assert status == 0
    results = json.loads((output_dir / "results.json").read_text())
    assert results["tasks"]["animals"]["num_examples"] == 7
    assert results["tasks"]["colours"]["num_classes"] == 2
    assert "ties" not in results["methods"]
    markdown = (output_dir / "results.md").read_text()
    assert markdown == summarize_multitask(results, markdown=True) + "\n"
    assert "DaWin (per sample)" in capsys.readouterr().out
    assert not [path.name for path in output_dir.iterdir() if path.name.startswith(".")]


def test_command_split_per_task_dataset(model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    save_image_dataset(tmp_path / "validation", ["red", "green", "blue"], 4, seed=2)
    save_image_dataset(tmp_path / "test", ["red", "green", "blue"], 6, seed=3)
    splits = {name: datasets.load_from_disk(str(tmp_path / name)) for name in ("validation", "test")}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "colours"))
    output_dir = tmp_path / "results"

    status = main_multitask([
        "--model", str(tmp_path / "model"), "--task-dataset", f"colours={tmp_path / 'colours'}:validation",
        "--no-ties", "--no-progress", "--no-plots", "--output-dir", str(output_dir),
    ])  # fmt: skip

    assert status == 0
    results = json.loads((output_dir / "results.json").read_text())
    assert results["tasks"]["colours"]["num_examples"] == 4
    assert results["dataset_splits"] == {"colours": "validation"}

def test_command_loads_requested_dtype(model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    save_image_dataset(tmp_path / "colours", ["red", "green", "blue"], 4, seed=3)

    status = main_multitask([
        "--model", str(tmp_path / "model"), "--task-dataset", f"colours={tmp_path / 'colours'}", "--dtype", "bfloat16",
        "--no-ties", "--no-progress", "--no-plots", "--output-dir", str(tmp_path / "results"),
    ])  # fmt: skip

    assert status == 0
    settings = json.loads((tmp_path / "results" / "results.json").read_text())["settings"]
    assert settings["dtype"] == "bfloat16"
    assert settings["num_processes"] == 1


def test_command_pickled_model_needs_flag(model, tmp_path, capsys):
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    save_image_dataset(tmp_path / "colours", ["red", "green", "blue"], 4, seed=3)
    arguments = [
        "--model", str(folder), "--task-dataset", f"colours={tmp_path / 'colours'}", "--no-ties", "--no-progress",
        "--no-plots",
    ]  # fmt: skip

    assert main_multitask([*arguments, "--output-dir", str(tmp_path / "refused")]) == 1
    assert "safetensors files only" in capsys.readouterr().err
    assert main_multitask([*arguments, "--output-dir", str(tmp_path / "results"), "--allow-torch-load"]) == 0
    assert (tmp_path / "results" / "results.json").is_file()


@pytest.mark.parametrize("flag", [[], ["--multitask"]])
def test_evaluate_command_routes_multitask(model, tmp_path, capsys, flag):
    model.save_pretrained(tmp_path / "model")
    save_image_dataset(tmp_path / "colours", ["red", "green", "blue"], 4, seed=3)

    status = main([
        "evaluate", *flag, "--model", str(tmp_path / "model"), "--task-dataset", f"colours={tmp_path / 'colours'}",
        "--no-ties", "--no-progress", "--output-dir", str(tmp_path / "results"),
    ])  # fmt: skip

    assert status == 0
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert list(results["tasks"]) == ["colours"]
    assert "DaWin (per sample)" in capsys.readouterr().out


def test_evaluate_command_rejects_pair_options_for_multitask(model, tmp_path):
    model.save_pretrained(tmp_path / "model")

    with pytest.raises(SystemExit, match="^hf-dawin evaluate: error: --model names a multi-task DaWin model.* "
                                         "--id-dataset, --shift-dataset cannot be used"):
        main(["evaluate", "--model", str(tmp_path / "model"), "--id-dataset", "x", "--shift-dataset", "a=b"])


def test_command_on_endpoint_folders(tmp_path, tiny_pair_dirs):
    pretrained_dir, fine_tuned_dir = tiny_pair_dirs
    save_image_dataset(tmp_path / "pets", ["cat", "dog"], 4, seed=2)
    arguments = parse_multitask_arguments([
        "--pretrained", str(pretrained_dir), "--fine-tuned", str(fine_tuned_dir), "--fine-tuned", str(fine_tuned_dir),
        "--task-dataset", f"pets={tmp_path / 'pets'}", "--scale", "0.5", "--no-progress",
        "--output-dir", str(tmp_path / "out"),
    ])  # fmt: skip
    results = run_evaluate_multitask(arguments)
    assert results["settings"]["scale"] == 0.5
    assert list(results["tasks"]) == ["pets"]
    assert results["fine_tuned_names"] == ["fine_tuned_1", "fine_tuned_2"]


def test_command_named_endpoints_give_expert_row(tmp_path, tiny_pair_dirs, caplog):
    pretrained_dir, fine_tuned_dir = tiny_pair_dirs
    save_image_dataset(tmp_path / "pets", ["cat", "dog"], 4, seed=2)
    common = ["--pretrained", str(pretrained_dir), "--task-dataset", f"pets={tmp_path / 'pets'}", "--no-ties",
              "--no-progress", "--no-plots"]

    with caplog.at_level("WARNING", logger="hf_dawin.evaluation_multitask"):
        unnamed = run_evaluate_multitask(parse_multitask_arguments([
            *common, "--fine-tuned", str(fine_tuned_dir), "--output-dir", str(tmp_path / "unnamed"),
        ]))  # fmt: skip
    assert "fine_tuned_expert" not in unnamed["methods"]
    assert "have no 'Fine-tuned on the task (expert)' row" in caplog.text
    assert "--fine-tuned TASK=SOURCE" in caplog.text
    caplog.clear()

    with caplog.at_level("WARNING", logger="hf_dawin.evaluation_multitask"):
        named = run_evaluate_multitask(parse_multitask_arguments([
            *common, "--fine-tuned", f"pets={fine_tuned_dir}", "--fine-tuned", str(pretrained_dir),
            "--output-dir", str(tmp_path / "named"),
        ]))  # fmt: skip
    assert named["fine_tuned_names"] == ["pets", pretrained_dir.name]
    assert "fine_tuned_expert" in named["methods"]
    assert "expert" not in caplog.text
    expert = named["tasks"]["pets"]["scores"]["fine_tuned_expert"]
    assert expert == named["tasks"]["pets"]["scores"]["fine_tuned:pets"]

def test_command_errors_name_the_task_dataset(tmp_path, tiny_pair_dirs, capsys):
    pretrained_dir, fine_tuned_dir = tiny_pair_dirs
    save_image_dataset(tmp_path / "pets", ["cat", "dog"], 4, seed=2)
    save_image_dataset(tmp_path / "cased", ["Cat", "cat", "dog"], 4, seed=3)
    datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))], "label": [0]}).save_to_disk(str(tmp_path / "ints"))
    common = [
        "evaluate-multitask", "--pretrained", str(pretrained_dir), "--fine-tuned", str(fine_tuned_dir),
        "--fine-tuned", str(fine_tuned_dir), "--task-dataset", f"pets={tmp_path / 'pets'}", "--no-progress",
        "--output-dir", str(tmp_path / "out"),
    ]  # fmt: skip

    for entry, expected in (
        (f"cased={tmp_path / 'cased'}", "class_names contains duplicates, compared ignoring case and whitespace"),
        (f"ints={tmp_path / 'ints'}", "Column 'label' is Value("),
        (f"gone={tmp_path / 'gone'}", "Evaluation dataset directory"),
    ):
        capsys.readouterr()
        assert main([*common, "--task-dataset", entry]) == 1
        error = capsys.readouterr().err
        assert f"hf-dawin evaluate-multitask: error: --task-dataset {entry}: {expected}" in error
        assert "--class-names" not in error
        if entry.startswith("ints="):
            assert "ClassLabel(names=[...])), or save the images in one folder per class." in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pretrained", "p"], "--pretrained needs at least one --fine-tuned"),
        (["--model", "m"], "needs one --task-dataset"),
        (["--task-dataset", "a=b"], "--task-dataset needs a model"),
        (["--model", "m", "--task-dataset", "ab"], "expects TASK=SOURCE"),
        (["--model", "m", "--pretrained", "p", "--fine-tuned", "f", "--task-dataset", "a=b"], "not both"),
        (["--model", "m", "--pretrained", "p", "--task-dataset", "a=b"], "not both"),
        (["--model", "m", "--task-dataset", "a=b", "--scale", "0"], "--scale must be a positive number"),
        (["--model", "m", "--task-dataset", "a=b", "--task-dataset", "a=c"], r"but \['a'\] appear more than once"),
        (["--split", "validation", "--templates", "t.txt"], "--split, --templates are used only with your own"),
        (["--model", "m", "--task-dataset", "a=data:"], "--task-dataset data:: 'data:' ends with ':' but names no split"),
        (["--pretrained", "p", "--fine-tuned", "=f", "--task-dataset", "a=b"], "--fine-tuned =f has an empty NAME"),
    ],
)
def test_command_rejects_bad_arguments(argv, message):
    with pytest.raises(SystemExit, match=message):
        main_multitask(argv)


def test_command_reports_skipped_images(model, tmp_path, capsys):
    model.save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(4)
    encoded = []
    for _ in range(4):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    encoded[2] = {"bytes": b"\x89PNG broken", "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["red", "green", "blue"])})
    datasets.Dataset.from_dict({"image": encoded, "label": [0, 1, 2, 0]}, features=features).save_to_disk(
        str(tmp_path / "colours")
    )

    status = main_multitask([
        "--model", str(tmp_path / "model"), "--task-dataset", f"colours={tmp_path / 'colours'}",
        "--no-ties", "--no-progress", "--output-dir", str(tmp_path / "results"),
    ])  # fmt: skip

    assert status == 0
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["tasks"]["colours"]["num_skipped"] == 1
    assert results["tasks"]["colours"]["skipped_positions"] == [2]
    assert results["tasks"]["colours"]["num_examples"] == 3
    assert "colours: 1 of 4 images could not be read and were skipped" in capsys.readouterr().out


def test_command_errors_are_one_line(model, tiny_pair_dirs, tmp_path, capsys):
    model.save_pretrained(tmp_path / "model")
    save_image_dataset(tmp_path / "cars", ["sedan", "truck"], 3, seed=5)

    status = main_multitask(["--model", str(tmp_path / "model"), "--task-dataset", f"cars={tmp_path / 'cars'}"])

    assert status == 1
    error = capsys.readouterr().err
    assert "\nhf-dawin evaluate-multitask: error: Unknown task 'cars' in --task-dataset" in "\n" + error
    assert "Name each dataset after one of them: --task-dataset TASK=SOURCE." in error
    assert "Traceback" not in error
    status = main_multitask(["--model", str(tiny_pair_dirs[0]), "--task-dataset", f"cars={tmp_path / 'cars'}"])
    assert status == 1
    assert "contains a model of type 'clip'" in capsys.readouterr().err
    save_image_dataset(tmp_path / "colours", ["red", "purple"], 3, seed=6)
    status = main_multitask(["--model", str(tmp_path / "model"), "--task-dataset", f"colours={tmp_path / 'colours'}"])
    assert status == 1
    error = capsys.readouterr().err
    assert "1 label names of the 'colours' dataset are not classes of task 'colours' (compared ignoring case): " \
        "['purple']. The task's classes are ['red', 'green', 'blue']." in error
    assert "wordnet" not in error.lower()


def test_command_rejects_pair_model(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "pair")
    with pytest.raises(SystemExit, match="is a DaWin pair .* Evaluate it with hf-dawin evaluate --model"):
        main_multitask(["--model", str(tmp_path / "pair"), "--task-dataset", f"a={tmp_path}"])


@pytest.fixture(scope="module")
def multitask_command(tiny_pair_dirs, tmp_path_factory):
    """Command-line arguments of a two-task evaluation on endpoint folders and saved datasets."""
    data = tmp_path_factory.mktemp("multitask_data")
    # 7 and 5 examples in batches of 2: the ranks get different numbers of batches and a short last batch.
    save_image_dataset(data / "pets", ["cat", "dog"], 7, seed=6)
    save_image_dataset(data / "colours", ["red", "green", "blue"], 5, seed=7)
    pretrained_dir, fine_tuned_dir = (str(path) for path in tiny_pair_dirs)
    return [
        "evaluate-multitask", "--pretrained", pretrained_dir, "--fine-tuned", fine_tuned_dir,
        "--fine-tuned", pretrained_dir, "--task-dataset", f"pets={data / 'pets'}",
        "--task-dataset", f"colours={data / 'colours'}", "--batch-size", "2",
    ]  # fmt: skip


@pytest.mark.slow
def test_torchrun_matches_single_process(multitask_command, tmp_path):
    from .test_distributed import _rank_logs, _run, _torchrun

    def results(directory, num_processes):
        values = json.loads((directory / "results.json").read_text())
        values.pop("runtime_seconds")
        values["settings"].pop("progress")
        assert values["settings"].pop("num_processes") == num_processes
        return values

    single = _run([sys.executable, "-m", "hf_dawin.cli", *multitask_command, "--no-progress",
                   "--output-dir", str(tmp_path / "single")])
    assert single.returncode == 0, single.stderr[-3000:]
    launched = _run(_torchrun(tmp_path / "logs", "-m", "hf_dawin.cli", *multitask_command,
                              "--output-dir", str(tmp_path / "multi")))
    assert launched.returncode == 0, launched.stderr[-3000:]

    assert results(tmp_path / "multi", 2) == results(tmp_path / "single", 1)
    assert results(tmp_path / "single", 1)["tasks"]["pets"]["num_examples"] == 7
    assert "Accuracy (%) per task" in _rank_logs(tmp_path / "logs", 0, "stdout")
    assert _rank_logs(tmp_path / "logs", 1, "stdout").strip() == ""
    assert "it/s" not in _rank_logs(tmp_path / "logs", 1, "stderr")
