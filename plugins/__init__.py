"""The algorithms in plain torch: LRP relevance, the LRP attack family, detectors.

Knows torch, zennit, numpy and scikit-learn; nothing of ART, Foolbox or torchattacks.
"""
