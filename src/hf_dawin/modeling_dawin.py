"""DaWin model: two CLIP endpoints interpolated per image with entropy-based coefficients.

DaWin (Oh et al., "DaWin: Training-free Dynamic Weight Interpolation for Robust Adaptation", ICLR 2025,
arXiv:2410.03782) interpolates a zero-shot and a fine-tuned CLIP per test image, weighting the fine-tuned
endpoint by lambda(x) = sigmoid(H_0(x) - H_1(x)), where H_m is the entropy of endpoint m's prediction.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, CLIPProcessor, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import logging

from .coefficients import (
    EntropyStatistics,
    check_finite_logits,
    check_temperatures,
    coefficients_from_entropies,
    entropy,
    entropy_statistics,
    output_ensemble_probabilities,
)
from .configuration_dawin import DaWinCLIPConfig, check_alpha, check_mode
from .heads import build_zero_shot_head, check_class_names, linear_head_from, warn_if_single_class
from .interpolation import (
    build_merged_module,
    build_mixed_module,
    check_compatible_configs,
    check_compatible_state_dicts,
    merge_task_vectors,
)
from .loading import (
    check_source_loadable,
    load_endpoints,
    load_processor,
    safetensors_only,
    saved_config_dict,
    saved_model_load_error,
    try_load_processor,
)
from .mixture import BetaMixture, check_fit_dependencies
from .placement import (
    check_devices_available,
    check_dtype_supported,
    check_max_memory_devices,
    check_module_device_map,
    prepare_endpoint,
    resolve_dtype,
    split_device_map,
)
from .saving import pop_push_arguments, save_atomically
from .templates import load_templates

from .temperature import reference_temperatures


logger = logging.get_logger(__name__)

__all__ = ["CLIPImageClassifier", "DaWinCLIPModel", "DaWinCLIPPreTrainedModel", "DaWinImageClassifierOutput"]


# Arguments that transformers may pass to any model's forward: Trainer's num_items_in_batch and the output flags.
# DaWin models return no attentions or hidden states, so these have no effect.
_GENERIC_FORWARD_KWARGS = frozenset({"num_items_in_batch", "output_attentions", "output_hidden_states"})


@dataclass
class DaWinImageClassifierOutput(ImageClassifierOutput):
    r"""Output of [`DaWinCLIPModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): Cross-entropy of `logits` when labels are given.
        logits (`torch.FloatTensor` of shape `(batch_size, num_classes)`): Logits of the selected mode. For
            `"output_ensemble"` these are log-probabilities of the mixed predictions.
        coefficients (`torch.FloatTensor` of shape `(batch_size,)`): Weight on the fine-tuned endpoint used for
            each sample (the component mean in `"mixture"` mode, `alpha` in `"static"` mode, 0 or 1 for the
            endpoints themselves).
        zero_shot_logits (`torch.FloatTensor` of shape `(batch_size, num_classes)`, *optional*): Zero-shot logits.
        fine_tuned_logits (`torch.FloatTensor` of shape `(batch_size, num_classes)`, *optional*): Fine-tuned logits.
        zero_shot_entropy (`torch.FloatTensor` of shape `(batch_size,)`, *optional*): Zero-shot entropies (nats).
        fine_tuned_entropy (`torch.FloatTensor` of shape `(batch_size,)`, *optional*): Fine-tuned entropies (nats).
        mixture_components (`torch.LongTensor` of shape `(batch_size,)`, *optional*): Mixture component of each
            sample in `"mixture"` mode.
    """

    coefficients: torch.FloatTensor | None = None
    zero_shot_logits: torch.FloatTensor | None = None
    fine_tuned_logits: torch.FloatTensor | None = None
    zero_shot_entropy: torch.FloatTensor | None = None
    fine_tuned_entropy: torch.FloatTensor | None = None
    mixture_components: torch.LongTensor | None = None


class CLIPImageClassifier(nn.Module):
    """The image classifier of one endpoint: vision tower, projection, L2 normalisation and linear head.

    Instances built by [`DaWinCLIPModel`] reference the endpoint's modules without copying them.
    """

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module, head: nn.Module):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.head = head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Classify `pixel_values` `(batch_size, 3, height, width)` into logits `(batch_size, num_classes)`."""
        dtype = check_dtype_supported(self.head.weight.dtype, self.head.weight.device)
        pooled = self.vision_model(pixel_values=pixel_values.to(dtype)).pooler_output
        features = F.normalize(self.visual_projection(pooled), dim=-1)
        return self.head(features)


class DaWinCLIPPreTrainedModel(PreTrainedModel):
    """Base class wiring DaWin models into the transformers loading and saving machinery.

    Subclasses hold CLIP endpoints, linear heads and a `processor` (set with `attach_processor`).
    """

    config: DaWinCLIPConfig
    config_class = DaWinCLIPConfig
    base_model_prefix = "dawin"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings"]
    _supports_sdpa = True
    _supports_attention_backend = True
    # (module, function) that `push_to_hub` uploads with.
    _hub_push_function = ("hf_dawin.hub", "push_dawin_to_hub")

    def _init_weights(self, module):
        # The CLIP endpoints are PreTrainedModels and initialise themselves; only the heads are ours. Heads
        # start at zero so that a freshly built model never produces confident random predictions.
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def attach_processor(self, processor: CLIPProcessor | None) -> None:
        """Attach a `CLIPProcessor` (or image processor) saved and loaded with the model for pipelines."""
        self.processor = processor
        self.image_processor = getattr(processor, "image_processor", processor)

    @classmethod
    def _check_saved_model_type(cls, pretrained_model_name_or_path, kwargs: dict) -> None:
        """Raise a ValueError naming the right class if the saved config is of another model type.

        transformers only logs a warning for a mismatch and then fails later with an unrelated message.
        """
        if isinstance(kwargs.get("config"), PreTrainedConfig):
            return
        config_dict = saved_config_dict(pretrained_model_name_or_path, kwargs)
        found, expected = config_dict.get("model_type"), cls.config_class.model_type
        if found == expected:
            return
        classes = {"dawin_clip": "DaWinCLIPModel", "dawin_multitask_clip": "DaWinMultiTaskCLIPModel"}
        hint = (
            f"Load it with {classes[found]}.from_pretrained, or with AutoModelForImageClassification after "
            "`import hf_dawin`."
            if found in classes
            else f"Pass a folder written by {cls.__name__}.save_pretrained."
        )
        raise ValueError(
            f"{str(pretrained_model_name_or_path)!r} contains a model of type {found!r}, but {cls.__name__} loads "
            f"model type {expected!r}. {hint}"
        )

    @classmethod
    def _load_saved_processor(cls, pretrained_model_name_or_path, kwargs: dict) -> CLIPProcessor | None:
        """Load the processor saved beside a model that `from_pretrained` loaded with `kwargs`, if there is one."""
        processor_kwargs = dict(kwargs)
        if cls.__module__.startswith("transformers_modules."):
            # This class was loaded as remote code, which the caller trusted. The tokenizer reads the folder's
            # config.json, whose `auto_map` would make transformers ask for that trust again.
            processor_kwargs["trust_remote_code"] = True
        return try_load_processor(pretrained_model_name_or_path, processor_kwargs)

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs):
        """Save the config, every endpoint and head (safetensors), and the processor if any.

        Raises a ValueError naming an invalid setting of the config (see `config.check_settings`) before anything is
        written. The files are written into a staging folder and then moved into `save_directory`, so an interrupted
        save leaves the files of an earlier save intact (see `hf_dawin.saving`).

        The module files of the model are copied beside the weights and `config.json` gets an `auto_map`, so
        `AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True)` and `AutoModel` load the
        folder where hf_dawin is not installed.
        """
        # Settings assigned to the config after construction are not checked, and from_pretrained would reject a
        # folder saved with an invalid one, so they are checked before anything is written.
        self.config.check_settings()
        self._check_config_matches_weights()
        # `register_for_auto_class` (end of each model's module) adds the AutoConfig and
        # AutoModelForImageClassification entries when the files are copied. The AutoModel entry is added here.
        module_name = type(self).__module__.rsplit(".", 1)[-1]
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoModel"] = f"{module_name}.{type(self).__name__}"
        self.config.auto_map = auto_map
        if not kwargs.get("is_main_process", True):
            return super().save_pretrained(save_directory, *args, **kwargs)
        self._warn_if_uncalibrated("Saving", "Calibrate it before saving.")
        push = pop_push_arguments(save_directory, kwargs)
        save_atomically(save_directory, lambda folder: self._write_files(folder, *args, **kwargs))
        if push is not None:
            self.push_to_hub(push.pop("repo_id"), **push)

    def _check_config_matches_weights(self) -> None:
        """Raise a ValueError if `from_pretrained` could not load these weights with this config.

        A model is built from a copy of the config on the meta device, which allocates no memory, and the names and
        shapes of its weights are compared with this model's. This catches config edits that disagree with the
        weights, such as class names of another length than the heads.
        """
        config = type(self.config).from_dict(self.config.to_dict())
        with torch.device("meta"):
            expected = {name: tuple(value.shape) for name, value in type(self)(config).state_dict().items()}
        actual = {name: tuple(value.shape) for name, value in self.state_dict().items()}
        differing = sorted(name for name in expected.keys() | actual.keys() if expected.get(name) != actual.get(name))
        if differing:
            details = [f"{name}: config gives {expected.get(name)}, model has {actual.get(name)}" for name in differing[:5]]
            raise ValueError(
                f"The config no longer matches the model's weights, so the saved folder could not be loaded: "
                f"{'; '.join(details)}{' ...' if len(differing) > 5 else ''}. Set the config back to the values the "
                "model was built with (for example as many class names as the heads have rows)."
            )

    def _warn_if_uncalibrated(self, action: str, advice: str) -> None:
        """Warn if the configured settings need a calibration that the model lacks, so its forward pass will raise."""
        if getattr(self.config, "mode", None) == "mixture" and not getattr(self.config, "mixture", None):
            logger.warning(
                f"{action} a model in mode='mixture' without a fitted Beta mixture; its forward pass and pipelines "
                f"will raise until model.calibrate(...) or model.fit_mixture(...) is called. {advice}"
            )
        if getattr(self.config, "offset_adjustment", False) and not getattr(self.config, "entropy_statistics", None):
            logger.warning(
                f"{action} a model with offset_adjustment=True but no entropy statistics; its forward pass and "
                f"pipelines will raise until model.calibrate(...) is called on a calibration set. {advice}"
            )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        results: dict | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        **kwargs,
    ):
        """Upload the model, its processor and a DaWin model card to the Hub in one commit.

        See [`hf_dawin.hub.push_dawin_to_hub`] (pairs) or [`hf_dawin.hub_multitask.push_multitask_to_hub`]
        (multi-task models) for the arguments. `results`, the output of the model's evaluation function, adds
        evaluation results to the card.

        Returns:
            `huggingface_hub.CommitInfo` of the commit.
        """
        # Checked before any request, so that an invalid setting does not leave an empty repository behind.
        self.config.check_settings()
        self._check_config_matches_weights()
        # Imported by name at run time: transformers copies every relatively imported module into remote-code
        # folders and requires every imported package to be installed, so the Hub code stays out of them. A
        # remote-code copy without hf_dawin falls back to the generic upload.
        module_name, function_name = self._hub_push_function
        try:
            push = getattr(importlib.import_module(module_name), function_name)
        except ImportError:
            logger.warning("hf_dawin is not installed, so the model is pushed with a generic model card.")
            return super().push_to_hub(
                repo_id,
                commit_message=commit_message,
                commit_description=commit_description,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
                **kwargs,
            )
        return push(
            self,
            repo_id,
            results=results,
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            **kwargs,
        )

    def _write_files(self, folder: Path, *args, **kwargs) -> None:
        super().save_pretrained(folder, *args, **kwargs)
        if self.processor is not None and self.processor is not self.image_processor:
            self.processor.save_pretrained(folder)
        if self.image_processor is not None:
            # transformers 5 nests the image processor inside processor_config.json; a separate
            # preprocessor_config.json keeps AutoImageProcessor and pipelines working on the folder too.
            self.image_processor.save_pretrained(folder)

    # ------------------------------------------------------------------------------------------------------
    # Derived classifiers (mixed, merged), cached in `self._derived` while the weights stay unchanged
    # ------------------------------------------------------------------------------------------------------

    def _weights_key(self) -> tuple:
        # NOTE: tensors created under torch.inference_mode have no version counter, so an in-place change of
        # such a weight is not detected; call clear_merged_cache() after editing weights in place.
        return tuple((t.data_ptr(), 0 if t.is_inference() else t._version, t.device, t.dtype) for t in self.parameters())

    def _cached(self, name: str, extra_key: tuple, build):
        key = (self._weights_key(), extra_key)
        cached = self._derived.get(name)
        if cached is None or cached[0] != key:
            # Built outside inference mode, so that a classifier first built under torch.inference_mode() still
            # serves later calls with autograd enabled (inference tensors cannot be used there).
            with torch.inference_mode(False), torch.no_grad():
                self._derived[name] = (key, build())
        return self._derived[name][1]

    def clear_merged_cache(self) -> None:
        """Drop the cached mixed and merged classifiers to free memory."""
        self._derived.clear()

    def _check_forward_kwargs(self, kwargs: dict, accepted: str) -> None:
        """Raise a TypeError for a misspelt forward argument, which `**kwargs` would otherwise swallow.

        `**kwargs` stays in the signature for the arguments that transformers' Trainer and pipelines pass to
        every model; those are accepted and have no effect here.
        """
        unknown = sorted(set(kwargs) - _GENERIC_FORWARD_KWARGS)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.forward() got unexpected keyword arguments {unknown}. It accepts {accepted}."
            )


class DaWinCLIPModel(DaWinCLIPPreTrainedModel):
    r"""DaWin: training-free dynamic weight interpolation of a zero-shot and a fine-tuned CLIP.

    For each image x the model computes both endpoints' predictions, the coefficient
    lambda(x) = exp(-H_1) / (exp(-H_0) + exp(-H_1)) on the fine-tuned endpoint from their entropies H_m, and
    classifies x with the weights (1 - lambda(x)) theta_0 + lambda(x) theta_1 (Oh et al., ICLR 2025,
    arXiv:2410.03782). The `"sample"` mode is exact without per-sample weight copies; the `"mixture"` mode
    reuses K merged models chosen by a Beta mixture over the coefficients.

    Args:
        config ([`DaWinCLIPConfig`]): Architecture and interpolation settings.

    Example:

    ```python
    >>> from hf_dawin import DaWinCLIPModel
    >>> model = DaWinCLIPModel.from_pretrained_pair(
    ...     "openai/clip-vit-base-patch32", "my-org/clip-vit-base-patch32-finetuned", class_names=["cat", "dog"]
    ... )
    >>> inputs = model.image_processor(images=image, return_tensors="pt")
    >>> outputs = model(**inputs)  # outputs.logits: (1, 2); outputs.coefficients: (1,)
    ```
    """

    def __init__(self, config: DaWinCLIPConfig):
        super().__init__(config)
        if not config.class_names:
            raise ValueError(
                "DaWinCLIPConfig.class_names is empty; build the model with DaWinCLIPModel.from_pretrained_pair(..., "
                "class_names=[...]) or load a saved DaWin model."
            )
        projection_dim = config.clip_config.projection_dim
        num_classes = len(config.class_names)
        self.zero_shot = CLIPModel._from_config(config.clip_config)
        self.fine_tuned = CLIPModel._from_config(config.clip_config)
        self.zero_shot_head = nn.Linear(projection_dim, num_classes)
        self.fine_tuned_head = nn.Linear(projection_dim, num_classes)
        self.image_processor = None
        self.processor = None
        # Derived modules (the per-sample mixed classifier, merged components) are rebuilt when the endpoint
        # weights change; they are kept out of the module tree so that they are never saved.
        self._derived: dict[str, tuple[tuple, object]] = {}
        self.post_init()

    # ------------------------------------------------------------------------------------------------------
    # Construction from two CLIP checkpoints
    # ------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained_pair(
        cls,
        zero_shot: str | Path | CLIPModel,
        fine_tuned: str | Path | CLIPModel,
        *,
        class_names: Sequence[str],
        templates: Sequence[str] | str | Path | None = None,
        processor: CLIPProcessor | None = None,
        fine_tuned_head: nn.Linear | torch.Tensor | dict | str | Path | None = None,
        zero_shot_head: nn.Linear | torch.Tensor | dict | str | Path | None = None,
        mode: str = "sample",
        alpha: float = 0.5,
        temperatures: Sequence[float] | None = None,
        offset_adjustment: bool = False,
        n_components: int = 3,
        dtype: torch.dtype | str | None = None,
        device_map: str | dict | None = None,
        progress: bool = False,
        **from_pretrained_kwargs,
    ) -> DaWinCLIPModel:
        """Build a DaWin model from a zero-shot and a fine-tuned CLIP checkpoint.

        Args:
            zero_shot (`str`, `Path` or `CLIPModel`): Hub id, local directory or loaded model of the zero-shot
                (pre-trained) endpoint.
            fine_tuned (`str`, `Path` or `CLIPModel`): The fine-tuned endpoint, of the same architecture.
            class_names (`Sequence[str]`): One name per class; zero-shot heads embed them in the templates.
            templates (`Sequence[str]`, `str` or `Path`, *optional*): Prompt templates with one `{}`, or a file of
                them; defaults to the package's short template set.
            processor (`CLIPProcessor`, *optional*): Tokenizer and image processor; loaded from the zero-shot
                endpoint's directory or Hub id when omitted.
            fine_tuned_head (*optional*): A trained linear head for the fine-tuned endpoint (`nn.Linear`, weight
                tensor, `{"weight", "bias"}` mapping or `.safetensors` path). Without it, the head is built from
                the fine-tuned endpoint's own text tower.
            zero_shot_head (*optional*): A linear head for the zero-shot endpoint, in the same forms.
            mode (`str`, *optional*, defaults to `"sample"`): Default forward mode.
            alpha (`float`, *optional*, defaults to 0.5): Static weight for `"static"` mode.
            temperatures (`Sequence[float]`, *optional*): `(zero_shot, fine_tuned)` temperatures; defaults to the
                reference values for known OpenAI CLIP backbones and `(1.0, 1.0)` otherwise.
            offset_adjustment (`bool`, *optional*, defaults to `False`): Apply the offset adjustment.
            n_components (`int`, *optional*, defaults to 3): Components of the Beta mixture.
            dtype (`torch.dtype` or `str`, *optional*): Dtype of the endpoints (for example `torch.bfloat16`); a
                loaded `CLIPModel` is cast in place. Entropies, coefficients and the mixture stay float32. Without
                it, each checkpoint loads in the dtype it was saved in. When the endpoints were saved in different
                dtypes, those loaded from a path take a dtype that represents them all exactly (float32 for a float16
                fine-tune of a float32 checkpoint).
            device_map (`str` or `dict`, *optional*): Passed to `CLIPModel.from_pretrained` for both endpoints, or
                `{"zero_shot": map, "fine_tuned": map}` for one map each. A loaded `CLIPModel` accepts a single
                device only.
            progress (`bool`, *optional*, defaults to `False`): Show progress while building zero-shot heads.
            **from_pretrained_kwargs: Further arguments of `CLIPModel.from_pretrained` (for example `revision`).

        Returns:
            [`DaWinCLIPModel`] in eval mode.

        Raises:
            ValueError: If the endpoints differ in architecture (missing, extra and mismatched keys are listed),
                class names are empty or duplicated, a setting is invalid, the dtype is not supported on an
                endpoint's device, or the device map offloads weights to disk (the sizes are listed).
            TypeError: If an endpoint is neither a path, a Hub id nor a `CLIPModel`.
        """
        names = check_class_names(class_names)
        warn_if_single_class(names, "class_names")
        check_mode(mode)
        check_alpha(alpha)
        template_list = load_templates(templates) if templates is None or isinstance(templates, (str, Path)) else list(templates)

        if dtype is not None:
            dtype = resolve_dtype(dtype)
        endpoint_maps = split_device_map(device_map)
        entries = [
            ("zero-shot", zero_shot, endpoint_maps["zero_shot"]),
            ("fine-tuned", fine_tuned, endpoint_maps["fine_tuned"]),
        ]
        (zero_shot_model, zero_shot_source), (fine_tuned_model, fine_tuned_source) = load_endpoints(
            entries, dtype=dtype, load_kwargs=from_pretrained_kwargs
        )
        check_compatible_state_dicts(zero_shot_model.state_dict(), fine_tuned_model.state_dict())
        check_compatible_configs(zero_shot_model.config, fine_tuned_model.config)

        if processor is None:
            processor = load_processor(zero_shot, zero_shot_model)

        # Build the heads: from each endpoint's own text tower unless a trained linear head is given.
        num_classes = len(names)
        projection_dim = zero_shot_model.config.projection_dim
        head_sources = {}
        heads = []
        for name, endpoint, given_head in (
            ("zero_shot", zero_shot_model, zero_shot_head),
            ("fine_tuned", fine_tuned_model, fine_tuned_head),
        ):
            if given_head is not None:
                weight, bias = linear_head_from(given_head, num_classes=num_classes, projection_dim=projection_dim)
                head_sources[name] = "linear"
            else:
                if processor is None or getattr(processor, "tokenizer", None) is None:
                    raise ValueError(
                        f"Building the zero-shot head of the {name.replace('_', '-')} endpoint needs a CLIP tokenizer, but no processor "
                        "was given or found beside the zero-shot endpoint. Pass processor=CLIPProcessor.from_pretrained(...)."
                    )
                weight = build_zero_shot_head(endpoint, processor.tokenizer, names, template_list, progress=progress)
                bias = None
                head_sources[name] = "text"
            heads.append((weight, bias))

        if temperatures is None:
            temperatures = reference_temperatures(zero_shot_source or "")
        config = DaWinCLIPConfig(
            clip_config=zero_shot_model.config.to_dict(),
            class_names=names,
            mode=mode,
            alpha=alpha,
            temperatures=list(check_temperatures(temperatures)),
            offset_adjustment=offset_adjustment,
            n_components=n_components,
            zero_shot_name_or_path=zero_shot_source,
            fine_tuned_name_or_path=fine_tuned_source,
            templates=template_list,
            head_sources=head_sources,
        )
        attn_implementation = zero_shot_model.config._attn_implementation
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation

        # Allocate nothing for the endpoints: the loaded CLIP models are adopted as they are, so their weights
        # are neither copied nor re-initialised.
        with torch.device("meta"):
            model = cls(config)
        model.zero_shot = zero_shot_model
        model.fine_tuned = fine_tuned_model
        model.zero_shot_head = _make_head(*heads[0], reference=zero_shot_model.visual_projection.weight)
        model.fine_tuned_head = _make_head(*heads[1], reference=fine_tuned_model.visual_projection.weight)
        model.attach_processor(processor)
        return model.eval()

    # ------------------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a saved DaWin model and, when present beside it, its processor.

        Weights load from safetensors files only unless `use_safetensors=None` or `False` is passed.
        """
        kwargs = safetensors_only(kwargs)
        # transformers rewrites max_memory in place; keep the caller's values for error messages.
        requested_memory = dict(kwargs.get("max_memory") or {})
        check_devices_available(kwargs.get("device_map"), "DaWin model")
        check_max_memory_devices(kwargs.get("max_memory"), "DaWin model")
        check_module_device_map(
            kwargs.get("device_map"), "DaWin model", container="a DaWinCLIPModel",
            modules=("zero_shot", "fine_tuned", "zero_shot_head", "fine_tuned_head"),
        )  # fmt: skip
        writer = f"{cls.__name__}.save_pretrained"
        check_source_loadable(pretrained_model_name_or_path, writer, kwargs)
        try:
            cls._check_saved_model_type(pretrained_model_name_or_path, kwargs)
            if "class_names" in kwargs:
                _check_class_names_override(pretrained_model_name_or_path, kwargs)
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except OSError as error:
            raise saved_model_load_error(error, pretrained_model_name_or_path, kwargs, "a DaWin model", writer) from error
        # Settings passed as keyword arguments (mode="...") reach the config unchecked, so they are checked here,
        # before the first image.
        model.config.check_settings()
        model._warn_if_uncalibrated("Loaded", "Calibrate it before the first image.")
        model.attach_processor(cls._load_saved_processor(pretrained_model_name_or_path, kwargs))
        prepare_endpoint(model, "DaWin model", max_memory=requested_memory)
        return model

    # ------------------------------------------------------------------------------------------------------
    # Building blocks
    # ------------------------------------------------------------------------------------------------------

    def endpoint_classifiers(self) -> tuple[CLIPImageClassifier, CLIPImageClassifier]:
        """Return the zero-shot and fine-tuned image classifiers, sharing this model's weights."""
        return (
            CLIPImageClassifier(self.zero_shot.vision_model, self.zero_shot.visual_projection, self.zero_shot_head),
            CLIPImageClassifier(self.fine_tuned.vision_model, self.fine_tuned.visual_projection, self.fine_tuned_head),
        )

    def endpoint_logits(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute both endpoints' logits.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): Preprocessed images.

        Returns:
            `(zero_shot_logits, fine_tuned_logits)`, each float32 of shape `(batch_size, num_classes)`, on the
            device of `pixel_values`.

        Raises:
            ValueError: If an endpoint produces NaN or infinite logits (the message names the endpoint).
        """
        zero_shot_classifier, fine_tuned_classifier = self.endpoint_classifiers()
        zero_shot_logits = _run_on_own_device(zero_shot_classifier, pixel_values).float()
        fine_tuned_logits = _run_on_own_device(fine_tuned_classifier, pixel_values).float()
        check_finite_logits(zero_shot_logits, "zero-shot")
        check_finite_logits(fine_tuned_logits, "fine-tuned")
        return zero_shot_logits.to(pixel_values.device), fine_tuned_logits.to(pixel_values.device)

    def stored_entropy_statistics(self) -> EntropyStatistics | None:
        """Return the calibrated entropy statistics saved in the config, if any."""
        if self.config.entropy_statistics is None:
            return None
        return EntropyStatistics.from_dict(self.config.entropy_statistics)

    def coefficients_from_logits(
        self,
        zero_shot_logits: torch.Tensor,
        fine_tuned_logits: torch.Tensor,
        statistics: EntropyStatistics | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compute entropies and coefficients with the configured temperatures and offset adjustment.

        Args:
            zero_shot_logits (`torch.Tensor` of shape `(batch_size, num_classes)`): Zero-shot logits, already in
                the evaluation label space.
            fine_tuned_logits (`torch.Tensor` of shape `(batch_size, num_classes)`): Fine-tuned logits.
            statistics ([`EntropyStatistics`], *optional*): Set-level statistics for the offset adjustment;
                defaults to the calibrated ones in the config.

        Returns:
            `(coefficients, zero_shot_entropy, fine_tuned_entropy)`, each float32 of shape `(batch_size,)`.

        Raises:
            ValueError: If the offset adjustment is enabled but no statistics are given or calibrated.
        """
        # Checked again here, because the config can be edited after construction.
        zero_shot_temperature, fine_tuned_temperature = check_temperatures(self.config.temperatures)
        zero_shot_entropy = entropy(zero_shot_logits, zero_shot_temperature)
        fine_tuned_entropy = entropy(fine_tuned_logits, fine_tuned_temperature)
        if self.config.offset_adjustment:
            statistics = statistics or self.stored_entropy_statistics()
            if statistics is None:
                raise ValueError(
                    "offset_adjustment=True needs set-level entropy statistics, but none were given and the model "
                    "is not calibrated. Call model.calibrate(...) on a calibration set, or pass statistics."
                )
        else:
            statistics = None
        coefficients = coefficients_from_entropies(zero_shot_entropy, fine_tuned_entropy, statistics)
        return coefficients, zero_shot_entropy, fine_tuned_entropy

    def mixed_classifier(self):
        """Return the per-sample interpolated classifier and its coefficient holder (built once, cached)."""

        def build():
            zero_shot_classifier, fine_tuned_classifier = self.endpoint_classifiers()
            return build_mixed_module(zero_shot_classifier, [fine_tuned_classifier])

        return self._cached("mixed", (), build)

    def interpolated_logits(self, pixel_values: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """Classify each image with its own interpolated weights (exact `"sample"` mode).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): Preprocessed images.
            coefficients (`torch.Tensor` of shape `(batch_size,)`): Weight on the fine-tuned endpoint per image.

        Returns:
            `torch.Tensor` of shape `(batch_size, num_classes)`, float32: the logits sample b would get from a
            CLIP merged as (1 - c_b) theta_0 + c_b theta_1.
        """
        mixed, state = self.mixed_classifier()
        device = self.zero_shot_head.weight.device
        state.set_coefficients(coefficients.to(device=device, dtype=torch.float32).reshape(-1, 1))
        try:
            logits = mixed(pixel_values.to(device))
        finally:
            state.weights = None
        return logits.float().to(pixel_values.device)

    def merged_classifier(self, alpha: float) -> CLIPImageClassifier:
        """Return an image classifier with static weights (1 - alpha) theta_0 + alpha theta_1 (cached per alpha)."""
        alpha = check_alpha(alpha)

        def build():
            # Only the image classifier (vision tower, projection, head) is merged, never the text tower.
            zero_shot_classifier, fine_tuned_classifier = self.endpoint_classifiers()
            return build_merged_module(zero_shot_classifier, [fine_tuned_classifier], [alpha])

        return self._cached(f"merged:{alpha!r}", (alpha,), build)

    def static_logits(self, pixel_values: torch.Tensor, alpha: float) -> torch.Tensor:
        """Classify with WiSE-FT weights at `alpha`; returns float32 `(batch_size, num_classes)`."""
        if alpha == 0.0:
            return self.endpoint_classifiers()[0](pixel_values.to(self.zero_shot_head.weight.device)).float().to(pixel_values.device)
        classifier = self.merged_classifier(alpha)
        return _run_on_own_device(classifier, pixel_values).float().to(pixel_values.device)

    # ------------------------------------------------------------------------------------------------------
    # Mixture and calibration
    # ------------------------------------------------------------------------------------------------------

    def fit_mixture(self, coefficients: torch.Tensor | np.ndarray, n_components: int | None = None) -> BetaMixture:
        """Fit the Beta mixture on coefficients (for example of a calibration set) and store it in the config.

        Args:
            coefficients (`torch.Tensor` of shape `(num_samples,)`): Coefficients lambda(x) of a set.
            n_components (`int`, *optional*): Number of components; defaults to `config.n_components`.

        Returns:
            The fitted [`BetaMixture`]; it is saved with the model from now on.
        """
        values = coefficients.detach().float().cpu().numpy() if isinstance(coefficients, torch.Tensor) else np.asarray(coefficients)
        if values.size == 0:
            raise ValueError("Cannot fit the Beta mixture on an empty set of coefficients; the evaluation set is empty.")
        mixture = BetaMixture(n_components=n_components or self.config.n_components).fit(values)
        self.config.mixture = mixture.to_dict()
        return mixture

    def stored_mixture(self) -> BetaMixture | None:
        """Return the fitted mixture saved in the config, if any."""
        return None if self.config.mixture is None else BetaMixture.from_dict(self.config.mixture)

    @torch.inference_mode()
    def calibrate(self, batches: Iterable[torch.Tensor | dict], *, fit_mixture: bool = True) -> dict:
        """Compute entropy statistics and fit the mixture on a calibration set, storing both in the config.

        After calibration the `"mixture"` mode and the offset adjustment work on single images, for example in
        `pipeline("image-classification")`, and the calibration is saved with the model.

        Args:
            batches (`Iterable`): Batches of `pixel_values` tensors `(batch_size, 3, height, width)` or dicts with a
                `pixel_values` key (the output of the image processor).
            fit_mixture (`bool`, *optional*, defaults to `True`): Also fit the Beta mixture.

        Returns:
            `dict` with the `entropy_statistics` and, if fitted, the `mixture` parameters.
        """
        if fit_mixture:
            # Fail before any change to the config when the mixture cannot be fitted.
            check_fit_dependencies()
        zero_shot_entropies, fine_tuned_entropies = [], []
        zero_shot_temperature, fine_tuned_temperature = check_temperatures(self.config.temperatures)
        for batch in batches:
            zero_shot_logits, fine_tuned_logits = self.endpoint_logits(batch_pixel_values(batch, "calibrate"))
            zero_shot_entropies.append(entropy(zero_shot_logits, zero_shot_temperature))
            fine_tuned_entropies.append(entropy(fine_tuned_logits, fine_tuned_temperature))
        count = sum(values.numel() for values in zero_shot_entropies)
        if count < 2:
            raise ValueError(
                f"calibrate needs at least two images to compute entropy statistics and fit the mixture, received "
                f"{count}. Pass batches of calibration images."
            )
        zero_shot_entropy = torch.cat(zero_shot_entropies)
        fine_tuned_entropy = torch.cat(fine_tuned_entropies)
        statistics = entropy_statistics(zero_shot_entropy, fine_tuned_entropy)
        self.config.entropy_statistics = statistics.to_dict()
        result = {"entropy_statistics": self.config.entropy_statistics}
        if fit_mixture:
            adjusted = statistics if self.config.offset_adjustment else None
            coefficients = coefficients_from_entropies(zero_shot_entropy, fine_tuned_entropy, adjusted)
            self.fit_mixture(coefficients)
            result["mixture"] = self.config.mixture
        return result

    def mixture_logits(
        self, pixel_values: torch.Tensor, coefficients: torch.Tensor, mixture: BetaMixture | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Classify each image with the merged model of its most responsible mixture component.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): Preprocessed images.
            coefficients (`torch.Tensor` of shape `(batch_size,)`): Per-sample coefficients lambda(x).
            mixture ([`BetaMixture`], *optional*): A fitted mixture; defaults to the one stored in the config.

        Returns:
            `(logits, component_coefficients, components)`: float32 logits `(batch_size, num_classes)`, the component
            mean used per sample `(batch_size,)` and the component index per sample `(batch_size,)`.
        """
        mixture = mixture or self.stored_mixture()
        if mixture is None:
            raise ValueError(
                "mode='mixture' needs a fitted Beta mixture. Call model.calibrate(...) or model.fit_mixture(...) on "
                "a calibration set first, or evaluate with `hf-dawin evaluate`, which fits it on the evaluation set."
            )
        components = torch.as_tensor(mixture.predict(coefficients.detach().float().cpu().numpy()), dtype=torch.long)
        means = torch.as_tensor(np.asarray(mixture.component_means), dtype=torch.float32)
        component_coefficients = means[components]
        logits = torch.empty(pixel_values.shape[0], self.config.num_classes, dtype=torch.float32, device=pixel_values.device)
        # One forward pass per used component (at most K), never per sample.
        for component in torch.unique(components).tolist():
            selected = (components == component).nonzero().flatten().to(pixel_values.device)
            logits[selected] = self.static_logits(pixel_values[selected], float(means[component]))
        return logits, component_coefficients.to(pixel_values.device), components.to(pixel_values.device)

    # ------------------------------------------------------------------------------------------------------
    # Plain CLIP exports
    # ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, alpha: float) -> CLIPModel:
        """Return a plain `CLIPModel` with weights (1 - alpha) theta_0 + alpha theta_1, text tower included.

        The result has no dependency on hf_dawin: save it with `save_pretrained` and load it with
        `CLIPModel.from_pretrained`, or use it in `pipeline("zero-shot-image-classification")`.

        Args:
            alpha (`float`): Weight on the fine-tuned endpoint, in [0, 1].

        Returns:
            `CLIPModel` on the zero-shot endpoint's device, in eval mode.
        """
        alpha = check_alpha(alpha)
        merged_state = merge_task_vectors(self.zero_shot.state_dict(), [self.fine_tuned.state_dict()], [alpha])
        merged = copy.deepcopy(self.zero_shot)
        merged.load_state_dict(merged_state)
        return merged.eval()

    # ------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        mode: str | None = None,
        alpha: float | None = None,
        coefficients: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DaWinImageClassifierOutput | tuple:
        r"""Classify images with the configured (or requested) DaWin mode.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): Preprocessed images.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): Class indices for the loss.
            mode (`str`, *optional*): `"sample"`, `"mixture"`, `"static"`, `"zero_shot"`, `"fine_tuned"` or
                `"output_ensemble"`; defaults to `config.mode`.
            alpha (`float`, *optional*): Static weight for `"static"` mode; defaults to `config.alpha`.
            coefficients (`torch.Tensor` of shape `(batch_size,)`, *optional*): Precomputed coefficients for the
                dynamic modes (for example computed with set-level statistics), replacing the entropy-based ones.

        Returns:
            [`DaWinImageClassifierOutput`].
        """
        self._check_forward_kwargs(kwargs, "pixel_values, labels, mode, alpha, coefficients and return_dict")
        mode = check_mode(mode if mode is not None else self.config.mode)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values is None:
            raise ValueError("DaWinCLIPModel needs pixel_values of shape (batch_size, 3, height, width).")
        channels = self.config.clip_config.vision_config.num_channels
        size = self.config.clip_config.vision_config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[0] == 0 or tuple(pixel_values.shape[1:]) != (channels, size, size):
            raise ValueError(
                f"Expected pixel_values of shape (batch_size, {channels}, {size}, {size}) with batch_size >= 1, "
                f"received {tuple(pixel_values.shape)}. Preprocess images with the model's image processor."
            )
        if alpha is not None and mode != "static":
            logger.warning_once(f"alpha is used by mode='static' only; mode={mode!r} ignores it.")
        if coefficients is not None and mode in ("zero_shot", "fine_tuned", "static"):
            logger.warning_once(f"coefficients are used by the dynamic modes only; mode={mode!r} ignores them.")

        zero_shot_logits = fine_tuned_logits = zero_shot_entropy = fine_tuned_entropy = components = None
        if mode in ("zero_shot", "fine_tuned", "static"):
            # Fixed weights: no endpoint scoring is needed.
            if mode == "zero_shot":
                weight = 0.0
            elif mode == "fine_tuned":
                weight = 1.0
            else:
                weight = check_alpha(self.config.alpha if alpha is None else alpha)
            if mode == "fine_tuned":
                logits = _run_on_own_device(self.endpoint_classifiers()[1], pixel_values).float().to(pixel_values.device)
            else:
                logits = self.static_logits(pixel_values, weight)
            names = {"zero_shot": "zero-shot", "fine_tuned": "fine-tuned", "static": f"merged (alpha={weight:g})"}
            checkpoints = "the zero-shot and fine-tuned checkpoints" if mode == "static" else None
            check_finite_logits(logits, names[mode], checkpoints=checkpoints, consequence="predictions would be undefined")
            batch_coefficients = torch.full((pixel_values.shape[0],), weight, device=pixel_values.device)
        else:
            # Score both endpoints, then compute the per-sample coefficients from their entropies.
            zero_shot_logits, fine_tuned_logits = self.endpoint_logits(pixel_values)
            batch_coefficients, zero_shot_entropy, fine_tuned_entropy = self.coefficients_from_logits(
                zero_shot_logits, fine_tuned_logits
            )
            if coefficients is not None:
                batch_coefficients = _check_coefficients(coefficients, pixel_values.shape[0]).to(pixel_values.device)

            # Interpolate and classify.
            if mode == "sample":
                logits = self.interpolated_logits(pixel_values, batch_coefficients)
            elif mode == "mixture":
                logits, batch_coefficients, components = self.mixture_logits(pixel_values, batch_coefficients)
            else:
                probabilities = output_ensemble_probabilities(
                    zero_shot_logits, fine_tuned_logits, batch_coefficients, self.config.temperatures
                )
                logits = probabilities.clamp_min(torch.finfo(torch.float32).tiny).log()

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, check_label_indices(labels, logits.shape).to(logits.device))

        output = DaWinImageClassifierOutput(
            loss=loss,
            logits=logits,
            coefficients=batch_coefficients,
            zero_shot_logits=zero_shot_logits,
            fine_tuned_logits=fine_tuned_logits,
            zero_shot_entropy=zero_shot_entropy,
            fine_tuned_entropy=fine_tuned_entropy,
            mixture_components=components,
        )
        return output if return_dict else output.to_tuple()


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def _check_class_names_override(source, load_kwargs: dict) -> None:
    """Raise a ValueError if `class_names=` passed to `from_pretrained` does not fit the saved heads."""
    if isinstance(load_kwargs.get("config"), PreTrainedConfig):
        return
    class_names = check_class_names(load_kwargs["class_names"])
    saved = saved_config_dict(source, load_kwargs).get("class_names") or []
    if len(class_names) != len(saved):
        raise ValueError(
            f"class_names lists {len(class_names)} classes, but the saved heads have {len(saved)}. Pass one name per "
            "class of the saved model, in its order, or build a new model with DaWinCLIPModel.from_pretrained_pair."
        )


def _make_head(weight: torch.Tensor, bias: torch.Tensor | None, *, reference: torch.Tensor) -> nn.Linear:
    head = nn.Linear(weight.shape[1], weight.shape[0], device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is None:
            head.bias.zero_()
        else:
            head.bias.copy_(bias)
    return head


def batch_pixel_values(batch, caller: str) -> torch.Tensor:
    """Return the pixel values of one calibration batch: a tensor, or a mapping such as an image processor's output.

    Raises:
        TypeError: If the batch is neither, a mapping without a `pixel_values` tensor, or a tensor that is not
            4-dimensional (one image of a batch tensor passed where an iterable of batches was expected).
    """
    pixel_values = batch.get("pixel_values") if isinstance(batch, Mapping) else batch
    if isinstance(pixel_values, torch.Tensor) and pixel_values.ndim == 4:
        return pixel_values
    if isinstance(pixel_values, torch.Tensor):
        received = f"a tensor of shape {tuple(pixel_values.shape)}"
    elif isinstance(batch, Mapping):
        received = f"a mapping with keys {sorted(batch)}"
    else:
        received = type(batch).__name__
    raise TypeError(
        f"{caller} expects an iterable of batches, each a pixel_values tensor of shape (batch_size, 3, height, "
        f"width) or the image processor's output (with return_tensors='pt'); received a batch that is {received}. "
        "Wrap a single batch in a list: [image_processor(images=images, return_tensors='pt')]."
    )


def _run_on_own_device(module: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    device = next(module.parameters()).device
    return module(pixel_values.to(device))


def check_label_indices(labels: torch.Tensor, logits_shape: torch.Size, classes: str = "config.class_names") -> torch.Tensor:
    """Return `labels` as int64 if it contains one class index in `[0, num_classes)` per image, else raise.

    `classes` names the class list in the message, for example `config.tasks['animals']`.
    """
    labels = torch.as_tensor(labels).long()
    batch_size, num_classes = logits_shape
    if labels.shape != (batch_size,):
        raise ValueError(f"Expected labels of shape ({batch_size},), one class index per image, received {tuple(labels.shape)}.")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.numel():
        raise ValueError(
            f"labels {sorted(set(outside.tolist()))[:10]} are outside the model's {num_classes} classes "
            f"(valid: 0..{num_classes - 1}). Map them to indices of {classes}."
        )
    return labels


def _check_coefficients(coefficients: torch.Tensor, batch_size: int) -> torch.Tensor:
    coefficients = torch.as_tensor(coefficients, dtype=torch.float32).reshape(-1)
    if coefficients.shape[0] != batch_size:
        raise ValueError(f"Expected {batch_size} coefficients (one per image), received {coefficients.shape[0]}.")
    outside = (~((coefficients >= 0) & (coefficients <= 1))).nonzero().flatten().tolist()
    if outside:
        first_values = {index: coefficients[index].item() for index in outside[:10]}
        raise ValueError(
            f"Coefficients must lie in [0, 1] (the weight on the fine-tuned endpoint), but {len(outside)} do not "
            f"(batch index: value) {first_values}{' ...' if len(outside) > len(first_values) else ''}. Clip them to "
            "[0, 1] or check how they were computed."
        )
    return coefficients


# Saving copies this module and its relative imports beside the weights and writes `auto_map` into the config.
DaWinCLIPConfig.register_for_auto_class()
DaWinCLIPModel.register_for_auto_class("AutoModelForImageClassification")
