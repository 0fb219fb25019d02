"""Loading evaluation datasets and turning their images into batches of pixel values.

`load_evaluation_dataset` accepts a Hub dataset id, a local `imagefolder` directory or a
`save_to_disk` directory and checks the image and label columns. `ImageBatcher` (or the generator
`iter_image_batches`) decodes images itself so that unreadable files are skipped, counted and
reported instead of stopping a long evaluation or disappearing silently. It converts every image
to RGB and downscales very large images before the image processor runs.
"""

import dataclasses
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.naming import camelcase_to_snakecase
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.utils import logging

from .hub_access import check_hub_reachable


logger = logging.get_logger(__name__)

# Longer side, in pixels, above which an image is downscaled before the image processor. Images up
# to this size reach the processor unchanged. At 2048 px a decoded RGB image takes at most 12 MiB.
DEFAULT_MAX_IMAGE_SIDE = 2048

# Errors that mean "this file is not a decodable image". PIL raises SyntaxError for some malformed
# files (e.g. a broken PNG chunk), and OSError covers truncated data, unreadable and missing files.
IMAGE_DECODING_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError)

_MAX_LISTED_VALUES = 20
_BACKGROUND_COLOR = (255, 255, 255)


@dataclasses.dataclass(frozen=True)
class SkippedImage:
    """One image that could not be decoded.

    Attributes:
        index: Row index in the dataset.
        reason: Exception type and message from the decoder.
        path: The image file path when the dataset stores paths, else None.
    """

    index: int
    reason: str
    path: str | None = None


@dataclasses.dataclass
class SkippedImages:
    """Record of the images an iteration skipped, in dataset order.

    Attributes:
        entries: One `SkippedImage` per skipped row.
        num_seen: Number of rows the iteration read, skipped ones included.
    """

    entries: list[SkippedImage] = dataclasses.field(default_factory=list)
    num_seen: int = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[SkippedImage]:
        return iter(self.entries)

    @property
    def indices(self) -> list[int]:
        """Row indices of the skipped images."""
        return [entry.index for entry in self.entries]

    def add(self, index: int, reason: str, path: str | None = None) -> None:
        """Record a skipped row."""
        self.entries.append(SkippedImage(index=index, reason=reason, path=path))

    def clear(self) -> None:
        """Forget all entries, before a new iteration."""
        self.entries.clear()
        self.num_seen = 0

    def summary(self) -> str:
        """Describe the count and the first skipped image in one line."""
        if not self.entries:
            return f"No images skipped out of {self.num_seen}."
        first = self.entries[0]
        where = f"row {first.index}" + (f" ({first.path})" if first.path else "")
        return (
            f"Skipped {len(self.entries)} of {self.num_seen} images that could not be decoded. "
            f"The first is {where}: {first.reason}"
        )


# ---------------------------------------------------------------------------------------------
# Loading


def _format_values(values: Sequence[Any]) -> str:
    text = ", ".join(repr(value) for value in values[:_MAX_LISTED_VALUES])
    if len(values) > _MAX_LISTED_VALUES:
        text += f", ... ({len(values) - _MAX_LISTED_VALUES} more)"
    return text


def _looks_like_local_path(source: str) -> bool:
    """Return whether `source` names a local path rather than a Hub id such as `"owner/name"`."""
    return (
        os.path.exists(source)
        or source.startswith((".", "/", "~", "\\"))
        or source.count("/") > 1
        or (len(source) > 1 and source[1] == ":")
    )


def _select_split(
    splits: datasets.DatasetDict, split: str | None, source: str
) -> datasets.Dataset:
    if split is not None:
        if split not in splits:
            raise ValueError(f"Split {split!r} not found in {source}. Available splits: {sorted(splits)}.")
        return splits[split]
    if len(splits) == 1:
        return next(iter(splits.values()))
    if "test" in splits:
        logger.info("%s has the splits %s; evaluating 'test'.", source, sorted(splits))
        return splits["test"]
    raise ValueError(
        f"{source} has several splits {sorted(splits)} and none is named 'test'. Choose one with split= "
        "(on the command line, append :SPLIT to the source or pass --split)."
    )


def _is_single_class_folder(path: Path) -> bool:
    """Return whether `path` contains exactly one visible subfolder, which contains files (one class folder)."""
    folders = [entry for entry in path.iterdir() if entry.is_dir() and not entry.name.startswith(".")]
    return len(folders) == 1 and any(entry.is_file() for entry in folders[0].iterdir())


def _load_local(path: Path, split: str | None, cache_dir: str | None) -> datasets.Dataset:
    if not path.exists():
        raise FileNotFoundError(
            f"Evaluation dataset directory {str(path)!r} does not exist. Pass an imagefolder directory, the output "
            "folder of Dataset.save_to_disk, or a Hub dataset id."
        )
    if not path.is_dir():
        raise ValueError(
            f"Evaluation dataset source {str(path)!r} is a file. Pass a directory: an image folder with one "
            "subfolder per class, or the output of Dataset.save_to_disk."
        )

    is_saved_dataset = (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    if is_saved_dataset or (path / "dataset_dict.json").is_file():
        try:
            loaded = datasets.load_from_disk(str(path))
        except IndexError as error:
            # datasets 5.2 raises IndexError for a saved Dataset with no rows, which has no data files.
            if _has_no_data_files(path):
                raise ValueError(
                    f"The saved dataset at {path} has no rows; the evaluation needs at least one example. Save a "
                    "dataset that contains images, or pass another folder."
                ) from error
            raise
        if isinstance(loaded, datasets.DatasetDict):
            return _select_split(loaded, split, str(path))
        if split is not None:
            logger.warning("%s contains a single saved Dataset, so split=%r is ignored.", path, split)
        return loaded

    # Any other directory: `datasets` infers the builder from the files (imagefolder for images).
    try:
        loaded = datasets.load_dataset(str(path), split=split, cache_dir=cache_dir)
    except datasets.data_files.EmptyDatasetError as error:
        raise ValueError(
            f"The evaluation dataset folder {path} contains no files that datasets can read. It needs images in one "
            "subfolder per class (an imagefolder), data files such as Parquet or CSV, or the output of "
            "Dataset.save_to_disk. Add the images, or pass another folder."
        ) from error
    columns = loaded.column_names if isinstance(loaded, datasets.Dataset) else next(iter(loaded.column_names.values()))
    if "label" not in columns and _is_single_class_folder(path):
        # `imagefolder` infers labels only from two or more class folders; one class folder is still a label.
        loaded = datasets.load_dataset(str(path), split=split, cache_dir=cache_dir, drop_labels=False)
    if isinstance(loaded, datasets.DatasetDict):
        return _select_split(loaded, None, str(path))
    return loaded


def _has_no_data_files(path: Path) -> bool:
    """Return whether `path` is a `save_to_disk` folder of a Dataset whose state lists no data files."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def _in_datasets_cache(repo_id: str, cache_dir: str | None) -> bool:
    """Return whether `datasets` has prepared this Hub dataset before, which it loads from cache when offline."""
    parts = repo_id.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE).expanduser() / "___".join(parts)
    return any(path.is_dir() for path in root.glob("*/*/*"))


def _load_from_hub(repo_id: str, split: str | None, cache_dir: str | None) -> datasets.Dataset:
    # datasets has its own offline switch (HF_DATASETS_OFFLINE) and loads a prepared dataset from its cache.
    if not datasets.config.HF_HUB_OFFLINE and not _in_datasets_cache(repo_id, cache_dir):
        check_hub_reachable(repo_id, repo_type="dataset")
    try:
        loaded = datasets.load_dataset(repo_id, split=split, cache_dir=cache_dir)
    except (FileNotFoundError, ConnectionError) as error:
        offline = " (offline mode is on)" if datasets.config.HF_HUB_OFFLINE else ""
        raise FileNotFoundError(
            f"Evaluation dataset {repo_id!r} is not a local directory and could not be loaded from the "
            f"Hugging Face Hub{offline}: {str(error).rstrip('.')}. Pass the path of an image folder or a save_to_disk "
            "directory, or load the Hub dataset once with network access so that it is cached."
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        return _select_split(loaded, None, repr(repo_id))
    return loaded


def _check_columns(dataset: datasets.Dataset, image_column: str, label_column: str, source=None) -> None:
    described = "The evaluation dataset" if source is None else f"The evaluation dataset {str(source)!r}"
    for argument, column in (("image_column", image_column), ("label_column", label_column)):
        if column not in dataset.column_names:
            raise ValueError(
                f"{described} has no column {column!r} ({argument}). Its columns are "
                f"{dataset.column_names}. Pass {argument}= with the right name (--{argument.replace('_', '-')} on "
                "the command line)."
            )


def load_evaluation_dataset(
    source: str | Path,
    *,
    split: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    max_examples: int | None = None,
    seed: int | None = None,
    cache_dir: str | Path | None = None,
) -> datasets.Dataset:
    """Load an image classification dataset for evaluation.

    Args:
        source: A Hub dataset id (`"name"` or `"owner/name"`), a local directory of images (one
            subfolder per class, read with `datasets`' `imagefolder` builder, or any directory
            `datasets.load_dataset` reads), or a directory written by `save_to_disk`.
        split: Split to use, e.g. `"test"` or `"validation[:500]"` (slicing works for Hub ids and
            image folders). Required when the source has several splits.
        image_column: Column holding the images.
        label_column: Column holding the integer class labels.
        max_examples: Keep only this many rows: the first ones, or a random sample when `seed` is set.
            `imagefolder` orders rows by class folder, so set `seed` for a sample across classes.
        seed: Seed for sampling `max_examples` rows.
        cache_dir: Cache directory for `datasets.load_dataset`.

    Returns:
        A `datasets.Dataset`.

    Raises:
        FileNotFoundError: If a local path does not exist, or a Hub id can neither be found locally
            nor downloaded. Set `HF_HUB_OFFLINE=1` and `HF_DATASETS_OFFLINE=1` offline, so that a
            Hub miss fails at once instead of after network retries.
        ValueError: If a column is missing (the message lists the columns), the split is ambiguous or
            unknown, a local folder contains no readable files, or `max_examples` is not positive.

    Example:
        ```python
        >>> dataset = load_evaluation_dataset("path/to/imagenet-r", max_examples=1000, seed=0)
        >>> names = label_names(dataset)
        ```
    """
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1):
        raise ValueError(
            f"max_examples (--max-examples) must be a positive integer or None, received {max_examples!r}."
        )
    if not isinstance(source, (str, Path)):
        raise TypeError(f"source must be a Hub dataset id or a local path, got {type(source).__name__}.")
    cache_dir = str(cache_dir) if cache_dir is not None else None

    if isinstance(source, Path) or _looks_like_local_path(source):
        dataset = _load_local(Path(source).expanduser(), split, cache_dir)
    else:
        dataset = _load_from_hub(source, split, cache_dir)

    _check_columns(dataset, image_column, label_column, source)
    if max_examples is not None and max_examples < len(dataset):
        if seed is not None:
            dataset = dataset.shuffle(seed=seed)
        dataset = dataset.select(range(max_examples))
    logger.info("Loaded evaluation dataset %s: %d rows, columns %s.", source, len(dataset), dataset.column_names)
    return dataset


def label_names(
    dataset: datasets.Dataset,
    label_column: str = "label",
    *,
    alternative: str = " or pass the class names yourself (--class-names FILE on the command line)",
) -> list[str]:
    """Return the class names of a `ClassLabel` column, in label order.

    Args:
        dataset: The evaluation dataset.
        label_column: The label column.
        alternative: The end of the error's advice, after the cast: another way to give class names, or "".

    Raises:
        ValueError: If the column is missing or is not a `ClassLabel`.
    """
    if label_column not in dataset.column_names:
        raise ValueError(f"The dataset has no column {label_column!r}. Its columns are {dataset.column_names}.")
    feature = dataset.features[label_column]
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(
            f"Column {label_column!r} is {feature!r}, not a ClassLabel, so it has no class names. Cast it with "
            f"dataset.cast_column(label_column, datasets.ClassLabel(names=[...])){alternative}."
        )
    return list(feature.names)


def restrict_to_classes(
    dataset: datasets.Dataset, class_names: Sequence[str], *, label_column: str = "label"
) -> datasets.Dataset:
    """Keep the rows of the given classes and relabel them by position in `class_names`.

    This turns, for example, an ObjectNet image folder with 313 class folders into the 113
    classes of `objectnet_projection(...).class_names`.

    Args:
        dataset: Dataset whose `label_column` is a `ClassLabel`.
        class_names: Names of the classes to keep, in the new label order. Each must be a class of the dataset.
        label_column: The label column.

    Returns:
        A dataset whose label column is `ClassLabel(names=class_names)`.

    Raises:
        ValueError: If a name is not a class of the dataset (all such names are listed).
    """
    current_names = label_names(dataset, label_column)
    class_names = list(class_names)
    missing = [name for name in class_names if name not in current_names]
    if missing:
        raise ValueError(
            f"{len(missing)} requested classes are not classes of the dataset: {_format_values(missing)}. "
            f"The dataset's classes are {_format_values(current_names)}."
        )

    new_label = np.full(len(current_names), -1, dtype=np.int64)
    for position, name in enumerate(class_names):
        new_label[current_names.index(name)] = position

    num_rows = len(dataset)
    restricted = dataset.filter(
        lambda labels: (new_label[np.asarray(labels)] >= 0).tolist(), input_columns=label_column, batched=True
    )
    features = restricted.features.copy()
    features[label_column] = datasets.ClassLabel(names=class_names)
    restricted = restricted.map(
        lambda labels: {label_column: new_label[np.asarray(labels)].tolist()},
        input_columns=label_column,
        batched=True,
        features=features,
    )
    logger.info("Kept %d of %d rows in %d classes.", len(restricted), num_rows, len(class_names))
    return restricted


def check_labels(dataset: datasets.Dataset, num_classes: int | None = None, *, label_column: str = "label") -> None:
    """Check that every label is an integer class index in `[0, num_classes - 1]`.

    Args:
        dataset: The evaluation dataset.
        num_classes: Size of the label space the labels index into: the model's classes, or the
            evaluation classes of a `LabelSpaceProjection`. Defaults to the `ClassLabel` size.
        label_column: The label column.

    Raises:
        ValueError: If a label is out of range (the message lists the offending values and the valid
            range) or the column does not hold integers.
    """
    if label_column not in dataset.column_names:
        raise ValueError(f"The dataset has no column {label_column!r}. Its columns are {dataset.column_names}.")
    feature = dataset.features[label_column]
    if num_classes is None and isinstance(feature, datasets.ClassLabel):
        num_classes = feature.num_classes
    labels = np.asarray(dataset[label_column])
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"Column {label_column!r} must hold integer class indices, got {feature!r} with values such as "
            f"{_format_values(labels[:3].tolist())}."
        )

    invalid = labels < 0 if num_classes is None else (labels < 0) | (labels >= num_classes)
    if invalid.any():
        offending = sorted(set(labels[invalid].tolist()))
        valid_range = "non-negative integers" if num_classes is None else f"[0, {num_classes - 1}]"
        raise ValueError(
            f"{int(invalid.sum())} labels in column {label_column!r} are outside the valid range {valid_range}: "
            f"{_format_values(offending)}. Check that the dataset's classes match the model's classes, or "
            "project the model's logits to the dataset's label space."
        )


# ---------------------------------------------------------------------------------------------
# Decoding


def _check_max_image_side(max_image_side: Any) -> None:
    if max_image_side is None:
        return
    if isinstance(max_image_side, bool) or not isinstance(max_image_side, int) or max_image_side < 1:
        raise ValueError(f"max_image_side must be a positive number of pixels or None, got {max_image_side!r}.")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparent images on a white background."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        background = Image.new("RGBA", image.size, _BACKGROUND_COLOR + (255,))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    if image.mode.startswith("I;16"):
        # 16-bit grey: keep the top 8 bits, because convert("L") would clip everything above 255.
        grey = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    # L, 1, P, CMYK (without colour management), YCbCr, I, F and others.
    return image.convert("RGB")


def _downscale(image: Image.Image, max_image_side: int | None) -> Image.Image:
    if max_image_side is not None and max(image.size) > max_image_side:
        image.thumbnail((max_image_side, max_image_side), Image.Resampling.BICUBIC)
    return image


def decode_image(value: Any, *, max_image_side: int | None = DEFAULT_MAX_IMAGE_SIDE) -> Image.Image:
    """Decode one stored image into an RGB PIL image.

    Args:
        value: A `{"bytes": ..., "path": ...}` dict as stored by `datasets.Image(decode=False)`, a
            local file path, raw encoded bytes, or a PIL image.
        max_image_side: Images whose longer side exceeds this many pixels are downscaled to it,
            keeping the aspect ratio. JPEG files are decoded at a reduced scale (`Image.draft`),
            which bounds memory. Other formats are decoded fully, so PIL's decompression-bomb limit
            is their only bound. `None` keeps every image at full size.

    Returns:
        An RGB `PIL.Image.Image`. EXIF orientation is applied, as `datasets.Image` does. Transparent
        images (RGBA, LA, palette with transparency) are composited on a white background. CMYK is
        converted without colour management, so embedded ICC profiles are ignored.

    Raises:
        One of `IMAGE_DECODING_ERRORS` when the data is not a decodable image.

    NOTE: if other code sets `PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`, PIL fills the missing part
    of a truncated file with grey instead of raising, so the file is not reported as skipped.
    """
    _check_max_image_side(max_image_side)
    if isinstance(value, Image.Image):
        return _downscale(_to_rgb(value).copy(), max_image_side)
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = bytes(value), None
    elif isinstance(value, (str, os.PathLike)):
        data, path = None, os.fspath(value)
    else:
        raise TypeError(
            f"Expected an image as a {{'bytes', 'path'}} dict, a path, bytes or a PIL image, got {type(value).__name__}."
        )
    if data is None and path is None:
        raise ValueError("The image entry has neither bytes nor a path.")

    source = io.BytesIO(data) if data is not None else path
    with Image.open(source) as image:
        if max_image_side is not None and max(image.size) > max_image_side:
            # JPEG decodes at 1/2, 1/4 or 1/8 scale when the requested size allows, never below it.
            scale = max_image_side / max(image.size)
            image.draft(image.mode, (max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        image.load()
        # exif_transpose returns a new image, which stays valid after the file closes.
        rgb = _to_rgb(ImageOps.exif_transpose(image))
    return _downscale(rgb, max_image_side)


# ---------------------------------------------------------------------------------------------
# Batching


def _image_storage_dataset(dataset: datasets.Dataset, image_column: str, label_column: str) -> datasets.Dataset:
    """Select the two columns and switch the image column to undecoded `{"bytes", "path"}` entries."""
    feature = dataset.features[image_column]
    if not isinstance(feature, datasets.Image) and feature != datasets.Value("string"):
        image_columns = sorted(
            name
            for name, other in dataset.features.items()
            if isinstance(other, datasets.Image) or other == datasets.Value("string")
        )
        raise ValueError(
            f"Column {image_column!r} must be a datasets.Image feature or a string path column, got {feature!r}. "
            f"Columns that can hold images: {image_columns or 'none'}. Pass one of them as the image column "
            "(--image-column on the command line)."
        )
    columns = [image_column] if image_column == label_column else [image_column, label_column]
    return dataset.select_columns(columns).cast_column(image_column, datasets.Image(decode=False))


def crop_border(image: Image.Image, border: int = 2) -> Image.Image:
    """Remove `border` pixels from each side of `image`; images too small to crop are returned unchanged.

    ObjectNet images carry a thin red frame. The model-soups ObjectNet loader removes it with this 2-pixel crop
    before preprocessing, and the suite does the same.
    """
    width, height = image.size
    if width <= 2 * border or height <= 2 * border:
        return image
    return ImageOps.crop(image, border=border)


def _generate_batches(
    storage: datasets.Dataset,
    image_processor: Any,
    batch_size: int,
    image_column: str,
    label_column: str,
    max_image_side: int | None,
    skipped: SkippedImages,
    image_transform: Callable[[Image.Image], Image.Image] | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    def make_batch(images, labels, indices):
        pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
        return pixel_values, torch.tensor(labels, dtype=torch.long), torch.tensor(indices, dtype=torch.long)

    images: list[Image.Image] = []
    labels: list[int] = []
    indices: list[int] = []
    try:
        for start in range(0, len(storage), batch_size):
            rows = storage[start : start + batch_size]
            for offset, (value, label) in enumerate(zip(rows[image_column], rows[label_column])):
                index = start + offset
                skipped.num_seen += 1
                try:
                    image = decode_image(value, max_image_side=max_image_side)
                except IMAGE_DECODING_ERRORS as error:
                    path = value.get("path") if isinstance(value, dict) else None
                    skipped.add(index, f"{type(error).__name__}: {error}", path)
                    logger.debug("Skipping row %d (%s): %s", index, path, error)
                    continue
                if image_transform is not None:
                    image = image_transform(image)
                images.append(image)
                labels.append(int(label))
                indices.append(index)
                if len(images) == batch_size:
                    yield make_batch(images, labels, indices)
                    images, labels, indices = [], [], []
        if images:
            yield make_batch(images, labels, indices)
    finally:
        # Runs at the end of the data and when the caller stops early, so no skip goes unreported. An evaluation
        # reads each set once per method, so the same summary is logged only the first time.
        if skipped.entries:
            logger.warning_once(skipped.summary() + _process_note())


def _process_note() -> str:
    """Say which process a count belongs to in a multi-process run, where each process reads only its share."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ""
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if world_size == 1:
        return ""
    return f" (counted on rank {rank} of {world_size}, which read part of the set; the evaluation reports the total)"


def iter_image_batches(
    dataset: datasets.Dataset,
    image_processor: Any,
    batch_size: int = 32,
    *,
    image_column: str = "image",
    label_column: str = "label",
    num_classes: int | None = None,
    max_image_side: int | None = DEFAULT_MAX_IMAGE_SIDE,
    skipped: SkippedImages | None = None,
    image_transform: Callable[[Image.Image], Image.Image] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Decode, preprocess and batch the images of a dataset, skipping undecodable files.

    Every batch contains `batch_size` decoded images except the last. A row whose image raises one of
    `IMAGE_DECODING_ERRORS` is skipped and added to `skipped`. When the iteration ends or is
    closed, one warning reports the count, unless an earlier pass already logged the same summary. Columns and labels are checked when this function is
    called, before any image is read.

    Args:
        dataset: Dataset with an image column (`datasets.Image` or file paths) and an integer label column.
        image_processor: A `transformers` image processor, called as
            `image_processor(images=list_of_pil_images, return_tensors="pt")`.
        batch_size: Number of images per batch.
        image_column: The image column.
        label_column: The label column.
        num_classes: Size of the label space the labels index into (see `check_labels`).
        max_image_side: Downscaling bound passed to `decode_image`.
        skipped: Record that receives the skipped rows, cleared first. Pass one to inspect them afterwards.
        image_transform: Applied to each decoded RGB image before the processor, for example
            `crop_border` for ObjectNet.

    Returns:
        An iterator of `(pixel_values, labels, indices)`: `pixel_values` of shape `(batch_size,
        num_channels, height, width)` from the processor, `labels` of shape `(batch_size,)` (int64),
        and `indices` of shape `(batch_size,)` (int64), the dataset row of each image.

    Raises:
        ValueError: If `batch_size` is not positive, a column is missing, the image column is neither a
            `datasets.Image` nor a string path column, or a label is out of range.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    _check_max_image_side(max_image_side)
    _check_columns(dataset, image_column, label_column)
    check_labels(dataset, num_classes, label_column=label_column)
    storage = _image_storage_dataset(dataset, image_column, label_column)
    if skipped is None:
        skipped = SkippedImages()
    skipped.clear()
    return _generate_batches(
        storage, image_processor, batch_size, image_column, label_column, max_image_side, skipped, image_transform
    )


class ImageBatcher:
    """Reusable iterable over `(pixel_values, labels, indices)` batches of an evaluation dataset.

    Each iteration runs `iter_image_batches` and refills `skipped`, the record of images that could
    not be decoded. See `iter_image_batches` for the arguments, shapes and errors.

    Example:
        ```python
        >>> batcher = ImageBatcher(dataset, processor, batch_size=64, num_classes=projection.num_classes)
        >>> for pixel_values, labels, indices in batcher:
        ...     logits = projection.project(model(pixel_values=pixel_values).logits)
        >>> batcher.skipped.indices
        [17, 512]
        ```
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        image_processor: Any,
        batch_size: int = 32,
        *,
        image_column: str = "image",
        label_column: str = "label",
        num_classes: int | None = None,
        max_image_side: int | None = DEFAULT_MAX_IMAGE_SIDE,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        _check_max_image_side(max_image_side)
        _check_columns(dataset, image_column, label_column)
        check_labels(dataset, num_classes, label_column=label_column)
        self.dataset = dataset
        self.image_processor = image_processor
        self.batch_size = batch_size
        self.image_column = image_column
        self.label_column = label_column
        self.num_classes = num_classes
        self.max_image_side = max_image_side
        self.skipped = SkippedImages()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return iter_image_batches(
            self.dataset,
            self.image_processor,
            self.batch_size,
            image_column=self.image_column,
            label_column=self.label_column,
            num_classes=self.num_classes,
            max_image_side=self.max_image_side,
            skipped=self.skipped,
        )


__all__ = [
    "DEFAULT_MAX_IMAGE_SIDE",
    "IMAGE_DECODING_ERRORS",
    "ImageBatcher",
    "SkippedImage",
    "SkippedImages",
    "check_labels",
    "crop_border",
    "decode_image",
    "iter_image_batches",
    "label_names",
    "load_evaluation_dataset",
    "restrict_to_classes",
]
