"""Multi-task DaWin: one pre-trained CLIP and several fine-tuned CLIPs, merged per image from their entropies.

With T fine-tuned endpoints theta_1 ... theta_T of one pre-trained CLIP theta_0 and task vectors
tau_t = theta_t - theta_0, DaWin (Oh et al., "DaWin: Training-free Dynamic Weight Interpolation for Robust
Adaptation", ICLR 2025, arXiv:2410.03782) classifies an image x of a task with the weights

    theta(x) = theta_0 + s * T * sum_t pi_t(x) tau_t,   pi(x) = softmax_t(-H_t(x)),

where H_t(x) is the entropy of endpoint t's prediction with that task's head (built from endpoint t's own
text tower) and s is the task-arithmetic scale (0.3 by default). With uniform pi this is task arithmetic,
theta_0 + s * sum_t tau_t. Heads are interpolated like every other tensor.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, CLIPProcessor
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import logging

from .coefficients import check_finite_logits, entropy
from .configuration_multitask import (
    DEFAULT_SCALE,
    DEFAULT_TIES_DENSITY,
    DEFAULT_TIES_SCALE,
    DaWinMultiTaskCLIPConfig,
    check_multitask_mode,
    check_scale,
    check_task,
)
from .heads import build_zero_shot_head, warn_if_single_class
from .interpolation import (
    MixingState,
    build_mixed_module,
    check_compatible_configs,
    check_compatible_state_dicts,
    merge_task_vectors,
)
from .merging import ties_merge_state_dicts
from .loading import check_source_loadable, load_endpoints, load_processor, safetensors_only, saved_model_load_error
from .modeling_dawin import (
    CLIPImageClassifier,
    DaWinCLIPPreTrainedModel,
    _make_head,
    _run_on_own_device,
    batch_pixel_values,
    check_label_indices,
)
from .placement import (
    check_devices_available,
    check_max_memory_devices,
    check_module_device_map,
    prepare_endpoint,
    resolve_dtype,
)
from .templates import load_templates, validate_templates


logger = logging.get_logger(__name__)

__all__ = [
    "DaWinMultiTaskCLIPModel",
    "DaWinMultiTaskCLIPPreTrainedModel",
    "DaWinMultiTaskImageClassifierOutput",
    "coefficients_from_task_weights",
    "task_weights_from_entropies",
]


# ----------------------------------------------------------------------------------------------------------
# Coefficients
# ----------------------------------------------------------------------------------------------------------


def task_weights_from_entropies(entropies: torch.Tensor) -> torch.Tensor:
    """Compute pi(x) = softmax over the fine-tuned endpoints of the negative entropies, in float32.

    Args:
        entropies (`torch.Tensor` of shape `(batch_size, num_fine_tuned)`): Entropy H_t(x) of each fine-tuned
            endpoint's prediction, in nats.

    Returns:
        `torch.Tensor` of shape `(batch_size, num_fine_tuned)`: task weights that sum to 1 per sample.
    """
    return torch.softmax(-entropies.float(), dim=-1)


def coefficients_from_task_weights(task_weights: torch.Tensor, scale: float = DEFAULT_SCALE) -> torch.Tensor:
    """Turn task weights pi into task-vector coefficients s * T * pi.

    Args:
        task_weights (`torch.Tensor` of shape `(..., num_fine_tuned)`): Task weights pi, summing to 1.
        scale (`float`, *optional*, defaults to 0.3): Task-arithmetic scale s.

    Returns:
        `torch.Tensor` of the same shape: coefficient c_t of each task vector tau_t. Uniform pi gives s for
        every task vector, as in task arithmetic.
    """
    return check_scale(scale) * task_weights.shape[-1] * task_weights.float()


# ----------------------------------------------------------------------------------------------------------
# Outputs and building blocks
# ----------------------------------------------------------------------------------------------------------


@dataclass
class DaWinMultiTaskImageClassifierOutput(ImageClassifierOutput):
    r"""Output of [`DaWinMultiTaskCLIPModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): Cross-entropy of `logits` when labels are given.
        logits (`torch.FloatTensor` of shape `(batch_size, num_classes)`): Logits over the task's classes.
        coefficients (`torch.FloatTensor` of shape `(batch_size, num_fine_tuned)`, *optional*): Coefficient c_t of
            each task vector per sample, so that the weights are theta_0 + sum_t c_t tau_t. They are s * T * pi(x)
            in `"sample"` mode and static values in the other modes. `"ties"` mode gives `None` because a TIES
            merge is not a weighted sum of task vectors.
        task_weights (`torch.FloatTensor` of shape `(batch_size, num_fine_tuned)`, *optional*): pi(x) in
            `"sample"` mode.
        entropies (`torch.FloatTensor` of shape `(batch_size, num_fine_tuned)`, *optional*): Entropy of each
            fine-tuned endpoint's prediction with the task's heads, in nats (`"sample"` mode).
        fine_tuned_logits (`torch.FloatTensor` of shape `(batch_size, num_fine_tuned, num_classes)`, *optional*):
            Logits of each fine-tuned endpoint with the task's heads (`"sample"` mode).
    """

    coefficients: torch.FloatTensor | None = None
    task_weights: torch.FloatTensor | None = None
    entropies: torch.FloatTensor | None = None
    fine_tuned_logits: torch.FloatTensor | None = None


# State-dict prefixes of a CLIPModel's image encoder, the part that `_ImageEncoder` references.
IMAGE_ENCODER_PREFIXES = ("vision_model.", "visual_projection.")


class _ImageEncoder(nn.Module):
    """The image side of a CLIP endpoint without a head; references the endpoint's modules, copies nothing."""

    def __init__(self, clip_model: CLIPModel):
        super().__init__()
        self.vision_model = clip_model.vision_model
        self.visual_projection = clip_model.visual_projection


def _check_coefficient_vector(coefficients, num_fine_tuned: int) -> torch.Tensor:
    values = torch.as_tensor(coefficients, dtype=torch.float32).reshape(-1)
    if values.numel() != num_fine_tuned:
        raise ValueError(
            f"Expected one coefficient per fine-tuned endpoint ({num_fine_tuned}), received {values.numel()}: "
            f"{values.tolist()}."
        )
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"Coefficients must be finite, received {values.tolist()}.")
    return values


def _endpoint_name(endpoint, index: int) -> str:
    if isinstance(endpoint, (str, Path)):
        return Path(str(endpoint).rstrip("/")).name or f"fine_tuned_{index + 1}"
    source = getattr(getattr(endpoint, "config", None), "_name_or_path", "") or ""
    return Path(source.rstrip("/")).name if source else f"fine_tuned_{index + 1}"


def _resolve_templates(templates, tasks: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Return the template list of every task from None, one list or file for all, or a per-task mapping."""
    if templates is None or isinstance(templates, (str, Path)):
        shared = load_templates(templates)
        return {task: list(shared) for task in tasks}
    if isinstance(templates, Mapping):
        unknown = sorted(set(templates) - set(tasks))
        if unknown:
            raise ValueError(
                f"templates names tasks that are not in `tasks`: {unknown}. Known tasks: {list(tasks)}."
            )
        resolved = {}
        for task in tasks:
            value = templates.get(task)
            if value is None or isinstance(value, (str, Path)):
                resolved[task] = load_templates(value)
            else:
                resolved[task] = validate_templates(list(value), source=f"templates[{task!r}]")
        return resolved
    shared = validate_templates(list(templates))
    return {task: list(shared) for task in tasks}


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


class DaWinMultiTaskCLIPPreTrainedModel(DaWinCLIPPreTrainedModel):
    """Base class wiring multi-task DaWin models into the transformers loading and saving machinery.

    Saving, Hub uploads, the processor and head initialisation are those of [`DaWinCLIPPreTrainedModel`].
    """

    config: DaWinMultiTaskCLIPConfig
    config_class = DaWinMultiTaskCLIPConfig
    base_model_prefix = "dawin_multitask"
    _hub_push_function = ("hf_dawin.hub_multitask", "push_multitask_to_hub")

    def _warn_if_uncalibrated(self, action: str, advice: str) -> None:
        """Warn if mode='dataset_mean' lacks the default task's mean task weights, so its forward pass will raise."""
        task = self.config.default_task
        if self.config.mode == "dataset_mean" and (self.config.dataset_task_weights or {}).get(task) is None:
            logger.warning(
                f"{action} a model in mode='dataset_mean' without the mean task weights of its default task {task!r}; "
                f"its forward pass and pipelines will raise for that task until "
                f"model.fit_dataset_coefficients({task!r}, batches) is called. {advice}"
            )


class DaWinMultiTaskCLIPModel(DaWinMultiTaskCLIPPreTrainedModel):
    r"""Multi-task DaWin: per-image entropy-weighted merging of several fine-tuned CLIPs of one pre-trained CLIP.

    For an image x of a task, each fine-tuned endpoint t classifies x with its own head for that task; the
    task weights pi(x) = softmax_t(-H_t(x)) of their entropies give the weights
    theta_0 + s * T * sum_t pi_t(x) (theta_t - theta_0) (Oh et al., ICLR 2025, arXiv:2410.03782). The
    `"sample"` mode runs this exactly per image without per-image weight copies. Static baselines are
    available as modes: `"dataset_mean"`, `"task_arithmetic"`, `"weight_average"`, `"ties"` and `"pretrained"`.

    The model contains the pre-trained CLIP (`pretrained`), the fine-tuned CLIPs (`fine_tuned`, an `nn.ModuleList`)
    and, per task, one linear head per endpoint (`heads[task_index][0]` for the pre-trained endpoint,
    `heads[task_index][t]` for fine-tuned endpoint t).

    Args:
        config ([`DaWinMultiTaskCLIPConfig`]): Architecture, tasks and merging settings.

    Example:

    ```python
    >>> from hf_dawin.modeling_multitask import DaWinMultiTaskCLIPModel
    >>> model = DaWinMultiTaskCLIPModel.from_pretrained_endpoints(
    ...     "openai/clip-vit-base-patch32",
    ...     ["my-org/clip-b32-cars", "my-org/clip-b32-dtd"],
    ...     tasks={"cars": car_names, "dtd": texture_names},
    ... )
    >>> inputs = model.image_processor(images=image, return_tensors="pt")
    >>> outputs = model(**inputs, task="dtd")  # outputs.logits: (1, 47); outputs.coefficients: (1, 2)
    ```
    """

    def __init__(self, config: DaWinMultiTaskCLIPConfig):
        super().__init__(config)
        if not config.tasks:
            raise ValueError(
                "DaWinMultiTaskCLIPConfig.tasks is empty; build the model with "
                "DaWinMultiTaskCLIPModel.from_pretrained_endpoints(..., tasks={'task': [class names]}) or load a "
                "saved multi-task DaWin model."
            )
        if config.num_fine_tuned < 1:
            raise ValueError(
                f"Multi-task DaWin needs at least one fine-tuned endpoint, received num_fine_tuned="
                f"{config.num_fine_tuned}."
            )
        projection_dim = config.clip_config.projection_dim
        self.pretrained = CLIPModel._from_config(config.clip_config)
        self.fine_tuned = nn.ModuleList(CLIPModel._from_config(config.clip_config) for _ in range(config.num_fine_tuned))
        self.heads = nn.ModuleList(
            nn.ModuleList(nn.Linear(projection_dim, len(class_names)) for _ in range(1 + config.num_fine_tuned))
            for class_names in config.tasks.values()
        )
        self.image_processor = None
        self.processor = None
        # Derived modules (mixed and merged classifiers) are rebuilt when the endpoint weights change. They stay
        # out of the module tree so that they are never saved.
        self._derived: dict[str, tuple[tuple, object]] = {}
        self.post_init()

    # ------------------------------------------------------------------------------------------------------
    # Construction from CLIP checkpoints
    # ------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained_endpoints(
        cls,
        pretrained: str | Path | CLIPModel,
        fine_tuned: Sequence[str | Path | CLIPModel],
        *,
        tasks: Mapping[str, Sequence[str]],
        templates: Sequence[str] | str | Path | Mapping[str, Sequence[str] | str | Path] | None = None,
        processor: CLIPProcessor | None = None,
        scale: float = DEFAULT_SCALE,
        mode: str = "sample",
        default_task: str | None = None,
        fine_tuned_names: Sequence[str] | None = None,
        ties_density: float = DEFAULT_TIES_DENSITY,
        ties_scale: float = DEFAULT_TIES_SCALE,
        dtype: torch.dtype | str | None = None,
        device_map: str | dict | None = None,
        progress: bool = False,
        **from_pretrained_kwargs,
    ) -> DaWinMultiTaskCLIPModel:
        """Build a multi-task DaWin model from a pre-trained CLIP and its fine-tuned CLIPs.

        Every endpoint gets one zero-shot head per task, built with its own text tower from the task's class
        names and templates.

        Args:
            pretrained (`str`, `Path` or `CLIPModel`): Hub id, local directory or loaded model of the pre-trained
                (zero-shot) endpoint theta_0.
            fine_tuned (`Sequence`): The fine-tuned endpoints theta_1 ... theta_T, each a Hub id, a local
                directory or a loaded `CLIPModel` of the same architecture.
            tasks (`Mapping[str, Sequence[str]]`): Class names of each task, for example
                `{"mnist": ["zero", ...], "fashion_mnist": ["t-shirt", ...]}`.
            templates (*optional*): Prompt templates with one `{}`: one list or template file for all tasks, or a
                mapping from task name to a list or file. Tasks without an entry, and `None`, use the
                package's default template set.
            processor (`CLIPProcessor`, *optional*): Tokenizer and image processor; loaded from the pre-trained
                endpoint's directory or Hub id when omitted.
            scale (`float`, *optional*, defaults to 0.3): Task-arithmetic scale s.
            mode (`str`, *optional*, defaults to `"sample"`): Default forward mode.
            default_task (`str`, *optional*): Task used when `forward` gets no `task`; defaults to the first task.
            fine_tuned_names (`Sequence[str]`, *optional*): A distinct short name per fine-tuned endpoint;
                defaults to the folder names.
            ties_density (`float`, *optional*, defaults to 0.2): Fraction of task-vector entries TIES keeps.
            ties_scale (`float`, *optional*, defaults to 1.0): Scale of the TIES-merged task vector.
            dtype (`torch.dtype` or `str`, *optional*): Dtype of the endpoints (for example `torch.bfloat16`); a
                loaded `CLIPModel` is cast in place. Entropies and task weights stay float32. Without it,
                endpoints saved in different dtypes are loaded from their paths in a dtype that represents them
                all exactly.
            device_map (`str` or `dict`, *optional*): Passed to `CLIPModel.from_pretrained` for every endpoint; the
                endpoints share one `max_memory` budget. A loaded `CLIPModel` accepts a single device only.
            progress (`bool`, *optional*, defaults to `False`): Show progress while building zero-shot heads.
            **from_pretrained_kwargs: Further arguments of `CLIPModel.from_pretrained` (for example `revision`).

        Returns:
            [`DaWinMultiTaskCLIPModel`] in eval mode.

        Raises:
            ValueError: If no fine-tuned endpoint is given, a fine-tuned endpoint differs in architecture from
                the pre-trained one (missing, extra and mismatched keys are listed), a task or its class names are
                invalid, a setting is invalid, the dtype is not supported on an endpoint's device, or the device
                map offloads weights to disk (the sizes are listed).
            TypeError: If `fine_tuned` is a single endpoint instead of a sequence, or an endpoint is neither a
                path, a Hub id nor a `CLIPModel`.
        """
        if isinstance(fine_tuned, (str, Path, nn.Module)):
            raise TypeError(
                "fine_tuned must be a list of endpoints (Hub ids, directories or CLIPModels), received a single "
                f"{type(fine_tuned).__name__}. Wrap it in a list: fine_tuned=[...]."
            )
        fine_tuned = list(fine_tuned)
        if not fine_tuned:
            raise ValueError(
                "Multi-task DaWin needs at least one fine-tuned endpoint, received an empty list. Pass the "
                "fine-tuned CLIP checkpoints as fine_tuned=[...]."
            )
        if isinstance(tasks, Mapping) and not tasks:
            raise ValueError(
                "tasks is empty. Pass the class names of each task the fine-tuned endpoints were trained for, for "
                "example tasks={'mnist': ['zero', 'one', ...]}."
            )
        # Validate the cheap settings before loading any weights.
        config_check = DaWinMultiTaskCLIPConfig(
            tasks=tasks, mode=mode, scale=scale, default_task=default_task, num_fine_tuned=len(fine_tuned),
            ties_density=ties_density, ties_scale=ties_scale,
        )  # fmt: skip
        task_classes = config_check.tasks
        for task, class_names in task_classes.items():
            warn_if_single_class(class_names, f"task {task!r}")
        template_lists = _resolve_templates(templates, task_classes)
        if fine_tuned_names is None:
            names = [_endpoint_name(endpoint, index) for index, endpoint in enumerate(fine_tuned)]
            if len(set(names)) != len(names):
                names = [f"fine_tuned_{index + 1}" for index in range(len(fine_tuned))]
        else:
            names = [str(name) for name in fine_tuned_names]
            if len(names) != len(fine_tuned) or len(set(names)) != len(names):
                raise ValueError(
                    f"fine_tuned_names must contain one distinct name per fine-tuned endpoint ({len(fine_tuned)}), "
                    f"received {names}."
                )

        if dtype is not None:
            dtype = resolve_dtype(dtype)
        entries = [("pre-trained", pretrained, device_map)]
        for index, (endpoint, name) in enumerate(zip(fine_tuned, names)):
            entries.append((f"fine-tuned #{index + 1} ({name})", endpoint, device_map))
        (pretrained_model, pretrained_source), *fine_tuned_loaded = load_endpoints(
            entries, dtype=dtype, load_kwargs=from_pretrained_kwargs
        )
        pretrained_state = pretrained_model.state_dict()
        for (endpoint_name, _, _), (endpoint_model, _) in zip(entries[1:], fine_tuned_loaded):
            check_compatible_state_dicts(
                pretrained_state, endpoint_model.state_dict(), reference_name="pre-trained", other_name=endpoint_name
            )
            check_compatible_configs(
                pretrained_model.config, endpoint_model.config, reference_name="pre-trained", other_name=endpoint_name
            )
        fine_tuned_models = [endpoint_model for endpoint_model, _ in fine_tuned_loaded]
        fine_tuned_sources = [source for _, source in fine_tuned_loaded]

        if processor is None:
            processor = load_processor(pretrained, pretrained_model)
        if processor is None or getattr(processor, "tokenizer", None) is None:
            raise ValueError(
                "Building the zero-shot heads of every task needs a CLIP tokenizer, but no processor was given or "
                "found beside the pre-trained endpoint. Pass processor=CLIPProcessor.from_pretrained(...)."
            )

        # One head per task and endpoint, each from that endpoint's own text tower.
        # NOTE: trained linear heads (LP-FT style checkpoints) cannot be passed here yet, unlike the pair model.
        endpoints = [pretrained_model, *fine_tuned_models]
        heads = nn.ModuleList()
        for task, class_names in task_classes.items():
            task_heads = nn.ModuleList()
            for endpoint in endpoints:
                weight = build_zero_shot_head(
                    endpoint, processor.tokenizer, class_names, template_lists[task], progress=progress
                )
                task_heads.append(_make_head(weight, None, reference=endpoint.visual_projection.weight))
            heads.append(task_heads)

        config = DaWinMultiTaskCLIPConfig(
            clip_config=pretrained_model.config.to_dict(),
            tasks=task_classes,
            templates=template_lists,
            scale=scale,
            mode=mode,
            num_fine_tuned=len(fine_tuned_models),
            fine_tuned_names=names,
            pretrained_name_or_path=pretrained_source,
            fine_tuned_names_or_paths=fine_tuned_sources,
            default_task=config_check.default_task,
            ties_density=ties_density,
            ties_scale=ties_scale,
        )
        attn_implementation = pretrained_model.config._attn_implementation
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation

        # Allocate nothing for the endpoints: the loaded CLIP models are adopted as they are, so their weights
        # are neither copied nor re-initialised.
        with torch.device("meta"):
            model = cls(config)
        model.pretrained = pretrained_model
        model.fine_tuned = nn.ModuleList(fine_tuned_models)
        model.heads = heads
        model.attach_processor(processor)
        return model.eval()

    # ------------------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a saved multi-task DaWin model and, when present beside it, its processor.

        Weights load from safetensors files only unless `use_safetensors=None` or `False` is passed.
        """
        kwargs = safetensors_only(kwargs)
        writer = f"{cls.__name__}.save_pretrained"
        check_source_loadable(pretrained_model_name_or_path, writer, kwargs)
        cls._check_saved_model_type(pretrained_model_name_or_path, kwargs)
        check_devices_available(kwargs.get("device_map"), "multi-task DaWin model")
        check_max_memory_devices(kwargs.get("max_memory"), "multi-task DaWin model")
        check_module_device_map(
            kwargs.get("device_map"), "multi-task DaWin model", modules=("pretrained", "fine_tuned", "heads"),
            container="a DaWinMultiTaskCLIPModel",
        )  # fmt: skip
        # transformers rewrites max_memory in place; keep the caller's values for error messages.
        requested_memory = dict(kwargs.get("max_memory") or {})
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except OSError as error:
            description = "a multi-task DaWin model"
            raise saved_model_load_error(error, pretrained_model_name_or_path, kwargs, description, writer) from error
        # Settings passed as keyword arguments (mode=..., default_task=...) reach the config unchecked.
        model.config.check_settings()
        model.resolve_task(None)
        model._warn_if_uncalibrated("Loaded", "Fit them before the first image.")
        model.attach_processor(cls._load_saved_processor(pretrained_model_name_or_path, kwargs))
        prepare_endpoint(model, "multi-task DaWin model", max_memory=requested_memory)
        return model

    # ------------------------------------------------------------------------------------------------------
    # Endpoints
    # ------------------------------------------------------------------------------------------------------

    @property
    def num_fine_tuned(self) -> int:
        """Number T of fine-tuned endpoints."""
        return len(self.fine_tuned)

    def resolve_task(self, task: str | None) -> str:
        """Return `task`, or the config's default task when it is `None`; raise a ValueError for unknown tasks."""
        if task is None:
            task = self.config.default_task
        return check_task(task, self.config.tasks)

    def _task_index(self, task: str) -> int:
        return self.config.task_names.index(self.resolve_task(task))

    def endpoint_classifiers(self, task: str | None = None) -> list[CLIPImageClassifier]:
        """Return the image classifiers of all endpoints for `task`: pre-trained first, then each fine-tuned one.

        The classifiers share this model's weights.
        """
        task_heads = self.heads[self._task_index(task)]
        endpoints = [self.pretrained, *self.fine_tuned]
        return [
            CLIPImageClassifier(endpoint.vision_model, endpoint.visual_projection, head)
            for endpoint, head in zip(endpoints, task_heads)
        ]

    def pretrained_logits(self, pixel_values: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """Classify with the pre-trained endpoint and its head for `task`.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): Preprocessed images.
            task (`str`, *optional*): Task name; defaults to `config.default_task`.

        Returns:
            `torch.Tensor` of shape `(batch_size, num_classes)`, float32, on the device of `pixel_values`.
        """
        logits = _run_on_own_device(self.endpoint_classifiers(task)[0], pixel_values).float()
        check_finite_logits(logits, "pre-trained")
        return logits.to(pixel_values.device)

    def fine_tuned_logits(self, pixel_values: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """Classify with every fine-tuned endpoint and its own head for `task`.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): Preprocessed images.
            task (`str`, *optional*): Task name; defaults to `config.default_task`.

        Returns:
            `torch.Tensor` of shape `(batch_size, num_fine_tuned, num_classes)`, float32, on the device of
            `pixel_values`.

        Raises:
            ValueError: If an endpoint produces NaN or infinite logits (the message names the endpoint).
        """
        outputs = []
        for name, classifier in zip(self.config.fine_tuned_names, self.endpoint_classifiers(task)[1:]):
            logits = _run_on_own_device(classifier, pixel_values).float()
            check_finite_logits(logits, f"fine-tuned '{name}'")
            outputs.append(logits.to(pixel_values.device))
        return torch.stack(outputs, dim=1)

    @staticmethod
    def task_weights_from_logits(fine_tuned_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the task weights pi and the entropies from the fine-tuned endpoints' logits.

        Args:
            fine_tuned_logits (`torch.Tensor` of shape `(batch_size, num_fine_tuned, num_classes)`): Logits of
                each fine-tuned endpoint with the heads of the task being evaluated.

        Returns:
            `(task_weights, entropies)`, each float32 of shape `(batch_size, num_fine_tuned)`.
        """
        entropies = entropy(fine_tuned_logits)
        return task_weights_from_entropies(entropies), entropies

    # ------------------------------------------------------------------------------------------------------
    # Derived classifiers, cached while the weights stay unchanged
    # ------------------------------------------------------------------------------------------------------

    def _encoders(self) -> tuple[_ImageEncoder, list[_ImageEncoder]]:
        return _ImageEncoder(self.pretrained), [_ImageEncoder(endpoint) for endpoint in self.fine_tuned]

    def mixed_classifier(self, task: str | None = None) -> tuple[CLIPImageClassifier, MixingState]:
        """Return the per-sample interpolated classifier of `task` and its coefficient holder.

        The mixed vision tower is built once and shared by all tasks, and each task adds its mixed head. It stores
        the base weights and T weight differences, so its memory and its cost per image are about 1 + T times
        those of one endpoint. Call `state.set_coefficients(c)` with `c` of shape `(batch_size, num_fine_tuned)`
        before running it.
        """
        task_index = self._task_index(task)

        def build_encoder():
            base, endpoints = self._encoders()
            return build_mixed_module(base, endpoints)

        encoder, state = self._cached("mixed_encoder", (), build_encoder)

        def build_head():
            task_heads = self.heads[task_index]
            head, _ = build_mixed_module(task_heads[0], list(task_heads[1:]), state=state)
            return head

        head = self._cached(f"mixed_head:{task_index}", (id(state),), build_head)
        return CLIPImageClassifier(encoder.vision_model, encoder.visual_projection, head), state

    def interpolated_logits(
        self, pixel_values: torch.Tensor, task: str | None, coefficients: torch.Tensor
    ) -> torch.Tensor:
        """Classify each image with its own merged weights theta_0 + sum_t c[b, t] tau_t (exact `"sample"` mode).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): Preprocessed images.
            task (`str` or `None`): Task name; `None` selects `config.default_task`.
            coefficients (`torch.Tensor` of shape `(batch_size, num_fine_tuned)`): Task-vector coefficients.

        Returns:
            `torch.Tensor` of shape `(batch_size, num_classes)`, float32: the logits sample b would get from a
            CLIP and head merged with the coefficients `coefficients[b]`.
        """
        classifier, state = self.mixed_classifier(task)
        device = classifier.head.weight.device
        state.set_coefficients(torch.as_tensor(coefficients).to(device=device, dtype=torch.float32))
        try:
            logits = classifier(pixel_values.to(device))
        finally:
            state.weights = None
        return logits.float().to(pixel_values.device)

    def merged_classifier(self, task: str | None, coefficients: Sequence[float] | torch.Tensor) -> CLIPImageClassifier:
        """Return the classifier of `task` with static weights theta_0 + sum_t c_t tau_t (cached).

        The merged vision tower is cached per coefficient vector and shared by all tasks.

        Args:
            task (`str` or `None`): Task name; `None` selects `config.default_task`.
            coefficients (`Sequence[float]` or `torch.Tensor` of shape `(num_fine_tuned,)`): Coefficients c_t.
        """
        task_index = self._task_index(task)
        values = tuple(_check_coefficient_vector(coefficients, self.num_fine_tuned).tolist())

        def build_encoder():
            base, endpoints = self._encoders()
            merged = copy.deepcopy(base)
            merged.load_state_dict(
                merge_task_vectors(base.state_dict(), [endpoint.state_dict() for endpoint in endpoints], values)
            )
            return merged.eval()

        def build_head():
            task_heads = self.heads[task_index]
            merged = copy.deepcopy(task_heads[0])
            merged.load_state_dict(
                merge_task_vectors(task_heads[0].state_dict(), [head.state_dict() for head in task_heads[1:]], values)
            )
            return merged.eval()

        encoder = self._cached(f"merged_encoder:{values!r}", values, build_encoder)
        head = self._cached(f"merged_head:{task_index}:{values!r}", values, build_head)
        return CLIPImageClassifier(encoder.vision_model, encoder.visual_projection, head)

    def ties_classifier(self, task: str | None = None) -> CLIPImageClassifier:
        """Return the classifier of `task` with TIES-merged weights (`config.ties_density`, `config.ties_scale`)."""
        task_index = self._task_index(task)
        settings = (self.config.ties_density, self.config.ties_scale)

        def ties_merged(base: nn.Module, endpoints: Sequence[nn.Module]) -> nn.Module:
            merged = copy.deepcopy(base)
            merged.load_state_dict(
                ties_merge_state_dicts(
                    base.state_dict(),
                    [endpoint.state_dict() for endpoint in endpoints],
                    density=self.config.ties_density,
                    scale=self.config.ties_scale,
                )
            )
            return merged.eval()

        def build_encoder():
            base, endpoints = self._encoders()
            return ties_merged(base, endpoints)

        def build_head():
            task_heads = self.heads[task_index]
            return ties_merged(task_heads[0], list(task_heads[1:]))

        encoder = self._cached(f"ties_encoder:{settings!r}", settings, build_encoder)
        head = self._cached(f"ties_head:{task_index}:{settings!r}", settings, build_head)
        return CLIPImageClassifier(encoder.vision_model, encoder.visual_projection, head)

    def static_logits(
        self, pixel_values: torch.Tensor, task: str | None, coefficients: Sequence[float] | torch.Tensor
    ) -> torch.Tensor:
        """Classify with static weights theta_0 + sum_t c_t tau_t; returns float32 `(batch_size, num_classes)`."""
        values = _check_coefficient_vector(coefficients, self.num_fine_tuned)
        if not bool(values.any()):
            return _run_on_own_device(self.endpoint_classifiers(task)[0], pixel_values).float().to(pixel_values.device)
        classifier = self.merged_classifier(task, values)
        return _run_on_own_device(classifier, pixel_values).float().to(pixel_values.device)

    def ties_logits(self, pixel_values: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """Classify with TIES-merged weights; returns float32 `(batch_size, num_classes)`."""
        return _run_on_own_device(self.ties_classifier(task), pixel_values).float().to(pixel_values.device)

    # ------------------------------------------------------------------------------------------------------
    # Static coefficients
    # ------------------------------------------------------------------------------------------------------

    def static_coefficients(self, mode: str, task: str | None = None) -> torch.Tensor:
        """Return the task-vector coefficients of a static mode, shape `(num_fine_tuned,)`.

        `"pretrained"` gives zeros, `"task_arithmetic"` gives s for every task vector, `"weight_average"` gives
        1 / T (the mean of the fine-tuned endpoints) and `"dataset_mean"` gives s * T * mean(pi) fitted for
        `task` with [`~DaWinMultiTaskCLIPModel.fit_dataset_coefficients`].

        Raises:
            ValueError: If `mode` has no static coefficients, or `"dataset_mean"` has not been fitted for `task`.
        """
        num_fine_tuned = self.num_fine_tuned
        if mode == "pretrained":
            return torch.zeros(num_fine_tuned)
        if mode == "task_arithmetic":
            return torch.full((num_fine_tuned,), check_scale(self.config.scale))
        if mode == "weight_average":
            return torch.full((num_fine_tuned,), 1.0 / num_fine_tuned)
        if mode == "dataset_mean":
            task = self.resolve_task(task)
            stored = (self.config.dataset_task_weights or {}).get(task)
            if stored is None:
                raise ValueError(
                    f"mode='dataset_mean' needs the mean task weights of task {task!r}. Call "
                    f"model.fit_dataset_coefficients({task!r}, batches) on that task's evaluation or calibration "
                    "images first."
                )
            return coefficients_from_task_weights(_check_coefficient_vector(stored, num_fine_tuned), self.config.scale)
        raise ValueError(
            f"Mode {mode!r} has no static coefficients; use 'pretrained', 'task_arithmetic', 'weight_average' or "
            "'dataset_mean'."
        )

    @torch.inference_mode()
    def fit_dataset_coefficients(self, task: str | None, batches: Iterable[torch.Tensor | dict]) -> torch.Tensor:
        """Store the mean task weights pi of `task` over a set of images, for `"dataset_mean"` mode.

        Args:
            task (`str` or `None`): Task name; `None` selects `config.default_task`.
            batches (`Iterable`): Batches of `pixel_values` `(batch_size, 3, height, width)` or dicts with a
                `pixel_values` key (the output of the image processor).

        Returns:
            `torch.Tensor` of shape `(num_fine_tuned,)`: the coefficients s * T * mean(pi) that `"dataset_mean"`
            mode now uses. The mean pi is stored in `config.dataset_task_weights[task]` and saved with the model.

        Raises:
            ValueError: If `batches` yields no image.
        """
        task = self.resolve_task(task)
        total = torch.zeros(self.num_fine_tuned, dtype=torch.float64)
        count = 0
        for batch in batches:
            pixel_values = batch_pixel_values(batch, "fit_dataset_coefficients")
            task_weights, _ = self.task_weights_from_logits(self.fine_tuned_logits(pixel_values, task))
            total += task_weights.double().sum(dim=0).cpu()
            count += task_weights.shape[0]
        if count == 0:
            raise ValueError(f"The images given for task {task!r} are empty; pass at least one batch of images.")
        mean = (total / count).float()
        stored = dict(self.config.dataset_task_weights or {})
        stored[task] = mean.tolist()
        self.config.dataset_task_weights = stored
        return coefficients_from_task_weights(mean, self.config.scale)

    # ------------------------------------------------------------------------------------------------------
    # Plain CLIP exports
    # ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, coefficients: Sequence[float] | torch.Tensor) -> CLIPModel:
        """Return a plain `CLIPModel` with weights theta_0 + sum_t c_t tau_t, text tower included.

        For example `model.merge([model.config.scale] * model.num_fine_tuned)` is task arithmetic and
        `model.merge(model.static_coefficients("dataset_mean", task))` the dataset-mean DaWin merge of a task.
        The result has no dependency on hf_dawin.

        Args:
            coefficients (`Sequence[float]` or `torch.Tensor` of shape `(num_fine_tuned,)`): Coefficients c_t.

        Returns:
            `CLIPModel` on the pre-trained endpoint's device, in eval mode.
        """
        values = _check_coefficient_vector(coefficients, self.num_fine_tuned).tolist()
        merged_state = merge_task_vectors(
            self.pretrained.state_dict(), [endpoint.state_dict() for endpoint in self.fine_tuned], values
        )
        merged = copy.deepcopy(self.pretrained)
        merged.load_state_dict(merged_state)
        return merged.eval()

    @torch.no_grad()
    def merge_ties(self, density: float | None = None, scale: float | None = None) -> CLIPModel:
        """Return a plain `CLIPModel` TIES-merged from all fine-tuned endpoints, text tower included.

        The image encoder (vision tower and projection) and the text side are trimmed separately, so the image
        encoder equals the one `"ties"` mode uses.

        Args:
            density (`float`, *optional*): Fraction of task-vector entries kept; defaults to `config.ties_density`.
            scale (`float`, *optional*): Scale of the merged task vector; defaults to `config.ties_scale`.
        """
        pretrained_state = self.pretrained.state_dict()
        endpoint_states = [endpoint.state_dict() for endpoint in self.fine_tuned]
        image_keys = [key for key in pretrained_state if key.startswith(IMAGE_ENCODER_PREFIXES)]
        text_keys = [key for key in pretrained_state if not key.startswith(IMAGE_ENCODER_PREFIXES)]
        merged_state = {}
        for keys in (image_keys, text_keys):
            merged_state.update(
                ties_merge_state_dicts(
                    {key: pretrained_state[key] for key in keys},
                    [{key: state[key] for key in keys} for state in endpoint_states],
                    density=self.config.ties_density if density is None else density,
                    scale=self.config.ties_scale if scale is None else scale,
                )
            )
        merged = copy.deepcopy(self.pretrained)
        merged.load_state_dict(merged_state)
        return merged.eval()

    # ------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        task: str | None = None,
        labels: torch.LongTensor | None = None,
        mode: str | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DaWinMultiTaskImageClassifierOutput | tuple:
        r"""Classify images of one task with the configured (or requested) mode.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): Preprocessed images.
            task (`str`, *optional*): Task whose classes and heads are used; defaults to `config.default_task`.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): Class indices for the loss.
            mode (`str`, *optional*): `"sample"`, `"dataset_mean"`, `"task_arithmetic"`, `"weight_average"`,
                `"ties"` or `"pretrained"`; defaults to `config.mode`.

        Returns:
            [`DaWinMultiTaskImageClassifierOutput`].

        Raises:
            ValueError: If the task or mode is unknown, `pixel_values` is missing or malformed, or
                `"dataset_mean"` mode has not been fitted for the task.
        """
        self._check_forward_kwargs(kwargs, "pixel_values, task, labels, mode and return_dict")
        mode = check_multitask_mode(mode if mode is not None else self.config.mode)
        task = self.resolve_task(task)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values is None:
            raise ValueError("DaWinMultiTaskCLIPModel needs pixel_values of shape (batch_size, 3, height, width).")
        vision_config = self.config.clip_config.vision_config
        expected = (vision_config.num_channels, vision_config.image_size, vision_config.image_size)
        if pixel_values.ndim != 4 or pixel_values.shape[0] == 0 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"Expected pixel_values of shape (batch_size, {', '.join(map(str, expected))}) with batch_size >= 1, "
                f"received {tuple(pixel_values.shape)}. Preprocess images with the model's image processor."
            )
        batch_size = pixel_values.shape[0]

        task_weights = entropies = fine_tuned_logits = None
        if mode == "sample":
            # Score every fine-tuned endpoint with the task's heads; pi is the softmax of negative entropies.
            fine_tuned_logits = self.fine_tuned_logits(pixel_values, task)
            task_weights, entropies = self.task_weights_from_logits(fine_tuned_logits)
            coefficients = coefficients_from_task_weights(task_weights, self.config.scale)

            # Interpolate per sample and classify.
            logits = self.interpolated_logits(pixel_values, task, coefficients)
        elif mode == "ties":
            coefficients = None
            logits = self.ties_logits(pixel_values, task)
        else:
            static = self.static_coefficients(mode, task)
            logits = self.static_logits(pixel_values, task, static)
            coefficients = static.to(pixel_values.device).expand(batch_size, -1).clone()
        if mode != "sample":
            check_finite_logits(
                logits, f"merged ({mode})", checkpoints="the pre-trained and fine-tuned checkpoints",
                consequence="predictions would be undefined",
            )  # fmt: skip

        loss = None
        if labels is not None:
            checked = check_label_indices(labels, logits.shape, f"config.tasks[{self.resolve_task(task)!r}]")
            loss = F.cross_entropy(logits, checked.to(logits.device))

        output = DaWinMultiTaskImageClassifierOutput(
            loss=loss,
            logits=logits,
            coefficients=coefficients,
            task_weights=task_weights,
            entropies=entropies,
            fine_tuned_logits=fine_tuned_logits,
        )
        return output if return_dict else output.to_tuple()


# Saving copies this module and its relative imports beside the weights and writes `auto_map` into the config.
DaWinMultiTaskCLIPConfig.register_for_auto_class()
DaWinMultiTaskCLIPModel.register_for_auto_class("AutoModelForImageClassification")
