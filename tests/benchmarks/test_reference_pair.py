"""Tests for training, saving and caching the reference CLIP pair."""

import json
import warnings

import numpy as np
import pytest
import torch
from transformers import CLIPModel, CLIPProcessor

from hf_dawin.benchmarks import reference_pair as reference_pair_module
from hf_dawin.benchmarks.reference_pair import (
    DIGIT_TEMPLATES,
    ReferencePairSettings,
    augment_digits,
    build_reference_clip_config,
    rgb_uint8_to_pixel_values,
    train_reference_pair,
)
from hf_dawin.benchmarks.shifts import DIGIT_CLASS_NAMES, SHIFT_SET_NAMES


# A few steps of a much smaller model: enough to exercise every stage, saving and caching in seconds.
TINY_SETTINGS = ReferencePairSettings(
    vision_hidden_size=32,
    vision_num_layers=1,
    vision_num_heads=2,
    text_hidden_size=16,
    text_num_layers=1,
    text_num_heads=2,
    projection_dim=16,
    batch_size=16,
    zero_shot_steps=3,
    fine_tuned_steps=2,
    eval_examples=20,
)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("pairs") / "tiny"
    return train_reference_pair(output_dir, seed=0, config=TINY_SETTINGS, progress=False)


def test_templates_fill_every_class():
    assert len(DIGIT_TEMPLATES) >= 4
    for template in DIGIT_TEMPLATES:
        assert template.count("{}") == 1
    assert len({template.format("seven") for template in DIGIT_TEMPLATES}) == len(DIGIT_TEMPLATES)


def test_config_uses_real_clip_token_ids():
    config = build_reference_clip_config(ReferencePairSettings())
    assert config.text_config.vocab_size == 49408
    assert config.text_config.bos_token_id == 49406
    assert config.text_config.eos_token_id == 49407
    assert config.text_config.pad_token_id == 49407
    assert config.vision_config.image_size == 28
    model = CLIPModel(config)
    num_parameters = sum(parameter.numel() for parameter in model.parameters())
    assert 3_000_000 < num_parameters < 9_000_000


def test_settings_validation():
    with pytest.raises(ValueError, match="patch_size"):
        ReferencePairSettings(patch_size=5)
    with pytest.raises(ValueError, match="colour_probability"):
        ReferencePairSettings(colour_probability=1.5)
    with pytest.raises(ValueError, match="zero_shot_steps"):
        ReferencePairSettings(zero_shot_steps=-1)
    with pytest.raises(ValueError, match="divisible"):
        ReferencePairSettings(vision_hidden_size=30, vision_num_heads=4)


def test_augment_digits_deterministic_and_in_range():
    grey = torch.rand(32, 28, 28)
    settings = ReferencePairSettings()
    first = augment_digits(grey, settings, torch.Generator().manual_seed(5))
    second = augment_digits(grey, settings, torch.Generator().manual_seed(5))
    assert first.shape == (32, 3, 28, 28)
    torch.testing.assert_close(first, second)
    assert first.min() >= 0
    assert first.max() <= 1
    other = augment_digits(grey, settings, torch.Generator().manual_seed(6))
    assert not torch.equal(first, other)


def test_augment_digits_without_augmentation_is_identity():
    settings = ReferencePairSettings(
        max_rotation_degrees=0.0, scale_range=(1.0, 1.0), max_translation_pixels=0.0, thick_stroke_probability=0.0,
        low_resolution_probability=0.0, colour_probability=0.0, invert_probability=0.0, noise_probability=0.0,
    )  # fmt: skip
    grey = torch.rand(8, 28, 28)
    augmented = augment_digits(grey, settings, torch.Generator().manual_seed(0))
    torch.testing.assert_close(augmented, grey.unsqueeze(1).expand(-1, 3, -1, -1), atol=1e-5, rtol=0)


def test_pair_folders_load(tiny_pair):
    for folder in (tiny_pair.zero_shot_dir, tiny_pair.fine_tuned_dir):
        assert (folder / "model.safetensors").is_file()
        model = CLIPModel.from_pretrained(folder)
        processor = CLIPProcessor.from_pretrained(folder)
        assert model.config.text_config.max_position_embeddings == TINY_SETTINGS.max_text_length
        assert processor.tokenizer("a photo of a dog.")["input_ids"] == [49406, 320, 1125, 539, 320, 1929, 269, 49407]
        assert processor.tokenizer.model_max_length == TINY_SETTINGS.max_text_length
        # The saved tokenizer keeps no truncation state from training, which made transformers warn on padding.
        tokenizer_state = json.loads((folder / "tokenizer.json").read_text())
        assert tokenizer_state["truncation"] is None
        assert tokenizer_state["padding"] is None
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            inputs = processor(text=["a handwritten seven."], images=[np.zeros((28, 28, 3), dtype=np.uint8)],
                               return_tensors="pt", padding=True)  # fmt: skip
        with torch.no_grad():
            outputs = model(**inputs)
        assert outputs.logits_per_image.shape == (1, 1)


def test_endpoints_differ(tiny_pair):
    zero_shot = CLIPModel.from_pretrained(tiny_pair.zero_shot_dir).state_dict()
    fine_tuned = CLIPModel.from_pretrained(tiny_pair.fine_tuned_dir).state_dict()
    assert zero_shot.keys() == fine_tuned.keys()
    changed = [name for name in zero_shot if not torch.equal(zero_shot[name], fine_tuned[name])]
    assert "vision_model.embeddings.patch_embedding.weight" in changed
    assert "text_projection.weight" in changed


def test_processor_matches_training_normalisation(tiny_pair):
    processor = CLIPProcessor.from_pretrained(tiny_pair.zero_shot_dir)
    images = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28, 3), dtype=np.uint8)
    from_processor = processor(images=list(images), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_processor, rgb_uint8_to_pixel_values(images), atol=1e-5, rtol=0)


def test_manifest_contents(tiny_pair):
    manifest = json.loads((tiny_pair.zero_shot_dir.parent / "pair.json").read_text())
    assert manifest == tiny_pair.manifest
    assert manifest["seed"] == 0
    assert manifest["settings"]["zero_shot_steps"] == 3
    assert manifest["class_names"] == list(DIGIT_CLASS_NAMES)
    assert manifest["templates"] == list(DIGIT_TEMPLATES)
    for endpoint in ("zero_shot", "fine_tuned"):
        accuracy = manifest["accuracy"][endpoint]
        assert sorted(accuracy) == sorted(["mnist", *SHIFT_SET_NAMES])
        assert all(0.0 <= value <= 1.0 for value in accuracy.values())
    assert set(manifest["eval_examples_per_set"].values()) == {20}
    assert manifest["timings"]["zero_shot_training_seconds"] > 0


def test_second_call_hits_cache(tiny_pair, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a cached pair must not be retrained")

    monkeypatch.setattr(reference_pair_module, "_train_pair_into", fail)
    cached = train_reference_pair(tiny_pair.zero_shot_dir.parent, seed=0, config=TINY_SETTINGS, progress=False)
    assert cached.zero_shot_dir == tiny_pair.zero_shot_dir
    assert cached.manifest == tiny_pair.manifest


def test_interrupted_training_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(work_dir, *args, **kwargs):
        (work_dir / "zero_shot").mkdir()
        (work_dir / "zero_shot" / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(reference_pair_module, "_train_pair_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_reference_pair(tmp_path / "pair", config=TINY_SETTINGS, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_other_settings_replace_pair(tiny_pair, tmp_path, monkeypatch):
    import shutil

    output_dir = tmp_path / "pair"
    shutil.copytree(tiny_pair.zero_shot_dir.parent, output_dir)
    calls = []

    def fake_training(work_dir, settings, seed, cache_dir, progress):
        calls.append(seed)
        for folder in ("zero_shot", "fine_tuned"):
            (work_dir / folder).mkdir()
            (work_dir / folder / "model.safetensors").write_bytes(b"new")
        return {"seed": seed}

    monkeypatch.setattr(reference_pair_module, "_train_pair_into", fake_training)
    replaced = train_reference_pair(output_dir, seed=1, config=TINY_SETTINGS, progress=False)
    assert calls == [1]
    assert replaced.manifest["seed"] == 1
    assert (output_dir / "zero_shot" / "model.safetensors").read_bytes() == b"new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pair"]


def test_rejects_unrelated_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not a pair")
    with pytest.raises(ValueError, match="is not a reference pair"):
        train_reference_pair(tmp_path, config=TINY_SETTINGS, progress=False)


def test_rejects_wrong_config_type(tmp_path):
    with pytest.raises(TypeError, match="ReferencePairSettings"):
        train_reference_pair(tmp_path / "pair", config={"zero_shot_steps": 1}, progress=False)


@pytest.fixture(scope="module")
def default_pair(tmp_path_factory):
    # One thread: two threads on two shared cores can run many times slower.
    return train_reference_pair(
        tmp_path_factory.mktemp("pairs") / "default", seed=0, config=ReferencePairSettings(num_threads=1), progress=False
    )


@pytest.mark.slow
def test_default_pair_shows_robust_fine_tuning_pattern(default_pair):
    zero_shot = default_pair.manifest["accuracy"]["zero_shot"]
    fine_tuned = default_pair.manifest["accuracy"]["fine_tuned"]
    # Fine-tuning gains in distribution ...
    assert fine_tuned["mnist"] > zero_shot["mnist"] + 0.01
    # ... and loses under most distribution shifts.
    losses = [name for name in SHIFT_SET_NAMES if zero_shot[name] > fine_tuned[name]]
    assert len(losses) >= 3, (zero_shot, fine_tuned)


@pytest.mark.slow
def test_default_pair_bf16_coefficients_match_float32(default_pair):
    from hf_dawin import DaWinCLIPModel
    from hf_dawin.benchmarks.mnist import load_mnist
    from hf_dawin.benchmarks.shifts import shift_suite_arrays

    from ..test_precision import COEFFICIENT_TOLERANCE

    models = {
        dtype: DaWinCLIPModel.from_pretrained_pair(
            default_pair.zero_shot_dir, default_pair.fine_tuned_dir, class_names=list(DIGIT_CLASS_NAMES),
            templates=list(DIGIT_TEMPLATES), dtype=dtype,
        )
        for dtype in (torch.float32, torch.bfloat16)
    }  # fmt: skip
    images, labels = load_mnist()["test"]
    differences = {}
    for name, (set_images, _) in shift_suite_arrays(images, labels, max_examples=500).items():
        pixel_values = rgb_uint8_to_pixel_values(set_images)
        with torch.inference_mode():
            coefficients = {
                dtype: model(pixel_values=pixel_values, mode="output_ensemble").coefficients
                for dtype, model in models.items()
            }
        assert coefficients[torch.bfloat16].dtype == torch.float32
        differences[name] = (coefficients[torch.float32] - coefficients[torch.bfloat16]).abs().max().item()

    assert max(differences.values()) <= COEFFICIENT_TOLERANCE, differences
