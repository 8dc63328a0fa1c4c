"""Compare the figures of two runs' results.json: every attack and detector figure, to the digit.

    python scripts/compare_results.py BEFORE/results.json AFTER/results.json

What legitimately differs between two runs of the same config and seed is left out: timings
(``seconds_per_image``), the environment (versions, git revision), the config echo (output folder, names
a refactor may change) and a detector's registry ``name``. Everything else under ``attacks``,
``detectors``, ``equal_asr``, ``data``, ``checks`` and ``warnings`` must be equal, floats exactly. Prints
each difference with its JSON path; exits 1 when there is one, 0 when the figures are identical.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COMPARED = ("attacks", "detectors", "equal_asr", "data", "checks", "warnings")
IGNORED_KEYS = frozenset({"seconds_per_image", "name"})


def differences(before: Any, after: Any, path: str = "") -> list[str]:
    """Every place where ``before`` and ``after`` differ, as 'path: before != after'."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in sorted(set(before) | set(after)):
            if key in IGNORED_KEYS:
                continue
            if key not in before or key not in after:
                found.append(f"{path}/{key}: only in {'after' if key in after else 'before'}")
            else:
                found += differences(before[key], after[key], f"{path}/{key}")
        return found
    if isinstance(before, list) and isinstance(after, list):
        if len(before) != len(after):
            return [f"{path}: {len(before)} items != {len(after)} items"]
        return [
            line
            for i, (b, a) in enumerate(zip(before, after, strict=True))
            for line in differences(b, a, f"{path}[{i}]")
        ]
    return [] if before == after else [f"{path}: {before!r} != {after!r}"]


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The differences of the compared sections of two results.json contents."""
    return [line for key in COMPARED for line in differences(before.get(key), after.get(key), key)]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    before, after = (json.loads(Path(name).read_text(encoding="utf-8")) for name in argv)
    found = compare(before, after)
    for line in found:
        print(line)
    n_attacks, n_detectors = len(after.get("attacks", {})), len(after.get("detectors", {}))
    verdict = f"{len(found)} differences" if found else "identical"
    print(f"{verdict}: {n_attacks} attack cells, {n_detectors} detector cells compared")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
