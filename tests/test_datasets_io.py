"""Tests for evaluation dataset loading, label checks, image decoding and batching."""

import io
import json
import logging
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
import transformers
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from hf_dawin.datasets_io import (
    DEFAULT_MAX_IMAGE_SIDE,
    ImageBatcher,
    SkippedImages,
    check_labels,
    decode_image,
    iter_image_batches,
    label_names,
    load_evaluation_dataset,
    restrict_to_classes,
)


IMAGE_SIZE = 32


def _jpeg_bytes(image, **save_kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **save_kwargs)
    return buffer.getvalue()


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _noise(size, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor():
    processor_class = getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)
    return processor_class(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


@pytest.fixture
def messy_folder(tmp_path):
    """An image folder with two classes and every kind of file the batcher must cope with."""
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir(parents=True)

    _noise((40, 30), 0).save(root / "cat" / "a_good.jpg")
    large = Image.new("RGB", (8000, 8000), (200, 30, 30))
    large.paste((30, 30, 200), (4000, 0, 8000, 8000))
    large.save(root / "cat" / "b_large.jpg", quality=85)
    (root / "cat" / "c_truncated.jpg").write_bytes(_jpeg_bytes(_noise((64, 64), 1))[:400])
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(root / "cat" / "d_cmyk.jpg")

    (root / "dog" / "a_empty.jpg").write_bytes(b"")
    Image.fromarray(np.full((24, 24), 90, dtype=np.uint8), mode="L").save(root / "dog" / "b_gray.png")
    Image.new("RGBA", (24, 24), (255, 0, 0, 0)).save(root / "dog" / "c_rgba.png")
    Image.new("P", (24, 24), 3).save(root / "dog" / "d_palette.png")
    _noise((30, 50), 2).save(root / "dog" / "e_good.png")
    return root


def _load_folder(folder, tmp_path, **kwargs):
    return load_evaluation_dataset(folder, cache_dir=tmp_path / "cache", **kwargs)


def _bytes_dataset(entries, labels, class_names=("a", "b")):
    """An in-memory dataset whose image column stores the given encoded bytes."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(class_names))})
    rows = {"image": [{"bytes": data, "path": None} for data in entries], "label": labels}
    return datasets.Dataset.from_dict(rows, features=features)


# ---------------------------------------------------------------------------------------------
# Loading


def test_imagefolder_loads_with_labels(messy_folder, tmp_path):
    dataset = _load_folder(messy_folder, tmp_path)

    assert len(dataset) == 9
    assert label_names(dataset) == ["cat", "dog"]
    assert sorted(dataset["label"]) == [0, 0, 0, 0, 1, 1, 1, 1, 1]


def test_imagefolder_accepts_string_path(messy_folder, tmp_path):
    dataset = load_evaluation_dataset(str(messy_folder), cache_dir=str(tmp_path / "cache"))

    assert len(dataset) == 9


def test_imagefolder_with_splits_defaults_to_test(tmp_path):
    for split, count in (("train", 3), ("test", 1)):
        for label in ("x", "y"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for index in range(count):
                _noise((8, 8), index).save(tmp_path / "data" / split / label / f"{index}.png")

    assert len(_load_folder(tmp_path / "data", tmp_path)) == 2
    assert len(_load_folder(tmp_path / "data", tmp_path, split="train")) == 6


def test_saved_dataset_loads(tmp_path):
    original = _bytes_dataset([_png_bytes(_noise((8, 8), seed)) for seed in range(3)], [0, 1, 1])
    original.save_to_disk(tmp_path / "saved")

    dataset = load_evaluation_dataset(tmp_path / "saved")

    assert (tmp_path / "saved" / "state.json").is_file()
    assert dataset["label"][:] == [0, 1, 1]
    assert label_names(dataset) == ["a", "b"]


def test_saved_dataset_dict_split(tmp_path):
    part = _bytes_dataset([_png_bytes(_noise((8, 8), 0))], [1])
    test_part = _bytes_dataset([_png_bytes(_noise((8, 8), seed)) for seed in range(2)], [0, 1])
    datasets.DatasetDict(validation=part, test=test_part).save_to_disk(tmp_path / "saved")

    assert len(load_evaluation_dataset(tmp_path / "saved", split="validation")) == 1
    assert len(load_evaluation_dataset(tmp_path / "saved")) == 2
    datasets.DatasetDict(train=part, validation=part).save_to_disk(tmp_path / "no_test")
    with pytest.raises(ValueError, match=r"has several splits \['train', 'validation'\] and none is named 'test'"):
        load_evaluation_dataset(tmp_path / "no_test")
    with pytest.raises(ValueError, match=r"Split 'train' not found .* Available splits: \['test', 'validation'\]"):
        load_evaluation_dataset(tmp_path / "saved", split="train")


def test_missing_image_column_lists_columns(tmp_path):
    _bytes_dataset([_png_bytes(_noise((8, 8), 0))], [0]).save_to_disk(tmp_path / "saved")

    with pytest.raises(ValueError, match=r"no column 'img' \(image_column\). Its columns are \['image', 'label'\]"):
        load_evaluation_dataset(tmp_path / "saved", image_column="img")


def test_empty_saved_dataset_rejected(tmp_path):
    _bytes_dataset([], []).save_to_disk(tmp_path / "saved")

    with pytest.raises(ValueError, match=r"saved dataset at .*saved has no rows"):
        load_evaluation_dataset(tmp_path / "saved")


@pytest.mark.parametrize("class_folders", [[], ["zero", "one"]], ids=["no-folders", "empty-class-folders"])
def test_empty_image_folder_rejected(tmp_path, class_folders):
    root = tmp_path / "images"
    root.mkdir()
    for name in class_folders:
        (root / name).mkdir()

    with pytest.raises(ValueError, match=f"folder {root} contains no files that datasets can read. It needs images in one"):
        load_evaluation_dataset(root)


def test_missing_label_column_lists_columns(tmp_path):
    _bytes_dataset([_png_bytes(_noise((8, 8), 0))], [0]).save_to_disk(tmp_path / "saved")

    with pytest.raises(ValueError, match=r"saved' has no column 'labels' \(label_column\). Its columns are \['image', 'label'\]"):
        load_evaluation_dataset(tmp_path / "saved", label_column="labels")


def test_max_examples_takes_first_rows(messy_folder, tmp_path):
    full = _load_folder(messy_folder, tmp_path)

    dataset = _load_folder(messy_folder, tmp_path, max_examples=4)

    assert len(dataset) == 4
    assert dataset["label"][:] == full["label"][:4]


def test_max_examples_with_seed_samples(messy_folder, tmp_path):
    first = _load_folder(messy_folder, tmp_path, max_examples=5, seed=3)
    second = _load_folder(messy_folder, tmp_path, max_examples=5, seed=3)

    assert len(first) == 5
    assert first["label"][:] == second["label"][:]
    assert [row["path"] for row in first.cast_column("image", datasets.Image(decode=False))["image"]] == [
        row["path"] for row in second.cast_column("image", datasets.Image(decode=False))["image"]
    ]


def test_max_examples_above_size_keeps_all(messy_folder, tmp_path):
    assert len(_load_folder(messy_folder, tmp_path, max_examples=100)) == 9


@pytest.mark.parametrize("max_examples", [0, -2, 1.5, True])
def test_max_examples_rejects_invalid(messy_folder, tmp_path, max_examples):
    with pytest.raises(ValueError, match=r"max_examples \(--max-examples\) must be a positive integer or None"):
        _load_folder(messy_folder, tmp_path, max_examples=max_examples)


def test_missing_local_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="Evaluation dataset directory .*absent' does not exist"):
        load_evaluation_dataset(tmp_path / "absent")


def test_local_file_rejected(tmp_path):
    path = tmp_path / "one.png"
    _noise((8, 8), 0).save(path)

    with pytest.raises(ValueError, match="is a file. Pass a directory"):
        load_evaluation_dataset(path)


def test_source_type_rejected():
    with pytest.raises(TypeError, match="source must be a Hub dataset id or a local path, got int"):
        load_evaluation_dataset(3)


def test_missing_hub_dataset_fails_fast_offline(tmp_path):
    """An unknown repository id fails with a clear error, not a long network wait, when offline."""
    script = (
        "import time\n"
        "from hf_dawin.datasets_io import load_evaluation_dataset\n"
        "start = time.perf_counter()\n"
        "try:\n"
        "    load_evaluation_dataset('hf-dawin-tests/no-such-dataset', split='test')\n"
        "except FileNotFoundError as error:\n"
        "    print('ELAPSED', time.perf_counter() - start)\n"
        "    print('MESSAGE', error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}

    completed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)

    assert completed.returncode == 0, completed.stderr
    lines = dict(line.split(" ", 1) for line in completed.stdout.splitlines() if line.startswith(("ELAPSED", "MESSAGE")))
    assert "ELAPSED" in lines, completed.stdout + completed.stderr
    assert float(lines["ELAPSED"]) < 20.0
    assert "'hf-dawin-tests/no-such-dataset' is not a local directory" in lines["MESSAGE"]
    assert "(offline mode is on)" in lines["MESSAGE"]
    assert "Pass the path of an image folder" in lines["MESSAGE"]


# ---------------------------------------------------------------------------------------------
# Labels


def test_label_names_requires_class_label():
    dataset = datasets.Dataset.from_dict({"label": [0, 1]})

    with pytest.raises(ValueError, match="Column 'label' is .*, not a ClassLabel"):
        label_names(dataset)


def test_label_names_missing_column():
    dataset = datasets.Dataset.from_dict({"target": [0, 1]})

    with pytest.raises(ValueError, match=r"no column 'label'. Its columns are \['target'\]"):
        label_names(dataset)


def test_check_labels_lists_offending_values():
    dataset = datasets.Dataset.from_dict({"label": [0, 7, 3, 7, -1, 2]})

    with pytest.raises(ValueError, match=r"4 labels in column 'label' are outside the valid range \[0, 2\]: -1, 3, 7"):
        check_labels(dataset, 3)


def test_check_labels_uses_class_label_size():
    features = datasets.Features({"label": datasets.ClassLabel(names=["a", "b"])})
    dataset = datasets.Dataset.from_dict({"label": [0, 1, 1]}, features=features)

    check_labels(dataset)
    with pytest.raises(ValueError, match=r"outside the valid range \[0, 0\]: 1"):
        check_labels(dataset, 1)


def test_check_labels_rejects_negative_without_size():
    dataset = datasets.Dataset.from_dict({"label": [0, -1]})

    with pytest.raises(ValueError, match="outside the valid range non-negative integers: -1"):
        check_labels(dataset)


def test_check_labels_rejects_non_integers():
    dataset = datasets.Dataset.from_dict({"label": ["cat", "dog"]})

    with pytest.raises(ValueError, match="Column 'label' must hold integer class indices"):
        check_labels(dataset, 2)


def test_restrict_to_classes_relabels(messy_folder, tmp_path):
    dataset = _load_folder(messy_folder, tmp_path)

    restricted = restrict_to_classes(dataset, ["dog"])
    reordered = restrict_to_classes(dataset, ["dog", "cat"])

    assert len(restricted) == 5
    assert label_names(restricted) == ["dog"]
    assert set(restricted["label"]) == {0}
    assert label_names(reordered) == ["dog", "cat"]
    assert reordered["label"][:] == [1 - label for label in dataset["label"]]


def test_restrict_to_classes_rejects_unknown(messy_folder, tmp_path):
    dataset = _load_folder(messy_folder, tmp_path)

    with pytest.raises(ValueError, match=r"1 requested classes are not classes of the dataset: 'bird'"):
        restrict_to_classes(dataset, ["cat", "bird"])


# ---------------------------------------------------------------------------------------------
# Decoding


def test_decode_grayscale_to_rgb():
    image = decode_image(_png_bytes(Image.fromarray(np.full((5, 6), 90, dtype=np.uint8), mode="L")))

    assert image.mode == "RGB"
    assert image.size == (6, 5)
    assert image.getpixel((0, 0)) == (90, 90, 90)


def test_decode_rgba_composites_on_white():
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 255))

    image = decode_image(_png_bytes(rgba))

    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (0, 0, 255)


def test_decode_half_transparent_blends():
    image = decode_image(_png_bytes(Image.new("RGBA", (1, 1), (0, 0, 0, 128))))

    assert all(abs(channel - 127) <= 1 for channel in image.getpixel((0, 0)))


def test_decode_palette_with_transparency():
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 255, 0] * 2 + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1

    image = decode_image(_png_bytes(palette))

    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (0, 255, 0)
    assert image.getpixel((1, 0)) == (255, 255, 255)


def test_decode_cmyk_jpeg():
    image = decode_image(_jpeg_bytes(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=100))

    assert image.mode == "RGB"
    red, green, blue = image.getpixel((4, 4))
    assert red > 230
    assert green < 30
    assert blue < 30


def test_decode_16_bit_grayscale_scales():
    deep = Image.fromarray(np.full((3, 3), 40000, dtype=np.uint16))

    image = decode_image(_png_bytes(deep))

    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == (40000 >> 8,) * 3


def test_decode_applies_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
    data = _jpeg_bytes(_noise((40, 20), 0), exif=exif.tobytes())

    image = decode_image(data)

    assert image.size == (20, 40)


def test_decode_large_jpeg_uses_draft(tmp_path, monkeypatch):
    path = tmp_path / "large.jpg"
    large = Image.new("RGB", (8000, 8000), (200, 30, 30))
    large.paste((30, 30, 200), (4000, 0, 8000, 8000))
    large.save(path, quality=85)
    drafted_sizes = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self, mode, size):
        result = original_draft(self, mode, size)
        drafted_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)

    image = decode_image(path)

    # The JPEG decoder halves the image to 4000 px, the largest scale step not below 2048 px.
    assert drafted_sizes == [(4000, 4000)]
    assert image.size == (DEFAULT_MAX_IMAGE_SIDE, DEFAULT_MAX_IMAGE_SIDE)
    red_side = image.getpixel((100, 1000))
    blue_side = image.getpixel((1900, 1000))
    assert red_side[0] > 150 > red_side[2]
    assert blue_side[2] > 150 > blue_side[0]


def test_decode_large_png_downscales(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (6000, 1500), (0, 128, 0)).save(path)

    image = decode_image(str(path))

    assert image.size == (2048, 512)
    assert image.getpixel((1000, 200)) == (0, 128, 0)


def test_decode_limit_is_configurable():
    data = _png_bytes(_noise((100, 40), 0))

    assert decode_image(data, max_image_side=50).size == (50, 20)
    assert decode_image(data, max_image_side=None).size == (100, 40)
    assert decode_image(data, max_image_side=100).size == (100, 40)


@pytest.mark.parametrize("max_image_side", [0, -5, 2.5, True])
def test_decode_rejects_invalid_limit(max_image_side):
    with pytest.raises(ValueError, match="max_image_side must be a positive number of pixels or None"):
        decode_image(_png_bytes(_noise((4, 4), 0)), max_image_side=max_image_side)


def test_decode_rejects_garbage_bytes():
    with pytest.raises(UnidentifiedImageError):
        decode_image(b"not an image at all")


def test_decode_rejects_truncated_jpeg():
    with pytest.raises(OSError):
        decode_image(_jpeg_bytes(_noise((64, 64), 1))[:400])


def test_decode_rejects_empty_entry():
    with pytest.raises(ValueError, match="neither bytes nor a path"):
        decode_image({"bytes": None, "path": None})


def test_decode_rejects_unknown_type():
    with pytest.raises(TypeError, match="got int"):
        decode_image(5)


def test_decode_accepts_pil_image():
    source = Image.fromarray(np.full((3, 3), 10, dtype=np.uint8), mode="L")

    image = decode_image(source)

    assert image.mode == "RGB"
    assert image is not source


# ---------------------------------------------------------------------------------------------
# Batching


def test_batcher_skips_and_reports(messy_folder, tmp_path, processor, caplog):
    dataset = _load_folder(messy_folder, tmp_path)
    paths = [entry["path"] for entry in dataset.cast_column("image", datasets.Image(decode=False))["image"]]
    batcher = ImageBatcher(dataset, processor, batch_size=3, num_classes=2)

    with caplog.at_level(logging.WARNING, logger="hf_dawin.datasets_io"):
        batches = list(batcher)

    sizes = [pixel_values.shape[0] for pixel_values, _, _ in batches]
    indices = torch.cat([batch_indices for _, _, batch_indices in batches]).tolist()
    labels = torch.cat([batch_labels for _, batch_labels, _ in batches]).tolist()
    skipped_names = sorted(os.path.basename(entry.path) for entry in batcher.skipped)
    reasons = {os.path.basename(entry.path): entry.reason for entry in batcher.skipped}

    assert sizes == [3, 3, 1]
    assert len(batcher.skipped) == 2
    assert batcher.skipped.num_seen == 9
    assert skipped_names == ["a_empty.jpg", "c_truncated.jpg"]
    assert reasons["a_empty.jpg"].startswith("UnidentifiedImageError")
    assert reasons["c_truncated.jpg"].startswith("OSError")
    assert sorted(indices + batcher.skipped.indices) == list(range(9))
    assert all(os.path.basename(paths[index]) not in skipped_names for index in indices)
    assert labels == [dataset["label"][index] for index in indices]
    for pixel_values, _, _ in batches:
        assert pixel_values.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert torch.isfinite(pixel_values).all()
    assert "Skipped 2 of 9 images that could not be decoded" in caplog.text


def test_batcher_pixels_match_manual_conversion(messy_folder, tmp_path, processor):
    dataset = _load_folder(messy_folder, tmp_path)
    paths = [entry["path"] for entry in dataset.cast_column("image", datasets.Image(decode=False))["image"]]
    gray_index = next(index for index, path in enumerate(paths) if path.endswith("b_gray.png"))
    rgba_index = next(index for index, path in enumerate(paths) if path.endswith("c_rgba.png"))

    by_index = {}
    for pixel_values, _, indices in ImageBatcher(dataset, processor, batch_size=4):
        for row, index in enumerate(indices.tolist()):
            by_index[index] = pixel_values[row]

    expected_gray = processor(images=[Image.new("RGB", (24, 24), (90, 90, 90))], return_tensors="pt")["pixel_values"][0]
    expected_white = processor(images=[Image.new("RGB", (24, 24), (255, 255, 255))], return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(by_index[gray_index], expected_gray)
    torch.testing.assert_close(by_index[rgba_index], expected_white)


def test_batcher_reiteration_resets_record(messy_folder, tmp_path, processor):
    batcher = ImageBatcher(_load_folder(messy_folder, tmp_path), processor, batch_size=4)

    first = sum(labels.numel() for _, labels, _ in batcher)
    second = sum(labels.numel() for _, labels, _ in batcher)

    assert first == second == 7
    assert len(batcher.skipped) == 2


def test_repeated_pass_reports_skips_once(messy_folder, tmp_path, processor, caplog):
    batcher = ImageBatcher(_load_folder(messy_folder, tmp_path), processor, batch_size=4)

    with caplog.at_level(logging.WARNING, logger="hf_dawin.datasets_io"):
        for _ in range(3):
            list(batcher)

    assert caplog.text.count("Skipped 2 of 9 images that could not be decoded") == 1
    assert len(batcher.skipped) == 2


def test_early_stop_still_reports(processor, caplog):
    bad = b"\x89PNG broken"
    dataset = _bytes_dataset([bad] + [_png_bytes(_noise((8, 8), seed)) for seed in range(4)], [0, 1, 0, 1, 0])
    skipped = SkippedImages()

    with caplog.at_level(logging.WARNING, logger="hf_dawin.datasets_io"):
        batches = iter_image_batches(dataset, processor, batch_size=2, skipped=skipped)
        _, _, indices = next(batches)
        batches.close()

    assert indices.tolist() == [1, 2]
    assert skipped.indices == [0]
    assert skipped.entries[0].path is None
    assert "Skipped 1 of 3 images" in caplog.text


def test_summary_without_skips(processor):
    dataset = _bytes_dataset([_png_bytes(_noise((8, 8), 0))], [1])
    skipped = SkippedImages()

    batches = list(iter_image_batches(dataset, processor, batch_size=2, skipped=skipped))

    assert len(batches) == 1
    assert skipped.summary() == "No images skipped out of 1."


def test_all_images_skipped_yields_nothing(processor):
    dataset = _bytes_dataset([b"", b"xx"], [0, 1])
    skipped = SkippedImages()

    batches = list(iter_image_batches(dataset, processor, batch_size=2, skipped=skipped))

    assert batches == []
    assert skipped.indices == [0, 1]


def test_batcher_rejects_out_of_range_labels(processor):
    dataset = _bytes_dataset([_png_bytes(_noise((8, 8), 0))] * 3, [0, 1, 1], class_names=("a", "b"))

    with pytest.raises(ValueError, match=r"2 labels in column 'label' are outside the valid range \[0, 0\]: 1"):
        ImageBatcher(dataset, processor, num_classes=1)
    # The generator function checks labels when called, before any iteration.
    with pytest.raises(ValueError, match=r"outside the valid range \[0, 0\]"):
        iter_image_batches(dataset, processor, num_classes=1)


def test_batcher_accepts_path_column(tmp_path, processor):
    paths = []
    for index in range(3):
        path = tmp_path / f"{index}.png"
        _noise((10, 12), index).save(path)
        paths.append(str(path))
    paths.append(str(tmp_path / "missing.png"))
    dataset = datasets.Dataset.from_dict({"file": paths, "target": [0, 1, 2, 0]})
    skipped = SkippedImages()

    batches = list(iter_image_batches(dataset, processor, 8, image_column="file", label_column="target", skipped=skipped))

    assert len(batches) == 1
    assert batches[0][1].tolist() == [0, 1, 2]
    assert skipped.indices == [3]
    assert skipped.entries[0].reason.startswith("FileNotFoundError")


def test_batcher_rejects_non_image_column(processor):
    dataset = datasets.Dataset.from_dict({"image": [1, 2], "label": [0, 1]})

    with pytest.raises(ValueError, match="Column 'image' must be a datasets.Image feature or a string path column"):
        iter_image_batches(dataset, processor)


def test_batcher_rejects_missing_column(processor):
    dataset = datasets.Dataset.from_dict({"pixels": ["a.png"], "label": [0]})

    with pytest.raises(ValueError, match=r"no column 'image' \(image_column\). Its columns are \['pixels', 'label'\]"):
        ImageBatcher(dataset, processor)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_batcher_rejects_invalid_batch_size(processor, batch_size):
    dataset = _bytes_dataset([_png_bytes(_noise((8, 8), 0))], [0])

    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ImageBatcher(dataset, processor, batch_size=batch_size)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        iter_image_batches(dataset, processor, batch_size=batch_size)


def test_skipped_record_serialises(processor):
    dataset = _bytes_dataset([b"", _png_bytes(_noise((8, 8), 0))], [0, 1])
    skipped = SkippedImages()

    list(iter_image_batches(dataset, processor, skipped=skipped))
    record = json.loads(json.dumps([vars(entry) for entry in skipped]))

    assert record[0]["index"] == 0
    assert record[0]["reason"].startswith("UnidentifiedImageError")



def test_single_class_folder_keeps_label(tmp_path):
    (tmp_path / "data" / "sharks").mkdir(parents=True)
    for seed in range(3):
        _noise((8, 8), seed).save(tmp_path / "data" / "sharks" / f"{seed}.png")

    dataset = _load_folder(tmp_path / "data", tmp_path)

    assert label_names(dataset) == ["sharks"]
    assert dataset["label"][:] == [0, 0, 0]
