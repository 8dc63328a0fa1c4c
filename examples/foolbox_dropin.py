"""xaiadv's LRPGrad as a drop-in Foolbox attack, beside Foolbox's own L1 and Linf attacks.

A reference CNN is trained and wrapped in ``foolbox.PyTorchModel``. xaiadv's ``LRPGrad`` is a Foolbox
``MinimizationAttack``: it is called exactly as Foolbox's attacks are, ``attack(fmodel, x, y, epsilons=...)``,
runs once, and Foolbox clips its one adversarial per sample to every epsilon, in L1 by default (the thesis's
measure) or in the distance it is built with. The script prints, per norm, each attack's success rate per
epsilon and the robust accuracy under the worst of them, as Foolbox's own examples do:

- L1: xaiadv ``LRPGrad`` beside Foolbox's ``SparseL1DescentAttack`` (Tramer & Boneh 2019);
- Linf: xaiadv ``LRPGrad(distance="linf")`` beside Foolbox's ``LinfPGD``.

Foolbox's attacks run with their defaults. Run it from the repository root (digits takes seconds):

    python examples/foolbox_dropin.py
    python examples/foolbox_dropin.py --dataset fashion_mnist --samples 500 --train-samples 10000
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator, Sequence

import foolbox as fb
import torch

from xaiadv.bridge.foolbox import LRPGrad
from xaiadv.evaluation.cli import format_table, positive_float, positive_int
from xaiadv.evaluation.data import load_dataset, training_subset
from xaiadv.evaluation.models import TrainConfig, train_reference_model

#: Default epsilons per data set, in [0, 1] pixel units: L1 grows with the number of pixels (64 for digits,
#: 784 for Fashion-MNIST); Linf does not.
L1_EPSILONS = {"digits": [1.0, 2.0, 4.0, 8.0, 16.0], "fashion_mnist": [5.0, 10.0, 20.0, 40.0, 80.0]}
LINF_EPSILONS = [0.02, 0.05, 0.1, 0.2]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("digits", "fashion_mnist"), default="digits")
    parser.add_argument("--samples", type=positive_int, default=200, help="test images attacked (first N)")
    parser.add_argument(
        "--train-samples",
        type=positive_int,
        default=5000,
        help="seeded subset of training images for the CNN",
    )
    parser.add_argument("--epochs", type=positive_int, default=5, help="training epochs of the CNN")
    parser.add_argument("--eps", type=positive_float, default=0.01, help="LRP-grad step per iteration")
    parser.add_argument("--max-iter", type=positive_int, default=50, help="LRP-grad iterations")
    parser.add_argument(
        "--l1-epsilons", type=positive_float, nargs="+", help="L1 budgets (default: per data set)"
    )
    parser.add_argument("--linf-epsilons", type=positive_float, nargs="+", default=LINF_EPSILONS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.l1_epsilons is None:
        args.l1_epsilons = L1_EPSILONS[args.dataset]
    return args


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG (LinfPGD's random start draws from it) and restore it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def success_table(
    fmodel: fb.PyTorchModel,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: dict[str, fb.Attack],
    epsilons: list[float],
) -> list[tuple[object, ...]]:
    """Rows (attack, success rate per epsilon..., seconds) and a last row: robust accuracy, worst case.

    Success is Foolbox's: the clipped adversarial is misclassified (samples misclassified from the start
    count as successes at every epsilon, as in Foolbox).
    """
    rows, any_success = [], torch.zeros(len(epsilons), len(x), dtype=torch.bool)
    for name, attack in attacks.items():
        start = time.perf_counter()
        _, _, success = attack(fmodel, x, fb.criteria.Misclassification(y), epsilons=epsilons)
        seconds = time.perf_counter() - start
        any_success |= success.cpu()
        rows.append((name, *success.float().mean(1).tolist(), seconds))
    rows.append(("robust accuracy (worst case)", *(1 - any_success.float().mean(1)).tolist(), float("nan")))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data = training_subset(load_dataset(args.dataset), args.train_samples, args.seed)
    with seeded(args.seed):
        trained = train_reference_model(
            data, TrainConfig(dataset=data.name, epochs=args.epochs, seed=args.seed)
        )
        fmodel = fb.PyTorchModel(trained.model, bounds=data.bounds)
        x = torch.as_tensor(data.x_test[: args.samples])
        y = torch.as_tensor(data.y_test[: args.samples])
        print(
            f"{data.name}: reference CNN trained on {len(data.x_train)} images for {args.epochs} epochs; "
            f"clean accuracy {fb.utils.accuracy(fmodel, x, y):.4f} on the {len(x)} test images attacked.\n"
            f"LRPGrad: step {args.eps:g}, {args.max_iter} iterations, one run per norm, clipped by Foolbox "
            "to each epsilon. Cells: success rate.\n"
        )
        norms = {
            "L1": (
                {
                    "xaiadv LRPGrad": LRPGrad(eps=args.eps, max_iter=args.max_iter),
                    "foolbox SparseL1DescentAttack": fb.attacks.SparseL1DescentAttack(),
                },
                args.l1_epsilons,
            ),
            "Linf": (
                {
                    "xaiadv LRPGrad": LRPGrad(eps=args.eps, max_iter=args.max_iter, distance="linf"),
                    "foolbox LinfPGD": fb.attacks.LinfPGD(),
                },
                args.linf_epsilons,
            ),
        }
        for norm, (attacks, epsilons) in norms.items():
            header = (f"{norm} attack", *(f"eps={epsilon:g}" for epsilon in epsilons), "seconds")
            print(format_table(header, success_table(fmodel, x, y, attacks, epsilons)), end="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
