"""Tests for the bundled evaluate metrics, score computation and the image-classification evaluator."""

import numpy as np
import pytest
import torch
import transformers
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image

from hf_dawin.scoring import (
    METRICS_DIR,
    compute_scores,
    image_classification_evaluator,
    load_classification_metrics,
    load_metric,
)


PREDICTIONS = [0, 1, 1, 2, 2, 0, 1]
REFERENCES = [0, 1, 2, 2, 1, 1, 1]
CLASS_NAMES = ["apple", "pear", "plum"]


def _per_class_f1(predictions, references, label):
    true_positive = sum(p == label and r == label for p, r in zip(predictions, references))
    predicted = sum(p == label for p in predictions)
    actual = sum(r == label for r in references)
    if true_positive == 0:
        return 0.0
    precision = true_positive / predicted
    recall = true_positive / actual
    return 2 * precision * recall / (precision + recall)


def _manual_macro_f1(predictions, references):
    labels = sorted(set(predictions) | set(references))
    return sum(_per_class_f1(predictions, references, label) for label in labels) / len(labels)


def _manual_accuracy(predictions, references):
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


# ---------------------------------------------------------------------------------------------
# Metric modules


def test_metric_modules_are_package_files():
    assert (METRICS_DIR / "accuracy" / "accuracy.py").is_file()
    assert (METRICS_DIR / "f1" / "f1.py").is_file()


def test_accuracy_metric_matches_hand_count():
    accuracy = load_metric("accuracy", keep_in_memory=True)

    result = accuracy.compute(predictions=PREDICTIONS, references=REFERENCES)

    assert result == {"accuracy": pytest.approx(4 / 7)}


def test_accuracy_metric_counts_without_normalize():
    accuracy = load_metric("accuracy", keep_in_memory=True)

    result = accuracy.compute(predictions=PREDICTIONS, references=REFERENCES, normalize=False)

    assert result == {"accuracy": 4}
    assert isinstance(result["accuracy"], int)


def test_f1_metric_defaults_to_macro():
    f1 = load_metric("f1", keep_in_memory=True)

    result = f1.compute(predictions=PREDICTIONS, references=REFERENCES)

    assert result["f1"] == pytest.approx(_manual_macro_f1(PREDICTIONS, REFERENCES))


def test_f1_metric_per_class_scores():
    f1 = load_metric("f1", keep_in_memory=True)

    result = f1.compute(predictions=PREDICTIONS, references=REFERENCES, average=None)

    expected = [_per_class_f1(PREDICTIONS, REFERENCES, label) for label in range(3)]
    assert result["f1"] == pytest.approx(expected)


def test_f1_metric_micro_equals_accuracy():
    f1 = load_metric("f1", keep_in_memory=True)

    result = f1.compute(predictions=PREDICTIONS, references=REFERENCES, average="micro")

    assert result["f1"] == pytest.approx(_manual_accuracy(PREDICTIONS, REFERENCES))


def test_f1_metric_binary_positive_label():
    f1 = load_metric("f1", keep_in_memory=True)
    predictions = [1, 0, 1, 1]
    references = [1, 0, 0, 1]

    result = f1.compute(predictions=predictions, references=references, average="binary", pos_label=1)

    assert result["f1"] == pytest.approx(_per_class_f1(predictions, references, 1))


def test_load_metric_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"Unknown metric 'bleu'. The package bundles these metrics: \['accuracy', 'f1'\]"):
        load_metric("bleu")


def test_combined_metrics_return_both():
    metrics = load_classification_metrics(keep_in_memory=True)

    result = metrics.compute(predictions=PREDICTIONS, references=REFERENCES)

    assert set(result) == {"accuracy", "f1"}
    assert result["accuracy"] == pytest.approx(_manual_accuracy(PREDICTIONS, REFERENCES))
    assert result["f1"] == pytest.approx(_manual_macro_f1(PREDICTIONS, REFERENCES))


def test_combine_forwards_average_to_accuracy():
    """`evaluate.combine` sends `average` to every module, which is why F1 defaults to macro."""
    metrics = load_classification_metrics(keep_in_memory=True)

    with pytest.raises(TypeError, match="unexpected keyword argument 'average'"):
        metrics.compute(predictions=PREDICTIONS, references=REFERENCES, average="macro")


def test_combined_metrics_accumulate_batches():
    metrics = load_classification_metrics(keep_in_memory=True)

    metrics.add_batch(predictions=PREDICTIONS[:3], references=REFERENCES[:3])
    metrics.add_batch(predictions=PREDICTIONS[3:], references=REFERENCES[3:])
    result = metrics.compute()

    assert result["accuracy"] == pytest.approx(_manual_accuracy(PREDICTIONS, REFERENCES))
    assert result["f1"] == pytest.approx(_manual_macro_f1(PREDICTIONS, REFERENCES))


# ---------------------------------------------------------------------------------------------
# compute_scores


@pytest.mark.parametrize(
    "convert",
    [list, np.asarray, torch.tensor, lambda values: np.asarray(values, dtype=np.int32)],
)
def test_compute_scores_input_types(convert):
    scores = compute_scores(convert(PREDICTIONS), convert(REFERENCES))

    assert scores["accuracy"] == pytest.approx(_manual_accuracy(PREDICTIONS, REFERENCES))
    assert scores["f1"] == pytest.approx(_manual_macro_f1(PREDICTIONS, REFERENCES))
    assert all(type(value) is float for value in scores.values())


def test_compute_scores_perfect_predictions():
    scores = compute_scores([2, 0, 1], [2, 0, 1])

    assert scores == {"accuracy": 1.0, "f1": 1.0}


@pytest.mark.parametrize(
    ("predictions", "references", "error", "message"),
    [
        ([0, 1], [0], ValueError, "predictions has 2 entries but references has 1"),
        ([], [], ValueError, "predictions and references are empty"),
        (torch.zeros(2, 3, dtype=torch.long), [0, 1], ValueError, r"predictions must be 1-D .* got shape \(2, 3\). Take the argmax"),
        ([0.0, 1.0], [0, 1], TypeError, "predictions must contain integer class indices, got dtype float64"),
        ([0, 1], "01", TypeError, "references must be a 1-D tensor, array or list of class indices, got str"),
        ([0, 1], 3, TypeError, "got int"),
    ],
)
def test_compute_scores_rejects_bad_inputs(predictions, references, error, message):
    with pytest.raises(error, match=message):
        compute_scores(predictions, references)


# ---------------------------------------------------------------------------------------------
# Image-classification evaluator on a tiny ViT


@pytest.fixture(scope="module")
def tiny_classifier():
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=16,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=3,
        id2label=dict(enumerate(CLASS_NAMES)),
        label2id={name: index for index, name in enumerate(CLASS_NAMES)},
    )
    model = transformers.ViTForImageClassification(config).eval()
    processor_class = getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)
    processor = processor_class(size={"height": 32, "width": 32})
    return model, processor


@pytest.fixture(scope="module")
def labelled_images(tiny_classifier):
    """Eight random images labelled so that the tiny model gets exactly five right."""
    model, processor = tiny_classifier
    generator = np.random.default_rng(0)
    images = [Image.fromarray(generator.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(8)]
    with torch.no_grad():
        logits = model(**processor(images=images, return_tensors="pt")).logits
    predictions = logits.argmax(dim=-1).tolist()
    labels = [prediction if index < 5 else (prediction + 1) % 3 for index, prediction in enumerate(predictions)]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=CLASS_NAMES)})
    dataset = Dataset.from_dict({"image": images, "label": labels}, features=features)
    return dataset, predictions


def test_plain_evaluator_fails_on_pipeline(tiny_classifier, labelled_images):
    """Without the placeholder, evaluate 0.4.6 looks up transformers.TFPreTrainedModel and fails."""
    import evaluate

    if hasattr(transformers, "TFPreTrainedModel"):
        pytest.skip("This transformers version still defines TFPreTrainedModel.")
    model, processor = tiny_classifier
    dataset, _ = labelled_images
    pipe = transformers.pipeline("image-classification", model=model, image_processor=processor)
    evaluator = evaluate.evaluator("image-classification")

    with pytest.raises(AttributeError, match="TFPreTrainedModel"):
        evaluator.compute(
            model_or_pipeline=pipe,
            data=dataset,
            metric=load_metric("accuracy", keep_in_memory=True),
            label_mapping=model.config.label2id,
        )


def test_evaluator_scores_pipeline(tiny_classifier, labelled_images):
    model, processor = tiny_classifier
    dataset, _ = labelled_images
    pipe = transformers.pipeline("image-classification", model=model, image_processor=processor)

    result = image_classification_evaluator().compute(
        model_or_pipeline=pipe, data=dataset, label_mapping=model.config.label2id
    )

    assert result["accuracy"] == pytest.approx(5 / 8)
    assert not hasattr(transformers, "TFPreTrainedModel")


def test_evaluator_scores_model_with_f1(tiny_classifier, labelled_images):
    model, processor = tiny_classifier
    dataset, predictions = labelled_images

    result = image_classification_evaluator().compute(
        model_or_pipeline=model,
        feature_extractor=processor,
        data=dataset,
        metric="f1",
        label_mapping=model.config.label2id,
    )

    assert result["f1"] == pytest.approx(_manual_macro_f1(predictions, dataset["label"]))


def test_evaluator_accepts_combined_metrics(tiny_classifier, labelled_images):
    model, processor = tiny_classifier
    dataset, predictions = labelled_images
    pipe = transformers.pipeline("image-classification", model=model, image_processor=processor)

    result = image_classification_evaluator().compute(
        model_or_pipeline=pipe,
        data=dataset,
        metric=load_classification_metrics(keep_in_memory=True),
        label_mapping=model.config.label2id,
    )

    assert result["accuracy"] == pytest.approx(5 / 8)
    assert result["f1"] == pytest.approx(_manual_macro_f1(predictions, dataset["label"]))
