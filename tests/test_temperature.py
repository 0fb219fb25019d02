"""Tests of temperature scaling and the reference temperatures."""

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from hf_dawin.temperature import (
    REFERENCE_TEMPERATURES,
    fit_temperature,
    fit_temperatures,
    reference_temperatures,
)


NUM_SAMPLES = 20_000
NUM_CLASSES = 10

# With NUM_SAMPLES held-out samples and seed 0, fitted temperatures were within 0.1% of the scale factor.
# 3% leaves room for other seeds while still separating, for example, 2.0 from 2.1.
RECOVERY_RELATIVE_TOLERANCE = 0.03

# The NLL is evaluated in float32, whose rounding (about 1e-7 relative) hides NLL differences below about
# 1e-8 near the minimum. L-BFGS can therefore stop up to a few 1e-4 (relative) away from the float64 optimum.
FLOAT32_TEMPERATURE_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def calibrated_split():
    """Logits whose softmax is the true class distribution, and labels drawn from that distribution."""
    generator = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(NUM_SAMPLES, NUM_CLASSES, generator=generator)
    labels = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
    return logits, labels


def _scipy_temperature(logits, labels):
    """Minimise the NLL over log T in float64 with scipy's bounded Brent method, independently of torch."""
    logits = logits.double().numpy()
    labels = labels.numpy()

    def negative_log_likelihood(log_temperature):
        log_probabilities = log_softmax(logits / np.exp(log_temperature), axis=1)
        return -log_probabilities[np.arange(labels.size), labels].mean()

    result = minimize_scalar(
        negative_log_likelihood, bounds=(math.log(0.01), math.log(100.0)), method="bounded", options={"xatol": 1e-6}
    )
    return math.exp(result.x), result.fun


def _float64_nll(logits, labels, temperature):
    return float(F.cross_entropy(logits.double() / temperature, labels))


# ----------------------------------------------------------------------------------------------------------
# Temperature scaling
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0, 4.0])
def test_recovers_known_scale(calibrated_split, scale):
    logits, labels = calibrated_split
    temperature = fit_temperature(scale * logits, labels)
    assert temperature == pytest.approx(scale, rel=RECOVERY_RELATIVE_TOLERANCE)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_matches_scipy_minimum(calibrated_split, scale):
    logits, labels = calibrated_split
    temperature = fit_temperature(scale * logits, labels)
    expected_temperature, expected_nll = _scipy_temperature(scale * logits, labels)
    assert temperature == pytest.approx(expected_temperature, rel=FLOAT32_TEMPERATURE_TOLERANCE)
    assert _float64_nll(scale * logits, labels, temperature) == pytest.approx(expected_nll, rel=1e-7)


@pytest.mark.parametrize("factor", [1e-4, 1e-2, 10.0, 1e3])
def test_scale_equivariant(calibrated_split, factor):
    # Starting L-BFGS at the spread of the logits keeps tiny logits from stopping at T = 1 with a near-zero
    # gradient.
    logits, labels = calibrated_split
    logits, labels = 2.0 * logits[:2000], labels[:2000]
    expected = factor * fit_temperature(logits, labels)
    assert fit_temperature(factor * logits, labels) == pytest.approx(expected, rel=FLOAT32_TEMPERATURE_TOLERANCE)


def test_returns_python_float(calibrated_split):
    logits, labels = calibrated_split
    assert type(fit_temperature(logits[:500], labels[:500])) is float


def test_numpy_and_list_inputs(calibrated_split):
    logits, labels = calibrated_split
    logits, labels = 2.0 * logits[:1000], labels[:1000]
    from_tensor = fit_temperature(logits, labels)
    assert fit_temperature(logits.numpy(), labels.numpy()) == from_tensor
    assert fit_temperature(logits.tolist(), labels.tolist()) == from_tensor


def test_float64_logits_fitted_in_float32(calibrated_split):
    logits, labels = calibrated_split
    logits, labels = 2.0 * logits[:1000], labels[:1000]
    assert fit_temperature(logits.double(), labels) == fit_temperature(logits, labels)


def test_works_under_no_grad(calibrated_split):
    logits, labels = calibrated_split
    with torch.no_grad():
        temperature = fit_temperature(2.0 * logits, labels)
    assert temperature == pytest.approx(2.0, rel=RECOVERY_RELATIVE_TOLERANCE)


def test_does_not_modify_inputs(calibrated_split):
    logits, labels = calibrated_split
    logits = logits[:200].clone().requires_grad_(True)
    original = logits.detach().clone()
    fit_temperature(logits, labels[:200])
    assert torch.equal(logits.detach(), original)
    assert logits.grad is None


def test_separable_logits_stay_finite():
    # Every sample is classified correctly, so the NLL keeps falling as T goes to 0.
    labels = torch.arange(NUM_CLASSES).repeat(20)
    logits = 5.0 * F.one_hot(labels, NUM_CLASSES).float()
    temperature = fit_temperature(logits, labels)
    assert math.isfinite(temperature)
    assert 0.0 < temperature < 1.0


def test_constant_logits_return_one(caplog):
    # Rows that are constant give the same NLL at every temperature.
    logits = torch.arange(50, dtype=torch.float32)[:, None].repeat(1, 4)
    labels = torch.arange(50) % 4
    with caplog.at_level(logging.WARNING, logger="hf_dawin.temperature"):
        assert fit_temperature(logits, labels) == 1.0
    assert "constant within every row" in caplog.text


def test_upper_bound_reached_warns(caplog):
    # The true class always has the lowest logit, so the NLL keeps falling as T grows.
    labels = torch.arange(NUM_CLASSES).repeat(20)
    logits = -5.0 * F.one_hot(labels, NUM_CLASSES).float()
    spread = math.sqrt((4.5**2 + (NUM_CLASSES - 1) * 0.5**2) / NUM_CLASSES)
    with caplog.at_level(logging.WARNING, logger="hf_dawin.temperature"):
        temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(1e3 * spread, rel=1e-5)
    assert "reached a bound" in caplog.text


def test_fit_temperatures_fits_each_endpoint(calibrated_split):
    logits, labels = calibrated_split
    zero_shot_logits, fine_tuned_logits = 0.8 * logits, 2.5 * logits
    temperatures = fit_temperatures(zero_shot_logits, fine_tuned_logits, labels)
    assert isinstance(temperatures, tuple)
    assert temperatures == (fit_temperature(zero_shot_logits, labels), fit_temperature(fine_tuned_logits, labels))
    assert temperatures[0] == pytest.approx(0.8, rel=RECOVERY_RELATIVE_TOLERANCE)
    assert temperatures[1] == pytest.approx(2.5, rel=RECOVERY_RELATIVE_TOLERANCE)


# ----------------------------------------------------------------------------------------------------------
# Invalid inputs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        pytest.param(
            torch.zeros(5),
            torch.zeros(5, dtype=torch.long),
            r"shape \(num_samples, num_classes\), but received shape \(5,\)",
            id="1-d",
        ),
        pytest.param(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "at least one sample", id="empty"),
        pytest.param(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), "at least 2 classes", id="one-class"),
        pytest.param(
            torch.tensor([[0.0, float("nan")]]), torch.tensor([0]), "received 1 NaN or infinite values", id="nan"
        ),
        pytest.param(torch.tensor([[0.0, float("inf")]]), torch.tensor([0]), "must be finite", id="inf"),
        pytest.param(
            torch.zeros(4, 3),
            torch.tensor([0, 1, 2, 3]),
            r"labels must lie in \[0, 3\).*\(min 0, max 3\)",
            id="label-too-large",
        ),
        pytest.param(
            torch.zeros(4, 3), torch.tensor([0, -1, 2, 1]), r"labels must lie in \[0, 3\)", id="label-negative"
        ),
        pytest.param(
            torch.zeros(4, 3),
            torch.tensor([0, 1, 2]),
            r"labels must have shape \(4,\).*received shape \(3,\)",
            id="length",
        ),
        pytest.param(
            torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long), r"received shape \(4, 1\)", id="2-d-labels"
        ),
    ],
)
def test_rejects_invalid_input(logits, labels, message):
    with pytest.raises(ValueError, match=message):
        fit_temperature(logits, labels)


@pytest.mark.parametrize(
    "labels",
    [
        pytest.param(torch.tensor([0.0, 1.0]), id="float-tensor"),
        pytest.param(torch.tensor([True, False]), id="bool-tensor"),
        pytest.param(np.array([0.0, 1.0]), id="float-array"),
        pytest.param(["a", "b"], id="strings"),
    ],
)
def test_rejects_non_integer_labels(labels):
    with pytest.raises(TypeError, match="labels must be"):
        fit_temperature(torch.zeros(2, 3), labels)


def test_rejects_non_numeric_logits():
    with pytest.raises(TypeError, match="logits must be a torch tensor, numpy array or nested list"):
        fit_temperature([["a", "b"]], [0])


@pytest.mark.parametrize(
    ("max_iter", "error"), [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)]
)
def test_rejects_invalid_max_iter(max_iter, error):
    with pytest.raises(error, match="max_iter must be an integer >= 1"):
        fit_temperature(torch.zeros(2, 3), torch.tensor([0, 1]), max_iter=max_iter)


def test_fit_temperatures_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"same shape .* but received \(4, 3\) and \(4, 5\)"):
        fit_temperatures(torch.zeros(4, 3), torch.zeros(4, 5), torch.tensor([0, 1, 2, 0]))


def test_fit_temperatures_names_endpoint():
    with pytest.raises(ValueError, match="fine_tuned_logits must be finite"):
        fit_temperatures(torch.zeros(2, 3), torch.full((2, 3), float("nan")), torch.tensor([0, 1]))


# ----------------------------------------------------------------------------------------------------------
# Reference temperatures
# ----------------------------------------------------------------------------------------------------------


def test_reference_table_values():
    assert REFERENCE_TEMPERATURES == {
        "openai/clip-vit-base-patch32": (0.9576, 0.9733),
        "openai/clip-vit-base-patch16": (0.96, 1.0066),
        "openai/clip-vit-large-patch14": (1.0767, 0.9545),
    }


@pytest.mark.parametrize("name", sorted(REFERENCE_TEMPERATURES))
def test_reference_lookup_by_hub_id(name):
    assert reference_temperatures(name) == REFERENCE_TEMPERATURES[name]


def test_reference_lookup_ignores_case_and_slash():
    assert reference_temperatures("OpenAI/CLIP-ViT-Large-Patch14/") == (1.0767, 0.9545)
    assert reference_temperatures(Path("openai/clip-vit-base-patch32")) == (0.9576, 0.9733)


@pytest.mark.parametrize(
    "name", ["./my-clip", "openai/clip-vit-base-patch32-finetuned", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", ""]
)
def test_reference_lookup_defaults_to_one(name):
    assert reference_temperatures(name) == (1.0, 1.0)


def test_reference_lookup_rejects_non_string():
    with pytest.raises(TypeError, match="name_or_path must be a Hub id or a path, but received int"):
        reference_temperatures(32)
