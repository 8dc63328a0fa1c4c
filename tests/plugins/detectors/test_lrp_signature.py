"""LRPSignature against oracles: scikit-learn's mixtures fitted on ``lrp_signatures`` by hand, and gradcheck.

The shared contract (test_contract.py) and the AUC against ART's FGSM and DeepFool (tests/bridge/
test_art_detectors.py) run for it with the other detectors; here: that it is the I-defender recipe on LRP
signatures exactly, fitted on the signature for the true class and scored on the one for the predicted class.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture
from torch import nn

from xaiadv.plugins.detectors import IDefender, LRPSignature
from xaiadv.plugins.signatures import lrp_signatures

SETTINGS = {"n_components": 2, "covariance_type": "diag", "reg_covar": 1e-2, "random_state": 0}


@pytest.fixture(scope="module")
def fitted(digits_cnn: nn.Module, digits) -> LRPSignature:
    return LRPSignature(digits_cnn, **SETTINGS).fit(digits.x_train[:600], digits.y_train[:600])


def test_each_mixture_is_sklearns_on_the_true_class_signatures(fitted, digits_cnn, digits) -> None:
    x, y = digits.x_train[:600], digits.y_train[:600]
    kept = fitted.kept_features_.numpy()
    for label in (0, 7):
        rows = y == label
        target = torch.full((int(rows.sum()),), label)
        signatures = lrp_signatures(digits_cnn, x[rows], target).values.double().numpy()[:, kept]
        oracle = GaussianMixture(**SETTINGS).fit(signatures)
        np.testing.assert_allclose(fitted.mixtures_[label].means_, oracle.means_, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(fitted.mixtures_[label].covariances_, oracle.covariances_, rtol=1e-6)


def test_score_is_the_predicted_class_signature_under_its_mixture(fitted, digits_cnn, digits) -> None:
    x = digits.x_test[:120]
    found = lrp_signatures(digits_cnn, x)
    kept = fitted.kept_features_.numpy()
    signatures, predicted = found.values.double().numpy()[:, kept], found.target.numpy()
    expected = np.array(
        [-fitted.mixtures_[c].score_samples(signatures[i : i + 1])[0] for i, c in enumerate(predicted)]
    )
    np.testing.assert_allclose(fitted.score(x).numpy(), expected, rtol=1e-9)
    idefender = IDefender(digits_cnn, **SETTINGS).fit(digits.x_train[:600], digits.y_train[:600])
    assert not np.allclose(idefender.score(x).numpy(), expected)  # relevance, not the activations


def test_log_likelihood_column_c_takes_the_signature_for_c(fitted, digits_cnn, digits) -> None:
    x = digits.x_test[:40]
    kept = fitted.kept_features_.numpy()
    found = fitted.log_likelihood(x).numpy()
    for label in (2, 5):
        signatures = lrp_signatures(digits_cnn, x, torch.full((40,), label)).values.double().numpy()
        oracle = fitted.mixtures_[label].score_samples(signatures[:, kept])
        np.testing.assert_allclose(found[:, label], oracle, rtol=1e-9)
    assert fitted.log_likelihood(x[:0]).shape == (0, 10)


def test_score_torch_passes_gradcheck_in_float64() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.rand(60, 6, dtype=torch.float64)
    y = torch.arange(60) % 3  # labels only group the fitting samples
    detector = LRPSignature(model, n_components=1, covariance_type="diag").fit(x, y)
    probe = torch.rand(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(detector.score_torch, (probe,), eps=1e-6, atol=1e-5)


def test_refuses_a_layer_that_is_not_linear(digits_cnn) -> None:
    conv = next(name for name, module in digits_cnn.named_modules() if isinstance(module, nn.Conv2d))
    with pytest.raises(ValueError, match=rf"layer: '{conv}' is a Conv2d"):
        LRPSignature(digits_cnn, layer=conv)
    with pytest.raises(ValueError, match="epsilon"):
        LRPSignature(digits_cnn, epsilon=-1.0)
