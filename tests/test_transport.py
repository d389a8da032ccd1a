"""Transport on a real two-process gloo group: layer-by-layer transfer equals whole transfer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from entgan.config import ModelConfig
from entgan.engine.parameters import LayerStream, flatten, model_tensors, unflatten_into
from entgan.models import build_generator

from conftest import gloo_transport

pytestmark = pytest.mark.slow

SHAPE = (1, 28, 28)


def _generator(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_generator(ModelConfig(hidden_dim=16, latent_dim=8, task_embedding_dim=4), SHAPE, 2)


def _exchange(rank: int, store_dir: str, out_dir: str) -> None:
    with gloo_transport(rank, store_dir, 3) as transport:
        z = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
        tasks = torch.tensor([0, 1, 0, 1])
        if rank == 0:
            source = _generator(seed=1)
            transport.send_to_many(model_tensors(source), [1, 2], "generator").wait()  # layer by layer
            transport.send([flatten(model_tensors(source))], 1, "discriminator").wait()  # one whole vector
            result = {"output": source(z, tasks).tolist()}
        elif rank == 1:
            layerwise, whole = _generator(seed=2), _generator(seed=3)
            stream = LayerStream(layerwise, transport.receive(model_tensors(layerwise), 0, "generator"))
            output = layerwise(z, tasks)  # computes while later layers may still be arriving
            stream.finish()
            buffer = torch.empty(sum(t.numel() for t in model_tensors(whole)))
            transport.receive([buffer], 0, "discriminator").wait()
            unflatten_into(buffer, model_tensors(whole))
            same = all(torch.equal(a, b) for a, b in zip(model_tensors(layerwise), model_tensors(whole)))
            # any-source receive from rank 2, and the counters
            incoming = torch.zeros(3)
            sender = transport.receive_from_any(incoming, "feedback", expected=[2])
            result = {"output": output.tolist(), "same": same, "sender": sender, "incoming": incoming.tolist(),
                      "received": dict(transport.counters.received)}
        else:
            target = _generator(seed=4)
            transport.receive(model_tensors(target), 0, "generator").wait()
            transport.send([torch.tensor([1.0, 2.0, 3.0])], 1, "feedback").wait()
            result = {"output": target(z, tasks).tolist(), "sent": dict(transport.counters.sent)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def test_layerwise_transfer_equals_whole_transfer(tmp_path: Path) -> None:
    mp.start_processes(_exchange, args=(str(tmp_path), str(tmp_path)), nprocs=3, start_method="spawn")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]

    assert results[1]["same"]
    assert results[1]["output"] == results[0]["output"] == results[2]["output"]
    assert results[1]["sender"] == 2 and results[1]["incoming"] == [1.0, 2.0, 3.0]
    model_bytes = sum(t.numel() * t.element_size() for t in model_tensors(_generator(0)))
    assert results[1]["received"] == {"generator": model_bytes, "discriminator": model_bytes, "feedback": 12}
    assert results[2]["sent"] == {"feedback": 12}
