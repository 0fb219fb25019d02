"""`pipeline("image-classification")` on DaWin models: saved folders, model objects, modes and awkward images."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from hf_dawin import DaWinCLIPModel

from .conftest import TINY_CLASS_NAMES, TINY_IMAGE_SIZE, TINY_TEMPLATES


def random_image(seed, size=(20, 24), mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (size[1], size[0]) if channels is None else (size[1], size[0], channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


@pytest.fixture(scope="module")
def pair_model(tiny_pair_dirs):
    return DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], tiny_pair_dirs[1], class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES
    )


@pytest.fixture(scope="module")
def saved_dir(pair_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved_dawin")
    pair_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def calibration_pixels():
    generator = torch.Generator().manual_seed(5)
    return torch.randn(24, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)


def expected_scores(model, image, mode=None):
    """Class probabilities the model gives one image, computed without the pipeline."""
    inputs = model.image_processor(images=image.convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        logits = model(pixel_values=inputs["pixel_values"], mode=mode).logits[0]
    probabilities = logits.softmax(-1)
    return {TINY_CLASS_NAMES[index]: float(probabilities[index]) for index in range(len(TINY_CLASS_NAMES))}


def as_scores(predictions):
    return {prediction["label"]: prediction["score"] for prediction in predictions}


def test_pipeline_from_saved_directory(saved_dir, pair_model, transformers_warnings):
    classifier = pipeline("image-classification", model=str(saved_dir))
    image = random_image(0)

    predictions = classifier(image, top_k=len(TINY_CLASS_NAMES))

    assert isinstance(classifier.model, DaWinCLIPModel)
    assert classifier.model.config.mode == "sample"
    assert classifier.model.config.mixture is None
    scores = as_scores(predictions)
    assert set(scores) == set(TINY_CLASS_NAMES)
    expected = expected_scores(pair_model, image)
    for name in TINY_CLASS_NAMES:
        assert scores[name] == pytest.approx(expected[name], abs=1e-5)
    assert [p["score"] for p in predictions] == sorted((p["score"] for p in predictions), reverse=True)
    assert not [message for message in transformers_warnings if "not supported" in message]


def test_pipeline_from_model_object(pair_model, transformers_warnings):
    classifier = pipeline("image-classification", model=pair_model, image_processor=pair_model.image_processor)
    images = [random_image(seed) for seed in range(3)]

    predictions = classifier(images, top_k=2)

    assert len(predictions) == 3
    for image, image_predictions in zip(images, predictions):
        assert len(image_predictions) == 2
        expected = expected_scores(pair_model, image)
        best = sorted(expected, key=expected.get, reverse=True)[:2]
        assert [p["label"] for p in image_predictions] == best
        assert image_predictions[0]["score"] == pytest.approx(expected[best[0]], abs=1e-5)
    assert not [message for message in transformers_warnings if "not supported" in message]


def test_pipeline_batches_match_single_images(saved_dir):
    classifier = pipeline("image-classification", model=str(saved_dir))
    images = [random_image(seed) for seed in range(5)]

    batched = classifier(images, batch_size=3, top_k=4)
    single = [classifier(image, top_k=4) for image in images]

    for batch_predictions, single_predictions in zip(batched, single):
        batch_scores, single_scores = as_scores(batch_predictions), as_scores(single_predictions)
        for name in TINY_CLASS_NAMES:
            assert batch_scores[name] == pytest.approx(single_scores[name], abs=1e-5)


def test_pipeline_reads_file_paths(saved_dir, pair_model, tmp_path):
    image = random_image(3)
    path = tmp_path / "image.png"
    image.save(path)
    classifier = pipeline("image-classification", model=str(saved_dir))

    predictions = classifier(str(path), top_k=4)

    expected = expected_scores(pair_model, image)
    scores = as_scores(predictions)
    for name in TINY_CLASS_NAMES:
        assert scores[name] == pytest.approx(expected[name], abs=1e-5)


def test_pipeline_uses_saved_mixture(tiny_pair_dirs, calibration_pixels, tmp_path):
    model = DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], tiny_pair_dirs[1], class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES, mode="mixture"
    )
    model.calibrate([calibration_pixels[:12], calibration_pixels[12:]])
    model.save_pretrained(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path))
    image = random_image(4)

    predictions = classifier(image, top_k=4)

    loaded = classifier.model
    assert loaded.config.mode == "mixture"
    assert loaded.config.mixture == model.config.mixture
    inputs = model.image_processor(images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(pixel_values=inputs["pixel_values"])
    # The single image takes the mean coefficient of one of the saved mixture components.
    means = model.stored_mixture().component_means
    assert float(outputs.coefficients[0]) == pytest.approx(float(means[int(outputs.mixture_components[0])]))
    expected = outputs.logits[0].softmax(-1)
    scores = as_scores(predictions)
    for index, name in enumerate(TINY_CLASS_NAMES):
        assert scores[name] == pytest.approx(float(expected[index]), abs=1e-5)


def test_pipeline_mixture_without_calibration_fails(tiny_pair_dirs, tmp_path):
    model = DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], tiny_pair_dirs[1], class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES, mode="mixture"
    )
    model.save_pretrained(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path))

    with pytest.raises(ValueError, match="needs a fitted Beta mixture"):
        classifier(random_image(0))


def test_pipeline_offset_adjustment_after_calibration(tiny_pair_dirs, calibration_pixels, tmp_path):
    model = DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], tiny_pair_dirs[1], class_names=TINY_CLASS_NAMES, templates=TINY_TEMPLATES,
        offset_adjustment=True,
    )
    model.calibrate([calibration_pixels], fit_mixture=False)
    model.save_pretrained(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path))
    image = random_image(6)

    scores = as_scores(classifier(image, top_k=4))

    assert classifier.model.config.entropy_statistics == model.config.entropy_statistics
    expected = expected_scores(model, image)
    for name in TINY_CLASS_NAMES:
        assert scores[name] == pytest.approx(expected[name], abs=1e-5)


@pytest.mark.parametrize("mode", ["L", "RGBA", "large"])
def test_pipeline_awkward_images(saved_dir, pair_model, mode):
    if mode == "large":
        image = random_image(7, size=(3000, 2000))
    else:
        image = random_image(7, mode=mode)
    classifier = pipeline("image-classification", model=str(saved_dir))

    scores = as_scores(classifier(image, top_k=4))

    # The image processor converts to RGB (dropping alpha), as the reference computation does.
    expected = expected_scores(pair_model, image)
    assert set(scores) == set(TINY_CLASS_NAMES)
    for name in TINY_CLASS_NAMES:
        assert scores[name] == pytest.approx(expected[name], abs=1e-5)
