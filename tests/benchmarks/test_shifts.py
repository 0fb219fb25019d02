"""Tests for the digit distribution shifts and the evaluation suite."""

import datasets
import numpy as np
import pytest

from hf_dawin.benchmarks.mnist import load_mnist
from hf_dawin.benchmarks.shifts import (
    DIGIT_CLASS_NAMES,
    MIN_COLOUR_CONTRAST,
    SHIFT_SET_NAMES,
    SHIFT_TRANSFORMS,
    add_noise,
    clean_digits,
    colour_digits,
    digit_dataset,
    invert_digits,
    load_mnist_shift_suite,
    rotate_digits,
    shift_suite_arrays,
    sklearn_digits_as_mnist,
)


@pytest.fixture(scope="module")
def digits():
    images, labels = load_mnist()["test"]
    return images[:64], labels[:64]


@pytest.mark.parametrize("shift", sorted(SHIFT_TRANSFORMS))
def test_shift_shape_and_dtype(digits, shift):
    images, _ = digits
    shifted = SHIFT_TRANSFORMS[shift](images, 0)
    assert shifted.shape == (64, 28, 28, 3)
    assert shifted.dtype == np.uint8


@pytest.mark.parametrize("shift", sorted(SHIFT_TRANSFORMS))
def test_shift_deterministic_for_seed(digits, shift):
    images, _ = digits
    np.testing.assert_array_equal(SHIFT_TRANSFORMS[shift](images, 3), SHIFT_TRANSFORMS[shift](images, 3))


@pytest.mark.parametrize("shift", ["rotated", "coloured", "noisy"])
def test_random_shift_depends_on_seed(digits, shift):
    images, _ = digits
    assert not np.array_equal(SHIFT_TRANSFORMS[shift](images, 0), SHIFT_TRANSFORMS[shift](images, 1))


@pytest.mark.parametrize("shift", ["rotated", "inverted", "coloured", "noisy"])
def test_shift_differs_from_clean(digits, shift):
    images, _ = digits
    clean = clean_digits(images).astype(np.int16)
    shifted = SHIFT_TRANSFORMS[shift](images, 0).astype(np.int16)
    # Every image changes, by a mean absolute difference of at least 20 intensity levels.
    per_image_change = np.abs(shifted - clean).mean(axis=(1, 2, 3))
    assert per_image_change.min() > 0
    assert per_image_change.mean() > 20


def test_clean_digits_repeat_grey(digits):
    images, _ = digits
    rgb = clean_digits(images)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], images)


def test_invert_digits(digits):
    images, _ = digits
    np.testing.assert_array_equal(invert_digits(images)[..., 0], 255 - images)


def test_rotate_digits_keeps_ink_and_moves_it(digits):
    images, _ = digits
    rotated = rotate_digits(images, 0)[..., 0].astype(np.float64)
    original = images.astype(np.float64)
    # Rotation about the centre keeps the digit inside the frame, so total ink changes little.
    ink_ratio = rotated.sum(axis=(1, 2)) / original.sum(axis=(1, 2))
    assert np.all(np.abs(ink_ratio - 1) < 0.15)
    norms = np.sqrt((rotated**2).sum(axis=(1, 2)) * (original**2).sum(axis=(1, 2)))
    overlap = (rotated * original).sum(axis=(1, 2)) / norms
    assert np.median(overlap) < 0.7


def test_rotate_digits_rejects_bad_range(digits):
    with pytest.raises(ValueError, match="degrees"):
        rotate_digits(digits[0], 0, degrees=(70.0, 35.0))


def test_colour_digits_contrast(digits):
    images, _ = digits
    coloured = colour_digits(images, 0).astype(np.float64)
    luma = coloured @ np.array([0.299, 0.587, 0.114])
    # Background pixels (intensity 0) and full-stroke pixels (255) differ by at least the minimum contrast.
    for index in range(len(images)):
        background = luma[index][images[index] == 0].mean()
        stroke = luma[index][images[index] == 255]
        if stroke.size:
            assert abs(stroke.mean() - background) >= MIN_COLOUR_CONTRAST - 1


def test_noise_strength(digits):
    images, _ = digits
    noisy = add_noise(images, 0).astype(np.float64)
    clean = clean_digits(images).astype(np.float64)
    # Gaussian noise of std 80, clipped at 0 and 255, changes pixels by about 40 on average.
    assert np.abs(noisy - clean).mean() > 30


def test_shift_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8 grey images"):
        invert_digits(np.zeros((2, 28, 28), dtype=np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        add_noise([[0, 1]], 0)


def test_sklearn_digits_layout():
    images, labels = sklearn_digits_as_mnist()
    assert images.shape == (1797, 28, 28, 3)
    assert images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert sorted(np.unique(labels).tolist()) == list(range(10))
    # Four black pixels of padding on every side, like MNIST's 20x20 box in a 28x28 frame.
    assert images[:, :4].max() == 0
    assert images[:, -4:].max() == 0
    assert images[:, :, :4].max() == 0
    assert images[:, :, -4:].max() == 0
    assert images.max() == 255


def test_shift_suite_arrays_seeds_each_shift(digits):
    images, labels = digits
    suite = shift_suite_arrays(images, labels, seed=0)
    assert list(suite) == ["mnist", *SHIFT_SET_NAMES]
    assert not np.array_equal(suite["mnist_coloured"][0], colour_digits(images, 0))
    again = shift_suite_arrays(images, labels, seed=0)
    for name in suite:
        np.testing.assert_array_equal(again[name][0], suite[name][0])
    other_seed = shift_suite_arrays(images, labels, seed=1)
    assert not np.array_equal(other_seed["mnist_noisy"][0], suite["mnist_noisy"][0])


def test_load_mnist_shift_suite_features():
    suite = load_mnist_shift_suite(max_examples=12, seed=0)
    assert sorted(suite) == sorted(["mnist", *SHIFT_SET_NAMES])
    expected_labels = load_mnist()["test"][1][:12].tolist()
    arrays = shift_suite_arrays(*load_mnist()["test"], max_examples=12, seed=0)
    for name, dataset in suite.items():
        assert isinstance(dataset, datasets.Dataset)
        assert dataset.num_rows == 12
        assert dataset.column_names == ["image", "label"]
        assert isinstance(dataset.features["image"], datasets.Image)
        assert isinstance(dataset.features["label"], datasets.ClassLabel)
        assert dataset.features["label"].names == list(DIGIT_CLASS_NAMES)
        image = dataset[0]["image"]
        assert image.mode == "RGB"
        assert image.size == (28, 28)
        # PNG storage is lossless.
        np.testing.assert_array_equal(np.asarray(image), arrays[name][0][0])
        if name != "sklearn_digits":
            assert dataset["label"] == expected_labels


def test_load_mnist_shift_suite_rejects_bad_max_examples():
    with pytest.raises(ValueError, match="max_examples"):
        load_mnist_shift_suite(max_examples=0)


def test_digit_dataset_validates_labels():
    with pytest.raises(ValueError, match=r"labels in \[0, 9\]"):
        digit_dataset(np.zeros((2, 28, 28, 3), dtype=np.uint8), np.array([0, 10]))
