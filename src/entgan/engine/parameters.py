"""Parameter sets as lists of tensors: flattening, copying, and layer-by-layer streaming into a model.

A model is moved as its `state_dict` tensors (parameters and buffers) in registration order, one
tensor per message, so a receiver can start using the first layers before the last ones arrive.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from entgan.engine.transport import Transfer


def model_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The module's state tensors (parameters and buffers) in a stable order, as live storage.

    Receiving into these tensors updates the module in place, with no intermediate copy.
    """
    return [tensor.data for tensor in module.state_dict(keep_vars=True).values()]


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One contiguous float32 vector holding all tensors (a copy)."""
    if not tensors:
        return torch.zeros(0)
    return torch.cat([tensor.detach().reshape(-1).to(torch.float32) for tensor in tensors])


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy a vector produced by `flatten` back into the given tensors, checking the length."""
    expected = sum(tensor.numel() for tensor in tensors)
    if flat.numel() != expected:
        raise ValueError(f"flat parameter vector has {flat.numel()} values, the model expects {expected}")
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            count = tensor.numel()
            tensor.copy_(flat[offset : offset + count].view_as(tensor))
            offset += count


def change_since(tensors: Sequence[torch.Tensor], since: torch.Tensor) -> torch.Tensor:
    """The flat change of a model's state `tensors` since `since` (both in `flatten` order), with
    the entries of integer tensors left at 0.

    Integer state is a counter (BatchNorm's `num_batches_tracked`), no average's business; in a
    coded change it would share an int8 chunk with float values, and its jump (one per forward)
    would set that chunk's scale and swamp them: a BatchNorm variance then went negative."""
    change = flatten(tensors).sub_(since)
    offset = 0
    for tensor in tensors:
        if not tensor.is_floating_point():
            change[offset : offset + tensor.numel()] = 0
        offset += tensor.numel()
    return change


def keep_statistics_valid(module: nn.Module) -> None:
    """After changes were added to `module`'s state: BatchNorm variances back to >= 0 (a coded
    change's rounding can take a small variance below, and its square root is then NaN)."""
    with torch.no_grad():
        for submodule in module.modules():
            if isinstance(submodule, nn.modules.batchnorm._BatchNorm) and submodule.running_var is not None:
                submodule.running_var.clamp_(min=0)


def numel(tensors: Sequence[torch.Tensor]) -> int:
    return sum(tensor.numel() for tensor in tensors)


class LayerStream:
    """Makes a module wait, layer by layer, for tensors still arriving into its own state.

    Each submodule that owns tensors gets a forward pre-hook that waits only for those tensors.
    A forward pass started right after the receive was posted therefore computes the first
    layers while later layers are still in flight. Call `finish()` to wait for the rest and
    remove the hooks.
    """

    def __init__(self, module: nn.Module, transfer: Transfer) -> None:
        self._transfer = transfer
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        position = {name: index for index, name in enumerate(module.state_dict(keep_vars=True))}
        if len(position) != len(transfer):
            raise ValueError(f"transfer carries {len(transfer)} tensors, module has {len(position)}")
        for prefix, submodule in module.named_modules():
            own = [
                position[f"{prefix}.{name}" if prefix else name]
                for name, _ in list(submodule.named_parameters(recurse=False))
                + list(submodule.named_buffers(recurse=False))
                if (f"{prefix}.{name}" if prefix else name) in position
            ]
            if own:
                self._hooks.append(submodule.register_forward_pre_hook(self._waiter(own)))

    def _waiter(self, indices: list[int]):
        def wait_for_own_tensors(_module: nn.Module, _inputs: object) -> None:
            for index in indices:
                self._transfer.wait_tensor(index)

        return wait_for_own_tensors

    def finish(self) -> None:
        self._transfer.wait()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
