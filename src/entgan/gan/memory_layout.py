"""Where a server's training state lives in memory: allocated once, shared where uses take turns.

A server's resident memory is what it holds at once plus what the allocator keeps after
short-lived allocations. Two devices here keep both down for G's gradients:

- `bind_gradients`: the parameters' `.grad` become views into one flat buffer that the caller owns.
  EntGAN's server receives the upload it is averaging into the same buffer: in a round it averages
  D first and trains G after, so G's gradients and the incoming update never need memory at the
  same time, and the two share one allocation made at setup instead of taking turns on the heap.
- `linear_gradients_in_place`: while it is active, each `nn.Linear` of a model adds its weight and
  bias gradients straight into their `.grad` (one `addmm_`), where autograd would compute a fresh
  gradient tensor of the weight's size and then add it. Accumulating gradients over micro-batches
  then allocates nothing of a weight's size. (Megatron-LM's gradient-accumulation fusion is the
  same idea.)

The two go together: with the shared buffer alone, the gradient temporaries that autograd
allocates and frees each micro-batch stay resident as allocator free space (figures: README,
Results).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


def bind_gradients(parameters: Iterable[nn.Parameter], storage: torch.Tensor) -> None:
    """Make each parameter's `.grad` a view into `storage` (flat, float32, back to back, zeroed).

    Afterwards the gradients must be cleared with `zero_grad(set_to_none=False)`: setting them to
    None would unbind them."""
    if storage.dim() != 1 or not storage.is_contiguous():
        raise ValueError(f"gradient storage must be one contiguous flat tensor, found shape {tuple(storage.shape)}")
    offset = 0
    for parameter in parameters:
        if parameter.dtype != storage.dtype or parameter.device != storage.device:
            raise ValueError(
                f"gradient storage is {storage.dtype} on {storage.device}; a parameter is {parameter.dtype} on "
                f"{parameter.device}"
            )
        end = offset + parameter.numel()
        if end > storage.numel():
            raise ValueError(f"gradient storage holds {storage.numel()} values; the parameters need more")
        parameter.grad = storage[offset:end].view_as(parameter).zero_()
        offset = end


class _LinearAddingGradientsInPlace(torch.autograd.Function):
    """`F.linear` whose backward adds the weight's and bias's gradients into their `.grad`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, inputs: torch.Tensor, weight: nn.Parameter, bias: nn.Parameter | None
    ) -> torch.Tensor:
        ctx.save_for_backward(inputs)
        # The layer's own parameters, kept as they are: the backward adds into their bound `.grad`,
        # which a saved copy (e.g. under saved-tensor hooks) would not carry.
        ctx.weight, ctx.bias = weight, bias
        return torch.nn.functional.linear(inputs, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        (inputs,) = ctx.saved_tensors
        weight = ctx.weight
        flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
        weight.grad.addmm_(flat_grad.t(), inputs.reshape(-1, inputs.shape[-1]))
        if ctx.bias is not None:
            ctx.bias.grad.add_(flat_grad.sum(dim=0))
        grad_inputs = grad_output @ weight if ctx.needs_input_grad[0] else None
        # None for weight and bias: their gradients are already in place, autograd adds nothing.
        return grad_inputs, None, None


class _InPlaceLinearGradients(TorchFunctionMode):
    """Routes `F.linear` calls on the given layers' weights through `_LinearAddingGradientsInPlace`."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        super().__init__()
        self._bias_of = {id(layer.weight): layer.bias for layer in layers}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and len(args) >= 2 and id(args[1]) in self._bias_of:
            inputs, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if bias is self._bias_of[id(weight)] and torch.is_grad_enabled():
                return _LinearAddingGradientsInPlace.apply(inputs, weight, bias)
        return func(*args, **kwargs)


@contextmanager
def linear_gradients_in_place(model: nn.Module) -> Iterator[None]:
    """Inside, a forward of `model` builds a graph whose backward adds every `nn.Linear`'s weight and
    bias gradients into their existing `.grad` (bound with `bind_gradients`) in place. Other layers
    back-propagate as usual. Gradients equal autograd's up to float rounding."""
    layers = [module for module in model.modules() if type(module) is nn.Linear and module.weight.requires_grad]
    for layer in layers:
        if layer.weight.grad is None or (layer.bias is not None and layer.bias.grad is None):
            raise ValueError("linear_gradients_in_place needs the model's gradients bound first (bind_gradients)")
    with _InPlaceLinearGradients(layers):
        yield
