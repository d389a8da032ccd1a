"""DCGAN-style weight initialisation, applied by the builders.

Radford et al. initialise every weight from N(0, 0.02); BatchNorm scales from N(1, 0.02). Small
initial weights keep early G outputs near 0 (mid-grey, inside tanh's linear range) and early D
logits near 0, which avoids saturated losses in the first rounds.
"""

from __future__ import annotations

from torch import nn

INIT_STD = 0.02


def init_dcgan_weights(model: nn.Module) -> None:
    """Initialise conv/linear weights ~ N(0, 0.02), biases 0; BatchNorm/GroupNorm weights ~ N(1, 0.02).

    Task embeddings are deliberately left at PyTorch's N(0, 1): the embedding is concatenated to
    z ~ N(0, 1), and shrinking it to 0.02 would make the task signal negligible next to the noise,
    so G would start out (nearly) ignoring the task.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(module.weight, 0.0, INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            if module.weight is not None:
                nn.init.normal_(module.weight, 1.0, INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
