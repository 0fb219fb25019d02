"""Coefficient formula, offset adjustment and baselines against values worked out by hand."""

import math

import pytest
import torch

from hf_dawin import compute_coefficients, entropy, entropy_statistics, oracle_coefficients
from hf_dawin.coefficients import EntropyStatistics, coefficients_from_entropies, output_ensemble_probabilities


def test_entropy_of_uniform_and_one_hot():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1000.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(entropy(logits), torch.tensor([math.log(4), 0.0]))


def test_coefficient_by_hand():
    # Zero-shot: two classes with logits (2, 0): p = (e^2, 1) / (e^2 + 1). Fine-tuned: uniform, H_1 = log 2.
    p = math.exp(2) / (math.exp(2) + 1)
    zero_shot_entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    fine_tuned_entropy = math.log(2)
    expected = math.exp(-fine_tuned_entropy) / (math.exp(-zero_shot_entropy) + math.exp(-fine_tuned_entropy))
    coefficients = compute_coefficients(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]))
    assert coefficients.shape == (1,)
    assert coefficients.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.4188, abs=1e-4)


def test_coefficient_with_temperatures_by_hand():
    zero_shot_logits = torch.tensor([[2.0, 0.0]])
    fine_tuned_logits = torch.tensor([[3.0, 0.0]])
    temperatures = (2.0, 0.5)
    h0 = entropy(zero_shot_logits / 2.0).item()
    h1 = entropy(fine_tuned_logits / 0.5).item()
    expected = 1.0 / (1.0 + math.exp(h1 - h0))
    actual = compute_coefficients(zero_shot_logits, fine_tuned_logits, temperatures=temperatures)
    assert actual.item() == pytest.approx(expected, abs=1e-6)


def test_offset_adjustment_by_hand():
    zero_shot_entropy = torch.tensor([0.2, 0.4, 0.9])
    fine_tuned_entropy = torch.tensor([0.1, 0.7, 0.3])
    m0, m1 = 0.5, 1.1 / 3
    s0 = math.sqrt(((0.2 - m0) ** 2 + (0.4 - m0) ** 2 + (0.9 - m0) ** 2) / 2)
    s1 = math.sqrt(((0.1 - m1) ** 2 + (0.7 - m1) ** 2 + (0.3 - m1) ** 2) / 2)
    b = (s0 / m0 + s1 / m1) / 2
    c = b * m0 / (m0 + m1)
    expected = [
        (math.exp(-h1) + c) / (math.exp(-h0) + math.exp(-h1) + b)
        for h0, h1 in zip(zero_shot_entropy.tolist(), fine_tuned_entropy.tolist())
    ]
    statistics = entropy_statistics(zero_shot_entropy, fine_tuned_entropy)
    assert statistics.zero_shot_std == pytest.approx(s0)
    actual = coefficients_from_entropies(zero_shot_entropy, fine_tuned_entropy, statistics)
    assert actual.tolist() == pytest.approx(expected, abs=1e-6)


def test_offset_adjustment_from_logits_uses_batch_statistics():
    generator = torch.Generator().manual_seed(0)
    zero_shot_logits = torch.randn(8, 5, generator=generator) * 3
    fine_tuned_logits = torch.randn(8, 5, generator=generator) * 3
    statistics = entropy_statistics(entropy(zero_shot_logits), entropy(fine_tuned_logits))
    expected = coefficients_from_entropies(entropy(zero_shot_logits), entropy(fine_tuned_logits), statistics)
    actual = compute_coefficients(zero_shot_logits, fine_tuned_logits, offset_adjustment=True)
    torch.testing.assert_close(actual, expected)


def test_offset_guards_zero_mean_entropy():
    statistics = EntropyStatistics(0.0, 0.0, 0.0, 0.0, 10)
    b, c = statistics.offset_terms()
    assert (b, c) == (0.0, 0.0)
    coefficients = coefficients_from_entropies(torch.zeros(3), torch.zeros(3), statistics)
    assert torch.isfinite(coefficients).all()
    torch.testing.assert_close(coefficients, torch.full((3,), 0.5))


def test_coefficients_are_float32_from_bfloat16():
    logits = torch.randn(4, 3).to(torch.bfloat16)
    assert compute_coefficients(logits, logits.flip(0)).dtype == torch.float32


def test_oracle_and_output_ensemble_by_hand():
    zero_shot_logits = torch.tensor([[math.log(3.0), 0.0]])  # p_0 = (0.75, 0.25)
    fine_tuned_logits = torch.tensor([[0.0, 0.0]])  # p_1 = (0.5, 0.5)
    oracle = oracle_coefficients(zero_shot_logits, fine_tuned_logits, torch.tensor([1]))
    assert oracle.item() == pytest.approx(0.5 / (0.25 + 0.5))
    mixed = output_ensemble_probabilities(zero_shot_logits, fine_tuned_logits, torch.tensor([0.25]))
    torch.testing.assert_close(mixed, torch.tensor([[0.75 * 0.75 + 0.25 * 0.5, 0.75 * 0.25 + 0.25 * 0.5]]))


def test_oracle_ensemble_temperatures_by_hand():
    # Zero-shot logits (2 log 3, 0) at temperature 2 give p_0 = (0.75, 0.25); fine-tuned logits (0, log 3) at
    # temperature 0.5 give p_1 = (0.1, 0.9).
    zero_shot_logits = torch.tensor([[2 * math.log(3.0), 0.0]])
    fine_tuned_logits = torch.tensor([[0.0, math.log(3.0)]])
    temperatures = (2.0, 0.5)
    oracle = oracle_coefficients(zero_shot_logits, fine_tuned_logits, torch.tensor([1]), temperatures=temperatures)
    assert oracle.item() == pytest.approx(0.9 / (0.25 + 0.9), abs=1e-6)
    mixed = output_ensemble_probabilities(
        zero_shot_logits, fine_tuned_logits, torch.tensor([0.25]), temperatures=temperatures
    )
    torch.testing.assert_close(mixed, torch.tensor([[0.75 * 0.75 + 0.25 * 0.1, 0.75 * 0.25 + 0.25 * 0.9]]))


def test_bfloat16_entropy_in_float32():
    logits = (torch.randn(64, 10, generator=torch.Generator().manual_seed(3)) * 4).to(torch.bfloat16)
    expected = entropy(logits.float())
    actual = entropy(logits)
    assert actual.dtype == torch.float32
    # The same float32 arithmetic on the same values, not a bfloat16 softmax rounded afterwards.
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_name_endpoint(bad):
    logits = torch.zeros(3, 2)
    broken = logits.clone()
    broken[1, 0] = bad
    with pytest.raises(ValueError, match="The zero-shot endpoint produced NaN or infinite logits for 1 sample"):
        compute_coefficients(broken, logits)
    with pytest.raises(ValueError, match="The fine-tuned endpoint"):
        compute_coefficients(logits, broken)


@pytest.mark.parametrize("temperatures", [(0.0, 1.0), (1.0, -1.0), (1.0,), (float("nan"), 1.0), 2.0, "1,1"])
def test_bad_temperatures(temperatures):
    with pytest.raises(ValueError, match="temperature"):
        compute_coefficients(torch.zeros(2, 2), torch.zeros(2, 2), temperatures=temperatures)


def test_shape_mismatch_and_empty_set():
    with pytest.raises(ValueError, match="same shape"):
        compute_coefficients(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="0 samples"):
        compute_coefficients(torch.zeros(0, 3), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        compute_coefficients(torch.zeros(1, 3), torch.zeros(1, 3), offset_adjustment=True)
