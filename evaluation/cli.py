"""The ``xaiadv`` command line: it parses arguments, calls one typed library function, prints for people.

xaiadv demo    the LRP attacks beside IFGSM on the reference model (Fashion-MNIST, else digits)
xaiadv list    every attack of the four sources, one per line as source:Name
xaiadv train   train (or load from the cache) a reference CNN and print its accuracy
xaiadv bench   seconds per iteration of IFGSM and the LRP attacks, side by side
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence

import numpy as np

from .data import DATASETS


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats with 4 significant digits, NaN as 'n/a'."""

    def cell(value: object) -> str:
        if isinstance(value, (float, np.floating)):
            return "n/a" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.samples, dataset=args.dataset, progress=True)
    if result.fell_back:
        print(
            f"WARNING: {args.dataset} was not found (see the log above for where and how to get it); "
            "this demo ran on scikit-learn's digits instead.",
            file=sys.stderr,
        )
    print(
        f"\n{result.dataset}: reference CNN test accuracy {result.test_accuracy:.4f}; "
        f"{result.n_samples} test images, {result.rows[0].n_correct} initially correct; "
        "norms are medians over successful samples, in [0, 1] pixel units.\n"
    )
    header = ("attack", "registry name", "ASR", "n success", "L0", "L1", "L2", "Linf", "s/image")
    print(
        format_table(
            header,
            [
                (
                    row.label,
                    row.name,
                    row.asr,
                    row.n_success,
                    row.median_l0,
                    row.median_l1,
                    row.median_l2,
                    row.median_linf,
                    row.seconds_per_image,
                )
                for row in result.rows
            ],
        )
    )
    print(f"\ntotal {result.seconds:.1f} s")
    return 0


def _list(args: argparse.Namespace) -> int:
    from xaiadv.bridge.registry import available_attacks

    try:
        print("\n".join(available_attacks(args.source)))
    except BrokenPipeError:  # `xaiadv list | head`: the reader left, which is fine
        sys.stderr.close()
    return 0


def _train(args: argparse.Namespace) -> int:
    from .models import TrainConfig, load_or_train

    config = TrainConfig(dataset=args.dataset, epochs=args.epochs, seed=args.seed, max_train=args.max_train)
    trained = load_or_train(config, progress=True)
    print(f"{config.dataset}: test accuracy {trained.test_accuracy:.4f}\nmodel: {trained.path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    rows = run_bench(
        batch_size=args.batch_size,
        iterations=args.iterations,
        repeats=args.repeats,
        references=args.references,
    )
    print(
        f"batch {args.batch_size}, {args.iterations} iterations, early stop off, "
        f"median of {args.repeats} interleaved runs\n"
    )
    print(
        format_table(
            ("library", "attack", "seconds", "unit", "ratio", "ratio to"),
            [(r.library, r.name, r.seconds, r.unit, r.ratio, r.reference) for r in rows],
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xaiadv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="LRP attacks beside IFGSM on the reference model")
    demo.add_argument("--samples", type=int, default=200, help="test images attacked (default 200)")
    demo.add_argument("--dataset", choices=DATASETS, default="fashion_mnist")
    demo.set_defaults(run=_demo)

    listing = commands.add_parser("list", help="every attack as source:Name")
    listing.add_argument("--source", choices=("xaiadv", "art", "foolbox", "torchattacks"))
    listing.set_defaults(run=_list)

    train = commands.add_parser("train", help="train or load a reference CNN")
    train.add_argument("--dataset", choices=DATASETS, default="fashion_mnist")
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max-train", type=int, default=None, help="train on a seeded subset of this size")
    train.set_defaults(run=_train)

    bench = commands.add_parser("bench", help="seconds per iteration, side by side")
    bench.add_argument("--batch-size", type=int, default=128)
    bench.add_argument("--iterations", type=int, default=10)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--references", type=int, default=60_000, help="images the detectors are fitted on")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xaiadv`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"xaiadv {args.command}: error: {error}", file=sys.stderr)
        return 2
