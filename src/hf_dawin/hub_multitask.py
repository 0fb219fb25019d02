"""Hugging Face Hub artifacts of multi-task DaWin models: one-commit uploads with a card, and plain CLIP merges.

`push_multitask_to_hub` uploads a [`DaWinMultiTaskCLIPModel`] (config, all endpoints, the heads of every task,
the fitted dataset-mean task weights and the processor) with a model card rendered from `model_cards/`, in one
commit. `push_multitask_results_to_hub` writes a multi-task evaluation into a repository's card.
`save_merged_multitask` and `push_merged_multitask` export one static merge (task arithmetic, weight averaging,
DaWin's dataset-mean merge of a task, or TIES-merging) as an ordinary `CLIPModel` repository.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from transformers.utils import logging

from .evaluation_multitask import summarize_multitask
from .hub import (
    CITATION,
    MODEL_CARDS_DIR,
    RESULTS_END_MARKER,
    RESULTS_START_MARKER,
    _commit_folder,
    _default_model_name,
    _describe_source,
    _hub_repo_id,
    _subset_sentence,
    subset_dataset_args,
    _markdown_table,
    _render,
    check_card_kind,
    push_card_update,
    push_model_with_card,
    replace_card_results,
    results_card,
    text_sides_equal,
    write_plain_clip,
)
from .saving import save_atomically


logger = logging.get_logger(__name__)

__all__ = [
    "MERGED_MULTITASK_METHODS",
    "build_merged_multitask_card",
    "build_multitask_model_card",
    "multitask_eval_results",
    "push_merged_multitask",
    "push_multitask_results_to_hub",
    "push_multitask_to_hub",
    "save_merged_multitask",
    "update_multitask_card_results",
]

MULTITASK_CARD_TEMPLATE = MODEL_CARDS_DIR / "multitask_model_card.md"
MERGED_MULTITASK_CARD_TEMPLATE = MODEL_CARDS_DIR / "merged_multitask_model_card.md"

MULTITASK_CARD_TAGS = ("dawin", "clip", "multi-task", "task-arithmetic", "model-merging", "weight-interpolation")
MERGED_MULTITASK_CARD_TAGS = ("dawin", "clip", "multi-task", "task-arithmetic", "model-merging", "merge")

# Static merges that export as a plain CLIPModel.
MERGED_MULTITASK_METHODS = ("task_arithmetic", "weight_average", "dataset_mean", "ties")

# The evaluation method (a key of `results["tasks"][task]["scores"]`) that describes a model saved in each mode.
MULTITASK_MODE_METHODS = {
    "sample": "dawin_sample",
    "dataset_mean": "dawin_dataset_mean",
    "task_arithmetic": "task_arithmetic",
    "weight_average": "weight_average",
    "ties": "ties",
    "pretrained": "pretrained",
}

_MAX_LISTED_CLASSES = 10


# ----------------------------------------------------------------------------------------------------------
# Card pieces
# ----------------------------------------------------------------------------------------------------------


def _base_models(config) -> list[str]:
    base_models = []
    for source in [config.pretrained_name_or_path, *(config.fine_tuned_names_or_paths or [])]:
        hub_id = _hub_repo_id(source)
        if hub_id is not None and hub_id not in base_models:
            base_models.append(hub_id)
    return base_models


def _endpoints_table(config, coefficients: Sequence[float] | None = None) -> str:
    sources = list(config.fine_tuned_names_or_paths or [None] * config.num_fine_tuned)
    headers = ["Endpoint", "Name", "Checkpoint"]
    rows = [["pre-trained", "", _describe_source(config.pretrained_name_or_path)]]
    for index, (name, source) in enumerate(zip(config.fine_tuned_names, sources)):
        rows.append([f"fine-tuned {index + 1}", f"`{name}`", _describe_source(source)])
    if coefficients is not None:
        headers.append("Coefficient c_t")
        rows[0].append("")
        for row, coefficient in zip(rows[1:], coefficients):
            row.append(f"{coefficient:.6g}")
    return _markdown_table(headers, rows)


def _tasks_table(config) -> str:
    rows = []
    for task, class_names in config.tasks.items():
        listed = ", ".join(f"`{name}`" for name in class_names[:_MAX_LISTED_CLASSES])
        if len(class_names) > _MAX_LISTED_CLASSES:
            listed += f" and {len(class_names) - _MAX_LISTED_CLASSES} more"
        default = " (default)" if task == config.default_task else ""
        rows.append((f"`{task}`{default}", len(class_names), listed))
    return _markdown_table(("Task", "Classes", "Class names"), rows)


def _templates_block(config) -> str:
    templates = config.templates or {}
    if not templates:
        return ""
    counts = ", ".join(f"`{task}` {len(values)}" for task, values in templates.items())
    return f"The zero-shot heads of each task were built from prompt templates ({counts}).\n\n"


def _settings_table(config) -> str:
    rows = [
        ("mode", f"`{config.mode}`"),
        ("task-arithmetic scale s", repr(float(config.scale))),
        ("default task", f"`{config.default_task}`"),
        ("TIES density, scale", f"{config.ties_density!r}, {config.ties_scale!r}"),
        ("dataset-mean task weights", "fitted for " + ", ".join(f"`{t}`" for t in config.dataset_task_weights)
         if config.dataset_task_weights else "not fitted"),
    ]  # fmt: skip
    return _markdown_table(("Setting", "Value"), rows)


def _mode_description(config) -> str:
    descriptions = {
        "sample": (
            "In `\"sample\"` mode every image gets its own task weights π(x) and exactly merged weights, without "
            "materialising a model per image."
        ),
        "dataset_mean": (
            "In `\"dataset_mean\"` mode every image of a task uses the mean of π over that task's calibration "
            "images, so one merged model per task runs."
        ),
        "task_arithmetic": "In `\"task_arithmetic\"` mode every image uses θ_0 + s · Σ_t τ_t.",
        "weight_average": "In `\"weight_average\"` mode every image uses the mean of the fine-tuned endpoints.",
        "ties": "In `\"ties\"` mode every image uses the TIES-merged task vector.",
        "pretrained": "In `\"pretrained\"` mode the pre-trained endpoint alone classifies.",
    }
    return descriptions[config.mode]


def _dataset_weights_block(config) -> str:
    weights = config.dataset_task_weights
    if not weights:
        return ""
    headers = ["Task", *(f"π `{name}`" for name in config.fine_tuned_names)]
    rows = [[f"`{task}`", *(f"{value:.4f}" for value in values)] for task, values in weights.items()]
    return f"Mean task weights π fitted per task, used by `\"dataset_mean\"` mode:\n\n{_markdown_table(headers, rows)}\n\n"


def multitask_eval_results(results: Mapping, method: str) -> list[EvalResult]:
    """Turn a multi-task evaluation into `model-index` entries: accuracy and macro F1 of `method` per task.

    Args:
        results (`Mapping`): Output of `hf_dawin.evaluation_multitask.evaluate_multitask`.
        method (`str`): Method whose scores are reported, for example `"dawin_sample"`.

    Raises:
        ValueError: If `method` has no scores in `results`.
    """
    if method not in results["methods"]:
        raise ValueError(f"The evaluation has no scores for method {method!r}. Its methods are {results['methods']}.")
    sources = results.get("dataset_sources") or {}
    entries = []
    for task, entry in results["tasks"].items():
        scores = entry["scores"][method]
        dataset_type = _hub_repo_id(sources.get(task), require_namespace=False) or task
        label = results.get("method_labels", {}).get(method, method)
        metrics = (("accuracy", f"{label} accuracy", None), ("f1", f"{label} macro F1", {"average": "macro"}))
        for metric_type, metric_name, metric_args in metrics:
            if metric_type in scores:
                entries.append(
                    EvalResult(
                        task_type="image-classification",
                        task_name="Image Classification",
                        dataset_type=dataset_type,
                        dataset_name=task,
                        dataset_split=(results.get("dataset_splits") or {}).get(task),
                        dataset_args=subset_dataset_args(results.get("settings") or {}),
                        metric_type=metric_type,
                        metric_name=metric_name,
                        metric_value=float(scores[metric_type]),
                        metric_args=metric_args,
                    )
                )
    return entries


def _results_section(results: Mapping | None, method: str, repo_id: str | None) -> str:
    """Render the evaluation section, between the markers that `update_multitask_card_results` replaces."""
    if results is None:
        body = (
            "No evaluation results were given when this card was written. `hf-dawin evaluate-multitask --model "
            f"{repo_id or 'MODEL'} --task-dataset TASK=SOURCE ... --push-results {repo_id or 'REPO'}` adds them here, "
            f"and `hf-dawin push-results {repo_id or 'REPO'} --results-dir DIR` adds those of an earlier run."
        )
    else:
        rows = [
            (task, entry["num_examples"], entry.get("num_skipped", 0), entry["num_classes"])
            for task, entry in results["tasks"].items()
        ]
        label = results["method_labels"].get(method, method)
        paragraphs = [
            _markdown_table(("Task", "Images", "Skipped (unreadable)", "Classes"), rows),
            _subset_sentence(results.get("settings") or {}),
            "Accuracy (%) of DaWin, the individual endpoints and static merges, per task and averaged over tasks:",
            summarize_multitask(dict(results), markdown=True),
            f"The `model-index` metadata of this card reports {label}.",
        ]
        body = "\n\n".join(paragraph for paragraph in paragraphs if paragraph)
    return f"{RESULTS_START_MARKER}\n{body}\n{RESULTS_END_MARKER}"


def update_multitask_card_results(
    card: ModelCard, results: Mapping, *, method: str = "dawin_sample", model_name: str | None = None
) -> ModelCard:
    """Write a multi-task evaluation into an existing card: `model-index` entries per task and the evaluation text.

    Every entry of the card for an evaluated task's dataset is replaced, whatever its metric. Entries for other
    datasets stay, and the evaluation section names them.

    Args:
        card (`ModelCard`): The card to update in place.
        results (`Mapping`): Output of `hf_dawin.evaluation_multitask.evaluate_multitask`.
        method (`str`, *optional*, defaults to `"dawin_sample"`): Method reported in `model-index`.
        model_name (`str`, *optional*): Name of the `model-index` entry when the card has none.

    Returns:
        The updated `card`.
    """
    new_results = multitask_eval_results(results, method)
    return replace_card_results(card, new_results, _results_section(results, method, None), model_name=model_name)


def push_multitask_results_to_hub(
    repo_id: str,
    results: Mapping,
    *,
    method: str = "dawin_sample",
    commit_message: str | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Write a multi-task evaluation into a Hub repository's model card and upload it in one commit.

    The existing `README.md` is updated with [`update_multitask_card_results`]; a repository without a card gets
    a new one. The repository is created if it does not exist.

    Args:
        repo_id (`str`): Repository whose card receives the results.
        results (`Mapping`): Output of `hf_dawin.evaluation_multitask.evaluate_multitask`.
        method (`str`, *optional*, defaults to `"dawin_sample"`): Method reported in `model-index`.
        commit_message (`str`, *optional*): Commit summary.
        token (`bool` or `str`, *optional*): Hub token; defaults to the locally saved one.
        revision (`str`, *optional*): Branch to read the card from and commit to.
        create_pr (`bool`, *optional*, defaults to `False`): Open a pull request instead of committing directly.

    Returns:
        `huggingface_hub.CommitInfo` of the commit.

    Raises:
        ValueError: If `method` has no scores in `results`.
    """
    multitask_eval_results(results, method)  # checks `method` before anything is sent

    def new_card(repo_id: str) -> ModelCard:
        return results_card(
            repo_id, "Multi-task evaluation written by `hf-dawin evaluate-multitask`.",
            _results_section(None, method, repo_id), MULTITASK_CARD_TAGS,
        )  # fmt: skip

    def update(card: ModelCard, repo_id: str) -> None:
        check_card_kind(card, repo_id, multitask=True)
        update_multitask_card_results(card, results, method=method, model_name=_default_model_name(repo_id, "model"))

    return push_card_update(
        repo_id, update, new_card, commit_message=commit_message or "Add multi-task DaWin evaluation results",
        token=token, revision=revision, create_pr=create_pr,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Multi-task DaWin models
# ----------------------------------------------------------------------------------------------------------


def build_multitask_model_card(
    model, *, repo_id: str | None = None, results: Mapping | None = None, tags: Sequence[str] | None = None
) -> ModelCard:
    """Render the model card of a multi-task DaWin model from the package template.

    The metadata lists the Hub endpoints as `base_model`, `pipeline_tag: image-classification` and the tags. With
    `results`, it gets `model-index` entries (one per task, for the method of the model's mode) and the text an
    accuracy table. The text states the tasks, the merging settings and usage code.

    Args:
        model ([`DaWinMultiTaskCLIPModel`]): The model to describe.
        repo_id (`str`, *optional*): Repository id used in the title and the usage code.
        results (`Mapping`, *optional*): Output of `hf_dawin.evaluation_multitask.evaluate_multitask`.
        tags (`Sequence[str]`, *optional*): Tags added to the default ones.
    """
    config = model.config
    model_name = _default_model_name(repo_id, "Multi-task DaWin CLIP classifier")
    method = MULTITASK_MODE_METHODS[config.mode]
    eval_results = multitask_eval_results(results, method) if results is not None else None
    base_models = _base_models(config)
    card_data = ModelCardData(
        base_model=base_models or None,
        base_model_relation="merge" if len(base_models) > 1 else None,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=[*MULTITASK_CARD_TAGS, *(tags or [])],
        metrics=["accuracy", "f1"] if results is not None else None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
    )
    other_tasks = [task for task in config.tasks if task != config.default_task]
    return _render(
        MULTITASK_CARD_TEMPLATE,
        card_data,
        model_name=model_name,
        repo_id=repo_id or "path/to/model",
        num_fine_tuned=config.num_fine_tuned,
        endpoints_table=_endpoints_table(config),
        tasks_table=_tasks_table(config),
        templates_block=_templates_block(config),
        settings_table=_settings_table(config),
        mode_description=_mode_description(config),
        dataset_weights_block=_dataset_weights_block(config),
        default_task=config.default_task,
        other_task=other_tasks[0] if other_tasks else config.default_task,
        results_section=_results_section(results, method, repo_id),
        citation=CITATION,
    )


def push_multitask_to_hub(
    model,
    repo_id: str,
    *,
    results: Mapping | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "5GB",
    tags: Sequence[str] | None = None,
):
    """Upload a multi-task DaWin model and its model card to the Hub in one commit.

    The commit contains `config.json` (tasks, scale and fitted dataset-mean task weights), `model.safetensors`
    (every endpoint and every task's heads), the processor files and a `README.md` rendered by
    [`build_multitask_model_card`]. The repository is created if it does not exist. The arguments are those
    of `hf_dawin.hub.push_dawin_to_hub`, with `results` from `evaluate_multitask`.

    Returns:
        `huggingface_hub.CommitInfo` of the commit.
    """
    return push_model_with_card(
        model,
        repo_id,
        lambda card_repo_id: build_multitask_model_card(model, repo_id=card_repo_id, results=results, tags=tags),
        commit_message=commit_message or "Upload multi-task DaWin model",
        commit_description=commit_description,
        private=private,
        token=token,
        revision=revision,
        create_pr=create_pr,
        max_shard_size=max_shard_size,
    )


# ----------------------------------------------------------------------------------------------------------
# Plain CLIP exports of static merges
# ----------------------------------------------------------------------------------------------------------


def _check_method(method: str) -> str:
    if method not in MERGED_MULTITASK_METHODS:
        raise ValueError(
            f"Unknown merge method {method!r}; valid methods are "
            f"{', '.join(repr(name) for name in MERGED_MULTITASK_METHODS)}."
        )
    return method


def _merge(model, method: str, task: str | None):
    """Return `(CLIPModel, coefficients or None, task or None)` for a static merge method."""
    if method == "ties":
        return model.merge_ties(), None, None
    if method == "dataset_mean":
        task = model.resolve_task(task)
        coefficients = model.static_coefficients("dataset_mean", task)
    else:
        task = None
        coefficients = model.static_coefficients(method)
    values = [float(value) for value in coefficients]
    return model.merge(values), values, task


def _method_sentence(config, method: str, task: str | None) -> str:
    if method == "task_arithmetic":
        return f"Its weights are task arithmetic, θ_0 + s · Σ_t τ_t with τ_t = θ_t - θ_0 and s = {config.scale:g}."
    if method == "weight_average":
        return "Its weights are the mean of the fine-tuned endpoints, θ_0 + (1/T) · Σ_t τ_t with τ_t = θ_t - θ_0."
    if method == "dataset_mean":
        return (
            f"Its weights are DaWin's dataset-mean merge for task `{task}`: θ_0 + Σ_t c_t · τ_t with "
            f"τ_t = θ_t - θ_0 and c = s · T · mean π, the task weights averaged over that task's calibration "
            f"images (s = {config.scale:g})."
        )
    return (
        f"Its weights are TIES-merged: θ_0 plus {config.ties_scale:g} times the merged task vector, keeping "
        f"{config.ties_density:g} of each task vector's entries by magnitude and the majority sign per entry."
    )


def _text_tower_sentence(model, method: str) -> str:
    """Return the card sentence on whether the exported checkpoint's zero-shot classifier reproduces `method` mode."""
    if text_sides_equal(model.pretrained, list(model.fine_tuned)):
        return (
            "All endpoints share one text tower, so zero-shot classification with this checkpoint, given the same "
            f"class names and prompt templates, matches hf_dawin's `{method}` mode."
        )
    return (
        "Zero-shot classification with this checkpoint embeds the prompts with its merged text tower. hf_dawin's "
        f"`{method}` mode instead merges the endpoints' zero-shot heads, each embedded with that endpoint's own text "
        "tower. Fine-tuning changed the text towers, so this checkpoint's predictions can differ from hf_dawin's, "
        "and so can its accuracy."
    )


def build_merged_multitask_card(
    model, method: str, *, task: str | None = None, coefficients: Sequence[float] | None = None,
    repo_id: str | None = None,
) -> ModelCard:  # fmt: skip
    """Render the card of a plain `CLIPModel` exported with [`save_merged_multitask`].

    Args:
        model ([`DaWinMultiTaskCLIPModel`]): The model the weights come from.
        method (`str`): One of [`MERGED_MULTITASK_METHODS`].
        task (`str`, *optional*): Task of a `"dataset_mean"` merge, and of the example labels.
        coefficients (`Sequence[float]`, *optional*): The coefficients c_t of the merge, listed per endpoint.
        repo_id (`str`, *optional*): Repository id used in the title and the usage code.

    Returns:
        `huggingface_hub.ModelCard` with `pipeline_tag: zero-shot-image-classification`.
    """
    config = model.config
    _check_method(method)
    suffix = f" for {task}" if task else ""
    model_name = _default_model_name(repo_id, f"CLIP merged by {method.replace('_', ' ')}{suffix}")
    base_models = _base_models(config)
    labels = ", ".join(f'"{name}"' for name in config.tasks[task or config.default_task][:3])
    card_data = ModelCardData(
        base_model=base_models or None,
        base_model_relation="merge" if len(base_models) > 1 else None,
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        tags=list(MERGED_MULTITASK_CARD_TAGS),
        merge_method=method,
        # Seven significant digits, about float32's precision, so a float32 0.3 reads as 0.3, not 0.30000001.
        merge_coefficients=[float(f"{value:.7g}") for value in coefficients] if coefficients is not None else None,
    )
    return _render(
        MERGED_MULTITASK_CARD_TEMPLATE,
        card_data,
        model_name=model_name,
        repo_id=repo_id or "path/to/model",
        num_fine_tuned=config.num_fine_tuned,
        method_sentence=_method_sentence(config, method, task),
        text_sentence=_text_tower_sentence(model, method),
        endpoints_table=_endpoints_table(config, coefficients),
        label_example=labels,
        citation=CITATION,
    )


def _write_merged(model, method: str, merge: tuple, folder: Path, repo_id: str | None) -> None:
    """Write a merge returned by `_merge` into `folder`: CLIP weights, processor files and card."""
    merged, coefficients, task = merge
    card = build_merged_multitask_card(model, method, task=task, coefficients=coefficients, repo_id=repo_id)
    write_plain_clip(model, merged, card, folder)


def save_merged_multitask(model, output_dir: str | Path, method: str, *, task: str | None = None) -> Path:
    """Save one static merge of a multi-task model as a plain `CLIPModel` folder with its processor and card.

    The folder loads with `CLIPModel.from_pretrained` or `pipeline("zero-shot-image-classification")` without
    hf_dawin.

    Args:
        model ([`DaWinMultiTaskCLIPModel`]): The multi-task model.
        output_dir (`str` or `Path`): Folder to write.
        method (`str`): `"task_arithmetic"`, `"weight_average"`, `"dataset_mean"` (needs the task weights fitted
            for `task` with `fit_dataset_coefficients`) or `"ties"`.
        task (`str`, *optional*): Task of a `"dataset_mean"` merge; defaults to the model's default task.

    Returns:
        `Path`: `output_dir`.

    Raises:
        ValueError: If `method` is unknown, `task` is not a task of the model, or `"dataset_mean"` is not fitted.
    """
    merge = _merge(model, _check_method(method), task)
    # Written into a staging folder first, so an interrupted save leaves an earlier export intact.
    output_dir = Path(output_dir)
    save_atomically(output_dir, lambda folder: _write_merged(model, method, merge, folder, repo_id=None))
    logger.info("Saved the CLIP model merged by %s to %s.", method, output_dir)
    return output_dir


def push_merged_multitask(
    model,
    repo_id: str,
    method: str,
    *,
    task: str | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Upload one static merge of a multi-task model as a plain `CLIPModel` repository, in one commit.

    `method` and `task` are as in [`save_merged_multitask`]; the other arguments as in
    `hf_dawin.hub.push_merged_component`.

    Returns:
        `huggingface_hub.CommitInfo` of the commit.
    """
    merge = _merge(model, _check_method(method), task)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory(prefix="hf_dawin_merged_") as folder:
        folder = Path(folder)
        _write_merged(model, method, merge, folder, repo_id=repo_id)
        return _commit_folder(
            api,
            repo_id,
            folder,
            commit_message=commit_message or f"Upload CLIP merged by {method}",
            commit_description=None,
            revision=revision,
            create_pr=create_pr,
        )
