"""Multi-task evaluation of DaWin against static merges of several fine-tuned endpoints.

For each task the endpoint pass runs once: the pre-trained endpoint and every fine-tuned endpoint classify the
task's images with their own heads for that task. Their logits give the individual models' scores and DaWin's
task weights pi(x). The merged models (weight averaging, task arithmetic, TIES, DaWin dataset-mean, and the
exact per-sample DaWin) then share one more pass, which reads each batch once. Only per-sample logits, labels
and task weights are kept between passes, never images.

`main_multitask` is the `hf-dawin evaluate-multitask` command. Without model arguments it runs the embedded
suite: MNIST, Fashion-MNIST and scikit-learn digits, with a CLIP-architecture model pre-trained and fine-tuned
by this project (not OpenAI CLIP weights).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import is_offline_mode
from transformers.utils import logging

from .cli import (
    add_dtype_argument,
    add_weights_argument,
    check_output_dir,
    check_split_suffixes,
    evaluation_dtype,
    library_progress_bars,
    local_model_type,
    one_line,
    place_on_process_device,
    record_run_settings,
    saved_model_dtype,
    weights_format,
)
from .distributed import (
    DistributedState,
    RankFailedError,
    RankLostError,
    get_distributed_state,
    is_main_launch_process,
)
from .evaluation import (
    EvaluationSet,
    _default_state,
    _project,
    _skipped_positions,
    check_labels,
    run_gathered_pass,
    run_method_pass,
)
from .modeling_multitask import DaWinMultiTaskCLIPModel, coefficients_from_task_weights
from .scoring import compute_scores
from .suites import split_source


logger = logging.get_logger(__name__)

__all__ = [
    "MultiTaskEvaluateArguments",
    "MultiTaskEvaluationSettings",
    "TaskPredictions",
    "collect_task_predictions",
    "evaluate_multitask",
    "main_multitask",
    "parse_multitask_arguments",
    "run_evaluate_multitask",
    "summarize_multitask",
]

# Merged models in the order they are reported, after the pre-trained and the individual fine-tuned models.
MERGE_METHODS = ("weight_average", "task_arithmetic", "ties", "dawin_dataset_mean", "dawin_sample")
METHOD_LABELS = {
    "pretrained": "Pre-trained (zero-shot)",
    "fine_tuned_expert": "Fine-tuned on the task (expert)",
    "weight_average": "Weight averaging",
    "task_arithmetic": "Task arithmetic",
    "ties": "TIES-merging",
    "dawin_dataset_mean": "DaWin (dataset mean)",
    "dawin_sample": "DaWin (per sample)",
}
_FINE_TUNED_PREFIX = "fine_tuned:"
# Options that only custom endpoints and datasets read: argument name to flag.
_EMBEDDED_IGNORED = {
    "split": "--split",
    "image_column": "--image-column",
    "label_column": "--label-column",
    "templates": "--templates",
}


@dataclass
class MultiTaskEvaluationSettings:
    """Settings of a multi-task evaluation.

    Attributes:
        include_ties (`bool`): Also evaluate TIES-merging with the model's `ties_density` and `ties_scale`.
        progress (`bool`): Show progress bars.
    """

    include_ties: bool = True
    progress: bool = True


@dataclass
class TaskPredictions:
    """Per-sample results of the endpoint pass over one task's set, ordered by example index.

    Attributes:
        pretrained_logits (`torch.Tensor` of shape `(num_examples, num_classes)`): Pre-trained logits.
        fine_tuned_logits (`torch.Tensor` of shape `(num_examples, num_fine_tuned, num_classes)`): Logits of each
            fine-tuned endpoint with its own head for the task.
        labels (`torch.Tensor` of shape `(num_examples,)`): Class indices in the set's label space.
        indices (`torch.Tensor` of shape `(num_examples,)`): Sorted positions in the set of the examples that were
            read; a batch source may skip unreadable images.
        method_logits (`dict[str, torch.Tensor]`): Logits `(num_examples, num_classes)` of each method.
    """

    pretrained_logits: torch.Tensor
    fine_tuned_logits: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    method_logits: dict[str, torch.Tensor] = field(default_factory=dict)


def _method_label(method: str) -> str:
    if method.startswith(_FINE_TUNED_PREFIX):
        return f"Fine-tuned: {method[len(_FINE_TUNED_PREFIX):]}"
    return METHOD_LABELS[method]


@torch.inference_mode()
def collect_task_predictions(
    model: DaWinMultiTaskCLIPModel,
    task: str,
    evaluation_set: EvaluationSet,
    *,
    progress: bool = True,
    state: DistributedState | None = None,
) -> TaskPredictions:
    """Run every endpoint once over a task's set and keep their projected logits and the labels.

    In a multi-process run each rank runs its share of the batches and every rank returns the gathered
    predictions of the whole set.

    Args:
        model ([`DaWinMultiTaskCLIPModel`]): The endpoints and their heads.
        task (`str`): Task whose heads classify the set.
        evaluation_set ([`EvaluationSet`]): The task's images; its `projection`, if any, maps the task's classes
            to the set's label space before entropies and scores.
        progress (`bool`, *optional*, defaults to `True`): Show a progress bar.
        state ([`DistributedState`], *optional*): The processes; defaults to the current launch.

    Returns:
        [`TaskPredictions`].

    Raises:
        ValueError: If the set is empty or a label is outside the set's label space.
        RankFailedError: If a rank of a multi-process run failed (the message names it).
    """
    if evaluation_set.num_examples == 0:
        raise ValueError(f"The evaluation set of task '{task}' is empty; it needs at least one example.")
    projection = evaluation_set.projection

    def compute(pixel_values, labels, indices):
        fine_tuned = model.fine_tuned_logits(pixel_values, task)
        projected = [_project(projection, fine_tuned[:, index]) for index in range(fine_tuned.shape[1])]
        return {
            "pretrained": _project(projection, model.pretrained_logits(pixel_values, task)),
            "fine_tuned": torch.stack(projected, dim=1),
            "labels": labels.long(),
        }

    empty_logits = _project(projection, torch.zeros(0, model.config.num_classes(task)))
    empty = {
        "pretrained": empty_logits,
        "fine_tuned": empty_logits.unsqueeze(1).expand(-1, model.num_fine_tuned, -1),
        "labels": torch.zeros(0, dtype=torch.long),
    }
    rows = run_gathered_pass(
        evaluation_set, "endpoints", compute, empty,
        step=f"the endpoint pass over task '{task}'", progress=progress, state=state,
    )  # fmt: skip
    if rows["indices"].numel() == 0:
        raise ValueError(
            f"The evaluation set of task '{task}' has no readable images. Check that its image column holds "
            "images that PIL can open. A warning above counts the skipped images and names the first."
        )
    predictions = TaskPredictions(
        pretrained_logits=rows["pretrained"],
        fine_tuned_logits=rows["fine_tuned"],
        labels=rows["labels"],
        indices=rows["indices"],
    )
    check_labels(
        predictions.labels, predictions.pretrained_logits.shape[1], f"The set of task '{task}'",
        "Check the label column and the class names of this task.",
    )  # fmt: skip
    return predictions


def evaluate_multitask(
    model: DaWinMultiTaskCLIPModel,
    task_sets: Mapping[str, EvaluationSet],
    settings: MultiTaskEvaluationSettings | None = None,
    *,
    state: DistributedState | None = None,
) -> dict:
    """Evaluate multi-task DaWin, the individual endpoints and static merges on each task's images.

    Each task reports the pre-trained endpoint, each fine-tuned endpoint and the expert, which is the fine-tuned
    endpoint named like the task (reported when every task has one). The merges follow: weight averaging, task
    arithmetic, TIES-merging (optional), DaWin with the dataset-mean task weights of the task's set, and exact
    per-sample DaWin. The summary averages each method over the tasks.

    Args:
        model ([`DaWinMultiTaskCLIPModel`]): The endpoints to evaluate.
        task_sets (`Mapping[str, EvaluationSet]`): The evaluation set of each task, keyed by a task name of the
            model.
        settings ([`MultiTaskEvaluationSettings`], *optional*): TIES on or off, and progress bars.
        state ([`DistributedState`], *optional*): The processes of a multi-process run; defaults to the current
            launch. Every pass is split across the processes and its per-sample logits are gathered, so every
            process computes the task weights and scores of a single-process run and returns the same results.

    Returns:
        `dict` (JSON-serialisable). `"tasks"` has, per task, the scores of every method and statistics of the
        task weights pi. `"summary"` has the accuracy of every method per task and averaged over tasks. The
        methods in report order, the fine-tuned endpoint names and the settings complete it.

    Raises:
        ValueError: If `task_sets` is empty, names a task the model does not have, or a set is empty.
        RankFailedError: If a rank of a multi-process run failed (the message names it).
    """
    settings = settings or MultiTaskEvaluationSettings()
    state = _default_state(state)
    if not task_sets:
        raise ValueError(f"task_sets is empty; pass an evaluation set for at least one of the tasks {model.config.task_names}.")
    for task in task_sets:
        model.resolve_task(task)
    names = list(model.config.fine_tuned_names)
    scale = model.config.scale

    methods = ["pretrained", *(f"{_FINE_TUNED_PREFIX}{name}" for name in names)]
    has_experts = all(task in names for task in task_sets)
    if has_experts:
        methods.append("fine_tuned_expert")
    elif state.is_main_process:
        logger.warning(
            f"The results have no 'Fine-tuned on the task (expert)' row: the fine-tuned endpoints are named {names}, "
            f"which does not include every evaluated task {list(task_sets)}. Name each endpoint after its task "
            "(--fine-tuned TASK=SOURCE on the command line, fine_tuned_names= in Python) to get the row."
        )
    methods += [method for method in MERGE_METHODS if settings.include_ties or method != "ties"]

    results_tasks = {}
    for task, evaluation_set in task_sets.items():
        # Endpoint pass: the individual models and the task weights of every image.
        predictions = collect_task_predictions(model, task, evaluation_set, progress=settings.progress, state=state)
        task_weights, entropies = model.task_weights_from_logits(predictions.fine_tuned_logits)
        sample_coefficients = coefficients_from_task_weights(task_weights, scale)
        dataset_coefficients = coefficients_from_task_weights(task_weights.mean(dim=0), scale)
        predictions.method_logits["pretrained"] = predictions.pretrained_logits
        for index, name in enumerate(names):
            predictions.method_logits[f"{_FINE_TUNED_PREFIX}{name}"] = predictions.fine_tuned_logits[:, index]
        if has_experts:
            predictions.method_logits["fine_tuned_expert"] = predictions.fine_tuned_logits[:, names.index(task)]

        # The merged models share one pass: each batch is read once and classified by every merge.
        static = {
            "weight_average": model.static_coefficients("weight_average"),
            "task_arithmetic": model.static_coefficients("task_arithmetic"),
            "dawin_dataset_mean": dataset_coefficients,
        }
        merges = {
            method: lambda pixel_values, rows, c=coefficients: model.static_logits(pixel_values, task, c)
            for method, coefficients in static.items()
        }
        if settings.include_ties:
            merges["ties"] = lambda pixel_values, rows: model.ties_logits(pixel_values, task)
        merges["dawin_sample"] = lambda pixel_values, rows: model.interpolated_logits(
            pixel_values, task, sample_coefficients[rows]
        )
        predictions.method_logits.update(
            run_method_pass(
                evaluation_set, predictions.indices, "merged models", merges,
                num_classes=model.config.num_classes(task), progress=settings.progress, state=state,
            )  # fmt: skip
        )
        model.clear_merged_cache()

        # Scores.
        scores = {
            method: compute_scores(predictions.method_logits[method].argmax(dim=-1), predictions.labels)
            for method in methods
        }
        results_tasks[task] = {
            "num_examples": int(predictions.indices.numel()),
            "num_skipped": evaluation_set.num_examples - int(predictions.indices.numel()),
            "skipped_positions": _skipped_positions(predictions.indices, evaluation_set.num_examples),
            "num_classes": int(predictions.pretrained_logits.shape[1]),
            "scores": scores,
            "task_weights": {
                "mean": task_weights.mean(dim=0).tolist(),
                "std": task_weights.std(dim=0).tolist() if task_weights.shape[0] > 1 else [0.0] * len(names),
                "argmax_share": torch.bincount(task_weights.argmax(dim=-1), minlength=len(names)).div(
                    task_weights.shape[0]
                ).tolist(),
            },
            "entropy_mean": entropies.mean(dim=0).tolist(),
            "dataset_mean_coefficients": dataset_coefficients.tolist(),
        }
        logger.info(
            "Task %s: %s", task,
            ", ".join(f"{_method_label(m)} {100 * scores[m]['accuracy']:.2f}" for m in methods),
        )  # fmt: skip

    summary = {}
    for method in methods:
        per_task = {task: results_tasks[task]["scores"][method]["accuracy"] for task in results_tasks}
        summary[method] = {"per_task": per_task, "average": float(np.mean(list(per_task.values())))}
    return {
        "tasks": results_tasks,
        "methods": methods,
        "method_labels": {method: _method_label(method) for method in methods},
        "fine_tuned_names": names,
        "settings": {
            **asdict(settings),
            "scale": scale,
            "ties_density": model.config.ties_density,
            "ties_scale": model.config.ties_scale,
        },
        "summary": summary,
    }


def summarize_multitask(results: dict, *, markdown: bool = False) -> str:
    """Format the accuracy table: one row per method, one column per task, then the average over tasks.

    Args:
        results (`dict`): Output of [`evaluate_multitask`].
        markdown (`bool`, *optional*, defaults to `False`): Markdown table instead of aligned text.

    Returns:
        `str`: Accuracies in percent.
    """
    tasks = list(results["tasks"])
    headers = ["Method", *tasks, "Average"]
    rows = []
    for method in results["methods"]:
        row = [results["method_labels"][method]]
        row += [f"{100 * results['tasks'][task]['scores'][method]['accuracy']:.2f}" for task in tasks]
        average = results["summary"][method]["average"]
        row.append("-" if math.isnan(average) else f"{100 * average:.2f}")
        rows.append(row)

    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in [headers, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Command line: `hf-dawin evaluate-multitask`
# ----------------------------------------------------------------------------------------------------------


@dataclass
class MultiTaskEvaluateArguments:
    """Arguments of `hf-dawin evaluate-multitask`; see `hf-dawin evaluate-multitask --help` for each one."""

    model: str | None = None
    pretrained: str | None = None
    fine_tuned: list[str] = field(default_factory=list)
    task_datasets: list[str] = field(default_factory=list)
    split: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    templates: str | None = None
    scale: float | None = None
    ties: bool = True
    ties_density: float | None = None
    batch_size: int = 256
    max_examples: int | None = None
    output_dir: str = "hf_dawin_multitask_results"
    cache_dir: str | None = None
    seed: int = 0
    progress: bool = True
    plots: bool = True
    push_results: str | None = None
    dtype: str | None = None
    allow_torch_load: bool = False


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-dawin evaluate-multitask",
        description=(
            "Score multi-task DaWin against the individual fine-tuned endpoints, weight averaging, task arithmetic "
            "and TIES-merging on each task. With no model arguments, runs the embedded suite (MNIST, "
            "Fashion-MNIST, scikit-learn digits) with a tiny CLIP trained by hf_dawin, not OpenAI CLIP weights."
        ),
    )

    # Model: a saved multi-task DaWin model, or endpoint checkpoints.
    parser.add_argument("--model", help="Saved multi-task DaWin model (directory or Hub id).")
    parser.add_argument("--pretrained", help="Pre-trained CLIP endpoint: Hub id or local directory.")
    parser.add_argument(
        "--fine-tuned", dest="fine_tuned", action="append", default=[], metavar="[NAME=]SOURCE",
        help=(
            "A fine-tuned CLIP endpoint (Hub id or local directory). Repeat once per endpoint. NAME (default: the "
            "last part of SOURCE) names its row, and an endpoint named after a task is that task's expert."
        ),
    )  # fmt: skip

    # Data.
    parser.add_argument(
        "--task-dataset", dest="task_datasets", action="append", default=[], metavar="TASK=SOURCE[:SPLIT]",
        help=(
            "Evaluation dataset of a task as TASK=SOURCE (Hub id, imagefolder or save_to_disk folder) with an "
            "optional :SPLIT. Repeat per task. With --pretrained, the task's class names are the dataset's label "
            "names."
        ),
    )  # fmt: skip
    parser.add_argument(
        "--split", help="Split of each dataset given without :SPLIT (default: test, else the only split)."
    )
    parser.add_argument("--image-column", default="image", help="Image column name (default: image).")
    parser.add_argument("--label-column", default="label", help="Label column name (default: label).")
    parser.add_argument("--templates", help="Prompt template file for every task (one template with {} per line).")

    # Merging, batching and output.
    parser.add_argument("--scale", type=float, help="Task-arithmetic scale s (default: the model's, else 0.3).")
    parser.add_argument("--no-ties", dest="ties", action="store_false", help="Skip TIES-merging.")
    parser.add_argument("--ties-density", type=float, help="Fraction of task-vector entries TIES keeps (default: 0.2).")
    parser.add_argument("--batch-size", type=int, default=256, help="Images per forward pass (default: 256).")
    add_dtype_argument(parser, "Entropies and task coefficients")
    add_weights_argument(parser)
    parser.add_argument(
        "--max-examples", type=int,
        help=(
            "Evaluate at most this many examples per task: a random sample drawn with --seed from your own "
            "datasets, the first test images of the embedded suite."
        ),
    )  # fmt: skip
    parser.add_argument(
        "--output-dir", default="hf_dawin_multitask_results",
        help="Folder for results.json, results.md and accuracy.png (default: hf_dawin_multitask_results).",
    )  # fmt: skip
    parser.add_argument("--cache-dir", help="Cache for data and the embedded suite (default: ~/.cache/hf_dawin).")
    parser.add_argument(
        "--seed", type=int, default=0,
        help="Seed of the embedded suite's training and the --max-examples sample (default: 0).",
    )  # fmt: skip
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="Hide progress bars.")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="Do not write accuracy.png.")
    parser.add_argument(
        "--push-results", metavar="REPO",
        help="Write the results into the model card of this Hub repository (created if it does not exist).",
    )  # fmt: skip
    return parser


def parse_multitask_arguments(argv: Sequence[str]) -> MultiTaskEvaluateArguments:
    """Parse `evaluate-multitask` arguments into [`MultiTaskEvaluateArguments`]."""
    return MultiTaskEvaluateArguments(**vars(_build_parser().parse_args(list(argv))))


def _named_endpoints(entries: Sequence[str]) -> tuple[list[str] | None, list[str]]:
    """Split `--fine-tuned [NAME=]SOURCE` entries into the endpoint names (None if no entry names one) and sources.

    An entry that is an existing local path is a source even if it contains `=`. Unnamed endpoints among named
    ones are named after the last part of their source.
    """
    named = [entry.split("=", 1) if "=" in entry and not os.path.exists(entry) else [None, entry] for entry in entries]
    sources = [source for _, source in named]
    if all(name is None for name, _ in named):
        return None, sources
    names = [name or Path(source.rstrip("/")).name for name, source in named]
    return names, sources


def _check_arguments(arguments: MultiTaskEvaluateArguments) -> None:
    evaluation_dtype(arguments.dtype)  # rejects a precision request it cannot run before any work starts
    endpoints_given = arguments.pretrained is not None or bool(arguments.fine_tuned)
    if endpoints_given and arguments.model is not None:
        raise SystemExit("error: give either --model or --pretrained with --fine-tuned, not both.")
    if endpoints_given and (arguments.pretrained is None or not arguments.fine_tuned):
        raise SystemExit("error: --pretrained needs at least one --fine-tuned endpoint, and the other way round.")
    if arguments.model is not None and local_model_type(arguments.model) == "dawin_clip":
        raise SystemExit(
            f"error: --model {arguments.model} is a DaWin pair (model type 'dawin_clip'), not a multi-task model. "
            f"Evaluate it with hf-dawin evaluate --model {arguments.model}."
        )
    if (endpoints_given or arguments.model) and not arguments.task_datasets:
        raise SystemExit("error: a custom model needs one --task-dataset TASK=SOURCE per task to evaluate.")
    if arguments.task_datasets and not (endpoints_given or arguments.model):
        raise SystemExit("error: --task-dataset needs a model: --model, or --pretrained with --fine-tuned.")
    if arguments.max_examples is not None and arguments.max_examples < 1:
        raise SystemExit(f"error: --max-examples must be at least 1, received {arguments.max_examples}.")
    if arguments.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be at least 1, received {arguments.batch_size}.")
    if arguments.push_results is not None and is_offline_mode():
        raise SystemExit("error: --push-results needs the Hub, but offline mode is on (HF_HUB_OFFLINE=1).")
    if arguments.scale is not None and not (math.isfinite(arguments.scale) and arguments.scale > 0):
        raise SystemExit(f"error: --scale must be a positive number, received {arguments.scale}.")
    if arguments.ties_density is not None and not 0 < arguments.ties_density <= 1:
        raise SystemExit(f"error: --ties-density must lie in (0, 1], received {arguments.ties_density}.")
    for entry in arguments.task_datasets:
        if "=" not in entry:
            raise SystemExit(f"error: --task-dataset expects TASK=SOURCE, received {entry!r}.")
    check_split_suffixes([("--task-dataset", entry.split("=", 1)[1]) for entry in arguments.task_datasets])
    unnamed = [entry for entry in arguments.fine_tuned if entry.startswith("=")]
    if unnamed:
        raise SystemExit(
            f"error: --fine-tuned {unnamed[0]} has an empty NAME before '='. Pass NAME=SOURCE, or SOURCE alone to "
            "name the endpoint after its folder."
        )
    task_names = [entry.split("=", 1)[0] for entry in arguments.task_datasets]
    repeated = sorted({name for name in task_names if task_names.count(name) > 1})
    if repeated:
        raise SystemExit(
            f"error: --task-dataset names each task once, but {repeated} appear more than once in {task_names}. "
            "Give one dataset per task."
        )
    if not (endpoints_given or arguments.model):
        from .cli import reject_unused_options

        reject_unused_options(
            arguments, MultiTaskEvaluateArguments(), _EMBEDDED_IGNORED, inputs="endpoints and datasets",
            run="the embedded suite", advice="--pretrained with --fine-tuned (or --model) and --task-dataset",
        )  # fmt: skip
    check_output_dir(Path(arguments.output_dir))


def _embedded_suite(arguments: MultiTaskEvaluateArguments):
    from .benchmarks.assets import default_cache_dir
    from .benchmarks.multitask import load_multitask_data, multitask_evaluation_sets, train_multitask_suite

    cache_dir = Path(arguments.cache_dir) if arguments.cache_dir else default_cache_dir()
    if is_main_launch_process():
        print(
            "Embedded multi-task suite: MNIST, Fashion-MNIST and scikit-learn digits; data and the trained endpoints "
            f"are cached in {cache_dir}",
            flush=True,
        )
    suite = train_multitask_suite(
        cache_dir / f"multitask_suite_seed{arguments.seed}", seed=arguments.seed, cache_dir=cache_dir,
        progress=arguments.progress,
    )  # fmt: skip
    tasks = list(suite.fine_tuned_dirs)
    model = DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
        suite.pretrained_dir, [suite.fine_tuned_dirs[task] for task in tasks],
        tasks=suite.tasks, templates=suite.templates, fine_tuned_names=tasks, dtype=evaluation_dtype(arguments.dtype),
        **_merge_overrides(arguments),
    )  # fmt: skip
    data = load_multitask_data(
        tuple(tasks), cache_dir, sklearn_digits_test_examples=suite.manifest["settings"]["sklearn_digits_test_examples"]
    )
    sets = multitask_evaluation_sets(data, max_examples=arguments.max_examples, batch_size=arguments.batch_size)
    return model, sets


def _merge_overrides(arguments: MultiTaskEvaluateArguments) -> dict:
    overrides = {}
    if arguments.scale is not None:
        overrides["scale"] = arguments.scale
    if arguments.ties_density is not None:
        overrides["ties_density"] = arguments.ties_density
    return overrides


def _custom_model(arguments: MultiTaskEvaluateArguments):
    from .cli import errors_naming
    from .datasets_io import iter_image_batches, label_names, load_evaluation_dataset
    from .distributed import dataset_shard_batches
    from .heads import check_class_names

    # A multi-task dataset's class names come from its ClassLabel column only.
    def names_of(dataset):
        return label_names(dataset, arguments.label_column, alternative=", or save the images in one folder per class")

    datasets_by_task, names_by_task, options = {}, {}, {}
    for entry in arguments.task_datasets:
        task, source = entry.split("=", 1)
        source, split = split_source(source)
        options[task] = f"--task-dataset {entry}"
        with errors_naming(options[task]):
            datasets_by_task[task] = load_evaluation_dataset(
                source, split=split or arguments.split, image_column=arguments.image_column,
                label_column=arguments.label_column,
                max_examples=arguments.max_examples, seed=arguments.seed, cache_dir=arguments.cache_dir,
            )  # fmt: skip
            names_by_task[task] = names_of(datasets_by_task[task])
            if not arguments.model:
                check_class_names(names_by_task[task])

    if arguments.model:
        model = DaWinMultiTaskCLIPModel.from_pretrained(
            arguments.model, **saved_model_dtype(arguments.dtype), **weights_format(arguments)
        )
        for key, value in _merge_overrides(arguments).items():
            setattr(model.config, key, value)
    else:
        fine_tuned_names, fine_tuned_sources = _named_endpoints(arguments.fine_tuned)
        model = DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
            arguments.pretrained, fine_tuned_sources, tasks=names_by_task, templates=arguments.templates,
            fine_tuned_names=fine_tuned_names,
            progress=arguments.progress, dtype=evaluation_dtype(arguments.dtype), **_merge_overrides(arguments),
            **weights_format(arguments),
        )  # fmt: skip
    if model.image_processor is None:
        raise SystemExit("error: no image processor was found beside the model; save one with the endpoints.")
    unknown = [task for task in datasets_by_task if task not in model.config.tasks]
    if unknown:
        raise ValueError(
            f"Unknown task {', '.join(map(repr, unknown))} in --task-dataset; the model classifies the tasks "
            f"{', '.join(map(repr, model.config.task_names))}. Name each dataset after one of them: "
            "--task-dataset TASK=SOURCE."
        )

    sets = {}
    for task, dataset in datasets_by_task.items():
        class_names = model.config.tasks[model.resolve_task(task)]
        dataset_names = names_by_task[task]
        with errors_naming(options[task]):
            projection = None if dataset_names == class_names else _task_projection(task, class_names, dataset_names)

        def make_batches(subset):
            return iter_image_batches(
                subset, model.image_processor, batch_size=arguments.batch_size,
                image_column=arguments.image_column, label_column=arguments.label_column,
            )  # fmt: skip

        sets[task] = EvaluationSet(
            name=task, batches=lambda dataset=dataset: make_batches(dataset), num_examples=len(dataset),
            in_distribution=True, projection=projection,
            shard_batches=dataset_shard_batches(make_batches, dataset, arguments.batch_size),
        )  # fmt: skip
    return model, sets


def _task_projection(task: str, class_names: list[str], dataset_names: list[str]):
    """Match a task dataset's label names to the task's class names, by name in any order, ignoring case."""
    from .label_spaces import projection_from_class_names, unmatched_class_names

    unmatched = unmatched_class_names(class_names, dataset_names)
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} label names of the {task!r} dataset are not classes of task {task!r} (compared "
            f"ignoring case): {unmatched[:20]}. The task's classes are {class_names}. Rename the dataset's labels or "
            "the task's classes so that they agree."
        )
    return projection_from_class_names(class_names, dataset_names)


def write_multitask_results(results: dict, output_dir: Path, *, plots: bool = True) -> dict[str, Path]:
    """Write results.json and results.md into `output_dir`, together and atomically.

    With `plots`, also write accuracy.png, the bar chart of `hf_dawin.plots.plot_multitask_accuracy`. An
    interrupted write leaves the files of an earlier run in `output_dir` as they were.
    """
    from .cli import json_ready, write_output_folder, write_text

    def write(folder: Path) -> dict[str, Path]:
        paths = {"json": folder / "results.json", "markdown": folder / "results.md"}
        write_text(paths["json"], json.dumps(json_ready(results), indent=2, allow_nan=False))
        write_text(paths["markdown"], summarize_multitask(results, markdown=True) + "\n")
        if plots:
            from .plots import plot_multitask_accuracy

            paths["accuracy"] = plot_multitask_accuracy(results, folder / "accuracy.png")
        return paths

    return write_output_folder(output_dir, write, ("accuracy.png",))


def _dataset_origins(arguments: MultiTaskEvaluateArguments) -> tuple[dict[str, str], dict[str, str | None]]:
    """Return each task dataset's source and requested split (its `:SPLIT`, else `--split`, or None)."""
    sources, splits = {}, {}
    for entry in arguments.task_datasets:
        task, value = entry.split("=", 1)
        sources[task], split = split_source(value)
        splits[task] = split or arguments.split
    return sources, splits


def run_evaluate_multitask(arguments: MultiTaskEvaluateArguments) -> dict:
    """Run the multi-task evaluation described by `arguments`, print the table and write the results.

    Under `accelerate launch` or `torchrun` every pass is split across the processes and gathered, so the
    results equal those of one process. The main process prints, writes the files and pushes the results.
    """
    _check_arguments(arguments)
    torch.manual_seed(arguments.seed)
    started = time.perf_counter()
    state = get_distributed_state()
    state.quiet_other_processes()
    if not state.is_main_process:
        arguments = replace(arguments, progress=False)
    build = _custom_model if arguments.model or arguments.pretrained else _embedded_suite
    # The main process loads first, so downloads and the embedded suite's training fill the cache once.
    model, sets = state.main_process_first("loading the model and data", lambda: build(arguments))
    place_on_process_device(model, state)
    settings = MultiTaskEvaluationSettings(include_ties=arguments.ties, progress=arguments.progress)
    results = evaluate_multitask(model, sets, settings, state=state)
    if not state.is_main_process:
        return results
    results["runtime_seconds"] = round(time.perf_counter() - started, 1)
    record_run_settings(results, model, state, arguments)
    results["dataset_sources"], results["dataset_splits"] = _dataset_origins(arguments)
    paths = write_multitask_results(results, Path(arguments.output_dir), plots=arguments.plots)
    print()
    print(f"Accuracy (%) per task; s = {results['settings']['scale']:g}.")
    print(summarize_multitask(results))
    for task, entry in results["tasks"].items():
        if entry["num_skipped"]:
            total = entry["num_examples"] + entry["num_skipped"]
            print(f"{task}: {entry['num_skipped']} of {total} images could not be read and were skipped "
                  "(num_skipped and skipped_positions in results.json).")
    print(f"\nResults written to {paths['json']} and {paths['markdown']} ({results['runtime_seconds']} s).")
    if "accuracy" in paths:
        print(f"Figure written to {paths['accuracy']}.")
    if arguments.push_results:
        from .cli import push_failure_as_error
        from .hub_multitask import MULTITASK_MODE_METHODS, push_multitask_results_to_hub

        method = MULTITASK_MODE_METHODS[model.config.mode]
        with push_failure_as_error(arguments.push_results, arguments.output_dir, method=method):
            commit = push_multitask_results_to_hub(arguments.push_results, results, method=method)
        print(f"Results written into the model card of {arguments.push_results}: {commit.commit_url}")
    return results


def main_multitask(argv: Sequence[str] | None = None) -> int:
    """Entry point of `hf-dawin evaluate-multitask`; with no arguments it runs the embedded suite.

    Args:
        argv (`Sequence[str]`, *optional*): Arguments after the subcommand name; defaults to none.

    Returns:
        `int`: The exit status, 0 on success.
    """
    arguments = parse_multitask_arguments(list(argv or []))
    try:
        with library_progress_bars(arguments.progress):
            run_evaluate_multitask(arguments)
    except (OSError, ValueError, RankFailedError, RankLostError) as error:
        # Invalid input (an unknown task, a missing column, an unreachable repository) ends the run with its
        # message, and so does a failed rank of a multi-process run. The traceback is logged at debug level
        # (TRANSFORMERS_VERBOSITY=debug). Nothing is written for a failed run.
        logger.debug("hf-dawin evaluate-multitask failed.", exc_info=True)
        print(f"hf-dawin evaluate-multitask: error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0
