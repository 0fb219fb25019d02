"""Accuracy and F1 through the `evaluate` library, without Hub access.

`evaluate` 0.4.6 ships no metric scripts, so `evaluate.load("accuracy")` downloads one from the
Hub. The package bundles its own metric modules under `metrics/` and loads them by path. This
module also provides an `evaluate` image-classification evaluator that runs under transformers 5.
"""

import contextlib
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import evaluate
import numpy as np
import torch
import transformers
from transformers.utils import logging


logger = logging.get_logger(__name__)

METRICS_DIR = Path(__file__).parent / "metrics"
AVAILABLE_METRICS = ("accuracy", "f1")


def _metric_path(name: str) -> Path:
    if name not in AVAILABLE_METRICS:
        raise ValueError(f"Unknown metric {name!r}. The package bundles these metrics: {list(AVAILABLE_METRICS)}.")
    return METRICS_DIR / name / f"{name}.py"


def load_metric(name: str, **load_kwargs: Any) -> evaluate.EvaluationModule:
    """Load a metric module bundled with the package, without Hub access.

    Args:
        name: `"accuracy"` or `"f1"`. The F1 module averages over classes with `"macro"` by default.
        **load_kwargs: Passed to `evaluate.load`, e.g. `keep_in_memory=True`, or `num_process`,
            `process_id` and `experiment_id` for distributed evaluation.

    Returns:
        The loaded `evaluate.EvaluationModule`.

    Example:
        ```python
        >>> load_metric("accuracy").compute(predictions=[0, 1, 1], references=[0, 1, 0])
        {'accuracy': 0.6666666666666666}
        ```
    """
    return evaluate.load(str(_metric_path(name)), **load_kwargs)


def load_classification_metrics(**load_kwargs: Any) -> evaluate.CombinedEvaluations:
    """Combine the bundled accuracy and macro-F1 metrics into one `evaluate` module.

    `evaluate.combine` forwards every keyword argument of `compute` to every module, so
    `compute(..., average="macro")` would fail in the accuracy module. The F1 module therefore
    defaults to `average="macro"`, and no per-metric argument is needed.

    Args:
        **load_kwargs: Passed to `evaluate.load` for each module.

    Returns:
        An `evaluate.CombinedEvaluations` whose `compute(predictions=..., references=...)` returns
        `{"accuracy": ..., "f1": ...}`.
    """
    return evaluate.combine([load_metric("accuracy", **load_kwargs), load_metric("f1", **load_kwargs)])


def _as_label_list(values: Any, argument: str) -> list[int]:
    """Convert a 1-D tensor, array or sequence of integer class indices to a list of `int`."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if isinstance(values, (str, bytes)) or not isinstance(values, (np.ndarray, Sequence)):
        raise TypeError(
            f"{argument} must be a 1-D tensor, array or list of class indices, got {type(values).__name__}."
        )
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(
            f"{argument} must be 1-D (one class index per example), got shape {array.shape}. "
            "Take the argmax over the class dimension first."
        )
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{argument} must contain integer class indices, got dtype {array.dtype}.")
    return array.astype(np.int64).tolist()


def compute_scores(predictions: Any, references: Any) -> dict[str, float]:
    """Compute accuracy and macro F1 with the bundled `evaluate` metrics.

    Args:
        predictions (`torch.Tensor`, `np.ndarray` or list of shape `(num_examples,)`): Predicted class indices.
        references (`torch.Tensor`, `np.ndarray` or list of shape `(num_examples,)`): Reference class indices.

    Returns:
        `{"accuracy": float, "f1": float}`. F1 is macro-averaged over the classes present in either input.

    Raises:
        TypeError: If an input is not a sequence of integers.
        ValueError: If an input is not 1-D, the inputs differ in length, or they are empty.
    """
    predictions = _as_label_list(predictions, "predictions")
    references = _as_label_list(references, "references")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions has {len(predictions)} entries but references has {len(references)}. "
            "Pass one prediction per reference."
        )
    if not predictions:
        raise ValueError("predictions and references are empty, but scores need at least one example.")

    metrics = load_classification_metrics(keep_in_memory=True)
    results = metrics.compute(predictions=predictions, references=references)
    return {name: float(value) for name, value in results.items()}


class _NoTensorFlowModel:
    """Placeholder for `transformers.TFPreTrainedModel`, which no object is an instance of."""


@contextlib.contextmanager
def _tensorflow_model_placeholder() -> Iterator[None]:
    """Define `transformers.TFPreTrainedModel` for the duration of the block if it is missing.

    NOTE: transformers 5 removed the TensorFlow classes, but `evaluate` 0.4.6
    `Evaluator.prepare_pipeline` still runs `isinstance(model_or_pipeline,
    transformers.TFPreTrainedModel)` for any model that is neither a string nor a PyTorch model,
    e.g. a ready `Pipeline`. That raises AttributeError. The placeholder makes the check false.
    The attribute is removed again on exit, but other threads can see it while the block runs.
    """
    if hasattr(transformers, "TFPreTrainedModel"):
        yield
        return
    setattr(transformers, "TFPreTrainedModel", _NoTensorFlowModel)
    try:
        yield
    finally:
        delattr(transformers, "TFPreTrainedModel")


@functools.cache
def _evaluator_class() -> type:
    # Imported here because `evaluate.evaluator` imports the transformers pipelines, which is slow.
    from evaluate.evaluator import ImageClassificationEvaluator

    class DaWinImageClassificationEvaluator(ImageClassificationEvaluator):
        """`evaluate`'s image-classification evaluator, patched for transformers 5, with bundled metrics."""

        def prepare_pipeline(self, *args, **kwargs):
            with _tensorflow_model_placeholder():
                return super().prepare_pipeline(*args, **kwargs)

        def prepare_metric(self, metric):
            if isinstance(metric, str) and metric in AVAILABLE_METRICS:
                return load_metric(metric)
            return super().prepare_metric(metric)

    return DaWinImageClassificationEvaluator


def image_classification_evaluator() -> "evaluate.evaluator.ImageClassificationEvaluator":
    """Build `evaluate`'s image-classification evaluator so that it works offline under transformers 5.

    The evaluator differs from `evaluate.evaluator("image-classification")` (evaluate 0.4.6) in two
    ways. Its pipeline check works when `model_or_pipeline` is a `Pipeline`, although transformers 5
    has no `transformers.TFPreTrainedModel`. The metric names `"accuracy"` and `"f1"`, and the
    default metric (accuracy), load the bundled modules instead of the Hub.

    Returns:
        An `ImageClassificationEvaluator` subclass instance. Call its `compute(model_or_pipeline=...,
        data=..., metric=..., label_mapping=...)` as documented by `evaluate`.

    Example:
        ```python
        >>> evaluator = image_classification_evaluator()
        >>> pipe = transformers.pipeline("image-classification", model=model, image_processor=processor)
        >>> evaluator.compute(model_or_pipeline=pipe, data=dataset, label_mapping=model.config.label2id)
        ```
    """
    evaluator_class = _evaluator_class()
    return evaluator_class(task="image-classification", default_metric_name=str(_metric_path("accuracy")))


__all__ = [
    "AVAILABLE_METRICS",
    "METRICS_DIR",
    "compute_scores",
    "image_classification_evaluator",
    "load_classification_metrics",
    "load_metric",
]
