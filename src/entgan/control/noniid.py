"""Non-IID optimizer: discriminators gossip with peers, then learn continually.

Edge discriminators see different data (other tasks, label skew), so averaging them at the
server alone lets them drift apart between rounds. Each gossip round a worker swaps D_k with a
peer (ring or random pairs, agreed by every worker from the shared seed without messages), mixes
the peer's parameters into its own, and then runs a continual-learning update: it keeps fitting its
own data while being held to what the peer knows, either by distilling the peer's outputs on local
fake data (learning without forgetting) or by an L2-SP anchor to the peer's parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from entgan.config import NonIIDConfig
from entgan.models.discriminator import Discriminator


class NonIIDOptimizer:
    def __init__(self, config: NonIIDConfig, worker_index: int, num_workers: int, seed: int) -> None:
        self.config = config
        self.worker_index = worker_index
        self.num_workers = num_workers
        self.seed = seed

    def is_gossip_round(self, round_index: int) -> bool:
        return self.config.enabled and self.num_workers > 1 and round_index % self.config.every == 0

    def partners(self, round_index: int, among: Sequence[int] | None = None) -> tuple[int, int] | None:
        """(send_to, receive_from) worker indices this round, or None when this worker sits out.

        `among`: the worker indices taking part in this round (ascending; default every worker);
        gossip pairs only those. Ring: send to the next of them, receive from the previous one.
        Random pairs: a permutation drawn from (seed, round) that every worker computes
        identically; partners swap both ways, and with an odd count one worker sits the round out.
        """
        peers = list(range(self.num_workers)) if among is None else list(among)
        if not self.is_gossip_round(round_index) or len(peers) < 2 or self.worker_index not in peers:
            return None
        me, count = peers.index(self.worker_index), len(peers)
        if self.config.topology == "ring":
            return peers[(me + 1) % count], peers[(me - 1) % count]
        order = np.random.default_rng([self.seed, round_index]).permutation(count)
        position = int(np.flatnonzero(order == me)[0])
        partner_position = position + 1 if position % 2 == 0 else position - 1
        if partner_position >= count:
            return None
        partner = peers[int(order[partner_position])]
        return partner, partner

    def mix(self, local: Discriminator, peer: Discriminator, only: Callable[[str], bool] | None = None) -> None:
        """Gossip averaging in parameter space: local := (1 - mixing) * local + mixing * peer, for
        every parameter, or for those whose name `only` accepts."""
        weight = self.config.mixing
        if weight == 0:
            return
        with torch.no_grad():
            for (name, own), theirs in zip(local.named_parameters(), peer.parameters(), strict=True):
                if only is None or only(name):
                    own.mul_(1 - weight).add_(theirs, alpha=weight)

    def regulariser(
        self,
        local: Discriminator,
        peer: Discriminator,
        fakes: torch.Tensor,
        local_fake_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The continual-learning term added to the local D loss after an exchange.

        `peer` is the teacher and should be in eval mode (no dropout), so its targets are stable.
        `local_fake_logits`, all of `local`'s heads on `fakes`, saves a forward pass when the
        caller has already computed them for its own loss.
        """
        if self.config.method == "l2sp":
            squared = [
                (own - theirs.detach()).pow(2).sum()
                for own, theirs in zip(local.parameters(), peer.parameters(), strict=True)
            ]
            return self.config.weight * torch.stack(squared).sum()
        with torch.no_grad():
            teacher = torch.sigmoid(peer.all_heads(fakes))
        if local_fake_logits is None:
            local_fake_logits = local.all_heads(fakes)
        return self.config.weight * F.binary_cross_entropy_with_logits(local_fake_logits, teacher)
