"""gbmpcnsl.calibration: Brier score, ECE and the calibration table against sklearn, and the
calibration intercept and slope against scipy's optimiser on the likelihood."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit, logit
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from gbmpcnsl import calibration


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_brier_ece_and_calibration_table_equal_sklearn(strategy):
    rng = np.random.default_rng(3)
    y_prob = rng.beta(0.7, 0.7, 500)
    y_true = (rng.random(500) < y_prob**1.3).astype(int)
    table = calibration.calibration_table(y_true, y_prob, n_bins=8, strategy=strategy)
    prob_true, prob_pred = calibration_curve(y_true, y_prob, n_bins=8, strategy=strategy)
    np.testing.assert_allclose(table["observed"], prob_true, rtol=0, atol=1e-12)
    np.testing.assert_allclose(table["mean_predicted"], prob_pred, rtol=0, atol=1e-12)
    assert table["n"].sum() == 500

    metrics = calibration.calibration_metrics(y_true, y_prob, n_bins=8, strategy=strategy)
    assert metrics["brier"] == pytest.approx(brier_score_loss(y_true, y_prob), abs=1e-15)
    counts = table["n"].to_numpy()
    assert metrics["ece"] == pytest.approx(np.sum(counts / 500 * np.abs(prob_true - prob_pred)), abs=1e-12)


def test_calibration_intercept_and_slope_by_maximum_likelihood():
    rng = np.random.default_rng(4)
    true_logit = rng.normal(0, 1.5, 4000)
    y_true = (rng.random(4000) < expit(true_logit)).astype(int)
    overconfident = expit(2 * true_logit - 0.5)  # too extreme and shifted
    metrics = calibration.calibration_metrics(y_true, overconfident)
    x = logit(overconfident)

    def nll(params, offset_slope=None):
        a, b = (params[0], offset_slope) if offset_slope is not None else params
        eta = a + b * x
        return np.sum(np.logaddexp(0, eta) - y_true * eta)

    a_fixed = minimize(nll, [0.0], args=(1.0,), method="BFGS", options={"gtol": 1e-10}).x[0]
    a, b = minimize(nll, [0.0, 1.0], method="BFGS", options={"gtol": 1e-10}).x
    assert metrics["calibration_intercept"] == pytest.approx(a_fixed, abs=1e-5)
    assert metrics["calibration_slope"] == pytest.approx(b, abs=1e-5)
    assert metrics["calibration_slope"] == pytest.approx(0.5, abs=0.05)  # 1 / 2, the exaggeration
    well = calibration.calibration_metrics(y_true, expit(true_logit))
    assert abs(well["calibration_intercept"]) < 0.1 and well["calibration_slope"] == pytest.approx(1, abs=0.1)
    assert np.isnan(calibration.calibration_metrics([1, 1], [0.3, 0.9])["calibration_slope"])


def test_calibration_slope_is_nan_with_a_warning_under_perfect_separation():
    """Separable classes have no finite maximum-likelihood slope (the fit gave 76.5 on 120
    such cases): NaN and a warning, not an arbitrary number; the intercept stays defined."""
    rng = np.random.default_rng(0)
    y_true = np.repeat([0, 1], 60)
    separable = np.where(y_true == 1, rng.uniform(0.55, 0.99, 120), rng.uniform(0.01, 0.45, 120))
    for y_prob in (separable, 1 - separable, np.where(y_true == 1, 0.7, 0.3)):
        with pytest.warns(RuntimeWarning, match="calibration slope undefined"):
            metrics = calibration.calibration_metrics(y_true, y_prob)
        assert np.isnan(metrics["calibration_slope"]) and np.isfinite(metrics["calibration_intercept"])
    touching = separable.copy()
    touching[0] = touching[60] = 0.5  # one negative ties the lowest positive: still separated
    with pytest.warns(RuntimeWarning):
        assert np.isnan(calibration.calibration_metrics(y_true, touching)["calibration_slope"])
    overlapping = separable.copy()
    overlapping[0] = 0.9  # one negative above a positive: the slope exists
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(calibration.calibration_metrics(y_true, overlapping)["calibration_slope"])
