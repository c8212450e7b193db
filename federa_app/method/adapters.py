"""Houlsby bottleneck adapters, the `adapter` baseline (FedAP in the FeDeRA paper).

Written by hand: AdapterHub's `adapters` package pins transformers 4.57 and peft has no
bottleneck adapter. An adapter follows the attention output projection and the feed-forward
output projection of every layer, before the residual add and LayerNorm (Houlsby et al. 2019).
"""

from __future__ import annotations

import re

import torch
from torch import nn

# BERT, RoBERTa, DeBERTa(-v2) and ELECTRA name the two projections the same way.
ATTENTION_OUTPUT = re.compile(r"layer\.\d+\.attention\.output\.dense$")
FEED_FORWARD_OUTPUT = re.compile(r"layer\.\d+\.output\.dense$")


class BottleneckAdapter(nn.Module):
    """h + up(gelu(down(h))); `up` starts at zero, so the model is unchanged at init."""

    def __init__(self, hidden_size: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.act(self.down(hidden)))


class AdaptedLinear(nn.Module):
    """A frozen projection (`base_layer`) followed by a trainable bottleneck adapter."""

    def __init__(self, base_layer: nn.Linear, bottleneck: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = BottleneckAdapter(base_layer.out_features, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base_layer(x))


def adapter_sites(model: nn.Module) -> list[str]:
    """Names of the linear layers an adapter follows: both output projections of each layer."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and (ATTENTION_OUTPUT.search(name) or FEED_FORWARD_OUTPUT.search(name))
    ]


def add_adapters(model: nn.Module, bottleneck: int) -> list[str]:
    """Wrap every adapter site of `model` in place; returns the wrapped layers' names."""
    sites = adapter_sites(model)
    for name in sites:
        parent_name, child_name = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, AdaptedLinear(getattr(parent, child_name), bottleneck))
    return sites
