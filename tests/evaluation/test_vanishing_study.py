"""The vanishing-gradient core (thesis Table 4.2, Algorithm 8, LRP-mean): a hand-made saturated model whose
zero-gradient share is known, relevance unchanged by the softmax, and IFGSM + noise equal to IFGSM where no
gradient vanishes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from xaiadv.bridge.registry import build_attack
from xaiadv.evaluation.vanishing_study import (
    SoftmaxOutput,
    softmax_pass_composite,
    zero_gradient_mask,
    zero_gradient_share,
)
from xaiadv.plugins.attacks import ifgsm_noise, lrp_grad, lrp_mean
from xaiadv.plugins.relevance import Relevance


def saturating_model() -> nn.Module:
    """Logits (200 * x0, 0, 0) on (N, 1, 1, 2) inputs: a sample with x0 = 1 has a top-2 margin of 200, so its
    float32 softmax is exactly one-hot (exp(-200) underflows); x0 = 0.01 gives a margin of 2."""
    linear = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[200.0, 0.0], [0.0, 1e-3], [0.0, -1e-3]]))
    return nn.Sequential(nn.Flatten(), linear).eval()


def saturating_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Six inputs, the first four saturating (x0 = 1), the last two not (x0 = 0.01); all of class 0."""
    x0 = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.01, 0.01])
    x = torch.stack([x0, torch.linspace(0.2, 0.8, 6)], 1).view(6, 1, 1, 2)
    return x, torch.zeros(6, dtype=torch.long), x0 == 1.0


def test_the_softmax_model_has_an_all_zero_gradient_exactly_where_its_softmax_is_one_hot() -> None:
    model, (x, y, saturated) = saturating_model(), saturating_batch()
    softmax = SoftmaxOutput(model)
    with torch.no_grad():
        probabilities = softmax(x)
    assert torch.equal(probabilities[:, 0] == 1.0, saturated)  # the oracle: exactly one-hot in float32
    assert torch.equal((probabilities[saturated, 1:] == 0).all(1), torch.ones(4, dtype=torch.bool))
    assert torch.equal(zero_gradient_mask(softmax, x, y), saturated)
    share = zero_gradient_share(softmax, x, y, batch_size=4)  # two mini-batches, one count
    assert share.to_dict() == {"n": 6, "n_zero": 4, "share": pytest.approx(4 / 6)}
    logits = SoftmaxOutput(model, softmax=False)
    # without its softmax the network still saturates: cross-entropy's own softmax is one-hot in float32
    # at these margins, so its gradient p - onehot(y) is exactly zero for the same correct samples
    assert torch.equal(zero_gradient_mask(logits, x, y), saturated)
    assert zero_gradient_share(logits, x[:0], y[:0]).share is None


def test_the_logit_scale_saturates_a_model_without_changing_its_predictions(
    digits_cnn: nn.Module, digits
) -> None:
    x, y = digits.x_test[:100], digits.y_test[:100]
    with torch.no_grad():
        plain = digits_cnn(x).argmax(1)
        scaled = SoftmaxOutput(digits_cnn, 50.0)(x).argmax(1)
    assert torch.equal(plain, scaled)
    assert not zero_gradient_mask(SoftmaxOutput(digits_cnn, 1.0), x, y).any()  # thesis MNIST: 0%
    # measured 0.52 of these 100 at scale 50: the margins over 104 / 50 saturate float32
    assert zero_gradient_share(SoftmaxOutput(digits_cnn, 50.0), x, y).share > 0.4
    assert not digits_cnn.training


def test_relevance_passes_the_softmax_unchanged(digits_cnn: nn.Module, digits) -> None:
    """With the Pass rule on the softmax, relevance of the saturated model equals the logit model's."""
    x, y = digits.x_test[:16], digits.y_test[:16]
    softmax, logits = SoftmaxOutput(digits_cnn, 50.0), SoftmaxOutput(digits_cnn, 50.0, softmax=False)
    through = Relevance(softmax, softmax_pass_composite(sample=x))(x, y)
    reference = Relevance(logits, "epsilon_plus_flat")(x, y)
    torch.testing.assert_close(through, reference, rtol=1e-5, atol=1e-7)
    assert reference.flatten(1).abs().sum(1).min() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probabilities warning: the point here
        stock = Relevance(softmax, "epsilon_plus_flat")(x, y)  # through the softmax Jacobian instead
    saturated = zero_gradient_mask(softmax, x, y)
    assert saturated.any() and (stock[saturated] == 0).all()


def test_lrp_mean_is_the_same_attack_on_the_softmax_and_the_logit_model(
    digits_cnn: nn.Module, digits
) -> None:
    x, y = digits.x_test[:24], digits.y_test[:24]
    params = {"eps": 0.05, "max_iter": 10, "early_stop": False}
    with pytest.warns(UserWarning, match="outputs probabilities"):
        on_softmax = lrp_mean(
            SoftmaxOutput(digits_cnn, 50.0), x, y, composite=softmax_pass_composite(sample=x), **params
        )
    on_logits = lrp_mean(SoftmaxOutput(digits_cnn, 50.0, softmax=False), x, y, **params)
    assert torch.equal(on_softmax.x_adv, on_logits.x_adv)
    assert torch.equal(on_softmax.success, on_logits.success) and on_logits.success.any()
    # IFGSM on the softmax model does not move the saturated samples at all
    softmax = SoftmaxOutput(digits_cnn, 50.0)
    saturated = zero_gradient_mask(softmax, x, y)
    with pytest.warns(UserWarning, match="outputs probabilities"):
        stuck = lrp_grad(softmax, x, y, n_batch=1.0, **params).x_adv
    assert saturated.any() and torch.equal(stuck[saturated], x[saturated])
    with pytest.warns(UserWarning, match="outputs probabilities"):
        noisy = ifgsm_noise(softmax, x, y, seed=0, **params).x_adv
    assert not torch.equal(noisy[saturated], x[saturated])  # Algorithm 8 moves them


def test_ifgsm_with_noise_is_ifgsm_where_no_gradient_vanishes(digits_cnn: nn.Module, digits_correct) -> None:
    """Algorithm 8 adds noise only to all-zero gradients: where there are none it is ART's BIM exactly."""
    x, y = digits_correct[0][:32], digits_correct[1][:32]
    assert not zero_gradient_mask(digits_cnn, x, y).any()
    eps, steps = 0.02, 8
    noisy = ifgsm_noise(digits_cnn, x, y, eps=eps, max_iter=steps, early_stop=False, seed=3).x_adv
    bim = build_attack(
        "art:BasicIterativeMethod", model=digits_cnn, eps=1.0, eps_step=eps, max_iter=steps, verbose=False
    )
    np.testing.assert_allclose(noisy.numpy(), bim(x, y).numpy(), rtol=0, atol=1e-6)
    assert float((noisy - x).abs().max()) > 0
