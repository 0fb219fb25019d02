"""Weight interpolation: static merges of state dicts and the exact per-sample interpolated vision tower.

Static merges compute theta = theta_0 + sum_t c_t (theta_t - theta_0) once, in float32, and cast back. With
one fine-tuned endpoint and c_1 = alpha this is WiSE-FT's (1 - alpha) theta_0 + alpha theta_1.

Per-sample interpolation avoids building a model per sample. Every parameterised operation of a CLIP vision
tower (patch-embedding convolution, class and position embeddings, LayerNorm scale and shift, every Linear,
the projection and the classification head) is affine in its own parameters for a fixed input. A layer with
merged weights W_0 + sum_t c_t dW_t applied to an input h therefore equals layer(h; W_0) + sum_t c_t h dW_t^T,
so mixing each layer's outputs per sample reproduces the per-sample merged network exactly, nonlinearities
included, while the weights stay shared by the whole batch. Each Linear and the convolution run once on the
stacked weights [W_0; dW_1; ...; dW_T] (one grouped matmul) and the outputs are combined with the
per-sample coefficients. Parameters no larger than one activation row (LayerNorm scale and shift, class and
position embeddings) are mixed directly per sample, which costs as much as one activation.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = [
    "MixedConv2d",
    "MixedLayerNorm",
    "MixedLinear",
    "MixedVisionEmbeddings",
    "MixingState",
    "build_mixed_module",
    "check_compatible_state_dicts",
    "interpolate_state_dicts",
    "merge_task_vectors",
]


# ----------------------------------------------------------------------------------------------------------
# Static merges
# ----------------------------------------------------------------------------------------------------------


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

    lines = [
        f"The {reference_name} and {other_name} endpoints do not share an architecture, so their weights "
        "cannot be interpolated."
    ]
    if missing:
        lines.append(f"Missing from the {other_name} endpoint ({len(missing)}): {', '.join(missing)}")
    if extra:
        lines.append(f"Extra in the {other_name} endpoint ({len(extra)}): {', '.join(extra)}")
    if shape_differences:
        lines.append(
            f"Shape mismatches ({reference_name} vs {other_name}, {len(shape_differences)}): "
            + "; ".join(shape_differences)
        )
    if dtype_differences:
        lines.append(
            f"Dtype mismatches ({reference_name} vs {other_name}, {len(dtype_differences)}): "
            + "; ".join(dtype_differences)
        )
    lines.append(
        "Use a fine-tuned checkpoint of the same CLIP architecture as the zero-shot endpoint, loaded in the "
        "same dtype."
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
        name = "fine-tuned" if len(endpoints) == 1 else f"fine-tuned #{index}"
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
# Per-sample mixing layers
# ----------------------------------------------------------------------------------------------------------


class MixingState:
    """Per-sample coefficients shared by every mixing layer of one interpolated network.

    `weights` has shape `(batch_size, 1 + num_task_vectors)`: a leading 1 for the base output followed by the
    coefficient of each task vector.
    """

    def __init__(self, num_task_vectors: int):
        self.num_task_vectors = num_task_vectors
        self.weights: torch.Tensor | None = None

    def set_coefficients(self, coefficients: torch.Tensor) -> None:
        """Store `coefficients` of shape `(batch_size, num_task_vectors)` for the next forward pass."""
        if coefficients.ndim != 2 or coefficients.shape[1] != self.num_task_vectors:
            raise ValueError(
                f"Expected coefficients of shape (batch_size, {self.num_task_vectors}), received "
                f"{tuple(coefficients.shape)}."
            )
        ones = torch.ones_like(coefficients[:, :1])
        self.weights = torch.cat([ones, coefficients], dim=1)

    def require_weights(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        if self.weights is None:
            raise RuntimeError("Set the per-sample coefficients with `set_coefficients` before the forward pass.")
        if self.weights.shape[0] != batch_size:
            raise ValueError(
                f"The per-sample coefficients cover {self.weights.shape[0]} samples but the batch holds "
                f"{batch_size}."
            )
        return self.weights.to(dtype)


def _stack_deltas(base: torch.Tensor, endpoints: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack [base, endpoint_1 - base, ...] along a new leading dimension, computed in float32."""
    base32 = base.detach().float()
    parts = [base32] + [endpoint.detach().to(base.device).float() - base32 for endpoint in endpoints]
    return torch.stack(parts).to(base.dtype)


def _combine(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Combine stacked outputs `(batch, ..., 1 + T, features)` with `weights` `(batch, 1 + T)`."""
    if weights.shape[1] == 2:
        # One task vector: base + lambda * delta as a single fused multiply-add.
        shape = (weights.shape[0],) + (1,) * (outputs.ndim - 2)
        return torch.addcmul(outputs[..., 0, :], outputs[..., 1, :], weights[:, 1].reshape(shape))
    shape = (weights.shape[0],) + (1,) * (outputs.ndim - 3) + (1, weights.shape[1])
    return torch.matmul(weights.reshape(shape), outputs).squeeze(-2)


class MixedLinear(nn.Module):
    """A Linear layer whose output is mixed per sample over a base weight and task vectors.

    The stacked weight `[W_0; dW_1; ...; dW_T]` of shape `((1 + T) * out_features, in_features)` is applied in
    one matmul. A missing bias counts as zeros.
    """

    def __init__(self, base: nn.Linear, endpoints: Sequence[nn.Linear], state: MixingState):
        super().__init__()
        self.state = state
        self.out_features = base.out_features
        stacked = _stack_deltas(base.weight, [endpoint.weight for endpoint in endpoints])
        self.register_buffer("weight", stacked.flatten(0, 1), persistent=False)
        biases = [layer.bias for layer in [base, *endpoints]]
        if all(bias is None for bias in biases):
            self.register_buffer("bias", None, persistent=False)
        else:
            filled = [
                bias if bias is not None else torch.zeros(base.out_features, dtype=base.weight.dtype, device=base.weight.device)
                for bias in biases
            ]
            self.register_buffer("bias", _stack_deltas(filled[0], filled[1:]).flatten(0, 1), persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weights = self.state.require_weights(hidden_states.shape[0], hidden_states.dtype)
        outputs = F.linear(hidden_states, self.weight, self.bias)
        outputs = outputs.unflatten(-1, (weights.shape[1], self.out_features))
        return _combine(outputs, weights)


class MixedConv2d(nn.Module):
    """A bias-free or biased Conv2d whose output channels are mixed per sample over base and task vectors."""

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
        stacked = _stack_deltas(base.weight, [endpoint.weight for endpoint in endpoints])
        self.register_buffer("weight", stacked.flatten(0, 1), persistent=False)
        if base.bias is None and all(endpoint.bias is None for endpoint in endpoints):
            self.register_buffer("bias", None, persistent=False)
        else:
            zeros = torch.zeros(base.out_channels, dtype=base.weight.dtype, device=base.weight.device)
            biases = [layer.bias if layer.bias is not None else zeros for layer in [base, *endpoints]]
            self.register_buffer("bias", _stack_deltas(biases[0], biases[1:]).flatten(0, 1), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weights = self.state.require_weights(pixel_values.shape[0], self.weight.dtype)
        outputs = F.conv2d(pixel_values.to(self.weight.dtype), self.weight, self.bias, self.stride, self.padding, self.dilation)
        # (batch, (1 + T) * channels, height, width) -> (batch, height, width, 1 + T, channels)
        outputs = outputs.unflatten(1, (weights.shape[1], self.out_channels)).permute(0, 3, 4, 1, 2)
        return _combine(outputs, weights).permute(0, 3, 1, 2)


class MixedLayerNorm(nn.Module):
    """A LayerNorm whose scale and shift are mixed per sample; its statistics depend on the input only."""

    def __init__(self, base: nn.LayerNorm, endpoints: Sequence[nn.LayerNorm], state: MixingState):
        super().__init__()
        if not base.elementwise_affine or base.weight is None or base.bias is None:
            raise NotImplementedError("Per-sample mixing supports LayerNorm with an elementwise scale and shift only.")
        self.state = state
        self.normalized_shape = base.normalized_shape
        self.eps = base.eps
        self.register_buffer("weight", _stack_deltas(base.weight, [e.weight for e in endpoints]), persistent=False)
        self.register_buffer("bias", _stack_deltas(base.bias, [e.bias for e in endpoints]), persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weights = self.state.require_weights(hidden_states.shape[0], self.weight.dtype)
        normalized = F.layer_norm(hidden_states, self.normalized_shape, None, None, self.eps)
        # Per-sample scale and shift: (batch, hidden_size), broadcast over the sequence.
        scale = weights @ self.weight
        shift = weights @ self.bias
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 2) + (hidden_states.shape[-1],)
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
        self.register_buffer(
            "class_embedding", _stack_deltas(base.class_embedding, [e.class_embedding for e in endpoints]), persistent=False
        )
        positions = base.position_embedding(base.position_ids).squeeze(0)
        endpoint_positions = [e.position_embedding(e.position_ids).squeeze(0) for e in endpoints]
        self.register_buffer("position_embedding", _stack_deltas(positions, endpoint_positions), persistent=False)

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
        weights = self.state.require_weights(batch_size, self.class_embedding.dtype)
        patch_embeds = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        class_embeds = (weights @ self.class_embedding).unsqueeze(1)
        positions = torch.einsum("bk,kpd->bpd", weights, self.position_embedding)
        return torch.cat([class_embeds, patch_embeds], dim=1) + positions


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
        name = "fine-tuned" if len(endpoints) == 1 else f"fine-tuned #{index}"
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
    return clone


def _replace_children(module: nn.Module, replacements: Mapping[str, nn.Module], prefix: str = "") -> None:
    for child_name, child in list(module._modules.items()):
        full_name = f"{prefix}{child_name}"
        if full_name in replacements:
            module._modules[child_name] = replacements[full_name]
        elif child is not None:
            clone = _shallow_copy(child)
            module._modules[child_name] = clone
            _replace_children(clone, replacements, prefix=f"{full_name}.")
