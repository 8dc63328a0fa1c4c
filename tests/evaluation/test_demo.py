"""Tests of the demo: its config's overrides, and every attack and detector it names working on digits."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from xaiadv.evaluation import attack_study, detector_study
from xaiadv.evaluation.config import DEMO_CONFIG, load_config
from xaiadv.evaluation.demo import demo_config

#: Iteration budgets cut so each demo attack runs in about a second on a few digits.
SHORT = {"max_iter": 2, "steps": 2, "binary_search_steps": 1, "nb_grads": 3}
N_SAMPLES = 8


def test_demo_config_is_the_file_and_overrides_replace_only_what_is_given() -> None:
    assert demo_config() == load_config(DEMO_CONFIG)
    config = demo_config(samples=20, dataset="digits", output="elsewhere")
    assert (config.samples, config.dataset, config.output) == (20, "digits", "elsewhere")
    unchanged = load_config(DEMO_CONFIG)
    assert config.attacks == unchanged.attacks and config.detectors == unchanged.detectors
    assert config.fit_samples == unchanged.fit_samples and config.fallback == unchanged.fallback


@pytest.fixture(scope="module")
def sample(digits_cnn: nn.Module, digits: Any) -> attack_study.Sample:
    x = torch.as_tensor(digits.x_test[:N_SAMPLES])
    y = torch.as_tensor(digits.y_test[:N_SAMPLES])
    logits = attack_study.predict(digits_cnn, x, 64, torch.device("cpu"))
    return attack_study.Sample(x, y, logits.argmax(1), attack_study.softmax(logits))


@pytest.mark.parametrize("spec", load_config(DEMO_CONFIG).attacks, ids=lambda spec: spec.label)
def test_every_demo_attack_runs_with_its_own_parameters(
    spec: Any, digits_cnn: nn.Module, sample: attack_study.Sample
) -> None:
    params = {key: SHORT.get(key, value) for key, value in spec.params.items()}
    short = dataclasses.replace(spec, params=params, samples=None)
    cell, arrays = attack_study.run_attack_cell(
        short, digits_cnn, sample, batch_size=64, device=torch.device("cpu")
    )
    assert cell["status"] == "done" and cell["n"] == N_SAMPLES
    assert arrays["x_adv"].shape == tuple(sample.x.shape)
    assert arrays["x_adv"].min() >= 0.0 and arrays["x_adv"].max() <= 1.0
    assert (cell["curve"] is not None) == (
        spec.name.startswith("xaiadv:") or spec.name in attack_study.STEP_PER_FORWARD
    )


@pytest.mark.parametrize("spec", load_config(DEMO_CONFIG).detectors, ids=lambda spec: spec.label)
def test_every_demo_detector_fits_and_scores(spec: Any, digits_cnn: nn.Module, digits: Any) -> None:
    spec = dataclasses.replace(
        spec, train_samples=100, params={**spec.params, **({"epochs": 1} if spec.train_attack else {})}
    )
    detect = detector_study.fit_detector(
        spec,
        digits_cnn,
        digits.x_train[:400].numpy(),
        digits.y_train[:400].numpy(),
        batch_size=64,
        device=torch.device("cpu"),
        seed=0,
    )
    scores, flags = detect(digits.x_test[:20].numpy())
    assert scores.shape == flags.shape == (20,)
    assert np.isfinite(scores).all() and flags.dtype == bool
