"""Contrastive training shared by the embedded benchmarks' tiny CLIP endpoints.

The reference pair (`reference_pair.py`) and the multi-task suite (`multitask.py`) train `CLIPModel`s the same
way and differ only in their data. This module contains what they share: the learning-rate schedule, the AdamW
parameter groups, one symmetric InfoNCE step and the stage loop, which takes a batch-sampling callable. It also
contains the folder handling, which trains into a temporary sibling folder and reuses a cached run whose
manifest matches.
"""

import contextlib
import json
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPProcessor
from transformers.utils import logging

from ..saving import current_umask, remove_abandoned_folders


logger = logging.get_logger(__name__)

# CLIP clamps the learned temperature so that exp(logit_scale) never exceeds 100.
MAX_LOGIT_SCALE = math.log(100.0)
# AdamW settings, changed from PyTorch's defaults (betas (0.9, 0.999), eps 1e-8).
ADAMW_BETAS = (0.9, 0.98)
ADAMW_EPS = 1e-6
# Parameters of these modules belong to the text tower and get the text learning-rate factor.
TEXT_PARAMETER_PREFIXES = ("text_model.", "text_projection.")
# Losses of the last this many steps are averaged into a stage's final loss.
FINAL_LOSS_WINDOW = 20


class ContrastiveBatch(NamedTuple):
    """One training batch of image-caption pairs.

    Args:
        pixel_values (`torch.Tensor`): float32 of shape `(batch_size, 3, height, width)`, normalised model inputs.
        caption_indices (`torch.Tensor`): int64 of shape `(batch_size,)`, the row of each image's caption in the
            table of caption token ids.
        class_ids (`torch.Tensor`): int64 of shape `(batch_size,)`, the class of each pair. Pairs of one class
            count as positives when the stage uses label positives.
    """

    pixel_values: torch.Tensor
    caption_indices: torch.Tensor
    class_ids: torch.Tensor


def _is_decayed(name: str, parameter: torch.nn.Parameter) -> bool:
    # Matrices other than embeddings are decayed. Biases, norms, embeddings and the logit scale are not.
    return parameter.ndim >= 2 and "embedding" not in name and name != "logit_scale"


def learning_rate_factor(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Compute the learning-rate multiplier of a step: linear warm-up, then cosine decay towards zero.

    The warm-up lasts `max(1, round(warmup_fraction * total_steps))` steps and rises linearly to 1 at its
    last step. The cosine then falls from 1 at the first step after warm-up and reaches 0 one step after
    `total_steps - 1`, so the last step keeps a small positive factor.

    Args:
        step (`int`): the current step, from 0 to `total_steps - 1`.
        total_steps (`int`): the number of steps of the stage.
        warmup_fraction (`float`): the fraction of the steps spent in warm-up, in [0, 1].

    Returns:
        `float`: the factor in (0, 1] by which each parameter group's peak learning rate is multiplied.
    """
    warmup_steps = max(1, int(round(warmup_fraction * total_steps)))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: CLIPModel,
    learning_rate: float,
    *,
    weight_decay: float,
    text_learning_rate_factor: float = 1.0,
) -> torch.optim.AdamW:
    """Build AdamW with parameter groups by tower and by weight decay.

    There is one group per (text tower or not, decayed or not) combination, in the order in which the model's
    parameters first show each combination. Matrices get `weight_decay`, while biases, norms, embeddings and
    the logit scale get none. Each group stores its peak learning rate under `"peak_lr"`: `learning_rate` times
    `text_learning_rate_factor` for the text tower (`text_model.*` and `text_projection.*`), `learning_rate`
    for every other parameter. The schedule multiplies `"peak_lr"` by `learning_rate_factor` at every step.

    Args:
        model (`CLIPModel`): the model to optimise.
        learning_rate (`float`): the peak learning rate of every parameter outside the text tower.
        weight_decay (`float`): AdamW's decoupled weight decay of the decayed groups.
        text_learning_rate_factor (`float`, *optional*, defaults to 1.0): the text tower's peak learning rate
            relative to `learning_rate`.

    Returns:
        `torch.optim.AdamW`: the optimizer, with betas (0.9, 0.98) and eps 1e-6.

    Raises:
        ValueError: if `learning_rate` or `text_learning_rate_factor` is not positive, or `weight_decay` is
            negative.
    """
    for name, value in (("learning_rate", learning_rate), ("text_learning_rate_factor", text_learning_rate_factor)):
        if not value > 0.0:
            raise ValueError(f"`{name}` must be positive, received {value!r}.")
    if not weight_decay >= 0.0:
        raise ValueError(f"`weight_decay` must be non-negative, received {weight_decay!r}.")

    groups = {}
    for name, parameter in model.named_parameters():
        is_text = name.startswith(TEXT_PARAMETER_PREFIXES)
        is_decayed = _is_decayed(name, parameter)
        group = groups.setdefault(
            (is_text, is_decayed),
            {
                "params": [],
                "weight_decay": weight_decay if is_decayed else 0.0,
                "peak_lr": learning_rate * (text_learning_rate_factor if is_text else 1.0),
            },
        )
        group["params"].append(parameter)
    return torch.optim.AdamW(list(groups.values()), lr=learning_rate, betas=ADAMW_BETAS, eps=ADAMW_EPS)


def contrastive_loss(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Compute the symmetric image-text InfoNCE loss.

    Without `labels` this is CLIP's loss: the i-th image and the i-th caption are the only positive pair.
    With `labels`, every image-caption pair that shows the same class is a positive, and each row's target is
    uniform over its positives (as in UniCL, Yang et al., 2022).

    Args:
        logits (`torch.Tensor`): float of shape `(batch_size, batch_size)`, scaled image-caption similarities
            with images as rows.
        labels (`torch.Tensor`, *optional*): int64 of shape `(batch_size,)`, the class of each pair.

    Returns:
        `torch.Tensor`: the scalar loss, the mean of the image-to-text and text-to-image cross-entropies.
    """
    if labels is None:
        targets = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    positives = (labels[:, None] == labels[None, :]).to(logits.dtype)
    # The positive mask is symmetric, so its row-normalised form serves both directions.
    targets = positives / positives.sum(dim=1, keepdim=True)
    image_to_text = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    text_to_image = -(targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def contrastive_step(
    model: CLIPModel,
    pixel_values: torch.Tensor,
    caption_indices: torch.Tensor,
    caption_input_ids: torch.Tensor,
    class_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compute the contrastive loss of one batch, with gradients.

    The text tower runs once per distinct caption of the batch, and the embeddings are then gathered per
    image, so a batch that repeats captions costs as much text compute as its distinct captions.

    Args:
        model (`CLIPModel`): the model being trained.
        pixel_values (`torch.Tensor`): float32 of shape `(batch_size, 3, height, width)`.
        caption_indices (`torch.Tensor`): int64 of shape `(batch_size,)`, each image's row in `caption_input_ids`.
        caption_input_ids (`torch.Tensor`): int64 of shape `(num_captions, sequence_length)`, the token ids of
            every caption.
        class_ids (`torch.Tensor`, *optional*): int64 of shape `(batch_size,)`. When given, pairs of one class
            are all positives (`contrastive_loss` with labels); otherwise only each image's own caption is.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    unique_indices, inverse = torch.unique(caption_indices, return_inverse=True)
    text_embeds = model.get_text_features(input_ids=caption_input_ids[unique_indices]).pooler_output
    text_embeds = F.normalize(text_embeds, dim=-1)[inverse]
    image_embeds = F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)

    logits = model.logit_scale.exp() * image_embeds @ text_embeds.T
    return contrastive_loss(logits, class_ids)


def train_contrastive_stage(
    model: CLIPModel,
    sample_batch: Callable[[], ContrastiveBatch],
    caption_input_ids: torch.Tensor,
    *,
    steps: int,
    learning_rate: float,
    weight_decay: float,
    warmup_fraction: float,
    text_learning_rate_factor: float = 1.0,
    label_positives: bool = True,
    description: str = "contrastive training",
    progress: bool = True,
) -> list[float]:
    """Train `model` in place for one stage with a fresh AdamW optimizer and a warm-up and cosine schedule.

    Each step sets the learning rates (`learning_rate_factor`), draws a batch with `sample_batch`, takes one
    AdamW step on `contrastive_step`'s loss and clamps the logit scale to [0, log(100)]. The loop itself draws
    no random numbers, so the sampler's generator alone decides the batches. The model is in training mode
    during the stage and in evaluation mode afterwards.

    Args:
        model (`CLIPModel`): the model to train, changed in place.
        sample_batch (`Callable[[], ContrastiveBatch]`): called once per step, returns the step's batch.
        caption_input_ids (`torch.Tensor`): int64 of shape `(num_captions, sequence_length)`, the token ids of
            every caption that `ContrastiveBatch.caption_indices` points into.
        steps (`int`): optimisation steps; 0 leaves the weights unchanged.
        learning_rate (`float`): the peak learning rate (see `build_optimizer`).
        weight_decay (`float`): AdamW's weight decay of matrices.
        warmup_fraction (`float`): the fraction of the steps with linear warm-up, in [0, 1].
        text_learning_rate_factor (`float`, *optional*, defaults to 1.0): the text tower's learning rate
            relative to `learning_rate`.
        label_positives (`bool`, *optional*, defaults to `True`): count every same-class pair of a batch as a
            positive (the batch's `class_ids` go to `contrastive_loss`). With `False`, only each image's own
            caption is a positive, as in CLIP.
        description (`str`, *optional*): the progress bar's label.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm progress bar.

    Returns:
        `list[float]`: the loss of every step, in order.

    Raises:
        ValueError: if `steps` is not a non-negative integer or `warmup_fraction` is outside [0, 1], or from
            `build_optimizer` for invalid learning rates and weight decay.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"`steps` must be a non-negative integer, received {steps!r}.")
    if not 0.0 <= warmup_fraction <= 1.0:
        raise ValueError(f"`warmup_fraction` must be in [0, 1], received {warmup_fraction!r}.")

    model.train()
    optimizer = build_optimizer(
        model, learning_rate, weight_decay=weight_decay, text_learning_rate_factor=text_learning_rate_factor
    )
    losses = []
    bar = tqdm(range(steps), desc=description, disable=not progress, leave=True)
    for step in bar:
        factor = learning_rate_factor(step, steps, warmup_fraction)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor

        batch = sample_batch()
        class_ids = batch.class_ids if label_positives else None
        loss = contrastive_step(model, batch.pixel_values, batch.caption_indices, caption_input_ids, class_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    model.eval()
    return losses


def final_loss(losses: Sequence[float]) -> float | None:
    """Average the losses of a stage's last `FINAL_LOSS_WINDOW` steps, or return `None` for a stage without steps."""
    return float(np.mean(losses[-FINAL_LOSS_WINDOW:])) if losses else None


def save_endpoint(model: CLIPModel, processor: CLIPProcessor, folder: Path) -> None:
    """Save a trained endpoint (safetensors weights, config and processor files) into `folder`."""
    model.save_pretrained(folder, safe_serialization=True)
    # Tokenizing the training captions leaves truncation and padding enabled in the fast tokenizer's state, which
    # save_pretrained writes into tokenizer.json. transformers then warns that max_length is ignored whenever a
    # user of the saved tokenizer pads, so the saved state is reset to the defaults.
    backend = processor.tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    processor.save_pretrained(folder)


def software_versions() -> dict[str, str]:
    """Return the versions of the software that trained the weights, for a manifest."""
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def read_manifest(folder: Path, manifest_name: str) -> dict | None:
    """Read the JSON manifest `folder / manifest_name`.

    Returns:
        `dict` or `None`: the manifest, or `None` when the file is missing, unreadable, not valid JSON or not a
        JSON object.
    """
    try:
        manifest = json.loads((folder / manifest_name).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _has_endpoint_weights(folder: Path, endpoint_folders: Sequence[str]) -> bool:
    return all((folder / endpoint / "model.safetensors").is_file() for endpoint in endpoint_folders)


def _work_prefix(output_path: Path, role: str) -> str:
    """Return the name prefix of this process's temporary `role` folders beside `output_path`.

    The process id in the name lets a later run remove the folders of a run that was killed.
    """
    return f".{output_path.name}-{role}-{os.getpid()}-"


def _remove_abandoned_work(output_path: Path) -> None:
    """Remove the temporary folders that killed runs left beside `output_path`."""
    for role in ("partial", "old"):
        remove_abandoned_folders(output_path.parent, f".{output_path.name}-{role}-")


def _make_partial_folder(output_path: Path) -> Path:
    work_dir = Path(tempfile.mkdtemp(dir=output_path.parent, prefix=_work_prefix(output_path, "partial")))
    # mkdtemp creates the folder readable by its owner only; give the result the usual permissions instead.
    os.chmod(work_dir, 0o777 & ~current_umask())
    return work_dir


def _replace_folder(source: Path, target: Path) -> None:
    # Move an older folder aside first, so the target is never a mix of two training runs.
    if target.exists():
        retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=_work_prefix(target, "old")))
        os.replace(target, retired / target.name)
        os.replace(source, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(source, target)


@contextlib.contextmanager
def _transformers_progress_bars(enabled: bool):
    # transformers shows its own bars when saving and loading weights; follow the caller's `progress` choice.
    was_enabled = logging.is_progress_bar_enabled()
    if enabled:
        logging.enable_progress_bar()
    else:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()
        else:
            logging.disable_progress_bar()


def train_or_reuse(
    output_path: Path,
    train_into: Callable[[Path], dict],
    *,
    cache_key: dict,
    manifest_name: str,
    endpoint_folders: Sequence[str],
    kind: str,
    num_threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Train endpoints into `output_path`, or reuse the folder when it contains the same training run.

    A folder is reused when its manifest's `"cache_key"` equals `cache_key` and every endpoint folder contains
    `model.safetensors`. Otherwise `train_into` runs in a temporary sibling of `output_path`, and the manifest it
    returns is written there with `cache_key` added. The sibling then replaces `output_path` by a rename, so an
    interrupted run never leaves a partial folder or a mix of two runs at `output_path`. A run killed outright
    leaves its temporary sibling behind, and the next training into `output_path` removes it and starts again.

    Args:
        output_path (`Path`): the resolved output folder.
        train_into (`Callable[[Path], dict]`): trains into the given empty folder and returns the manifest.
        cache_key (`dict`): JSON-compatible values that identify the training run (settings, seed, recipe).
        manifest_name (`str`): the manifest's file name in `output_path`.
        endpoint_folders (`Sequence[str]`): folders, relative to `output_path`, that each contain a
            `model.safetensors` in a complete run.
        kind (`str`): what the folder contains, for messages, e.g. `"reference pair"`.
        num_threads (`int`, *optional*): torch intra-op threads while training, restored afterwards; `None`
            keeps torch's setting.
        progress (`bool`, *optional*, defaults to `True`): show transformers' progress bars while training.

    Returns:
        `dict`: the manifest of the reused or newly trained folder, `"cache_key"` included.

    Raises:
        ValueError: if `output_path` exists and is not a folder, or is a non-empty folder without a readable
            manifest.
    """
    # Reuse a complete run with the same cache key.
    existing = read_manifest(output_path, manifest_name)
    is_complete = existing is not None and _has_endpoint_weights(output_path, endpoint_folders)
    if is_complete and existing.get("cache_key") == cache_key:
        logger.info("Reusing the %s in %s", kind, output_path)
        return existing
    if output_path.exists() and not output_path.is_dir():
        raise ValueError(f"{output_path} exists and is not a folder. Choose a folder path for the {kind}.")
    if output_path.exists() and existing is None and any(output_path.iterdir()):
        raise ValueError(
            f"{output_path} exists and is not a {kind} (no readable {manifest_name}). Choose an empty or new "
            "folder, or delete this one."
        )

    output_path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_work(output_path)
    work_dir = _make_partial_folder(output_path)
    previous_threads = torch.get_num_threads()
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        with _transformers_progress_bars(progress):
            manifest = train_into(work_dir)
        manifest["cache_key"] = cache_key
        (work_dir / manifest_name).write_text(json.dumps(manifest, indent=2) + "\n")
        if existing is not None:
            logger.warning("Replacing the %s in %s, which was trained with other settings.", kind, output_path)
        _replace_folder(work_dir, output_path)
    finally:
        torch.set_num_threads(previous_threads)
        shutil.rmtree(work_dir, ignore_errors=True)
    return manifest


__all__ = [
    "ADAMW_BETAS",
    "ADAMW_EPS",
    "FINAL_LOSS_WINDOW",
    "MAX_LOGIT_SCALE",
    "TEXT_PARAMETER_PREFIXES",
    "ContrastiveBatch",
    "build_optimizer",
    "contrastive_loss",
    "contrastive_step",
    "final_loss",
    "learning_rate_factor",
    "read_manifest",
    "save_endpoint",
    "software_versions",
    "train_contrastive_stage",
    "train_or_reuse",
]
