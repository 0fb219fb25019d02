"""Tests for label-space projections: validation, projection maths and the table-driven builders."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from hf_dawin import label_spaces
from hf_dawin.label_spaces import (
    STANDARD_SUITE,
    LabelSpaceProjection,
    objectnet_projection,
    projection_from_class_names,
    projection_from_wordnet_ids,
)


IMAGENET_DATA = Path(__file__).parents[2] / "shared" / "data" / "imagenet"

# Shared file name -> file name inside an ObjectNet download's `mappings/` folder.
OBJECTNET_FILES = {
    "objectnet_to_imagenet_1k.json": "objectnet_to_imagenet_1k.json",
    "objectnet_pytorch_to_imagenet_2012_id.json": "pytorch_to_imagenet_2012_id.json",
    "objectnet_folder_to_objectnet_label.json": "folder_to_objectnet_label.json",
    "objectnet_imagenet_to_label_2012_v2": "imagenet_to_label_2012_v2",
}


def _require_imagenet_data():
    if not IMAGENET_DATA.is_dir():
        pytest.skip(f"ImageNet label tables not found at {IMAGENET_DATA}; these tests need the shared data folder.")


def _read_shared_json(name):
    _require_imagenet_data()
    return json.loads((IMAGENET_DATA / name).read_text(encoding="utf-8"))


@pytest.fixture
def real_objectnet_mappings(tmp_path):
    """A `mappings/` folder laid out like the ObjectNet download, filled from the shared tables."""
    _require_imagenet_data()
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    for shared_name, download_name in OBJECTNET_FILES.items():
        shutil.copy(IMAGENET_DATA / shared_name, mappings / download_name)
    return mappings


# 7 is invertible modulo 1000 (7 * 143 = 1001), so this is a permutation of 0..999.
def _standin_2012_id(standard_index):
    return (7 * standard_index + 3) % 1000


def _write_standin_mappings(folder, objectnet_to_imagenet=None, folder_to_label=None, num_lines=1000):
    """Write a small ObjectNet-like `mappings/` folder with synthetic class descriptions."""
    folder.mkdir(parents=True, exist_ok=True)
    if objectnet_to_imagenet is None:
        objectnet_to_imagenet = {"Alpha things": "class 0010; class 0020", "Beta": "class 0500"}
    if folder_to_label is None:
        folder_to_label = {"beta": "Beta", "alpha_things": "Alpha things", "gamma": "Gamma"}
    (folder / "objectnet_to_imagenet_1k.json").write_text(json.dumps(objectnet_to_imagenet))
    (folder / "folder_to_objectnet_label.json").write_text(json.dumps(folder_to_label))
    pytorch_to_2012 = {str(index): _standin_2012_id(index) for index in range(1000)}
    (folder / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps(pytorch_to_2012))
    lines = [f"class {line:04d}" for line in range(num_lines)]
    (folder / "imagenet_to_label_2012_v2").write_text("\n".join(lines) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------
# LabelSpaceProjection


def test_subset_projection_selects_columns():
    projection = LabelSpaceProjection(num_model_classes=5, indices=[3, 0])
    logits = torch.arange(10.0).reshape(2, 5)

    projected = projection.project(logits)

    assert projection.kind == "subset"
    assert projection.num_classes == 2
    torch.testing.assert_close(projected, torch.tensor([[3.0, 0.0], [8.0, 5.0]]))


def test_group_projection_takes_group_max():
    groups = [[0, 4], [2], [1, 3, 4]]
    projection = LabelSpaceProjection(num_model_classes=5, groups=groups, class_names=["a", "b", "c"])
    logits = torch.tensor([[0.5, -1.0, 2.0, 7.0, 3.0], [9.0, 1.0, -2.0, 0.0, -5.0]])

    projected = projection.project(logits)

    expected = torch.empty(2, 3)
    for row in range(2):
        for column, group in enumerate(groups):
            expected[row, column] = max(logits[row, index].item() for index in group)
    assert projection.kind == "groups"
    assert projected.shape == (2, 3)
    torch.testing.assert_close(projected, expected)


def test_group_projection_gradient_reaches_max():
    projection = LabelSpaceProjection(num_model_classes=3, groups=[[0, 1], [2]])
    logits = torch.tensor([[1.0, 4.0, 2.0]], requires_grad=True)

    projection.project(logits).sum().backward()

    torch.testing.assert_close(logits.grad, torch.tensor([[0.0, 1.0, 1.0]]))


def test_identity_projection_returns_logits():
    projection = LabelSpaceProjection.identity(4, class_names=["a", "b", "c", "d"])
    logits = torch.randn(3, 4)

    assert projection.kind == "identity"
    assert projection.num_classes == 4
    assert projection.indices == (0, 1, 2, 3)
    assert torch.equal(projection.project(logits), logits)


def test_project_accepts_leading_dimensions():
    projection = LabelSpaceProjection(num_model_classes=3, groups=[[0, 2], [1]])
    logits = torch.randn(2, 4, 3)

    projected = projection.project(logits)

    assert projected.shape == (2, 4, 2)
    torch.testing.assert_close(projected[..., 0], torch.maximum(logits[..., 0], logits[..., 2]))


def test_project_rejects_wrong_class_count():
    projection = LabelSpaceProjection(num_model_classes=5, indices=[1])

    with pytest.raises(ValueError, match=r"Expected logits of shape \(batch_size, 5\), got \(2, 4\)"):
        projection.project(torch.zeros(2, 4))


def test_project_rejects_non_tensor():
    projection = LabelSpaceProjection(num_model_classes=2, indices=[1])

    with pytest.raises(TypeError, match="logits must be a torch.Tensor, got list"):
        projection.project([[0.0, 1.0]])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_model_classes": 3, "indices": [0, 3]}, ValueError, r"indices\[1\] is 3, outside the model's class range \[0, 2\]"),
        ({"num_model_classes": 3, "indices": [-1]}, ValueError, r"indices\[0\] is -1, outside"),
        ({"num_model_classes": 3, "indices": [2, 1, 2]}, ValueError, r"duplicate model classes: 2 \(positions 0 and 2\)"),
        ({"num_model_classes": 3, "indices": []}, ValueError, "indices is empty"),
        ({"num_model_classes": 3, "indices": [0.0]}, TypeError, r"indices\[0\] must be an integer class index, got 0.0"),
        ({"num_model_classes": 3, "indices": [True]}, TypeError, "got the bool True"),
        ({"num_model_classes": 3, "indices": "01"}, TypeError, "indices must be a sequence of integers, got str"),
        ({"num_model_classes": 3, "groups": []}, ValueError, "groups is empty"),
        ({"num_model_classes": 3, "groups": [[0], []]}, ValueError, r"groups\[1\] is empty"),
        ({"num_model_classes": 3, "groups": [[0, 5]]}, ValueError, r"groups\[0\]\[1\] is 5, outside the model's class range \[0, 2\]"),
        ({"num_model_classes": 3, "groups": [[1, 1]]}, ValueError, r"groups\[0\] lists a model class more than once: \[1, 1\]"),
        ({"num_model_classes": 3, "groups": [3]}, TypeError, r"groups\[0\] must be a sequence of integers, got int"),
        ({"num_model_classes": 3}, ValueError, "Pass exactly one of `indices`"),
        ({"num_model_classes": 3, "indices": [0], "groups": [[0]]}, ValueError, "Pass exactly one of `indices`"),
        ({"num_model_classes": 0, "indices": [0]}, ValueError, "num_model_classes must be at least 1, got 0"),
        ({"num_model_classes": 3, "indices": [0, 1], "class_names": ["a"]}, ValueError, "class_names has 1 entries but the projection has 2"),
        ({"num_model_classes": 3, "indices": [0], "class_names": [7]}, TypeError, r"class_names\[0\] must be a string"),
    ],
)
def test_projection_rejects_invalid_fields(kwargs, error, message):
    with pytest.raises(error, match=message):
        LabelSpaceProjection(**kwargs)


def test_projection_accepts_tensor_and_numpy_indices():
    numpy = pytest.importorskip("numpy")
    projection = LabelSpaceProjection(num_model_classes=4, indices=torch.tensor([3, 1]))
    grouped = LabelSpaceProjection(num_model_classes=4, groups=[numpy.array([0, 2]), (numpy.int64(3),)])

    assert projection.indices == (3, 1)
    assert grouped.groups == ((0, 2), (3,))
    assert all(type(index) is int for group in grouped.groups for index in group)


def test_projection_is_frozen():
    projection = LabelSpaceProjection(num_model_classes=2, indices=[1])

    with pytest.raises(AttributeError):
        projection.indices = (0,)


@pytest.mark.parametrize(
    "projection",
    [
        LabelSpaceProjection(num_model_classes=6, indices=[5, 2], class_names=["x", "y"]),
        LabelSpaceProjection(num_model_classes=6, groups=[[0, 1], [4]]),
        LabelSpaceProjection.identity(3),
    ],
)
def test_projection_dict_round_trip(projection):
    data = json.loads(json.dumps(projection.to_dict()))

    restored = LabelSpaceProjection.from_dict(data)

    assert restored == projection
    assert restored.kind == projection.kind


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"Unknown projection keys \['subset'\]"):
        LabelSpaceProjection.from_dict({"num_model_classes": 3, "subset": [0]})


def test_from_dict_requires_class_count():
    with pytest.raises(ValueError, match="missing the required key 'num_model_classes'"):
        LabelSpaceProjection.from_dict({"indices": [0]})


def test_from_dict_rejects_non_mapping():
    with pytest.raises(TypeError, match="Expected a mapping"):
        LabelSpaceProjection.from_dict([("num_model_classes", 3)])


def test_from_dict_validates_indices():
    with pytest.raises(ValueError, match="outside the model's class range"):
        LabelSpaceProjection.from_dict({"num_model_classes": 2, "indices": [2]})


# ---------------------------------------------------------------------------------------------
# Builders from class names and WordNet ids


def test_class_names_match_ignoring_case():
    projection = projection_from_class_names(["Cat", "dog", "Bird "], ["bird", "CAT"])

    assert projection.indices == (2, 0)
    assert projection.class_names == ("bird", "CAT")
    assert projection.num_model_classes == 3


def test_class_names_missing_are_listed():
    with pytest.raises(ValueError, match=r"2 of 3 evaluation class names were not found .*'zebra', 'lion'"):
        projection_from_class_names(["cat", "dog"], ["zebra", "cat", "lion"])


def test_class_names_ambiguous_match_rejected():
    with pytest.raises(ValueError, match=r"'crane' \(model classes \[0, 2\]\)"):
        projection_from_class_names(["crane", "dog", "Crane"], ["dog", "crane"])


@pytest.mark.parametrize(
    ("model_names", "eval_names", "error", "message"),
    [
        ("cat", ["cat"], TypeError, "model_class_names must be a sequence of strings, got str"),
        (["cat"], [], ValueError, "eval_class_names is empty"),
        (["cat", 3], ["cat"], TypeError, r"model_class_names\[1\] must be a string"),
    ],
)
def test_class_names_reject_bad_inputs(model_names, eval_names, error, message):
    with pytest.raises(error, match=message):
        projection_from_class_names(model_names, eval_names)


def test_wordnet_ids_match():
    model_wnids = ["n00000003", "n00000001", "n00000002"]

    projection = projection_from_wordnet_ids(model_wnids, ["n00000002", "n00000003"], eval_class_names=["b", "c"])

    assert projection.indices == (2, 0)
    assert projection.class_names == ("b", "c")


def test_wordnet_ids_default_names_are_ids():
    projection = projection_from_wordnet_ids(["n00000001", "n00000002"], ["n00000002"])

    assert projection.class_names == ("n00000002",)


@pytest.mark.parametrize(
    ("model_wnids", "eval_wnids", "message"),
    [
        (["n0001", "n00000002"], ["n00000002"], r"model_wnids contains values that are not WordNet ids .*'n0001'"),
        (["n00000001"], ["cat"], r"eval_wnids contains values that are not WordNet ids .*'cat'"),
        (["n00000001", "n00000001"], ["n00000001"], r"lists these WordNet ids more than once: 'n00000001'"),
        (["n00000001"], ["n00000009", "n00000001"], r"1 of 2 evaluation WordNet ids are not model classes: 'n00000009'"),
    ],
)
def test_wordnet_ids_reject_bad_inputs(model_wnids, eval_wnids, message):
    with pytest.raises(ValueError, match=message):
        projection_from_wordnet_ids(model_wnids, eval_wnids)


# ---------------------------------------------------------------------------------------------
# ObjectNet builder on a stand-in mappings folder


def test_objectnet_standin_groups(tmp_path):
    mappings = _write_standin_mappings(tmp_path / "mappings")

    projection = objectnet_projection(mappings)

    # Lines 10, 20 and 500 are ILSVRC-2012 ids, and 7 * p + 3 = id (mod 1000) gives p = 1, 431, 71.
    assert projection.class_names == ("alpha_things", "beta")
    assert projection.groups == ((1, 431), (71,))
    assert projection.num_model_classes == 1000


def test_objectnet_standin_model_class_names(tmp_path):
    mappings = _write_standin_mappings(tmp_path / "mappings")
    names = [f"Class {line:04d}" for line in range(1000)]
    random.Random(0).shuffle(names)

    projection = objectnet_projection(mappings, model_class_names=names)

    assert projection.groups == (
        (names.index("Class 0010"), names.index("Class 0020")),
        (names.index("Class 0500"),),
    )


def test_objectnet_standin_model_wnids(tmp_path):
    mappings = _write_standin_mappings(tmp_path / "mappings")
    wnids = [f"n{index:08d}" for index in range(1000)]
    random.Random(1).shuffle(wnids)

    projection = objectnet_projection(mappings, model_wnids=wnids)

    # Standard index p is the p-th smallest WordNet id, here "n%08d" % p.
    assert projection.groups == (
        (wnids.index("n00000001"), wnids.index("n00000431")),
        (wnids.index("n00000071"),),
    )


def test_objectnet_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="ObjectNet mappings folder .* does not exist"):
        objectnet_projection(tmp_path / "absent")


@pytest.mark.parametrize("file_name", list(OBJECTNET_FILES.values()))
def test_objectnet_missing_file(tmp_path, file_name):
    mappings = _write_standin_mappings(tmp_path / "mappings")
    (mappings / file_name).unlink()

    with pytest.raises(FileNotFoundError, match=f"ObjectNet mapping file .*{file_name} does not exist"):
        objectnet_projection(mappings)


def test_objectnet_rejects_short_label_file(tmp_path):
    mappings = _write_standin_mappings(tmp_path / "mappings", num_lines=999)

    with pytest.raises(ValueError, match="has 999 lines, but it must list one ImageNet class description per line"):
        objectnet_projection(mappings)


def test_objectnet_rejects_invalid_json(tmp_path):
    mappings = _write_standin_mappings(tmp_path / "mappings")
    (mappings / "objectnet_to_imagenet_1k.json").write_text("{not json")

    with pytest.raises(ValueError, match="objectnet_to_imagenet_1k.json is not valid JSON"):
        objectnet_projection(mappings)


def test_objectnet_rejects_unknown_description(tmp_path):
    mappings = _write_standin_mappings(tmp_path / "mappings", objectnet_to_imagenet={"Beta": "class 0500; no such class"})

    with pytest.raises(ValueError, match=r"not lines of imagenet_to_label_2012_v2: 'no such class'"):
        objectnet_projection(mappings)


def test_objectnet_rejects_unmapped_folder(tmp_path):
    mappings = _write_standin_mappings(tmp_path / "mappings", folder_to_label={"beta": "Beta"})

    with pytest.raises(ValueError, match="ObjectNet class 'Alpha things' .* has no folder"):
        objectnet_projection(mappings)


def test_objectnet_rejects_ambiguous_description(tmp_path):
    mappings = _write_standin_mappings(tmp_path / "mappings", objectnet_to_imagenet={"Beta": "crane"})
    lines = (mappings / "imagenet_to_label_2012_v2").read_text().splitlines()
    lines[4] = lines[9] = "crane"
    (mappings / "imagenet_to_label_2012_v2").write_text("\n".join(lines))

    with pytest.raises(ValueError, match="occur on several lines .*'crane'"):
        objectnet_projection(mappings)


def test_objectnet_rejects_unmatched_model_names(tmp_path):
    mappings = _write_standin_mappings(tmp_path / "mappings")
    names = [f"label {index}" for index in range(1000)]

    with pytest.raises(ValueError, match=r"3 ImageNet classes needed by ObjectNet do not match .*'class 0010'.*leave model_class_names unset"):
        objectnet_projection(mappings, model_class_names=names)


def test_objectnet_rejects_partial_wnids(tmp_path):
    mappings = _write_standin_mappings(tmp_path / "mappings")

    with pytest.raises(ValueError, match=r"must list the 1000 ImageNet-1k WordNet ids once each, got 2 ids"):
        objectnet_projection(mappings, model_wnids=["n00000001", "n00000002"])


def test_objectnet_rejects_both_model_descriptions(tmp_path):
    mappings = _write_standin_mappings(tmp_path / "mappings")

    with pytest.raises(ValueError, match="Pass at most one of model_class_names and model_wnids"):
        objectnet_projection(mappings, model_class_names=["a"], model_wnids=["n00000001"])


# ---------------------------------------------------------------------------------------------
# Real ImageNet tables


def test_real_objectnet_has_113_classes(real_objectnet_mappings):
    names = _read_shared_json("imagenet_class_names.json")

    projection = objectnet_projection(real_objectnet_mappings)

    assert projection.num_classes == 113
    assert projection.num_model_classes == 1000
    assert list(projection.class_names) == sorted(projection.class_names)
    assert sum(len(group) for group in projection.groups) == 125
    by_folder = dict(zip(projection.class_names, projection.groups))
    assert set(by_folder["alarm_clock"]) == {names.index("analog clock"), names.index("digital clock")}
    assert by_folder["banana"] == (names.index("banana"),)
    assert by_folder["backpack"] == (names.index("backpack"),)


def test_real_objectnet_max_over_groups(real_objectnet_mappings):
    projection = objectnet_projection(real_objectnet_mappings)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1000, generator=generator)

    projected = projection.project(logits)

    assert projected.shape == (4, 113)
    for row in range(4):
        for column, group in enumerate(projection.groups):
            assert projected[row, column].item() == max(logits[row, index].item() for index in group)


def test_real_objectnet_description_names(real_objectnet_mappings):
    """Models whose class names are the ImageNet descriptions, in any order, get the same projection."""
    descriptions = (real_objectnet_mappings / "imagenet_to_label_2012_v2").read_text().splitlines()
    pytorch_to_2012 = json.loads((real_objectnet_mappings / "pytorch_to_imagenet_2012_id.json").read_text())
    standard_names = [descriptions[pytorch_to_2012[str(index)]] for index in range(1000)]
    order = list(range(1000))
    random.Random(2).shuffle(order)
    shuffled_names = [standard_names[index] for index in order]
    logits = torch.randn(3, 1000)

    default = objectnet_projection(real_objectnet_mappings)
    shuffled = objectnet_projection(real_objectnet_mappings, model_class_names=shuffled_names)

    assert shuffled.class_names == default.class_names
    torch.testing.assert_close(shuffled.project(logits[:, order]), default.project(logits))


def test_real_objectnet_rejects_clip_names(real_objectnet_mappings):
    names = _read_shared_json("imagenet_class_names.json")

    with pytest.raises(ValueError, match="model_class_names must be ImageNet descriptions"):
        objectnet_projection(real_objectnet_mappings, model_class_names=names)


def test_real_imagenet_a_from_names():
    names = _read_shared_json("imagenet_class_names.json")
    subset = _read_shared_json("imagenet_a_class_indices.json")

    projection = projection_from_class_names(names, [names[index] for index in subset])

    assert projection.num_classes == 200
    assert list(projection.indices) == subset
    logits = torch.randn(2, 1000)
    torch.testing.assert_close(projection.project(logits), logits[:, subset])


def test_real_imagenet_r_names_are_ambiguous():
    """The CLIP ImageNet name list spells two classes 'missile', and ImageNet-R contains one of them."""
    names = _read_shared_json("imagenet_class_names.json")
    subset = _read_shared_json("imagenet_r_class_indices.json")

    with pytest.raises(ValueError, match=r"'missile' \(model classes \[657, 744\]\)"):
        projection_from_class_names(names, [names[index] for index in subset])


def test_real_imagenet_r_from_wordnet_ids():
    subset = _read_shared_json("imagenet_r_class_indices.json")
    # Standard ImageNet order is sorted WordNet id order, which these stand-in ids keep.
    model_wnids = [f"n{index:08d}" for index in range(1000)]

    projection = projection_from_wordnet_ids(model_wnids, [model_wnids[index] for index in subset])

    assert projection.num_classes == 200
    assert list(projection.indices) == subset


# ---------------------------------------------------------------------------------------------
# Standard suite


def test_standard_suite_entries():
    assert list(STANDARD_SUITE) == ["imagenet", "imagenet_v2", "imagenet_r", "imagenet_a", "imagenet_sketch", "objectnet"]
    kinds = {name: entry.projection for name, entry in STANDARD_SUITE.items()}
    assert kinds == {
        "imagenet": "identity",
        "imagenet_v2": "identity",
        "imagenet_r": "subset",
        "imagenet_a": "subset",
        "imagenet_sketch": "identity",
        "objectnet": "groups",
    }
    assert STANDARD_SUITE["imagenet"].role == "in_distribution"
    assert all(entry.role == "distribution_shift" for name, entry in STANDARD_SUITE.items() if name != "imagenet")
    assert STANDARD_SUITE["imagenet_r"].num_classes == 200
    assert STANDARD_SUITE["imagenet_a"].num_classes == 200
    assert STANDARD_SUITE["objectnet"].num_classes == 113


def test_standard_suite_builders_exist():
    for entry in STANDARD_SUITE.values():
        target = label_spaces
        for attribute in entry.builder.split("."):
            target = getattr(target, attribute)
        assert callable(target), entry.builder
