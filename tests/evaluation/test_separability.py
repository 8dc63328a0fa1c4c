"""separability_auc: 1 for separable classes, about 0.5 for one distribution, scale-free, seeded."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from xaiadv.evaluation.separability import separability_auc


def test_separable_classes_score_one_and_one_distribution_about_a_half() -> None:
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(60, 8))
    assert separability_auc(clean, clean + 10.0) == 1.0
    same = separability_auc(clean, rng.normal(size=(60, 8)))
    assert abs(same - 0.5) < 0.15  # 0.518 here; 0.37-0.62 over data and fold seeds 0-19


def test_it_equals_the_fold_by_fold_computation_and_ignores_feature_scale() -> None:
    rng = np.random.default_rng(1)
    clean, adversarial = rng.normal(size=(40, 5)), rng.normal(0.4, 1.0, size=(30, 5))
    features = np.concatenate([clean, adversarial])
    labels = np.repeat([0, 1], [40, 30])
    per_fold = []
    for train, test in StratifiedKFold(5, shuffle=True, random_state=3).split(features, labels):
        scaler = StandardScaler().fit(features[train])
        model = LogisticRegression(max_iter=1000).fit(scaler.transform(features[train]), labels[train])
        per_fold.append(
            roc_auc_score(labels[test], model.decision_function(scaler.transform(features[test])))
        )
    expected = float(np.mean(per_fold))  # what cross_val_score(..., scoring="roc_auc") averages
    assert separability_auc(clean, adversarial, seed=3) == pytest.approx(expected, abs=1e-12)
    scaled = separability_auc(clean * 1e3, adversarial * 1e3, seed=3)
    assert scaled == pytest.approx(expected, abs=1e-9)


def test_too_few_samples_or_unequal_widths_are_named() -> None:
    with pytest.raises(ValueError, match="each class needs at least 5 samples"):
        separability_auc(np.zeros((4, 3)), np.ones((10, 3)))
    with pytest.raises(ValueError, match="equal widths; got 3 and 4"):
        separability_auc(np.zeros((10, 3)), np.ones((10, 4)))
