"""Distribution shifts of MNIST digits and the digit evaluation suite as `datasets.Dataset` objects.

Every transform takes uint8 grey images of shape `(num_examples, 28, 28)` (white digit on black, as in
MNIST) and returns uint8 RGB images of shape `(num_examples, 28, 28, 3)`. Random transforms draw from
`numpy.random.default_rng(seed)`, so the same seed gives the same images on every run. The scikit-learn
digits (8x8 scans from a different population of writers) are resized and padded to the MNIST layout.
"""

import io
import os
from collections.abc import Callable

import datasets
import numpy as np
from PIL import Image
from transformers.utils import logging

from .mnist import IMAGE_SIDE, load_mnist


logger = logging.get_logger(__name__)

DIGIT_CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

ROTATION_DEGREES = (35.0, 70.0)
NOISE_STD = 80.0
# Minimum difference in Rec. 601 luma (0 to 255) between the random foreground and background colours, so
# the digit stays visible.
MIN_COLOUR_CONTRAST = 90.0
# MNIST centres each digit's 20x20 bounding box in the 28x28 frame. The 8x8 scikit-learn digits fill their
# frame, so they are resized to 20x20 and padded by 4 pixels on each side.
_DIGIT_BOX_SIDE = 20
_SKLEARN_DIGITS_MAX_VALUE = 16.0
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])

ID_SET_NAME = "mnist"
SHIFT_SET_NAMES = ("mnist_rotated", "mnist_inverted", "mnist_coloured", "mnist_noisy", "sklearn_digits")


def _check_grey_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray):
        raise TypeError(f"Expected `images` as a numpy array, received {type(images).__name__}.")
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"Expected uint8 grey images of shape (num_examples, height, width), received dtype {images.dtype} "
            f"and shape {images.shape}. Convert with `np.asarray(images, dtype=np.uint8)`."
        )


def grey_to_rgb(images: np.ndarray) -> np.ndarray:
    """Repeat grey images into three channels.

    Args:
        images (`np.ndarray`): uint8 of shape `(num_examples, height, width)`.

    Returns:
        `np.ndarray`: uint8 of shape `(num_examples, height, width, 3)`.
    """
    _check_grey_images(images)
    return np.repeat(images[..., None], 3, axis=-1)


def clean_digits(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Return the digits unchanged, as RGB; `seed` is accepted for a uniform signature and unused.

    Args:
        images (`np.ndarray`): uint8 of shape `(num_examples, 28, 28)`.
        seed (`int`, *optional*, defaults to 0): unused.

    Returns:
        `np.ndarray`: uint8 of shape `(num_examples, 28, 28, 3)`.
    """
    return grey_to_rgb(images)


def rotate_digits(
    images: np.ndarray,
    seed: int = 0,
    *,
    degrees: tuple[float, float] = ROTATION_DEGREES,
) -> np.ndarray:
    """Rotate each digit about the image centre by a random angle of random sign.

    Args:
        images (`np.ndarray`): uint8 of shape `(num_examples, height, width)`.
        seed (`int`, *optional*, defaults to 0): seed of the angle and sign draws.
        degrees (`tuple[float, float]`, *optional*, defaults to `(35.0, 70.0)`): the range of the absolute
            angle, drawn uniformly; the sign is drawn with probability 1/2 each.

    Returns:
        `np.ndarray`: uint8 of shape `(num_examples, height, width, 3)`; corners that rotate in are black.
    """
    _check_grey_images(images)
    low, high = degrees
    if not 0.0 <= low <= high:
        raise ValueError(f"Expected `degrees` as (low, high) with 0 <= low <= high, received {degrees}.")
    rng = np.random.default_rng(seed)
    angles = rng.uniform(low, high, size=len(images)) * rng.choice([-1.0, 1.0], size=len(images))
    rotated = np.empty_like(images)
    for index, (image, angle) in enumerate(zip(images, angles)):
        rotated[index] = np.asarray(Image.fromarray(image).rotate(float(angle), resample=Image.BILINEAR, fillcolor=0))
    return grey_to_rgb(rotated)


def invert_digits(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Invert intensities (black digit on white); `seed` is accepted for a uniform signature and unused.

    Args:
        images (`np.ndarray`): uint8 of shape `(num_examples, height, width)`.
        seed (`int`, *optional*, defaults to 0): unused.

    Returns:
        `np.ndarray`: uint8 of shape `(num_examples, height, width, 3)`.
    """
    _check_grey_images(images)
    return grey_to_rgb(255 - images)


def random_colour_pairs(
    rng: np.random.Generator,
    num_examples: int,
    min_contrast: float = MIN_COLOUR_CONTRAST,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw foreground and background RGB colours whose luma differs by at least `min_contrast`.

    Args:
        rng (`np.random.Generator`): the random generator.
        num_examples (`int`): how many pairs to draw.
        min_contrast (`float`, *optional*, defaults to 90.0): the minimum absolute luma difference (0 to 255).

    Returns:
        `tuple[np.ndarray, np.ndarray]`: foreground and background colours, float64 of shape
        `(num_examples, 3)` with values in [0, 255].
    """
    if not 0.0 <= min_contrast < 200.0:
        raise ValueError(f"Expected `min_contrast` in [0, 200), received {min_contrast}.")
    foreground = rng.uniform(0.0, 255.0, size=(num_examples, 3))
    background = rng.uniform(0.0, 255.0, size=(num_examples, 3))
    # Redraw the pairs that are too similar; about half are accepted per round at the default contrast.
    while True:
        rejected = np.abs((foreground - background) @ _LUMA_WEIGHTS) < min_contrast
        if not rejected.any():
            return foreground, background
        count = int(rejected.sum())
        foreground[rejected] = rng.uniform(0.0, 255.0, size=(count, 3))
        background[rejected] = rng.uniform(0.0, 255.0, size=(count, 3))


def colour_digits(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Paint each digit with a random foreground colour on a random background colour.

    Each pixel becomes `background + (foreground - background) * intensity / 255`, so strokes keep their
    anti-aliased edges. Colour pairs are drawn by `random_colour_pairs`.

    Args:
        images (`np.ndarray`): uint8 of shape `(num_examples, height, width)`.
        seed (`int`, *optional*, defaults to 0): seed of the colour draws.

    Returns:
        `np.ndarray`: uint8 of shape `(num_examples, height, width, 3)`.
    """
    _check_grey_images(images)
    rng = np.random.default_rng(seed)
    foreground, background = random_colour_pairs(rng, len(images))
    intensity = images[..., None].astype(np.float32) / 255.0
    start = background[:, None, None, :].astype(np.float32)
    span = (foreground - background)[:, None, None, :].astype(np.float32)
    painted = start + span * intensity
    return np.clip(np.rint(painted), 0, 255).astype(np.uint8)


def add_noise(images: np.ndarray, seed: int = 0, *, std: float = NOISE_STD) -> np.ndarray:
    """Add strong independent Gaussian noise to every pixel and channel.

    Args:
        images (`np.ndarray`): uint8 of shape `(num_examples, height, width)`.
        seed (`int`, *optional*, defaults to 0): seed of the noise.
        std (`float`, *optional*, defaults to 80.0): the noise standard deviation in intensity units (0 to 255).

    Returns:
        `np.ndarray`: uint8 of shape `(num_examples, height, width, 3)`, clipped to [0, 255].
    """
    _check_grey_images(images)
    if std < 0:
        raise ValueError(f"Expected a non-negative noise `std`, received {std}.")
    rng = np.random.default_rng(seed)
    noisy = grey_to_rgb(images).astype(np.float32)
    noisy += rng.standard_normal(size=noisy.shape, dtype=np.float32) * np.float32(std)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def sklearn_digits_as_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Load scikit-learn's 8x8 digits in the MNIST layout.

    Each 8x8 image (values 0 to 16) is scaled to 0 to 255, resized to 20x20 with bicubic interpolation and
    padded with 4 black pixels on each side, like MNIST's centred 20x20 digit box.

    Returns:
        `tuple[np.ndarray, np.ndarray]`: RGB images, uint8 of shape `(1797, 28, 28, 3)`, and labels, int64 of
        shape `(1797,)`.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    scaled = np.clip(np.rint(digits.images * (255.0 / _SKLEARN_DIGITS_MAX_VALUE)), 0, 255).astype(np.uint8)
    padding = (IMAGE_SIDE - _DIGIT_BOX_SIDE) // 2
    images = np.zeros((len(scaled), IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    for index, image in enumerate(scaled):
        resized = Image.fromarray(image).resize((_DIGIT_BOX_SIDE, _DIGIT_BOX_SIDE), resample=Image.BICUBIC)
        images[index, padding : padding + _DIGIT_BOX_SIDE, padding : padding + _DIGIT_BOX_SIDE] = np.asarray(resized)
    return grey_to_rgb(images), digits.target.astype(np.int64)


SHIFT_TRANSFORMS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "clean": clean_digits,
    "rotated": rotate_digits,
    "inverted": invert_digits,
    "coloured": colour_digits,
    "noisy": add_noise,
}


def _encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def digit_dataset(images: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
    """Wrap RGB digit arrays as a `datasets.Dataset` with an `image` and a `label` column.

    Images are stored as PNG bytes (fast compression), so building a 10,000-image set takes about a second.

    Args:
        images (`np.ndarray`): uint8 of shape `(num_examples, height, width, 3)`.
        labels (`np.ndarray`): integers of shape `(num_examples,)` in [0, 9].

    Returns:
        `datasets.Dataset`: columns `image` (`datasets.Image()`, decoded as PIL RGB images) and `label`
        (`datasets.ClassLabel(names=DIGIT_CLASS_NAMES)`).
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"Expected uint8 RGB images of shape (num_examples, height, width, 3), received dtype {images.dtype} "
            f"and shape {images.shape}."
        )
    if labels.shape != (len(images),):
        raise ValueError(f"Expected labels of shape ({len(images)},), received {labels.shape}.")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(DIGIT_CLASS_NAMES)):
        raise ValueError(f"Expected labels in [0, 9], received values from {labels.min()} to {labels.max()}.")

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(DIGIT_CLASS_NAMES))}
    )
    encoded = [{"bytes": _encode_png(image), "path": None} for image in images]
    return datasets.Dataset.from_dict({"image": encoded, "label": labels.tolist()}, features=features)


def shift_suite_arrays(
    test_images: np.ndarray,
    test_labels: np.ndarray,
    max_examples: int | None = None,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Build the digit evaluation suite as arrays: clean MNIST test images and five distribution shifts.

    Keys: `"mnist"` (the in-distribution images), `"mnist_rotated"`, `"mnist_inverted"`, `"mnist_coloured"`,
    `"mnist_noisy"` (the same images shifted) and `"sklearn_digits"` (scikit-learn's 1,797 digits). Each shift
    draws from its own seed derived from `seed`.

    Args:
        test_images (`np.ndarray`): uint8 of shape `(num_examples, 28, 28)`, normally the MNIST test split.
        test_labels (`np.ndarray`): int64 of shape `(num_examples,)`.
        max_examples (`int`, *optional*): keep only the first `max_examples` images of each set.
        seed (`int`, *optional*, defaults to 0): the seed of the random shifts.

    Returns:
        `dict[str, tuple[np.ndarray, np.ndarray]]`: per set, uint8 RGB images of shape `(n, 28, 28, 3)` and
        int64 labels of shape `(n,)`.
    """
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise ValueError(f"Expected `max_examples` as a positive integer or None, received {max_examples!r}.")
    test_images, test_labels = test_images[:max_examples], test_labels[:max_examples]

    suite = {ID_SET_NAME: (clean_digits(test_images), test_labels)}
    for index, shift in enumerate(("rotated", "inverted", "coloured", "noisy"), start=1):
        # A distinct seed per shift keeps the shifts' random draws independent of each other.
        shift_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        suite[f"mnist_{shift}"] = (SHIFT_TRANSFORMS[shift](test_images, shift_seed), test_labels)

    sklearn_images, sklearn_labels = sklearn_digits_as_mnist()
    suite["sklearn_digits"] = (sklearn_images[:max_examples], sklearn_labels[:max_examples])
    return suite


def load_mnist_shift_suite(
    cache_dir: str | os.PathLike | None = None,
    max_examples: int | None = None,
    seed: int = 0,
) -> dict[str, datasets.Dataset]:
    """Build the digit evaluation suite as `datasets.Dataset` objects: clean MNIST test and five shifts.

    The sets are those of `shift_suite_arrays` applied to the MNIST test split: `"mnist"` (in-distribution),
    `"mnist_rotated"`, `"mnist_inverted"`, `"mnist_coloured"`, `"mnist_noisy"` and `"sklearn_digits"`.
    Building all six full sets takes about ten seconds on two CPU cores.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*): the cache folder for MNIST; defaults to
            `default_cache_dir()`.
        max_examples (`int`, *optional*): keep only the first `max_examples` images of each set.
        seed (`int`, *optional*, defaults to 0): the seed of the random shifts.

    Returns:
        `dict[str, datasets.Dataset]`: datasets with columns `image` (PIL RGB 28x28) and `label`
        (`ClassLabel(names=DIGIT_CLASS_NAMES)`).

    Example:

    ```python
    >>> from hf_dawin.benchmarks.shifts import load_mnist_shift_suite
    >>> suite = load_mnist_shift_suite(max_examples=100)
    >>> sorted(suite), suite["mnist_rotated"].features["label"].names[7]
    (['mnist', 'mnist_coloured', 'mnist_inverted', 'mnist_noisy', 'mnist_rotated', 'sklearn_digits'], 'seven')
    ```
    """
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise ValueError(f"Expected `max_examples` as a positive integer or None, received {max_examples!r}.")
    test_images, test_labels = load_mnist(cache_dir)["test"]
    arrays = shift_suite_arrays(test_images, test_labels, max_examples=max_examples, seed=seed)
    return {name: digit_dataset(images, labels) for name, (images, labels) in arrays.items()}


__all__ = [
    "DIGIT_CLASS_NAMES",
    "ID_SET_NAME",
    "SHIFT_SET_NAMES",
    "SHIFT_TRANSFORMS",
    "add_noise",
    "clean_digits",
    "colour_digits",
    "digit_dataset",
    "grey_to_rgb",
    "invert_digits",
    "load_mnist_shift_suite",
    "random_colour_pairs",
    "rotate_digits",
    "shift_suite_arrays",
    "sklearn_digits_as_mnist",
]
