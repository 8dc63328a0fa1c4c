"""Thresholds with ties broken by a second score (plugins/calibration.py), and atomic writes into folders that
may be missing (plugins/storage.py): what the detectors' calibration and save rely on."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from xaiadv.plugins.calibration import flag_tie_broken, threshold_at_fpr, tie_broken_threshold_at_fpr
from xaiadv.plugins.storage import atomic_write


def lexicographic_oracle(scores: np.ndarray, tie_breaks: np.ndarray, fpr: float) -> tuple[float, float]:
    """The smallest clean pair (score, tie-break) with at most floor(fpr * n) pairs strictly above it."""
    allowed = math.floor(fpr * len(scores) + 1e-9)
    pairs = sorted(zip(scores.tolist(), tie_breaks.tolist(), strict=True))
    for pair in pairs:
        if sum(other > pair for other in pairs) <= allowed:
            return pair
    raise AssertionError("unreachable: the largest pair has none above it")


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.1, 0.3])
def test_tie_broken_threshold_equals_the_lexicographic_oracle(rng: np.random.Generator, fpr: float) -> None:
    # kNN-like scores: multiples of 1/10, a heavy pile at the largest one
    scores = np.minimum(rng.integers(0, 14, size=300), 10) / 10
    tie_breaks = rng.random(300)
    threshold, tie_threshold = tie_broken_threshold_at_fpr(scores, tie_breaks, fpr)
    assert (threshold, tie_threshold) == lexicographic_oracle(scores, tie_breaks, fpr)
    assert threshold == threshold_at_fpr(scores, fpr)  # only the tied samples are split
    rate = flag_tie_broken(scores, tie_breaks, threshold, tie_threshold).mean()
    assert fpr - 1 / 300 < rate <= fpr
    assert (scores > threshold).mean() < fpr - 1 / 300  # the score alone misses the target


def test_a_pile_at_the_largest_score_is_split_by_the_tie_break() -> None:
    """The kNN trial: 11% of clean scores exactly 1; score > 1 flags nothing, the tie-break flags 5%."""
    scores = np.r_[np.zeros(89), np.ones(11)]
    tie_breaks = np.arange(100.0)
    threshold, tie_threshold = tie_broken_threshold_at_fpr(scores, tie_breaks, 0.05)
    assert (threshold, tie_threshold) == (1.0, 94.0)
    assert not (scores > threshold).any()
    np.testing.assert_array_equal(
        flag_tie_broken(scores, tie_breaks, threshold, tie_threshold).nonzero()[0], np.arange(95, 100)
    )


def test_distinct_scores_need_no_tie_break(rng: np.random.Generator) -> None:
    scores, tie_breaks = rng.normal(size=200), rng.normal(size=200)
    threshold, tie_threshold = tie_broken_threshold_at_fpr(scores, tie_breaks, 0.05)
    assert threshold == threshold_at_fpr(scores, 0.05)
    queries = np.r_[scores, rng.normal(size=50)]
    query_breaks = np.r_[tie_breaks, rng.normal(size=50)]
    np.testing.assert_array_equal(
        flag_tie_broken(queries, query_breaks, threshold, tie_threshold), queries > threshold
    )


def test_tie_broken_threshold_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match=r"clean_tie_breaks must have one entry per score \(3\); got 2"):
        tie_broken_threshold_at_fpr(np.zeros(3), np.zeros(2), 0.05)
    with pytest.raises(ValueError, match="clean_tie_breaks contains NaN or Inf"):
        tie_broken_threshold_at_fpr(np.zeros(3), np.array([0.0, np.nan, 1.0]), 0.05)
    with pytest.raises(ValueError, match="clean_scores is empty"):
        tie_broken_threshold_at_fpr(np.zeros(0), np.zeros(0), 0.05)
    with pytest.raises(ValueError, match=r"fpr must be a number in \(0, 1\)"):
        tie_broken_threshold_at_fpr(np.zeros(3), np.zeros(3), 1.0)


def test_atomic_write_names_a_missing_folder_not_a_temp_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "deeper"
    with pytest.raises(FileNotFoundError, match=r"the folder .*missing.deeper does not exist") as raised:
        atomic_write(missing / "file.json", b"{}")
    assert ".tmp" not in str(raised.value)
    (tmp_path / "plain").write_bytes(b"a file")
    with pytest.raises(NotADirectoryError, match=r"plain is not a folder"):
        atomic_write(str(tmp_path / "plain" / "file.json"), b"{}")
    atomic_write(str(tmp_path / "file.json"), b"{}")  # a str path as well as a Path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.json", "plain"]
    assert (tmp_path / "file.json").read_bytes() == b"{}"
