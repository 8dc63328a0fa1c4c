"""How separable adversarial from clean samples are in a feature space: one cross-validated AUC.

Seed 001 (Figs. 4-6) shows UMAP pictures of LRP signatures of clean and adversarial images; a picture
cannot be compared across attacks or models, a number can. Per attack: the AUC of a simple classifier
(standardized features, L2-regularized logistic regression, scikit-learn) trained to tell adversarial from
clean, scored on the fold it did not see and averaged over stratified k folds (scikit-learn's
``cross_val_score(..., scoring="roc_auc")``). Computed on the signatures and on the raw hidden state beside
them, it says whether relevance adds anything to activations.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from xaiadv.plugins import checks

DEFAULT_FOLDS = 5


def separability_auc(
    clean: np.ndarray, adversarial: np.ndarray, *, seed: int = 0, folds: int = DEFAULT_FOLDS
) -> float:
    """Mean held-out-fold AUC of logistic regression telling ``adversarial`` (N1, D) from ``clean`` (N0, D).

    0.5: the feature space does not separate them; 1.0: perfectly. Deterministic for a seed (the folds are
    shuffled with it). Each class needs at least ``folds`` samples.
    """
    clean, adversarial = (np.asarray(m, dtype=np.float64).reshape(len(m), -1) for m in (clean, adversarial))
    folds = checks.positive_int("folds", folds)
    if clean.shape[1] != adversarial.shape[1]:
        raise ValueError(
            f"clean and adversarial must have equal widths; got {clean.shape[1]} and {adversarial.shape[1]}"
        )
    if min(len(clean), len(adversarial)) < max(folds, 2):
        raise ValueError(
            f"each class needs at least {max(folds, 2)} samples for {folds}-fold cross-validation; got "
            f"{len(clean)} clean and {len(adversarial)} adversarial"
        )
    features = np.concatenate([clean, adversarial])
    labels = np.repeat([0, 1], [len(clean), len(adversarial)])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=checks.natural_int("seed", seed))
    return float(cross_val_score(model, features, labels, cv=split, scoring="roc_auc").mean())
