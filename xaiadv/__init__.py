"""xaiadv: explainable-AI attacks and detectors as plugins for ART, Foolbox and torchattacks.

The algorithms live in :mod:`xaiadv.plugins` (plain torch), the adapters users import in
:mod:`xaiadv.bridge`, and data, reference models, benchmarks and the CLI in :mod:`xaiadv.evaluation`.
"""

__version__ = "0.1.0"
