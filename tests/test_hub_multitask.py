"""Hub artifacts of multi-task DaWin models: one-commit uploads with cards, and plain CLIP merges.

The uploads run the real `huggingface_hub` code against the loopback `FakeHub` of `test_hub`.
"""

import copy
import json

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load as load_safetensors
from transformers import CLIPModel, pipeline

from hf_dawin.evaluation import EvaluationSet
from hf_dawin.evaluation_multitask import MultiTaskEvaluationSettings, evaluate_multitask, main_multitask
from hf_dawin.hub import RESULTS_END_MARKER, RESULTS_START_MARKER
from hf_dawin.hub_multitask import (
    build_multitask_model_card,
    push_merged_multitask,
    push_multitask_results_to_hub,
    push_multitask_to_hub,
    save_merged_multitask,
)
from hf_dawin.heads import build_zero_shot_head, encode_image_features
from hf_dawin.interpolation import merge_task_vectors
from hf_dawin.modeling_multitask import DaWinMultiTaskCLIPModel

from .conftest import TINY_CLASS_NAMES, TINY_IMAGE_SIZE, make_clip
from .test_hub import fake_hub  # noqa: F401 - the loopback Hub fixture


TASKS = {"animals": list(TINY_CLASS_NAMES), "colours": ["red", "green", "blue"]}
TEMPLATES = {"animals": ["a photo of a {}."], "colours": ["the colour {}."]}
PRETRAINED_ID = "openai/clip-vit-base-patch32"
FINE_TUNED_IDS = ["someone/clip-animals", "someone/clip-colours"]


@pytest.fixture(scope="module")
def shared_model(tiny_processor):
    pretrained = make_clip(0)
    fine_tuned = [make_clip(30 + index, base=pretrained, noise=0.3) for index in range(2)]
    model = DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
        pretrained, fine_tuned, tasks=TASKS, templates=TEMPLATES, processor=tiny_processor,
        fine_tuned_names=["animals", "colours"],
    )  # fmt: skip
    model.config.pretrained_name_or_path = PRETRAINED_ID
    model.config.fine_tuned_names_or_paths = list(FINE_TUNED_IDS)
    generator = torch.Generator().manual_seed(8)
    model.fit_dataset_coefficients("colours", [torch.randn(6, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)])
    return model


@pytest.fixture()
def model(shared_model):
    return copy.deepcopy(shared_model)


@pytest.fixture(scope="module")
def results(shared_model):
    generator = torch.Generator().manual_seed(9)
    sets = {}
    for task, num_classes in (("animals", 4), ("colours", 3)):
        pixel_values = torch.randn(9, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)
        labels = torch.randint(0, num_classes, (9,), generator=generator)

        def batches(pixel_values=pixel_values, labels=labels):
            yield pixel_values, labels, torch.arange(len(labels))

        sets[task] = EvaluationSet(name=task, batches=batches, num_examples=9, in_distribution=True)
    return evaluate_multitask(copy.deepcopy(shared_model), sets, MultiTaskEvaluationSettings(progress=False))


def model_index(card):
    return {(result.dataset_name, result.metric_type): result.metric_value for result in card.data.eval_results or []}


def test_push_uploads_model_and_card_in_one_commit(fake_hub, model, results, tmp_path):
    info = push_multitask_to_hub(model, "my-org/multi-dawin", results=results)

    assert len(fake_hub.commits) == 1
    files = fake_hub.commits[0]["files"]
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} <= set(files)
    assert info.commit_url.endswith(f"/my-org/multi-dawin/commit/{info.oid}")
    config = json.loads(files["config.json"])
    assert config["tasks"] == TASKS
    assert set(config["dataset_task_weights"]) == {"colours"}
    weights = load_safetensors(files["model.safetensors"])
    assert any(key.startswith("pretrained.text_model.") for key in weights)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    loaded = DaWinMultiTaskCLIPModel.from_pretrained(tmp_path)
    pixel_values = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    with torch.no_grad():
        for task in TASKS:
            torch.testing.assert_close(
                loaded(pixel_values=pixel_values, task=task).logits, model(pixel_values=pixel_values, task=task).logits
            )


def test_pushed_card_metadata_and_text(fake_hub, model, results):
    model.push_to_hub("my-org/multi-dawin", results=results)

    card = ModelCard(fake_hub.repos["my-org/multi-dawin"]["README.md"].decode())
    assert card.data.base_model == [PRETRAINED_ID, *FINE_TUNED_IDS]
    assert card.data.base_model_relation == "merge"
    assert card.data.pipeline_tag == "image-classification"
    assert "multi-task" in card.data.tags
    entries = model_index(card)
    for task in TASKS:
        accuracy = results["tasks"][task]["scores"]["dawin_sample"]["accuracy"]
        assert entries[(task, "accuracy")] == pytest.approx(accuracy)
        assert (task, "f1") in entries
    text = card.text
    assert "| `animals` (default) | 4 |" in text
    assert "| task-arithmetic scale s | 0.3 |" in text
    assert "fitted for `colours`" in text
    assert "| DaWin (per sample) |" in text
    assert "The `model-index` metadata of this card reports DaWin (per sample)." in text
    assert 'model.config.default_task = "colours"' in text


def test_push_results_updates_card_of_pushed_model(fake_hub, model, results):
    push_multitask_to_hub(model, "my-org/multi-dawin")
    push_multitask_results_to_hub("my-org/multi-dawin", results, method="task_arithmetic")
    changed = json.loads(json.dumps(results))
    changed["tasks"]["colours"]["scores"]["task_arithmetic"]["accuracy"] = 0.125
    changed["summary"]["task_arithmetic"]["per_task"]["colours"] = 0.125

    push_multitask_results_to_hub("my-org/multi-dawin", changed, method="task_arithmetic")

    assert len(fake_hub.commits) == 3
    assert set(fake_hub.commits[-1]["files"]) == {"README.md"}
    # A card update never deletes the model's weights.
    assert fake_hub.commits[1]["deleted"] == fake_hub.commits[2]["deleted"] == []
    assert "model.safetensors" in fake_hub.repos["my-org/multi-dawin"]
    card = ModelCard(fake_hub.repos["my-org/multi-dawin"]["README.md"].decode())
    entries = model_index(card)
    assert entries[("colours", "accuracy")] == 0.125
    animals = results["tasks"]["animals"]["scores"]["task_arithmetic"]["accuracy"]
    assert entries[("animals", "accuracy")] == pytest.approx(animals)
    assert len(card.data.eval_results) == 4
    # The card's own sections stay; the evaluation section is replaced, not appended again.
    assert "| `animals` (default) | 4 |" in card.text
    assert card.text.count(RESULTS_START_MARKER) == card.text.count(RESULTS_END_MARKER) == 1
    assert "reports Task arithmetic." in card.text
    assert "| Task arithmetic | " in card.text
    assert "| 12.50 |" in card.text


def test_push_results_creates_card(fake_hub, results):
    push_multitask_results_to_hub("my-org/new-multi", results)

    card = ModelCard(fake_hub.repos["my-org/new-multi"]["README.md"].decode())
    assert card.data.pipeline_tag == "image-classification"
    assert "multi-task" in card.data.tags
    assert set(model_index(card)) == {(task, metric) for task in TASKS for metric in ("accuracy", "f1")}
    assert "hf-dawin evaluate-multitask" in card.text


def test_push_results_unknown_method_sends_nothing(fake_hub, results):
    with pytest.raises(ValueError, match="no scores for method 'mixture'"):
        push_multitask_results_to_hub("my-org/new-multi", results, method="mixture")
    assert fake_hub.commits == []
    assert "my-org/new-multi" not in fake_hub.repos


def test_command_pushes_results(fake_hub, model, tmp_path, capsys):
    from .test_evaluation_multitask import save_image_dataset

    model.save_pretrained(tmp_path / "model")
    save_image_dataset(tmp_path / "colours", ["red", "green", "blue"], 5, seed=4)

    status = main_multitask([
        "--model", str(tmp_path / "model"), "--task-dataset", f"colours={tmp_path / 'colours'}", "--no-ties",
        "--no-progress", "--no-plots", "--output-dir", str(tmp_path / "out"), "--push-results", "my-org/evaluated",
        "--max-examples", "3",
    ])  # fmt: skip

    assert status == 0
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    card = ModelCard(fake_hub.repos["my-org/evaluated"]["README.md"].decode())
    entries = model_index(card)
    assert entries[("colours", "accuracy")] == pytest.approx(written["tasks"]["colours"]["scores"]["dawin_sample"]["accuracy"])
    assert entries[("colours", "f1")] == pytest.approx(written["tasks"]["colours"]["scores"]["dawin_sample"]["f1"])
    assert not (tmp_path / "out" / "accuracy.png").exists()
    assert "Results written into the model card of my-org/evaluated" in capsys.readouterr().out
    assert written["settings"]["max_examples"] == 3
    assert written["tasks"]["colours"]["num_examples"] == 3
    assert "Each set was limited to at most 3 images (`--max-examples 3`)" in card.text
    assert [result.dataset_args for result in card.data.eval_results] == [{"max_examples": 3, "seed": 0}] * 2
    assert {result.metric_name for result in card.data.eval_results} == {
        "DaWin (per sample) accuracy", "DaWin (per sample) macro F1",
    }


def test_command_push_results_offline_fails_before_running(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="offline mode is on"):
        main_multitask(["--model", "m", "--task-dataset", "a=b", "--push-results", "my-org/evaluated"])


def test_card_without_results_notes_absence(model):
    card = build_multitask_model_card(model, repo_id="my-org/multi-dawin")

    assert card.data.eval_results is None
    assert "No evaluation results were given" in card.text


@pytest.mark.parametrize(
    ("method", "task", "coefficients"),
    [("task_arithmetic", None, [0.3, 0.3]), ("weight_average", None, [0.5, 0.5]), ("dataset_mean", "colours", None)],
)
def test_saved_merge_is_plain_clip(model, tmp_path, method, task, coefficients):
    folder = save_merged_multitask(model, tmp_path / method, method, task=task)

    if coefficients is None:
        coefficients = model.static_coefficients(method, task).tolist()
    reloaded = CLIPModel.from_pretrained(folder)
    expected = merge_task_vectors(
        model.pretrained.state_dict(), [endpoint.state_dict() for endpoint in model.fine_tuned], coefficients
    )
    state = reloaded.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, msg=f"merged {key}")
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert card.data.merge_method == method
    assert card.data.merge_coefficients == pytest.approx(coefficients)

    classifier = pipeline("zero-shot-image-classification", model=str(folder))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    predictions = classifier(image, candidate_labels=["red", "green", "blue"])
    assert sorted(prediction["label"] for prediction in predictions) == ["blue", "green", "red"]


def test_saved_ties_merge_matches_merge_ties(model, tmp_path):
    folder = save_merged_multitask(model, tmp_path / "ties", "ties")

    reloaded = CLIPModel.from_pretrained(folder).state_dict()
    for key, value in model.merge_ties().state_dict().items():
        torch.testing.assert_close(reloaded[key], value, msg=f"merged {key}")
    assert "TIES-merged" in ModelCard.load(folder / "README.md").text


def test_push_merged_one_commit(fake_hub, model):
    push_merged_multitask(model, "my-org/clip-task-arithmetic", "task_arithmetic")

    assert len(fake_hub.commits) == 1
    files = fake_hub.commits[0]["files"]
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert json.loads(files["config.json"])["architectures"] == ["CLIPModel"]


def test_merge_method_errors(model, tmp_path):
    with pytest.raises(ValueError, match="valid methods are 'task_arithmetic'"):
        save_merged_multitask(model, tmp_path / "x", "average")
    with pytest.raises(ValueError, match="fit_dataset_coefficients\\('animals'"):
        save_merged_multitask(model, tmp_path / "y", "dataset_mean", task="animals")
    with pytest.raises(ValueError, match="Unknown task 'shapes'"):
        save_merged_multitask(model, tmp_path / "z", "dataset_mean", task="shapes")
    assert not (tmp_path / "x").exists()


def test_merged_card_warns_text_tower_changed(model, tmp_path):
    folder = save_merged_multitask(model, tmp_path / "task_arithmetic", "task_arithmetic")

    text = ModelCard.load(folder / "README.md").text
    assert "Fine-tuning changed the text towers" in text
    assert "matches hf_dawin's" not in text


@pytest.mark.parametrize("method", ["task_arithmetic", "weight_average", "dataset_mean", "ties"])
def test_merged_card_shared_text_tower_matches(tiny_processor, tmp_path, method):
    pretrained = make_clip(0)
    vision_side = ("vision_model.", "visual_projection.")
    text_side = {name: value for name, value in pretrained.state_dict().items() if not name.startswith(vision_side)}
    fine_tuned = [make_clip(30 + index, base=pretrained, noise=0.3) for index in range(2)]
    for endpoint in fine_tuned:
        endpoint.load_state_dict(text_side, strict=False)
    model = DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
        pretrained, fine_tuned, tasks=TASKS, templates=TEMPLATES, processor=tiny_processor
    )
    pixel_values = torch.randn(5, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(4))
    model.fit_dataset_coefficients("colours", [pixel_values])

    folder = save_merged_multitask(model, tmp_path / method, method, task="colours" if method == "dataset_mean" else None)
    assert f"matches hf_dawin's `{method}` mode" in ModelCard.load(folder / "README.md").text

    # The claim holds: the exported checkpoint's own zero-shot classifier gives hf_dawin's logits in that mode.
    merged = CLIPModel.from_pretrained(folder)
    head = build_zero_shot_head(merged, tiny_processor.tokenizer, TASKS["colours"], TEMPLATES["colours"])
    with torch.inference_mode():
        own_logits = encode_image_features(merged, pixel_values).float() @ head.T
        dawin_logits = model(pixel_values=pixel_values, task="colours", mode=method).logits
    torch.testing.assert_close(own_logits, dawin_logits, atol=1e-4, rtol=1e-4)
