"""The ``xaiadv`` command line: it parses arguments, calls one typed library function, prints for people.

xaiadv demo            the built-in evaluation (evaluation/demo.toml): attack and detector studies, a report
xaiadv run CONFIG      run or resume the evaluation a TOML config describes (--executor ray)
xaiadv report RUN_DIR  re-render a run's report.md and figures from its saved results
xaiadv list            every attack, detector and study as source:Name, by kind and source (--flat)
xaiadv train           train (or load from the cache) a reference CNN and print its accuracy
xaiadv bench           seconds per iteration of IFGSM and the LRP attacks, side by side
                       (--knn-scale: kNN scoring at 60,000 and 1,000,000 references, exact vs IVF)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import math
import sys
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .data import DATASETS

if TYPE_CHECKING:
    from .run import RunResult


def positive_int(text: str) -> int:
    """An argparse type for the examples' counts: an int > 0, refused before any work otherwise."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse type for the examples' steps and budgets: a finite number > 0."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


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

    result = run_demo(samples=args.samples, dataset=args.dataset, output=args.output, progress=True)
    return _finish(result, "demo")


def _run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .run import run_evaluation

    overrides = {key: value for key, value in (("output", args.output), ("device", args.device)) if value}
    config = load_config(args.config, overrides=overrides)
    if args.executor or args.address:  # --address alone means Ray: only Ray joins a cluster
        kind = args.executor or "ray"
        address = args.address or (config.executor.address if kind == "ray" else None)
        executor = dataclasses.replace(config.executor, kind=kind, address=address)
        config = dataclasses.replace(config, executor=executor)
    return _finish(run_evaluation(config, progress=True), "run")


def _finish(result: RunResult, command: str) -> int:
    """Print the run's summary table, its warnings and the report's path; 1 when a cell failed."""
    from .report import summary_table

    data = result.results["data"]
    if data["fell_back"]:
        print(
            f"WARNING: {result.results['config']['dataset']} was not found (the log above says where and "
            f"how to get it); this run used {data['dataset']} instead.",
            file=sys.stderr,
        )
    print(f"\n{data['dataset']}: {data['n']} test images, {data['n_correct']} initially correct\n")
    print(summary_table(result.results))
    for warning in result.results.get("warnings", []):
        print(f"warning: {warning}")
    print(f"\nreport: {result.report}")
    failed = result.failed_cells
    if not failed:
        return 0
    cells = ", ".join(f"{cell['kind']} {cell['label']!r} ({cell['error']})" for cell in failed)
    plural = "s" if len(failed) > 1 else ""
    print(
        f"xaiadv {command}: {len(failed)} cell{plural} failed: {cells}; the others are saved; rerun the "
        "same command to retry them",
        file=sys.stderr,
    )
    return 1


def _report(args: argparse.Namespace) -> int:
    from .report import render_report

    print(f"report: {render_report(args.run_dir)}")
    return 0


def listing(source: str | None = None) -> dict[str, list[str]]:
    """Every attack of the four sources, every detector and study, as ``source:Name`` by kind (sorted).

    Detectors and studies come from their registries, so what a run config can name is what is listed.
    """
    from xaiadv.bridge.registry import available_attacks

    from .detector_study import detector_registry
    from .studies import study_registry

    kinds = {
        "attacks": available_attacks(source),
        "detectors": sorted(detector_registry()),
        "studies": sorted(study_registry()),
    }
    return {
        kind: [name for name in names if source is None or name.startswith(f"{source}:")]
        for kind, names in kinds.items()
    }


def grouped(names_by_kind: dict[str, list[str]], width: int = 100) -> str:
    """One heading per kind and source ("attacks from art (44):"), ours first, the names wrapped below."""
    from xaiadv.bridge.registry import SOURCES

    blocks = []
    for kind, names in names_by_kind.items():
        present = {name.partition(":")[0] for name in names}
        for source in (source for source in SOURCES if source in present):
            mine = [name for name in names if name.startswith(f"{source}:")]
            wrapped = textwrap.fill(
                "  ".join(mine), width, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False
            )
            blocks.append(f"{kind} from {source} ({len(mine)}):\n{wrapped}")
    return "\n\n".join(blocks)


def _list(args: argparse.Namespace) -> int:
    names = listing(args.source)
    text = "\n".join(itertools.chain(*names.values())) if args.flat else grouped(names)
    try:
        print(text)
    except BrokenPipeError:  # `xaiadv list | head`: the reader left, which is fine
        sys.stderr.close()
    return 0


def _train(args: argparse.Namespace) -> int:
    from .models import TrainConfig, load_or_train

    config = TrainConfig(dataset=args.dataset, epochs=args.epochs, seed=args.seed, max_train=args.max_train)
    trained = load_or_train(config, progress=True)
    print(f"{config.dataset}: test accuracy {trained.test_accuracy:.4f}\nmodel: {trained.path}")
    return 0


def _range(ratio_range: tuple[float, float] | None) -> str:
    return "" if ratio_range is None else f"{ratio_range[0]:.3g}-{ratio_range[1]:.3g}"


def _knn_scale(args: argparse.Namespace) -> int:
    from .bench import KNN_DIM, knn_scale_rows

    sizes = None if args.knn_sizes is None else tuple(args.knn_sizes)
    given = {"sizes": sizes, "ivf": args.knn_index, "nprobe": args.nprobe}
    chosen = {name: value for name, value in given.items() if value is not None}  # else its defaults
    rows = knn_scale_rows(queries=args.queries, repeats=args.repeats, **chosen)
    print(
        f"KNNScore.score (k=10, l2) of {args.queries} queries among synthetic {KNN_DIM}-d clustered "
        f"features, median of {args.repeats}, each row in a fresh process; recall@10 against the exact "
        "row of its size; CPU-s: the process's CPU time (all threads); load: 1-minute load average; peak: "
        "ru_maxrss of the row's process (data, fit, scoring), base: the same before the data\n"
    )
    header = ("references", "search", "images/s", "images/CPU-s", "load", "recall@10")
    header += ("peak MiB", "base MiB", "fit s")  # KNNScaleRow's fields in order, but its queries
    table = [dataclasses.astuple(row)[: len(header)] for row in rows]
    print(format_table(header, table))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    if args.knn_scale:
        return _knn_scale(args)

    rows = run_bench(
        batch_size=args.batch_size,
        iterations=args.iterations,
        repeats=args.repeats,
        references=args.references,
        processes=args.processes,
    )
    print(
        f"batch {args.batch_size}, {args.iterations} iterations, early stop off, median of {args.repeats} "
        f"interleaved runs; attacks: median over {args.processes} fresh processes (range: lowest-highest)\n"
    )
    print(
        format_table(
            ("library", "attack", "seconds", "unit", "ratio", "range", "ratio to"),
            [
                (r.library, r.name, r.seconds, r.unit, r.ratio, _range(r.ratio_range), r.reference)
                for r in rows
            ],
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xaiadv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="the built-in evaluation run (evaluation/demo.toml)")
    demo.add_argument("--samples", type=int, help="test images attacked (default: the config's 500)")
    demo.add_argument("--dataset", choices=DATASETS, help="default: the config's fashion_mnist")
    demo.add_argument("--output", help="run folder (default: the config's runs/demo)")
    demo.set_defaults(run=_demo)

    run = commands.add_parser("run", help="run (or resume) the evaluation a TOML config describes")
    run.add_argument("config", help="a run config, e.g. a copy of evaluation/demo.toml")
    run.add_argument("--output", help="run folder (overrides the config's output)")
    run.add_argument("--device", choices=("cpu", "cuda"), help="overrides the config's device")
    run.add_argument("--executor", choices=("local", "ray"), help="overrides [executor] kind")
    run.add_argument("--address", help="Ray cluster to join ('auto', 'host:port', 'ray://host:port')")
    run.set_defaults(run=_run)

    report = commands.add_parser("report", help="re-render report.md and the figures of a run folder")
    report.add_argument("run_dir", help="a run folder holding results.json")
    report.set_defaults(run=_report)

    names = commands.add_parser("list", help="every attack, detector and study as source:Name")
    names.add_argument("--source", choices=("xaiadv", "art", "foolbox", "torchattacks"))
    names.add_argument("--flat", action="store_true", help="one name per line, for scripts")
    names.set_defaults(run=_list)

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
    bench.add_argument(
        "--processes", type=int, default=3, help="fresh processes each library's attack group is timed in"
    )
    bench.add_argument(
        "--knn-scale",
        action="store_true",
        help="instead: kNN scoring speed, recall and memory at large reference sets (exact vs IVF)",
    )
    bench.add_argument("--knn-sizes", type=positive_int, nargs="+", help="references per row (60000 1000000)")
    bench.add_argument("--knn-index", help="the approximate faiss index factory string (IVF1024,SQ8)")
    bench.add_argument("--nprobe", type=positive_int, help="inverted lists the IVF index searches (10)")
    bench.add_argument("--queries", type=positive_int, default=1000, help="images scored per timing")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xaiadv`` console script; returns the exit status."""
    from .run import RunInterrupted

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ImportError) as error:  # ImportError: a missing extra
        print(f"xaiadv {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RunInterrupted as interrupted:
        print(f"xaiadv {args.command}: {interrupted}", file=sys.stderr)
        return 130
