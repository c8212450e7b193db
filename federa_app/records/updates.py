"""Weight-update analysis: how far and in which direction the global model moves each round.

The paper credits FeDeRA's gain to smaller oscillation of the weight updates. To compare methods
on one footing we measure the change of the weights the method adds to the model: s * B @ A per
LoRA layer (what the adapter adds to W), and the trainable tensors themselves for everything else
(head, biases, adapters, or all weights for fft).
"""

from __future__ import annotations

import torch
from torch import nn

from federa_app.method.federa_init import lora_layers


@torch.no_grad()
def effective_weights(model: nn.Module) -> torch.Tensor:
    """The method's trainable contribution to the model as one flat vector (see module doc)."""
    parts = [layer.get_delta_weight("default").flatten() for layer in lora_layers(model).values()]
    parts += [
        p.detach().flatten()
        for name, p in model.named_parameters()
        if p.requires_grad and ".lora_" not in name
    ]
    return torch.cat([p.float() for p in parts])


class UpdateTracker:
    """Per round: the norm of the global update and its cosine with the previous round's."""

    def __init__(self) -> None:
        self._weights: torch.Tensor | None = None
        self._update: torch.Tensor | None = None

    def observe(self, weights: torch.Tensor) -> dict[str, float | None]:
        """Record this round's global weights; the first call (round 0) only sets the start."""
        previous, self._weights = self._weights, weights
        if previous is None:
            return {"update_norm": None, "update_cosine": None}
        update = weights - previous
        norm = float(update.double().norm())
        cosine = None
        if self._update is not None and norm > 0:
            prev_norm = float(self._update.double().norm())
            if prev_norm > 0:
                cosine = float(update.double() @ self._update.double()) / (norm * prev_norm)
        self._update = update
        return {"update_norm": norm, "update_cosine": cosine}
