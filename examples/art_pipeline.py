"""xaiadv inside an ART pipeline: our LRP attack and detectors next to ART's own, on one classifier.

A reference CNN is trained and wrapped in ART's ``PyTorchClassifier``; then, as an ART user would:

1. attack it with xaiadv's ``LRPGrad`` and ART's ``BasicIterativeMethod`` (the same step and number of
   iterations) and compare the attack success rate (ASR, thesis eq. 4.15) and the median L1 perturbation;
2. train a copy adversarially with ART's ``AdversarialTrainer`` driving ``LRPGrad`` (ratio 0.5) and compare
   clean and adversarial accuracy before and after;
3. fit xaiadv's ``SpatialEntropyDetector``, ``IDefenderDetector`` and ``KNNDetector`` (ART
   ``EvasionDetector``s) next to ART's ``BinaryInputDetector``, a small CNN trained on FGSM examples, and
   compare their detection rates on LRP-grad and FGSM examples and their false-positive rates on clean
   test images.

Run it from the repository root; digits takes seconds, Fashion-MNIST needs its files (xaiadv.evaluation.data):

    python examples/art_pipeline.py
    python examples/art_pipeline.py --dataset fashion_mnist --samples 500 --train-samples 10000
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from art.attacks.evasion import BasicIterativeMethod, FastGradientMethod
from art.defences.detector.evasion import BinaryInputDetector, EvasionDetector
from art.defences.trainer import AdversarialTrainer
from art.estimators.classification import PyTorchClassifier
from torch import nn

from xaiadv.bridge.art import IDefenderDetector, KNNDetector, LRPGrad, SpatialEntropyDetector
from xaiadv.evaluation.cli import format_table, positive_float, positive_int
from xaiadv.evaluation.data import Dataset, load_dataset, training_subset
from xaiadv.evaluation.metrics import attack_success_rate, perturbation_norms
from xaiadv.evaluation.models import TrainConfig, train_reference_model

#: FGSM step for the examples ART's BinaryInputDetector learns from (the detector tests use the same).
FGSM_EPS = 0.15
#: Epochs and learning rate of ART's BinaryInputDetector network, and of the adversarial training.
DETECTOR_EPOCHS = 10
LEARNING_RATE = 1e-3


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("digits", "fashion_mnist"), default="digits")
    parser.add_argument("--samples", type=positive_int, default=200, help="test images attacked (first N)")
    parser.add_argument(
        "--train-samples",
        type=positive_int,
        default=5000,
        help="seeded subset of training images for the CNN, the adversarial training and the detectors",
    )
    parser.add_argument("--epochs", type=positive_int, default=5, help="training epochs of the CNN")
    parser.add_argument("--eps", type=positive_float, default=0.01, help="attack step per iteration")
    parser.add_argument("--max-iter", type=positive_int, default=50, help="iterations of LRP-grad and BIM")
    parser.add_argument(
        "--train-iter",
        type=positive_int,
        default=20,
        help="LRP-grad iterations inside the adversarial training and for adversarial accuracy",
    )
    parser.add_argument("--adv-epochs", type=positive_int, default=2, help="adversarial training epochs")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed numpy's and torch's global RNGs (ART shuffles with them) and restore both afterwards."""
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)


def art_classifier(model: nn.Module, data: Dataset, *, trainable: bool = False) -> PyTorchClassifier:
    """``model`` as an ART classifier on the data's bounds, with an Adam optimizer if it is to be trained."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE) if trainable else None
    return PyTorchClassifier(
        model,
        loss=nn.CrossEntropyLoss(),
        optimizer=optimizer,
        input_shape=data.input_shape,
        nb_classes=len(data.classes),
        clip_values=data.bounds,
    )


def predict(classifier: PyTorchClassifier, x: np.ndarray) -> np.ndarray:
    """Predicted class indices."""
    return classifier.predict(x).argmax(1)


def compare_attacks(
    classifier: PyTorchClassifier, x: np.ndarray, y: np.ndarray, args: argparse.Namespace
) -> tuple[list[tuple[object, ...]], np.ndarray]:
    """Table rows (attack, ASR, successes, median L1 over successes) and the LRP-grad examples.

    ART's BIM gets the same step and iterations, and an eps-ball (step * iterations) it can never leave, so
    neither attack is projected; BIM has no early stop, LRP-grad stops each sample at its first success.
    """
    attacks = {
        "xaiadv LRPGrad": LRPGrad(classifier, eps=args.eps, max_iter=args.max_iter),
        "ART BasicIterativeMethod": BasicIterativeMethod(
            classifier, eps=args.eps * args.max_iter, eps_step=args.eps, max_iter=args.max_iter, verbose=False
        ),
    }
    clean = predict(classifier, x)
    rows, examples = [], {}
    for name, attack in attacks.items():
        examples[name] = attack.generate(x, y)
        adversarial = predict(classifier, examples[name])
        success = (clean == y) & (adversarial != y)
        l1 = perturbation_norms(x, examples[name])["L1"][success]
        median_l1 = float(np.median(l1)) if success.any() else float("nan")
        rows.append((name, attack_success_rate(y, clean, adversarial), int(success.sum()), median_l1))
    return rows, examples["xaiadv LRPGrad"]


def adversarial_accuracy(
    classifier: PyTorchClassifier, x: np.ndarray, y: np.ndarray, iterations: int, eps: float
) -> tuple[float, float]:
    """(clean accuracy, accuracy on LRP-grad examples with ``iterations`` steps of ``eps``) on (x, y)."""
    x_adv = LRPGrad(classifier, eps=eps, max_iter=iterations).generate(x, y)
    return float(np.mean(predict(classifier, x) == y)), float(np.mean(predict(classifier, x_adv) == y))


def adversarial_training(
    classifier: PyTorchClassifier, data: Dataset, x: np.ndarray, y: np.ndarray, args: argparse.Namespace
) -> list[tuple[object, ...]]:
    """Rows (model, attack, clean accuracy, adversarial accuracy) before and after ART's AdversarialTrainer.

    The trainer crafts fresh LRP-grad examples against the model being trained for half of every batch;
    the classifier's model is left as it was (a copy is trained).
    """
    budget = f"LRP-grad, {args.train_iter} x {args.eps:g}"
    before = adversarial_accuracy(classifier, x, y, args.train_iter, args.eps)
    trainable = art_classifier(copy.deepcopy(classifier.model), data, trainable=True)
    attack = LRPGrad(trainable, eps=args.eps, max_iter=args.train_iter)
    trainer = AdversarialTrainer(trainable, attacks=attack, ratio=0.5)
    trainer.fit(data.x_train, data.y_train, nb_epochs=args.adv_epochs, batch_size=64)
    after = adversarial_accuracy(trainable, x, y, args.train_iter, args.eps)
    return [
        ("reference", budget, *before),
        (f"adversarially trained (nb_epochs={args.adv_epochs}, ratio=0.5)", budget, *after),
    ]


def binary_input_detector(classifier: PyTorchClassifier, data: Dataset) -> BinaryInputDetector:
    """ART's BinaryInputDetector: a small CNN trained to tell clean training images (0) from FGSM ones (1)."""
    channels, height, width = data.input_shape
    network = nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * (height // 2) * (width // 2), 32),
        nn.ReLU(),
        nn.Linear(32, 2),
    )
    detector_classifier = PyTorchClassifier(
        network,
        loss=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(network.parameters(), lr=LEARNING_RATE),
        input_shape=data.input_shape,
        nb_classes=2,
        clip_values=data.bounds,
    )
    x_fgsm = FastGradientMethod(classifier, eps=FGSM_EPS).generate(data.x_train)
    x_both = np.concatenate([data.x_train, x_fgsm])
    is_adversarial = np.repeat([0, 1], len(data.x_train))
    detector = BinaryInputDetector(detector_classifier)
    detector.fit(x_both, np.eye(2)[is_adversarial], nb_epochs=DETECTOR_EPOCHS, batch_size=64)
    return detector


def compare_detectors(
    classifier: PyTorchClassifier,
    data: Dataset,
    x: np.ndarray,
    y: np.ndarray,
    x_lrp: np.ndarray,
    seed: int,
) -> list[tuple[object, ...]]:
    """Rows (detector, fitted on, detection rate on LRP-grad, on FGSM, false-positive rate on clean x).

    Detection rates count the successful adversarial examples only; ours are fitted on clean training
    images alone (threshold at 5% false positives on a held-out share), ART's has seen FGSM examples.
    """
    clean = predict(classifier, x)
    x_fgsm = FastGradientMethod(classifier, eps=FGSM_EPS).generate(x)
    successful = {
        "LRP-grad": x_lrp[(clean == y) & (predict(classifier, x_lrp) != y)],
        "FGSM": x_fgsm[(clean == y) & (predict(classifier, x_fgsm) != y)],
    }
    detectors: dict[str, tuple[str, EvasionDetector]] = {}
    for cls in (SpatialEntropyDetector, IDefenderDetector, KNNDetector):
        detector = cls(classifier, random_state=seed)
        detector.fit(data.x_train, data.y_train)
        detectors[f"xaiadv {cls.__name__}"] = ("clean images", detector)
    art_detector = binary_input_detector(classifier, data)
    detectors["ART BinaryInputDetector"] = (f"clean + FGSM (eps {FGSM_EPS}) images", art_detector)
    rows = []
    for name, (fitted_on, detector) in detectors.items():
        rates = [rate(detector, successful[attack]) for attack in ("LRP-grad", "FGSM")]
        rows.append((name, fitted_on, *rates, rate(detector, x)))
    return rows


def rate(detector: EvasionDetector, x: np.ndarray) -> float:
    """Share of ``x`` the ART detector flags as adversarial (NaN when x is empty)."""
    return float(np.mean(detector.detect(x)[1])) if len(x) else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data = training_subset(load_dataset(args.dataset), args.train_samples, args.seed)
    with seeded(args.seed):
        trained = train_reference_model(
            data, TrainConfig(dataset=data.name, epochs=args.epochs, seed=args.seed)
        )
        classifier = art_classifier(trained.model, data)
        x, y = data.x_test[: args.samples], data.y_test[: args.samples]
        print(
            f"{data.name}: reference CNN trained on {len(data.x_train)} images for {args.epochs} epochs, "
            f"test accuracy {trained.test_accuracy:.4f}; {len(x)} test images attacked.\n"
        )
        attack_rows, x_lrp = compare_attacks(classifier, x, y, args)
        print(f"Attacks: step {args.eps:g}, {args.max_iter} iterations; L1 is the median over successes.")
        print(format_table(("attack", "ASR", "n success", "median L1"), attack_rows), end="\n\n")

        training_rows = adversarial_training(classifier, data, x, y, args)
        print("Adversarial training: ART's AdversarialTrainer driving xaiadv's LRPGrad, on the test images.")
        print(
            format_table(("model", "attack", "clean accuracy", "adversarial accuracy"), training_rows),
            end="\n\n",
        )

        detector_rows = compare_detectors(classifier, data, x, y, x_lrp, args.seed)
        print(
            "Detectors: detection rate on successful adversarial examples, false positives on the clean test "
            "images. ART's BinaryInputDetector was trained on FGSM examples; ours saw clean images only."
        )
        header = ("detector", "fitted on", "detects LRP-grad", "detects FGSM", "false positives")
        print(format_table(header, detector_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
