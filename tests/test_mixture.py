"""Tests of the Beta mixture fitted to interpolation coefficients."""

import json
import logging

import numpy as np
import pytest
import torch
from scipy import special, stats
from sklearn.exceptions import NotFittedError

from hf_dawin.mixture import (
    DEFAULT_CLIP_EPSILON,
    MAX_CONCENTRATION,
    BetaMixture,
    _log_beta_function,
    _moment_matching_step,
    _weighted_log_joint,
)


# Known mixture: Beta(2, 20), Beta(20, 20) and Beta(20, 2) with weights 0.3, 0.4 and 0.3.
TRUE_ALPHAS = np.array([2.0, 20.0, 20.0])
TRUE_BETAS = np.array([20.0, 20.0, 2.0])
TRUE_WEIGHTS = np.array([0.3, 0.4, 0.3])
TRUE_MEANS = TRUE_ALPHAS / (TRUE_ALPHAS + TRUE_BETAS)
NUM_SAMPLES = 20_000

# Tolerances for NUM_SAMPLES draws. The sampling standard deviation of a weight is about 0.003, so 0.015 is
# about five standard deviations. Errors observed with seeds 0 to 5 were below 0.003 (means), 0.008
# (weights) and 5% (shape parameters).
MEAN_TOLERANCE = 0.005
WEIGHT_TOLERANCE = 0.015
SHAPE_RELATIVE_TOLERANCE = 0.10


@pytest.fixture(scope="module")
def known_sample():
    rng = np.random.default_rng(0)
    components = rng.choice(3, size=NUM_SAMPLES, p=TRUE_WEIGHTS)
    values = rng.beta(TRUE_ALPHAS[components], TRUE_BETAS[components])
    return values, components


@pytest.fixture(scope="module")
def fitted_known(known_sample):
    values, _ = known_sample
    return BetaMixture(n_components=3, random_state=0).fit(values)


def _scipy_log_joint(values, mixture):
    """log(w_k) + log Beta(x; alpha_k, beta_k) from scipy, shape (num_samples, n_components_)."""
    clipped = np.clip(values, mixture.clip_epsilon, 1.0 - mixture.clip_epsilon)
    return np.log(mixture.weights_)[None, :] + stats.beta.logpdf(
        clipped[:, None], mixture.alphas_[None, :], mixture.betas_[None, :]
    )


def _check_valid_fit(mixture, values):
    """Assert that a fitted mixture has usable parameters and predictions for `values`."""
    assert mixture.n_components_ >= 1
    assert mixture.n_components_ <= mixture.n_components
    assert np.isfinite(mixture.weights_).all()
    assert np.isfinite(mixture.alphas_).all()
    assert np.isfinite(mixture.betas_).all()
    assert (mixture.alphas_ > 0).all()
    assert (mixture.betas_ > 0).all()
    assert mixture.weights_.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.isfinite(mixture.log_likelihood_)

    means = mixture.component_means
    assert np.isfinite(means).all()
    assert (means >= mixture.clip_epsilon - 1e-15).all()
    assert (means <= 1.0 - mixture.clip_epsilon + 1e-15).all()

    predictions = mixture.predict(values)
    assert predictions.dtype == np.int64
    assert predictions.min() >= 0
    assert predictions.max() < mixture.n_components_
    assert np.isfinite(mixture.predict_proba(values)).all()
    assert np.isfinite(mixture.assign(values)).all()
    assert np.isfinite(mixture.score(values))


# ----------------------------------------------------------------------------------------------------------
# Recovery of a known mixture
# ----------------------------------------------------------------------------------------------------------


def test_recovers_component_means(fitted_known):
    np.testing.assert_allclose(fitted_known.component_means, TRUE_MEANS, atol=MEAN_TOLERANCE)


def test_recovers_weights(fitted_known):
    np.testing.assert_allclose(fitted_known.weights_, TRUE_WEIGHTS, atol=WEIGHT_TOLERANCE)


def test_recovers_shape_parameters(fitted_known):
    np.testing.assert_allclose(fitted_known.alphas_, TRUE_ALPHAS, rtol=SHAPE_RELATIVE_TOLERANCE)
    np.testing.assert_allclose(fitted_known.betas_, TRUE_BETAS, rtol=SHAPE_RELATIVE_TOLERANCE)


def test_fit_converges_and_sorts(fitted_known):
    assert fitted_known.converged_
    assert 1 <= fitted_known.n_iter_ <= fitted_known.max_iter
    assert fitted_known.n_components_ == 3
    assert (np.diff(fitted_known.component_means) > 0).all()


def test_predict_matches_true_components(known_sample, fitted_known):
    values, components = known_sample
    # The components overlap a little, so only about 99% of the samples have their true component as the most
    # responsible one.
    assert (fitted_known.predict(values) == components).mean() > 0.98


def test_assign_returns_component_means(known_sample, fitted_known):
    values, _ = known_sample
    expected = fitted_known.component_means[fitted_known.predict(values)]
    np.testing.assert_array_equal(fitted_known.assign(values), expected)
    assert set(np.unique(fitted_known.assign(values))) <= set(fitted_known.component_means)


def test_log_likelihood_equals_score(known_sample, fitted_known):
    values, _ = known_sample
    assert fitted_known.log_likelihood_ == pytest.approx(fitted_known.score(values), rel=1e-12)


def test_restarts_keep_best_likelihood(known_sample):
    values, _ = known_sample
    # The restart seeds come from one generator, so a single restart reuses the first of the three seeds.
    single = BetaMixture(n_restarts=1, random_state=3).fit(values)
    best = BetaMixture(n_restarts=3, random_state=3).fit(values)
    assert best.log_likelihood_ >= single.log_likelihood_


# ----------------------------------------------------------------------------------------------------------
# Densities against scipy
# ----------------------------------------------------------------------------------------------------------


def test_log_density_matches_scipy():
    values = np.array([1e-4, 0.01, 0.2, 0.5, 0.77, 0.99, 1.0 - 1e-4])
    weights = np.array([0.2, 0.3, 0.1, 0.4])
    alphas = np.array([0.5, 2.0, 20.0, 3e5])
    betas = np.array([0.7, 20.0, 2.0, 7e5])
    log_values = np.stack([np.log(values), np.log1p(-values)])

    log_joint = _weighted_log_joint(log_values, weights, alphas, betas)

    expected = np.log(weights)[:, None] + stats.beta.logpdf(values[None, :], alphas[:, None], betas[:, None])
    assert log_joint.shape == (4, values.size)
    np.testing.assert_allclose(log_joint, expected, rtol=1e-9, atol=1e-6)


def test_score_matches_scipy(known_sample, fitted_known):
    values, _ = known_sample
    expected = np.mean(np.log(np.exp(_scipy_log_joint(values, fitted_known)).sum(axis=1)))
    assert fitted_known.score(values) == pytest.approx(expected, rel=1e-10)


def test_predict_proba_matches_scipy(known_sample, fitted_known):
    values, _ = known_sample
    joint = np.exp(_scipy_log_joint(values, fitted_known))
    expected = joint / joint.sum(axis=1, keepdims=True)
    probabilities = fitted_known.predict_proba(values)
    assert probabilities.shape == (NUM_SAMPLES, 3)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(fitted_known.predict(values), expected.argmax(axis=1))


# ----------------------------------------------------------------------------------------------------------
# Moment-matching M-step
# ----------------------------------------------------------------------------------------------------------


def test_moment_matching_by_hand():
    values = np.array([0.1, 0.2, 0.3, 0.6, 0.8])
    responsibilities = np.array([[1.0, 1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 1.0, 1.0]])

    weights, alphas, betas = _moment_matching_step(values, values**2, responsibilities, DEFAULT_CLIP_EPSILON)

    for k in range(2):
        mass = responsibilities[k].sum()
        mean = (responsibilities[k] * values).sum() / mass
        variance = (responsibilities[k] * (values - mean) ** 2).sum() / mass
        concentration = mean * (1 - mean) / variance - 1
        assert weights[k] == pytest.approx(mass / 5.0)
        assert alphas[k] == pytest.approx(concentration * mean, rel=1e-10)
        assert betas[k] == pytest.approx(concentration * (1 - mean), rel=1e-10)


def test_moment_matching_caps_variance():
    # Values at both ends give a variance above mean * (1 - mean) / 4, so the concentration is capped at 3.
    values = np.array([0.01, 0.99, 0.01, 0.99])
    _, alphas, betas = _moment_matching_step(values, values**2, np.ones((1, 4)), DEFAULT_CLIP_EPSILON)
    assert alphas[0] + betas[0] == pytest.approx(3.0)
    assert alphas[0] / (alphas[0] + betas[0]) == pytest.approx(0.5)


def test_moment_matching_zero_variance():
    values = np.full(6, 0.25)
    weights, alphas, betas = _moment_matching_step(values, values**2, np.ones((1, 6)), DEFAULT_CLIP_EPSILON)
    assert weights.tolist() == [1.0]
    assert alphas[0] + betas[0] == pytest.approx(MAX_CONCENTRATION)
    assert alphas[0] / (alphas[0] + betas[0]) == pytest.approx(0.25, abs=1e-12)


def test_moment_matching_drops_empty_component(caplog):
    values = np.array([0.1, 0.2, 0.7, 0.8])
    responsibilities = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    with caplog.at_level(logging.INFO, logger="hf_dawin.mixture"):
        weights, alphas, betas = _moment_matching_step(values, values**2, responsibilities, DEFAULT_CLIP_EPSILON)
    assert weights.shape == (2,)
    np.testing.assert_allclose(weights, [0.5, 0.5])
    assert np.isfinite(alphas).all()
    assert np.isfinite(betas).all()
    np.testing.assert_allclose(alphas / (alphas + betas), [0.15, 0.75])
    assert "Dropping 1 empty Beta mixture component" in caplog.text


# ----------------------------------------------------------------------------------------------------------
# Degenerate inputs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected_means"),
    [
        pytest.param(np.full(100, 0.3), [0.3], id="all-equal"),
        pytest.param(np.zeros(50), [DEFAULT_CLIP_EPSILON], id="all-zero"),
        pytest.param(np.ones(50), [1.0 - DEFAULT_CLIP_EPSILON], id="all-one"),
        pytest.param(
            np.array([0.0, 1.0, 0.0, 1.0, 1.0]),
            [DEFAULT_CLIP_EPSILON, 1.0 - DEFAULT_CLIP_EPSILON],
            id="zeros-and-ones",
        ),
        pytest.param(np.array([0.2, 0.8, 0.2, 0.2]), [0.2, 0.8], id="two-distinct"),
        pytest.param(np.array([0.1, 0.5, 0.9] * 7), [0.1, 0.5, 0.9], id="three-distinct"),
        pytest.param(np.array([0.6]), [0.6], id="single-value"),
        pytest.param(np.array([0.0, 1e-5, 0.5]), [DEFAULT_CLIP_EPSILON, 0.5], id="equal-after-clipping"),
    ],
)
def test_few_distinct_values(values, expected_means):
    mixture = BetaMixture(n_components=3).fit(values)

    _check_valid_fit(mixture, values)
    assert mixture.n_components_ == len(expected_means)
    np.testing.assert_allclose(mixture.component_means, expected_means, rtol=1e-12, atol=1e-15)
    assert mixture.n_iter_ == 0
    assert mixture.converged_

    # Each value goes to the component on its own (clipped) value.
    clipped = np.clip(values, DEFAULT_CLIP_EPSILON, 1.0 - DEFAULT_CLIP_EPSILON)
    np.testing.assert_allclose(mixture.assign(values), clipped, rtol=1e-12, atol=1e-15)


def test_few_distinct_weights_are_frequencies():
    mixture = BetaMixture(n_components=3).fit([0.2, 0.8, 0.2, 0.2])
    np.testing.assert_allclose(mixture.weights_, [0.75, 0.25])


def test_fewer_distinct_values_logged(caplog):
    with caplog.at_level(logging.INFO, logger="hf_dawin.mixture"):
        BetaMixture(n_components=3).fit([0.4, 0.4, 0.7])
    assert "Fitting 2 Beta mixture component(s) instead of 3" in caplog.text


def test_endpoint_values_with_continuous_values():
    rng = np.random.default_rng(1)
    values = np.concatenate([np.zeros(300), np.ones(200), rng.uniform(size=500)])
    mixture = BetaMixture(n_components=3).fit(values)
    _check_valid_fit(mixture, values)
    assert mixture.n_components_ == 3


def test_more_components_than_clusters():
    rng = np.random.default_rng(2)
    values = rng.beta(2.0, 5.0, size=30)
    mixture = BetaMixture(n_components=10).fit(values)
    _check_valid_fit(mixture, values)


def test_one_more_distinct_value_than_components():
    values = np.array([0.1, 0.1, 0.5, 0.5, 0.9, 0.9, 0.95])
    mixture = BetaMixture(n_components=3).fit(values)
    _check_valid_fit(mixture, values)


def test_single_component():
    rng = np.random.default_rng(3)
    values = rng.beta(2.0, 5.0, size=5000)
    mixture = BetaMixture(n_components=1).fit(values)
    _check_valid_fit(mixture, values)
    assert mixture.component_means[0] == pytest.approx(values.mean(), abs=1e-12)
    assert mixture.weights_.tolist() == [1.0]


def test_not_converged_warns(caplog):
    values = np.random.default_rng(4).uniform(size=2000)
    with caplog.at_level(logging.WARNING, logger="hf_dawin.mixture"):
        mixture = BetaMixture(max_iter=1, tol=0.0).fit(values)
    _check_valid_fit(mixture, values)
    assert mixture.n_iter_ == 1
    assert not mixture.converged_
    assert "did not converge within max_iter=1" in caplog.text


def test_em_stops_at_first_tol_change(known_sample):
    values = known_sample[0][:5000]
    settings = dict(n_components=3, n_restarts=1, random_state=0, tol=1e-6)
    converged = BetaMixture(**settings).fit(values)
    assert converged.converged_
    stop = converged.n_iter_
    assert stop > 1

    # One iteration fewer: the change was still above tol, so EM must report that it did not converge.
    cut_short = BetaMixture(max_iter=stop - 1, **settings).fit(values)
    assert cut_short.n_iter_ == stop - 1
    assert not cut_short.converged_

    # A budget of exactly `stop` iterations reaches the same fit, and a larger budget does not go further.
    for budget in (stop, stop + 50):
        same = BetaMixture(max_iter=budget, **settings).fit(values)
        assert same.converged_
        assert same.n_iter_ == stop
        np.testing.assert_array_equal(same.alphas_, converged.alphas_)
        np.testing.assert_array_equal(same.weights_, converged.weights_)

    # A tolerance larger than any change stops after the first iteration.
    loose = BetaMixture(n_components=3, n_restarts=1, random_state=0, tol=1e6).fit(values)
    assert loose.converged_
    assert loose.n_iter_ == 1


# ----------------------------------------------------------------------------------------------------------
# Input types
# ----------------------------------------------------------------------------------------------------------


def test_tensor_list_and_array_inputs_agree(known_sample):
    values = known_sample[0][:2000]
    from_array = BetaMixture().fit(values)
    from_list = BetaMixture().fit(values.tolist())
    from_tensor = BetaMixture().fit(torch.from_numpy(values))
    np.testing.assert_array_equal(from_array.alphas_, from_list.alphas_)
    np.testing.assert_array_equal(from_array.alphas_, from_tensor.alphas_)
    np.testing.assert_array_equal(from_array.predict(values), from_tensor.predict(torch.from_numpy(values)))


def test_assign_tensor_keeps_dtype(fitted_known):
    values = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float16)
    assigned = fitted_known.assign(values)
    assert isinstance(assigned, torch.Tensor)
    assert assigned.dtype == torch.float16
    assert assigned.device == values.device
    expected = fitted_known.component_means[[0, 1, 2]]
    torch.testing.assert_close(assigned, torch.tensor(expected, dtype=torch.float16))


def test_assign_integer_tensor_gives_float32(fitted_known):
    assigned = fitted_known.assign(torch.tensor([0, 1]))
    assert assigned.dtype == torch.float32


def test_assign_array_gives_float64(fitted_known):
    assigned = fitted_known.assign(np.array([0.05, 0.95], dtype=np.float32))
    assert isinstance(assigned, np.ndarray)
    assert assigned.dtype == np.float64


# ----------------------------------------------------------------------------------------------------------
# Invalid inputs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param([], "expects at least one coefficient, but received an empty array", id="empty"),
        pytest.param(
            np.array([0.2, np.nan]), r"received 1 NaN or infinite values \(first at index 1: nan\)", id="nan"
        ),
        pytest.param([0.2, float("inf")], "received 1 NaN or infinite values", id="inf"),
        pytest.param([0.2, -0.1, 1.5], r"received 2 values outside that range \(min -0.1, max 1.5\)", id="outside"),
        pytest.param(np.zeros((2, 3)), r"with shape \(num_samples,\), but received shape \(2, 3\)", id="2-d"),
        pytest.param(torch.tensor(0.5), r"but received shape \(\)", id="0-d"),
        pytest.param(torch.empty(0), "received an empty array", id="empty-tensor"),
    ],
)
def test_fit_rejects_invalid_values(values, message):
    with pytest.raises(ValueError, match=message):
        BetaMixture().fit(values)


def test_fit_rejects_non_numeric_values():
    with pytest.raises(TypeError, match="cannot be converted to float64"):
        BetaMixture().fit(["a", "b"])


def test_predict_rejects_invalid_values(fitted_known):
    with pytest.raises(ValueError, match="outside that range"):
        fitted_known.predict([2.0])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        pytest.param({"n_components": 0}, ValueError, "n_components must be an integer >= 1, but received 0"),
        pytest.param({"n_components": -2}, ValueError, "n_components must be an integer >= 1, but received -2"),
        pytest.param({"n_components": 2.5}, TypeError, "n_components must be an integer >= 1, but received 2.5"),
        pytest.param({"n_components": True}, TypeError, "n_components must be an integer", id="bool"),
        pytest.param({"n_restarts": 0}, ValueError, "n_restarts must be an integer >= 1", id="restarts"),
        pytest.param({"max_iter": 0}, ValueError, "max_iter must be an integer >= 1", id="max-iter"),
        pytest.param({"tol": -1e-3}, ValueError, "tol must be >= 0, but received -0.001", id="tol"),
        pytest.param({"tol": float("nan")}, ValueError, "tol must be finite", id="tol-nan"),
        pytest.param(
            {"clip_epsilon": 0.0},
            ValueError,
            r"clip_epsilon must lie in \[1e-12, 0.5\), but received 0.0",
            id="eps-zero",
        ),
        pytest.param({"clip_epsilon": 0.5}, ValueError, r"clip_epsilon must lie in \[1e-12, 0.5\)", id="eps-half"),
        pytest.param({"random_state": -1}, ValueError, "random_state must be an integer >= 0", id="seed"),
    ],
)
def test_constructor_rejects_invalid_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        BetaMixture(**kwargs)


def test_numpy_integer_arguments_accepted():
    mixture = BetaMixture(n_components=np.int64(2), random_state=np.int32(5))
    assert mixture.n_components == 2
    assert mixture.random_state == 5


@pytest.mark.parametrize("method", ["predict", "predict_proba", "score", "assign"])
def test_unfitted_raises(method):
    with pytest.raises(NotFittedError, match="has no parameters yet"):
        getattr(BetaMixture(), method)([0.5])


def test_unfitted_component_means_raises():
    with pytest.raises(NotFittedError, match="has no parameters yet"):
        _ = BetaMixture().component_means


# ----------------------------------------------------------------------------------------------------------
# Serialisation and determinism
# ----------------------------------------------------------------------------------------------------------


def test_dict_round_trip(known_sample, fitted_known):
    values, _ = known_sample
    state = json.loads(json.dumps(fitted_known.to_dict()))
    restored = BetaMixture.from_dict(state)

    np.testing.assert_array_equal(restored.predict(values), fitted_known.predict(values))
    np.testing.assert_array_equal(restored.predict_proba(values), fitted_known.predict_proba(values))
    np.testing.assert_array_equal(restored.assign(values), fitted_known.assign(values))
    np.testing.assert_array_equal(restored.component_means, fitted_known.component_means)
    assert restored.score(values) == fitted_known.score(values)
    assert restored.n_iter_ == fitted_known.n_iter_
    assert restored.converged_ == fitted_known.converged_
    assert restored.log_likelihood_ == fitted_known.log_likelihood_
    assert repr(restored) == repr(fitted_known)


def test_dict_round_trip_degenerate():
    mixture = BetaMixture().fit([0.0, 1.0, 1.0])
    restored = BetaMixture.from_dict(json.loads(json.dumps(mixture.to_dict())))
    np.testing.assert_array_equal(restored.component_means, mixture.component_means)
    assert restored.n_components_ == 2


def test_dict_round_trip_unfitted():
    mixture = BetaMixture(n_components=5, clip_epsilon=1e-3, random_state=None)
    state = mixture.to_dict()
    assert "weights" not in state
    restored = BetaMixture.from_dict(state)
    assert not restored.is_fitted
    assert restored.to_dict() == state


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"colour": "red"}, r"unknown keys \['colour'\]", id="unknown-key"),
        pytest.param({"weights": None}, "expects weights as a list of 1 to n_components=3 numbers", id="none-weights"),
        pytest.param({"alphas": [1.0, -2.0, 3.0]}, "expects positive alphas and betas", id="negative-alpha"),
        pytest.param({"weights": [0.5, 0.5, 0.5]}, "non-negative weights summing to 1", id="weights-sum"),
        pytest.param({"betas": [1.0, 2.0]}, "equal length, but received lengths 3, 3 and 2", id="length"),
        pytest.param({"betas": [1.0, float("nan"), 2.0]}, "expects finite betas", id="nan-beta"),
        pytest.param(
            {"alphas": [1.0] * 4, "betas": [1.0] * 4, "weights": [0.25] * 4}, "1 to n_components=3", id="too-many"
        ),
        pytest.param({"n_components": 0}, "n_components must be an integer >= 1", id="bad-hyperparameter"),
    ],
)
def test_from_dict_rejects_invalid_state(fitted_known, change, message):
    state = fitted_known.to_dict()
    state.update(change)
    with pytest.raises(ValueError, match=message):
        BetaMixture.from_dict(state)


def test_from_dict_rejects_partial_fitted_state(fitted_known):
    state = fitted_known.to_dict()
    del state["betas"]
    with pytest.raises(ValueError, match=r"is missing \['betas'\]"):
        BetaMixture.from_dict(state)


def test_from_dict_rejects_non_mapping():
    with pytest.raises(TypeError, match="expects a mapping, but received list"):
        BetaMixture.from_dict([1, 2])


def test_fixed_random_state_is_deterministic():
    values = np.random.default_rng(5).uniform(size=3000)
    first = BetaMixture(random_state=7).fit(values)
    second = BetaMixture(random_state=7).fit(values)
    np.testing.assert_array_equal(first.weights_, second.weights_)
    np.testing.assert_array_equal(first.alphas_, second.alphas_)
    np.testing.assert_array_equal(first.betas_, second.betas_)
    assert first.n_iter_ == second.n_iter_
    assert first.log_likelihood_ == second.log_likelihood_


def test_log_beta_function_matches_scipy():
    # Concentrations from 3 (the variance cap) to MAX_CONCENTRATION, means across (0, 1).
    concentrations, means = np.meshgrid(np.geomspace(3.0, MAX_CONCENTRATION, 60), np.linspace(1e-4, 1 - 1e-4, 61))
    alphas = (concentrations * means).ravel()
    betas = (concentrations * (1.0 - means)).ravel()

    np.testing.assert_allclose(_log_beta_function(alphas, betas), special.betaln(alphas, betas), rtol=0, atol=1e-8)
