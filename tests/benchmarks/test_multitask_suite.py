"""The embedded multi-task suite: settings, data splits, prompts, evaluation sets and an end-to-end run."""

import json
import os

import numpy as np
import pytest
import torch

from hf_dawin.benchmarks.multitask import (
    MANIFEST_NAME,
    TASK_CLASS_NAMES,
    TASK_NAMES,
    TASK_TEMPLATES,
    MultiTaskSuiteSettings,
    _CaptionTable,
    _sample_batch,
    load_multitask_data,
    multitask_evaluation_sets,
    train_multitask_suite,
)
from hf_dawin.benchmarks.reference_pair import normalise_pixels


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ("mnist", "cifar10")}, r"distinct names from \['mnist', 'fashion_mnist', 'sklearn_digits'\]"),
        ({"tasks": ("mnist", "mnist")}, "distinct names"),
        ({"tasks": ()}, "distinct names"),
        ({"pretraining_steps": -1}, "`pretraining_steps` must be a non-negative integer"),
        ({"fine_tuning_learning_rate": 0.0}, "`fine_tuning_learning_rate` must be a positive number"),
        ({"sklearn_digits_test_examples": 1797}, r"\[1, 1796\]"),
        ({"eval_examples": 0}, "`eval_examples` must be a positive integer or None"),
        ({"patch_size": 5}, "`patch_size` must divide the image side 28"),
    ],
)
def test_settings_reject_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiTaskSuiteSettings(**kwargs)


def test_settings_round_trip_through_json():
    settings = MultiTaskSuiteSettings(tasks=["fashion_mnist", "mnist"], pretraining_steps=3)
    assert settings.tasks == ("fashion_mnist", "mnist")
    values = settings.to_dict()
    assert values["tasks"] == ["fashion_mnist", "mnist"]
    assert MultiTaskSuiteSettings(**values) == settings


def test_sklearn_digits_split_disjoint_fixed():
    data = load_multitask_data(("sklearn_digits",), sklearn_digits_test_examples=500)["sklearn_digits"]
    train_images, train_labels = data["train"]
    test_images, test_labels = data["test"]
    assert train_images.shape == (1297, 28, 28)
    assert test_images.shape == (500, 28, 28)
    assert train_images.dtype == np.uint8
    assert train_labels.dtype == np.int64
    assert set(np.unique(test_labels)) == set(range(10))
    # The 1,797 scikit-learn digits hold no two identical images, so no test image may appear in training.
    train_rows = {image.tobytes() for image in train_images}
    assert not [image for image in test_images if image.tobytes() in train_rows]
    again = load_multitask_data(("sklearn_digits",), sklearn_digits_test_examples=500)["sklearn_digits"]
    np.testing.assert_array_equal(again["test"][0], test_images)


def test_caption_table_indexes_each_prompt(tiny_processor):
    tasks = ("mnist", "fashion_mnist")
    table = _CaptionTable(tiny_processor.tokenizer, tasks, max_length=96)
    labels = torch.tensor([0, 9, 3])
    templates = torch.tensor([1, 0, 3])
    for task in tasks:
        indices = table.indices(task, labels, templates)
        for index, label, template in zip(indices.tolist(), labels.tolist(), templates.tolist()):
            prompt = TASK_TEMPLATES[task][template].format(TASK_CLASS_NAMES[task][label])
            expected = tiny_processor.tokenizer(prompt)["input_ids"]
            row = table.input_ids[index].tolist()
            assert row[: len(expected)] == expected, prompt
            assert set(row[len(expected) :]) <= {tiny_processor.tokenizer.pad_token_id}, prompt
    assert table.class_ids("fashion_mnist", labels).tolist() == [10, 19, 13]


def test_sample_batch_mixes_tasks(tiny_processor):
    tasks = ("mnist", "fashion_mnist")
    table = _CaptionTable(tiny_processor.tokenizer, tasks, max_length=96)
    train = {
        "mnist": (torch.zeros(5, 28, 28, dtype=torch.uint8), torch.arange(5)),
        "fashion_mnist": (torch.full((7, 28, 28), 255, dtype=torch.uint8), torch.arange(7)),
    }
    grey, caption_indices, class_ids = _sample_batch(train, tasks, table, 64, torch.Generator().manual_seed(0))
    assert grey.shape == (64, 28, 28)
    from_fashion = class_ids >= 10
    assert 0 < int(from_fashion.sum()) < 64
    # Fashion images are all white and MNIST images all black here, so images and prompts must agree.
    assert torch.all(grey[from_fashion] == 1.0)
    assert torch.all(grey[~from_fashion] == 0.0)
    assert torch.all(caption_indices[from_fashion] >= table.offsets["fashion_mnist"])
    assert torch.all(caption_indices[~from_fashion] < table.offsets["fashion_mnist"])


def test_evaluation_sets_cover_every_example():
    rng = np.random.default_rng(0)
    data = {
        "mnist": {"test": (rng.integers(0, 256, (11, 28, 28), dtype=np.uint8), np.arange(11) % 10)},
        "sklearn_digits": {"test": (rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.arange(4))},
    }
    sets = multitask_evaluation_sets(data, max_examples=9, batch_size=4)
    assert sets["mnist"].num_examples == 9
    assert sets["sklearn_digits"].num_examples == 4
    batches = list(sets["mnist"].batches())
    assert [len(indices) for _, _, indices in batches] == [4, 4, 1]
    pixel_values = torch.cat([values for values, _, _ in batches])
    assert pixel_values.shape == (9, 3, 28, 28)
    expected = normalise_pixels(torch.from_numpy(data["mnist"]["test"][0][:9]).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1))
    torch.testing.assert_close(pixel_values, expected)
    assert torch.cat([labels for _, labels, _ in batches]).tolist() == (np.arange(9) % 10).tolist()
    with pytest.raises(ValueError, match="`max_examples` as a positive integer"):
        multitask_evaluation_sets(data, max_examples=0)

    # Two processes: each reads a contiguous block of whole batches, and together they read every batch once.
    class Rank:
        def __init__(self, rank):
            self.rank = rank

        def split(self, items):
            middle = (len(items) + 1) // 2
            return items[:middle] if self.rank == 0 else items[middle:]

    shards = sets["mnist"].shard_batches
    assert [shards.num_examples(Rank(rank)) for rank in (0, 1)] == [8, 1]
    sharded = [batch for rank in (0, 1) for batch in shards(Rank(rank))]
    assert [indices.tolist() for _, _, indices in sharded] == [indices.tolist() for _, _, indices in batches]
    torch.testing.assert_close(torch.cat([values for values, _, _ in sharded]), pixel_values)


@pytest.mark.slow
def test_tiny_suite_end_to_end(tmp_path):
    """Train a tiny suite on a few hundred real images of each task, then evaluate every merge on real test images."""
    from hf_dawin.evaluation_multitask import MultiTaskEvaluationSettings, evaluate_multitask, summarize_multitask
    from hf_dawin.modeling_multitask import DaWinMultiTaskCLIPModel

    cache_dir = os.environ.get("HF_DAWIN_CACHE") or None
    settings = MultiTaskSuiteSettings(
        vision_hidden_size=32, vision_num_layers=2, vision_num_heads=2, text_hidden_size=32, text_num_layers=1,
        text_num_heads=2, projection_dim=32, batch_size=64, pretraining_steps=40, fine_tuning_steps=15,
        train_examples=300, eval_examples=100,
    )  # fmt: skip
    suite = train_multitask_suite(tmp_path / "suite", seed=1, config=settings, cache_dir=cache_dir, progress=False)
    manifest = json.loads((tmp_path / "suite" / MANIFEST_NAME).read_text())
    assert manifest["train_examples_per_task"] == {task: 300 for task in TASK_NAMES}
    assert set(manifest["accuracy"]["fine_tuned"]) == set(TASK_NAMES)
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]

    # A second call with the same settings reuses the suite instead of training again.
    modified = (suite.pretrained_dir / "model.safetensors").stat().st_mtime_ns
    again = train_multitask_suite(tmp_path / "suite", seed=1, config=settings, cache_dir=cache_dir, progress=False)
    assert again.manifest == suite.manifest
    assert (suite.pretrained_dir / "model.safetensors").stat().st_mtime_ns == modified

    tasks = list(suite.fine_tuned_dirs)
    model = DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
        suite.pretrained_dir, [suite.fine_tuned_dirs[task] for task in tasks],
        tasks=suite.tasks, templates=suite.templates, fine_tuned_names=tasks,
    )  # fmt: skip
    data = load_multitask_data(tuple(tasks), cache_dir)
    sets = multitask_evaluation_sets(data, max_examples=100, batch_size=50)
    results = evaluate_multitask(model, sets, MultiTaskEvaluationSettings(progress=False))
    assert list(results["tasks"]) == tasks
    assert "fine_tuned_expert" in results["methods"]
    for task in tasks:
        scores = results["tasks"][task]["scores"]
        assert scores["pretrained"]["accuracy"] == pytest.approx(manifest["accuracy"]["pretrained"][task], abs=1e-6)
        assert scores["fine_tuned_expert"]["accuracy"] == pytest.approx(
            manifest["accuracy"]["fine_tuned"][task][task], abs=1e-6
        )
        assert sum(results["tasks"][task]["task_weights"]["mean"]) == pytest.approx(1.0, abs=1e-5)
    assert "DaWin (per sample)" in summarize_multitask(results)
