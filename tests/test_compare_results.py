"""scripts/compare_results.py: the before/after check of a refactor finds every changed figure."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_results.py"

RESULTS: dict[str, Any] = {
    "attacks": {
        "LRP-grad": {"name": "xaiadv:LRPGrad", "asr": 0.95, "seconds_per_image": 0.1, "norms": [1, 2]}
    },
    "detectors": {"kNN": {"name": "xaiadv:KNNDetector", "rows": {"LRP-grad": {"auc": 0.8125}}}},
    "data": {"n": 500},
    "environment": {"git_revision": "abc"},
}


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compare_results", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timings_names_and_the_environment_do_not_count() -> None:
    after = copy.deepcopy(RESULTS)
    after["attacks"]["LRP-grad"]["seconds_per_image"] = 9.0
    after["detectors"]["kNN"]["name"] = "xaiadv:KNNScoreDetector"
    after["environment"]["git_revision"] = "def"
    assert _script().compare(RESULTS, after) == []


def test_a_changed_figure_is_named_by_its_path(tmp_path: Path) -> None:
    after = copy.deepcopy(RESULTS)
    after["detectors"]["kNN"]["rows"]["LRP-grad"]["auc"] = 0.8125000000000001
    after["attacks"]["LRP-grad"]["norms"].append(3)
    script = _script()
    assert script.compare(RESULTS, after) == [
        "attacks/LRP-grad/norms: 2 items != 3 items",
        "detectors/kNN/rows/LRP-grad/auc: 0.8125 != 0.8125000000000001",
    ]
    paths = [tmp_path / "before.json", tmp_path / "after.json"]
    for path, content in zip(paths, (RESULTS, after), strict=True):
        path.write_text(json.dumps(content))
    assert script.main([str(p) for p in paths]) == 1
    assert script.main([str(paths[0]), str(paths[0])]) == 0
