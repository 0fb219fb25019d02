"""Weight interpolation: static merges of state dicts and the exact per-sample interpolated vision tower.

Static merges compute theta = theta_0 + sum_t c_t (theta_t - theta_0) once, in float32, and cast back. With
one fine-tuned endpoint and c_1 = alpha this is WiSE-FT's (1 - alpha) theta_0 + alpha theta_1.

Per-sample interpolation avoids building a model per sample. Every parameterised operation of a CLIP vision
tower (patch-embedding convolution, class and position embeddings, LayerNorm scale and shift, every Linear,
the projection and the classification head) is affine in its own parameters for a fixed input. A layer with
merged weights W_0 + sum_t c_t dW_t applied to an input h therefore equals layer(h; W_0) + sum_t c_t h dW_t^T,
so mixing each layer's outputs per sample reproduces the per-sample merged network exactly, nonlinearities
included, while the weights stay shared by the whole batch. Each Linear and the convolution compute h W_0^T
and add each (c_t h) dW_t^T into the same output buffer: one matrix product per weight set, with the
per-sample coefficients applied to the inputs. Parameters no larger than one activation row (LayerNorm scale
and shift, class and position embeddings) are mixed directly per sample, which costs as much as one activation.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = [
    "MixedConv2d",
    "MixedLayerNorm",
    "MixedLinear",
    "MixedVisionEmbeddings",
    "MixingState",
    "build_merged_module",
    "build_mixed_module",
    "check_compatible_configs",
    "check_compatible_state_dicts",
    "interpolate_state_dicts",
    "merge_task_vectors",
]

# Keys listed per kind of difference in an architecture mismatch; the rest are counted.
_MAX_LISTED_KEYS = 20
# Fields of a CLIP tower's config that change its function without changing any weight shape.
COMPUTATION_CONFIG_FIELDS = ("hidden_act", "num_attention_heads", "layer_norm_eps", "eos_token_id")

# ----------------------------------------------------------------------------------------------------------
# Static merges
# ----------------------------------------------------------------------------------------------------------


def format_listed(items: Sequence[str], separator: str = ", ", limit: int = _MAX_LISTED_KEYS) -> str:
    """Join the first `limit` items and count the rest, so a message about a large model stays readable."""
    listed = separator.join(items[:limit])
    hidden = len(items) - limit
    return listed if hidden <= 0 else f"{listed}{separator}... and {hidden} more"


def check_compatible_configs(
    reference: PretrainedConfig,
    other: PretrainedConfig,
    *,
    reference_name: str = "zero-shot",
    other_name: str = "fine-tuned",
) -> None:
    """Raise if two CLIP endpoints' configs differ in a setting that changes the computation but no weight shape.

    The interpolated passes run the reference endpoint's modules with mixed weights, so an activation function,
    a head count, a LayerNorm epsilon or a pooling token that differs would silently change the other endpoint's
    function. Differences that change weight shapes are reported by [`check_compatible_state_dicts`].

    Args:
        reference (`PretrainedConfig`): Config of the reference endpoint, a `CLIPConfig`.
        other (`PretrainedConfig`): Config of the endpoint compared with it.
        reference_name (`str`): Name of the reference endpoint in the message.
        other_name (`str`): Name of the other endpoint in the message.

    Raises:
        ValueError: Listing each differing setting as `tower.field: reference value vs other value`, sorted.
    """
    differences = []
    for tower in ("vision_config", "text_config"):
        reference_tower, other_tower = getattr(reference, tower, None), getattr(other, tower, None)
        if reference_tower is None or other_tower is None:
            continue
        for field in COMPUTATION_CONFIG_FIELDS:
            reference_value = getattr(reference_tower, field, None)
            other_value = getattr(other_tower, field, None)
            if reference_value != other_value:
                differences.append(f"{tower}.{field}: {reference_value!r} vs {other_value!r}")
    if differences:
        raise ValueError(
            f"The {reference_name} and {other_name} endpoints do not share an architecture: their configs differ in "
            f"settings that change the computation ({reference_name} vs {other_name}): {'; '.join(sorted(differences))}. "
            f"Use a {other_name} checkpoint of the same CLIP architecture as the {reference_name} endpoint, or fix "
            f"the {other_name} checkpoint's config.json if it was converted with other settings."
        )


def check_compatible_state_dicts(
    reference: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    *,
    reference_name: str = "zero-shot",
    other_name: str = "fine-tuned",
) -> None:
    """Raise if two endpoints' state dicts do not share keys, shapes and dtypes.

    Args:
        reference (`Mapping[str, torch.Tensor]`): State dict of the reference endpoint.
        other (`Mapping[str, torch.Tensor]`): State dict of the endpoint compared with it.
        reference_name (`str`): Name of the reference endpoint in the message.
        other_name (`str`): Name of the other endpoint in the message.

    Raises:
        ValueError: Listing keys missing from `other`, extra keys in `other`, then shape and dtype
            differences, each sorted by key.
    """
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    shared = sorted(set(reference) & set(other))
    shape_differences = [
        f"{key}: {tuple(reference[key].shape)} vs {tuple(other[key].shape)}"
        for key in shared
        if reference[key].shape != other[key].shape
    ]
    dtype_differences = [
        f"{key}: {reference[key].dtype} vs {other[key].dtype}"
        for key in shared
        if reference[key].dtype != other[key].dtype and reference[key].shape == other[key].shape
    ]
    if not (missing or extra or shape_differences or dtype_differences):
        return

    if not (missing or extra or shape_differences):
        pairs = sorted({f"{reference[key].dtype} vs {other[key].dtype}" for key in shared if reference[key].dtype != other[key].dtype})
        raise ValueError(
            f"The {reference_name} and {other_name} endpoints hold their weights in different dtypes "
            f"({reference_name} vs {other_name}: {'; '.join(pairs)}, in {len(dtype_differences)} of {len(shared)} "
            "tensors), so their weights cannot be interpolated. Cast them to one dtype: pass dtype=torch.float32 "
            "(or the dtype you want) when building the DaWin model (on the command line: --dtype float32), or call "
            ".to(dtype) on the CLIPModels you pass in."
        )
    lines = [
        f"The {reference_name} and {other_name} endpoints do not share an architecture, so their weights "
        "cannot be interpolated."
    ]
    if missing:
        lines.append(f"Missing from the {other_name} endpoint ({len(missing)}): {format_listed(missing, ', ')}")
    if extra:
        lines.append(f"Extra in the {other_name} endpoint ({len(extra)}): {format_listed(extra, ', ')}")
    if shape_differences:
        lines.append(
            f"Shape mismatches ({reference_name} vs {other_name}, {len(shape_differences)}): "
            + format_listed(shape_differences, "; ")
        )
    if dtype_differences:
        lines.append(
            f"Dtype mismatches ({reference_name} vs {other_name}, {len(dtype_differences)}): "
            + format_listed(dtype_differences, "; ")
        )
    lines.append(
        f"Use a {other_name} checkpoint of the same CLIP architecture as the {reference_name} endpoint, loaded in "
        "the same dtype."
    )
    raise ValueError("\n".join(lines))


@torch.no_grad()
def merge_task_vectors(
    base: Mapping[str, torch.Tensor],
    endpoints: Sequence[Mapping[str, torch.Tensor]],
    coefficients: Sequence[float],
) -> dict[str, torch.Tensor]:
    """Merge state dicts as theta_0 + sum_t c_t (theta_t - theta_0), in float32, cast back to each dtype.

    Non-floating-point tensors (integer buffers) are copied from `base` unchanged.

    Args:
        base (`Mapping[str, torch.Tensor]`): State dict of the zero-shot (pre-trained) endpoint, theta_0.
        endpoints (`Sequence[Mapping[str, torch.Tensor]]`): State dicts theta_1 ... theta_T with the same keys.
        coefficients (`Sequence[float]`): One coefficient c_t per endpoint.

    Returns:
        `dict[str, torch.Tensor]`: The merged state dict, new tensors on the devices of `base`.

    Raises:
        ValueError: If the counts differ, the state dicts do not match, or a merged tensor is not finite
            (the message names the parameter).
    """
    if len(endpoints) != len(coefficients):
        raise ValueError(
            f"Expected one coefficient per fine-tuned endpoint: received {len(endpoints)} endpoints and "
            f"{len(coefficients)} coefficients."
        )
    for index, endpoint in enumerate(endpoints):
        name = "fine-tuned" if len(endpoints) == 1 else f"fine-tuned #{index + 1}"
        check_compatible_state_dicts(base, endpoint, other_name=name)

    merged = {}
    for key, base_tensor in base.items():
        if not base_tensor.is_floating_point():
            merged[key] = base_tensor.clone()
            continue
        accumulator = base_tensor.float().clone()
        for endpoint, coefficient in zip(endpoints, coefficients):
            accumulator.add_(endpoint[key].to(accumulator.device).float() - base_tensor.float(), alpha=float(coefficient))
        if not bool(torch.isfinite(accumulator).all()):
            raise ValueError(
                f"Interpolating parameter '{key}' produced NaN or infinite values. Check that both endpoints "
                "hold finite weights for it."
            )
        merged[key] = accumulator.to(base_tensor.dtype)
    return merged


def interpolate_state_dicts(
    zero_shot: Mapping[str, torch.Tensor],
    fine_tuned: Mapping[str, torch.Tensor],
    alpha: float,
) -> dict[str, torch.Tensor]:
    """Compute the WiSE-FT merge (1 - alpha) theta_0 + alpha theta_1 of two state dicts.

    Args:
        zero_shot (`Mapping[str, torch.Tensor]`): State dict of the zero-shot endpoint.
        fine_tuned (`Mapping[str, torch.Tensor]`): State dict of the fine-tuned endpoint.
        alpha (`float`): Weight on the fine-tuned endpoint, in [0, 1].

    Returns:
        `dict[str, torch.Tensor]`: The merged state dict.
    """
    return merge_task_vectors(zero_shot, [fine_tuned], [alpha])


# ----------------------------------------------------------------------------------------------------------
# Static merges of modules
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def build_merged_module(base: nn.Module, endpoints: Sequence[nn.Module], coefficients: Sequence[float]) -> nn.Module:
    """Build a copy of `base` with weights theta_0 + sum_t c_t (theta_t - theta_0), computed in float32.

    The result equals loading `merge_task_vectors(base.state_dict(), ...)` into a deep copy of `base`, bit for
    bit, but writes each merged tensor once into fresh storage instead of copying the weights three times.
    Parameters of `endpoints` are read on their own devices and merged on the device of `base`.

    Args:
        base (`nn.Module`): The zero-shot (pre-trained) module, theta_0.
        endpoints (`Sequence[nn.Module]`): Modules of the same architecture, theta_1 ... theta_T.
        coefficients (`Sequence[float]`): One coefficient c_t per endpoint.

    Returns:
        `nn.Module`: A new module in eval mode that shares no parameter with `base` or `endpoints`.

    Raises:
        ValueError: If the counts differ, the endpoints do not match `base`, or a merged parameter is not
            finite (the message names it).
    """
    if len(endpoints) != len(coefficients):
        raise ValueError(
            f"Expected one coefficient per fine-tuned endpoint: received {len(endpoints)} endpoints and "
            f"{len(coefficients)} coefficients."
        )
    base_state = base.state_dict()
    endpoint_states = [endpoint.state_dict() for endpoint in endpoints]
    for index, endpoint_state in enumerate(endpoint_states):
        name = "fine-tuned" if len(endpoints) == 1 else f"fine-tuned #{index + 1}"
        check_compatible_state_dicts(base_state, endpoint_state, other_name=name)

    # Deep-copy the structure only: every floating-point parameter is replaced by uninitialised storage
    # through the memo, so no weight is copied before it is merged.
    parameters = dict(base.named_parameters())
    memo = {
        id(parameter): nn.Parameter(torch.empty_like(parameter), requires_grad=parameter.requires_grad)
        for parameter in parameters.values()
        if parameter.is_floating_point()
    }
    merged = copy.deepcopy(base, memo)

    merged_parameters = dict(merged.named_parameters())
    for key, base_parameter in parameters.items():
        if not base_parameter.is_floating_point():
            continue
        target = merged_parameters[key].data
        sources = [state[key].to(target.device) for state in endpoint_states]
        if target.dtype == torch.float32:
            # Same arithmetic as merge_task_vectors, without the intermediate copies.
            target.copy_(base_parameter)
            for source, coefficient in zip(sources, coefficients):
                target.add_(source - base_parameter, alpha=float(coefficient))
        else:
            accumulator = base_parameter.float().clone()
            for source, coefficient in zip(sources, coefficients):
                accumulator.add_(source.float() - base_parameter.float(), alpha=float(coefficient))
            target.copy_(accumulator)
        if not bool(torch.isfinite(target).all()):
            raise ValueError(
                f"Interpolating parameter '{key}' produced NaN or infinite values. Check that both endpoints "
                "hold finite weights for it."
            )
    return merged.eval()


# ----------------------------------------------------------------------------------------------------------
# Per-sample mixing layers
# ----------------------------------------------------------------------------------------------------------


class MixingState:
    """Per-sample coefficients shared by every mixing layer of one interpolated network.

    `coefficients` has shape `(batch_size, num_task_vectors)` and stays float32 whatever the model's dtype;
    `weights` has shape `(batch_size, 1 + num_task_vectors)`: a leading 1 for the base output followed by the
    coefficient of each task vector. Setting `weights = None` clears both.
    """

    def __init__(self, num_task_vectors: int):
        self.num_task_vectors = num_task_vectors
        self._coefficients: torch.Tensor | None = None

    @property
    def coefficients(self) -> torch.Tensor | None:
        return self._coefficients

    @property
    def weights(self) -> torch.Tensor | None:
        if self._coefficients is None:
            return None
        ones = torch.ones_like(self._coefficients[:, :1])
        return torch.cat([ones, self._coefficients], dim=1)

    @weights.setter
    def weights(self, value: torch.Tensor | None) -> None:
        if value is None:
            self._coefficients = None
        else:
            self.set_coefficients(value[:, 1:])

    def set_coefficients(self, coefficients: torch.Tensor) -> None:
        """Store `coefficients` of shape `(batch_size, num_task_vectors)` for the next forward pass."""
        if coefficients.ndim != 2 or coefficients.shape[1] != self.num_task_vectors:
            raise ValueError(
                f"Expected coefficients of shape (batch_size, {self.num_task_vectors}), received "
                f"{tuple(coefficients.shape)}."
            )
        self._coefficients = coefficients.float()

    def require_coefficients(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Return the float32 coefficients `(batch_size, num_task_vectors)`, moved to `device` when given."""
        if self._coefficients is None:
            raise RuntimeError("Set the per-sample coefficients with `set_coefficients` before the forward pass.")
        if self._coefficients.shape[0] != batch_size:
            raise ValueError(
                f"The per-sample coefficients cover {self._coefficients.shape[0]} samples but the batch contains "
                f"{batch_size}. Set one coefficient row per sample before the forward pass."
            )
        return self._coefficients if device is None else self._coefficients.to(device)

    def require_weights(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """Return `weights` `(batch_size, 1 + num_task_vectors)` in `dtype`, checking the batch size."""
        coefficients = self.require_coefficients(batch_size)
        return torch.cat([torch.ones_like(coefficients[:, :1]), coefficients], dim=1).to(dtype)


def _task_deltas(base: torch.Tensor, endpoints: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack the task vectors [endpoint_1 - base, ...] along a new leading dimension, computed in float32."""
    base32 = base.detach().float()
    deltas = [endpoint.detach().to(base.device).float() - base32 for endpoint in endpoints]
    return torch.stack(deltas).to(base.dtype)


def _optional_deltas(
    base: torch.Tensor | None, endpoints: Sequence[torch.Tensor | None], size: int, like: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Return `(base, task vectors)` of optional biases; a missing bias counts as zeros."""
    if base is None and all(endpoint is None for endpoint in endpoints):
        return None, None
    zeros = torch.zeros(size, dtype=like.dtype, device=like.device)
    base = base.detach() if base is not None else zeros
    return base, _task_deltas(base, [endpoint if endpoint is not None else zeros for endpoint in endpoints])


def _per_sample_vectors(base: torch.Tensor, deltas: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Mix a 1-D parameter per sample: `base + sum_t c[:, t] deltas[t]`, shape `(batch_size, size)`.

    Args:
        base (`torch.Tensor` of shape `(size,)`): The base parameter.
        deltas (`torch.Tensor` of shape `(num_task_vectors, size)`): Its task vectors.
        coefficients (`torch.Tensor` of shape `(batch_size, num_task_vectors)`): float32 coefficients.
    """
    mixed = base.float().expand(coefficients.shape[0], -1)
    for index in range(deltas.shape[0]):
        mixed = torch.addcmul(mixed, coefficients[:, index : index + 1], deltas[index].float())
    return mixed.to(base.dtype)


def _scale_per_sample(hidden_states: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
    """Multiply sample b of `hidden_states` `(batch_size, ...)` by `coefficient[b]` `(batch_size,)`.

    The product is taken in float32 and rounded once to the activation dtype, so reduced-precision models do
    not round the coefficient itself.
    """
    shape = (coefficient.shape[0],) + (1,) * (hidden_states.ndim - 1)
    scale = coefficient.reshape(shape)
    if hidden_states.dtype == torch.float32:
        return hidden_states * scale
    return (hidden_states.float() * scale).to(hidden_states.dtype)


class MixedLinear(nn.Module):
    """A Linear layer applied with per-sample weights W_0 + sum_t c_t dW_t, without materialising them.

    The output is computed as h W_0^T + sum_t (c_t h) dW_t^T + b(c): one matmul with the base weight, which
    is shared with the zero-shot layer rather than copied, and one accumulating matmul per task vector on
    the scaled input. No intermediate of twice the output width is created. A missing bias counts as zeros.

    Attributes:
        weight (`torch.Tensor` of shape `(out_features, in_features)`): The base weight W_0.
        delta_weight (`torch.Tensor` of shape `(num_task_vectors, out_features, in_features)`): Task vectors.
        bias, delta_bias: The base bias `(out_features,)` and its task vectors `(num_task_vectors,
            out_features)`, or `None` when no endpoint has a bias.
    """

    def __init__(self, base: nn.Linear, endpoints: Sequence[nn.Linear], state: MixingState):
        super().__init__()
        self.state = state
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.register_buffer("weight", base.weight.detach(), persistent=False)
        self.register_buffer(
            "delta_weight", _task_deltas(base.weight, [endpoint.weight for endpoint in endpoints]), persistent=False
        )
        bias, delta_bias = _optional_deltas(
            base.bias, [endpoint.bias for endpoint in endpoints], base.out_features, base.weight
        )
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("delta_bias", delta_bias, persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.ndim < 2:
            raise ValueError(
                f"MixedLinear expects inputs of shape (batch_size, ..., {self.in_features}), received "
                f"{tuple(hidden_states.shape)}."
            )
        batch_size = hidden_states.shape[0]
        coefficients = self.state.require_coefficients(batch_size, self.weight.device)
        hidden_states = hidden_states.to(device=self.weight.device, dtype=self.weight.dtype)

        # Start from the per-sample bias, broadcast over the inner dimensions, then accumulate h W_0^T and each
        # (c_t h) dW_t^T into the same buffer of shape (rows, out_features).
        output_shape = hidden_states.shape[:-1] + (self.out_features,)
        rows = hidden_states.reshape(-1, self.in_features)
        if self.bias is None:
            output = torch.matmul(rows, self.weight.t())
        else:
            bias = _per_sample_vectors(self.bias, self.delta_bias, coefficients)
            output = torch.empty(rows.shape[0], self.out_features, dtype=rows.dtype, device=rows.device)
            output.view(output_shape).copy_(bias.reshape((batch_size,) + (1,) * (len(output_shape) - 2) + (self.out_features,)))
            output.addmm_(rows, self.weight.t())
        for index in range(self.delta_weight.shape[0]):
            scaled = _scale_per_sample(hidden_states, coefficients[:, index]).reshape(-1, self.in_features)
            output.addmm_(scaled, self.delta_weight[index].t())
        return output.reshape(output_shape)


class MixedConv2d(nn.Module):
    """A Conv2d applied with per-sample weights W_0 + sum_t c_t dW_t: conv(x, W_0) + sum_t conv(c_t x, dW_t)."""

    def __init__(self, base: nn.Conv2d, endpoints: Sequence[nn.Conv2d], state: MixingState):
        super().__init__()
        if base.groups != 1 or base.padding_mode != "zeros":
            raise NotImplementedError(
                f"Per-sample mixing supports ungrouped zero-padded convolutions only, received groups={base.groups}, "
                f"padding_mode={base.padding_mode!r}."
            )
        self.state = state
        self.out_channels = base.out_channels
        self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation
        self.register_buffer("weight", base.weight.detach(), persistent=False)
        self.register_buffer(
            "delta_weight", _task_deltas(base.weight, [endpoint.weight for endpoint in endpoints]), persistent=False
        )
        bias, delta_bias = _optional_deltas(
            base.bias, [endpoint.bias for endpoint in endpoints], base.out_channels, base.weight
        )
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("delta_bias", delta_bias, persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch_size = pixel_values.shape[0]
        coefficients = self.state.require_coefficients(batch_size, self.weight.device)
        pixel_values = pixel_values.to(device=self.weight.device, dtype=self.weight.dtype)
        output = F.conv2d(pixel_values, self.weight, None, self.stride, self.padding, self.dilation)
        for index in range(self.delta_weight.shape[0]):
            scaled = _scale_per_sample(pixel_values, coefficients[:, index])
            output += F.conv2d(scaled, self.delta_weight[index], None, self.stride, self.padding, self.dilation)
        if self.bias is not None:
            bias = _per_sample_vectors(self.bias, self.delta_bias, coefficients)
            output += bias.reshape(batch_size, self.out_channels, 1, 1)
        return output


class MixedLayerNorm(nn.Module):
    """A LayerNorm whose scale and shift are mixed per sample; its statistics depend on the input only."""

    def __init__(self, base: nn.LayerNorm, endpoints: Sequence[nn.LayerNorm], state: MixingState):
        super().__init__()
        if not base.elementwise_affine or base.weight is None or base.bias is None:
            raise NotImplementedError("Per-sample mixing supports LayerNorm with an elementwise scale and shift only.")
        self.state = state
        self.normalized_shape = base.normalized_shape
        self.eps = base.eps
        self.register_buffer("weight", base.weight.detach(), persistent=False)
        self.register_buffer("bias", base.bias.detach(), persistent=False)
        self.register_buffer("delta_weight", _task_deltas(base.weight, [e.weight for e in endpoints]), persistent=False)
        self.register_buffer("delta_bias", _task_deltas(base.bias, [e.bias for e in endpoints]), persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size = hidden_states.shape[0]
        coefficients = self.state.require_coefficients(batch_size, self.weight.device)
        hidden_states = hidden_states.to(device=self.weight.device, dtype=self.weight.dtype)
        normalized = F.layer_norm(hidden_states, self.normalized_shape, None, None, self.eps)
        # Per-sample scale and shift: (batch_size, hidden_size), broadcast over the sequence.
        scale = _per_sample_vectors(self.weight, self.delta_weight, coefficients)
        shift = _per_sample_vectors(self.bias, self.delta_bias, coefficients)
        shape = (batch_size,) + (1,) * (hidden_states.ndim - 2) + (hidden_states.shape[-1],)
        return torch.addcmul(shift.reshape(shape), normalized, scale.reshape(shape))


class MixedVisionEmbeddings(nn.Module):
    """CLIP vision embeddings (patch convolution, class and position embeddings) mixed per sample."""

    def __init__(
        self, base: CLIPVisionEmbeddings, endpoints: Sequence[CLIPVisionEmbeddings], state: MixingState
    ):
        super().__init__()
        self.state = state
        self.image_size = base.image_size
        self.patch_embedding = MixedConv2d(base.patch_embedding, [e.patch_embedding for e in endpoints], state)
        self.register_buffer("class_embedding", base.class_embedding.detach(), persistent=False)
        self.register_buffer(
            "delta_class_embedding",
            _task_deltas(base.class_embedding, [e.class_embedding for e in endpoints]),
            persistent=False,
        )
        positions = base.position_embedding(base.position_ids).squeeze(0).detach()
        endpoint_positions = [e.position_embedding(e.position_ids).squeeze(0) for e in endpoints]
        self.register_buffer("position_embedding", positions, persistent=False)
        self.register_buffer("delta_position_embedding", _task_deltas(positions, endpoint_positions), persistent=False)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        if interpolate_pos_encoding:
            # NOTE: position-encoding interpolation for other resolutions is not mixed per sample yet.
            raise NotImplementedError(
                "Per-sample interpolation does not support interpolate_pos_encoding=True; resize images to the "
                f"model's resolution ({self.image_size}x{self.image_size}) with its image processor."
            )
        batch_size, _, height, width = pixel_values.shape
        if height != self.image_size or width != self.image_size:
            raise ValueError(
                f"Input image size ({height}x{width}) does not match the model ({self.image_size}x{self.image_size}). "
                "Preprocess images with the model's image processor."
            )
        coefficients = self.state.require_coefficients(batch_size, self.class_embedding.device)
        patch_embeds = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        class_embeds = _per_sample_vectors(self.class_embedding, self.delta_class_embedding, coefficients)
        positions = _per_sample_vectors(
            self.position_embedding.flatten(), self.delta_position_embedding.flatten(1), coefficients
        ).reshape((batch_size,) + self.position_embedding.shape)
        return torch.cat([class_embeds.unsqueeze(1), patch_embeds], dim=1) + positions


_MIXED_TYPES: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (CLIPVisionEmbeddings, MixedVisionEmbeddings),
    (nn.Linear, MixedLinear),
    (nn.Conv2d, MixedConv2d),
    (nn.LayerNorm, MixedLayerNorm),
)


def _mixed_type_for(module: nn.Module) -> type[nn.Module] | None:
    for source_type, mixed_type in _MIXED_TYPES:
        if isinstance(module, source_type):
            return mixed_type
    return None


@torch.no_grad()
def build_mixed_module(
    base: nn.Module, endpoints: Sequence[nn.Module], state: MixingState | None = None
) -> tuple[nn.Module, MixingState]:
    """Build a per-sample interpolated copy of `base` whose layers mix the outputs of all endpoints.

    The copy has the structure of `base` (so the original forward code, attention implementation included,
    runs unchanged) with every parameterised layer replaced by its mixing counterpart. Call
    `state.set_coefficients(c)` with `c` of shape `(batch_size, T)` before each forward pass; sample `b` then
    goes through the network with weights theta_0 + sum_t c[b, t] (theta_t - theta_0).

    Args:
        base (`nn.Module`): The zero-shot (pre-trained) module, theta_0; for example a `CLIPVisionModel`.
        endpoints (`Sequence[nn.Module]`): Modules of the same architecture, theta_1 ... theta_T.
        state ([`MixingState`], *optional*): Shared coefficient holder; a new one is created when omitted.

    Returns:
        `(module, state)`: The mixed module (in eval mode) and its coefficient holder.

    Raises:
        ValueError: If an endpoint's state dict does not match `base`.
        NotImplementedError: If `base` holds a parameterised layer of a type that cannot be mixed.
    """
    base_state = base.state_dict()
    for index, endpoint in enumerate(endpoints):
        name = "fine-tuned" if len(endpoints) == 1 else f"fine-tuned #{index + 1}"
        check_compatible_state_dicts(base_state, endpoint.state_dict(), other_name=name)
    state = state if state is not None else MixingState(len(endpoints))

    # Replace the outermost mixable modules; their children are handled by the replacement itself.
    replacements: dict[str, nn.Module] = {}
    for name, module in base.named_modules():
        if any(name.startswith(prefix + ".") for prefix in replacements):
            continue
        mixed_type = _mixed_type_for(module)
        if mixed_type is not None:
            endpoint_modules = [endpoint.get_submodule(name) for endpoint in endpoints]
            replacements[name] = mixed_type(module, endpoint_modules, state)

    if "" in replacements:
        return replacements[""].eval(), state

    unsupported = sorted(
        name
        for name, _ in base.named_parameters()
        if not any(name.startswith(prefix + ".") for prefix in replacements)
    )
    if unsupported:
        raise NotImplementedError(
            "Per-sample interpolation cannot mix these parameters because their layer type is not supported: "
            + ", ".join(unsupported)
        )

    # Shallow structural copy of every container on the way to a replaced layer, so the original forward
    # code runs unchanged while no parameter of `base` is referenced by the copy.
    mixed = _shallow_copy(base)
    _replace_children(mixed, replacements)
    return mixed.eval(), state


def _shallow_copy(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = {}
    clone._buffers = dict(module._buffers)
    hook = getattr(module, "_hf_hook", None)
    if hook is not None:
        _rebind_accelerate_hook(module, clone, hook)
    return clone


def _rebind_accelerate_hook(module: nn.Module, clone: nn.Module, hook) -> None:
    """Attach the Accelerate hook of `module` (set by `device_map`) to its shallow copy `clone`.

    Accelerate stores a forward bound to the hooked module on the instance, so a shallow copy would run the
    original module's layers. The copy gets the class forward back and its own hook around it, which moves
    inputs to the same execution device.
    """
    # Inside `try`, so that remote-code copies of this module do not list Accelerate as a requirement. A module
    # only has an `_hf_hook` when Accelerate placed it, so the import succeeds whenever this function runs.
    try:
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    except ImportError as error:
        raise ImportError("Copying a layer placed by Accelerate needs the accelerate package.") from error

    if getattr(hook, "offload", False) or not isinstance(hook, AlignDevicesHook):
        raise NotImplementedError(
            f"Per-sample interpolation cannot copy the layer {type(module).__name__} placed with "
            f"{type(hook).__name__}(offload={getattr(hook, 'offload', None)}); offloaded endpoints are not supported. "
            "Load both endpoints with a device_map that keeps every weight on a device."
        )
    for attribute in ("forward", "_old_forward", "_hf_hook"):
        clone.__dict__.pop(attribute, None)
    # A hook without offloading only moves inputs (and outputs, with io_same_device) between devices.
    add_hook_to_module(
        clone,
        AlignDevicesHook(execution_device=hook.execution_device, io_same_device=hook.io_same_device),
    )


def _replace_children(module: nn.Module, replacements: Mapping[str, nn.Module], prefix: str = "") -> None:
    for child_name, child in list(module._modules.items()):
        full_name = f"{prefix}{child_name}"
        if full_name in replacements:
            module._modules[child_name] = replacements[full_name]
        elif child is not None:
            clone = _shallow_copy(child)
            module._modules[child_name] = clone
            _replace_children(clone, replacements, prefix=f"{full_name}.")
