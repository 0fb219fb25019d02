"""Classification heads of CLIP endpoints: zero-shot heads from prompts, and trained linear heads.

An endpoint classifies an image with `normalize(visual_projection(pooled vision output)) @ W.T + b`. A
zero-shot head builds W from class names and prompt templates with the endpoint's own text tower: each
prompt embedding is L2-normalised, the prompts of a class are averaged and normalised again, and the
classes are stacked and multiplied by the endpoint's logit scale exp(logit_scale) (100 for OpenAI CLIP).
Fine-tuned checkpoints of the LP-FT / WiSE-FT kind bring a trained linear head instead, applied to the same
normalised features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPModel
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "build_zero_shot_head",
    "check_class_names",
    "class_names_from_id2label",
    "class_names_from_label2id",
    "encode_image_features",
    "linear_head_from",
    "warn_if_single_class",
]

DEFAULT_BATCH_SIZE = 256


def _names_in_index_order(index_name_pairs, num_classes: int) -> list | None:
    """Return the names of `(index, name)` pairs in index order, or None if the indices are not 0 to `num_classes - 1`.

    Each index must appear once. Indices may be integers or their strings, as in a config.json file.
    """
    try:
        pairs = [(int(index), name) for index, name in index_name_pairs]
    except (TypeError, ValueError):
        return None
    by_index = dict(pairs)
    if sorted(by_index) != list(range(num_classes)) or len(by_index) != len(pairs):
        return None
    return [by_index[index] for index in range(num_classes)]


def _mapping_items(value) -> list:
    """Return the items of `value` as `dict(value)` reads it, or no items if it cannot."""
    try:
        return list(dict(value).items())
    except (TypeError, ValueError):
        return []


def class_names_from_id2label(id2label: Mapping, num_classes: int) -> list[str]:
    """Return the class names that an `id2label` mapping gives heads of `num_classes` classes, in index order.

    Keys may be integers or their strings, as in a config.json file.

    Raises:
        ValueError: If the keys are not exactly 0 to `num_classes - 1`, or the names fail [`check_class_names`].
    """
    names = _names_in_index_order(_mapping_items(id2label), num_classes)
    if names is None:
        raise ValueError(
            f"id2label must map the indices 0 to {num_classes - 1} to the names of the {num_classes} classes of the "
            f"heads, received {id2label!r}. To rename the classes, pass their new names in order. To classify other "
            "classes, build a new model from the endpoints with new class names."
        )
    return check_class_names(names)


def class_names_from_label2id(label2id: Mapping, num_classes: int) -> list[str]:
    """Return the class names that a `label2id` mapping gives heads of `num_classes` classes, in index order.

    Raises:
        ValueError: If the indices are not exactly 0 to `num_classes - 1`, once each, or the names fail
            [`check_class_names`].
    """
    names = _names_in_index_order([(index, name) for name, index in _mapping_items(label2id)], num_classes)
    if names is None:
        raise ValueError(
            f"label2id must map the names of the {num_classes} classes of the heads to the indices 0 to "
            f"{num_classes - 1}, received {label2id!r}. To rename the classes, pass their new names with their "
            "indices. To classify other classes, build a new model from the endpoints with new class names."
        )
    return check_class_names(names)


def warn_if_single_class(class_names: Sequence[str], owner: str) -> None:
    """Warn if `owner` (for example "class_names" or "task 'mnist'") has one class, which makes DaWin static.

    With one class, softmax gives probability 1, so every entropy is 0 and the coefficients are the same for every
    image.
    """
    if len(class_names) == 1:
        logger.warning(
            f"{owner} has one class ({class_names[0]!r}), so every prediction has entropy 0 and DaWin gives every "
            "image the same coefficients. For a pair without offset adjustment it equals WiSE-FT at alpha 0.5, and "
            "for several fine-tuned endpoints it equals task arithmetic. Pass at least two classes."
        )


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """Validate class names and return them as a list.

    Raises:
        ValueError: If the list is empty, contains a non-string or blank entry, or contains duplicates (listed),
            compared ignoring case and whitespace as the CLIP tokenizer does.
        TypeError: If `class_names` is a single string instead of a sequence.
    """
    if isinstance(class_names, str):
        raise TypeError(
            f"class_names must be a sequence of strings, received the single string {class_names!r}. "
            "Pass a list such as ['cat', 'dog']."
        )
    names = list(class_names) if class_names is not None else []
    if not names:
        raise ValueError("class_names is empty; pass one name per class of the classification task.")
    invalid = [repr(name) for name in names if not isinstance(name, str) or not name.strip()]
    if invalid:
        raise ValueError(f"class_names must be non-empty strings, received {', '.join(invalid)}.")
    # The CLIP tokenizer lowercases the prompts and collapses runs of whitespace, so 'Ice cream' and 'ice  cream'
    # get the same zero-shot head. Dataset labels are also matched to class names ignoring case.
    positions: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        positions.setdefault(" ".join(name.lower().split()), []).append(index)
    duplicates = [indices for indices in positions.values() if len(indices) > 1]
    if duplicates:
        described = "; ".join(
            " and ".join(f"{names[index]!r} at index {index}" for index in indices) for indices in duplicates
        )
        raise ValueError(
            f"class_names contains duplicates, compared ignoring case and whitespace: {described}. Each class needs a "
            "distinct name, because the names build the zero-shot heads (the CLIP tokenizer lowercases them and "
            "collapses whitespace), "
            "label the model's outputs and match dataset labels. Rename one of each pair, for example 'sunglass' and "
            "'sunglasses'."
        )
    return names


def encode_image_features(clip_model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Compute L2-normalised projected image features.

    Args:
        clip_model (`CLIPModel`): The endpoint.
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): Images.

    Returns:
        `torch.Tensor` of shape `(batch_size, projection_dim)` in the model's dtype.
    """
    vision_outputs = clip_model.vision_model(pixel_values=pixel_values.to(clip_model.dtype))
    features = clip_model.visual_projection(vision_outputs.pooler_output)
    return F.normalize(features, dim=-1)


@torch.no_grad()
def build_zero_shot_head(
    clip_model: CLIPModel,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> torch.Tensor:
    """Build a zero-shot classification head with the endpoint's text tower.

    Args:
        clip_model (`CLIPModel`): The endpoint whose text tower embeds the prompts.
        tokenizer: A CLIP tokenizer (for example `CLIPTokenizer`) matching the text tower.
        class_names (`Sequence[str]`): One name per class.
        templates (`Sequence[str]`): Prompt templates, each with one `{}` placeholder for the class name.
        batch_size (`int`, *optional*, defaults to 256): Prompts embedded per text-tower call.
        progress (`bool`, *optional*, defaults to `False`): Show a progress bar over the classes.

    Returns:
        `torch.Tensor` of shape `(num_classes, projection_dim)`, float32: rows are normalised class
        embeddings multiplied by exp(logit_scale).
    """
    from tqdm.auto import tqdm

    names = check_class_names(class_names)
    if not templates:
        raise ValueError("templates is empty; pass at least one prompt template such as 'a photo of a {}.'.")
    bad_templates = [template for template in templates if template.count("{}") != 1]
    if bad_templates:
        raise ValueError(
            f"Each template needs exactly one '{{}}' placeholder for the class name; invalid: {bad_templates}."
        )

    device = clip_model.device
    max_length = clip_model.config.text_config.max_position_embeddings
    class_embeddings = []
    for name in tqdm(names, desc="Building zero-shot head", disable=not progress):
        prompts = [template.format(name) for template in templates]
        prompt_embeddings = []
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(
                prompts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            text_outputs = clip_model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            embedded = clip_model.text_projection(text_outputs.pooler_output).float()
            prompt_embeddings.append(F.normalize(embedded, dim=-1))
        mean_embedding = torch.cat(prompt_embeddings).mean(dim=0)
        class_embeddings.append(F.normalize(mean_embedding, dim=-1))
    logit_scale = clip_model.logit_scale.detach().float().exp()
    return torch.stack(class_embeddings) * logit_scale


def linear_head_from(
    head: nn.Linear | torch.Tensor | Mapping[str, torch.Tensor] | str | Path,
    *,
    num_classes: int,
    projection_dim: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read a trained linear head given as a module, a weight tensor, a state dict or a safetensors file.

    The head applies to L2-normalised projected image features, as in WiSE-FT's classification heads.

    Args:
        head: `nn.Linear`, a weight of shape `(num_classes, projection_dim)`, a mapping with `weight` and
            optionally `bias`, or a path to a `.safetensors` file holding those keys.
        num_classes (`int`): Expected number of classes.
        projection_dim (`int`): Expected feature size of the endpoint.

    Returns:
        `(weight, bias)`: float32 tensors of shapes `(num_classes, projection_dim)` and `(num_classes,)` (or `None`).

    Raises:
        ValueError: If shapes do not match or keys are missing.
        TypeError: If `head` has an unsupported type.
    """
    if isinstance(head, nn.Linear):
        weight, bias = head.weight, head.bias
    elif isinstance(head, torch.Tensor):
        weight, bias = head, None
    elif isinstance(head, (str, Path)):
        path = Path(head)
        if path.suffix != ".safetensors":
            raise ValueError(
                f"A linear head file must be a .safetensors file with 'weight' and optional 'bias', received {path}. "
                "Pickled checkpoints are not loaded; convert the head with safetensors.torch.save_file."
            )
        return linear_head_from(load_file(str(path)), num_classes=num_classes, projection_dim=projection_dim)
    elif isinstance(head, Mapping):
        if "weight" not in head:
            raise ValueError(
                f"A linear head mapping needs a 'weight' key (and optionally 'bias'), received keys {sorted(head)}."
            )
        weight, bias = head["weight"], head.get("bias")
    else:
        raise TypeError(
            "A linear head must be an nn.Linear, a weight tensor, a mapping with 'weight'/'bias' or a .safetensors "
            f"path, received {type(head).__name__}."
        )

    weight = weight.detach().float()
    if tuple(weight.shape) != (num_classes, projection_dim):
        raise ValueError(
            f"Expected a linear head weight of shape ({num_classes}, {projection_dim}) (num_classes, projection_dim), "
            f"received {tuple(weight.shape)}."
        )
    if bias is not None:
        bias = bias.detach().float()
        if tuple(bias.shape) != (num_classes,):
            raise ValueError(f"Expected a linear head bias of shape ({num_classes},), received {tuple(bias.shape)}.")
    return weight, bias
