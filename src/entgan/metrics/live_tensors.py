"""What a role's memory is made of, counted from its tensors rather than from the process's pages.

RSS and the kernel's high-water mark say how much a server costs but not why: the allocator's
caches, the math libraries' buffers and the interpreter sit in the same pages. This table counts
the tensors themselves, per kind, so a memory figure can be explained (and a layout change checked):

- `parameters`, `gradients`, `buffers`: of every `nn.Module` a role holds (its attributes, the
  items of its lists, tuples and dicts, and the attributes of the project's own objects it holds,
  such as a moving average of G), each storage counted once;
- `optimizer_state`: the state tensors of every optimizer it holds (Adam's two moments);
- `other_tensors`: tensors it holds directly (receive buffers, running sums, stored latents);
- `peak_saved_activations`: the most bytes autograd held at once for backward passes, over the
  rounds measured (`SavedActivations`): the activations a server keeps between a forward and its
  backward (MD-GAN's held fake batches, G's micro-batches). Parameters saved for backward are
  already counted and are left out.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

KINDS = ("parameters", "gradients", "buffers", "optimizer_state", "other_tensors")


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    storage = tensor.untyped_storage()
    return (str(tensor.device), storage.data_ptr())


def _storage_bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def _held_values(role: Any, depth: int = 3) -> Iterator[Any]:
    """What `role` holds: its attributes, the items of lists, tuples and dicts among them and the
    attributes of the project's own objects, `depth` levels down (modules and tensors are leaves)."""
    seen: set[int] = set()

    def walk(value: Any, level: int) -> Iterator[Any]:
        if id(value) in seen:
            return
        seen.add(id(value))
        yield value
        if level == 0 or isinstance(value, (nn.Module, torch.Tensor, torch.optim.Optimizer)):
            return
        if isinstance(value, (list, tuple)):
            children: Iterable[Any] = value
        elif isinstance(value, dict):
            children = value.values()
        elif type(value).__module__.startswith("entgan.") and hasattr(value, "__dict__"):
            children = vars(value).values()
        else:
            return
        for child in children:
            yield from walk(child, level - 1)

    seen.add(id(role))
    for value in vars(role).values():
        yield from walk(value, depth - 1)


def role_tensor_bytes(role: Any) -> dict[str, int]:
    """Bytes of the tensors `role` holds, per kind (`KINDS`); a storage shared by several (a
    parameter that is also a buffer's view, a receive buffer that is a model's tensor) is counted
    once, under the first kind it is met as, in the order of `KINDS`."""
    modules = [value for value in _held_values(role) if isinstance(value, nn.Module)]
    optimizers = [value for value in _held_values(role) if isinstance(value, torch.optim.Optimizer)]
    tensors = [value for value in _held_values(role) if isinstance(value, torch.Tensor)]
    seen: set[tuple[str, int]] = set()
    totals = dict.fromkeys(KINDS, 0)

    def count(kind: str, candidates: Iterable[torch.Tensor | None]) -> None:
        for tensor in candidates:
            if tensor is None or not isinstance(tensor, torch.Tensor):
                continue
            key = _storage_key(tensor)
            if key in seen:
                continue
            seen.add(key)
            totals[kind] += _storage_bytes(tensor)

    count("parameters", (p for module in modules for p in module.parameters()))
    count("gradients", (p.grad for module in modules for p in module.parameters()))
    count("buffers", (b for module in modules for b in module.buffers()))
    count("optimizer_state", (
        value for optimizer in optimizers for state in optimizer.state.values() for value in state.values()
    ))
    count("other_tensors", tensors)
    return totals


class SavedActivations:
    """Peak bytes of the tensors autograd saves for backward, while `measure()` is active.

    A saved tensor is counted from the forward that saves it until autograd lets go of it (the
    backward that uses it, or the graph being dropped); storages are counted once however many
    operations save them. Leaves that require grad (parameters) and views of them are not
    activations and are skipped. The hooks cost a Python call per saved tensor, so the engine installs them only when
    asked (`engine.live_tensors`).
    """

    def __init__(self) -> None:
        self.current_bytes = 0
        self.peak_bytes = 0
        self._holders: dict[tuple[str, int], int] = {}

    def _release(self, key: tuple[str, int], nbytes: int) -> None:
        self._holders[key] -= 1
        if self._holders[key] == 0:
            del self._holders[key]
            self.current_bytes -= nbytes

    def _pack(self, tensor: torch.Tensor) -> Any:
        base = tensor._base if tensor._base is not None else tensor
        if base.is_leaf and base.requires_grad:  # a parameter, or a view of one (a transposed weight)
            return tensor
        # A detached alias of the same storage: a saved output would otherwise hold its own
        # grad_fn through this Python object, a cycle through autograd's C++ graph that Python's
        # collector cannot see, so a graph that is never back-propagated (a figure computed from
        # logits with grad) would never be freed. torch's own `save_on_cpu` keeps no graph either.
        holder = _Saved(tensor.detach())
        key = _storage_key(tensor)
        nbytes = _storage_bytes(tensor)
        if key not in self._holders:
            self._holders[key] = 0
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        self._holders[key] += 1
        weakref.finalize(holder, self._release, key, nbytes)
        return holder

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Saved) else packed

    @contextmanager
    def measure(self) -> Iterator[SavedActivations]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self


class _Saved:
    """What autograd keeps for a saved tensor while it is measured (its lifetime is the count's)."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
