"""Hugging Face Hub artifacts of DaWin models: one-commit uploads with a model card, and plain CLIP exports.

`push_dawin_to_hub` saves a [`DaWinCLIPModel`] (config, both endpoints, heads, fitted mixture, processor and the
modeling code for `trust_remote_code`) into a temporary folder, renders a model card from the templates in
`model_cards/`, and uploads everything in one commit with `HfApi.create_commit`. `save_merged_components` and
`push_merged_component` export interpolated weights as ordinary `CLIPModel` repositories, and
`push_results_to_hub` writes evaluation results into an existing repository's card.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import validate_repo_id
from transformers.utils import logging

from .configuration_dawin import check_alpha
from .evaluation import method_label, summarize
from .saving import is_weight_file, save_atomically


logger = logging.get_logger(__name__)

__all__ = [
    "CARD_TAGS",
    "MODEL_CARDS_DIR",
    "build_merged_model_card",
    "build_model_card",
    "check_card_kind",
    "eval_results_from",
    "method_for_mode",
    "push_card_update",
    "push_dawin_to_hub",
    "push_merged_component",
    "push_results_to_hub",
    "replace_card_results",
    "results_card",
    "save_merged_components",
    "update_card_results",
]

MODEL_CARDS_DIR = Path(__file__).parent / "model_cards"
DAWIN_CARD_TEMPLATE = MODEL_CARDS_DIR / "dawin_model_card.md"
MERGED_CARD_TEMPLATE = MODEL_CARDS_DIR / "merged_model_card.md"
RESULTS_CARD_TEMPLATE = MODEL_CARDS_DIR / "results_model_card.md"

CARD_TAGS = ("dawin", "clip", "weight-interpolation", "robust-fine-tuning", "distribution-shift", "model-merging")
MERGED_CARD_TAGS = ("dawin", "clip", "weight-interpolation", "wise-ft", "robust-fine-tuning", "model-merging", "merge")

# The evaluation section of a card lies between these markers, so `push_results_to_hub` can replace it.
RESULTS_START_MARKER = "<!-- hf-dawin evaluation start -->"
RESULTS_END_MARKER = "<!-- hf-dawin evaluation end -->"

# The evaluation method whose scores describe a model saved in each mode. "static" is handled apart, because
# its score comes from the WiSE-FT sweep at the configured alpha.
MODE_METHODS = {
    "sample": "dawin_sample",
    "mixture": "dawin_mixture",
    "zero_shot": "zero_shot",
    "fine_tuned": "fine_tuned",
    "output_ensemble": "output_ensemble",
}

CITATION = """@inproceedings{oh2025dawin,
  title     = {{DaWin}: Training-free Dynamic Weight Interpolation for Robust Adaptation},
  author    = {Oh, Changdae and Li, Yixuan and Song, Kyungwoo and Yun, Sangdoo and Han, Dongyoon},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025},
  url       = {https://arxiv.org/abs/2410.03782}
}"""

_MAX_LISTED_CLASSES = 20


# ----------------------------------------------------------------------------------------------------------
# Card pieces
# ----------------------------------------------------------------------------------------------------------


def _hub_repo_id(source: str | None, *, require_namespace: bool = True) -> str | None:
    """Return `source` if it names a Hub repository rather than a local path, else None.

    Names without a namespace (`"model"`) are valid Hub ids but more often relative folders, so they count only
    when `require_namespace` is False.
    """
    if not source or os.path.exists(source) or (require_namespace and "/" not in source):
        return None
    try:
        validate_repo_id(source)
    except HFValidationError:
        return None
    return source


def _describe_source(source: str | None) -> str:
    hub_id = _hub_repo_id(source)
    if hub_id is not None:
        return f"[{hub_id}](https://huggingface.co/{hub_id})"
    if source:
        return f"local checkpoint `{Path(source).name}`"
    return "a loaded `CLIPModel`"


def _base_models(config) -> list[str]:
    sources = [config.zero_shot_name_or_path, config.fine_tuned_name_or_path]
    base_models = []
    for source in sources:
        hub_id = _hub_repo_id(source)
        if hub_id is not None and hub_id not in base_models:
            base_models.append(hub_id)
    if len(base_models) < len(sources):
        logger.info(
            "Only endpoints loaded from Hub ids are listed as base_model in the model card; local folders and "
            "loaded models are described in the card text."
        )
    return base_models


def _head_description(head_sources: Mapping | None, endpoint: str) -> str:
    source = (head_sources or {}).get(endpoint)
    if source == "text":
        return "zero-shot head from the endpoint's text tower and the prompt templates"
    if source == "linear":
        return "trained linear head"
    return "stored linear head"


def _class_list(class_names: Sequence[str]) -> str:
    shown = ", ".join(f"`{name}`" for name in class_names[:_MAX_LISTED_CLASSES])
    if len(class_names) > _MAX_LISTED_CLASSES:
        shown += f" and {len(class_names) - _MAX_LISTED_CLASSES} more (see `id2label` in config.json)"
    return shown


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _settings_table(config) -> str:
    zero_shot_temperature, fine_tuned_temperature = (repr(float(value)) for value in config.temperatures)
    rows = [
        ("mode", f"`{config.mode}`"),
        ("temperatures (zero-shot, fine-tuned)", f"{zero_shot_temperature}, {fine_tuned_temperature}"),
        ("offset adjustment", "on" if config.offset_adjustment else "off"),
        ("mixture components requested", config.n_components),
        ("Beta mixture", "fitted (below)" if config.mixture else "not fitted"),
        ("static alpha (`\"static\"` mode)", repr(float(config.alpha))),
    ]
    return _markdown_table(("Setting", "Value"), rows)


def _mode_description(config) -> str:
    descriptions = {
        "sample": (
            "In `\"sample\"` mode every image gets its own coefficient and exactly interpolated weights, at about "
            "four forward passes of the image tower per image."
        ),
        "mixture": (
            "In `\"mixture\"` mode every image takes the mean coefficient of its most responsible Beta mixture "
            "component, so at most one merged model per component runs."
        ),
        "static": (
            f"In `\"static\"` mode every image uses the WiSE-FT weights at alpha = {config.alpha:g} on the "
            "fine-tuned endpoint."
        ),
        "zero_shot": "In `\"zero_shot\"` mode the zero-shot endpoint alone classifies.",
        "fine_tuned": "In `\"fine_tuned\"` mode the fine-tuned endpoint alone classifies.",
        "output_ensemble": (
            "In `\"output_ensemble\"` mode the endpoints' predicted probabilities are mixed with the per-image "
            "coefficient instead of their weights; the logits are the log-probabilities of that mixture."
        ),
    }
    description = descriptions[config.mode]
    if config.offset_adjustment:
        description += (
            " The offset adjustment shifts each coefficient with set-level entropy statistics: "
            "λ(x) = (e_1 + c) / (e_0 + e_1 + b)."
        )
    return description


def _mixture_block(config) -> str:
    """Describe the fitted mixture's parameters, or return an empty string without a fitted mixture."""
    mixture = config.mixture
    if not mixture or "weights" not in mixture:
        return ""
    rows = []
    for index, (weight, alpha, beta) in enumerate(zip(mixture["weights"], mixture["alphas"], mixture["betas"])):
        rows.append((index, f"{weight:.6g}", f"{alpha:.6g}", f"{beta:.6g}", f"{alpha / (alpha + beta):.6g}"))
    table = _markdown_table(("Component", "Weight", "Beta α", "Beta β", "Coefficient (mean)"), rows)
    summary = (
        f"Fitted Beta mixture over the coefficients: {len(rows)} of {mixture['n_components']} requested "
        f"components, mean log-likelihood {mixture['log_likelihood']:.6g} (EM iterations: {mixture['n_iter']}). "
        "Values are rounded to 6 significant digits; config.json stores them in full."
    )
    return f"{summary}\n\n{table}\n\n"


def _statistics_block(config) -> str:
    statistics = config.entropy_statistics
    if not statistics:
        return ""
    rows = [
        ("zero-shot", f"{statistics['zero_shot_mean']:.4f}", f"{statistics['zero_shot_std']:.4f}"),
        ("fine-tuned", f"{statistics['fine_tuned_mean']:.4f}", f"{statistics['fine_tuned_std']:.4f}"),
    ]
    table = _markdown_table(("Endpoint", "Mean entropy", "Standard deviation"), rows)
    return (
        "Calibrated entropy statistics (nats), used by the offset adjustment, computed on "
        f"{statistics['num_samples']} calibration images:\n\n{table}\n\n"
    )


def _templates_block(templates: Sequence[str] | None) -> str:
    if not templates:
        return ""
    examples = ", ".join(f"`{template}`" for template in templates[:3])
    more = ", ..." if len(templates) > 3 else ""
    count = f"{len(templates)} prompt template" + ("" if len(templates) == 1 else "s")
    return f"Zero-shot heads were built from {count} ({examples}{more}).\n\n"


def _default_model_name(repo_id: str | None, fallback: str) -> str:
    return repo_id.split("/")[-1] if repo_id else fallback


# ----------------------------------------------------------------------------------------------------------
# Evaluation results
# ----------------------------------------------------------------------------------------------------------


def method_for_mode(config) -> str | None:
    """Return the evaluation method (a key of `results["sets"][name]["scores"]`) matching a model's saved mode.

    `"static"` mode returns None, because the WiSE-FT sweep reports accuracy only. [`eval_results_from`] then reads
    the accuracy from the sweep when the configured alpha is part of it.
    """
    return MODE_METHODS.get(config.mode)


def eval_results_from(
    results: Mapping,
    *,
    method: str | None = "dawin_sample",
    static_alpha: float | None = None,
) -> list[EvalResult]:
    """Turn an evaluation into `huggingface_hub.EvalResult` entries for a card's `model-index`.

    Each evaluation set gives one accuracy entry and, when the method has one, a macro-F1 entry, both with task
    `image-classification` and a metric name that names the method, for example "DaWin (sample) accuracy". The
    dataset type is the set's Hub id when `results["dataset_sources"]` records one, else the set name.

    Args:
        results (`Mapping`): Output of `hf_dawin.evaluation.evaluate_pair`.
        method (`str`, *optional*, defaults to `"dawin_sample"`): Method whose scores are reported, for example
            `"dawin_mixture"`. None reads the WiSE-FT sweep at `static_alpha`.
        static_alpha (`float`, *optional*): Alpha of the WiSE-FT sweep reported when `method` is None.

    Returns:
        `list[EvalResult]`, in the order of `results["sets"]`.

    Raises:
        ValueError: If `method` has no scores in `results`, is the label-reading `"oracle"`, or `static_alpha` is not
            part of the sweep.
    """
    if method == "oracle":
        raise ValueError(
            "The oracle output ensemble reads each image's label, so its scores are not results of a model and do "
            "not go into model-index. Report a method that the model runs, such as 'dawin_sample' or 'dawin_mixture'."
        )
    sets = results["sets"]
    dataset_args = subset_dataset_args(results.get("settings") or {})
    entries = []
    if method is None:
        if static_alpha is None:
            raise ValueError("eval_results_from needs a method or, for static weights, static_alpha.")
        alphas = [float(alpha) for alpha in results["wise_ft_sweep"]["alphas"]]
        matches = [index for index, alpha in enumerate(alphas) if math.isclose(alpha, static_alpha)]
        if not matches:
            raise ValueError(
                f"The WiSE-FT sweep covers alphas {alphas}, which do not include the model's static alpha "
                f"{static_alpha:g}. Evaluate again with {static_alpha:g} among the alphas (EvaluationSettings.alphas, "
                "or --alphas on the command line)."
            )
        label = f"WiSE-FT (alpha={static_alpha:g})"
        for name in sets:
            accuracy = results["wise_ft_sweep"]["accuracy"][name][matches[0]]
            entries.append(_eval_result(name, results, "accuracy", accuracy, f"{label} accuracy", dataset_args))
        return entries

    for name, entry in sets.items():
        if method not in entry["scores"]:
            raise ValueError(
                f"Set '{name}' has no scores for method {method!r}. Its methods are {sorted(entry['scores'])}."
            )
        scores = entry["scores"][method]
        label = method_label(method, results)
        entries.append(_eval_result(name, results, "accuracy", scores["accuracy"], f"{label} accuracy", dataset_args))
        if "f1" in scores:
            f1 = scores["f1"]
            metric_args = {"average": "macro"}
            entries.append(_eval_result(name, results, "f1", f1, f"{label} macro F1", dataset_args, metric_args))
    return entries


def subset_dataset_args(settings: Mapping) -> dict | None:
    """Return the `dataset_args` of a `model-index` entry of a run limited by `--max-examples`, else None.

    The limit stays with each entry, so a card that keeps the entry after a later evaluation still shows it.
    """
    if not settings.get("max_examples"):
        return None
    return {"max_examples": settings["max_examples"], "seed": settings.get("seed")}


def _eval_result(name, results, metric_type, value, metric_name, dataset_args=None, metric_args=None) -> EvalResult:
    """Return the `model-index` entry of set `name`, with its Hub id and split when `results` records them."""
    source = (results.get("dataset_sources") or {}).get(name)
    return EvalResult(
        task_type="image-classification",
        task_name="Image Classification",
        dataset_type=_hub_repo_id(source, require_namespace=False) or name,
        dataset_name=name,
        dataset_split=(results.get("dataset_splits") or {}).get(name),
        dataset_args=dataset_args,
        metric_type=metric_type,
        metric_name=metric_name,
        metric_value=float(value),
        metric_args=metric_args,
    )


def _evaluation_settings_sentence(settings: Mapping) -> str:
    """Describe the temperatures, offset adjustment, mixture size and reduced precision that an evaluation used."""
    parts = []
    if settings.get("temperatures"):
        zero_shot, fine_tuned = settings["temperatures"]
        parts.append(f"temperatures {zero_shot:g} (zero-shot) and {fine_tuned:g} (fine-tuned)")
    if "offset_adjustment" in settings:
        parts.append("offset adjustment " + ("on" if settings["offset_adjustment"] else "off"))
    if settings.get("n_components"):
        parts.append(f"{settings['n_components']} Beta mixture components")
    if settings.get("dtype") and settings["dtype"] != "float32":
        parts.append(f"endpoint weights in {settings['dtype']}")
    sentence = f"Evaluation settings: {', '.join(parts)}." if parts else ""
    return " ".join(part for part in (sentence, _subset_sentence(settings)) if part)


def _subset_sentence(settings: Mapping) -> str:
    """Return the sentence that an evaluation used at most `--max-examples` images per set, or "" for full sets."""
    limit = settings.get("max_examples")
    if not limit:
        return ""
    return (
        f"Each set was limited to at most {limit} images (`--max-examples {limit}`), so the scores are those of that "
        "subset, not of the full sets."
    )


def _reported_method_sentence(results: Mapping, method: str | None, static_alpha: float | None) -> str:
    """Say which method the `model-index` reports and what set-level fitting its scores depend on."""
    if method is None:
        alpha = f" at alpha = {static_alpha:g}" if static_alpha is not None else " at the saved alpha"
        return f"The `model-index` metadata of this card reports WiSE-FT{alpha}, the model's static weights."
    sentence = f"The `model-index` metadata of this card reports {method_label(method, results)}."
    offset = bool((results.get("settings") or {}).get("offset_adjustment"))
    if method == "dawin_mixture":
        fitted = "the Beta mixture and the offset statistics" if offset else "the Beta mixture"
    elif offset and method in ("dawin_sample", "output_ensemble"):
        fitted = "the offset statistics"
    else:
        return sentence
    return (
        f"{sentence} The evaluation fits {fitted} on each evaluation set, so a model that uses its saved "
        "calibration can score slightly differently."
    )


def _results_section(
    results: Mapping | None, method: str | None, repo_id: str | None, static_alpha: float | None = None
) -> str:
    """Render the evaluation section, between the markers that `update_card_results` replaces."""
    if results is None:
        body = (
            "No evaluation results were given when this card was written. `hf-dawin evaluate --model "
            f"{repo_id or 'MODEL'} ... --push-results {repo_id or 'REPO'}` adds them here, and "
            f"`hf-dawin push-results {repo_id or 'REPO'} --results-dir DIR` adds those of an earlier run."
        )
    else:
        id_name = results["in_distribution"]
        ood_names = results.get("out_of_distribution") or []
        rows = []
        for name, entry in results["sets"].items():
            role = "ID" if name == id_name else "OOD"
            skipped = entry.get("num_skipped", 0)
            rows.append((name, role, entry["num_examples"], skipped, entry["num_classes"]))
        sets_table = _markdown_table(("Set", "Role", "Images", "Skipped (unreadable)", "Classes"), rows)
        shifts = ", ".join(ood_names) if ood_names else "none"
        paragraphs = [
            f"In-distribution (ID) set: {id_name}. Distribution shifts (OOD): {shifts}.",
            sets_table,
            _evaluation_settings_sentence(results.get("settings") or {}),
            "Accuracy (%) of DaWin and its baselines. OOD avg is the mean over the shifted sets, and the oracle "
            "interpolates with a coefficient computed from the true label, so it is for analysis only.",
            summarize(dict(results), markdown=True),
            _reported_method_sentence(results, method, static_alpha),
        ]
        body = "\n\n".join(paragraph for paragraph in paragraphs if paragraph)
    return f"{RESULTS_START_MARKER}\n{body}\n{RESULTS_END_MARKER}"


def _render(template: Path, card_data: ModelCardData, **values) -> ModelCard:
    if not template.is_file():
        raise FileNotFoundError(
            f"Model card template {template} is missing; reinstall hf_dawin so that its package data is present."
        )
    return ModelCard.from_template(card_data, template_path=str(template), **values)


# ----------------------------------------------------------------------------------------------------------
# DaWin model cards
# ----------------------------------------------------------------------------------------------------------


def build_model_card(
    model,
    *,
    repo_id: str | None = None,
    results: Mapping | None = None,
    method: str | None = None,
    tags: Sequence[str] | None = None,
) -> ModelCard:
    """Render the model card of a DaWin model from the package template.

    The metadata lists the Hub endpoints as `base_model`, `pipeline_tag: image-classification`, the DaWin tags and
    `library_name: transformers`. With `results`, the metadata gets `model-index` entries and the text an accuracy
    table. The text states the interpolation settings, the fitted mixture and usage code.

    Args:
        model ([`DaWinCLIPModel`]): The model to describe.
        repo_id (`str`, *optional*): Repository id used in the title and the usage code.
        results (`Mapping`, *optional*): Output of `hf_dawin.evaluation.evaluate_pair`.
        method (`str`, *optional*): Method reported in `model-index`; defaults to the model's mode (see
            [`method_for_mode`]).
        tags (`Sequence[str]`, *optional*): Tags added to the DaWin tags.

    Returns:
        `huggingface_hub.ModelCard`.

    Example:

    ```python
    >>> card = build_model_card(model, repo_id="my-org/clip-dawin", results=results)
    >>> card.data.base_model
    ['openai/clip-vit-base-patch32', 'my-org/clip-vit-base-patch32-imagenet']
    ```
    """
    config = model.config
    model_name = _default_model_name(repo_id, "DaWin CLIP classifier")
    method = method or method_for_mode(config)
    static_alpha = config.alpha if method is None else None
    eval_results = None
    if results is not None:
        eval_results = eval_results_from(results, method=method, static_alpha=static_alpha)
    base_models = _base_models(config)
    card_data = ModelCardData(
        base_model=base_models or None,
        base_model_relation="merge" if len(base_models) > 1 else None,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=[*CARD_TAGS, *(tags or [])],
        metrics=["accuracy", "f1"] if results is not None else None,
        # ModelCardData writes model_name into the metadata unless it names the model-index entry.
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
    )
    return _render(
        DAWIN_CARD_TEMPLATE,
        card_data,
        model_name=model_name,
        repo_id=repo_id or "path/to/model",
        zero_shot_source=_describe_source(config.zero_shot_name_or_path),
        fine_tuned_source=_describe_source(config.fine_tuned_name_or_path),
        zero_shot_head=_head_description(config.head_sources, "zero_shot"),
        fine_tuned_head=_head_description(config.head_sources, "fine_tuned"),
        num_classes=config.num_classes,
        class_list=_class_list(config.class_names),
        templates_block=_templates_block(config.templates),
        settings_table=_settings_table(config),
        mode_description=_mode_description(config),
        mixture_block=_mixture_block(config),
        statistics_block=_statistics_block(config),
        results_section=_results_section(results, method, repo_id, static_alpha),
        citation=CITATION,
    )


def update_card_results(
    card: ModelCard,
    results: Mapping,
    *,
    method: str | None = "dawin_sample",
    static_alpha: float | None = None,
    model_name: str | None = None,
) -> ModelCard:
    """Write an evaluation into an existing card: `model-index` entries and the evaluation section.

    Every entry of the card for a dataset in `results` is replaced, whatever its metric. Entries for other
    datasets stay, and the evaluation section names them. The text between the hf-dawin evaluation markers is
    replaced, or a new "Evaluation" section is appended.

    Args:
        card (`ModelCard`): The card to update in place.
        results (`Mapping`): Output of `hf_dawin.evaluation.evaluate_pair`.
        method (`str`, *optional*, defaults to `"dawin_sample"`): Method reported in `model-index`.
        static_alpha (`float`, *optional*): WiSE-FT alpha reported when `method` is None.
        model_name (`str`, *optional*): Name of the `model-index` entry; defaults to the card's name.

    Returns:
        The updated `card`.
    """
    new_results = eval_results_from(results, method=method, static_alpha=static_alpha)
    section = _results_section(results, method, None, static_alpha)
    return replace_card_results(card, new_results, section, model_name=model_name)


def replace_card_results(
    card: ModelCard, new_results: Sequence[EvalResult], section: str, *, model_name: str | None = None
) -> ModelCard:
    """Put `model-index` entries and an evaluation section into a card, replacing those of an earlier evaluation.

    Every entry for a task and dataset of `new_results` is replaced, whatever its metric. Entries for other
    datasets stay, and the section then names those datasets. The text between the hf-dawin evaluation markers
    becomes `section`, or an "Evaluation" section is appended.

    Args:
        card (`ModelCard`): The card to update in place.
        new_results (`Sequence[EvalResult]`): The new `model-index` entries.
        section (`str`): Evaluation text, starting and ending with the markers.
        model_name (`str`, *optional*): Name of the `model-index` entry when the card has none.

    Returns:
        The updated `card`.
    """
    # Every entry of a re-evaluated dataset goes, so no metric of an earlier method outlives it.
    replaced = {result.unique_identifier for result in new_results}
    other_entries = [result for result in (card.data.eval_results or []) if result.unique_identifier not in replaced]
    card.data.eval_results = other_entries + list(new_results)
    if other_entries:
        dataset_names = dict.fromkeys(result.dataset_name for result in other_entries)
        other_datasets = ", ".join(f"`{name}`" for name in dataset_names)
        note = (
            f"\nThe `model-index` metadata also keeps entries for datasets that this evaluation did not cover: "
            f"{other_datasets}. They come from an earlier evaluation or were written by hand. Entries that "
            "hf-dawin wrote name their method in the metric name, and those of a run limited with `--max-examples` "
            "carry the limit in their `dataset_args`.\n"
        )
        end = section.rfind(RESULTS_END_MARKER)
        section = section[:end] + note + section[end:]
    card.data.model_name = card.data.model_name or model_name or "model"
    card.data.metrics = sorted(set(card.data.metrics or []) | {"accuracy", "f1"})

    text = card.text
    start, end = text.find(RESULTS_START_MARKER), text.find(RESULTS_END_MARKER)
    if start != -1 and end > start:
        card.text = text[:start] + section + text[end + len(RESULTS_END_MARKER) :]
    else:
        card.text = text.rstrip("\n") + "\n\n## Evaluation\n\n" + section + "\n"
    return card


# ----------------------------------------------------------------------------------------------------------
# Uploads
# ----------------------------------------------------------------------------------------------------------


def _folder_operations(folder: Path) -> list[CommitOperationAdd]:
    return [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]


def _stale_weight_files(api: HfApi, repo_id: str, revision: str | None, uploaded: set[str]) -> list[str]:
    """Return the top-level weight files (`model*.safetensors` and their index) in the repository that the new
    upload does not replace."""
    try:
        existing = api.list_repo_files(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
        return []
    return sorted(path for path in existing if "/" not in path and is_weight_file(path) and path not in uploaded)


def _commit_folder(
    api: HfApi,
    repo_id: str,
    folder: Path,
    *,
    commit_message: str,
    commit_description: str | None,
    revision: str | None,
    create_pr: bool,
):
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = _folder_operations(folder)
    uploaded = {operation.path_in_repo for operation in operations}
    # Only an upload that brings weights replaces the repository's weights. A card update keeps them.
    stale = _stale_weight_files(api, repo_id, revision, uploaded) if any(map(is_weight_file, uploaded)) else []
    if stale:
        # Weights of an earlier upload with another shard layout would otherwise be loaded instead of these.
        logger.info("Deleting %d weight files of an earlier upload from %s: %s", len(stale), repo_id, stale)
        operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
    logger.info("Uploading %d files to %s in one commit.", len(operations), repo_id)
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


def push_dawin_to_hub(
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
    """Upload a DaWin model and its model card to the Hub in one commit.

    The commit contains `config.json` (interpolation settings and the fitted mixture included), `model.safetensors`
    (both endpoints and both heads), the processor files, the modeling code for `trust_remote_code` and a
    `README.md` rendered by [`build_model_card`]. The repository is created if it does not exist.

    Args:
        model ([`DaWinCLIPModel`]): The model to upload.
        repo_id (`str`): Target repository, for example `"my-org/clip-vit-b32-dawin"`.
        results (`Mapping`, *optional*): Output of `hf_dawin.evaluation.evaluate_pair`, written into the card.
        commit_message (`str`, *optional*): Commit summary; defaults to `"Upload DaWin model"`.
        commit_description (`str`, *optional*): Commit description.
        private (`bool`, *optional*): Visibility of a newly created repository.
        token (`bool` or `str`, *optional*): Hub token; defaults to the locally saved one.
        revision (`str`, *optional*): Branch to commit to, created if missing.
        create_pr (`bool`, *optional*, defaults to `False`): Open a pull request instead of committing directly.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`): Largest weight file before sharding.
        tags (`Sequence[str]`, *optional*): Extra card tags.

    Returns:
        `huggingface_hub.CommitInfo` of the commit.

    Example:

    ```python
    >>> model.calibrate(calibration_batches)
    >>> model.config.mode = "mixture"
    >>> push_dawin_to_hub(model, "my-org/clip-vit-b32-dawin", results=results).commit_url
    ```
    """
    return push_model_with_card(
        model,
        repo_id,
        lambda card_repo_id: build_model_card(model, repo_id=card_repo_id, results=results, tags=tags),
        commit_message=commit_message or "Upload DaWin model",
        commit_description=commit_description,
        private=private,
        token=token,
        revision=revision,
        create_pr=create_pr,
        max_shard_size=max_shard_size,
    )


def push_model_with_card(
    model,
    repo_id: str,
    build_card: Callable[[str], ModelCard],
    *,
    commit_message: str,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "5GB",
):
    """Save `model` with the card `build_card(repo_id)` renders and upload both in one commit.

    The card is rendered once before the repository exists, so invalid results fail without creating an empty
    repository. The other arguments are those of [`push_dawin_to_hub`].

    Returns:
        `huggingface_hub.CommitInfo` of the commit.
    """
    build_card(repo_id)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    card = build_card(repo_id)
    with tempfile.TemporaryDirectory(prefix="hf_dawin_push_") as folder:
        folder = Path(folder)
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        card.save(folder / "README.md")
        return _commit_folder(
            api,
            repo_id,
            folder,
            commit_message=commit_message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


def check_card_kind(card: ModelCard, repo_id: str, *, multitask: bool) -> None:
    """Raise if a card's tags show a DaWin model of the other kind than the results about to be written into it.

    Cards without those tags (written by hand, or for other models) pass.

    Raises:
        ValueError: Naming the repository, the kind of its model and the kind of the results.
    """
    tags = set(card.data.tags or [])
    card_is_multitask = "multi-task" in tags
    card_is_pair = "distribution-shift" in tags and not card_is_multitask
    if (multitask and card_is_pair) or (not multitask and card_is_multitask):
        model_kind = "a multi-task DaWin model" if card_is_multitask else "a DaWin pair model"
        results_kind = "multi-task" if multitask else "pair (distribution-shift)"
        raise ValueError(
            f"The model card of {repo_id} describes {model_kind}, but the results are from a {results_kind} "
            "evaluation. Push them to the repository of the model that was evaluated."
        )


def push_results_to_hub(
    repo_id: str,
    results: Mapping,
    *,
    method: str | None = "dawin_sample",
    static_alpha: float | None = None,
    commit_message: str | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Write an evaluation into a Hub repository's model card and upload it in one commit.

    The existing `README.md` is downloaded and updated with [`update_card_results`], and a repository without a
    card gets a new one. The repository is created if it does not exist.

    Args:
        repo_id (`str`): Repository whose card receives the results.
        results (`Mapping`): Output of `hf_dawin.evaluation.evaluate_pair`.
        method (`str`, *optional*, defaults to `"dawin_sample"`): Method reported in `model-index`.
        static_alpha (`float`, *optional*): WiSE-FT alpha reported when `method` is None.
        commit_message (`str`, *optional*): Commit summary.
        token (`bool` or `str`, *optional*): Hub token; defaults to the locally saved one.
        revision (`str`, *optional*): Branch to read the card from and commit to.
        create_pr (`bool`, *optional*, defaults to `False`): Open a pull request instead of committing directly.

    Returns:
        `huggingface_hub.CommitInfo` of the commit.
    """

    def new_card(repo_id: str) -> ModelCard:
        return results_card(
            repo_id, "Distribution-shift evaluation written by `hf-dawin evaluate`.",
            _results_section(None, method, repo_id), CARD_TAGS,
        )  # fmt: skip

    def update(card: ModelCard, repo_id: str) -> None:
        check_card_kind(card, repo_id, multitask=False)
        model_name = _default_model_name(repo_id, "model")
        update_card_results(card, results, method=method, static_alpha=static_alpha, model_name=model_name)

    return push_card_update(
        repo_id, update, new_card, commit_message=commit_message or "Add DaWin evaluation results", token=token,
        revision=revision, create_pr=create_pr,
    )  # fmt: skip


def results_card(repo_id: str, description: str, results_section: str, tags: Sequence[str]) -> ModelCard:
    """Render the card of a repository that had none when evaluation results were pushed to it."""
    return _render(
        RESULTS_CARD_TEMPLATE,
        ModelCardData(library_name="transformers", pipeline_tag="image-classification", tags=list(tags)),
        model_name=_default_model_name(repo_id, "model"),
        description=description,
        results_section=results_section,
        citation=CITATION,
    )


def push_card_update(
    repo_id: str,
    update: Callable[[ModelCard, str], None],
    new_card: Callable[[str], ModelCard],
    *,
    commit_message: str,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Download a repository's model card, update it and upload it in one commit.

    The repository is created if it does not exist; without a `README.md` the card starts from `new_card(repo_id)`.

    Args:
        repo_id (`str`): Repository whose card is updated.
        update (`Callable[[ModelCard, str], None]`): Changes the card in place; gets the full repository id.
        new_card (`Callable[[str], ModelCard]`): Builds a card for a repository without one.
        commit_message (`str`): Commit summary.
        token (`bool` or `str`, *optional*): Hub token; defaults to the locally saved one.
        revision (`str`, *optional*): Branch to read the card from and commit to.
        create_pr (`bool`, *optional*, defaults to `False`): Open a pull request instead of committing directly.

    Returns:
        `huggingface_hub.CommitInfo` of the commit.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory(prefix="hf_dawin_card_") as folder:
        folder = Path(folder)
        try:
            path = api.hf_hub_download(repo_id, "README.md", revision=revision, cache_dir=folder / "cache")
            card = ModelCard.load(path)
            logger.info("Updating the existing model card of %s.", repo_id)
        except EntryNotFoundError:
            logger.info("%s has no model card yet; writing a new one.", repo_id)
            card = new_card(repo_id)
        update(card, repo_id)
        upload = folder / "upload"
        card.save(upload / "README.md")
        return _commit_folder(
            api, repo_id, upload, commit_message=commit_message, commit_description=None, revision=revision,
            create_pr=create_pr,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Plain CLIP exports of merged weights
# ----------------------------------------------------------------------------------------------------------


def build_merged_model_card(
    model, alpha: float, *, repo_id: str | None = None, component: int | None = None
) -> ModelCard:
    """Render the card of a plain `CLIPModel` exported with [`save_merged_components`].

    Args:
        model ([`DaWinCLIPModel`]): The DaWin model the weights come from.
        alpha (`float`): Weight on the fine-tuned endpoint.
        repo_id (`str`, *optional*): Repository id used in the title and the usage code.
        component (`int`, *optional*): Index of the mixture component whose mean `alpha` is.

    Returns:
        `huggingface_hub.ModelCard` with `pipeline_tag: zero-shot-image-classification`.
    """
    config = model.config
    alpha_text = f"{alpha:.4f}".rstrip("0").rstrip(".") if alpha not in (0.0, 1.0) else f"{alpha:g}"
    model_name = _default_model_name(repo_id, f"CLIP interpolated at alpha {alpha_text}")
    if component is not None:
        origin = (
            f"α is the mean coefficient of component {component} of the Beta mixture fitted by DaWin, so this "
            "checkpoint classifies the images that the mixture assigns to that component."
        )
    else:
        origin = "α is a static coefficient, as in WiSE-FT weight-space ensembles."
    if (config.head_sources or {}).get("fine_tuned") == "linear":
        head_block = (
            "The fine-tuned endpoint brought a trained linear head, which a `CLIPModel` cannot hold, so zero-shot "
            "classification with this checkpoint uses the interpolated text tower instead.\n\n"
        )
    elif not text_sides_equal(model.zero_shot, [model.fine_tuned]):
        head_block = (
            "Zero-shot classification with this checkpoint embeds the prompts with its interpolated text tower. "
            "hf_dawin's static and mixture modes instead interpolate the two endpoints' zero-shot heads, each "
            "embedded with that endpoint's own text tower. Fine-tuning changed the text tower, so this checkpoint's "
            "predictions can differ slightly from hf_dawin's at the same α, and so can its accuracy.\n\n"
        )
    else:
        head_block = (
            "Both endpoints have the same text tower, so zero-shot classification with this checkpoint, given the "
            "same class names and prompt templates, matches hf_dawin's static mode at the same α.\n\n"
        )
    base_models = _base_models(config)
    labels = ", ".join(f'"{name}"' for name in config.class_names[:3])
    card_data = ModelCardData(
        base_model=base_models or None,
        base_model_relation="merge" if len(base_models) > 1 else None,
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        tags=list(MERGED_CARD_TAGS),
        interpolation_alpha=float(alpha),
    )
    return _render(
        MERGED_CARD_TEMPLATE,
        card_data,
        model_name=model_name,
        repo_id=repo_id or "path/to/model",
        alpha_text=alpha_text,
        origin_sentence=origin,
        zero_shot_source=_describe_source(config.zero_shot_name_or_path),
        fine_tuned_source=_describe_source(config.fine_tuned_name_or_path),
        head_block=head_block,
        label_example=labels,
        citation=CITATION,
    )


def text_sides_equal(reference, others: Sequence) -> bool:
    """Return whether all `CLIPModel`s in `others` share `reference`'s text tower, text projection and logit scale."""
    reference_state = reference.state_dict()
    text_side = [name for name in reference_state if not name.startswith(("vision_model.", "visual_projection."))]
    for other in others:
        other_state = other.state_dict()
        for name in text_side:
            if not torch.equal(reference_state[name], other_state[name].to(reference_state[name].device)):
                return False
    return True


def _component_alphas(model, alphas: Sequence[float] | None) -> list[tuple[float, int | None]]:
    if alphas is not None:
        alphas = list(alphas)
        if not alphas:
            raise ValueError("alphas is empty; pass at least one weight on the fine-tuned endpoint, or None.")
        return [(check_alpha(alpha), None) for alpha in alphas]
    mixture = model.stored_mixture()
    if mixture is None or not mixture.is_fitted:
        raise ValueError(
            "The model has no fitted Beta mixture, so there are no component means to export. Call "
            "model.calibrate(...) or model.fit_mixture(...) first, or pass alphas=[...]."
        )
    return [(float(mean), index) for index, mean in enumerate(mixture.component_means)]


def write_plain_clip(model, merged, card: ModelCard, folder: Path) -> None:
    """Write a merged `CLIPModel`, the DaWin model's processor files and `card` into `folder`.

    Args:
        model: The DaWin model (pair or multi-task) whose processor is saved.
        merged (`CLIPModel`): The merged weights.
        card (`huggingface_hub.ModelCard`): Saved as `README.md`.
        folder (`Path`): The folder to write.
    """
    merged.save_pretrained(folder)
    processor = model.processor
    if processor is not None:
        processor.save_pretrained(folder)
    if processor is None or getattr(processor, "tokenizer", None) is None:
        logger.warning(
            "The DaWin model has no CLIP tokenizer attached, so %s contains no tokenizer files. Attach a "
            "CLIPProcessor with model.attach_processor(...) before exporting for zero-shot pipelines.",
            folder,
        )
    if model.image_processor is not None and model.image_processor is not processor:
        model.image_processor.save_pretrained(folder)
    card.save(folder / "README.md")


def _save_merged(model, alpha: float, folder: Path, *, repo_id: str | None, component: int | None) -> None:
    card = build_merged_model_card(model, alpha, repo_id=repo_id, component=component)
    write_plain_clip(model, model.merge(alpha), card, folder)


def save_merged_components(
    model, output_dir: str | Path, *, alphas: Sequence[float] | None = None
) -> list[Path]:
    """Save plain `CLIPModel` repositories with interpolated weights, one per mixture component or alpha.

    Each folder contains the merged weights (text tower included), the `CLIPProcessor` files and a model card, and
    loads with `CLIPModel.from_pretrained` or `pipeline("zero-shot-image-classification")` without hf_dawin.

    Args:
        model ([`DaWinCLIPModel`]): The DaWin model.
        output_dir (`str` or `Path`): Parent folder; each export goes to `alpha_<value>` inside it, with
            `_component<i>` (or `_export<i>`) appended when two alphas round to the same four decimals.
        alphas (`Sequence[float]`, *optional*): Static weights on the fine-tuned endpoint. Defaults to the
            component means of the model's fitted Beta mixture.

    Returns:
        `list[Path]`: The written folders, in the order of `alphas` or of the mixture components.

    Raises:
        ValueError: If `alphas` is None and no mixture is fitted, or an alpha lies outside [0, 1].

    Example:

    ```python
    >>> model.calibrate(calibration_batches)
    >>> save_merged_components(model, "exports")
    [PosixPath('exports/alpha_0.1532'), PosixPath('exports/alpha_0.5120'), PosixPath('exports/alpha_0.8817')]
    ```
    """
    output_dir = Path(output_dir)
    exports = _component_alphas(model, alphas)
    names = [f"alpha_{alpha:.4f}" for alpha, _ in exports]
    # Alphas that round to the same folder name get their position (or mixture component) appended.
    names = [
        name if names.count(name) == 1 else f"{name}_{'component' if component is not None else 'export'}{index}"
        for index, (name, (_, component)) in enumerate(zip(names, exports))
    ]
    folders = []
    for name, (alpha, component) in zip(names, exports):
        folder = output_dir / name
        # Written into a staging folder first, so an interrupted save leaves an earlier export intact.
        save_atomically(
            folder,
            lambda staging, alpha=alpha, component=component: _save_merged(
                model, alpha, staging, repo_id=None, component=component
            ),
        )
        logger.info("Saved the CLIP model merged at alpha %.4f to %s.", alpha, folder)
        folders.append(folder)
    return folders


def push_merged_component(
    model,
    repo_id: str,
    alpha: float,
    *,
    component: int | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Upload a plain `CLIPModel` merged at `alpha`, with its processor and card, in one commit.

    Args:
        model ([`DaWinCLIPModel`]): The DaWin model.
        repo_id (`str`): Target repository, created if it does not exist.
        alpha (`float`): Weight on the fine-tuned endpoint, for example a mixture component mean from
            `model.stored_mixture().component_means`.
        component (`int`, *optional*): Mixture component that `alpha` belongs to, stated in the card.
        commit_message (`str`, *optional*): Commit summary.
        private (`bool`, *optional*): Visibility of a newly created repository.
        token (`bool` or `str`, *optional*): Hub token; defaults to the locally saved one.
        revision (`str`, *optional*): Branch to commit to, created if missing.
        create_pr (`bool`, *optional*, defaults to `False`): Open a pull request instead of committing directly.

    Returns:
        `huggingface_hub.CommitInfo` of the commit.
    """
    alpha = check_alpha(alpha)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory(prefix="hf_dawin_merged_") as folder:
        folder = Path(folder)
        _save_merged(model, alpha, folder, repo_id=repo_id, component=component)
        return _commit_folder(
            api,
            repo_id,
            folder,
            commit_message=commit_message or f"Upload CLIP merged at alpha {alpha:g}",
            commit_description=None,
            revision=revision,
            create_pr=create_pr,
        )
