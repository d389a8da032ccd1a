"""Aggregation helpers shared by the methods with a server: weighted averages of parameter sets.

The multi-task rule of EntGAN: the shared trunk is averaged over all workers, each task's head
over that task's workers only, both weighted by sample counts. Every server that averages does it
in the engine's memory layout: updates are summed in float32 straight into the model's own
tensors, in a fixed (rank) order so the sum is the same every run, with no buffer beyond the model
(never K copies, no running sum):

- `InPlaceDiscriminatorAverage` (EntGAN, Ren, FL-GAN) and `InPlaceModelAverage` (FL-GAN's G):
  the weighted mean of uploaded models;
- `InPlaceDiscriminatorChange` and `InPlaceModelChange` (EntGAN and FL-GAN with coded transfers,
  EntGAN's G under `control.edge_generator`): the model plus the weighted mean of uploaded changes.

`DiscriminatorUploads` and `ModelUploads` fold a round's accepted uploads with one or the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from entgan.engine.parameters import numel
from entgan.engine.updates import Update, UpdateLayout
from entgan.models.discriminator import Discriminator, head_prefix, is_shared


class DiscriminatorLayout:
    """Which of a discriminator's tensors are shared (trunk) and which belong to each task head.

    An *update* from a worker of task t is the flat vector [trunk tensors..., head t tensors...];
    every head has the same shape, so every worker's update has the same length.
    """

    def __init__(self, discriminator: Discriminator) -> None:
        state = discriminator.state_dict(keep_vars=True)
        self.trunk_names = [name for name in state if is_shared(name)]
        self.head_names = [
            [name for name in state if name.startswith(head_prefix(task))] for task in range(discriminator.num_tasks)
        ]
        unassigned = set(state) - set(self.trunk_names) - {n for names in self.head_names for n in names}
        if unassigned:
            raise ValueError(f"discriminator tensors outside trunk/heads: {sorted(unassigned)}")
        self.trunk_size = numel([state[name] for name in self.trunk_names])
        self.head_size = numel([state[name] for name in self.head_names[0]])

    @property
    def update_size(self) -> int:
        return self.trunk_size + self.head_size

    def update_tensors(self, discriminator: Discriminator, task: int) -> list[torch.Tensor]:
        return [tensor for _, tensor in self.named_update_tensors(discriminator, task)]

    def named_update_tensors(self, discriminator: Discriminator, task: int) -> list[tuple[str, torch.Tensor]]:
        state = discriminator.state_dict(keep_vars=True)
        return [(name, state[name].data) for name in self.trunk_names + self.head_names[task]]


class InPlaceDiscriminatorAverage:
    """The same multi-task weighted average, accumulated straight into D's own tensors.

    No buffer beyond D: the first accepted update of a part (trunk, or a task's head) overwrites it
    scaled by its weight, later ones are added, and `finish` divides by the weight total. Updates
    must be added in a fixed order (e.g. by rank) for float32 sums to be reproducible run to run.
    A part that receives no update keeps its previous values.
    """

    def __init__(self, layout: DiscriminatorLayout, num_tasks: int) -> None:
        self.layout = layout
        self._trunk_weight = 0.0
        self._head_weights = [0.0] * num_tasks
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def reset(self) -> None:
        self._trunk_weight = 0.0
        self._head_weights = [0.0] * len(self._head_weights)
        self._count = 0

    def add(self, discriminator: Discriminator, update: torch.Tensor, task: int, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"update weight must be positive, found {weight}")
        if update.numel() != self.layout.update_size:
            raise ValueError(f"update has {update.numel()} values, expected {self.layout.update_size}")
        state = discriminator.state_dict(keep_vars=True)
        trunk, head = update.reshape(-1).split([self.layout.trunk_size, self.layout.head_size])
        _add_weighted([state[name].data for name in self.layout.trunk_names], trunk, weight, self._trunk_weight == 0)
        names = self.layout.head_names[task]
        _add_weighted([state[name].data for name in names], head, weight, self._head_weights[task] == 0)
        self._trunk_weight += weight
        self._head_weights[task] += weight
        self._count += 1

    def finish(self, discriminator: Discriminator) -> None:
        """Turn the weighted sums into means (parts without an update are left as they were)."""
        state = discriminator.state_dict(keep_vars=True)
        with torch.no_grad():
            if self._trunk_weight:
                for name in self.layout.trunk_names:
                    _divide(state[name].data, self._trunk_weight)
            for task, total in enumerate(self._head_weights):
                if total:
                    for name in self.layout.head_names[task]:
                        _divide(state[name].data, total)


def _divide(tensor: torch.Tensor, total: float) -> None:
    """tensor /= total in place; an integer tensor (a counter) rounded."""
    if tensor.is_floating_point():
        tensor.div_(total)
    else:
        tensor.copy_(_counter_share(tensor, 1 / total, tensor.dtype))


def _counter_share(values: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """round(values * scale) in an integer `dtype`: how a counter among a model's tensors (BatchNorm's
    `num_batches_tracked`) takes its part of a weighted sum or mean, which an integer tensor cannot
    hold as a fraction."""
    return torch.round(values.to(torch.float64) * scale).to(dtype)



def _add_weighted(tensors: Sequence[torch.Tensor], values: torch.Tensor, weight: float, overwrite: bool = False) -> None:
    """tensors += weight * values (flat, in `tensors`' order), or with `overwrite` tensors := it.
    An integer tensor (a counter) takes its share rounded (`_counter_share`)."""
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            part = values[offset : offset + tensor.numel()].view_as(tensor)
            offset += tensor.numel()
            if not tensor.is_floating_point():
                share = _counter_share(part, weight, tensor.dtype)
                if overwrite:
                    tensor.copy_(share)
                else:
                    tensor.add_(share)
            elif overwrite:  # widened first: a half-precision upload times its weight can overflow
                torch.mul(part.to(tensor.dtype), weight, out=tensor)
            else:
                tensor.add_(part, alpha=weight)


class InPlaceDiscriminatorChange:
    """The same multi-task weighted average, from uploads that carry changes instead of models.

    When every worker's D_k started the round from the server's D (a sync every round), the
    weighted mean of the D_k is D plus the weighted mean of their changes, so each change is added
    to D in place, scaled by its worker's share of its part's weight: the trunk's over every
    participant, head t's over task t's participants. The shares are fixed by who takes part, so
    nothing but D is held; a participant whose upload is refused counts as no change (its share of
    the step is not taken).
    """

    def __init__(self, layout: DiscriminatorLayout, num_tasks: int) -> None:
        self.layout = layout
        self.num_tasks = num_tasks
        self._trunk_total = 0.0
        self._head_totals = [0.0] * num_tasks

    def expect(self, weights_by_task: Sequence[tuple[int, float]]) -> None:
        """The round's participants, as (task, weight) pairs: the totals each part's shares are of."""
        self._trunk_total = sum(weight for _, weight in weights_by_task)
        self._head_totals = [0.0] * self.num_tasks
        for task, weight in weights_by_task:
            self._head_totals[task] += weight

    def add(self, discriminator: Discriminator, change: torch.Tensor, task: int, weight: float) -> None:
        if change.numel() != self.layout.update_size:
            raise ValueError(f"change has {change.numel()} values, expected {self.layout.update_size}")
        if not 0 < weight <= self._head_totals[task]:
            raise ValueError(f"weight {weight} of a task-{task} change is not part of the expected participants")
        state = discriminator.state_dict(keep_vars=True)
        trunk, head = change.reshape(-1).split([self.layout.trunk_size, self.layout.head_size])
        _add_weighted([state[name].data for name in self.layout.trunk_names], trunk, weight / self._trunk_total)
        names = self.layout.head_names[task]
        _add_weighted([state[name].data for name in names], head, weight / self._head_totals[task])


class InPlaceModelChange:
    """A model plus the weighted mean of changes made from it, added to the model in place.

    The single-part form of `InPlaceDiscriminatorChange` (EntGAN's G under
    `control.edge_generator`): each accepted change is added as it arrives, scaled by its worker's
    share of the round's expected total weight, so nothing but the model is held (no running sum).
    A participant whose upload is refused counts as no change, as for D.
    """

    def __init__(self) -> None:
        self._total = 0.0

    def expect(self, weights: Sequence[float]) -> None:
        """The round's participants' weights: the total each change's share is of."""
        self._total = float(sum(weights))

    def add(self, tensors: Sequence[torch.Tensor], change: torch.Tensor, weight: float) -> None:
        if change.numel() != numel(tensors):
            raise ValueError(f"change has {change.numel()} values, expected {numel(tensors)}")
        if not 0 < weight <= self._total:
            raise ValueError(f"weight {weight} is not part of the expected participants' total {self._total}")
        _add_weighted(tensors, change.reshape(-1), weight / self._total)


class InPlaceModelAverage:
    """A weighted mean of whole models accumulated straight into the model's own tensors.

    The single-part form of `InPlaceDiscriminatorAverage` (FL-GAN's G when whole models are
    uploaded): the first accepted model overwrites the tensors scaled by its weight, later ones are
    added, and `finish` divides by the weight total; with none, the model keeps its values. Models
    must be added in a fixed order (e.g. by rank) for float32 sums to be reproducible run to run.
    """

    def __init__(self) -> None:
        self._total = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def reset(self) -> None:
        self._total = 0.0
        self._count = 0

    def add(self, tensors: Sequence[torch.Tensor], values: torch.Tensor, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"update weight must be positive, found {weight}")
        if values.numel() != numel(tensors):
            raise ValueError(f"update has {values.numel()} values, expected {numel(tensors)}")
        _add_weighted(tensors, values.reshape(-1), weight, overwrite=self._count == 0)
        self._total += weight
        self._count += 1

    def finish(self, tensors: Sequence[torch.Tensor]) -> None:
        """Turn the weighted sum into the mean (nothing to do when no model was added)."""
        if self._count:
            with torch.no_grad():
                for tensor in tensors:
                    _divide(tensor, self._total)


class DiscriminatorUploads:
    """A round's D uploads folded into D in place, in the order they are read: the weighted
    multi-task mean of the D_k from whole models (`InPlaceDiscriminatorAverage`), or D plus the
    weighted mean of their changes since the sync (`InPlaceDiscriminatorChange`). What EntGAN's,
    FL-GAN's and Ren's servers do with the D_k they receive."""

    def __init__(self, layout: DiscriminatorLayout, num_tasks: int, changes: bool) -> None:
        self.average = None if changes else InPlaceDiscriminatorAverage(layout, num_tasks)
        self.change = InPlaceDiscriminatorChange(layout, num_tasks) if changes else None

    def fold(
        self,
        discriminator: Discriminator,
        accepted: Iterable[Update],
        participants: Sequence[int],
        task_of: Callable[[int], int],
        weight_of: Mapping[int, float],
    ) -> None:
        """Fold the round's accepted uploads into `discriminator`; `participants` (every rank due
        this round) set each change's share, so a refused change counts as none."""
        if self.change is not None:
            self.change.expect([(task_of(rank), weight_of[rank]) for rank in participants])
            for update in accepted:
                self.change.add(discriminator, update.values, task_of(update.rank), weight_of[update.rank])
            return
        assert self.average is not None
        self.average.reset()
        for update in accepted:
            self.average.add(discriminator, update.values, task_of(update.rank), weight_of[update.rank])
        self.average.finish(discriminator)


class ModelUploads:
    """The same for a whole model (a G): the weighted mean of the uploaded models
    (`InPlaceModelAverage`), or the model plus the weighted mean of their changes
    (`InPlaceModelChange`). FL-GAN's G, and EntGAN's under `control.edge_generator` (changes)."""

    def __init__(self, changes: bool) -> None:
        self.average = None if changes else InPlaceModelAverage()
        self.change = InPlaceModelChange() if changes else None

    def fold(
        self,
        tensors: Sequence[torch.Tensor],
        accepted: Iterable[Update],
        participants: Sequence[int],
        weight_of: Mapping[int, float],
    ) -> None:
        """Fold the round's accepted uploads into `tensors` (a model's, in `flatten` order)."""
        if self.change is not None:
            self.change.expect([weight_of[rank] for rank in participants])
            for update in accepted:
                self.change.add(tensors, update.values, weight_of[update.rank])
            return
        assert self.average is not None
        self.average.reset()
        for update in accepted:
            self.average.add(tensors, update.values, weight_of[update.rank])
        self.average.finish(tensors)


def discriminator_update_layouts(layout: DiscriminatorLayout, discriminator: Discriminator) -> list[UpdateLayout]:
    """Per task t, what a task-t worker's discriminator upload is made of: the trunk and head t."""
    return [
        UpdateLayout.of(layout.named_update_tensors(discriminator, task)) for task in range(discriminator.num_tasks)
    ]
