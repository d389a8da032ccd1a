"""EntGAN: one multi-task GAN learned across edge workers (DESIGN.md section 1).

`server.py` is the server's side (steps 3-4: where D is averaged, `EntGANServer.aggregate`; where
G trains, `train_global`), `worker.py` the edge worker's (steps 1-2); what only EntGAN uses lives
beside them: the generator's moving average, differential privacy, warm starts. Its control
modules (task schedulers, non-IID optimizer, overlap controller) are in `entgan.control`.

Who holds what: the server holds the global generator G and discriminator D; worker k holds G_k
(a copy of G) and its own D_k for its task. What moves each round: D_k up to the server (shared
trunk + its task's head), D_k to a peer (gossip), G down to the next round's participants, layer
by layer, and on sync rounds the averaged D down to them as well. With `control.compression` on
(for edge links), models travel in a codec (int8 by default) and D_k goes up as its change since
the sync, with error feedback; the server adds the participants' weighted mean change to its D.
With `control.edge_generator` on (off by default; it departs from DESIGN.md, where G trains only at
the server), each D step at a worker is followed by a G_k step against D_k through the same fake
batch (one G_k forward for both, as FL-GAN's local step), G_k's change goes up
beside D_k's, and the server adds their weighted mean to G before its own G steps (marked [edge G]).

    init: G_k := G, D_k := D for every worker k
    each round r:
      P_r := server_task_scheduler.participants(r)                  # a share of each task's workers, in turn
      worker k in P_r:
                 1. plan := worker_task_scheduler.plan()            # when G_k runs, fake reuse
                 2. fakes := G_k(z, task_k)                          # streams in as G arrives
                    D_k := D_k - lr * grad L_D(real_k, fakes)        # edge discriminator update
                    [edge G] G_k := G_k - lr * grad L_G(D_k(fakes))   # after each D step, same fakes
                    non-IID optimizer: swap D_k with a peer in P_r, mix, continual-learning update
                    send (trunk_k, head_k) to the server   [edge G] and G_k - G
      server:    3. D := sample-weighted running average of P_r's updates as they arrive
                    (trunk over all of them, head t over task t's; with compressed changes,
                    D := D + the weighted mean of the changes D_k - D);
                    every `aggregation.sync_every` rounds, send D down at once to P_{r+1} (D_k := D)
                    [edge G] G := G + the sample-weighted mean of P_r's G_k - G
                 4. n := server_task_scheduler.next_steps(feedback)
                    n times: G := G - lr * grad L_G(D(G(z, t), t))
                    send G to P_{r+1} layer by layer, asynchronously (overlap controller)
                    optionally G_avg := decay * G_avg + (1 - decay) * G: the G that is sampled
"""
from __future__ import annotations

from entgan.algorithms.entgan.server import EntGANServer
from entgan.algorithms.entgan.worker import EntGANWorker
from entgan.config import RunConfig
from entgan.engine.method import Capabilities, Method


class EntGAN(Method):
    name = "entgan"
    capabilities = Capabilities(resume=True, privacy=True, warm_start=True, partial_participation=True)
    server = EntGANServer
    worker = EntGANWorker

    @classmethod
    def default_participation(cls, config: RunConfig) -> float:
        """Half of each task's workers a round with the server task scheduler on (DESIGN step 4:
        it chooses whose updates to wait for), every worker with it off."""
        return 0.5 if config.control.server_scheduler.enabled else 1.0


__all__ = ["EntGAN", "EntGANServer", "EntGANWorker"]
