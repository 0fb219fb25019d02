"""Static merges of several fine-tuned endpoints that are not a weighted sum of task vectors: TIES-merging.

TIES-merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
arXiv:2306.01708) merges task vectors tau_t = theta_t - theta_0 in three steps: trim each task vector to its
largest-magnitude entries (over the whole model, not per tensor), elect one sign per entry as the sign of the
sum of the trimmed values (the sign with the larger total magnitude), and average only the trimmed values that
agree with the elected sign.
The merged weights are theta_0 + scale * merged_tau.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from transformers.utils import logging

from .interpolation import check_compatible_state_dicts


logger = logging.get_logger(__name__)

__all__ = ["ties_merge_state_dicts", "ties_merge_task_vectors"]


def _keep_threshold(magnitudes: torch.Tensor, density: float) -> float:
    """Return the magnitude at or above which entries are kept: the ceil(density * numel)-th largest magnitude.

    Entries that tie with it are kept too, as in the reference code of TIES-merging.
    """
    keep = max(1, math.ceil(density * magnitudes.numel()))
    if keep >= magnitudes.numel():
        return 0.0
    return float(torch.kthvalue(magnitudes, magnitudes.numel() - keep + 1).values)


def _trim(task_vectors: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """Zero the entries of each task vector `(T, ...)` whose magnitude is below that task vector's threshold."""
    limits = torch.tensor(thresholds, dtype=task_vectors.dtype, device=task_vectors.device)
    limits = limits.reshape((-1,) + (1,) * (task_vectors.ndim - 1))
    return torch.where(task_vectors.abs() >= limits, task_vectors, torch.zeros((), dtype=task_vectors.dtype))


def ties_merge_task_vectors(task_vectors: torch.Tensor, density: float) -> torch.Tensor:
    """Merge the task vectors of one tensor with TIES: trim, elect signs, then take the disjoint mean.

    Args:
        task_vectors (`torch.Tensor` of shape `(num_task_vectors, *tensor_shape)`): tau_t, float32. Each task
            vector is trimmed over this tensor alone; [`ties_merge_state_dicts`] trims over a whole state dict.
        density (`float`): Fraction of entries of each task vector kept by magnitude, in (0, 1].

    Returns:
        `torch.Tensor` of shape `tensor_shape`: the merged task vector. Entries where no trimmed value agrees
        with the elected sign (or the trimmed values sum to zero) are zero.
    """
    thresholds = [_keep_threshold(vector.abs().reshape(-1), density) for vector in task_vectors]
    return _elect_and_average(_trim(task_vectors, thresholds))


def _elect_and_average(trimmed: torch.Tensor) -> torch.Tensor:
    """Elect the sign of each entry from the trimmed task vectors `(T, ...)` and average the values that agree."""
    elected_sign = torch.sign(trimmed.sum(dim=0))
    agrees = (torch.sign(trimmed) == elected_sign) & (trimmed != 0)
    count = agrees.sum(dim=0).clamp_min(1)
    return (trimmed * agrees).sum(dim=0) / count


@torch.no_grad()
def ties_merge_state_dicts(
    base: Mapping[str, torch.Tensor],
    endpoints: Sequence[Mapping[str, torch.Tensor]],
    *,
    density: float = 0.2,
    scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Merge fine-tuned state dicts into `base` with TIES-merging, in float32, cast back to each dtype.

    Trimming keeps the top `density` fraction of each task vector's entries over all floating-point tensors of
    the state dict together, as the reference code of TIES-merging does with the flattened image encoder. A
    state dict split into parts (a vision tower and a head) therefore trims each part on its own. Non-floating-point
    tensors (integer buffers) are copied from `base` unchanged.

    NOTE: trimming is a hard threshold, so endpoints loaded in bfloat16 or float16 can keep a slightly different
    set of entries than the same endpoints in float32 (their task vectors are rounded), and TIES-merged
    predictions can move more than those of the linear merges. Load the endpoints in float32 to compare with
    published TIES numbers.

    Args:
        base (`Mapping[str, torch.Tensor]`): State dict of the pre-trained endpoint, theta_0.
        endpoints (`Sequence[Mapping[str, torch.Tensor]]`): State dicts theta_1 ... theta_T with the same keys.
        density (`float`, *optional*, defaults to 0.2): Fraction of each task vector's entries kept, in (0, 1].
        scale (`float`, *optional*, defaults to 1.0): Scale of the merged task vector.

    Returns:
        `dict[str, torch.Tensor]`: The merged state dict, new tensors on the devices of `base`.

    Raises:
        ValueError: If no endpoint is given, `density` is outside (0, 1], the state dicts do not match (missing,
            extra and mismatched keys are listed), or a merged tensor is not finite.

    Example:

    ```python
    >>> import torch
    >>> from hf_dawin.merging import ties_merge_state_dicts
    >>> base = {"w": torch.zeros(4)}
    >>> endpoints = [{"w": torch.tensor([1.0, -2.0, 0.1, 0.0])}, {"w": torch.tensor([3.0, 1.0, 0.0, -0.2])}]
    >>> ties_merge_state_dicts(base, endpoints, density=0.5)["w"]
    tensor([ 2., -2.,  0.,  0.])
    ```
    """
    if not endpoints:
        raise ValueError("TIES-merging needs at least one fine-tuned endpoint, received none.")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density is the fraction of task-vector entries kept and must lie in (0, 1], received {density!r}.")
    for index, endpoint in enumerate(endpoints):
        check_compatible_state_dicts(base, endpoint, reference_name="pre-trained", other_name=f"fine-tuned #{index + 1}")

    def task_vector(endpoint, key: str) -> torch.Tensor:
        return endpoint[key].to(base[key].device).float() - base[key].float()

    # Trim: one magnitude threshold per task vector, over every floating-point entry of the state dict.
    float_keys = [key for key, tensor in base.items() if tensor.is_floating_point()]
    thresholds = []
    for endpoint in endpoints:
        magnitudes = torch.cat([task_vector(endpoint, key).abs().reshape(-1).cpu() for key in float_keys])
        thresholds.append(_keep_threshold(magnitudes, float(density)))
        del magnitudes

    # Elect signs and average per entry, tensor by tensor.
    merged = {}
    for key, base_tensor in base.items():
        if not base_tensor.is_floating_point():
            merged[key] = base_tensor.clone()
            continue
        task_vectors = torch.stack([task_vector(endpoint, key) for endpoint in endpoints])
        result = base_tensor.float() + float(scale) * _elect_and_average(_trim(task_vectors, thresholds))
        if not bool(torch.isfinite(result).all()):
            raise ValueError(
                f"TIES-merging parameter '{key}' produced NaN or infinite values. Check that every endpoint contains "
                "finite weights for it."
            )
        merged[key] = result.to(base_tensor.dtype)
    return merged
