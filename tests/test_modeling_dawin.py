"""DaWinCLIPModel: exactness of per-sample interpolation, modes, persistence and bad input."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, CLIPModel

from hf_dawin import BetaMixture, DaWinCLIPConfig, DaWinCLIPModel, entropy, entropy_statistics, interpolate_state_dicts
from hf_dawin.coefficients import coefficients_from_entropies

from .conftest import (
    TINY_CLASS_NAMES,
    TINY_IMAGE_SIZE,
    TINY_TEMPLATES,
    assert_save_rejected,
    make_clip,
    tiny_clip_config,
)


@torch.no_grad()
def explicit_merged_logits(model: DaWinCLIPModel, pixel_values: torch.Tensor, alpha: float) -> torch.Tensor:
    """Logits of a separately merged plain CLIPModel and head, computed without the mixing layers."""
    merged_state = interpolate_state_dicts(model.zero_shot.state_dict(), model.fine_tuned.state_dict(), alpha)
    merged = CLIPModel(model.zero_shot.config).eval()
    merged.load_state_dict(merged_state)
    features = merged.get_image_features(pixel_values=pixel_values).pooler_output
    features = F.normalize(features, dim=-1)
    weight = (1 - alpha) * model.zero_shot_head.weight + alpha * model.fine_tuned_head.weight
    bias = (1 - alpha) * model.zero_shot_head.bias + alpha * model.fine_tuned_head.bias
    return features @ weight.T + bias


@torch.no_grad()
def test_endpoints_reproduced_at_zero_and_one(tiny_model, pixel_values):
    zero_shot_logits, fine_tuned_logits = tiny_model.endpoint_logits(pixel_values)
    batch_size = pixel_values.shape[0]
    at_zero = tiny_model.interpolated_logits(pixel_values, torch.zeros(batch_size))
    at_one = tiny_model.interpolated_logits(pixel_values, torch.ones(batch_size))
    torch.testing.assert_close(at_zero, zero_shot_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(at_one, fine_tuned_logits, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_sample_mode_matches_explicit_merge(tiny_model, pixel_values, alpha):
    coefficients = torch.full((pixel_values.shape[0],), alpha)
    mixed = tiny_model.interpolated_logits(pixel_values, coefficients)
    expected = explicit_merged_logits(tiny_model, pixel_values, alpha)
    assert (mixed - expected).abs().max().item() < 1e-4


@torch.no_grad()
def test_sample_mode_mixed_batch_matches_per_sample_merges(tiny_model, pixel_values):
    coefficients = torch.tensor([0.0, 0.13, 0.5, 0.77, 0.99, 1.0])
    mixed = tiny_model.interpolated_logits(pixel_values, coefficients)
    for index, alpha in enumerate(coefficients.tolist()):
        expected = explicit_merged_logits(tiny_model, pixel_values[index : index + 1], alpha)
        assert (mixed[index] - expected[0]).abs().max().item() < 1e-4, f"sample {index} at lambda={alpha}"


@torch.no_grad()
def test_forward_sample_uses_entropy_coefficients(tiny_model, pixel_values):
    outputs = tiny_model(pixel_values=pixel_values, mode="sample")
    expected_coefficients = torch.sigmoid(outputs.zero_shot_entropy - outputs.fine_tuned_entropy)
    torch.testing.assert_close(outputs.coefficients, expected_coefficients)
    for index in range(pixel_values.shape[0]):
        expected = explicit_merged_logits(tiny_model, pixel_values[index : index + 1], outputs.coefficients[index].item())
        assert (outputs.logits[index] - expected[0]).abs().max().item() < 1e-4


@torch.no_grad()
def test_prediction_independent_of_batch(tiny_model, pixel_values):
    full = tiny_model(pixel_values=pixel_values).logits
    for index in range(pixel_values.shape[0]):
        alone = tiny_model(pixel_values=pixel_values[index : index + 1]).logits
        torch.testing.assert_close(alone[0], full[index], atol=1e-5, rtol=0)
    shuffled_order = torch.tensor([5, 3, 1, 0, 2, 4])
    shuffled = tiny_model(pixel_values=pixel_values[shuffled_order]).logits
    torch.testing.assert_close(shuffled, full[shuffled_order], atol=1e-5, rtol=0)


@torch.no_grad()
def test_fixed_weight_modes(tiny_model, pixel_values):
    zero_shot_logits, fine_tuned_logits = tiny_model.endpoint_logits(pixel_values)
    torch.testing.assert_close(tiny_model(pixel_values=pixel_values, mode="zero_shot").logits, zero_shot_logits)
    torch.testing.assert_close(tiny_model(pixel_values=pixel_values, mode="fine_tuned").logits, fine_tuned_logits)
    static = tiny_model(pixel_values=pixel_values, mode="static", alpha=0.3)
    assert (static.logits - explicit_merged_logits(tiny_model, pixel_values, 0.3)).abs().max().item() < 1e-4
    assert torch.all(static.coefficients == 0.3)
    default_alpha = tiny_model(pixel_values=pixel_values, mode="static")
    assert tiny_model.config.alpha == 0.5
    assert DaWinCLIPConfig().alpha == 0.5
    assert torch.all(default_alpha.coefficients == 0.5)
    # The ends of the static path are the endpoints themselves.
    torch.testing.assert_close(tiny_model(pixel_values=pixel_values, mode="static", alpha=0.0).logits, zero_shot_logits)
    at_one = tiny_model(pixel_values=pixel_values, mode="static", alpha=1.0).logits
    torch.testing.assert_close(at_one, fine_tuned_logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_output_ensemble_mixes_probabilities(tiny_model, pixel_values):
    outputs = tiny_model(pixel_values=pixel_values, mode="output_ensemble")
    weights = outputs.coefficients.unsqueeze(-1)
    expected = (1 - weights) * outputs.zero_shot_logits.softmax(-1) + weights * outputs.fine_tuned_logits.softmax(-1)
    torch.testing.assert_close(outputs.logits.exp(), expected)


@torch.no_grad()
def test_mixture_mode_uses_component_models(tiny_model, pixel_values):
    with pytest.raises(ValueError, match="needs a fitted Beta mixture"):
        tiny_model(pixel_values=pixel_values, mode="mixture")
    sample_outputs = tiny_model(pixel_values=pixel_values, mode="sample")
    mixture = tiny_model.fit_mixture(sample_outputs.coefficients, n_components=2)
    assert tiny_model.config.n_components != 2
    assert len(mixture.component_means) == 2
    outputs = tiny_model(pixel_values=pixel_values, mode="mixture")
    means = torch.as_tensor(mixture.component_means, dtype=torch.float32)
    torch.testing.assert_close(outputs.coefficients, means[outputs.mixture_components])
    for index in range(pixel_values.shape[0]):
        alpha = outputs.coefficients[index].item()
        expected = explicit_merged_logits(tiny_model, pixel_values[index : index + 1], alpha)
        assert (outputs.logits[index] - expected[0]).abs().max().item() < 1e-4


@torch.no_grad()
def test_labels_give_cross_entropy_loss(tiny_model, pixel_values):
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    outputs = tiny_model(pixel_values=pixel_values, labels=labels)
    torch.testing.assert_close(outputs.loss, F.cross_entropy(outputs.logits, labels))


def test_save_warns_offset_without_statistics(tiny_model, pixel_values, tmp_path, caplog):
    tiny_model.config.offset_adjustment = True
    with caplog.at_level("WARNING", logger="hf_dawin.modeling_dawin"):
        tiny_model.save_pretrained(tmp_path / "uncalibrated")
    assert "offset_adjustment=True but no entropy statistics" in caplog.text

    caplog.clear()
    tiny_model.calibrate([pixel_values])
    with caplog.at_level("WARNING", logger="hf_dawin.modeling_dawin"):
        tiny_model.save_pretrained(tmp_path / "calibrated")
    assert "entropy statistics" not in caplog.text


def test_load_warns_mixture_without_fit(tiny_model, tmp_path, caplog):
    tiny_model.save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="hf_dawin.modeling_dawin"):
        DaWinCLIPModel.from_pretrained(tmp_path)
    assert "without a fitted Beta mixture" not in caplog.text

    with caplog.at_level("WARNING", logger="hf_dawin.modeling_dawin"):
        DaWinCLIPModel.from_pretrained(tmp_path, mode="mixture")
    assert "Loaded a model in mode='mixture' without a fitted Beta mixture" in caplog.text


def test_load_rejects_unknown_mode(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Unknown DaWin mode 'bogus'; valid modes are 'sample'"):
        DaWinCLIPModel.from_pretrained(tmp_path, mode="bogus")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"alpha": 3}, "alpha"),
        ({"temperatures": [0, 1]}, "emperature"),
        ({"n_components": 0}, "n_components must be a positive integer, received 0"),
        ({"offset_adjustment": "yes"}, "offset_adjustment must be True or False, received 'yes'"),
        ({"class_names": ["a", "a", "b", "c"]}, "'a' at index 0 and 'a' at index 1"),
        ({"class_names": ["a", "b"]}, "class_names lists 2 classes, but the saved heads have 4"),
    ],
)
def test_load_checks_setting_overrides(tiny_model, tmp_path, override, message):
    tiny_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        DaWinCLIPModel.from_pretrained(tmp_path, **override)


def test_save_rejects_config_unlike_weights(tiny_model, tmp_path):
    clip_config = copy.deepcopy(tiny_model.config.clip_config)
    projection_dim = clip_config.projection_dim
    clip_config.projection_dim = projection_dim + 8
    message = rf"visual_projection.weight: config gives \({projection_dim + 8}, \d+\), model has \({projection_dim}, \d+\)"
    assert_save_rejected(tiny_model, tmp_path, "clip_config", clip_config, message)


def test_single_temperature_rejected(tiny_endpoints, tiny_processor):
    with pytest.raises(ValueError, match="Expected two temperatures .* received 2.0"):
        DaWinCLIPModel.from_pretrained_pair(
            *tiny_endpoints, class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES, processor=tiny_processor,
            temperatures=2.0,
        )


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("mode", "bogus", "Unknown DaWin mode 'bogus'"),
        ("alpha", 3.0, "alpha"),
        ("temperatures", [0.0, 1.0], "emperature"),
        ("n_components", 0, "n_components must be a positive integer, received 0"),
    ],
)
def test_save_rejects_invalid_setting(tiny_model, tmp_path, setting, value, message):
    assert_save_rejected(tiny_model, tmp_path, setting, value, message)


@torch.no_grad()
def test_save_load_round_trip(tiny_model, pixel_values, tmp_path):
    tiny_model.fit_mixture(torch.tensor([0.1, 0.2, 0.5, 0.55, 0.9, 0.95]), n_components=2)
    expected = tiny_model(pixel_values=pixel_values)
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "preprocessor_config.json").exists()

    loaded = DaWinCLIPModel.from_pretrained(tmp_path)
    assert loaded.config.mixture == tiny_model.config.mixture
    assert loaded.image_processor is not None
    actual = loaded(pixel_values=pixel_values)
    torch.testing.assert_close(actual.logits, expected.logits, atol=0, rtol=0)
    torch.testing.assert_close(actual.coefficients, expected.coefficients, atol=0, rtol=0)
    for key, value in tiny_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=0, rtol=0, msg=f"{key} changed on load")


def test_auto_classes_load_saved_model(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DaWinCLIPConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), DaWinCLIPModel)
    assert isinstance(AutoModelForImageClassification.from_pretrained(tmp_path), DaWinCLIPModel)


@torch.no_grad()
def test_merge_returns_plain_clip(tiny_model, pixel_values, tmp_path):
    merged = tiny_model.merge(0.4)
    assert type(merged) is CLIPModel
    merged.save_pretrained(tmp_path)
    reloaded = CLIPModel.from_pretrained(tmp_path)
    expected_state = interpolate_state_dicts(tiny_model.zero_shot.state_dict(), tiny_model.fine_tuned.state_dict(), 0.4)
    for key, value in expected_state.items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, msg=f"merged {key}")
    text_weight = reloaded.text_model.embeddings.token_embedding.weight
    assert not torch.equal(text_weight, tiny_model.zero_shot.text_model.embeddings.token_embedding.weight)


def test_zero_shot_heads_built_from_text(tiny_model, tiny_processor):
    from hf_dawin.heads import build_zero_shot_head

    head = build_zero_shot_head(tiny_model.fine_tuned, tiny_processor.tokenizer, TINY_CLASS_NAMES, TINY_TEMPLATES)
    torch.testing.assert_close(tiny_model.fine_tuned_head.weight, head)
    scale = tiny_model.zero_shot.logit_scale.exp()
    torch.testing.assert_close(tiny_model.zero_shot_head.weight.norm(dim=-1), scale.expand(len(TINY_CLASS_NAMES)))
    assert tiny_model.config.head_sources == {"zero_shot": "text", "fine_tuned": "text"}


@torch.no_grad()
def test_linear_head_for_fine_tuned_endpoint(tiny_pair_dirs, tiny_processor, pixel_values):
    torch.manual_seed(0)
    head = torch.nn.Linear(24, len(TINY_CLASS_NAMES))
    model = DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], tiny_pair_dirs[1], class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES,
        fine_tuned_head=head,
    )
    assert model.config.head_sources["fine_tuned"] == "linear"
    features = F.normalize(model.fine_tuned.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
    torch.testing.assert_close(model(pixel_values=pixel_values, mode="fine_tuned").logits, head(features))


def test_loaded_clip_models_are_adopted_unchanged(tiny_endpoints, tiny_processor):
    zero_shot, fine_tuned = tiny_endpoints
    before = {key: value.clone() for key, value in zero_shot.state_dict().items()}
    model = DaWinCLIPModel.from_pretrained_pair(
        zero_shot, fine_tuned, class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES, processor=tiny_processor
    )
    assert model.zero_shot is zero_shot
    for key, value in model.zero_shot.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} was re-initialised"


# Bad input ------------------------------------------------------------------------------------------------


def test_mismatched_architectures_list_keys(tiny_endpoints, tiny_processor):
    zero_shot, _ = tiny_endpoints
    other = make_clip(3, config=tiny_clip_config(num_hidden_layers=3, intermediate_size=48))
    with pytest.raises(ValueError) as error:
        DaWinCLIPModel.from_pretrained_pair(
            zero_shot, other, class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES, processor=tiny_processor
        )
    message = str(error.value)
    assert "do not share an architecture" in message
    assert "Extra in the fine-tuned endpoint" in message
    assert "vision_model.encoder.layers.2.mlp.fc1.weight" in message
    assert "Shape mismatches" in message
    assert "vision_model.encoder.layers.0.mlp.fc1.weight: (64, 32) vs (48, 32)" in message
    extra_line = next(line for line in message.splitlines() if line.startswith("Extra"))
    keys = extra_line.split(": ", 1)[1].split(", ")
    assert keys == sorted(keys)
    shape_line = next(line for line in message.splitlines() if line.startswith("Shape mismatches"))
    entries = [entry for entry in shape_line.split("): ", 1)[1].split("; ") if not entry.startswith("...")]
    shape_keys = [entry.split(": ", 1)[0] for entry in entries]
    assert len(shape_keys) > 5
    assert shape_keys == sorted(shape_keys)


@pytest.mark.parametrize(
    ("overrides", "difference"),
    [
        ({"hidden_act": "gelu"}, "vision_config.hidden_act: 'quick_gelu' vs 'gelu'"),
        ({"num_attention_heads": 2}, "vision_config.num_attention_heads: 4 vs 2"),
    ],
)
def test_config_mismatch_same_shapes(tiny_endpoints, tiny_processor, overrides, difference):
    zero_shot, _ = tiny_endpoints
    other = make_clip(3, config=tiny_clip_config(**overrides))
    other.load_state_dict(zero_shot.state_dict())  # identical weights: only the config differs
    with pytest.raises(ValueError, match="configs differ in settings that change the computation") as error:
        DaWinCLIPModel.from_pretrained_pair(
            zero_shot, other, class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES, processor=tiny_processor
        )
    assert f"(zero-shot vs fine-tuned): {difference}." in str(error.value)


def test_missing_keys_reported(tiny_endpoints, tiny_processor):
    zero_shot, _ = tiny_endpoints
    smaller = make_clip(4, config=tiny_clip_config(num_hidden_layers=1))
    with pytest.raises(ValueError, match="Missing from the fine-tuned endpoint"):
        DaWinCLIPModel.from_pretrained_pair(
            zero_shot, smaller, class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES, processor=tiny_processor
        )


def test_incomplete_endpoint_reports_once(tiny_pair_dirs, tiny_endpoints, tmp_path, transformers_warnings):
    # transformers' own report of the missing weights advises training, so only hf_dawin's error is shown.
    state = {key: value.contiguous() for key, value in tiny_endpoints[1].state_dict().items()}
    partial = tmp_path / "partial"
    tiny_endpoints[1].config.save_pretrained(partial)
    save_file({key: value for key, value in state.items() if "text_model.encoder" not in key}, partial / "model.safetensors")
    with pytest.raises(ValueError, match="lacks 32 CLIPModel weights"):
        DaWinCLIPModel.from_pretrained_pair(tiny_pair_dirs[0], partial, class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES)
    assert not [message for message in transformers_warnings if "LOAD REPORT" in message]

    # A complete checkpoint with an extra tensor still gets transformers' report of the unexpected key.
    extra = tmp_path / "extra"
    tiny_endpoints[1].config.save_pretrained(extra)
    save_file({**state, "extra_head.weight": torch.zeros(3, 3)}, extra / "model.safetensors")
    DaWinCLIPModel.from_pretrained_pair(tiny_pair_dirs[0], extra, class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES)
    reports = [message for message in transformers_warnings if "LOAD REPORT" in message]
    assert len(reports) == 1
    assert "extra_head.weight" in reports[0]


def test_mismatched_weight_shapes_raise(tiny_pair_dirs, tiny_endpoints, tmp_path, transformers_warnings):
    state = {key: value.contiguous() for key, value in tiny_endpoints[1].state_dict().items()}
    state["vision_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(65, 32)
    mismatched = tmp_path / "mismatched"
    tiny_endpoints[1].config.save_pretrained(mismatched)
    save_file(state, mismatched / "model.safetensors")
    with pytest.raises(ValueError, match="fine-tuned endpoint .* contains weights whose shapes differ from its config.json"):
        DaWinCLIPModel.from_pretrained_pair(tiny_pair_dirs[0], mismatched, class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES)
    # The report the error refers to was logged.
    reports = [message for message in transformers_warnings if "LOAD REPORT" in message]
    assert len(reports) == 1
    assert "vision_model.encoder.layers.0.mlp.fc1.weight" in reports[0]


def _pickle_only_checkpoint(model, folder):
    """Save `model` the old way: config.json and a pickled pytorch_model.bin, no safetensors file."""
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_pickled_endpoint_needs_opt_in(tiny_pair_dirs, tiny_endpoints, tmp_path, monkeypatch):
    pickled = _pickle_only_checkpoint(tiny_endpoints[1], tmp_path / "fine_tuned_bin")
    calls = []
    original_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(kwargs) or original_load(*args, **kwargs))

    with pytest.raises(OSError) as error:
        DaWinCLIPModel.from_pretrained_pair(
            tiny_pair_dirs[0], pickled, class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES
        )
    message = str(error.value)
    assert f"Could not load the fine-tuned endpoint from {str(pickled)!r}" in message
    assert "safetensors files only" in message
    assert "use_safetensors=None" in message
    assert calls == []  # nothing was unpickled

    model = DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], pickled, class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES, use_safetensors=None
    )
    assert calls
    assert all(call.get("weights_only") is True for call in calls)
    for key, value in tiny_endpoints[1].state_dict().items():
        assert torch.equal(model.fine_tuned.state_dict()[key], value), key


def test_no_hint_without_pickled_weights(tiny_pair_dirs, tiny_endpoints, tmp_path):
    config_only = tmp_path / "config_only"
    tiny_endpoints[1].config.save_pretrained(config_only)
    with pytest.raises(OSError) as error:
        DaWinCLIPModel.from_pretrained_pair(tiny_pair_dirs[0], config_only, class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES)
    assert "use_safetensors" not in str(error.value)
    assert "Pass a local directory saved with CLIPModel.save_pretrained" in str(error.value)


def test_cached_pickled_endpoint_gets_hint(tiny_pair_dirs, tiny_endpoints, tmp_path):
    # A repository in the local Hub cache, as huggingface_hub lays it out: refs/main names the snapshot.
    repository = tmp_path / "hub" / "models--my-org--clip-finetuned"
    snapshot = repository / "snapshots" / ("0" * 40)
    _pickle_only_checkpoint(tiny_endpoints[1], snapshot)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text("0" * 40)
    with pytest.raises(OSError) as error:
        DaWinCLIPModel.from_pretrained_pair(
            tiny_pair_dirs[0], "my-org/clip-finetuned", class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES,
            cache_dir=tmp_path / "hub",
        )  # fmt: skip
    message = str(error.value)
    assert "the Hub cache has no copy" not in message
    assert "let transformers read its pytorch_model.bin" in message
    model = DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], "my-org/clip-finetuned", class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES,
        cache_dir=tmp_path / "hub", use_safetensors=None,
    )  # fmt: skip
    assert torch.equal(model.fine_tuned.text_projection.weight, tiny_endpoints[1].text_projection.weight)


def test_pickled_saved_model_needs_opt_in(tiny_model, tmp_path):
    folder = tmp_path / "saved"
    tiny_model.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors files only"):
        DaWinCLIPModel.from_pretrained(folder)
    loaded = DaWinCLIPModel.from_pretrained(folder, use_safetensors=None)
    assert torch.equal(loaded.zero_shot_head.weight, tiny_model.zero_shot_head.weight)


@pytest.mark.parametrize(
    ("class_names", "message"),
    [
        ([], "class_names is empty"),
        (["cat", "dog", "cat"], "contains duplicates, compared ignoring case and whitespace: 'cat' at index 0 and 'cat' at index 2\\."),
        (["Cat", "dog", "cat ", "Dog"], "'Cat' at index 0 and 'cat ' at index 2; 'dog' at index 1 and 'Dog' at index 3\\."),
        (["ice cream", "ice  cream", "ice\tcream"], r"'ice cream' at index 0 and 'ice  cream' at index 1 and 'ice\\tcream' at index 2\."),
        (["cat", " "], "non-empty"),
    ],
)
def test_bad_class_names(tiny_endpoints, tiny_processor, class_names, message):
    with pytest.raises(ValueError, match=message):
        DaWinCLIPModel.from_pretrained_pair(*tiny_endpoints, class_names=class_names, processor=tiny_processor)


def test_unknown_mode_lists_valid_modes(tiny_model, pixel_values):
    with pytest.raises(ValueError) as error:
        tiny_model(pixel_values=pixel_values, mode="dynamic")
    for mode in ("'sample'", "'mixture'", "'static'", "'zero_shot'", "'fine_tuned'", "'output_ensemble'"):
        assert mode in str(error.value)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval(tiny_model, pixel_values, alpha):
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        tiny_model(pixel_values=pixel_values, mode="static", alpha=alpha)


@pytest.mark.parametrize("temperatures", [(0.0, 1.0), (1.0, -2.0)])
def test_non_positive_temperatures(tiny_endpoints, tiny_processor, temperatures):
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        DaWinCLIPModel.from_pretrained_pair(
            *tiny_endpoints, class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES, processor=tiny_processor,
            temperatures=temperatures,
        )


def test_coefficients_outside_unit_interval_listed(tiny_model, pixel_values):
    coefficients = torch.tensor([0.5, 1.5, 0.2, float("nan"), 0.0, 1.0])
    with pytest.raises(ValueError, match=r"but 2 do not \(batch index: value\) \{1: 1\.5, 3: nan\}"):
        tiny_model(pixel_values=pixel_values, coefficients=coefficients)


@torch.no_grad()
def test_nan_logits_in_static_mode(tiny_model, pixel_values):
    tiny_model.zero_shot_head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="The zero-shot endpoint produced NaN .*; predictions would be undefined"):
        tiny_model(pixel_values=pixel_values, mode="zero_shot")


@torch.no_grad()
def test_nan_logits_name_the_endpoint(tiny_model, pixel_values):
    tiny_model.fine_tuned_head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="The fine-tuned endpoint produced NaN or infinite logits"):
        tiny_model(pixel_values=pixel_values)


def test_empty_batch_rejected(tiny_model):
    with pytest.raises(ValueError, match="batch_size >= 1"):
        tiny_model(pixel_values=torch.zeros(0, 3, 16, 16))


def test_offset_adjustment_needs_statistics(tiny_model, pixel_values):
    tiny_model.config.offset_adjustment = True
    with pytest.raises(ValueError, match="needs set-level entropy statistics"):
        tiny_model(pixel_values=pixel_values)
    tiny_model.calibrate([pixel_values[:3], {"pixel_values": pixel_values[3:]}])
    outputs = tiny_model(pixel_values=pixel_values)
    assert outputs.coefficients.shape == (pixel_values.shape[0],)


@torch.no_grad()
def test_temperatures_reach_every_output(tiny_pair_dirs, pixel_values):
    model = DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], tiny_pair_dirs[1], class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES,
        temperatures=(2.0, 0.5),
    )
    assert model.config.temperatures == [2.0, 0.5]
    zero_shot_logits, fine_tuned_logits = model.endpoint_logits(pixel_values)
    zero_shot_entropy, fine_tuned_entropy = entropy(zero_shot_logits / 2.0), entropy(fine_tuned_logits / 0.5)

    outputs = model(pixel_values=pixel_values, mode="sample")
    torch.testing.assert_close(outputs.zero_shot_entropy, zero_shot_entropy)
    torch.testing.assert_close(outputs.fine_tuned_entropy, fine_tuned_entropy)
    torch.testing.assert_close(outputs.coefficients, torch.sigmoid(zero_shot_entropy - fine_tuned_entropy))

    ensemble = model(pixel_values=pixel_values, mode="output_ensemble")
    weights = ensemble.coefficients.unsqueeze(-1)
    expected = (1 - weights) * (zero_shot_logits / 2.0).softmax(-1) + weights * (fine_tuned_logits / 0.5).softmax(-1)
    torch.testing.assert_close(ensemble.logits.exp(), expected)

    model.calibrate([pixel_values], fit_mixture=False)
    assert model.stored_entropy_statistics() == entropy_statistics(zero_shot_entropy, fine_tuned_entropy)


@torch.no_grad()
def test_offset_statistics_calibrated_or_given(tiny_model, pixel_values):
    tiny_model.config.offset_adjustment = True
    tiny_model.calibrate([pixel_values[:4]])
    stored = tiny_model.stored_entropy_statistics()
    zero_shot_logits, fine_tuned_logits = tiny_model.endpoint_logits(pixel_values)
    zero_shot_entropy, fine_tuned_entropy = entropy(zero_shot_logits), entropy(fine_tuned_logits)

    # The mixture is fitted on the adjusted coefficients of the calibration images.
    adjusted = coefficients_from_entropies(zero_shot_entropy[:4], fine_tuned_entropy[:4], stored)
    assert tiny_model.config.mixture == BetaMixture(n_components=3).fit(adjusted.numpy()).to_dict()

    outputs = tiny_model(pixel_values=pixel_values)
    expected = coefficients_from_entropies(zero_shot_entropy, fine_tuned_entropy, stored)
    torch.testing.assert_close(outputs.coefficients, expected)
    assert not torch.allclose(expected, torch.sigmoid(zero_shot_entropy - fine_tuned_entropy))

    # Statistics passed in replace the calibrated ones.
    other = entropy_statistics(zero_shot_entropy, fine_tuned_entropy)
    from_other, _, _ = tiny_model.coefficients_from_logits(zero_shot_logits, fine_tuned_logits, statistics=other)
    torch.testing.assert_close(from_other, coefficients_from_entropies(zero_shot_entropy, fine_tuned_entropy, other))
    assert not torch.allclose(from_other, expected)


@torch.no_grad()
def test_given_coefficients_replace_entropy_ones(tiny_model, pixel_values):
    coefficients = torch.tensor([0.9, 0.1, 0.5, 0.0, 1.0, 0.3])
    outputs = tiny_model(pixel_values=pixel_values, mode="sample", coefficients=coefficients)
    torch.testing.assert_close(outputs.coefficients, coefficients)
    torch.testing.assert_close(outputs.logits, tiny_model.interpolated_logits(pixel_values, coefficients))


def test_edited_temperatures_checked_at_forward(tiny_model, pixel_values):
    tiny_model.config.temperatures = [0.0, 1.0]
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        tiny_model(pixel_values=pixel_values)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["static", "zero_shot", "fine_tuned"])
def test_nan_pixels_rejected_in_fixed_weight_modes(tiny_model, pixel_values, mode):
    pixel_values = pixel_values.clone()
    pixel_values[1] = float("nan")
    with pytest.raises(ValueError, match="produced NaN or infinite logits for 1 sample"):
        tiny_model(pixel_values=pixel_values, mode=mode)


def test_wrong_channel_count_rejected(tiny_model, pixel_values):
    size = TINY_IMAGE_SIZE
    with pytest.raises(ValueError, match=rf"Expected pixel_values of shape \(batch_size, 3, {size}, {size}\)"):
        tiny_model(pixel_values=pixel_values[:, :1])


def test_wrong_image_size_rejected(tiny_model, pixel_values):
    larger = torch.nn.functional.pad(pixel_values, (0, 4, 0, 4))
    with pytest.raises(ValueError, match=r"received \(6, 3, .*\)\. Preprocess images with the model's image"):
        tiny_model(pixel_values=larger)


def test_coefficients_ignored_warning(tiny_model, pixel_values, caplog):
    with caplog.at_level("WARNING", logger="hf_dawin.modeling_dawin"):
        tiny_model(pixel_values=pixel_values, mode="static", coefficients=torch.full((6,), 0.3))
    assert "coefficients are used by the dynamic modes only; mode='static' ignores them" in caplog.text


def test_labels_outside_classes_rejected(tiny_model, pixel_values):
    labels = torch.zeros(pixel_values.shape[0], dtype=torch.long)
    labels[0] = len(TINY_CLASS_NAMES)
    with pytest.raises(ValueError, match=r"labels \[4\] are outside the model's 4 classes"):
        tiny_model(pixel_values=pixel_values, labels=labels)


def test_alpha_tensor_accepted(tiny_model, pixel_values):
    with torch.no_grad():
        from_tensor = tiny_model(pixel_values=pixel_values, mode="static", alpha=torch.tensor(0.3)).logits
        from_float = tiny_model(pixel_values=pixel_values, mode="static", alpha=0.3).logits
    torch.testing.assert_close(from_tensor, from_float)


@pytest.mark.parametrize(("mode", "alpha"), [("sample", None), ("static", 0.3), ("mixture", None)])
def test_inference_mode_then_autograd_call(tiny_model, pixel_values, mode, alpha):
    tiny_model.fit_mixture(torch.linspace(0.05, 0.95, 30))
    with torch.inference_mode():
        first = tiny_model(pixel_values, mode=mode, alpha=alpha).logits

    # The classifiers cached by the first call must serve a call that records autograd (labels give a loss).
    second = tiny_model(pixel_values, mode=mode, alpha=alpha, labels=torch.zeros(len(pixel_values), dtype=torch.long))

    torch.testing.assert_close(second.logits, first)
    assert second.loss is not None


def test_calibrate_needs_two_images(tiny_model, pixel_values):
    with pytest.raises(ValueError, match="calibrate needs at least two images .* received 1"):
        tiny_model.calibrate([pixel_values[:1]])


def test_calibrate_accepts_processor_output(tiny_model):
    rng = np.random.default_rng(6)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(4)]
    features = tiny_model.image_processor(images=images, return_tensors="pt")

    from_features = tiny_model.calibrate([features])
    from_tensor = tiny_model.calibrate([features["pixel_values"]])

    assert from_features == from_tensor


@pytest.mark.parametrize(
    ("batches", "received"),
    [
        ([[0.5, 0.2]], "received a batch that is list"),
        ([{"images": 1}], "a mapping with keys ['images']"),
        # One batch tensor without the list around it: iterating it yields single images.
        (torch.zeros(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), f"a tensor of shape (3, {TINY_IMAGE_SIZE}, {TINY_IMAGE_SIZE})"),
    ],
)
def test_calibrate_rejects_other_batches(tiny_model, batches, received):
    with pytest.raises(TypeError, match="calibrate expects an iterable of batches") as error:
        tiny_model.calibrate(batches)
    assert received in str(error.value)


def test_same_model_as_both_endpoints_saves(tiny_endpoints, tiny_processor, pixel_values, tmp_path):
    zero_shot = tiny_endpoints[0]
    model = DaWinCLIPModel.from_pretrained_pair(
        zero_shot, zero_shot, class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES, processor=tiny_processor
    )
    model.save_pretrained(tmp_path)

    loaded = DaWinCLIPModel.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixel_values).logits, model(pixel_values=pixel_values).logits)
    assert model.zero_shot is zero_shot
    assert model.fine_tuned is not zero_shot


def test_loading_multitask_folder_names_the_class(tiny_processor, tmp_path):
    from hf_dawin import DaWinMultiTaskCLIPModel

    pretrained = make_clip(0)
    multitask = DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
        pretrained, [make_clip(5, base=pretrained, noise=0.3)], tasks={"animals": list(TINY_CLASS_NAMES)},
        templates=TINY_TEMPLATES, processor=tiny_processor,
    )  # fmt: skip
    multitask.save_pretrained(tmp_path / "multitask")

    with pytest.raises(ValueError, match="type 'dawin_multitask_clip'.*Load it with DaWinMultiTaskCLIPModel"):
        DaWinCLIPModel.from_pretrained(tmp_path / "multitask")


def test_endpoint_folder_of_other_model_rejected(tiny_model, tiny_pair_dirs, tiny_processor, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import CLIPVisionModelWithProjection

    tiny_model.save_pretrained(tmp_path / "dawin")
    vision_only = CLIPVisionModelWithProjection(tiny_model.zero_shot.config.vision_config)
    vision_only.save_pretrained(tmp_path / "vision")
    # A CLIP checkpoint whose text projection was dropped from the weights file.
    partial = tmp_path / "partial"
    tiny_model.zero_shot.save_pretrained(partial)
    weights = load_file(partial / "model.safetensors")
    save_file({key: value for key, value in weights.items() if key != "text_projection.weight"}, partial / "model.safetensors")
    build = {"class_names": TINY_CLASS_NAMES, "templates": TINY_TEMPLATES, "processor": tiny_processor}

    with pytest.raises(ValueError, match="zero-shot endpoint .* 'dawin_clip'.*load it with DaWinCLIPModel.from_pretrained"):
        DaWinCLIPModel.from_pretrained_pair(tmp_path / "dawin", tiny_pair_dirs[1], **build)
    with pytest.raises(ValueError, match="fine-tuned endpoint .* model_type 'clip_vision_model'"):
        DaWinCLIPModel.from_pretrained_pair(tiny_pair_dirs[0], tmp_path / "vision", **build)
    with pytest.raises(ValueError, match="fine-tuned endpoint .* lacks 1 CLIPModel weights.*: text_projection.weight\\."):
        DaWinCLIPModel.from_pretrained_pair(tiny_pair_dirs[0], partial, **build)


def test_misspelt_forward_argument_rejected(tiny_model, pixel_values):
    with pytest.raises(TypeError, match=r"got unexpected keyword arguments \['moed'\]. It accepts pixel_values, labels"):
        tiny_model(pixel_values=pixel_values, moed="zero_shot")
    # Arguments that transformers passes to every model are accepted.
    tiny_model(pixel_values=pixel_values, output_attentions=False, num_items_in_batch=4)


def test_single_class_warns(tiny_endpoints, tiny_processor, pixel_values, caplog):
    with caplog.at_level("WARNING", logger="hf_dawin.heads"):
        model = DaWinCLIPModel.from_pretrained_pair(
            *tiny_endpoints, class_names=["cat"], templates=TINY_TEMPLATES, processor=tiny_processor
        )
    assert "class_names has one class ('cat')" in caplog.text

    with torch.no_grad():
        coefficients = model(pixel_values=pixel_values).coefficients
    torch.testing.assert_close(coefficients, torch.full_like(coefficients, 0.5))
