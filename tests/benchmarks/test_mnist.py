"""Tests for the MNIST and Fashion-MNIST loaders and the restricted unpickler."""

import gzip
import io
import pickle
import struct

import numpy as np
import pytest

from hf_dawin.benchmarks.mnist import (
    FASHION_MNIST_CLASS_NAMES,
    NumpyArrayUnpickler,
    load_fashion_mnist,
    load_mnist,
    load_numpy_pickle,
)


# A hand-written protocol 0 pickle that calls os.system("echo unsafe") when loaded without restrictions.
_OS_SYSTEM_PICKLE = b"cos\nsystem\n(S'echo unsafe'\ntR."


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_unpickler_rejects_os_system():
    with pytest.raises(pickle.UnpicklingError, match=r"Rejected global os\.system"):
        load_numpy_pickle(_OS_SYSTEM_PICKLE)


def test_unpickler_rejects_other_numpy_functions():
    with pytest.raises(pickle.UnpicklingError, match=r"Rejected global numpy\.load"):
        load_numpy_pickle(b"cnumpy\nload\n(S'file.npy'\ntR.")


def test_unpickler_rejects_builtins():
    payload = pickle.dumps(eval, protocol=4)
    with pytest.raises(pickle.UnpicklingError, match=r"Rejected global builtins\.eval"):
        NumpyArrayUnpickler(io.BytesIO(payload)).load()


@pytest.mark.parametrize("protocol", [3, 4])
def test_unpickler_rebuilds_numpy_arrays(protocol):
    arrays = (np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, 2, 3], dtype=np.int64))
    restored = load_numpy_pickle(pickle.dumps(arrays, protocol=protocol))
    assert isinstance(restored, tuple)
    for original, loaded in zip(arrays, restored):
        assert loaded.dtype == original.dtype
        np.testing.assert_array_equal(loaded, original)


def test_load_mnist_splits(mnist):
    assert sorted(mnist) == ["test", "train", "valid"]
    expected_sizes = {"train": 50_000, "valid": 10_000, "test": 10_000}
    for split, (images, labels) in mnist.items():
        assert images.shape == (expected_sizes[split], 28, 28)
        assert images.dtype == np.uint8
        assert labels.shape == (expected_sizes[split],)
        assert labels.dtype == np.int64
        assert sorted(np.unique(labels).tolist()) == list(range(10))
    # The first MNIST test labels are well known.
    assert mnist["test"][1][:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    # White digits on black: the border is dark and strokes reach full intensity.
    test_images = mnist["test"][0]
    assert test_images[:, 0, :].max() == 0
    assert test_images.max() == 255


def test_load_mnist_reads_npz_cache(mnist, monkeypatch):
    from hf_dawin.benchmarks import mnist as mnist_module

    def fail(*args, **kwargs):
        raise AssertionError("the wheel must not be read when the .npz cache exists")

    monkeypatch.setattr(mnist_module, "fetch_wheel", fail)
    cached = load_mnist()
    np.testing.assert_array_equal(cached["valid"][0], mnist["valid"][0])
    np.testing.assert_array_equal(cached["valid"][1], mnist["valid"][1])


def _idx_gz(magic: int, array: np.ndarray) -> bytes:
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def _write_fake_fashion_package(cache_dir, images_per_split=5):
    folder = cache_dir / "debian" / "dataset-fashion-mnist" / "usr/share/datasets/fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = rng.integers(0, 256, size=(images_per_split, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=images_per_split, dtype=np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(_idx_gz(0x803, images))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(_idx_gz(0x801, labels))
        expected[split] = (images, labels)
    return folder, expected


def test_load_fashion_mnist_decodes_idx(tmp_path):
    _, expected = _write_fake_fashion_package(tmp_path)
    loaded = load_fashion_mnist(cache_dir=tmp_path)
    assert sorted(loaded) == ["test", "train"]
    for split, (images, labels) in expected.items():
        assert loaded[split][0].dtype == np.uint8
        assert loaded[split][1].dtype == np.int64
        np.testing.assert_array_equal(loaded[split][0], images)
        np.testing.assert_array_equal(loaded[split][1], labels)
    assert (tmp_path / "mnist" / "fashion-mnist.npz").is_file()


def test_load_fashion_mnist_rejects_bad_magic(tmp_path):
    from hf_dawin.benchmarks.assets import AssetError

    folder, _ = _write_fake_fashion_package(tmp_path)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(_idx_gz(0x803, np.zeros((5, 1, 1))))
    with pytest.raises(AssetError, match="expected IDX magic number 0x00000801"):
        load_fashion_mnist(cache_dir=tmp_path)


def test_load_fashion_mnist_from_debian():
    import shutil

    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs apt-get and dpkg-deb (a Debian-based system)")
    data = load_fashion_mnist()
    assert data["train"][0].shape == (60_000, 28, 28)
    assert data["test"][0].shape == (10_000, 28, 28)
    assert np.bincount(data["test"][1], minlength=10).tolist() == [1000] * len(FASHION_MNIST_CLASS_NAMES)
