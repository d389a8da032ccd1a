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

`GeneratorGradients` puts both, and G steps in micro-batches, at the service of every server that
trains G (`engine.memory_layout`): EntGAN's, Ren's and Distributed-GAN's, which take G steps against
a critic, and MD-GAN's and DANCE's, which back-propagate workers' feedback into G. The layout is
engine mechanics, not a method's contribution, so every method that can use it gets it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from entgan.gan.losses import generator_loss

if TYPE_CHECKING:
    from entgan.config import MemoryLayoutConfig
    from entgan.models.generator import Generator


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


class GeneratorGradients:
    """Where a server's G keeps its gradients, and how its G steps run (`engine.memory_layout`).

    On: G's `.grad` are views into one flat buffer allocated here once (`bind_gradients`), at least
    `share_with` values long so that the caller can also receive uploads into it while G does not
    need its gradients (EntGAN's server); on the CPU, G's linear layers add their gradients into it
    in place (`linear_gradients_in_place`); G steps run in micro-batches (`microbatch`). Off:
    autograd allocates as it goes, and a G step is one pass over its batch.
    """

    def __init__(
        self, generator: Generator, config: MemoryLayoutConfig, device: torch.device, share_with: int = 0
    ) -> None:
        self.generator = generator
        self.config = config
        self.buffer: torch.Tensor | None = None
        if config.enabled:
            parameters = list(generator.parameters())
            size = max(sum(parameter.numel() for parameter in parameters), share_with)
            self.buffer = torch.zeros(size, dtype=torch.float32, device=device)
            bind_gradients(parameters, self.buffer)
        # In-place linear gradients serve glibc's heap; on a GPU the caching allocator already
        # reuses autograd's temporaries, and the Python backward is slower.
        self.in_place = self.buffer is not None and device.type == "cpu"

    @property
    def bound(self) -> bool:
        return self.buffer is not None

    def zero(self, optimizer: torch.optim.Optimizer) -> None:
        """Clear G's gradients before a step (kept bound to the buffer when they are)."""
        optimizer.zero_grad(set_to_none=not self.bound)

    def release(self, optimizer: torch.optim.Optimizer) -> None:
        """After the round's steps: autograd's gradients are freed (not needed until the next step,
        so their memory serves what comes in between); bound ones stay where they are."""
        if not self.bound:
            optimizer.zero_grad(set_to_none=True)

    def forward(self) -> AbstractContextManager[None]:
        """The context of a forward through G whose backward adds into G's bound gradients."""
        return linear_gradients_in_place(self.generator) if self.in_place else nullcontext()

    def microbatch(self, batch_size: int, fake_batch_size: int) -> int:
        """Samples per pass through G and the critic in a G step of `batch_size`: the layout's
        micro-batch, but for a generator with batch statistics never fewer than a worker's fake
        batch (`fake_batch_size`): such a G's samples depend on the batch they are drawn in."""
        if not self.config.enabled:
            return batch_size
        if self.generator.normalises_over_batch:
            return min(batch_size, max(self.config.generator_microbatch, fake_batch_size))
        return self.config.generator_microbatch

    def add_loss_gradients(
        self, critic: nn.Module, latents: torch.Tensor, tasks: torch.Tensor, microbatch: int
    ) -> tuple[float, float]:
        """Add the gradient of the batch's non-saturating G loss against `critic` to G's `.grad`,
        `microbatch` samples at a time (the loss is the batch mean either way); return the batch's
        loss and the mean probability the critic gave its samples of being real."""
        batch_size = latents.shape[0]
        loss_sum = fooled_sum = 0.0
        for z, task in zip(latents.split(microbatch), tasks.split(microbatch), strict=True):
            share = z.shape[0] / batch_size
            with self.forward():
                fakes = self.generator(z, task)
            loss, fooled = generator_loss(critic, fakes, task)
            (loss * share).backward()
            loss_sum += loss.item() * share
            fooled_sum += fooled * share
        return loss_sum, fooled_sum
