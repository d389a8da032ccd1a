"""The server's memory layout: bound gradients, linear layers adding their gradients in place, and
uploads received into the gradients' buffer (that part on a real two-process gloo group)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from entgan.gan import adam, balanced_tasks, build_models, generator_loss
from entgan.config import MemoryLayoutConfig, OptimizerConfig
from entgan.gan.feedback import FakesAwaitingFeedback
from entgan.gan.memory_layout import GeneratorGradients, bind_gradients, linear_gradients_in_place
from entgan.engine.compression import build_codec
from entgan.engine.parameters import numel
from entgan.engine.updates import UpdateLayout, UpdateReceiver, send_update

from conftest import gloo_transport, tiny_config


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    generator, discriminator = build_models(tiny_config(), torch.device("cpu"))
    discriminator.eval().requires_grad_(False)  # no dropout: two passes must see the same D
    return generator, discriminator


def _whole_batch_gradients(generator: nn.Module, discriminator: nn.Module, latents, tasks) -> list[torch.Tensor]:
    loss, _ = generator_loss(discriminator, generator(latents, tasks), tasks)
    loss.backward()
    return [parameter.grad.clone() for parameter in generator.parameters()]


def test_bound_gradients_are_zeroed_views_of_one_buffer() -> None:
    generator, _ = _models()
    parameters = list(generator.parameters())
    buffer = torch.full((numel(parameters) + 5,), 7.0)
    bind_gradients(parameters, buffer)
    offset = 0
    for parameter in parameters:
        assert parameter.grad.shape == parameter.shape and not parameter.grad.any()
        assert parameter.grad.data_ptr() == buffer[offset:].data_ptr()
        offset += parameter.numel()
    assert torch.equal(buffer[offset:], torch.full((5,), 7.0))  # the rest untouched


def test_binding_refuses_a_buffer_too_small_or_of_another_dtype() -> None:
    generator, _ = _models()
    size = numel(list(generator.parameters()))
    with pytest.raises(ValueError, match="holds .* values; the parameters need more"):
        bind_gradients(generator.parameters(), torch.zeros(size - 1))
    with pytest.raises(ValueError, match="torch.float64"):
        bind_gradients(generator.parameters(), torch.zeros(size, dtype=torch.float64))


@pytest.mark.parametrize("microbatch", [1, 3, 8, 12])
def test_in_place_microbatch_gradients_equal_one_whole_batch_pass(microbatch: int) -> None:
    generator, discriminator = _models()
    reference = copy.deepcopy(generator)
    latents = generator.sample_latent(12)
    tasks = balanced_tasks(12, 2, torch.device("cpu"))
    expected = _whole_batch_gradients(reference, discriminator, latents, tasks)

    gradients = GeneratorGradients(generator, MemoryLayoutConfig(), torch.device("cpu"))
    loss, _ = gradients.add_loss_gradients(discriminator, latents, tasks, microbatch)

    whole_loss, _ = generator_loss(discriminator, reference(latents, tasks), tasks)
    assert loss == pytest.approx(whole_loss.item(), rel=1e-5)
    for parameter, gradient in zip(generator.parameters(), expected, strict=True):
        torch.testing.assert_close(parameter.grad, gradient, rtol=1e-5, atol=1e-7)


def test_in_place_gradients_add_to_what_is_there_and_adam_steps_alike() -> None:
    """Two accumulations add up (gradient accumulation), and Adam on bound gradients takes the
    same step as on autograd's own."""
    generator, discriminator = _models()
    reference = copy.deepcopy(generator)
    latents = generator.sample_latent(8)
    tasks = balanced_tasks(8, 2, torch.device("cpu"))
    for _ in range(2):
        loss, _ = generator_loss(discriminator, reference(latents, tasks), tasks)
        loss.backward()
    gradients = GeneratorGradients(generator, MemoryLayoutConfig(), torch.device("cpu"))
    for _ in range(2):
        gradients.add_loss_gradients(discriminator, latents, tasks, 4)
    optimizer_config = OptimizerConfig()
    adam(generator.parameters(), 1e-3, optimizer_config).step()
    adam(reference.parameters(), 1e-3, optimizer_config).step()
    for parameter, expected in zip(generator.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(parameter, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("graphs", ["held", "recomputed"])
def test_feedback_back_propagated_into_bound_gradients_equals_autograds(graphs: str) -> None:
    """MD-GAN's and DANCE's servers: F . dX/dw added into G's bound buffer, in place, is the
    gradient autograd computes on its own."""
    generator, _ = _models()
    reference = copy.deepcopy(generator)
    latents = generator.sample_latent(6)
    tasks = balanced_tasks(6, 2, torch.device("cpu"))
    feedback = torch.randn(6, *reference(latents, tasks).shape[1:])
    reference(latents, tasks).backward(feedback)

    gradients = GeneratorGradients(generator, MemoryLayoutConfig(), torch.device("cpu"))
    optimizer = adam(generator.parameters(), 1e-3, OptimizerConfig())
    gradients.zero(optimizer)
    FakesAwaitingFeedback(generator, latents, tasks, graphs, gradients.forward).backpropagate(feedback)

    assert gradients.buffer is not None
    for parameter, expected in zip(generator.parameters(), reference.parameters(), strict=True):
        assert parameter.grad.untyped_storage().data_ptr() == gradients.buffer.untyped_storage().data_ptr()
        torch.testing.assert_close(parameter.grad, expected.grad, rtol=1e-5, atol=1e-7)


def test_layout_off_leaves_gradients_to_autograd_and_a_step_to_one_pass() -> None:
    generator, _ = _models()
    gradients = GeneratorGradients(generator, MemoryLayoutConfig(enabled=False), torch.device("cpu"))
    assert gradients.buffer is None and not gradients.in_place
    assert gradients.microbatch(64, 64) == 64
    assert GeneratorGradients(generator, MemoryLayoutConfig(), torch.device("cpu")).microbatch(64, 64) == 16


def test_linear_layer_of_any_input_rank_and_without_bias() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(5, 3, bias=False)
    reference = copy.deepcopy(layer)
    inputs = torch.randn(2, 4, 5, requires_grad=True)
    reference_inputs = inputs.detach().clone().requires_grad_(True)
    reference(reference_inputs).square().sum().backward()
    bind_gradients(layer.parameters(), torch.zeros(15))
    with linear_gradients_in_place(layer):
        outputs = layer(inputs)
    outputs.square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
    torch.testing.assert_close(inputs.grad, reference_inputs.grad)


def test_in_place_gradients_need_bound_gradients() -> None:
    generator, _ = _models()
    with pytest.raises(ValueError, match="bind_gradients"):
        with linear_gradients_in_place(generator):
            pass


# ------------------------------------------------------------------ real two-process exchange
LAYOUT = UpdateLayout.of([("trunk.weight", torch.zeros(4, 5)), ("heads.0.bias", torch.zeros(2))])
KEY = b"k" * 32
CODECS = [None, build_codec("fp16"), build_codec("int8", int8_chunk_size=8), build_codec("topk", topk_ratio=0.5)]


def _exchange(rank: int, store_dir: str) -> None:
    with gloo_transport(rank, store_dir, 2) as transport:
        values = torch.arange(22, dtype=torch.float32)
        if rank == 1:
            for round_index, codec in enumerate(CODECS):
                send_update(transport, KEY, values, torch.ones(3), LAYOUT, round_index, 0, "discriminator-update",
                            codec=codec).wait()
        else:
            storage = torch.full((22,), -1.0)
            receiver = UpdateReceiver(transport, {1: KEY}, 3, layout_of=lambda _: LAYOUT, max_norm=None,
                                      values_storage=storage, codecs=CODECS[2:])
            result = []
            for round_index in range(len(CODECS)):
                [update] = receiver.receive_all("discriminator-update", [1], round_index)
                result.append({
                    "accepted": type(update).__name__ == "Update",
                    "in_storage": update.values.data_ptr() == storage.data_ptr(),
                    "values": update.values.float().tolist(),
                })
                receiver.release()
            Path(store_dir, "result.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_uploads_land_decoded_in_the_given_storage_whatever_their_codec(tmp_path: Path) -> None:
    mp.start_processes(_exchange, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    result = json.loads((tmp_path / "result.json").read_text())
    values = torch.arange(22, dtype=torch.float32)
    for entry, codec in zip(result, CODECS, strict=True):
        seen = values if codec is None else codec.round_trip(values)
        assert entry == {"accepted": True, "in_storage": True, "values": seen.tolist()}, codec
    assert result[3]["values"][:11] == [0.0] * 11  # top-k really dropped the smaller half


# ------------------------------------------------------------------ every server that trains G
@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ren-serial", "dgan-3", "mdgan", "acgan-dance", "central"])
def test_every_server_that_trains_g_keeps_its_gradients_in_one_buffer(
    algorithm: str, tmp_path: Path, cache_dir: Path
) -> None:
    """The memory layout is the engine's, not EntGAN's: the live-tensor table of each such server
    shows G's gradients as one buffer of G's size after the run (autograd's would be freed)."""
    from entgan.engine.launch import launch_local
    from entgan.models import build_generator

    config = tiny_config(algorithm=algorithm, rounds=2, engine={"live_tensors": True})
    generator_bytes = 4 * numel(list(build_generator(config.model, config.image_shape, len(config.tasks)).parameters()))

    summary = launch_local(config, tmp_path / "on", cache_dir=cache_dir, show_progress=False)
    off = launch_local(
        tiny_config(algorithm=algorithm, rounds=2, engine={"live_tensors": True, "memory_layout": {"enabled": False}}),
        tmp_path / "off", cache_dir=cache_dir, show_progress=False,
    )

    # Central's server also trains D, whose gradients autograd keeps either way.
    assert summary["server_live_tensors"]["gradients"] - off["server_live_tensors"]["gradients"] == generator_bytes
    assert summary["server_live_tensors"]["peak_saved_activations"] > 0
