"""kNN exact search (``KNNScore``, torch backend) on a device beside the CPU: images/s and the largest
difference between the two devices' scores, on the bench's synthetic 256-d features.

    python scripts/knn_device.py --device cuda --sizes 60000,1000000 --queries 1000

docs/scaling.md ("On a GPU") has what it printed on an H200.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from xaiadv.evaluation.bench import KNN_CLASSES, KNN_DIM, synthetic_features
from xaiadv.plugins.detectors.knn import KNNScore

#: Search chunk on the CPU past this many references (the default's distance block would need 8 GiB).
LARGE = 100_000


def images_per_second(
    device: torch.device, references: int, queries: int, repeats: int
) -> tuple[float, torch.Tensor]:
    """Best-of-``repeats`` images/s of ``KNNScore.score`` on ``device``, and the scores (on the CPU)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(KNN_DIM, KNN_CLASSES)).eval().to(device)
    features, labels = synthetic_features(references + queries, 0)
    chunk = 256 if device.type == "cpu" and references > LARGE else 2048
    detector = KNNScore(model, layer="0", backend="torch", chunk_size=chunk)
    detector.fit(features[:references].to(device), labels[:references].to(device))
    x_query = features[references:].to(device)
    detector.score(x_query[:16])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        scores = detector.score(x_query)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return queries / best, scores.cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="60000,1000000", help="numbers of references, comma-separated")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for references in (int(size) for size in args.sizes.split(",")):
        cpu_speed, cpu_scores = images_per_second(torch.device("cpu"), references, args.queries, 1)
        speed, scores = images_per_second(torch.device(args.device), references, args.queries, args.repeats)
        difference = float((scores - cpu_scores).abs().max())
        row = {"references": references, "cpu": cpu_speed, args.device: speed, "max_difference": difference}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
