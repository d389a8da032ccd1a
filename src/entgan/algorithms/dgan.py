"""Wang & Wang, "Distributed Generative Adversarial Net" (Distributed-GAN, arXiv 1911.08128):
users train discriminators on their own data; the server trains one generator against them.

Who holds what: the server holds G; user (worker) k holds a copy of G and its discriminator D_k,
trained on local real data vs. G's fakes. The three approaches differ in what the server makes of
the users' discriminators.

Approach 1 (`dgan-1`, selective updates after Shokri & Shmatikov's distributed selective SGD):
the server keeps one global D, built from the largest entries of the users' updates.

    init: G_k := G, D_k := D for every user k
    round:
      user k:   D_k := D                       (download the whole global D)
                d_steps times: D_k := D_k - lr * grad L_D(real_k, G(z, task_k))
                delta_k := D_k - D              (trunk + own task's head)
                upload the `baselines.dgan.select_fraction` entries of delta_k largest in
                magnitude, as (index, value) pairs
      server:   for every entry i uploaded by any user:
                    D[i] += sample-weighted mean of the delta_k[i] uploaded for it
                g_steps times: G := G - lr * grad L_G(D(G(z, t), t))
                send G, D to every user

    Shokri's server adds each upload to the global parameters; there every participant starts
    from the latest parameters. Here the K users of a round start from the same D, so adding
    all K updates would scale the step by up to K; each entry therefore moves by the mean of the
    updates uploaded for it, weighted by sample counts (Shokri's rule when one user uploads it,
    EntGAN's averaging rule, trunk over all users and head over its task's users, when all do).

On the engine's hooks (`engine.method`): users run `server_generator.DiscriminatorWorker`
(approach 1's uploads only the selected entries); the server's `aggregate` applies the selected
updates (1) or keeps each user's D_k (2, 3), `train_global` trains G against the approach's
critics, `send_down` sends G (and, in approach 1, D).

Approaches 2 and 3: no global D. Each user's D_k stays its own from the common initial D on; the
users upload D_k (trunk + own task's head) every round and the server keeps the latest copy of each.

    round:
      user k:   d_steps times: D_k := D_k - lr * grad L_D(real_k, G(z, task_k))
                upload D_k
      server:   D^k := the uploaded D_k, for every user k
      (2, `dgan-2`) g_steps times: G := G - lr * grad L_G(mean_k D^k(G(z, t), t))
                    the mean of the discriminators' outputs (probabilities of "real"),
                    over the users of task t, weighted by their sample counts
      (3, `dgan-3`) g_steps times, turn j = 0, 1, 2, ... (kept across rounds):
                    G := G - lr * grad L_G(D^{k_t(j)}(G(z, t), t)), where k_t(j) is the
                    (j mod n_t)-th of task t's n_t users: G meets each discriminator in turn
                send G to every user

Carried to several tasks (the paper has one): a user trains only its own task's head of the
shared multi-head D; approach 1 moves the trunk by the mean over every user that uploaded an entry
and a head's entries over that task's users only; approaches 2 and 3 route each generated sample
to the discriminators of its task's users (`TaskRoutedCritic`), averaging their outputs (2) or
taking them in turn (3). With the engine's participation below 1 (`engine.participation`) a round
hears from its users only; approaches 2 and 3 keep the latest D_k of the others.

Where the discriminators' outputs are computed: at the server, which holds the K uploaded
discriminators. This is how we read the paper's set-up (a cloud server with the computing power
trains the generator; users keep only their data and their discriminator), and it keeps the
three approaches on the same footing: in all three, users upload discriminator parameters and
the server alone trains G. Consequences: the server holds K copies of D (K x |D| parameters,
e.g. 4 x 2.2 MB for the demo's MLP; Ren's server too keeps the K uploads until all have arrived),
where EntGAN's adds each upload into its one D as it is read; per round each user uploads
|trunk + head| values and downloads G, and nothing else, whatever the number of G steps. The
alternative (fakes sent to users, outputs and gradients back, as in MD-GAN) would keep the server
at one G, but would need a round trip to every user per G step and send batch_size images each
way per user per step.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from entgan.algorithms.aggregation import DiscriminatorLayout
from entgan.algorithms.server_generator import DiscriminatorStats, DiscriminatorWorker, GeneratorServer
from entgan.engine.method import Capabilities, Method
from entgan.engine.parameters import flatten, unflatten_into
from entgan.engine.updates import Update, UpdateLayout
from entgan.models.discriminator import Discriminator


# ---------------------------------------------------------------------- approach 1: selection
def selected_count(size: int, fraction: float) -> int:
    """How many of `size` update entries a user uploads (at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"baselines.dgan.select_fraction must be in (0, 1], found {fraction}")
    return max(1, min(size, round(fraction * size)))


def select_largest(update: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (ascending) and values of the `fraction` of a flat update's entries largest in
    magnitude (Shokri & Shmatikov's selection)."""
    count = selected_count(update.numel(), fraction)
    indices = update.abs().topk(count, sorted=False).indices.sort().values
    return indices, update[indices]


def pack_selected(indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """[values, indices] as one float32 vector, the form the engine's update envelope carries:
    the indices' int32 bits travel as float32 (4 bytes per index, exact at any model size)."""
    return torch.cat([values.to(torch.float32), indices.to(torch.int32).view(torch.float32)])


def unpack_selected(payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_selected`: (indices as int64, values)."""
    values, index_bits = payload.split(payload.numel() // 2)
    return index_bits.contiguous().view(torch.int32).to(torch.int64), values


class SelectedUpdateAverager:
    """Per-entry, sample-weighted mean of the update entries users uploaded, over the users that
    uploaded each entry; entries nobody uploaded do not move.

    Accumulated in arrival order in two vectors covering the whole D (trunk, then every task's
    head), so memory does not grow with the number of users. A task-t user's update vector is
    [trunk, head t] (`DiscriminatorLayout`); its indices are mapped to that head's place.
    """

    def __init__(self, layout: DiscriminatorLayout, device: torch.device | None = None) -> None:
        self.layout = layout
        size = layout.trunk_size + len(layout.head_names) * layout.head_size
        self._weighted_sum = torch.zeros(size, dtype=torch.float64, device=device)
        self._weight = torch.zeros(size, dtype=torch.float64, device=device)

    def add(self, indices: torch.Tensor, values: torch.Tensor, task: int, num_samples: float) -> None:
        if num_samples <= 0:
            raise ValueError(f"update weight must be positive, found {num_samples}")
        if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < self.layout.update_size:
            raise ValueError(f"update indices must lie in [0, {self.layout.update_size})")
        trunk = self.layout.trunk_size
        positions = torch.where(indices < trunk, indices, indices + task * self.layout.head_size)
        self._weighted_sum.index_add_(0, positions, values.to(torch.float64) * num_samples)
        self._weight.index_add_(0, positions, torch.full_like(positions, num_samples, dtype=torch.float64))

    def mean_update(self) -> torch.Tensor:
        """The step each entry of [trunk, head 0, head 1, ...] takes (zero where none was uploaded)."""
        uploaded = self._weight > 0
        mean = torch.zeros_like(self._weighted_sum)
        mean[uploaded] = self._weighted_sum[uploaded] / self._weight[uploaded]
        return mean.to(torch.float32)

    def apply_to(self, discriminator: Discriminator) -> None:
        """D += the mean update, in place."""
        state = discriminator.state_dict(keep_vars=True)
        names = self.layout.trunk_names + [name for head in self.layout.head_names for name in head]
        tensors = [state[name].data for name in names]
        unflatten_into(flatten(tensors) + self.mean_update(), tensors)

    def reset(self) -> None:
        self._weighted_sum.zero_()
        self._weight.zero_()


class SelectiveUpdatesServer(GeneratorServer):
    """Approach 1: D[i] += the sample-weighted mean of the delta_k[i] uploaded for entry i."""

    def setup(self) -> None:
        super().setup()
        self.select_fraction = self.config.baselines.dgan.select_fraction
        self.averager = SelectedUpdateAverager(self.layout, self.context.device)

    def upload_layout(self, task: int) -> UpdateLayout:
        return selected_upload_layout(self.layout.update_size, self.config.baselines.dgan.select_fraction)

    def aggregate(self, round_index: int, kind: str, accepted: Iterator[Update]) -> None:
        self.averager.reset()
        for update in accepted:
            indices, selected = unpack_selected(update.values)
            self.averager.add(indices, selected, self.context.task_of(update.rank), self.sample_counts[update.rank])
        self.settle_discriminator_send()
        self.averager.apply_to(self.D)  # D[i] += mean of the uploaded delta_k[i]

    def train_global(self, round_index: int) -> dict[str, float]:
        return self.train_generator([self.D] * self.steps.g_steps)


class SelectiveUpdatesWorker(DiscriminatorWorker):
    """Approach 1's user: uploads the largest entries of delta_k = D_k - D."""

    def upload_layout(self, task: int) -> UpdateLayout:
        return selected_upload_layout(self.layout.update_size, self.config.baselines.dgan.select_fraction)

    def train_local_discriminator(self) -> DiscriminatorStats:
        self.downloaded = flatten(self.layout.update_tensors(self.D, self.context.task))
        return super().train_local_discriminator()

    def upload_payload(self) -> torch.Tensor:
        delta = flatten(self.layout.update_tensors(self.D, self.context.task)) - self.downloaded
        return pack_selected(*select_largest(delta, self.config.baselines.dgan.select_fraction))


def selected_upload_layout(update_size: int, fraction: float) -> UpdateLayout:
    """The selected entries' values (float32), then their indices (int32, carried as float32 bits)."""
    shape = (selected_count(update_size, fraction),)
    return UpdateLayout(
        names=("selected.values", "selected.indices"),
        shapes=(shape, shape),
        dtypes=(str(torch.float32), str(torch.int32)),
    )


class DGANSelectiveUpdates(Method):
    name = "dgan-1"
    capabilities = Capabilities(resume=True, partial_participation=True)
    server = SelectiveUpdatesServer
    worker = SelectiveUpdatesWorker


# ------------------------------------------------------------- approaches 2 and 3: K discriminators
class AveragedOutputs(nn.Module):
    """A critic whose probability that an image is real is the weighted mean of several
    discriminators' probabilities; it returns the logit of that mean, so the usual
    `generator_loss` (non-saturating, -log of the probability) applies unchanged."""

    def __init__(self, discriminators: list[Discriminator], weights: list[float]) -> None:
        super().__init__()
        if not discriminators or len(discriminators) != len(weights) or min(weights) <= 0:
            raise ValueError("need one positive weight per discriminator, and at least one discriminator")
        self.discriminators = list(discriminators)  # the server's copies; not owned, not registered
        total = float(sum(weights))
        self.log_weights = torch.tensor([w / total for w in weights]).log()

    def forward(self, images: torch.Tensor, task: torch.Tensor | int) -> torch.Tensor:
        logits = torch.stack([discriminator(images, task) for discriminator in self.discriminators])
        log_weights = self.log_weights.to(logits.device).unsqueeze(1)
        log_real = torch.logsumexp(F.logsigmoid(logits) + log_weights, dim=0)  # log mean p
        log_fake = torch.logsumexp(F.logsigmoid(-logits) + log_weights, dim=0)  # log mean (1 - p)
        return log_real - log_fake


class TaskRoutedCritic(nn.Module):
    """Scores each image with its own task's critic (a critic per task, each called once on the
    images of its task)."""

    def __init__(self, critics: list[nn.Module]) -> None:
        super().__init__()
        self.critics = list(critics)  # not registered: views over the server's discriminators

    def forward(self, images: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        logits = images.new_zeros(images.shape[0])
        for task, critic in enumerate(self.critics):
            members = (tasks == task).nonzero().squeeze(1)
            if members.numel():
                logits = logits.index_put((members,), critic(images[members], task))
        return logits


class _UserDiscriminatorsServer(GeneratorServer):
    """Approaches 2 and 3: the server keeps every user's latest D_k; no D goes down."""

    discriminator_comes_down = False

    def setup(self) -> None:
        super().setup()  # every user starts from this initial D
        self.discriminators = {rank: copy.deepcopy(self.D) for rank in self.context.worker_ranks}
        del self.D  # from here on the server holds the users' discriminators, not a global one
        self.users_of_task = [
            [rank for rank in self.context.worker_ranks if self.context.task_of(rank) == task]
            for task in range(len(self.config.tasks))
        ]
        if self.resumed_state is not None:  # the D^k as the checkpointed round left them
            discriminators = self.resumed_state["discriminators"]
            for rank, discriminator in self.discriminators.items():
                discriminator.load_state_dict(discriminators[str(rank)])

    def absorb_upload(self, rank: int, values: torch.Tensor) -> None:
        """D^k := the uploaded D_k (trunk + its task's head); a refused upload leaves D^k as it was."""
        unflatten_into(values, self.layout.update_tensors(self.discriminators[rank], self.context.task_of(rank)))

    def train_global(self, round_index: int) -> dict[str, float]:
        return self.train_generator(self.critics_for_round())

    @abstractmethod
    def critics_for_round(self) -> list[nn.Module]:
        """The critic of each of this round's g_steps G steps."""

    def discriminator_state(self) -> dict[str, Any]:
        return {"discriminators": {str(rank): d.state_dict() for rank, d in self.discriminators.items()}}


class _UserDiscriminatorsWorker(DiscriminatorWorker):
    discriminator_comes_down = False


class AveragedOutputsServer(_UserDiscriminatorsServer):
    """Approach 2: G trains against the mean of its task's users' outputs."""

    def setup(self) -> None:
        super().setup()
        self.averaged_outputs = TaskRoutedCritic(
            [
                AveragedOutputs(
                    [self.discriminators[rank] for rank in users],
                    [float(self.sample_counts[rank]) for rank in users],
                )
                for users in self.users_of_task
            ]
        )

    def critics_for_round(self) -> list[nn.Module]:
        return [self.averaged_outputs] * self.steps.g_steps


class EachInTurnServer(_UserDiscriminatorsServer):
    """Approach 3: G meets each of its task's users' discriminators in turn."""

    def setup(self) -> None:
        super().setup()
        self.turn = 0 if self.resumed_state is None else int(self.resumed_state["turn"])

    def critics_for_round(self) -> list[nn.Module]:
        critics: list[nn.Module] = []
        for _ in range(self.steps.g_steps):
            critics.append(
                TaskRoutedCritic(
                    [self.discriminators[users[self.turn % len(users)]] for users in self.users_of_task]
                )
            )
            self.turn += 1
        return critics

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "turn": self.turn}


class DGANAveragedOutputs(Method):
    name = "dgan-2"
    capabilities = Capabilities(resume=True, partial_participation=True)
    server = AveragedOutputsServer
    worker = _UserDiscriminatorsWorker


class DGANEachInTurn(Method):
    name = "dgan-3"
    capabilities = Capabilities(resume=True, partial_participation=True)
    server = EachInTurnServer
    worker = _UserDiscriminatorsWorker
