"""Our LRP attacks as torchattacks attacks: ``LRPGrad(model, eps=...)(images, labels)`` -> adversarial images.

torchattacks works on images in [0, 1]. With ``set_normalization_used(mean, std)`` its ``__call__`` maps the
caller's normalized images back to [0, 1] and normalizes inside ``get_logits``; we hand that normalization to
the plugin as ``preprocessing`` instead, so relevance and gradients are taken through the raw module. Targeted
modes use torchattacks' own ``get_target_label``; the attacks compose in ``torchattacks.MultiAttack``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from xaiadv.plugins import checks
from xaiadv.plugins.attacks import PATTERNS
from xaiadv.plugins.model import Classifier
from xaiadv.plugins.modes import modes_restored

from ._common import ATTACK_CLASSES, attack_classes, attack_params, build_config, require, run_plugin

require("torchattacks", "torchattacks")

from torchattacks.attack import Attack  # noqa: E402

#: Plugin parameters torchattacks decides elsewhere: targeting by the attack mode, and a trace has no way out.
_NOT_PARAMETERS = ("targeted", "trace")
#: The classes whose pattern can honour a target, for error messages.
TARGETABLE = tuple(name for name, pattern in ATTACK_CLASSES.items() if PATTERNS[pattern].supports_targeted)


class LRPAttack(Attack):
    """One plugin attack as a ``torchattacks.Attack``; subclasses name only their ``pattern``.

    Parameters (keyword-only) are the plugin's: ``eps``, ``n_batch``, ``max_iter``, ``early_stop``,
    ``composite``, ... (see ``xaiadv.bridge._common.attack_params``). They are validated at construction and
    kept as attributes, torchattacks style, so a later change is validated again at the next call.
    """

    pattern: ClassVar[str]

    def __init__(self, model: nn.Module, **params: Any) -> None:
        checks.module("model", model)
        refused = sorted(set(params) & set(_NOT_PARAMETERS))
        if refused:
            raise TypeError(f"{refused}: torchattacks targets with set_mode_targeted_* and returns no trace")
        config = build_config(self.pattern, params)
        super().__init__(type(self).__name__, model)
        for name in self._parameter_names():
            setattr(self, name, getattr(config, name))
        self.supported_mode = (
            ["default", "targeted"] if PATTERNS[self.pattern].supports_targeted else ["default"]
        )

    @classmethod
    def _parameter_names(cls) -> list[str]:
        return [name for name in attack_params(cls.pattern) if name not in _NOT_PARAMETERS]

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial images in [0, 1]; labels None = the model's predictions (untargeted modes only)."""
        params = {name: getattr(self, name) for name in self._parameter_names()}
        config = build_config(self.pattern, {**params, "targeted": self.targeted})
        if self.device is not None:
            images = images.to(self.device)
        if labels is not None:
            labels = labels.to(images.device)
        y = self.get_target_label(images, labels) if self.targeted else labels
        classifier = Classifier(self.model, (0.0, 1.0), self._preprocessing())
        result = run_plugin(self.pattern, classifier, images, y, config=config)
        return result.x_adv

    def _preprocessing(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The normalization ``get_logits`` would apply now, as the plugin's (mean, std)."""
        if self._normalization_applied is False:
            return self.normalization_used["mean"], self.normalization_used["std"]
        return None

    def __call__(
        self, inputs: torch.Tensor, labels: torch.Tensor | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """torchattacks' call, with every module's mode and the normalization flag restored even after an
        exception (torchattacks restores them only on success)."""
        with self._restored():
            return super().__call__(inputs, labels, *args, **kwargs)

    @contextmanager
    def _restored(self) -> Iterator[None]:
        applied = self._normalization_applied
        try:
            with modes_restored(self.model):
                yield
        finally:
            self._normalization_applied = applied

    def _set_mode_targeted(self, mode: str, quiet: bool) -> None:
        """Refuse targeted modes, with the reason, for attacks whose pattern cannot honour a target."""
        if "targeted" not in self.supported_mode:
            raise ValueError(
                f"{self.attack} cannot honour a target (the thesis's {self.pattern} pattern is untargeted); "
                f"targeted modes work with {', '.join(TARGETABLE)}"
            )
        super()._set_mode_targeted(mode, quiet)

    def set_model_training_mode(
        self, model_training: bool = False, batchnorm_training: bool = False, dropout_training: bool = False
    ) -> None:
        """Only eval mode is supported: LRP rules and BatchNorm merging need inference behaviour."""
        if model_training or batchnorm_training or dropout_training:
            raise ValueError(
                f"{self.attack} runs the model in eval mode; set_model_training_mode cannot train it"
            )
        super().set_model_training_mode(model_training, batchnorm_training, dropout_training)


LRPFlip, LRPMean, LRPGrad, LRPGradMean = attack_classes(
    LRPAttack, "a torchattacks Attack", hidden=_NOT_PARAMETERS
)
