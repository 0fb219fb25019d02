"""Temperatures of the two endpoints: fixed reference values and temperature scaling.

DaWin computes each endpoint's entropy from softmax(z_m / T_m). The DaWin reference code (naver-ai/dawin on
GitHub, `dawin_rft/main_dawin.py`) fixes (T_0, T_1) for three OpenAI CLIP backbones and their fine-tuned
counterparts. Any other pair defaults to (1.0, 1.0). The temperatures of any pair can also be fitted by
temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017), which finds the
scalar T that minimises the negative log-likelihood of softmax(z / T) on a labelled held-out split.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.utils import logging


__all__ = [
    "REFERENCE_TEMPERATURES",
    "fit_temperature",
    "fit_temperatures",
    "reference_temperatures",
]

logger = logging.get_logger(__name__)

# (zero_shot, fine_tuned) temperatures that the DaWin reference code uses for OpenAI CLIP backbones. The
# reference code keys them by backbone name (ViT-B/32, ViT-B/16, ViT-L/14). Here the keys are the Hub ids.
REFERENCE_TEMPERATURES: dict[str, tuple[float, float]] = {
    "openai/clip-vit-base-patch32": (0.9576, 0.9733),
    "openai/clip-vit-base-patch16": (0.96, 1.0066),
    "openai/clip-vit-large-patch14": (1.0767, 0.9545),
}

_DEFAULT_TEMPERATURES = (1.0, 1.0)

# Range of the fitted temperature relative to the logits' spread (the root mean square of the logits after
# subtracting each row's mean). Without a lower bound, logits that classify the held-out split perfectly
# drive T towards 0 and logits / T overflows float32. Without an upper bound, logits that carry no class
# information drive T towards infinity.
_MIN_RELATIVE_TEMPERATURE = 1e-3
_MAX_RELATIVE_TEMPERATURE = 1e3


def _to_logits(logits: Any, name: str) -> torch.Tensor:
    """Convert logits to a detached float32 CPU tensor of shape `(num_samples, num_classes)` and validate it."""
    if isinstance(logits, torch.Tensor):
        if not (logits.is_floating_point() or logits.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real-valued tensor, but received dtype {logits.dtype}.")
        tensor = logits.detach().to(device="cpu", dtype=torch.float32)
    else:
        try:
            tensor = torch.as_tensor(np.asarray(logits, dtype=np.float32))
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"{name} must be a torch tensor, numpy array or nested list of numbers with shape "
                f"(num_samples, num_classes), but received {type(logits).__name__}: {error}"
            ) from error

    if tensor.ndim != 2:
        raise ValueError(
            f"{name} must have shape (num_samples, num_classes), but received shape {tuple(tensor.shape)}."
        )
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} must contain at least one sample, but received shape {tuple(tensor.shape)}.")
    if tensor.shape[1] < 2:
        raise ValueError(
            f"{name} must have at least 2 classes for a temperature to change the softmax, but received shape "
            f"{tuple(tensor.shape)}."
        )
    finite = torch.isfinite(tensor)
    if not finite.all():
        raise ValueError(
            f"{name} must be finite, but received {int((~finite).sum())} NaN or infinite values. Check the "
            "endpoint's outputs on the held-out split."
        )
    return tensor


def _to_labels(labels: Any, num_samples: int, num_classes: int) -> torch.Tensor:
    """Convert labels to an int64 CPU tensor of shape `(num_samples,)` with entries in `[0, num_classes)`."""
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, but received dtype {labels.dtype}.")
        tensor = labels.detach().to(device="cpu", dtype=torch.int64)
    else:
        array = np.asarray(labels)
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(
                f"labels must be integer class indices, but received {type(labels).__name__} of dtype {array.dtype}."
            )
        tensor = torch.as_tensor(array.astype(np.int64))

    if tensor.ndim != 1 or tensor.shape[0] != num_samples:
        raise ValueError(
            f"labels must have shape ({num_samples},) to match the logits, but received shape {tuple(tensor.shape)}."
        )
    out_of_range = (tensor < 0) | (tensor >= num_classes)
    if out_of_range.any():
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for logits with {num_classes} classes, but received "
            f"{int(out_of_range.sum())} labels outside that range (min {int(tensor.min())}, max "
            f"{int(tensor.max())}). Map the labels to the logits' label space first."
        )
    return tensor


def fit_temperature(logits: Any, labels: Any, *, max_iter: int = 100) -> float:
    """Fit the temperature T that minimises the negative log-likelihood of softmax(logits / T).

    Temperature scaling (Guo et al., ICML 2017) on a labelled held-out split. L-BFGS optimises log T in
    float32. It starts from T = s, the spread of the logits (the root mean square of each row minus its
    mean), and T is clamped to [1e-3 s, 1e3 s]. Starting from the spread instead of 1 makes the fit
    scale-equivariant: logits multiplied by c give c times the temperature, up to float32 rounding. Tiny
    logits therefore do not stop L-BFGS at T = 1 with a near-zero gradient.

    Args:
        logits (`torch.Tensor`, `np.ndarray` or nested list of shape `(num_samples, num_classes)`):
            Logits of one endpoint on the held-out split, already projected to the labels' label space.
        labels (`torch.Tensor`, `np.ndarray` or list of integers, shape `(num_samples,)`):
            Class indices in `[0, num_classes)`.
        max_iter (`int`, *optional*, defaults to 100):
            Maximum number of L-BFGS iterations.

    Returns:
        `float`: The fitted temperature. Values above 1 soften over-confident logits. For logits that are
        constant within every row, every temperature gives the same likelihood and the result is 1.0.

    Raises:
        ValueError: On empty or non-finite logits, fewer than 2 classes, mismatched shapes or labels out of range.
        TypeError: On non-numeric logits or non-integer labels.

    Example:

    ```python
    >>> import torch
    >>> from hf_dawin.temperature import fit_temperature
    >>> generator = torch.Generator().manual_seed(0)
    >>> calibrated = 3.0 * torch.randn(5000, 10, generator=generator)
    >>> labels = torch.multinomial(calibrated.softmax(dim=-1), 1, generator=generator).squeeze(1)
    >>> round(fit_temperature(3.0 * calibrated, labels), 1)
    3.0

    ```
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int):
        raise TypeError(f"max_iter must be an integer >= 1, but received {type(max_iter).__name__}: {max_iter!r}.")
    if max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, but received {max_iter}.")
    logits = _to_logits(logits, "logits")
    labels = _to_labels(labels, num_samples=logits.shape[0], num_classes=logits.shape[1])

    # Spread of the logits, in float64 so that squaring large logits cannot overflow.
    centred = logits.double() - logits.double().mean(dim=1, keepdim=True)
    spread = float(centred.square().mean().sqrt())
    if spread == 0.0:
        logger.warning(
            "The logits are constant within every row, so every temperature gives the same likelihood. "
            "Returning a temperature of 1.0."
        )
        return 1.0

    # Optimise log(T / spread), which is log T shifted by a constant, on the logits divided by the spread.
    normalised_logits = (logits.double() / spread).float()
    relative_log_temperature = torch.zeros((), dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [relative_log_temperature], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )
    log_min, log_max = math.log(_MIN_RELATIVE_TEMPERATURE), math.log(_MAX_RELATIVE_TEMPERATURE)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        # The clamp keeps logits / T finite while the line search probes extreme steps.
        temperature = relative_log_temperature.clamp(log_min, log_max).exp()
        loss = F.cross_entropy(normalised_logits / temperature, labels)
        loss.backward()
        return loss

    # The caller may run under torch.no_grad(), for example inside an evaluation loop.
    with torch.enable_grad():
        optimizer.step(closure)

    fitted = float(relative_log_temperature.detach().clamp(log_min, log_max))
    temperature = spread * math.exp(fitted)
    if fitted <= log_min or fitted >= log_max:
        logger.warning(
            "The fitted temperature %g reached a bound of [%g, %g], which is [1e-3, 1e3] times the spread of "
            "the logits. The held-out logits may classify every sample correctly with a wide margin, or carry "
            "no information about the labels. Check the held-out split and the label mapping.",
            temperature,
            spread * _MIN_RELATIVE_TEMPERATURE,
            spread * _MAX_RELATIVE_TEMPERATURE,
        )
    return temperature


def fit_temperatures(
    zero_shot_logits: Any, fine_tuned_logits: Any, labels: Any, *, max_iter: int = 100
) -> tuple[float, float]:
    """Fit the temperatures of both endpoints on the same labelled held-out split.

    Args:
        zero_shot_logits (`torch.Tensor` of shape `(num_samples, num_classes)`): Zero-shot endpoint logits.
        fine_tuned_logits (`torch.Tensor` of shape `(num_samples, num_classes)`): Fine-tuned endpoint logits.
        labels (`torch.Tensor` of shape `(num_samples,)`): Integer class indices in `[0, num_classes)`.
        max_iter (`int`, *optional*, defaults to 100): Maximum number of L-BFGS iterations per endpoint.

    Returns:
        `tuple[float, float]`: The `(zero_shot, fine_tuned)` temperatures, ready for
        `compute_coefficients(..., temperatures=...)`.

    Raises:
        ValueError: If the two logits differ in shape, or on any error of [`fit_temperature`].
    """
    zero_shot_logits = _to_logits(zero_shot_logits, "zero_shot_logits")
    fine_tuned_logits = _to_logits(fine_tuned_logits, "fine_tuned_logits")
    if zero_shot_logits.shape != fine_tuned_logits.shape:
        raise ValueError(
            "zero_shot_logits and fine_tuned_logits must have the same shape (num_samples, num_classes), but "
            f"received {tuple(zero_shot_logits.shape)} and {tuple(fine_tuned_logits.shape)}. Project both "
            "endpoints' logits to the same label space."
        )
    zero_shot_temperature = fit_temperature(zero_shot_logits, labels, max_iter=max_iter)
    fine_tuned_temperature = fit_temperature(fine_tuned_logits, labels, max_iter=max_iter)
    logger.info(
        "Fitted temperatures: zero_shot %.4f, fine_tuned %.4f.", zero_shot_temperature, fine_tuned_temperature
    )
    return zero_shot_temperature, fine_tuned_temperature


def reference_temperatures(name_or_path: str | os.PathLike) -> tuple[float, float]:
    """Look up the reference `(zero_shot, fine_tuned)` temperatures for a zero-shot endpoint.

    Args:
        name_or_path (`str` or `os.PathLike`):
            Hub id of the zero-shot endpoint. The match with the keys of `REFERENCE_TEMPERATURES` ignores case
            and a trailing slash. A local directory matches only if its path is literally such an id.

    Returns:
        `tuple[float, float]`: The reference temperatures, or `(1.0, 1.0)` for any other endpoint.

    Example:

    ```python
    >>> from hf_dawin.temperature import reference_temperatures
    >>> reference_temperatures("openai/clip-vit-base-patch16")
    (0.96, 1.0066)
    >>> reference_temperatures("./my-clip")
    (1.0, 1.0)

    ```
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"name_or_path must be a Hub id or a path, but received {type(name_or_path).__name__}: {name_or_path!r}."
        )
    name = os.fsdecode(name_or_path)
    key = name.strip().rstrip("/").lower()
    if key in REFERENCE_TEMPERATURES:
        return REFERENCE_TEMPERATURES[key]
    logger.info("No reference temperatures for %r, so both temperatures default to 1.0.", name)
    return _DEFAULT_TEMPERATURES
