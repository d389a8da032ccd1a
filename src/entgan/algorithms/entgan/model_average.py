"""An exponential moving average of a model's weights, the model to sample from.

A GAN's generator keeps moving while it trains: from one evaluation to the next its samples can
get worse as well as better. Averaging its weights over the last rounds (Karras et al.'s
progressive GANs and StyleGAN, Yazici et al. 2019) gives a generator whose quality follows the
trend instead of the swings. The average is a copy of the model that is only read: it is never
trained and never sent to workers.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelAverage:
    """`average := decay * average + (1 - decay) * model`, once per `update`.

    `half_life` is in updates: after that many, a weight's old value counts half. Buffers (e.g.
    BatchNorm's running statistics) are copied, not averaged, as in StyleGAN's generator average.
    """

    def __init__(self, model: nn.Module, half_life: float) -> None:
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0 updates, found {half_life}")
        self.decay = 0.5 ** (1 / half_life)
        self.model = copy.deepcopy(model).requires_grad_(False)
        for parameter in self.model.parameters():
            parameter.grad = None  # the average is never trained

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averaged = list(self.model.parameters())
        current = list(model.parameters())
        if len(averaged) != len(current):
            raise ValueError(f"model has {len(current)} parameters, the average {len(averaged)}")
        torch._foreach_lerp_(averaged, current, 1 - self.decay)
        for mine, theirs in zip(self.model.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)
