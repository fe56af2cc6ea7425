"""The counter-based per-image generator: a pure function, equal to its plain-Python definition."""

import pytest
import torch

from counterattack import ImageRandomness
from counterattack.randomness import reference_uniform

IDS = [0, 41, "cat/0001.png", "ünïcode/ä.jpg"]


def test_uniforms_equal_the_pure_python_definition_bit_for_bit():
    rng = ImageRandomness.for_images(7, "cifar10", IDS, "defense-adv")
    shape = (len(IDS), 3, 5, 7)
    for draw in range(3):
        uniforms = rng.uniform_like(torch.empty(shape), 0.0, 1.0)
        for i, image_id in enumerate(IDS):
            assert uniforms[i].flatten().tolist() == reference_uniform(7, "cifar10", image_id, "defense-adv", draw, 105)


def test_an_images_numbers_do_not_depend_on_its_batch():
    shape = (3, 8, 8)
    whole = ImageRandomness.for_images(0, "d", IDS, "p").uniform_like(torch.empty(len(IDS), *shape), -1, 1)
    for i in reversed(range(len(IDS))):
        alone = ImageRandomness.for_images(0, "d", [IDS[i]], "p").uniform_like(torch.empty(1, *shape), -1, 1)
        assert torch.equal(alone[0], whole[i])


@pytest.mark.parametrize("change", ["seed", "dataset", "purpose", "draw"])
def test_every_part_of_the_key_changes_the_numbers(change):
    parts = {"seed": 0, "dataset": "d", "purpose": "p"}
    base = ImageRandomness.for_images(parts["seed"], parts["dataset"], IDS, parts["purpose"])
    first = base.uniform_like(torch.empty(len(IDS), 3, 4, 4), 0, 1)
    if change == "draw":
        other = base.uniform_like(torch.empty(len(IDS), 3, 4, 4), 0, 1)
    else:
        parts[change] = 1 if change == "seed" else "other"
        other = ImageRandomness.for_images(parts["seed"], parts["dataset"], IDS, parts["purpose"]).uniform_like(
            torch.empty(len(IDS), 3, 4, 4), 0, 1)
    assert (first != other).float().mean() > 0.99


def test_uniforms_fill_the_interval_evenly():
    uniforms = ImageRandomness.from_seed(0, 16).uniform_like(torch.empty(16, 3, 32, 32), -2.0, 2.0)
    assert uniforms.min() >= -2.0 and uniforms.max() < 2.0
    counts = torch.histc(uniforms, bins=8, min=-2.0, max=2.0)
    assert (counts / counts.mean() - 1).abs().max() < 0.03
    assert abs(uniforms.mean().item()) < 0.02 and uniforms.std().item() == pytest.approx(4 / 12**0.5, rel=0.01)


def test_noise_takes_the_images_dtype_and_device():
    noise = ImageRandomness.from_seed(0, 2).uniform_like(torch.empty(2, 3, 4, 4, dtype=torch.float64), 0, 1)
    assert noise.dtype == torch.float64 and noise.shape == (2, 3, 4, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_draws_equal_cpu_draws_bit_for_bit():
    shape = (len(IDS), 3, 64, 64)
    cpu = ImageRandomness.for_images(0, "d", IDS, "p").uniform_like(torch.empty(shape), 0, 1)
    cuda = ImageRandomness.for_images(0, "d", IDS, "p").uniform_like(torch.empty(shape, device="cuda"), 0, 1)
    assert torch.equal(cpu, cuda.cpu())
