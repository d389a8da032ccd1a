"""Fakes whose error feedback comes back later: what a server that back-propagates workers'
feedback (MD-GAN, DANCE's G-node) keeps between sending a batch and hearing about it.

The server sends X = G(z, t) and later receives F = dL/dX from a worker; G's gradient is
F . dX/dw, the chain rule through X's graph. That graph (G's activations for the batch) is the
largest thing such a server holds, once per batch in flight. Two ways to have it when F lands:

- `held`: generate with autograd on and keep the graph until F arrives (one forward per batch,
  the graph's memory for as long as the batch is in flight);
- `recomputed`: generate without a graph, keep only (z, t), and run the forward again with autograd
  when F arrives (one more forward per batch; at most one graph alive at a time). G's parameters do
  not change between the two forwards (they change at the round's optimizer step), so the
  recomputed X is the one sent. Buffers that a training-mode forward updates (BatchNorm's running
  statistics) are restored after the second forward, so they move once per batch either way.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch
from torch import Tensor

from entgan.models.generator import Generator

FeedbackGraphs = Literal["held", "recomputed"]


class FakesAwaitingFeedback:
    """One batch of fakes sent for feedback; `backpropagate` adds F . dX/dw to G's gradients."""

    def __init__(
        self,
        generator: Generator,
        latents: Tensor,
        tasks: Tensor | int,
        graphs: FeedbackGraphs,
        forward: Callable[[], AbstractContextManager[None]] = nullcontext,
    ) -> None:
        """`forward`: the context of a forward whose graph is back-propagated (the engine's memory
        layout, `GeneratorGradients.forward`, adds G's linear gradients in place)."""
        self.generator = generator
        self.graphs = graphs
        self._forward = forward
        if graphs == "held":
            with forward():
                self._graph: Tensor | None = generator(latents, tasks)
            self.images = self._graph.detach()
            self._inputs: tuple[Tensor, Tensor | int] | None = None
        else:
            with torch.no_grad():
                self.images = generator(latents, tasks)
            self._graph = None
            self._inputs = (latents, tasks)

    @property
    def holds_graph(self) -> bool:
        return self._graph is not None

    def backpropagate(self, feedback: Tensor) -> None:
        """G's gradients += sum_x F(x) . dx/dw; afterwards nothing of the batch's graph is kept."""
        if self._graph is not None:
            graph, self._graph = self._graph, None
            graph.backward(feedback.view_as(graph))
            return
        if self._inputs is None:
            raise RuntimeError("this batch's feedback was already back-propagated")
        (latents, tasks), self._inputs = self._inputs, None
        buffers = [buffer.detach().clone() for buffer in self.generator.buffers()]
        with self._forward():
            images = self.generator(latents, tasks)
        images.backward(feedback.view_as(images))
        with torch.no_grad():  # after the backward, which checks that its inputs did not change
            for buffer, saved in zip(self.generator.buffers(), buffers, strict=True):
                buffer.copy_(saved)

    def drop(self) -> None:
        """No feedback will come (refused, or nobody used the batch for G): free what is kept."""
        self._graph = None
        self._inputs = None
