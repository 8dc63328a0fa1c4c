"""Heatmap numbers against scipy and brute force; heatmaps against Relevance; the figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from xaiadv.evaluation.heatmaps import (
    Heatmaps,
    explanation_heatmaps,
    heatmap_numbers,
    perturbed_share,
    plot_heatmaps,
    spearman,
    top_k_overlap,
)
from xaiadv.plugins.attacks import lrp_grad
from xaiadv.plugins.relevance import Relevance

RNG = np.random.default_rng(0)


def test_spearman_equals_scipys_with_ties_and_nan_for_a_constant_row() -> None:
    a = RNG.integers(0, 4, size=(6, 2, 3, 3)).astype(float)  # many ties
    b = RNG.integers(0, 4, size=(6, 2, 3, 3)).astype(float)
    b[2] = -a[2]
    a[5] = 1.0
    found = spearman(a, b)
    for row in range(5):
        expected = spearmanr(a[row].ravel(), b[row].ravel()).statistic
        assert found[row] == pytest.approx(expected, abs=1e-12)
    assert found[2] == pytest.approx(-1.0)
    assert np.isnan(found[5])


def test_top_k_overlap_equals_brute_force_sets() -> None:
    a, b = RNG.normal(size=(8, 1, 4, 4)), RNG.normal(size=(8, 1, 4, 4))
    for k in (1, 5, 16):
        found = top_k_overlap(a, b, k)
        for row in range(8):
            flat_a, flat_b = a[row].ravel(), b[row].ravel()
            top_a = set(sorted(range(16), key=lambda i: -flat_a[i])[:k])
            top_b = set(sorted(range(16), key=lambda i: -flat_b[i])[:k])
            assert found[row] == pytest.approx(len(top_a & top_b) / k)
    assert np.all(top_k_overlap(a, b, 16) == 1.0)
    with pytest.raises(ValueError, match="k must be at most the values per sample, 16; got 17"):
        top_k_overlap(a, b, 17)


def test_perturbed_share_of_relevance_mass() -> None:
    relevance = np.array([[[1.0, -3.0, 0.0, 4.0]], [[0.0, 0.0, 0.0, 0.0]]])
    delta = np.array([[[0.0, 0.1, 0.0, 0.0]], [[0.2, 0.0, 0.0, 0.0]]])
    share, changed = perturbed_share(relevance, delta)
    assert share[0] == pytest.approx(3 / 8) and np.isnan(share[1])
    assert changed.tolist() == [0.25, 0.25]


def test_heatmaps_are_relevances_and_an_unchanged_image_scores_as_unchanged(
    digits_cnn, digits_correct
) -> None:
    x, y = digits_correct[0][:12], digits_correct[1][:12]
    result = lrp_grad(digits_cnn, x, y, eps=0.05, max_iter=20)
    with torch.no_grad():
        adversarial = digits_cnn(result.x_adv).argmax(1)
    maps = explanation_heatmaps(digits_cnn, x, result.x_adv, y, adversarial, batch_size=5)
    expected = Relevance(digits_cnn)(result.x_adv, adversarial).double().numpy()
    np.testing.assert_allclose(maps.adversarial_adversarial, expected, rtol=1e-5, atol=1e-7)
    same = heatmap_numbers(
        Heatmaps(maps.clean_original, maps.clean_adversarial, maps.clean_original, maps.clean_adversarial),
        x.numpy(),
        x.numpy(),
        k=6,
    )
    assert np.allclose(same["spearman"], 1.0) and np.all(same["top_k_overlap"] == 1.0)
    assert np.all(same["changed_share"] == 0.0) and np.all(same["perturbed_share"] == 0.0)
    moved = heatmap_numbers(maps, x.numpy(), result.x_adv.numpy(), k=6)
    assert np.all(moved["spearman"] < 1.0) and np.all(moved["changed_share"] > 0)


def test_the_figure_is_a_png_drawn_the_same_twice(tmp_path: Path) -> None:
    x = RNG.uniform(size=(2, 1, 8, 8))
    maps = Heatmaps(*(RNG.normal(size=(2, 1, 8, 8)) for _ in range(4)))
    first = plot_heatmaps(x, x, maps, ["a -> b", "c -> d"], tmp_path / "one.png").read_bytes()
    second = plot_heatmaps(x, x, maps, ["a -> b", "c -> d"], tmp_path / "two.png").read_bytes()
    assert first.startswith(b"\x89PNG\r\n\x1a\n") and first == second
    with pytest.raises(ValueError, match="the same n > 0 samples"):
        plot_heatmaps(x, x, maps, ["only one"], tmp_path / "bad.png")
