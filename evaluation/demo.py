"""The demo: the built-in run config (``evaluation/demo.toml``) through the comparative-evaluation harness.

Fashion-MNIST when it is installed (Debian's ``dataset-fashion-mnist``), otherwise scikit-learn's digits,
said loudly in the report and on the command line. The attacks are built through the registry, so ours
and the libraries' run on equal terms: the same model, the same fixed test sample, the same bounds.
"""

from __future__ import annotations

from typing import Any

from .config import DEMO_CONFIG, RunConfig, load_config
from .run import RunResult, run_evaluation


def demo_config(
    *, samples: int | None = None, dataset: str | None = None, output: str | None = None
) -> RunConfig:
    """The built-in config, with the CLI's overrides of the sample size, data set and output folder."""
    config = load_config(DEMO_CONFIG)
    overrides: dict[str, Any] = {}
    data = {"samples": samples, "dataset": dataset}
    if any(value is not None for value in data.values()):
        raw_data = {
            "dataset": config.dataset,
            "fallback": config.fallback,
            "samples": config.samples,
            "fit_samples": config.fit_samples,
        }
        overrides["data"] = {**raw_data, **{k: v for k, v in data.items() if v is not None}}
    if output is not None:
        overrides["output"] = output
    return load_config(DEMO_CONFIG, overrides=overrides) if overrides else config


def run_demo(
    *,
    samples: int | None = None,
    dataset: str | None = None,
    output: str | None = None,
    progress: bool = False,
) -> RunResult:
    """Run (or resume) the built-in evaluation and render its report."""
    return run_evaluation(demo_config(samples=samples, dataset=dataset, output=output), progress=progress)
