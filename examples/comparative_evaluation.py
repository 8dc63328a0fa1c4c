"""A comparative evaluation from Python: the library API behind ``xaiadv run CONFIG``.

Builds a run config in code (the same fields as a TOML file, see ``evaluation/demo.toml``), runs the
attack study (ours beside ART's, Foolbox's and torchattacks' reference attacks) and the detector study,
then reads the numbers back from the results and points at the report. Rerunning with the same output
folder resumes: finished cells are reused.

    python examples/comparative_evaluation.py                      # digits, 100 images, a few seconds
    python examples/comparative_evaluation.py --dataset fashion_mnist --samples 500 --output runs/fmnist
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from xaiadv.evaluation.cli import positive_int
from xaiadv.evaluation.config import parse_config
from xaiadv.evaluation.report import summary_table
from xaiadv.evaluation.run import run_evaluation

STEP = 1 / 256  # one 8-bit level: the thesis's step


def build_config(args: argparse.Namespace) -> dict:
    """The run as a dict, exactly as tomllib would read it from a file."""
    dataset, samples, iterations, epochs = args.dataset, args.samples, args.iterations, args.epochs
    return {
        "output": args.output,
        "seed": 0,
        "data": {
            "dataset": dataset,
            "samples": samples,
            "fit_samples": args.fit_samples,
            "fallback": "digits",
        },
        "model": {"epochs": epochs, "max_train": 30_000},
        "attacks": [
            {
                "name": "xaiadv:LRPGrad",
                "label": "LRP-grad",
                "params": {"eps": 4 * STEP, "max_iter": iterations},
            },
            {
                "name": "art:BasicIterativeMethod",
                "label": "IFGSM (ART BIM)",
                "params": {"eps": 1.0, "eps_step": 4 * STEP, "max_iter": iterations, "verbose": False},
            },
            {
                "name": "foolbox:LinfPGD",
                "label": "PGD (Foolbox)",
                "params": {
                    "epsilons": 0.2,
                    "abs_stepsize": 4 * STEP,
                    "steps": iterations,
                    "random_start": False,
                },
            },
            {
                "name": "torchattacks:PGD",
                "label": "PGD (torchattacks)",
                "params": {"eps": 0.2, "alpha": 4 * STEP, "steps": iterations, "random_start": False},
            },
        ],
        "detectors": [
            {
                "name": "xaiadv:IDefenderDetector",
                "label": "I-defender ID-95",
                "params": {"keep": 0.95, "n_components": 2},
            },
            {"name": "xaiadv:KNNDetector", "label": "kNN", "params": {"k": 10}},
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="digits", choices=("digits", "fashion_mnist", "mnist"))
    parser.add_argument("--samples", type=positive_int, default=100, help="test images attacked")
    parser.add_argument(
        "--fit-samples", type=positive_int, default=2000, help="training images for detectors"
    )
    parser.add_argument("--iterations", type=positive_int, default=20, help="steps of every iterative attack")
    parser.add_argument("--epochs", type=positive_int, default=3, help="training epochs of the reference CNN")
    parser.add_argument("--output", default="runs/comparative-example")
    args = parser.parse_args(argv)

    config = parse_config(build_config(args))
    result = run_evaluation(config)

    print(summary_table(result.results))
    print(f"\nat equal ASR {result.results['equal_asr']['asr']:.3f} (thesis Table 5.1), mean L1:")
    for label, row in result.results["equal_asr"]["rows"].items():
        print(f"  {label:<20} {row['L1']:.3f}")
    print("\ndetector AUC against each attack:")
    for detector, cell in result.results["detectors"].items():
        aucs = {
            attack: row.get("auc") for attack, row in cell["rows"].items() if attack != "authentic errors"
        }
        print(f"  {detector:<18} " + ", ".join(f"{attack} {auc:.3f}" for attack, auc in aucs.items()))
    print(f"\nreport: {result.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
