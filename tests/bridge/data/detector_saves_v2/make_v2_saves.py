"""How the files beside this script were made: version-2 saves of the three ART detectors (xaiadv before
issue 12's Detector contract, commit 5872ca1), for the test that today's ``load`` still reads them.

Run against that commit's tree (``git archive 5872ca1 | tar -x -C OLD; PYTHONPATH=OLD python this.py``):
a tiny digits CNN trained a few epochs (its weights saved here, so the test does not depend on training
being bit-reproducible), each detector fitted on 400 training digits and saved, and its detect() of 60
test digits kept in expected.npz.
"""

from pathlib import Path

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn

import xaiadv.bridge.art_detectors as old

HERE = Path(__file__).parent
assert old.SCHEMA_VERSION == 2
torch.manual_seed(0)
data = load_digits()
x = (torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0).numpy()
y = data.target
model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(5):
    for batch in torch.randperm(1400).split(64):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.tensor(x[batch])), torch.tensor(y[batch])).backward()
        optimizer.step()
model.eval()
save_file(model.state_dict(), HERE / "model.safetensors")
classifier = PyTorchClassifier(
    model, nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10, clip_values=(0.0, 1.0)
)
detectors = {
    "entropy": old.SpatialEntropyDetector(classifier),
    "knn": old.KNNDetector(classifier, k=5, preprocess="pca"),
    "idefender": old.IDefender(classifier, n_components=1, covariance_type="diag"),
}
expected = {}
for name, detector in detectors.items():
    detector.fit(x[:400], y[:400])
    detector.save(HERE / name)
    report, flags = detector.detect(x[1400:1460])
    expected[f"{name}.score"], expected[f"{name}.flags"] = report["score"], flags
np.savez(HERE / "expected.npz", **expected)
