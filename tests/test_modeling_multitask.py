"""DaWinMultiTaskCLIPModel: task weights, exact per-sample merges, static modes, persistence and bad input."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, CLIPModel, pipeline

from hf_dawin.configuration_multitask import DaWinMultiTaskCLIPConfig
from hf_dawin.interpolation import merge_task_vectors
from hf_dawin.merging import ties_merge_state_dicts
from hf_dawin.modeling_multitask import (
    DaWinMultiTaskCLIPModel,
    coefficients_from_task_weights,
    task_weights_from_entropies,
)

from .conftest import TINY_CLASS_NAMES, TINY_IMAGE_SIZE, assert_save_rejected, make_clip, tiny_clip_config


TASKS = {"animals": list(TINY_CLASS_NAMES), "colours": ["red", "green", "blue"]}
TEMPLATES = {"animals": ["a photo of a {}.", "a drawing of a {}."], "colours": ["something {}.", "the colour {}."]}


def build_model(processor, num_fine_tuned: int = 3, tasks=TASKS, templates=TEMPLATES, **kwargs) -> DaWinMultiTaskCLIPModel:
    pretrained = make_clip(0)
    fine_tuned = [make_clip(10 + index, base=pretrained, noise=0.3) for index in range(num_fine_tuned)]
    return DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
        pretrained, fine_tuned, tasks=tasks, templates=templates, processor=processor, **kwargs
    )


@pytest.fixture(scope="module")
def shared_model(tiny_processor):
    return build_model(tiny_processor)


@pytest.fixture()
def model(shared_model):
    # Tests change the config (default task, fitted task weights), so each gets its own copy.
    return copy.deepcopy(shared_model)


@pytest.fixture()
def images():
    generator = torch.Generator().manual_seed(7)
    return torch.randn(5, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)


def merged_head(model, task: str, coefficients) -> tuple[torch.Tensor, torch.Tensor]:
    """theta_0 + sum_t c_t (theta_t - theta_0) for one task's heads, written out by hand."""
    heads = model.heads[model.config.task_names.index(task)]
    weight, bias = heads[0].weight.detach().clone(), heads[0].bias.detach().clone()
    for coefficient, head in zip(coefficients, heads[1:]):
        weight += coefficient * (head.weight.detach() - heads[0].weight.detach())
        bias += coefficient * (head.bias.detach() - heads[0].bias.detach())
    return weight, bias


def plain_clip_logits(clip: CLIPModel, weight: torch.Tensor, bias: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    features = F.normalize(clip.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
    return features @ weight.T + bias


@torch.no_grad()
def explicit_merged_logits(model, task: str, pixel_values: torch.Tensor, coefficients) -> torch.Tensor:
    """Logits of a separately merged plain CLIPModel and head, computed without any mixing layer."""
    coefficients = [float(value) for value in coefficients]
    state = merge_task_vectors(
        model.pretrained.state_dict(), [endpoint.state_dict() for endpoint in model.fine_tuned], coefficients
    )
    clip = CLIPModel(model.pretrained.config).eval()
    clip.load_state_dict(state)
    return plain_clip_logits(clip, *merged_head(model, task, coefficients), pixel_values)


@torch.no_grad()
def explicit_entropies(model, task: str, pixel_values: torch.Tensor) -> torch.Tensor:
    """Entropy of each fine-tuned endpoint with its own head, from plain CLIP calls; shape (batch, T)."""
    heads = model.heads[model.config.task_names.index(task)]
    columns = []
    for endpoint, head in zip(model.fine_tuned, heads[1:]):
        probabilities = plain_clip_logits(endpoint, head.weight, head.bias, pixel_values).double().softmax(dim=-1)
        columns.append(-(probabilities * probabilities.log()).sum(dim=-1))
    return torch.stack(columns, dim=1).float()


# ----------------------------------------------------------------------------------------------------------
# Coefficients
# ----------------------------------------------------------------------------------------------------------


def test_task_weights_softmax_negative_entropies():
    entropies = torch.tensor([[0.0, math.log(2.0), math.log(4.0)], [1.0, 1.0, 1.0]])
    # exp(-H) = (1, 1/2, 1/4), normalised by 7/4.
    expected = torch.tensor([[4 / 7, 2 / 7, 1 / 7], [1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(task_weights_from_entropies(entropies), expected)


def test_coefficients_scale_by_s_times_t():
    weights = torch.tensor([[0.5, 0.25, 0.25]])
    torch.testing.assert_close(coefficients_from_task_weights(weights, 0.3), torch.tensor([[0.45, 0.225, 0.225]]))
    uniform = torch.full((2, 4), 0.25)
    torch.testing.assert_close(coefficients_from_task_weights(uniform, 0.3), torch.full((2, 4), 0.3))


# ----------------------------------------------------------------------------------------------------------
# Exactness of the per-sample merge
# ----------------------------------------------------------------------------------------------------------


def test_inference_mode_then_autograd_call(model, images):
    model.clear_merged_cache()
    with torch.inference_mode():
        first = model(pixel_values=images, task="animals", mode="sample").logits

    # The mixed classifier cached by the first call must serve a call that records autograd.
    second = model(pixel_values=images, task="animals", mode="sample").logits

    torch.testing.assert_close(second, first)
    assert second.requires_grad


@torch.no_grad()
def test_sample_mode_matches_explicit_merges(model, images):
    for task in TASKS:
        outputs = model(pixel_values=images, task=task, mode="sample")
        entropies = explicit_entropies(model, task, images)
        torch.testing.assert_close(outputs.entropies, entropies, atol=1e-5, rtol=1e-5)
        expected_coefficients = 0.3 * 3 * torch.softmax(-entropies, dim=-1)
        torch.testing.assert_close(outputs.coefficients, expected_coefficients, atol=1e-5, rtol=1e-5)
        assert outputs.logits.shape == (images.shape[0], len(TASKS[task]))
        for index in range(images.shape[0]):
            expected = explicit_merged_logits(model, task, images[index : index + 1], outputs.coefficients[index])
            difference = (outputs.logits[index] - expected[0]).abs().max().item()
            assert difference < 1e-4, f"task {task}, sample {index}: {difference}"


@torch.no_grad()
def test_interpolated_logits_arbitrary_coefficients(model, images):
    coefficients = torch.tensor(
        [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.7, -0.2, 0.4], [1.3, 0.5, 0.1]]
    )
    mixed = model.interpolated_logits(images, "animals", coefficients)
    for index in range(images.shape[0]):
        expected = explicit_merged_logits(model, "animals", images[index : index + 1], coefficients[index])
        assert (mixed[index] - expected[0]).abs().max().item() < 1e-4, f"sample {index}"


@torch.no_grad()
def test_endpoint_logits_match_plain_clip(model, images):
    heads = model.heads[model.config.task_names.index("colours")]
    pretrained = plain_clip_logits(model.pretrained, heads[0].weight, heads[0].bias, images)
    torch.testing.assert_close(model.pretrained_logits(images, "colours"), pretrained, atol=1e-5, rtol=0)
    fine_tuned = model.fine_tuned_logits(images, "colours")
    assert fine_tuned.shape == (images.shape[0], 3, 3)
    for index, (endpoint, head) in enumerate(zip(model.fine_tuned, heads[1:])):
        expected = plain_clip_logits(endpoint, head.weight, head.bias, images)
        torch.testing.assert_close(fine_tuned[:, index], expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_prediction_independent_of_batch(model, images):
    full = model(pixel_values=images, task="animals").logits
    for index in range(images.shape[0]):
        alone = model(pixel_values=images[index : index + 1], task="animals").logits
        torch.testing.assert_close(alone[0], full[index], atol=1e-5, rtol=0)
    order = torch.tensor([4, 2, 0, 3, 1])
    shuffled = model(pixel_values=images[order], task="animals").logits
    torch.testing.assert_close(shuffled, full[order], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Reductions to task arithmetic
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_single_endpoint_is_task_arithmetic(tiny_processor, images):
    model = build_model(tiny_processor, num_fine_tuned=1, scale=0.4)
    sample = model(pixel_values=images, task="animals", mode="sample")
    torch.testing.assert_close(sample.task_weights, torch.ones(images.shape[0], 1))
    torch.testing.assert_close(sample.coefficients, torch.full((images.shape[0], 1), 0.4))
    arithmetic = model(pixel_values=images, task="animals", mode="task_arithmetic")
    torch.testing.assert_close(sample.logits, arithmetic.logits, atol=1e-5, rtol=0)
    expected = explicit_merged_logits(model, "animals", images, [0.4])
    assert (sample.logits - expected).abs().max().item() < 1e-4


@torch.no_grad()
def test_equal_entropies_give_task_arithmetic(tiny_processor, images):
    # Identical fine-tuned endpoints have identical entropies on every image, so pi is uniform.
    pretrained = make_clip(0)
    fine_tuned = make_clip(11, base=pretrained, noise=0.3)
    model = DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
        pretrained, [fine_tuned, copy.deepcopy(fine_tuned), copy.deepcopy(fine_tuned)],
        tasks=TASKS, templates=TEMPLATES, processor=tiny_processor,
    )  # fmt: skip
    sample = model(pixel_values=images, task="colours", mode="sample")
    torch.testing.assert_close(sample.task_weights, torch.full((images.shape[0], 3), 1 / 3))
    torch.testing.assert_close(sample.coefficients, torch.full((images.shape[0], 3), 0.3))
    arithmetic = model(pixel_values=images, task="colours", mode="task_arithmetic")
    torch.testing.assert_close(sample.logits, arithmetic.logits, atol=1e-5, rtol=0)
    expected = explicit_merged_logits(model, "colours", images, [0.3, 0.3, 0.3])
    assert (arithmetic.logits - expected).abs().max().item() < 1e-4


# ----------------------------------------------------------------------------------------------------------
# Static modes
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize(
    ("mode", "coefficients"),
    [("task_arithmetic", [0.3, 0.3, 0.3]), ("weight_average", [1 / 3, 1 / 3, 1 / 3]), ("pretrained", [0.0, 0.0, 0.0])],
)
def test_static_modes_match_explicit_merges(model, images, mode, coefficients):
    outputs = model(pixel_values=images, task="animals", mode=mode)
    torch.testing.assert_close(outputs.coefficients, torch.tensor([coefficients] * images.shape[0]))
    expected = explicit_merged_logits(model, "animals", images, coefficients)
    assert (outputs.logits - expected).abs().max().item() < 1e-4
    assert outputs.entropies is None


@torch.no_grad()
def test_weight_average_is_mean_of_fine_tuned(model, images):
    state = {
        key: torch.stack([endpoint.state_dict()[key].float() for endpoint in model.fine_tuned]).mean(dim=0)
        for key in model.pretrained.state_dict()
        if model.pretrained.state_dict()[key].is_floating_point()
    }
    clip = CLIPModel(model.pretrained.config).eval()
    clip.load_state_dict(state, strict=False)
    heads = model.heads[0]
    weight = torch.stack([head.weight for head in heads[1:]]).mean(dim=0)
    bias = torch.stack([head.bias for head in heads[1:]]).mean(dim=0)
    expected = plain_clip_logits(clip, weight, bias, images)
    actual = model(pixel_values=images, task="animals", mode="weight_average").logits
    assert (actual - expected).abs().max().item() < 1e-4


@torch.no_grad()
def test_dataset_mean_mode_uses_fitted_weights(model, images):
    with pytest.raises(ValueError, match="fit_dataset_coefficients"):
        model(pixel_values=images, task="colours", mode="dataset_mean")
    coefficients = model.fit_dataset_coefficients("colours", [images[:3], {"pixel_values": images[3:]}])
    task_weights = model(pixel_values=images, task="colours", mode="sample").task_weights
    torch.testing.assert_close(coefficients, 0.9 * task_weights.mean(dim=0), atol=1e-6, rtol=1e-5)
    assert model.config.dataset_task_weights["colours"] == pytest.approx(task_weights.mean(dim=0).tolist(), abs=1e-6)

    outputs = model(pixel_values=images, task="colours", mode="dataset_mean")
    torch.testing.assert_close(outputs.coefficients, coefficients.expand(images.shape[0], -1))
    expected = explicit_merged_logits(model, "colours", images, coefficients)
    assert (outputs.logits - expected).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="'animals'"):
        model(pixel_values=images, task="animals", mode="dataset_mean")


@torch.no_grad()
def test_ties_mode_matches_ties_merged_clip(tiny_processor, images):
    model = build_model(tiny_processor, ties_density=0.5, ties_scale=0.8)
    # The image encoder and the text side are trimmed separately, each over all of its entries.
    state = {}
    for is_image in (True, False):

        def part(clip_model, is_image=is_image):
            return {
                key: value for key, value in clip_model.state_dict().items()
                if key.startswith(("vision_model.", "visual_projection.")) == is_image
            }  # fmt: skip

        state.update(
            ties_merge_state_dicts(part(model.pretrained), [part(endpoint) for endpoint in model.fine_tuned], density=0.5, scale=0.8)
        )
    clip = CLIPModel(model.pretrained.config).eval()
    clip.load_state_dict(state)
    heads = model.heads[1]
    head_state = ties_merge_state_dicts(
        heads[0].state_dict(), [head.state_dict() for head in heads[1:]], density=0.5, scale=0.8
    )
    expected = plain_clip_logits(clip, head_state["weight"], head_state["bias"], images)
    outputs = model(pixel_values=images, task="colours", mode="ties")
    assert outputs.coefficients is None
    assert (outputs.logits - expected).abs().max().item() < 1e-4
    for key, value in model.merge_ties().state_dict().items():
        torch.testing.assert_close(value, state[key], msg=f"TIES-merged {key}")
    # Arguments of merge_ties replace the configured density and scale.
    image_keys = [key for key in state if key.startswith(("vision_model.", "visual_projection."))]
    expected_image = ties_merge_state_dicts(
        {key: model.pretrained.state_dict()[key] for key in image_keys},
        [{key: endpoint.state_dict()[key] for key in image_keys} for endpoint in model.fine_tuned],
        density=0.3, scale=0.6,
    )  # fmt: skip
    overridden = model.merge_ties(density=0.3, scale=0.6).state_dict()
    for key in image_keys:
        torch.testing.assert_close(overridden[key], expected_image[key], msg=f"TIES-merged {key} at density 0.3")


def test_ties_default_density():
    # TIES-merging (Yadav et al., NeurIPS 2023) keeps the top 20% of each task vector's entries by magnitude.
    assert DaWinMultiTaskCLIPConfig().ties_density == 0.2


def test_ties_merge_by_hand():
    base = {"w": torch.zeros(4), "ids": torch.arange(4)}
    endpoints = [
        {"w": torch.tensor([1.0, -2.0, 0.1, 0.0]), "ids": torch.arange(4)},
        {"w": torch.tensor([3.0, 1.0, 0.0, -0.2]), "ids": torch.arange(4)},
    ]
    # Trimming keeps 2 of 4 entries each: [1, -2, 0, 0] and [3, 1, 0, 0]. The elected signs are (+, -), so the
    # disjoint means are (2, -2).
    merged = ties_merge_state_dicts(base, endpoints, density=0.5, scale=1.0)
    torch.testing.assert_close(merged["w"], torch.tensor([2.0, -2.0, 0.0, 0.0]))
    torch.testing.assert_close(merged["ids"], torch.arange(4))
    # A density of 0.25 keeps the single largest magnitude of each: [0, -2, 0, 0] and [3, 0, 0, 0].
    torch.testing.assert_close(
        ties_merge_state_dicts(base, endpoints, density=0.25, scale=1.0)["w"], torch.tensor([3.0, -2.0, 0.0, 0.0])
    )
    # With everything kept, one endpoint gives base + scale * tau.
    single = ties_merge_state_dicts({"w": torch.ones(3)}, [{"w": torch.tensor([2.0, 0.0, 1.0])}], density=1.0, scale=0.5)
    torch.testing.assert_close(single["w"], torch.tensor([1.5, 0.5, 1.0]))
    with pytest.raises(ValueError, match=r"density .* \(0, 1\]"):
        ties_merge_state_dicts(base, endpoints, density=0.0)


def test_ties_trims_over_whole_state_dict():
    # One threshold per task vector over both tensors: the 2 largest of 4 magnitudes are both in "a".
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    endpoints = [{"a": torch.tensor([10.0, -9.0]), "b": torch.tensor([1.0, 2.0])}]

    merged = ties_merge_state_dicts(base, endpoints, density=0.5, scale=1.0)

    torch.testing.assert_close(merged["a"], torch.tensor([10.0, -9.0]))
    torch.testing.assert_close(merged["b"], torch.zeros(2))


@torch.no_grad()
def test_labels_give_cross_entropy_loss(model, images):
    labels = torch.tensor([0, 1, 2, 0, 1])
    outputs = model(pixel_values=images, task="colours", labels=labels)
    torch.testing.assert_close(outputs.loss, F.cross_entropy(outputs.logits, labels))


# ----------------------------------------------------------------------------------------------------------
# Saving, loading, pipelines and exports
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_save_load_round_trip(model, images, tmp_path):
    model.fit_dataset_coefficients("animals", [images])
    model.config.default_task = "colours"
    expected_sample = model(pixel_values=images)
    expected_dataset_mean = model(pixel_values=images, task="animals", mode="dataset_mean")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "preprocessor_config.json").exists()

    loaded = DaWinMultiTaskCLIPModel.from_pretrained(tmp_path)
    assert loaded.config.tasks == TASKS
    assert loaded.config.templates == TEMPLATES
    assert loaded.config.default_task == "colours"
    assert loaded.config.id2label == {0: "red", 1: "green", 2: "blue"}
    assert loaded.config.dataset_task_weights == model.config.dataset_task_weights
    assert loaded.config.fine_tuned_names == model.config.fine_tuned_names
    assert loaded.image_processor is not None
    actual_sample = loaded(pixel_values=images)
    torch.testing.assert_close(actual_sample.logits, expected_sample.logits, atol=0, rtol=0)
    torch.testing.assert_close(actual_sample.coefficients, expected_sample.coefficients, atol=0, rtol=0)
    actual_dataset_mean = loaded(pixel_values=images, task="animals", mode="dataset_mean")
    torch.testing.assert_close(actual_dataset_mean.logits, expected_dataset_mean.logits, atol=0, rtol=0)
    loaded_state = loaded.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded_state[key], value, atol=0, rtol=0, msg=f"{key} changed on load")


@torch.no_grad()
def test_round_trip_keeps_task_order(tiny_processor, images, tmp_path):
    # config.json stores mappings with sorted keys; tasks out of alphabetical order must keep their heads.
    tasks = {"zebra": ["stripes", "spots"], "apple": ["red", "green", "yellow"], "mango": ["ripe", "raw"]}
    model = build_model(tiny_processor, num_fine_tuned=2, tasks=tasks, templates=None)
    expected = {task: model(pixel_values=images, task=task).logits for task in tasks}
    model.save_pretrained(tmp_path)

    loaded = DaWinMultiTaskCLIPModel.from_pretrained(tmp_path)

    assert loaded.config.task_names == ["zebra", "apple", "mango"]
    assert loaded.config.default_task == "zebra"
    assert loaded.config.id2label == {0: "stripes", 1: "spots"}
    for task in tasks:
        torch.testing.assert_close(loaded(pixel_values=images, task=task).logits, expected[task], atol=0, rtol=0)


def test_task_order_must_name_every_task():
    with pytest.raises(ValueError, match=r"task_order must name every task once, received \['a'\]"):
        DaWinMultiTaskCLIPConfig(tasks={"a": ["x", "y"], "b": ["u", "v"]}, task_order=["a"], num_fine_tuned=1)
    config = DaWinMultiTaskCLIPConfig(tasks={"a": ["x", "y"], "b": ["u", "v"]}, task_order=["b", "a"], num_fine_tuned=1)
    assert config.task_names == ["b", "a"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"mode": "bogus"}, "Unknown multi-task DaWin mode 'bogus'"), ({"default_task": "zzz"}, "Unknown task 'zzz'")],
)
def test_load_rejects_bad_overrides(model, tmp_path, overrides, message):
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        DaWinMultiTaskCLIPModel.from_pretrained(tmp_path, **overrides)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("scale", -1.0, "scale"),
        ("mode", "bogus", "Unknown multi-task DaWin mode 'bogus'"),
        ("ties_density", 1.5, "ties_density"),
        ("ties_scale", 0.0, "ties_scale"),
    ],
)
def test_save_rejects_invalid_setting(model, tmp_path, setting, value, message):
    assert_save_rejected(model, tmp_path, setting, value, message)


def test_save_rejects_config_unlike_weights(model, tmp_path):
    clip_config = copy.deepcopy(model.config.clip_config)
    clip_config.projection_dim += 8
    assert_save_rejected(model, tmp_path, "clip_config", clip_config, "The config no longer matches the model's weights")


@pytest.mark.parametrize("mode", ["task_arithmetic", "weight_average", "pretrained", "ties"])
def test_nan_pixels_rejected_in_static_modes(model, images, mode):
    images = images.clone()
    images[0] = float("nan")
    with pytest.raises(ValueError, match=rf"The merged \({mode}\) endpoint produced NaN .*predictions would be undefined"):
        model(pixel_values=images, mode=mode)


def test_task_arithmetic_rejects_invalid_scale(model, images):
    model.config.scale = -1.0
    with pytest.raises(ValueError, match="scale"):
        model(images, mode="task_arithmetic")


def test_labels_outside_task_classes(model, images):
    labels = torch.tensor([0, 1, 2, 3, 7])
    with pytest.raises(ValueError, match=r"labels \[7\] are outside the model's 4 classes .*config.tasks\['animals'\]"):
        model(pixel_values=images, task="animals", labels=labels)


def test_auto_classes_load_saved_model(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DaWinMultiTaskCLIPConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), DaWinMultiTaskCLIPModel)
    assert isinstance(AutoModelForImageClassification.from_pretrained(tmp_path), DaWinMultiTaskCLIPModel)


@torch.no_grad()
def test_pipeline_classifies_default_task(model):
    model.config.default_task = "colours"
    classifier = pipeline("image-classification", model=model, image_processor=model.image_processor)
    pixels = np.random.default_rng(0).integers(0, 256, (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    predictions = classifier(image, top_k=3)
    assert sorted(prediction["label"] for prediction in predictions) == ["blue", "green", "red"]

    pixel_values = model.image_processor(images=image, return_tensors="pt")["pixel_values"]
    probabilities = model(pixel_values=pixel_values).logits.softmax(dim=-1)[0]
    for prediction in predictions:
        expected = probabilities[model.config.label2id[prediction["label"]]].item()
        assert prediction["score"] == pytest.approx(expected, abs=1e-5)


@torch.no_grad()
def test_pipeline_task_from_model_kwargs(model, tmp_path):
    model.save_pretrained(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path), model_kwargs={"default_task": "colours"})
    pixels = np.random.default_rng(1).integers(0, 256, (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)

    predictions = classifier(image, top_k=3)

    assert sorted(prediction["label"] for prediction in predictions) == ["blue", "green", "red"]
    pixel_values = model.image_processor(images=image, return_tensors="pt")["pixel_values"]
    probabilities = model(pixel_values=pixel_values, task="colours").logits.softmax(dim=-1)[0]
    for prediction in predictions:
        expected = probabilities[["red", "green", "blue"].index(prediction["label"])].item()
        assert prediction["score"] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="Unknown task 'shapes'"):
        pipeline("image-classification", model=str(tmp_path), model_kwargs={"default_task": "shapes"})


def test_default_task_switches_labels():
    config = DaWinMultiTaskCLIPConfig(tasks=TASKS, num_fine_tuned=2)
    assert config.default_task == "animals"
    assert config.id2label == dict(enumerate(TINY_CLASS_NAMES))
    config.default_task = "colours"
    assert config.id2label == {0: "red", 1: "green", 2: "blue"}
    assert config.label2id == {"red": 0, "green": 1, "blue": 2}
    with pytest.raises(ValueError, match="'animals', 'colours'"):
        config.default_task = "shapes"


def test_id2label_renames_default_task_classes():
    config = DaWinMultiTaskCLIPConfig(tasks=TASKS, num_fine_tuned=2, default_task="colours")

    config.id2label = {"0": "rot", "1": "grün", "2": "blau"}

    assert config.tasks["colours"] == ["rot", "grün", "blau"]
    assert config.tasks["animals"] == list(TINY_CLASS_NAMES)
    assert config.label2id == {"rot": 0, "grün": 1, "blau": 2}
    with pytest.raises(ValueError, match="id2label must map the indices 0 to 2 to the names of the 3 classes"):
        config.id2label = {0: "rot", 1: "grün"}
    assert config.tasks["colours"] == ["rot", "grün", "blau"]

def test_tasks_rename_keeps_heads_shape():
    config = DaWinMultiTaskCLIPConfig(tasks=TASKS, num_fine_tuned=2)

    config.tasks = {"colours": ["rot", "grün", "blau"], "animals": ["a1", "a2", "a3", "a4"]}

    assert list(config.tasks) == ["animals", "colours"]
    assert config.id2label == {0: "a1", 1: "a2", 2: "a3", 3: "a4"}
    with pytest.raises(ValueError, match="tasks must keep the tasks and class counts of the heads"):
        config.tasks = {"animals": ["a1", "a2"], "colours": ["rot", "grün", "blau"]}
    with pytest.raises(ValueError, match="tasks must keep the tasks and class counts of the heads"):
        config.tasks = {"animals": ["a1", "a2", "a3", "a4"]}
    assert config.tasks["animals"] == ["a1", "a2", "a3", "a4"]


def test_load_id2label_follows_default_task(model, tmp_path):
    model.save_pretrained(tmp_path)
    renamed = {0: "rot", 1: "grün", 2: "blau"}

    # id2label names the classes of the default task that the same call requests, in either keyword order.
    first = DaWinMultiTaskCLIPModel.from_pretrained(tmp_path, id2label=renamed, default_task="colours")
    second = DaWinMultiTaskCLIPModel.from_pretrained(tmp_path, default_task="colours", label2id={"rot": 0, "grün": 1, "blau": 2})
    third = AutoModelForImageClassification.from_pretrained(tmp_path, id2label=renamed, default_task="colours")

    for loaded in (first, second, third):
        assert loaded.config.tasks["colours"] == ["rot", "grün", "blau"]
        assert loaded.config.tasks["animals"] == list(TINY_CLASS_NAMES)
        assert loaded.config.id2label == renamed

@torch.no_grad()
def test_merge_returns_plain_clip(model, tmp_path):
    merged = model.merge([0.2, 0.5, -0.1])
    assert type(merged) is CLIPModel
    merged.save_pretrained(tmp_path)
    reloaded = CLIPModel.from_pretrained(tmp_path)
    expected = merge_task_vectors(
        model.pretrained.state_dict(), [endpoint.state_dict() for endpoint in model.fine_tuned], [0.2, 0.5, -0.1]
    )
    reloaded_state = reloaded.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(reloaded_state[key], value, msg=f"merged {key}")
    assert any(key.startswith("text_model.") for key in expected)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def test_unknown_task_lists_tasks(model, images):
    with pytest.raises(ValueError, match=r"Unknown task 'shapes'.*'animals', 'colours'"):
        model(pixel_values=images, task="shapes")
    with pytest.raises(ValueError, match=r"Unknown task 'shapes'.*'animals', 'colours'"):
        model.fine_tuned_logits(images, "shapes")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['taks'\]. It accepts pixel_values, task"):
        model(pixel_values=images, taks="colours")


def test_no_fine_tuned_endpoint_rejected(tiny_processor):
    with pytest.raises(ValueError, match="at least one fine-tuned endpoint"):
        DaWinMultiTaskCLIPModel.from_pretrained_endpoints(make_clip(0), [], tasks=TASKS, processor=tiny_processor)
    with pytest.raises(ValueError, match="at least one fine-tuned endpoint"):
        DaWinMultiTaskCLIPModel(DaWinMultiTaskCLIPConfig(clip_config=tiny_clip_config().to_dict(), tasks=TASKS))


def test_single_endpoint_not_in_list_rejected(tiny_processor):
    with pytest.raises(TypeError, match="list of endpoints"):
        DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
            make_clip(0), make_clip(1), tasks=TASKS, processor=tiny_processor
        )


@pytest.mark.parametrize("templates", [None, {"animals": ["a photo of a {}."]}])
def test_empty_tasks_rejected_first(tiny_processor, templates):
    pretrained = make_clip(0)
    with pytest.raises(ValueError, match=r"^tasks is empty\. Pass the class names of each task"):
        DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
            pretrained, [make_clip(1, base=pretrained)], tasks={}, templates=templates, processor=tiny_processor
        )


def test_duplicate_class_names_name_the_task(tiny_processor):
    pretrained = make_clip(0)
    with pytest.raises(ValueError, match=r"^Task 'vehicles': class_names contains duplicates.*'car' at index 0 and 'Car '"):
        DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
            pretrained, [make_clip(1, base=pretrained)], tasks={**TASKS, "vehicles": ["car", "Car "]},
            processor=tiny_processor,
        )


def test_tasks_not_mapping_rejected(tiny_processor):
    pretrained = make_clip(0)
    with pytest.raises(TypeError, match="tasks must map each task name to its class names"):
        DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
            pretrained, [make_clip(1, base=pretrained)], tasks=["cat", "dog"], processor=tiny_processor
        )


def test_architecture_mismatch_names_keys(tiny_processor):
    pretrained = make_clip(0)
    shallower = make_clip(1, config=tiny_clip_config(num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"Missing from the fine-tuned #2 \(.*\) endpoint") as error:
        DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
            pretrained, [make_clip(2, base=pretrained), shallower], tasks=TASKS, processor=tiny_processor
        )
    assert "vision_model.encoder.layers.1.mlp.fc1.weight" in str(error.value)
    wider = make_clip(3, config=tiny_clip_config(intermediate_size=48))
    with pytest.raises(ValueError, match=r"Shape mismatches .*vision_model.encoder.layers.0.mlp.fc1.weight: \(64, 32\) vs \(48, 32\)"):
        DaWinMultiTaskCLIPModel.from_pretrained_endpoints(pretrained, [wider], tasks=TASKS, processor=tiny_processor)
    other_activation = make_clip(4, config=tiny_clip_config(hidden_act="gelu"))
    other_activation.load_state_dict(pretrained.state_dict())
    with pytest.raises(ValueError, match=r"vision_config.hidden_act: 'quick_gelu' vs 'gelu'"):
        DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
            pretrained, [other_activation], tasks=TASKS, processor=tiny_processor
        )


def test_mixed_dtype_fine_tunes_load_float32(tiny_processor, tmp_path):
    pretrained = make_clip(0)
    fine_tuned = [make_clip(10 + index, base=pretrained, noise=0.3) for index in range(2)]
    paths = []
    for index, endpoint in enumerate([pretrained, *fine_tuned]):
        path = tmp_path / f"endpoint_{index}"
        (endpoint.to(torch.bfloat16) if index == 2 else endpoint).save_pretrained(path)
        paths.append(path)
    model = DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
        paths[0], paths[1:], tasks=TASKS, templates=TEMPLATES, processor=tiny_processor
    )
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    assert torch.equal(model.fine_tuned[1].text_projection.weight, fine_tuned[1].text_projection.weight.float())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "mixture"}, "Unknown multi-task DaWin mode 'mixture'"),
        ({"scale": -0.3}, "scale .* positive finite number, received -0.3"),
        ({"default_task": "shapes"}, r"Unknown task 'shapes'"),
        ({"templates": {"shapes": ["a {}."]}}, r"not in `tasks`: \['shapes'\]"),
        ({"ties_density": 1.5}, r"ties_density .* \(0, 1\], received 1.5"),
        ({"fine_tuned_names": ["a", "a", "b"]}, "one distinct name per fine-tuned endpoint"),
        ({"tasks": {"animals": []}}, "class_names is empty"),
    ],
)
def test_invalid_settings_rejected(tiny_processor, kwargs, message):
    pretrained = make_clip(0)
    fine_tuned = [make_clip(10 + index, base=pretrained) for index in range(3)]
    arguments = {"tasks": TASKS, "processor": tiny_processor, **kwargs}
    with pytest.raises(ValueError, match=message):
        DaWinMultiTaskCLIPModel.from_pretrained_endpoints(pretrained, fine_tuned, **arguments)


def test_bad_coefficients_and_pixels_rejected(model, images):
    with pytest.raises(ValueError, match=r"one coefficient per fine-tuned endpoint \(3\), received 2"):
        model.merge([0.1, 0.2])
    with pytest.raises(ValueError, match=r"shape \(batch_size, 3\)"):
        model.interpolated_logits(images, "animals", torch.zeros(images.shape[0], 2))
    with pytest.raises(ValueError, match="batch_size >= 1"):
        model(pixel_values=images[0])
    larger = torch.nn.functional.pad(images, (0, 4, 0, 4))
    with pytest.raises(ValueError, match=r"received \(\d+, 3, .*\)\. Preprocess images with the model's image"):
        model(pixel_values=larger)
    with pytest.raises(ValueError, match="needs pixel_values"):
        model(task="animals")


def test_load_warns_dataset_mean_without_fit(model, images, tmp_path, caplog):
    default_task = model.config.default_task
    model.save_pretrained(tmp_path / "unfitted")
    with caplog.at_level("WARNING", logger="hf_dawin.modeling_multitask"):
        DaWinMultiTaskCLIPModel.from_pretrained(tmp_path / "unfitted", mode="dataset_mean")
    assert f"without the mean task weights of its default task {default_task!r}" in caplog.text
    caplog.clear()

    model.fit_dataset_coefficients(default_task, [images])
    model.config.mode = "dataset_mean"
    model.save_pretrained(tmp_path / "fitted")
    with caplog.at_level("WARNING", logger="hf_dawin.modeling_multitask"):
        DaWinMultiTaskCLIPModel.from_pretrained(tmp_path / "fitted")
    assert "mean task weights" not in caplog.text



def test_single_class_task_warns(tiny_processor, caplog):
    with caplog.at_level("WARNING", logger="hf_dawin.heads"):
        build_model(tiny_processor, num_fine_tuned=2, tasks={"animals": list(TINY_CLASS_NAMES), "only": ["red"]},
                    templates=["a photo of a {}."])
    assert "task 'only' has one class ('red')" in caplog.text
    assert "task 'animals'" not in caplog.text
