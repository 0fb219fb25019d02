"""DaWinCLIPConfig: class_names and id2label stay one list of names."""

import pytest
from PIL import Image
from transformers import CLIPConfig, pipeline

from hf_dawin import DaWinCLIPConfig, DaWinCLIPModel

from .conftest import TINY_CLASS_NAMES


def make_config(class_names=("cat", "dog", "bird")) -> DaWinCLIPConfig:
    return DaWinCLIPConfig(clip_config=CLIPConfig().to_dict(), class_names=list(class_names))


def test_class_names_set_labels():
    config = make_config()

    config.class_names = ["lion", "wolf", "eagle"]

    assert config.id2label == {0: "lion", 1: "wolf", 2: "eagle"}
    assert config.label2id == {"lion": 0, "wolf": 1, "eagle": 2}


def test_class_names_of_other_count_rejected():
    config = make_config()

    with pytest.raises(ValueError, match="class_names lists 2 classes, but the heads have 3"):
        config.class_names = ["lion", "wolf"]
    assert config.class_names == ["cat", "dog", "bird"]
    assert config.id2label == {0: "cat", 1: "dog", 2: "bird"}

def test_id2label_renames_classes():
    config = make_config()

    config.id2label = {"0": "lion", "1": "wolf", "2": "eagle"}

    assert config.class_names == ["lion", "wolf", "eagle"]
    assert config.id2label == {0: "lion", 1: "wolf", 2: "eagle"}
    assert config.label2id == {"lion": 0, "wolf": 1, "eagle": 2}


def test_label2id_renames_classes():
    config = make_config()

    config.label2id = {"lion": 0, "wolf": 1, "eagle": 2}

    assert config.class_names == ["lion", "wolf", "eagle"]
    assert config.id2label == {0: "lion", 1: "wolf", 2: "eagle"}
    with pytest.raises(ValueError, match="label2id must map the names of the 3 classes of the heads to the indices"):
        config.label2id = {"lion": 0, "wolf": 0, "eagle": 2}
    assert config.class_names == ["lion", "wolf", "eagle"]

@pytest.mark.parametrize(
    "id2label",
    [{0: "lion", 1: "wolf"}, {0: "lion", 1: "wolf", 3: "eagle"}, {"a": "lion", 1: "wolf", 2: "eagle"}],
    ids=["too-few", "gap", "non-integer-key"],
)
def test_id2label_of_other_classes_rejected(id2label):
    config = make_config()

    with pytest.raises(ValueError, match="id2label must map the indices 0 to 2 to the names of the 3 classes"):
        config.id2label = id2label
    assert config.class_names == ["cat", "dog", "bird"]
    assert config.id2label == {0: "cat", 1: "dog", 2: "bird"}


def test_id2label_duplicates_rejected():
    config = make_config()

    with pytest.raises(ValueError, match="duplicates"):
        config.id2label = {0: "lion", 1: "Lion", 2: "eagle"}
    assert config.class_names == ["cat", "dog", "bird"]


def test_load_with_id2label_renames(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "dawin")
    renamed = [name.upper() for name in TINY_CLASS_NAMES]

    loaded = DaWinCLIPModel.from_pretrained(tmp_path / "dawin", id2label=dict(enumerate(renamed)))
    assert loaded.config.class_names == renamed
    loaded.save_pretrained(tmp_path / "renamed")
    reloaded = DaWinCLIPModel.from_pretrained(tmp_path / "renamed")

    assert reloaded.config.class_names == renamed
    assert reloaded.config.id2label == dict(enumerate(renamed))


def test_pipeline_reports_renamed_classes(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "dawin")
    renamed = [f"class {index}" for index in range(len(TINY_CLASS_NAMES))]
    classifier = pipeline("image-classification", model=str(tmp_path / "dawin"))

    classifier.model.config.class_names = renamed
    predictions = classifier(Image.new("RGB", (40, 40), "red"), top_k=len(renamed))

    assert sorted(prediction["label"] for prediction in predictions) == sorted(renamed)
    assert classifier.model.config.id2label == dict(enumerate(renamed))
