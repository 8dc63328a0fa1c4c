"""LRPSignature: I-defender's per-class densities on LRP signatures instead of hidden states (beyond seeds).

Fidel et al. 2020 (seed 001 ref. 21) tell adversarial from clean inputs by their SHAP signatures; seed 001
(section 3.3) proposes LRP signatures instead (:mod:`xaiadv.plugins.signatures`): the epsilon-rule relevance
of the last layer's input for a class c, ``R_j = a_j W_cj z_c / (z_c + eps sign z_c)``. Fidel et al. train a
classifier on clean and adversarial signatures; this detector keeps to the rule of the others here and is
fitted on clean data only, by the I-defender recipe (Zheng & Hong 2018, eqs. 4-5) applied to relevance: one
Gaussian mixture per class of the signatures of that class's clean samples; an input scores
``-log p(signature for its predicted class | that class's mixture)``, with one threshold per class.

Choices, stated because the papers do not make them: a fitting sample's signature is taken for its TRUE class
(the class whose mixture it joins; nearly every clean training sample is predicted so too), a scored sample's
for its PREDICTED class (no label at test time). The signature is closed form on the last layer: a score costs
one forward pass (no backward) plus the mixture's density, batched, and it is differentiable in x
(``score_torch``, ``log_likelihood``) for detector-aware attacks.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import checks
from ..features import FeatureExtractor
from ..model import Classifier
from ..signatures import DEFAULT_EPSILON, epsilon_rule, last_linear
from .idefender import IDefender, _log_likelihood


class LRPSignature(IDefender):
    """Per-class Gaussian mixtures of LRP signatures of the last ``nn.Linear``'s input (module docstring).

    ``layer``: that layer (default the model's last ``nn.Linear``); ``epsilon``: the epsilon rule's
    stabilizer. The mixture parameters are I-defender's (``n_components``, ``covariance_type``,
    ``reg_covar``, ``random_state``); so are the fitted attributes, ``kept_features_`` holding the signature
    entries that vary over the fitting data. :meth:`hidden` returns the signatures for the predicted class.
    """

    config_names = ("layer", "epsilon", "n_components", "covariance_type", "reg_covar", "random_state")

    def __init__(
        self,
        model: Classifier | nn.Module,
        *,
        layer: str | None = None,
        epsilon: float = DEFAULT_EPSILON,
        n_components: int = 5,
        covariance_type: str = "full",
        reg_covar: float = 1e-2,
        batch_size: int = 256,
        preprocessing: object = None,
        random_state: int = 0,
    ) -> None:
        super().__init__(
            model,
            n_components=n_components,
            covariance_type=covariance_type,
            reg_covar=reg_covar,
            batch_size=batch_size,
            preprocessing=preprocessing,
            random_state=random_state,
        )
        module = self.classifier.module
        name, self._linear = last_linear(module, layer)
        self.layer = layer
        self.epsilon = checks.finite_number("epsilon", epsilon, low=0.0)
        self._extractor = FeatureExtractor(module, [name], capture="input")

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """log p(signature of x for class c | class c's mixture), (N, n_classes) float64: column c takes the
        signature for c (what a detector-aware attack heading for class c must make likely); with the
        graph back to ``x`` when it requires grad."""
        x = self._checked(x)
        if x.shape[0] == 0:
            return torch.empty(0, self.n_classes_, dtype=torch.float64, device=x.device)
        inputs, logits = super()._forward(x)
        kept = self.kept_features_.to(x.device)
        columns = []
        for label in range(self.n_classes_):  # one column per class: a loop over classes, not samples
            target = torch.full((x.shape[0],), label, dtype=torch.long, device=x.device)
            signature = self._signatures(inputs, logits, target)[:, kept]
            columns.append(_log_likelihood(signature, *self._on(label, x.device), self.covariance_type))
        return torch.stack(columns, dim=1)

    def _fitting_features(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._forward(x, labels)[0]

    def _forward(
        self, x: torch.Tensor, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(signatures (N, D) float64 for ``target``, default the predicted class; logits (N, K))."""
        inputs, logits = super()._forward(x)
        return self._signatures(inputs, logits, target), logits

    def _signatures(
        self, inputs: torch.Tensor, logits: torch.Tensor, target: torch.Tensor | None
    ) -> torch.Tensor:
        """The epsilon rule on the captured inputs, with a graph only where they carry one (back to x)."""
        with torch.set_grad_enabled(inputs.requires_grad):
            values, _, _ = epsilon_rule(inputs, self._linear, logits, target, self.epsilon)
        return values.to(torch.float64)
