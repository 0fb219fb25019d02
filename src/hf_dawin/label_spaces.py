"""Projections from a model's class space to the label space of an evaluation set.

A distribution-shift benchmark often labels fewer classes than the model predicts. ImageNet-R and
ImageNet-A keep 200 of the 1,000 ImageNet classes, and ObjectNet scores 113 classes, each of which
covers one or more ImageNet classes. DaWin computes entropies, coefficients and accuracy after this
projection, so the projection is an explicit, serialisable object.

Nothing ImageNet-specific ships with the package. The builders derive a projection from the user's
data: the label names or WordNet ids of the shift dataset, or the `mappings/` folder of an ObjectNet
download.
"""

import dataclasses
import json
import operator
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

ProjectionKind = Literal["identity", "subset", "groups"]

# File names inside the `mappings/` folder of the ObjectNet 1.0 release.
OBJECTNET_TO_IMAGENET_FILE = "objectnet_to_imagenet_1k.json"
OBJECTNET_PYTORCH_TO_2012_ID_FILE = "pytorch_to_imagenet_2012_id.json"
OBJECTNET_FOLDER_TO_LABEL_FILE = "folder_to_objectnet_label.json"
OBJECTNET_IMAGENET_LABELS_FILE = "imagenet_to_label_2012_v2"
NUM_IMAGENET_CLASSES = 1000

_WORDNET_ID_PATTERN = re.compile(r"n\d{8}")
_MAX_LISTED_NAMES = 20


@dataclasses.dataclass(frozen=True)
class SuiteDataset:
    """Description of one evaluation set of the standard ImageNet robustness suite.

    Attributes:
        name: Short identifier, e.g. `"imagenet_r"`.
        role: `"in_distribution"` (ID) or `"distribution_shift"` (OOD).
        projection: How model logits reach the dataset's label space: `"identity"` (all 1,000
            classes), `"subset"` (a class subset) or `"groups"` (max over class groups).
        num_classes: Number of classes in the dataset's label space.
        builder: The function of this module that builds the projection from the user's data.
    """

    name: str
    role: Literal["in_distribution", "distribution_shift"]
    projection: ProjectionKind
    num_classes: int
    builder: str


# The ImageNet suite of robust fine-tuning papers: ImageNet as ID, five shifts as OOD. The
# ImageNet-R and ImageNet-A subsets come from the WordNet ids (the folder names of both releases)
# or class names of the dataset, matched against the model's classes.
STANDARD_SUITE: dict[str, SuiteDataset] = {
    "imagenet": SuiteDataset("imagenet", "in_distribution", "identity", 1000, "LabelSpaceProjection.identity"),
    "imagenet_v2": SuiteDataset("imagenet_v2", "distribution_shift", "identity", 1000, "LabelSpaceProjection.identity"),
    "imagenet_r": SuiteDataset("imagenet_r", "distribution_shift", "subset", 200, "projection_from_wordnet_ids"),
    "imagenet_a": SuiteDataset("imagenet_a", "distribution_shift", "subset", 200, "projection_from_wordnet_ids"),
    "imagenet_sketch": SuiteDataset(
        "imagenet_sketch", "distribution_shift", "identity", 1000, "LabelSpaceProjection.identity"
    ),
    "objectnet": SuiteDataset("objectnet", "distribution_shift", "groups", 113, "objectnet_projection"),
}


def _as_index(value: Any, argument: str) -> int:
    """Convert an integer-like value (int, NumPy or 0-d tensor integer) to `int`, rejecting bools."""
    if isinstance(value, bool):
        raise TypeError(f"{argument} must be an integer class index, got the bool {value!r}.")
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        return int(value.item())
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{argument} must be an integer class index, got {value!r} of type {type(value).__name__}."
        ) from None


def _to_list(value: Any) -> Any:
    """Turn a tensor or NumPy array into a (nested) list, and pass other values through."""
    if getattr(value, "ndim", 0) > 0 and hasattr(value, "tolist"):
        return value.tolist()
    return value


def _format_names(names: Sequence[str]) -> str:
    text = ", ".join(repr(name) for name in names[:_MAX_LISTED_NAMES])
    if len(names) > _MAX_LISTED_NAMES:
        text += f", ... ({len(names) - _MAX_LISTED_NAMES} more)"
    return text


def normalize_class_name(name: str) -> str:
    """Return the form in which class names are compared: surrounding spaces stripped, case folded."""
    return name.strip().casefold()


def unmatched_class_names(class_names: Sequence[str], names: Sequence[str]) -> list[str]:
    """Return the entries of `names` that match no entry of `class_names`, compared with [`normalize_class_name`]."""
    known = {normalize_class_name(name) for name in class_names}
    return [name for name in names if normalize_class_name(name) not in known]


def _check_names(names: Any, argument: str) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"{argument} must be a sequence of strings, got {type(names).__name__}.")
    for position, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"{argument}[{position}] must be a string, got {name!r} of type {type(name).__name__}.")
    if len(names) == 0:
        raise ValueError(f"{argument} is empty. Expected at least one class name.")
    return list(names)


@dataclasses.dataclass(frozen=True)
class LabelSpaceProjection:
    """Map logits over a model's classes to the label space of an evaluation set.

    Exactly one of `indices` and `groups` is set. With `indices`, evaluation class `i` takes the
    logit of model class `indices[i]` (a class subset such as the 200 ImageNet-R classes). With
    `groups`, evaluation class `i` takes the maximum logit over the model classes in `groups[i]`
    (such as the 113 ObjectNet classes, each covering one or more ImageNet classes).

    Attributes:
        num_model_classes: Number of classes the model predicts.
        indices: Model class index of each evaluation class, without duplicates.
        groups: Non-empty tuple of model class indices for each evaluation class. Groups may share
            indices, but a group lists each index once.
        class_names: Optional name of each evaluation class, in evaluation label order.

    Example:
        ```python
        >>> import torch
        >>> projection = LabelSpaceProjection(num_model_classes=4, groups=[[0, 2], [3]])
        >>> projection.project(torch.tensor([[1.0, 5.0, 2.0, 0.5]]))
        tensor([[2.0000, 0.5000]])
        ```
    """

    num_model_classes: int
    indices: tuple[int, ...] | None = None
    groups: tuple[tuple[int, ...], ...] | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        num_model_classes = _as_index(self.num_model_classes, "num_model_classes")
        if num_model_classes < 1:
            raise ValueError(f"num_model_classes must be at least 1, got {num_model_classes}.")
        object.__setattr__(self, "num_model_classes", num_model_classes)

        if (self.indices is None) == (self.groups is None):
            raise ValueError(
                "Pass exactly one of `indices` (a class subset) or `groups` (max over class groups), but "
                f"got indices={'set' if self.indices is not None else None}, "
                f"groups={'set' if self.groups is not None else None}."
            )
        if self.indices is not None:
            object.__setattr__(self, "indices", self._validate_indices(self.indices))
        else:
            object.__setattr__(self, "groups", self._validate_groups(self.groups))

        if self.class_names is not None:
            class_names = tuple(_check_names(self.class_names, "class_names"))
            if len(class_names) != self.num_classes:
                raise ValueError(
                    f"class_names has {len(class_names)} entries but the projection has "
                    f"{self.num_classes} evaluation classes. Pass one name per evaluation class."
                )
            object.__setattr__(self, "class_names", class_names)

    def _check_range(self, index: int, argument: str) -> None:
        if not 0 <= index < self.num_model_classes:
            raise ValueError(
                f"{argument} is {index}, outside the model's class range [0, {self.num_model_classes - 1}]."
            )

    def _validate_indices(self, indices: Any) -> tuple[int, ...]:
        indices = _to_list(indices)
        if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence):
            raise TypeError(f"indices must be a sequence of integers, got {type(indices).__name__}.")
        if len(indices) == 0:
            raise ValueError("indices is empty, but a projection needs at least one evaluation class.")
        checked = tuple(_as_index(value, f"indices[{position}]") for position, value in enumerate(indices))
        for position, index in enumerate(checked):
            self._check_range(index, f"indices[{position}]")
        seen: dict[int, int] = {}
        duplicates = []
        for position, index in enumerate(checked):
            if index in seen:
                duplicates.append(f"{index} (positions {seen[index]} and {position})")
            seen.setdefault(index, position)
        if duplicates:
            raise ValueError(
                "indices contains duplicate model classes: " + ", ".join(duplicates) + ". "
                "A subset lists each model class once. Use `groups` to share classes."
            )
        return checked

    def _validate_groups(self, groups: Any) -> tuple[tuple[int, ...], ...]:
        groups = _to_list(groups)
        if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
            raise TypeError(f"groups must be a sequence of index sequences, got {type(groups).__name__}.")
        if len(groups) == 0:
            raise ValueError("groups is empty, but a projection needs at least one evaluation class.")
        checked_groups = []
        for group_position, group in enumerate(groups):
            group = _to_list(group)
            if isinstance(group, (str, bytes)) or not isinstance(group, Sequence):
                raise TypeError(
                    f"groups[{group_position}] must be a sequence of integers, got {type(group).__name__}."
                )
            if len(group) == 0:
                raise ValueError(
                    f"groups[{group_position}] is empty, but every evaluation class needs at least one model class."
                )
            checked = tuple(
                _as_index(value, f"groups[{group_position}][{position}]") for position, value in enumerate(group)
            )
            for position, index in enumerate(checked):
                self._check_range(index, f"groups[{group_position}][{position}]")
            if len(set(checked)) != len(checked):
                raise ValueError(f"groups[{group_position}] lists a model class more than once: {list(checked)}.")
            checked_groups.append(checked)
        return tuple(checked_groups)

    @classmethod
    def identity(cls, num_classes: int, class_names: Sequence[str] | None = None) -> "LabelSpaceProjection":
        """Build the projection that keeps all `num_classes` model classes in order."""
        num_classes = _as_index(num_classes, "num_classes")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
        return cls(num_model_classes=num_classes, indices=tuple(range(num_classes)), class_names=class_names)

    @property
    def num_classes(self) -> int:
        """Number of evaluation classes."""
        return len(self.indices) if self.indices is not None else len(self.groups)

    @property
    def kind(self) -> ProjectionKind:
        """`"identity"`, `"subset"` or `"groups"`."""
        if self.groups is not None:
            return "groups"
        if self.indices == tuple(range(self.num_model_classes)):
            return "identity"
        return "subset"

    def project(self, logits: torch.Tensor) -> torch.Tensor:
        """Project model logits to the evaluation label space.

        Args:
            logits (`torch.Tensor` of shape `(batch_size, num_model_classes)`):
                Model logits. Any number of leading dimensions is accepted.

        Returns:
            `torch.Tensor` of shape `(batch_size, num_classes)`, same dtype and device. Subsets
            select columns and groups take the maximum over their columns, so gradients flow to
            the selected (for groups, the maximal) logits.
        """
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}.")
        if logits.ndim < 1 or logits.shape[-1] != self.num_model_classes:
            raise ValueError(
                f"Expected logits of shape (batch_size, {self.num_model_classes}), got {tuple(logits.shape)}."
            )
        if self.kind == "identity":
            return logits
        if self.indices is not None:
            index = torch.tensor(self.indices, dtype=torch.long, device=logits.device)
            return logits.index_select(-1, index)

        # Pad every group to the largest size by repeating its first index, which leaves the max
        # unchanged, so one gather and one amax handle all groups at once.
        width = max(len(group) for group in self.groups)
        padded = [list(group) + [group[0]] * (width - len(group)) for group in self.groups]
        index = torch.tensor(padded, dtype=torch.long, device=logits.device)
        gathered = logits[..., index]  # (..., num_classes, width)
        return gathered.amax(dim=-1)

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a JSON-compatible dictionary that `from_dict` reads back."""
        data: dict[str, Any] = {"num_model_classes": self.num_model_classes}
        if self.indices is not None:
            data["indices"] = list(self.indices)
        else:
            data["groups"] = [list(group) for group in self.groups]
        if self.class_names is not None:
            data["class_names"] = list(self.class_names)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LabelSpaceProjection":
        """Build a projection from the output of `to_dict`, validating every field."""
        if not isinstance(data, Mapping):
            raise TypeError(f"Expected a mapping produced by LabelSpaceProjection.to_dict, got {type(data).__name__}.")
        allowed = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"Unknown projection keys {unknown}. Expected keys among {sorted(allowed)}.")
        if "num_model_classes" not in data:
            raise ValueError("The projection dictionary is missing the required key 'num_model_classes'.")
        return cls(**data)


def projection_from_class_names(
    model_class_names: Sequence[str], eval_class_names: Sequence[str]
) -> LabelSpaceProjection:
    """Build a subset projection by matching evaluation class names to model class names.

    Names match exactly after stripping surrounding whitespace and ignoring case.

    Args:
        model_class_names: Name of each model class, in model logit order.
        eval_class_names: Name of each evaluation class, in evaluation label order (for a
            `datasets` dataset, the names of its `ClassLabel` feature).

    Returns:
        A `LabelSpaceProjection` with `indices` and the evaluation class names.

    Raises:
        ValueError: If an evaluation name matches no model class (all such names are listed), or
            matches several model classes.
    """
    model_class_names = _check_names(model_class_names, "model_class_names")
    eval_class_names = _check_names(eval_class_names, "eval_class_names")

    positions: dict[str, list[int]] = {}
    for index, name in enumerate(model_class_names):
        positions.setdefault(normalize_class_name(name), []).append(index)

    missing = unmatched_class_names(model_class_names, eval_class_names)
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(eval_class_names)} evaluation class names were not found among the "
            f"{len(model_class_names)} model class names (exact match, case-insensitive): {_format_names(missing)}. "
            "Rename the classes so both sides agree, or match by WordNet id: projection_from_wordnet_ids in Python, "
            "--wordnet-ids FILE with hf-dawin evaluate."
        )
    ambiguous = {
        name: positions[normalize_class_name(name)]
        for name in eval_class_names
        if len(positions[normalize_class_name(name)]) > 1
    }
    if ambiguous:
        described = ", ".join(f"{name!r} (model classes {indices})" for name, indices in ambiguous.items())
        raise ValueError(
            f"Evaluation class names match more than one model class: {described}. "
            "Match by WordNet id (projection_from_wordnet_ids in Python, --wordnet-ids FILE with hf-dawin evaluate), "
            "or give the model classes distinct names."
        )

    indices = [positions[normalize_class_name(name)][0] for name in eval_class_names]
    return LabelSpaceProjection(
        num_model_classes=len(model_class_names), indices=indices, class_names=eval_class_names
    )


def _check_wordnet_ids(wnids: Any, argument: str) -> list[str]:
    wnids = _check_names(wnids, argument)
    invalid = [wnid for wnid in wnids if not _WORDNET_ID_PATTERN.fullmatch(wnid)]
    if invalid:
        raise ValueError(
            f"{argument} contains values that are not WordNet ids of the form 'n' followed by 8 digits "
            f"(e.g. 'n01440764'): {_format_names(invalid)}."
        )
    return wnids


def projection_from_wordnet_ids(
    model_wnids: Sequence[str],
    eval_wnids: Sequence[str],
    *,
    eval_class_names: Sequence[str] | None = None,
) -> LabelSpaceProjection:
    """Build a subset projection by matching WordNet ids (e.g. `"n01440764"`).

    The ImageNet-R and ImageNet-A releases name their class folders by WordNet id, so an
    `imagefolder` load of either gives `eval_wnids` as its label names.

    Args:
        model_wnids: WordNet id of each model class, in model logit order, without duplicates.
        eval_wnids: WordNet id of each evaluation class, in evaluation label order.
        eval_class_names: Optional readable names stored on the projection. Defaults to `eval_wnids`.

    Returns:
        A `LabelSpaceProjection` with `indices`.

    Raises:
        ValueError: If an id is malformed, duplicated among the model classes, or missing from them.
    """
    model_wnids = _check_wordnet_ids(model_wnids, "model_wnids")
    eval_wnids = _check_wordnet_ids(eval_wnids, "eval_wnids")
    duplicated = sorted(wnid for wnid, count in Counter(model_wnids).items() if count > 1)
    if duplicated:
        raise ValueError(f"model_wnids lists these WordNet ids more than once: {_format_names(duplicated)}.")

    position = {wnid: index for index, wnid in enumerate(model_wnids)}
    missing = [wnid for wnid in eval_wnids if wnid not in position]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(eval_wnids)} evaluation WordNet ids are not model classes: "
            f"{_format_names(missing)}. Check that the model covers the dataset's classes."
        )
    return LabelSpaceProjection(
        num_model_classes=len(model_wnids),
        indices=[position[wnid] for wnid in eval_wnids],
        class_names=eval_class_names if eval_class_names is not None else eval_wnids,
    )


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(
            f"ObjectNet mapping file {path} does not exist. Pass the `mappings/` folder of the ObjectNet download."
        )
    with path.open(encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"ObjectNet mapping file {path} is not valid JSON: {error}.") from None


def _read_objectnet_tables(mappings_dir: Path) -> tuple[dict, dict, dict, list[str]]:
    """Read and type-check the four ObjectNet mapping tables."""
    objectnet_to_imagenet = _read_json(mappings_dir / OBJECTNET_TO_IMAGENET_FILE)
    pytorch_to_2012_id = _read_json(mappings_dir / OBJECTNET_PYTORCH_TO_2012_ID_FILE)
    folder_to_label = _read_json(mappings_dir / OBJECTNET_FOLDER_TO_LABEL_FILE)
    labels_path = mappings_dir / OBJECTNET_IMAGENET_LABELS_FILE
    if not labels_path.is_file():
        raise FileNotFoundError(
            f"ObjectNet mapping file {labels_path} does not exist. Pass the `mappings/` folder of the ObjectNet download."
        )
    imagenet_descriptions = [line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines()]
    while imagenet_descriptions and not imagenet_descriptions[-1]:
        imagenet_descriptions.pop()

    for name, table in (
        (OBJECTNET_TO_IMAGENET_FILE, objectnet_to_imagenet),
        (OBJECTNET_PYTORCH_TO_2012_ID_FILE, pytorch_to_2012_id),
        (OBJECTNET_FOLDER_TO_LABEL_FILE, folder_to_label),
    ):
        if not isinstance(table, dict):
            raise ValueError(f"ObjectNet mapping file {mappings_dir / name} must contain a JSON object.")
    if len(imagenet_descriptions) != NUM_IMAGENET_CLASSES:
        raise ValueError(
            f"{labels_path} has {len(imagenet_descriptions)} lines, but it must list one ImageNet class description "
            f"per line for all {NUM_IMAGENET_CLASSES} classes."
        )
    return objectnet_to_imagenet, pytorch_to_2012_id, folder_to_label, imagenet_descriptions


def _standard_index_by_2012_id(pytorch_to_2012_id: dict, path: Path) -> dict[int, int]:
    """Invert the PyTorch-index -> 2012-id table, checking it is a permutation of 0..999."""
    try:
        pairs = {int(key): int(value) for key, value in pytorch_to_2012_id.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{path} must map integer strings to integers.") from None
    expected = set(range(NUM_IMAGENET_CLASSES))
    if set(pairs) != expected or set(pairs.values()) != expected:
        raise ValueError(
            f"{path} must map each index 0..{NUM_IMAGENET_CLASSES - 1} to a distinct 2012 id in the same range."
        )
    return {value: key for key, value in pairs.items()}


def objectnet_projection(
    mappings_dir: str | Path,
    *,
    model_class_names: Sequence[str] | None = None,
    model_wnids: Sequence[str] | None = None,
) -> LabelSpaceProjection:
    """Build the ObjectNet projection from the `mappings/` folder of an ObjectNet download.

    Each ObjectNet class that maps to ImageNet becomes one evaluation class whose logit is the
    maximum over the logits of its ImageNet classes (113 classes in ObjectNet 1.0). The tables
    map an ObjectNet class name to `"; "`-separated ImageNet class descriptions. A description's
    line number in `imagenet_to_label_2012_v2` is its ILSVRC-2012 id, and
    `pytorch_to_imagenet_2012_id.json` links that id to the standard ImageNet class index. The
    standard order sorts the WordNet ids, as torchvision and CLIP's ImageNet class list do.

    Evaluation classes are the image folder names of the mapped classes, sorted, which is the label
    order `datasets`' `imagefolder` assigns. Restrict an ObjectNet `imagefolder` dataset to them
    with `hf_dawin.datasets_io.restrict_to_classes(dataset, projection.class_names)`.

    Args:
        mappings_dir: The ObjectNet `mappings/` folder with `objectnet_to_imagenet_1k.json`,
            `pytorch_to_imagenet_2012_id.json`, `folder_to_objectnet_label.json` and
            `imagenet_to_label_2012_v2`.
        model_class_names: Model class names that are ImageNet descriptions as written in
            `imagenet_to_label_2012_v2` (e.g. `"tench, Tinca tinca"`, the `id2label` of many Hub
            ImageNet classifiers), matched case-insensitively. Leave both this and `model_wnids`
            unset when the model predicts the 1,000 ImageNet classes in the standard order.
        model_wnids: WordNet ids of the model's classes in logit order. They must be exactly 1,000
            distinct ids, taken to be the ImageNet-1k classes, whose sorted order is the standard one.

    Returns:
        A `LabelSpaceProjection` with `groups` and the folder names as `class_names`.

    Raises:
        FileNotFoundError: If a mapping file is missing.
        ValueError: If a table is malformed or a needed ImageNet class is not among the model's classes.
    """
    if model_class_names is not None and model_wnids is not None:
        raise ValueError("Pass at most one of model_class_names and model_wnids.")
    mappings_dir = Path(mappings_dir)
    if not mappings_dir.is_dir():
        raise FileNotFoundError(
            f"ObjectNet mappings folder {mappings_dir} does not exist. Pass the `mappings/` folder of the ObjectNet download."
        )
    objectnet_to_imagenet, pytorch_to_2012_id, folder_to_label, descriptions = _read_objectnet_tables(mappings_dir)

    # Each ImageNet description -> ILSVRC-2012 id (its line number). A few descriptions (e.g. "crane")
    # name two classes, which is an error only if an ObjectNet class needs them.
    description_ids: dict[str, list[int]] = {}
    for line_number, description in enumerate(descriptions):
        description_ids.setdefault(description, []).append(line_number)

    # ILSVRC-2012 id -> model class index.
    standard_index = _standard_index_by_2012_id(pytorch_to_2012_id, mappings_dir / OBJECTNET_PYTORCH_TO_2012_ID_FILE)
    if model_class_names is not None:
        model_class_names = _check_names(model_class_names, "model_class_names")
        num_model_classes = len(model_class_names)
        model_positions: dict[str, list[int]] = {}
        for index, name in enumerate(model_class_names):
            model_positions.setdefault(normalize_class_name(name), []).append(index)
    elif model_wnids is not None:
        model_wnids = _check_wordnet_ids(model_wnids, "model_wnids")
        if len(set(model_wnids)) != NUM_IMAGENET_CLASSES or len(model_wnids) != NUM_IMAGENET_CLASSES:
            raise ValueError(
                f"model_wnids must list the {NUM_IMAGENET_CLASSES} ImageNet-1k WordNet ids once each, got "
                f"{len(model_wnids)} ids ({len(set(model_wnids))} distinct)."
            )
        num_model_classes = NUM_IMAGENET_CLASSES
        position = {wnid: index for index, wnid in enumerate(model_wnids)}
        model_index_of_standard = [position[wnid] for wnid in sorted(model_wnids)]
    else:
        num_model_classes = NUM_IMAGENET_CLASSES
        model_index_of_standard = list(range(NUM_IMAGENET_CLASSES))

    label_to_folder: dict[str, str] = {}
    for folder, label in folder_to_label.items():
        label_to_folder.setdefault(label, folder)

    groups_by_folder: dict[str, list[int]] = {}
    unknown_descriptions: list[str] = []
    ambiguous_descriptions: list[str] = []
    missing_in_model: list[str] = []
    for objectnet_name, joined in objectnet_to_imagenet.items():
        if objectnet_name not in label_to_folder:
            raise ValueError(
                f"ObjectNet class {objectnet_name!r} from {OBJECTNET_TO_IMAGENET_FILE} has no folder in "
                f"{OBJECTNET_FOLDER_TO_LABEL_FILE}."
            )
        if not isinstance(joined, str):
            raise ValueError(
                f"{OBJECTNET_TO_IMAGENET_FILE} maps {objectnet_name!r} to {joined!r}, but expected a '; '-separated string."
            )
        group = []
        for description in joined.split("; "):
            description = description.strip()
            if description not in description_ids:
                unknown_descriptions.append(description)
                continue
            if len(description_ids[description]) > 1:
                ambiguous_descriptions.append(description)
                continue
            if model_class_names is not None:
                matches = model_positions.get(normalize_class_name(description), [])
                if len(matches) != 1:
                    missing_in_model.append(description)
                    continue
                group.append(matches[0])
            else:
                standard = standard_index[description_ids[description][0]]
                group.append(model_index_of_standard[standard])
        groups_by_folder[label_to_folder[objectnet_name]] = group

    if unknown_descriptions:
        raise ValueError(
            f"{OBJECTNET_TO_IMAGENET_FILE} names ImageNet classes that are not lines of "
            f"{OBJECTNET_IMAGENET_LABELS_FILE}: {_format_names(unknown_descriptions)}."
        )
    if ambiguous_descriptions:
        raise ValueError(
            f"These ImageNet descriptions occur on several lines of {OBJECTNET_IMAGENET_LABELS_FILE}, so their "
            f"class is ambiguous: {_format_names(ambiguous_descriptions)}."
        )
    if missing_in_model:
        raise ValueError(
            f"{len(missing_in_model)} ImageNet classes needed by ObjectNet do not match exactly one model class "
            f"name (case-insensitive): {_format_names(missing_in_model)}. model_class_names must be ImageNet "
            f"descriptions as in {OBJECTNET_IMAGENET_LABELS_FILE} (e.g. 'tench, Tinca tinca'). If the model "
            "predicts the 1,000 ImageNet classes in the standard order, leave model_class_names unset."
        )

    folders = sorted(groups_by_folder)
    logger.info(
        "ObjectNet projection: %d classes covering %d model classes.",
        len(folders),
        sum(len(groups_by_folder[folder]) for folder in folders),
    )
    return LabelSpaceProjection(
        num_model_classes=num_model_classes,
        groups=[groups_by_folder[folder] for folder in folders],
        class_names=folders,
    )


__all__ = [
    "NUM_IMAGENET_CLASSES",
    "STANDARD_SUITE",
    "LabelSpaceProjection",
    "ProjectionKind",
    "SuiteDataset",
    "normalize_class_name",
    "objectnet_projection",
    "projection_from_class_names",
    "projection_from_wordnet_ids",
    "unmatched_class_names",
]
