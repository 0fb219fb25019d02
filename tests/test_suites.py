"""The ImageNet suite and label-space matching on small local stand-ins, through the library and the CLI."""

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_dawin import DaWinCLIPModel
from hf_dawin.cli import main
from hf_dawin.datasets_io import crop_border
from hf_dawin.evaluation import EvaluationSettings, evaluate_pair
from hf_dawin.suites import (
    ImageNetSuiteSources,
    in_distribution_projection,
    load_imagenet_suite,
    model_wordnet_ids,
    projection_for_dataset,
    read_wordnet_ids,
    split_source,
)

from .conftest import TINY_TEMPLATES


# The first four ImageNet classes, with short names that fit the tiny text tower.
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
NAMES = ["tench", "goldfish", "white shark", "tiger shark"]


def write_images(folder, count, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"image_{index}.png")


def write_image_folder(root, classes, count=2, seed=0):
    for offset, name in enumerate(classes):
        write_images(root / name, count, seed + offset)
    return root


def write_objectnet(root):
    """An ObjectNet-like download: images/ with three folders, two of which map to ImageNet, and mappings/."""
    write_image_folder(root / "images", ["chair", "fish_things", "sharks"], count=2, seed=40)
    mappings = root / "mappings"
    mappings.mkdir(parents=True)
    lines = [f"class {line:04d}" for line in range(1000)]
    for line, name in zip((10, 20, 30, 40), NAMES):
        lines[line] = name
    (mappings / "imagenet_to_label_2012_v2").write_text("\n".join(lines) + "\n")
    (mappings / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(i): i for i in range(1000)}))
    (mappings / "objectnet_to_imagenet_1k.json").write_text(
        json.dumps({"Fish things": "tench; goldfish", "Sharks": "white shark; tiger shark"})
    )
    (mappings / "folder_to_objectnet_label.json").write_text(
        json.dumps({"chair": "Chair", "fish_things": "Fish things", "sharks": "Sharks"})
    )
    return root


@pytest.fixture(scope="module")
def suite_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_suite")
    write_image_folder(root / "imagenet", WNIDS, count=3, seed=0)
    write_image_folder(root / "imagenet_v2", ["0", "1", "2", "3"], seed=10)
    write_image_folder(root / "imagenet_r", [WNIDS[1], WNIDS[3]], count=3, seed=20)
    write_image_folder(root / "imagenet_a", WNIDS[:3], seed=30)
    write_image_folder(root / "imagenet_sketch", WNIDS, seed=50)
    write_objectnet(root / "objectnet")
    (root / "class_names.txt").write_text("\n".join(NAMES) + "\n")
    return root


@pytest.fixture(scope="module")
def suite_model(tiny_pair_dirs):
    return DaWinCLIPModel.from_pretrained_pair(
        tiny_pair_dirs[0], tiny_pair_dirs[1], class_names=NAMES, templates=TINY_TEMPLATES
    )


# ----------------------------------------------------------------------------------------------------------
# Label-space matching
# ----------------------------------------------------------------------------------------------------------


def test_index_names_in_string_order():
    model_names = [f"class {index}" for index in range(12)]
    # `imagefolder` sorts folder names as strings, as for ImageNet-V2's folders 0..999.
    label_names = sorted(str(index) for index in range(12))

    projection = projection_for_dataset(model_names, label_names)

    assert list(projection.indices) == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    logits = torch.arange(12.0).unsqueeze(0)
    assert projection.project(logits).tolist() == [[0.0, 1.0, 10.0, 11.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]]


def test_index_names_out_of_range():
    with pytest.raises(ValueError, match=r"\[4\] are outside the model's 4 classes"):
        projection_for_dataset(NAMES, ["0", "4"])


def test_wordnet_subset_through_reference():
    projection = projection_for_dataset(
        NAMES, [WNIDS[3], WNIDS[1]], reference_label_names=WNIDS, model_wordnet_ids=WNIDS
    )

    assert list(projection.indices) == [3, 1]


def test_wordnet_labels_need_model_ids():
    with pytest.raises(ValueError, match="--wordnet-ids FILE"):
        projection_for_dataset(NAMES, [WNIDS[0]])


def test_names_match_model_or_reference():
    descriptions = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark", "tiger shark, Galeocerdo"]

    by_model = projection_for_dataset(NAMES, ["Goldfish", "tench"], reference_label_names=descriptions)
    by_reference = projection_for_dataset(NAMES, ["great white shark"], reference_label_names=descriptions)

    assert list(by_model.indices) == [1, 0]
    assert list(by_reference.indices) == [2]
    assert projection_for_dataset(NAMES, list(NAMES)) is None
    assert projection_for_dataset(NAMES, descriptions, reference_label_names=descriptions) is None
    with pytest.raises(ValueError, match="'zebra'"):
        projection_for_dataset(NAMES, ["tench", "zebra"], reference_label_names=descriptions)


def test_model_wordnet_ids_sources():
    assert model_wordnet_ids(NAMES, reference_label_names=WNIDS) == WNIDS
    assert model_wordnet_ids(WNIDS) == WNIDS
    assert model_wordnet_ids(NAMES, reference_label_names=WNIDS[:3]) is None
    assert model_wordnet_ids(NAMES, wordnet_ids=list(reversed(WNIDS))) == list(reversed(WNIDS))
    with pytest.raises(ValueError, match="one WordNet id per model class \\(4\\), received 3"):
        model_wordnet_ids(NAMES, wordnet_ids=WNIDS[:3])


def test_in_distribution_projection():
    assert in_distribution_projection(NAMES, WNIDS) is None
    assert in_distribution_projection(NAMES, ["0", "1", "2", "3"]) is None
    names = [f"c{index}" for index in range(11)]
    projection = in_distribution_projection(names, sorted(str(index) for index in range(11)))
    assert list(projection.indices) == [0, 1, 10, 2, 3, 4, 5, 6, 7, 8, 9]
    subset = in_distribution_projection(NAMES, [WNIDS[2]], model_wordnet_ids=WNIDS)
    assert list(subset.indices) == [2]


def test_in_distribution_names_in_other_order():
    permuted = [NAMES[2], NAMES[0], NAMES[3], NAMES[1]]

    projection = in_distribution_projection(NAMES, permuted)
    shifted = projection_for_dataset(NAMES, permuted, reference_label_names=permuted)

    assert list(projection.indices) == [2, 0, 3, 1]
    assert list(shifted.indices) == [2, 0, 3, 1]
    assert in_distribution_projection(NAMES, [name.upper() for name in NAMES]) is None


def test_in_distribution_partial_name_match_rejected(caplog):
    near_names = ["white shark", "tench", "goldfish", "tiger_shark"]

    with pytest.raises(ValueError, match=r"label 0 'white shark' is model class 2, while \['tiger_shark'\] are not"):
        in_distribution_projection(NAMES, near_names)
    # Names that differ only where they sit at their own position keep the position match, with a warning.
    assert in_distribution_projection(NAMES, ["tench", "goldfish", "white shark", "tiger_shark"]) is None
    assert "'tiger_shark' as 'tiger shark'" in caplog.text


def test_split_source(tmp_path):
    assert split_source("ILSVRC/imagenet-1k:validation") == ("ILSVRC/imagenet-1k", "validation")
    assert split_source("ILSVRC/imagenet-1k:validation[:100]") == ("ILSVRC/imagenet-1k", "validation[:100]")
    assert split_source("ILSVRC/imagenet-1k") == ("ILSVRC/imagenet-1k", None)
    assert split_source("C:\\data\\imagenet") == ("C:\\data\\imagenet", None)
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert split_source(str(odd)) == (str(odd), None)
    # A local path with ':' in it splits after the longest existing prefix, even where a shorter one exists.
    (tmp_path / "a").mkdir()
    assert split_source(f"{odd}:validation") == (str(odd), "validation")
    assert split_source(f"{odd}:validation[:10]") == (str(odd), "validation[:10]")
    with pytest.raises(ValueError, match="ends with ':' but names no split"):
        split_source("ILSVRC/imagenet-1k:")


def test_read_wordnet_ids(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("n01440764\n\nn01443537\n")
    bad = tmp_path / "bad.txt"
    bad.write_text("n01440764\ngoldfish\n")

    assert read_wordnet_ids(good) == ["n01440764", "n01443537"]
    with pytest.raises(ValueError, match="line 2: 'goldfish' is not a WordNet id"):
        read_wordnet_ids(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_wordnet_ids(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------------------------------------
# The ImageNet suite
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def suite_sets(suite_root, suite_model, tmp_path_factory):
    sources = ImageNetSuiteSources(
        imagenet=str(suite_root / "imagenet"),
        imagenet_v2=str(suite_root / "imagenet_v2"),
        imagenet_r=str(suite_root / "imagenet_r"),
        imagenet_a=str(suite_root / "imagenet_a"),
        imagenet_sketch=str(suite_root / "imagenet_sketch"),
        objectnet=str(suite_root / "objectnet"),
    )
    return load_imagenet_suite(
        sources, model_class_names=NAMES, image_processor=suite_model.image_processor, batch_size=4,
        cache_dir=str(tmp_path_factory.mktemp("datasets_cache")),
    )


def test_suite_sets_and_label_spaces(suite_sets):
    by_name = {s.name: s for s in suite_sets}

    assert list(by_name) == ["imagenet", "imagenet_v2", "imagenet_r", "imagenet_a", "imagenet_sketch", "objectnet"]
    assert [s.in_distribution for s in suite_sets] == [True, False, False, False, False, False]
    assert by_name["imagenet"].projection is None
    assert by_name["imagenet_v2"].projection is None
    assert list(by_name["imagenet_r"].projection.indices) == [1, 3]
    assert list(by_name["imagenet_r"].projection.class_names) == [WNIDS[1], WNIDS[3]]
    assert list(by_name["imagenet_a"].projection.indices) == [0, 1, 2]
    assert by_name["imagenet_sketch"].projection is None
    objectnet = by_name["objectnet"].projection
    assert list(objectnet.class_names) == ["fish_things", "sharks"]
    assert objectnet.groups == ((0, 1), (2, 3))
    assert by_name["objectnet"].num_examples == 4
    assert by_name["imagenet_r"].num_examples == 6


def test_suite_labels_follow_folders(suite_sets):
    by_name = {s.name: s for s in suite_sets}
    # ObjectNet rows keep only the mapped folders, relabelled in projection order; "chair" is dropped.
    labels = torch.cat([batch[1] for batch in by_name["objectnet"].batches()])
    assert sorted(labels.tolist()) == [0, 0, 1, 1]
    labels = torch.cat([batch[1] for batch in by_name["imagenet_r"].batches()])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_suite_crops_objectnet_border_only(suite_sets, suite_root, suite_model):
    by_name = {s.name: s for s in suite_sets}
    processor = suite_model.image_processor
    pixel_values, _, indices = next(iter(by_name["objectnet"].batches()))
    paths = sorted((suite_root / "objectnet" / "images" / "fish_things").glob("*"))
    paths += sorted((suite_root / "objectnet" / "images" / "sharks").glob("*"))
    images = [Image.open(path).convert("RGB") for path in paths]

    cropped = processor(images=[crop_border(image) for image in images], return_tensors="pt")["pixel_values"]
    uncropped = processor(images=images, return_tensors="pt")["pixel_values"]

    # The folders hold two images each; match the batch rows to them by content.
    for row in range(pixel_values.shape[0]):
        assert any(torch.equal(pixel_values[row], candidate) for candidate in cropped)
        assert not any(torch.equal(pixel_values[row], candidate) for candidate in uncropped)
    imagenet_pixels, _, _ = next(iter(by_name["imagenet"].batches()))
    imagenet_images = [Image.open(path).convert("RGB") for path in sorted((suite_root / "imagenet").rglob("*.png"))]
    uncropped_imagenet = processor(images=imagenet_images, return_tensors="pt")["pixel_values"]
    assert any(torch.equal(imagenet_pixels[0], candidate) for candidate in uncropped_imagenet)


def test_crop_border_removes_two_pixels():
    image = Image.new("RGB", (10, 8), (255, 0, 0))
    image.paste((0, 0, 255), (2, 2, 8, 6))

    cropped = crop_border(image)

    assert cropped.size == (6, 4)
    assert (np.asarray(cropped) == [0, 0, 255]).all()
    assert crop_border(Image.new("RGB", (4, 4))).size == (4, 4)


def test_suite_evaluation_scores_projected_logits(suite_sets, suite_model):
    results = evaluate_pair(suite_model, suite_sets, EvaluationSettings(alphas=(0.0, 1.0), progress=False))

    assert results["in_distribution"] == "imagenet"
    classes = {name: entry["num_classes"] for name, entry in results["sets"].items()}
    assert classes == {"imagenet": 4, "imagenet_v2": 4, "imagenet_r": 2, "imagenet_a": 3, "imagenet_sketch": 4, "objectnet": 2}
    objectnet = next(s for s in suite_sets if s.name == "objectnet")
    correct = total = 0
    with torch.no_grad():
        for pixel_values, labels, _ in objectnet.batches():
            zero_shot_logits, _ = suite_model.endpoint_logits(pixel_values)
            # ObjectNet classes take the maximum logit over their ImageNet classes.
            grouped = torch.stack([zero_shot_logits[:, [0, 1]].amax(-1), zero_shot_logits[:, [2, 3]].amax(-1)], dim=-1)
            correct += int((grouped.argmax(-1) == labels).sum())
            total += len(labels)
    assert results["sets"]["objectnet"]["scores"]["zero_shot"]["accuracy"] == pytest.approx(correct / total)


def test_suite_objectnet_partial_download(suite_root, suite_model, tmp_path):
    root = tmp_path / "objectnet"
    write_objectnet(root)
    for image in (root / "images" / "sharks").iterdir():
        image.unlink()
    (root / "images" / "sharks").rmdir()
    sources = ImageNetSuiteSources(imagenet=str(suite_root / "imagenet"), objectnet=str(root))

    with pytest.raises(ValueError, match="'sharks'"):
        load_imagenet_suite(
            sources, model_class_names=NAMES, image_processor=suite_model.image_processor,
            cache_dir=str(tmp_path / "cache"),
        )


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def pair_arguments(tiny_pair_dirs):
    return ["--zero-shot", str(tiny_pair_dirs[0]), "--fine-tuned", str(tiny_pair_dirs[1])]


def test_cli_imagenet_suite(suite_root, tiny_pair_dirs, tmp_path, capsys):
    output_dir = tmp_path / "results"

    exit_code = main([
        "evaluate", "--suite", "imagenet", *pair_arguments(tiny_pair_dirs),
        "--class-names", str(suite_root / "class_names.txt"), "--templates", str(_templates_file(tmp_path)),
        "--imagenet", str(suite_root / "imagenet"), "--imagenet-r", str(suite_root / "imagenet_r"),
        "--objectnet", str(suite_root / "objectnet"), "--alphas", "0,1", "--batch-size", "4",
        "--output-dir", str(output_dir), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--no-plots",
    ])

    assert exit_code == 0, capsys.readouterr().err
    results = json.loads((output_dir / "results.json").read_text())
    assert {name: entry["num_classes"] for name, entry in results["sets"].items()} == {
        "imagenet": 4, "imagenet_r": 2, "objectnet": 2,
    }
    assert results["out_of_distribution"] == ["imagenet_r", "objectnet"]
    assert results["dataset_sources"]["imagenet_r"] == str(suite_root / "imagenet_r")
    assert "imagenet (ID)" in capsys.readouterr().out


def _templates_file(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("\n".join(TINY_TEMPLATES) + "\n")
    return path


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--imagenet", "somewhere"], "--imagenet needs --suite imagenet"),
        (["--imagenet", "a", "--objectnet", "b"], "--imagenet, --objectnet need --suite imagenet"),
        (["--suite", "imagenet"], "--suite imagenet needs --imagenet"),
        (["--suite", "imagenet", "--imagenet", "x", "--id-dataset", "y"], "drop --id-dataset"),
    ],
)
def test_cli_suite_argument_errors(tiny_pair_dirs, arguments, message):
    with pytest.raises(SystemExit, match=message):
        main(["evaluate", *pair_arguments(tiny_pair_dirs), *arguments])


def test_cli_suite_wordnet_names_need_class_names(suite_root, tiny_pair_dirs, tmp_path):
    with pytest.raises(SystemExit, match="label names are WordNet ids"):
        main([
            "evaluate", "--suite", "imagenet", *pair_arguments(tiny_pair_dirs),
            "--imagenet", str(suite_root / "imagenet"), "--cache-dir", str(tmp_path / "cache"),
        ])


def saved_dataset(path, label_names, labels, *, image_column="image", label_feature=None):
    rng = np.random.default_rng(len(labels))
    images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in labels]
    features = datasets.Features({
        image_column: datasets.Image(),
        "label": label_feature or datasets.ClassLabel(names=label_names),
    })
    datasets.Dataset.from_dict({image_column: images, "label": labels}, features=features).save_to_disk(str(path))
    return path


def test_cli_shift_datasets_by_wordnet_id_and_name(suite_root, tiny_pair_dirs, tmp_path, capsys):
    # A shifted image folder named by WordNet id, with one unreadable and one truncated file.
    shifted = write_image_folder(tmp_path / "shifted", [WNIDS[1], WNIDS[3]], count=3, seed=60)
    (shifted / WNIDS[1] / "unreadable.png").write_bytes(b"this is not an image")
    intact = (shifted / WNIDS[3] / "image_0.png").read_bytes()
    (shifted / WNIDS[3] / "truncated.png").write_bytes(intact[: len(intact) // 2])
    named = saved_dataset(tmp_path / "named", ["Goldfish", "tench"], [0, 1, 0, 1])
    output_dir = tmp_path / "results"

    exit_code = main([
        "evaluate", *pair_arguments(tiny_pair_dirs), "--class-names", str(suite_root / "class_names.txt"),
        "--templates", str(_templates_file(tmp_path)), "--id-dataset", str(suite_root / "imagenet"),
        "--shift-dataset", f"by_wordnet_id={shifted}", "--shift-dataset", f"by_name={named}",
        "--alphas", "0,1", "--output-dir", str(output_dir), "--no-progress", "--no-plots",
    ])

    assert exit_code == 0, capsys.readouterr().err
    results = json.loads((output_dir / "results.json").read_text())
    assert results["sets"]["by_wordnet_id"]["num_classes"] == 2
    assert results["sets"]["by_wordnet_id"]["num_examples"] == 6
    assert results["sets"]["by_wordnet_id"]["num_skipped"] == 2
    assert results["sets"]["by_name"]["num_classes"] == 2
    assert results["sets"]["imagenet"]["num_skipped"] == 0
    printed = capsys.readouterr().out
    assert "by_wordnet_id: 2 of 8 images could not be read and were skipped" in printed


def run_cli_error(arguments, capsys):
    capsys.readouterr()
    exit_code = main(["evaluate", *arguments, "--no-progress", "--no-plots"])
    assert exit_code == 1
    error = capsys.readouterr().err
    assert "hf-dawin evaluate: error:" in error
    return error


def test_cli_missing_image_column(tiny_pair_dirs, tmp_path, capsys):
    dataset = saved_dataset(tmp_path / "photos", NAMES, [0, 1, 2, 3], image_column="img")

    error = run_cli_error([*pair_arguments(tiny_pair_dirs), "--id-dataset", str(dataset), "--output-dir", str(tmp_path / "out")], capsys)

    assert f"error: --id-dataset {dataset}: The evaluation dataset {str(dataset)!r} has no column 'image' (image_column)" in error
    assert "['img', 'label']" in error


def test_cli_errors_name_their_option(tiny_pair_dirs, tmp_path, capsys):
    id_dataset = saved_dataset(tmp_path / "id", NAMES, [0, 1, 2, 3])
    missing = tmp_path / "missing"
    names = tmp_path / "names.txt"
    names.write_text("Tench\ngoldfish\ntench\ntiger shark\n")

    error = run_cli_error([
        *pair_arguments(tiny_pair_dirs), "--id-dataset", str(id_dataset), "--shift-dataset", f"gone={missing}",
        "--output-dir", str(tmp_path / "out"),
    ], capsys)  # fmt: skip
    assert f"error: --shift-dataset gone={missing}: Evaluation dataset directory '{missing}' does not exist." in error

    error = run_cli_error([
        *pair_arguments(tiny_pair_dirs), "--id-dataset", str(id_dataset), "--class-names", str(names),
        "--output-dir", str(tmp_path / "out"),
    ], capsys)  # fmt: skip
    assert f"error: --class-names {names}: class_names contains duplicates" in error
    assert "'Tench' at index 0 and 'tench' at index 2." in error
    assert not (tmp_path / "out").exists()


def test_cli_missing_label_column(tiny_pair_dirs, tmp_path, capsys):
    dataset = saved_dataset(tmp_path / "photos", NAMES, [0, 1, 2, 3])

    error = run_cli_error([
        *pair_arguments(tiny_pair_dirs), "--id-dataset", str(dataset), "--label-column", "target",
        "--output-dir", str(tmp_path / "out"),
    ], capsys)

    assert "no column 'target' (label_column)" in error
    assert "['image', 'label']" in error


def test_cli_shift_labels_outside_model_classes(suite_root, tiny_pair_dirs, tmp_path, capsys):
    shifted = saved_dataset(tmp_path / "zoo", ["tench", "zebra"], [0, 1])

    error = run_cli_error([
        *pair_arguments(tiny_pair_dirs), "--class-names", str(suite_root / "class_names.txt"),
        "--templates", str(_templates_file(tmp_path)), "--id-dataset", str(suite_root / "imagenet"),
        "--shift-dataset", f"zoo={shifted}", "--output-dir", str(tmp_path / "out"),
    ], capsys)

    assert "'zebra'" in error
    assert not (tmp_path / "out").exists()


def test_cli_integer_labels_in_shift_sets(tiny_pair_dirs, tmp_path, capsys):
    from .conftest import TINY_CLASS_NAMES

    class_names = tmp_path / "classes.txt"
    class_names.write_text("\n".join(TINY_CLASS_NAMES) + "\n")
    integers = datasets.Value("int64")
    id_dataset = saved_dataset(tmp_path / "id", None, [0, 1, 2, 3, 1], label_feature=integers)
    shifted = saved_dataset(tmp_path / "shift", None, [3, 2, 1, 0], label_feature=integers)
    arguments = [
        *pair_arguments(tiny_pair_dirs), "--class-names", str(class_names), "--id-dataset", str(id_dataset),
        "--alphas", "0,1", "--no-progress", "--no-plots",
    ]

    exit_code = main(["evaluate", *arguments, "--shift-dataset", f"ints={shifted}", "--output-dir", str(tmp_path / "out")])

    assert exit_code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["sets"]["ints"]["num_examples"] == 4
    assert results["sets"]["ints"]["num_classes"] == len(TINY_CLASS_NAMES)
    out_of_range = saved_dataset(tmp_path / "out_of_range", None, [0, 9], label_feature=integers)
    error = run_cli_error([
        *arguments, "--shift-dataset", f"bad={out_of_range}", "--output-dir", str(tmp_path / "out2"),
    ], capsys)  # fmt: skip
    assert f"error: --shift-dataset bad={out_of_range}: " in error
    assert "outside the valid range [0, 3]: 9" in error


def test_cli_class_names_order_does_not_change_scores(tiny_pair_dirs, tmp_path):
    from .conftest import TINY_CLASS_NAMES

    # imagefolder sorts class folders, so the datasets' label order differs from the model's class order.
    sorted_names = sorted(TINY_CLASS_NAMES)
    labels = [0, 1, 2, 3, 3, 2, 1, 0, 2, 1]
    id_dataset = saved_dataset(tmp_path / "id", sorted_names, labels)
    shifted = saved_dataset(tmp_path / "shift", sorted_names, labels[::-1])
    scores = {}
    for order, names in (("model", TINY_CLASS_NAMES), ("sorted", sorted_names)):
        class_names = tmp_path / f"{order}.txt"
        class_names.write_text("\n".join(names) + "\n")
        output_dir = tmp_path / f"out_{order}"
        exit_code = main([
            "evaluate", *pair_arguments(tiny_pair_dirs), "--class-names", str(class_names),
            "--id-dataset", str(id_dataset), "--shift-dataset", f"shift={shifted}", "--alphas", "0,1",
            "--output-dir", str(output_dir), "--no-progress", "--no-plots",
        ])  # fmt: skip
        assert exit_code == 0
        results = json.loads((output_dir / "results.json").read_text())
        scores[order] = {
            name: {method: entry["scores"][method]["accuracy"] for method in ("zero_shot", "fine_tuned", "dawin_sample")}
            for name, entry in results["sets"].items()
        }

    assert scores["model"] == scores["sorted"]


def test_cli_integer_labels_out_of_range(suite_root, tiny_pair_dirs, tmp_path, capsys):
    dataset = saved_dataset(tmp_path / "ints", None, [0, 3, 7], label_feature=datasets.Value("int64"))

    error = run_cli_error([
        *pair_arguments(tiny_pair_dirs), "--class-names", str(suite_root / "class_names.txt"),
        "--templates", str(_templates_file(tmp_path)), "--id-dataset", str(dataset),
        "--output-dir", str(tmp_path / "out"),
    ], capsys)

    assert f"error: --id-dataset {dataset}: " in error
    assert "outside the valid range [0, 3]: 7" in error
