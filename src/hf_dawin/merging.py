"""Static merges of several fine-tuned endpoints that are not a weighted sum of task vectors: TIES-merging.

TIES-merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
arXiv:2306.01708) merges task vectors tau_t = theta_t - theta_0 in three steps: trim each task vector to its
largest-magnitude entries, elect one sign per entry as the sign of the sum of the trimmed values (the sign
with the larger total magnitude), and average only the trimmed values that agree with the elected sign.
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


def _trim_to_top_magnitude(task_vectors: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ceil(density * numel) largest-magnitude entries of each task vector `(T, ...)`."""
    flat = task_vectors.reshape(task_vectors.shape[0], -1)
    keep = max(1, math.ceil(density * flat.shape[1]))
    if keep >= flat.shape[1]:
        return task_vectors.clone()
    # topk keeps exactly `keep` entries per task vector, also when several magnitudes tie at the threshold.
    indices = flat.abs().topk(keep, dim=1).indices
    trimmed = torch.zeros_like(flat)
    trimmed.scatter_(1, indices, flat.gather(1, indices))
    return trimmed.reshape(task_vectors.shape)


def ties_merge_task_vectors(task_vectors: torch.Tensor, density: float) -> torch.Tensor:
    """Merge the task vectors of one tensor with TIES: trim, elect signs, then take the disjoint mean.

    Args:
        task_vectors (`torch.Tensor` of shape `(num_task_vectors, *tensor_shape)`): tau_t of one parameter,
            float32.
        density (`float`): Fraction of entries of each task vector kept by magnitude, in (0, 1].

    Returns:
        `torch.Tensor` of shape `tensor_shape`: the merged task vector. Entries where no trimmed value agrees
        with the elected sign (or the trimmed values sum to zero) are zero.
    """
    trimmed = _trim_to_top_magnitude(task_vectors, density)
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

    Trimming keeps the top `density` fraction of entries of each task vector per parameter tensor, so a
    state dict split into parts (for example a vision tower and a head) merges to the same weights as the whole.
    Non-floating-point tensors (integer buffers) are copied from `base` unchanged.

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
        check_compatible_state_dicts(base, endpoint, reference_name="pre-trained", other_name=f"fine-tuned #{index}")

    merged = {}
    for key, base_tensor in base.items():
        if not base_tensor.is_floating_point():
            merged[key] = base_tensor.clone()
            continue
        base32 = base_tensor.float()
        task_vectors = torch.stack([endpoint[key].to(base_tensor.device).float() - base32 for endpoint in endpoints])
        result = base32 + float(scale) * ties_merge_task_vectors(task_vectors, float(density))
        if not bool(torch.isfinite(result).all()):
            raise ValueError(
                f"TIES-merging parameter '{key}' produced NaN or infinite values. Check that every endpoint contains "
                "finite weights for it."
            )
        merged[key] = result.to(base_tensor.dtype)
    return merged
