"""Entropy-based interpolation coefficients of DaWin.

DaWin (Oh et al., "DaWin: Training-free Dynamic Weight Interpolation for Robust Adaptation", ICLR 2025)
weights the fine-tuned endpoint of a pair by how confident it is relative to the zero-shot endpoint. For
endpoint m with logits z_m(x) and temperature T_m, the expertise is e_m(x) = exp(-H_m(x)), where H_m is the
entropy of softmax(z_m(x) / T_m). The coefficient on the fine-tuned endpoint is

    lambda(x) = e_1 / (e_0 + e_1) = sigmoid(H_0 - H_1).

With the offset adjustment used in the paper's experiments, set-level statistics of the entropies shift
the ratio towards the endpoint whose entropies vary less relative to their mean:

    b = (s_0 / m_0 + s_1 / m_1) / 2,   c = b * m_0 / (m_0 + m_1),
    lambda(x) = (e_1 + c) / (e_0 + e_1 + b),

where m_m and s_m are the mean and the standard deviation (N - 1 estimator) of H_m over the evaluation set.
Everything here is computed in float32, whatever the dtype of the logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch


__all__ = [
    "EntropyStatistics",
    "check_finite_logits",
    "check_temperatures",
    "coefficients_from_entropies",
    "compute_coefficients",
    "entropy",
    "entropy_statistics",
    "oracle_coefficients",
    "output_ensemble_probabilities",
]

# Below this mean entropy an endpoint counts as fully confident over the whole set, and its relative spread
# s_m / m_m is taken as zero instead of dividing by (almost) zero.
_MIN_MEAN_ENTROPY = 1e-8


@dataclass(frozen=True)
class EntropyStatistics:
    """Set-level entropy statistics of both endpoints, used by the offset adjustment.

    Attributes:
        zero_shot_mean (`float`): Mean entropy of the zero-shot endpoint over the set, in nats.
        zero_shot_std (`float`): Standard deviation (N - 1 estimator) of the zero-shot entropies, in nats.
        fine_tuned_mean (`float`): Mean entropy of the fine-tuned endpoint over the set, in nats.
        fine_tuned_std (`float`): Standard deviation (N - 1 estimator) of the fine-tuned entropies, in nats.
        num_samples (`int`): Number of samples the statistics were computed on.
    """

    zero_shot_mean: float
    zero_shot_std: float
    fine_tuned_mean: float
    fine_tuned_std: float
    num_samples: int

    def offset_terms(self) -> tuple[float, float]:
        """Compute the offset terms `(b, c)` of the adjusted coefficient `(e_1 + c) / (e_0 + e_1 + b)`."""
        zero_shot_spread = _relative_spread(self.zero_shot_std, self.zero_shot_mean)
        fine_tuned_spread = _relative_spread(self.fine_tuned_std, self.fine_tuned_mean)
        b = (zero_shot_spread + fine_tuned_spread) / 2.0
        mean_sum = self.zero_shot_mean + self.fine_tuned_mean
        # With both means at zero neither endpoint is favoured, so the offset splits evenly.
        c = b / 2.0 if mean_sum < _MIN_MEAN_ENTROPY else b * self.zero_shot_mean / mean_sum
        return b, c

    def to_dict(self) -> dict[str, float | int]:
        """Return the statistics as a JSON-serialisable dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, float | int]) -> EntropyStatistics:
        """Rebuild statistics saved with [`EntropyStatistics.to_dict`]."""
        expected = {"zero_shot_mean", "zero_shot_std", "fine_tuned_mean", "fine_tuned_std", "num_samples"}
        missing = sorted(expected - set(values))
        if missing:
            raise ValueError(
                f"Entropy statistics are missing the keys {missing}; received keys {sorted(values)}. "
                "Compute them with `hf_dawin.entropy_statistics` or recalibrate the model."
            )
        return cls(**{key: values[key] for key in expected})


def _relative_spread(std: float, mean: float) -> float:
    return 0.0 if mean < _MIN_MEAN_ENTROPY else std / mean


def check_finite_logits(
    logits: torch.Tensor,
    endpoint: str,
    *,
    checkpoints: str | None = None,
    consequence: str = "coefficients would be undefined",
) -> None:
    """Raise if `logits` of `endpoint` contain NaN or infinite values.

    Args:
        logits (`torch.Tensor` of shape `(batch_size, num_classes)`): Logits of one endpoint.
        endpoint (`str`): Name of the endpoint, used in the error message.
        checkpoints (`str`, *optional*): The checkpoints the message asks to check; defaults to the endpoint's
            own ("the zero-shot checkpoint").
        consequence (`str`, *optional*): What the non-finite values break, for the message.

    Raises:
        ValueError: If any value is not finite. The message names the endpoint and the affected samples.
    """
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        return
    bad_rows = (~finite).reshape(logits.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
    shown = bad_rows[:10]
    checkpoints = checkpoints or f"the {endpoint} checkpoint"
    raise ValueError(
        f"The {endpoint} endpoint produced NaN or infinite logits for {len(bad_rows)} sample(s) (batch indices "
        f"{shown}{' ...' if len(bad_rows) > len(shown) else ''}); {consequence}. Check that "
        f"{checkpoints} loaded correctly and that the inputs are finite and normalised as the image processor "
        "expects."
    )


def check_temperatures(temperatures: Sequence[float]) -> tuple[float, float]:
    """Validate a `(zero_shot, fine_tuned)` temperature pair and return it as floats.

    Raises:
        ValueError: If there are not exactly two temperatures or one is not a positive finite number.
    """
    if isinstance(temperatures, (str, bytes)) or not isinstance(temperatures, Iterable):
        raise ValueError(
            f"Expected two temperatures (zero_shot, fine_tuned), received {temperatures!r}. Pass a pair such as "
            "(1.0, 1.0), or the same value twice to scale both endpoints alike."
        )
    values = tuple(temperatures)
    if len(values) != 2:
        raise ValueError(
            f"Expected two temperatures (zero_shot, fine_tuned), received {len(values)}: {values!r}."
        )
    for name, value in zip(("zero_shot", "fine_tuned"), values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"The {name} temperature must be a positive finite number, received {value!r}. "
                "Use 1.0 for no scaling or fit one with `hf_dawin.fit_temperatures` on held-out labelled data."
            )
    return float(values[0]), float(values[1])


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Compute the entropy of softmax(logits / temperature) per sample, in float32 and in nats.

    Args:
        logits (`torch.Tensor` of shape `(batch_size, num_classes)`): Logits in the evaluation label space.
        temperature (`float`, *optional*, defaults to 1.0): Positive temperature dividing the logits.

    Returns:
        `torch.Tensor` of shape `(batch_size,)` and dtype float32.
    """
    log_probabilities = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(log_probabilities.exp() * log_probabilities).sum(dim=-1)


def entropy_statistics(zero_shot_entropy: torch.Tensor, fine_tuned_entropy: torch.Tensor) -> EntropyStatistics:
    """Compute the set-level entropy statistics of both endpoints for the offset adjustment.

    Args:
        zero_shot_entropy (`torch.Tensor` of shape `(num_samples,)`): Zero-shot entropies over the set.
        fine_tuned_entropy (`torch.Tensor` of shape `(num_samples,)`): Fine-tuned entropies over the same set.

    Returns:
        [`EntropyStatistics`] with means and N - 1 standard deviations.

    Raises:
        ValueError: If the two tensors differ in shape or hold fewer than two samples.
    """
    if zero_shot_entropy.shape != fine_tuned_entropy.shape or zero_shot_entropy.ndim != 1:
        raise ValueError(
            "Expected zero-shot and fine-tuned entropies of the same shape (num_samples,), received "
            f"{tuple(zero_shot_entropy.shape)} and {tuple(fine_tuned_entropy.shape)}."
        )
    num_samples = zero_shot_entropy.shape[0]
    if num_samples < 2:
        raise ValueError(
            f"The offset adjustment needs entropy statistics over at least 2 samples, received {num_samples}. "
            "Compute coefficients over the whole evaluation set, or calibrate the model on a larger set first."
        )
    zero_shot = zero_shot_entropy.double()
    fine_tuned = fine_tuned_entropy.double()
    return EntropyStatistics(
        zero_shot_mean=float(zero_shot.mean()),
        zero_shot_std=float(zero_shot.std(unbiased=True)),
        fine_tuned_mean=float(fine_tuned.mean()),
        fine_tuned_std=float(fine_tuned.std(unbiased=True)),
        num_samples=int(num_samples),
    )


def coefficients_from_entropies(
    zero_shot_entropy: torch.Tensor,
    fine_tuned_entropy: torch.Tensor,
    statistics: EntropyStatistics | None = None,
) -> torch.Tensor:
    """Turn per-sample entropies into interpolation coefficients on the fine-tuned endpoint.

    Args:
        zero_shot_entropy (`torch.Tensor` of shape `(batch_size,)`): Entropy H_0 of the zero-shot endpoint.
        fine_tuned_entropy (`torch.Tensor` of shape `(batch_size,)`): Entropy H_1 of the fine-tuned endpoint.
        statistics ([`EntropyStatistics`], *optional*): When given, applies the offset adjustment with these
            set-level statistics; otherwise returns sigmoid(H_0 - H_1).

    Returns:
        `torch.Tensor` of shape `(batch_size,)`, float32, values in (0, 1).
    """
    zero_shot_entropy = zero_shot_entropy.float()
    fine_tuned_entropy = fine_tuned_entropy.float()
    if statistics is None:
        return torch.sigmoid(zero_shot_entropy - fine_tuned_entropy)

    b, c = statistics.offset_terms()
    zero_shot_expertise = torch.exp(-zero_shot_entropy)
    fine_tuned_expertise = torch.exp(-fine_tuned_entropy)
    return (fine_tuned_expertise + c) / (zero_shot_expertise + fine_tuned_expertise + b)


def compute_coefficients(
    zero_shot_logits: torch.Tensor,
    fine_tuned_logits: torch.Tensor,
    *,
    temperatures: Sequence[float] = (1.0, 1.0),
    offset_adjustment: bool = False,
    statistics: EntropyStatistics | None = None,
) -> torch.Tensor:
    """Compute DaWin's per-sample coefficient on the fine-tuned endpoint from both endpoints' logits.

    Project the logits to the evaluation label space before calling this (for example the 200 ImageNet-R
    classes): the entropies, and therefore the coefficients, depend on the label space.

    Args:
        zero_shot_logits (`torch.Tensor` of shape `(batch_size, num_classes)`): Logits of the zero-shot endpoint.
        fine_tuned_logits (`torch.Tensor` of shape `(batch_size, num_classes)`): Logits of the fine-tuned endpoint.
        temperatures (`tuple[float, float]`, *optional*, defaults to `(1.0, 1.0)`): Temperatures
            `(zero_shot, fine_tuned)` dividing the logits before the softmax.
        offset_adjustment (`bool`, *optional*, defaults to `False`): Apply the offset adjustment. Without
            `statistics`, the statistics are computed over the given batch, which then counts as the whole
            evaluation set.
        statistics ([`EntropyStatistics`], *optional*): Precomputed set-level statistics for the offset
            adjustment (for example from a calibration set). Implies `offset_adjustment=True`.

    Returns:
        `torch.Tensor` of shape `(batch_size,)`, float32: lambda(x), the weight on the fine-tuned endpoint.

    Raises:
        ValueError: On mismatched shapes, non-positive temperatures, or NaN/infinite logits (naming the endpoint).

    Example:

    ```python
    >>> import torch
    >>> from hf_dawin import compute_coefficients
    >>> zero_shot_logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    >>> fine_tuned_logits = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    >>> compute_coefficients(zero_shot_logits, fine_tuned_logits)
    tensor([0.4188, 0.6464])
    ```
    """
    if zero_shot_logits.ndim != 2 or zero_shot_logits.shape != fine_tuned_logits.shape:
        raise ValueError(
            "Expected zero-shot and fine-tuned logits of the same shape (batch_size, num_classes), received "
            f"{tuple(zero_shot_logits.shape)} and {tuple(fine_tuned_logits.shape)}. Project both endpoints' "
            "logits to the same evaluation label space first."
        )
    if zero_shot_logits.shape[0] == 0:
        raise ValueError("Received logits for 0 samples; coefficients need at least one sample.")
    zero_shot_temperature, fine_tuned_temperature = check_temperatures(temperatures)
    check_finite_logits(zero_shot_logits, "zero-shot")
    check_finite_logits(fine_tuned_logits, "fine-tuned")

    zero_shot_entropy = entropy(zero_shot_logits, zero_shot_temperature)
    fine_tuned_entropy = entropy(fine_tuned_logits, fine_tuned_temperature)
    if statistics is None and offset_adjustment:
        statistics = entropy_statistics(zero_shot_entropy, fine_tuned_entropy)
    return coefficients_from_entropies(zero_shot_entropy, fine_tuned_entropy, statistics)


def output_ensemble_probabilities(
    zero_shot_logits: torch.Tensor,
    fine_tuned_logits: torch.Tensor,
    coefficients: torch.Tensor,
    temperatures: Sequence[float] = (1.0, 1.0),
) -> torch.Tensor:
    """Mix both endpoints' predicted probabilities per sample: (1 - lambda) p_0 + lambda p_1.

    This is the dynamic output ensemble baseline: it interpolates predictions instead of weights.

    Args:
        zero_shot_logits (`torch.Tensor` of shape `(batch_size, num_classes)`): Zero-shot logits.
        fine_tuned_logits (`torch.Tensor` of shape `(batch_size, num_classes)`): Fine-tuned logits.
        coefficients (`torch.Tensor` of shape `(batch_size,)`): Weights on the fine-tuned endpoint.
        temperatures (`tuple[float, float]`, *optional*, defaults to `(1.0, 1.0)`): Softmax temperatures.

    Returns:
        `torch.Tensor` of shape `(batch_size, num_classes)`, float32 probabilities.
    """
    zero_shot_temperature, fine_tuned_temperature = check_temperatures(temperatures)
    zero_shot_probabilities = torch.softmax(zero_shot_logits.float() / zero_shot_temperature, dim=-1)
    fine_tuned_probabilities = torch.softmax(fine_tuned_logits.float() / fine_tuned_temperature, dim=-1)
    weights = coefficients.float().unsqueeze(-1)
    return (1.0 - weights) * zero_shot_probabilities + weights * fine_tuned_probabilities


def oracle_coefficients(
    zero_shot_logits: torch.Tensor,
    fine_tuned_logits: torch.Tensor,
    labels: torch.Tensor,
    temperatures: Sequence[float] = (1.0, 1.0),
) -> torch.Tensor:
    """Compute the label-using oracle coefficient p_1(y|x) / (p_0(y|x) + p_1(y|x)).

    The oracle reads the true labels, so it serves analysis only and is never a deployable method. It is not an
    upper bound of every method: a static merge can classify an image correctly where this coefficient fails.

    Args:
        zero_shot_logits (`torch.Tensor` of shape `(batch_size, num_classes)`): Zero-shot logits.
        fine_tuned_logits (`torch.Tensor` of shape `(batch_size, num_classes)`): Fine-tuned logits.
        labels (`torch.LongTensor` of shape `(batch_size,)`): True class indices.
        temperatures (`tuple[float, float]`, *optional*, defaults to `(1.0, 1.0)`): Softmax temperatures.

    Returns:
        `torch.Tensor` of shape `(batch_size,)`, float32.
    """
    zero_shot_temperature, fine_tuned_temperature = check_temperatures(temperatures)
    index = labels.long().unsqueeze(-1)
    zero_shot_log_p = torch.log_softmax(zero_shot_logits.float() / zero_shot_temperature, dim=-1).gather(-1, index)
    fine_tuned_log_p = torch.log_softmax(fine_tuned_logits.float() / fine_tuned_temperature, dim=-1).gather(-1, index)
    # p_1 / (p_0 + p_1) = sigmoid(log p_1 - log p_0), stable when both probabilities underflow.
    return torch.sigmoid(fine_tuned_log_p - zero_shot_log_p).squeeze(-1)
