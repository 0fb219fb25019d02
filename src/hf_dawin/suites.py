"""Evaluation suites: the ImageNet distribution-shift suite, and label-space matching for any shifted dataset.

A shifted dataset often labels its classes differently from the model. ImageNet-R and ImageNet-A keep 200 of the
1,000 ImageNet classes and name their folders by WordNet id. ImageNet-V2 names its folders by class index, and
ObjectNet groups ImageNet classes into 113 classes of its own. [`projection_for_dataset`] finds the
[`LabelSpaceProjection`] from a dataset's own label names (class indices, WordNet ids or class names).
[`load_imagenet_suite`] builds the evaluation sets of the standard suite: ImageNet as the in-distribution (ID) set
and ImageNet-V2, -R, -A, -Sketch and ObjectNet as distribution shifts (OOD).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import datasets
from PIL import Image
from transformers.utils import logging

from .datasets_io import crop_border, iter_image_batches, label_names, load_evaluation_dataset, restrict_to_classes
from .distributed import dataset_shard_batches
from .evaluation import EvaluationSet
from .label_spaces import (
    NUM_IMAGENET_CLASSES,
    STANDARD_SUITE,
    LabelSpaceProjection,
    objectnet_projection,
    normalize_class_name,
    projection_from_class_names,
    projection_from_wordnet_ids,
    unmatched_class_names,
)


logger = logging.get_logger(__name__)

__all__ = [
    "SUITES",
    "ImageNetSuiteSources",
    "are_wordnet_ids",
    "build_evaluation_set",
    "in_distribution_projection",
    "load_imagenet_suite",
    "model_wordnet_ids",
    "projection_for_dataset",
    "read_wordnet_ids",
    "split_source",
]

SUITES = ("imagenet",)

_WORDNET_ID = re.compile(r"n\d{8}")
_CLASS_INDEX = re.compile(r"\d+")


# ----------------------------------------------------------------------------------------------------------
# Label spaces
# ----------------------------------------------------------------------------------------------------------


def are_wordnet_ids(names: Sequence[str]) -> bool:
    """Return whether every name is a WordNet id such as `n01440764` (and there is at least one)."""
    return bool(names) and all(_WORDNET_ID.fullmatch(name.strip()) for name in names)


def _match_all_names(model_class_names: Sequence[str], label_names: Sequence[str]) -> bool:
    """Return whether every label name is exactly one model class name (ignoring case and surrounding spaces)."""
    counts: dict[str, int] = {}
    for name in model_class_names:
        counts[normalize_class_name(name)] = counts.get(normalize_class_name(name), 0) + 1
    return all(counts.get(normalize_class_name(name)) == 1 for name in label_names)


def _all_class_indices(names: Sequence[str]) -> bool:
    return bool(names) and all(_CLASS_INDEX.fullmatch(name.strip()) for name in names)


def read_wordnet_ids(path: str | Path) -> list[str]:
    """Read one WordNet id (for example `n01440764`) per line, one line per model class in logit order.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If a non-blank line is not a WordNet id (the line number is given).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"WordNet id file {str(path)!r} does not exist.")
    wordnet_ids = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        value = line.strip()
        if not value:
            continue
        if not _WORDNET_ID.fullmatch(value):
            raise ValueError(
                f"{path}, line {line_number}: {value!r} is not a WordNet id ('n' followed by 8 digits, e.g. 'n01440764')."
            )
        wordnet_ids.append(value)
    return wordnet_ids


def model_wordnet_ids(
    model_class_names: Sequence[str],
    *,
    reference_label_names: Sequence[str] | None = None,
    wordnet_ids: Sequence[str] | None = None,
) -> list[str] | None:
    """Find the WordNet id of every model class, or return None when nothing provides them.

    The sources, in order: `wordnet_ids` given by the user, then the model's class names when they are WordNet
    ids, then the label names of the in-distribution dataset (`reference_label_names`) when they are WordNet ids,
    one per model class. The folder names of an ImageNet image folder are such label names.

    Raises:
        ValueError: If `wordnet_ids` does not list one id per model class.
    """
    num_classes = len(model_class_names)
    if wordnet_ids is not None:
        wordnet_ids = list(wordnet_ids)
        if len(wordnet_ids) != num_classes:
            raise ValueError(
                f"Expected one WordNet id per model class ({num_classes}), received {len(wordnet_ids)}."
            )
        return wordnet_ids
    if are_wordnet_ids(model_class_names):
        return [name.strip() for name in model_class_names]
    if reference_label_names is not None and len(reference_label_names) == num_classes:
        if are_wordnet_ids(reference_label_names):
            return [name.strip() for name in reference_label_names]
    return None


def _projection_from_indices(num_model_classes: int, label_names: Sequence[str]) -> LabelSpaceProjection:
    indices = [int(name) for name in label_names]
    out_of_range = sorted(index for index in indices if index >= num_model_classes)
    if out_of_range:
        raise ValueError(
            f"The dataset's label names are class indices, but {out_of_range[:10]} are outside the model's "
            f"{num_model_classes} classes (valid: 0..{num_model_classes - 1})."
        )
    return LabelSpaceProjection(num_model_classes=num_model_classes, indices=indices, class_names=list(label_names))


def projection_for_dataset(
    model_class_names: Sequence[str],
    label_names: Sequence[str],
    *,
    reference_label_names: Sequence[str] | None = None,
    model_wordnet_ids: Sequence[str] | None = None,
) -> LabelSpaceProjection | None:
    """Find how a shifted dataset's labels relate to the model's classes.

    The dataset's label names are read, in order, as:

    1. the model's class names, or the ID dataset's label names (`reference_label_names`): no projection;
    2. decimal class indices (ImageNet-V2 names its folders `0` to `999`, which `imagefolder` sorts as strings):
       each label takes the model class of that index;
    3. WordNet ids (ImageNet-R and -A folders): matched to `model_wordnet_ids`;
    4. class names: matched to the model's class names, then to the reference label names, ignoring case.

    Args:
        model_class_names (`Sequence[str]`): Model class names in logit order.
        label_names (`Sequence[str]`): The dataset's label names in label order (its `ClassLabel` names).
        reference_label_names (`Sequence[str]`, *optional*): Label names of the in-distribution dataset, whose
            labels are the model's classes by position.
        model_wordnet_ids (`Sequence[str]`, *optional*): WordNet id of each model class (see [`model_wordnet_ids`]).

    Returns:
        A [`LabelSpaceProjection`] from model logits `(batch_size, num_model_classes)` to the dataset's labels,
        or None when the dataset's labels are the model's classes in order.

    Raises:
        ValueError: If a label matches no model class, or the labels are WordNet ids and the model's classes
            have none. The message lists the unmatched names and what to pass.
    """
    projection = _match_label_space(model_class_names, label_names, reference_label_names, model_wordnet_ids)
    return None if projection is None or projection.kind == "identity" else projection


def _match_label_space(
    model_class_names: Sequence[str],
    label_names: Sequence[str],
    reference_label_names: Sequence[str] | None,
    model_wordnet_ids: Sequence[str] | None,
) -> LabelSpaceProjection | None:
    model_class_names = list(model_class_names)
    label_names = list(label_names)
    num_model_classes = len(model_class_names)
    if label_names == model_class_names:
        return None
    # Names that are all model classes are matched by name, whatever their order. Only other names may take
    # the model classes by position through the in-distribution dataset.
    if _match_all_names(model_class_names, label_names):
        return projection_from_class_names(model_class_names, label_names)
    if reference_label_names is not None and label_names == list(reference_label_names):
        if len(reference_label_names) != num_model_classes:
            raise ValueError(
                f"The reference label names list {len(reference_label_names)} classes, but the model has "
                f"{num_model_classes}; they must correspond by position."
            )
        return None

    if _all_class_indices(label_names) and not _all_class_indices(model_class_names):
        return _projection_from_indices(num_model_classes, label_names)

    if are_wordnet_ids(label_names):
        if model_wordnet_ids is None:
            raise ValueError(
                "The dataset's labels are WordNet ids (for example "
                f"{label_names[0]!r}), but the model's classes have none. Evaluate with an in-distribution image "
                "folder named by WordNet id (the ImageNet layout), or pass one WordNet id per model class "
                "(hf-dawin evaluate --wordnet-ids FILE)."
            )
        return projection_from_wordnet_ids(
            [wordnet_id.strip() for wordnet_id in model_wordnet_ids], [name.strip() for name in label_names]
        )

    try:
        return projection_from_class_names(model_class_names, label_names)
    except ValueError as model_error:
        if reference_label_names is None or list(reference_label_names) == model_class_names:
            raise
        if len(reference_label_names) != num_model_classes:
            raise
        try:
            projection = projection_from_class_names(list(reference_label_names), label_names)
        except ValueError as reference_error:
            raise ValueError(
                f"The dataset's label names match neither the model's class names nor the in-distribution "
                f"dataset's label names. Against the model: {model_error} Against the in-distribution dataset: "
                f"{reference_error}"
            ) from None
        logger.info("Matched the dataset's labels to the in-distribution dataset's label names.")
        return projection


def in_distribution_projection(
    model_class_names: Sequence[str],
    label_names: Sequence[str],
    *,
    model_wordnet_ids: Sequence[str] | None = None,
) -> LabelSpaceProjection | None:
    """Find how the in-distribution dataset's labels relate to the model's classes.

    Label names that are all model class names (ignoring case) are matched by name, in any order. Otherwise,
    with as many labels as model classes, label `i` is model class `i` (an ImageNet folder named by WordNet id
    beside readable class names, for example), unless the labels are class indices in string order. A dataset
    with fewer labels is matched like a shifted one ([`projection_for_dataset`]).
    """
    model_class_names = list(model_class_names)
    label_names = list(label_names)
    if label_names == model_class_names:
        return None
    if _match_all_names(model_class_names, label_names):
        projection = projection_from_class_names(model_class_names, label_names)
        if projection.kind != "identity":
            logger.info("The in-distribution dataset's labels are the model's classes in another order; matched by name.")
        return None if projection.kind == "identity" else projection
    if _all_class_indices(label_names) and not _all_class_indices(model_class_names):
        projection = _projection_from_indices(len(model_class_names), label_names)
        return None if projection.kind == "identity" else projection
    if len(label_names) == len(model_class_names):
        _check_position_match(model_class_names, label_names)
        return None
    return projection_for_dataset(model_class_names, label_names, model_wordnet_ids=model_wordnet_ids)


def _check_position_match(model_class_names: list[str], label_names: list[str]) -> None:
    """Accept label `i` as model class `i`, unless a label names a model class at another position.

    Such a label shows that the names were meant to match, so matching by position would score wrong classes.
    """
    positions = {normalize_class_name(name): index for index, name in enumerate(model_class_names)}
    moved = [
        (index, name, positions[normalize_class_name(name)])
        for index, name in enumerate(label_names)
        if positions.get(normalize_class_name(name), index) != index
    ]
    if moved:
        index, name, position = moved[0]
        unmatched = unmatched_class_names(model_class_names, label_names)
        raise ValueError(
            f"The in-distribution dataset's labels name model classes, but not all of them: label {index} {name!r} "
            f"is model class {position}, while {unmatched[:10]} are not model class names. Matching by position "
            "would score the wrong classes. Make every label name a class name (ignoring case), for example by "
            "renaming the image folders or the lines of --class-names."
        )
    differing = [(label, name) for label, name in zip(label_names, model_class_names) if label != name]
    message = (
        "The in-distribution dataset's label names differ from the model's class names, so label i is taken as "
        "model class i: " + ", ".join(f"{label!r} as {name!r}" for label, name in differing[:5])
        + (", ..." if len(differing) > 5 else "") + "."
    )
    if are_wordnet_ids(label_names):
        # ImageNet folders named by WordNet id beside readable class names: the usual layout.
        logger.info(message)
    else:
        logger.warning(message)


# ----------------------------------------------------------------------------------------------------------
# Evaluation sets
# ----------------------------------------------------------------------------------------------------------


def build_evaluation_set(
    name: str,
    dataset: datasets.Dataset,
    image_processor,
    *,
    num_model_classes: int,
    batch_size: int = 32,
    image_column: str = "image",
    label_column: str = "label",
    in_distribution: bool = False,
    projection: LabelSpaceProjection | None = None,
    image_transform: Callable[[Image.Image], Image.Image] | None = None,
) -> EvaluationSet:
    """Wrap a dataset as an [`EvaluationSet`] whose batches skip unreadable images.

    Labels are checked against the set's label space (the projection's classes, else the model's) before any
    image is read. In a multi-process run each process reads only its block of batches. The first pass logs how
    many images it skipped, and the evaluation reports them as `num_skipped`. `image_transform` is applied to each
    decoded image before the processor.

    Raises:
        ValueError: If a column is missing (the dataset's columns are listed) or a label is out of range.
    """
    num_classes = projection.num_classes if projection is not None else num_model_classes

    def make_batches(subset: datasets.Dataset):
        return iter_image_batches(
            subset,
            image_processor,
            batch_size,
            image_column=image_column,
            label_column=label_column,
            num_classes=num_classes,
            image_transform=image_transform,
        )

    # Check columns and labels now, so a bad dataset fails before the first endpoint pass.
    make_batches(dataset).close()
    return EvaluationSet(
        name=name,
        batches=lambda: make_batches(dataset),
        num_examples=len(dataset),
        in_distribution=in_distribution,
        projection=projection,
        shard_batches=dataset_shard_batches(make_batches, dataset, batch_size),
    )


def split_source(value: str) -> tuple[str, str | None]:
    """Split `SOURCE:SPLIT` (for example `ILSVRC/imagenet-1k:validation`) into the source and the split.

    An existing local path and a Windows drive letter (`C:`) are never split. A local path that contains `:`
    itself is split after the longest prefix that exists, and any other source at its first `:`, because Hub ids
    contain none and split expressions such as `validation[:100]` may.

    Raises:
        ValueError: If the split after the `:` is empty.
    """
    if os.path.exists(value):
        return value, None
    start = 2 if len(value) > 1 and value[1] == ":" else 0
    positions = [index for index in range(start, len(value)) if value[index] == ":" and index > 0]
    if not positions:
        return value, None
    existing = [index for index in positions if os.path.exists(value[:index])]
    position = existing[-1] if existing else positions[0]
    if position == len(value) - 1:
        raise ValueError(
            f"{value!r} ends with ':' but names no split after it. Append the split, as in SOURCE:validation, or "
            "drop the ':'."
        )
    return value[:position], value[position + 1 :]


@dataclass
class ImageNetSuiteSources:
    """Locations of the ImageNet suite's datasets: Hub ids or local folders, each optionally `SOURCE:SPLIT`.

    Attributes:
        imagenet (`str`): ImageNet validation set, the in-distribution set.
        imagenet_v2 (`str`, *optional*): ImageNet-V2 (folders named by class index, or a Hub dataset).
        imagenet_r (`str`, *optional*): ImageNet-R (200 classes, folders named by WordNet id).
        imagenet_a (`str`, *optional*): ImageNet-A (200 classes, folders named by WordNet id).
        imagenet_sketch (`str`, *optional*): ImageNet-Sketch.
        objectnet (`str`, *optional*): ObjectNet images: the `images/` folder, or the download's root folder
            holding `images/` and `mappings/`.
        objectnet_mappings (`str`, *optional*): ObjectNet `mappings/` folder; defaults to `mappings/` beside
            the images.
    """

    imagenet: str
    imagenet_v2: str | None = None
    imagenet_r: str | None = None
    imagenet_a: str | None = None
    imagenet_sketch: str | None = None
    objectnet: str | None = None
    objectnet_mappings: str | None = None

    def shift_names(self) -> list[str]:
        """Names of the given shifted sets, in the order of the standard suite."""
        given = {field.name for field in fields(self) if getattr(self, field.name) is not None}
        return [name for name in STANDARD_SUITE if name != "imagenet" and name in given]


def _objectnet_folders(source: str, mappings: str | None) -> tuple[str, Path]:
    root = Path(source)
    images = root / "images" if (root / "images").is_dir() else root
    if mappings is not None:
        return str(images), Path(mappings)
    for candidate in (root / "mappings", images.parent / "mappings"):
        if candidate.is_dir():
            return str(images), candidate
    raise ValueError(
        f"No ObjectNet mappings folder was found beside {source!r}. Pass --objectnet-mappings with the "
        "`mappings/` folder of the ObjectNet download."
    )


def _objectnet_label_space(
    mappings: Path,
    model_class_names: Sequence[str],
    reference_label_names: Sequence[str],
    wordnet_ids: Sequence[str] | None,
) -> LabelSpaceProjection:
    """Build the ObjectNet projection with the first description of the model's classes that fits the tables."""
    attempts = []
    if wordnet_ids is not None and len(wordnet_ids) == NUM_IMAGENET_CLASSES:
        attempts.append(("the model's WordNet ids", {"model_wnids": list(wordnet_ids)}))
    attempts.append(("the in-distribution label names", {"model_class_names": list(reference_label_names)}))
    attempts.append(("the model's class names", {"model_class_names": list(model_class_names)}))
    if len(model_class_names) == NUM_IMAGENET_CLASSES:
        attempts.append(("the standard ImageNet class order", {}))
    errors = []
    for description, keywords in attempts:
        try:
            projection = objectnet_projection(mappings, **keywords)
        except ValueError as error:
            errors.append(f"with {description}: {error}")
            continue
        if projection.num_model_classes != len(model_class_names):
            errors.append(f"with {description}: it covers {projection.num_model_classes} model classes")
            continue
        logger.info("ObjectNet classes matched to the model's classes with %s.", description)
        return projection
    raise ValueError(
        "The ObjectNet classes could not be matched to the model's classes. " + " ".join(errors) + " Use ImageNet "
        "descriptions as in the mappings' imagenet_to_label_2012_v2 as class names, an ImageNet folder named by "
        "WordNet id, or --wordnet-ids FILE."
    )


def load_imagenet_suite(
    sources: ImageNetSuiteSources,
    *,
    model_class_names: Sequence[str],
    image_processor,
    batch_size: int = 32,
    split: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    max_examples: int | None = None,
    seed: int | None = 0,
    wordnet_ids: Sequence[str] | None = None,
    cache_dir: str | None = None,
) -> list[EvaluationSet]:
    """Load the ImageNet suite: ImageNet as the in-distribution set and each given shift with its label space.

    ImageNet-R and ImageNet-A are matched by WordNet id (their folder names) or by name, which yields their
    200-class subsets. ImageNet-V2 is matched by class index or name. ObjectNet is matched through its
    `mappings/` tables, and each of its 113 classes takes the maximum logit over its ImageNet classes; its
    images lose a 2-pixel border (see `crop_border`).
    Entropies, coefficients and accuracy of each set are then computed in its own label space.

    Args:
        sources ([`ImageNetSuiteSources`]): The datasets.
        model_class_names (`Sequence[str]`): Model class names in logit order.
        image_processor: The model's image processor.
        batch_size (`int`, *optional*, defaults to 32): Images per batch.
        split (`str`, *optional*): Split for sources without a `:SPLIT` suffix.
        image_column (`str`, *optional*, defaults to `"image"`): Image column of every dataset.
        label_column (`str`, *optional*, defaults to `"label"`): Label column of every dataset.
        max_examples (`int`, *optional*): Evaluate a random sample of at most this many images per set.
        seed (`int`, *optional*, defaults to 0): Seed of that sample.
        wordnet_ids (`Sequence[str]`, *optional*): WordNet id of each model class, when neither the class names
            nor the ImageNet folder names are WordNet ids.
        cache_dir (`str`, *optional*): Cache directory of `datasets`.

    Returns:
        `list[EvaluationSet]`: ImageNet first, then the shifts in the order of `STANDARD_SUITE`.

    Raises:
        ValueError: If a dataset's labels cannot be matched to the model's classes, or a column is missing.
        FileNotFoundError: If a local folder or the ObjectNet mappings do not exist.
    """
    model_class_names = list(model_class_names)
    num_model_classes = len(model_class_names)

    def load(value: str, *, sample: bool = True) -> datasets.Dataset:
        source, source_split = split_source(value)
        return load_evaluation_dataset(
            source,
            split=source_split or split,
            image_column=image_column,
            label_column=label_column,
            max_examples=max_examples if sample else None,
            seed=seed,
            cache_dir=cache_dir,
        )

    def evaluation_set(name, dataset, *, in_distribution, projection, image_transform=None):
        return build_evaluation_set(
            name,
            dataset,
            image_processor,
            num_model_classes=num_model_classes,
            batch_size=batch_size,
            image_column=image_column,
            label_column=label_column,
            in_distribution=in_distribution,
            projection=projection,
            image_transform=image_transform,
        )

    imagenet = load(sources.imagenet)
    reference_names = label_names(imagenet, label_column)
    wordnet_ids = model_wordnet_ids(model_class_names, reference_label_names=reference_names, wordnet_ids=wordnet_ids)
    sets = [
        evaluation_set(
            "imagenet",
            imagenet,
            in_distribution=True,
            projection=in_distribution_projection(model_class_names, reference_names, model_wordnet_ids=wordnet_ids),
        )
    ]

    for name in sources.shift_names():
        if name == "objectnet":
            images, mappings = _objectnet_folders(sources.objectnet, sources.objectnet_mappings)
            projection = _objectnet_label_space(mappings, model_class_names, reference_names, wordnet_ids)
            # Sample after dropping the unmapped classes, so that max_examples counts evaluated images.
            dataset = restrict_to_classes(load(images, sample=False), projection.class_names, label_column=label_column)
            if max_examples is not None and max_examples < len(dataset):
                dataset = dataset.shuffle(seed=seed).select(range(max_examples))
        else:
            dataset = load(getattr(sources, name))
            projection = projection_for_dataset(
                model_class_names,
                label_names(dataset, label_column),
                reference_label_names=reference_names,
                model_wordnet_ids=wordnet_ids,
            )
        expected = STANDARD_SUITE[name].num_classes
        num_classes = projection.num_classes if projection is not None else num_model_classes
        if num_model_classes == NUM_IMAGENET_CLASSES and num_classes != expected:
            logger.warning(
                "%s has %d classes after matching, but the standard release has %d. Check that the whole dataset "
                "was given.",
                name,
                num_classes,
                expected,
            )
        logger.info("%s: %d images in %d classes.", name, len(dataset), num_classes)
        # ObjectNet images have a thin red frame, cropped away before preprocessing.
        transform = crop_border if name == "objectnet" else None
        sets.append(evaluation_set(name, dataset, in_distribution=False, projection=projection, image_transform=transform))
    return sets
