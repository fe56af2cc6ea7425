"""The precision policy: gates and the zero-shot head in float32, fp16 signs that do not vanish."""

import json

import pytest
import torch

from counterattack import PGD, TTC, ImageRandomness
from counterattack.attacks import sign_gradient_steps
from counterattack.cli import main
from counterattack.precision import FP16_LOSS_SCALE, loss_scale, precision_context

from testkit import write_image_folder

EPS = 4 / 255


def rng(n: int, purpose: str = "defense") -> ImageRandomness:
    return ImageRandomness.from_seed(0, n, purpose)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "paper"])
def test_the_gate_and_the_head_stay_float32_under_autocast(random_classifier, images, precision):
    full = TTC()(random_classifier, images, rng(len(images)))
    with precision_context(images.device, precision):
        mixed = TTC()(random_classifier, images, rng(len(images)))
        encoded = random_classifier.encode_image(images)
    assert encoded.dtype != torch.float32  # the encoder itself does run in half precision here
    assert mixed.score.dtype == mixed.logits.dtype == torch.float32
    # The gate's passes leave autocast: tau is the float32 tau, bit for bit, so decisions cannot flip.
    assert torch.equal(mixed.score, full.score) and torch.equal(mixed.counterattacked, full.counterattacked)
    assert (mixed.images - images).abs().max() <= EPS + 1e-6


def test_fp16_scales_the_loss_so_gradient_signs_survive(random_classifier, images):
    anchor = random_classifier.encode_image(images).detach()

    def tiny_shift(moved: torch.Tensor) -> torch.Tensor:
        # A loss whose gradient underflows in fp16 unless it is scaled first.
        return 1e-7 * (random_classifier.encode_image(moved).float() - anchor).pow(2).sum()

    noise = ImageRandomness.from_seed(0, len(images)).uniform_like(images, -EPS, EPS)
    delta = torch.max(torch.min(noise, 1 - images), -images)  # images + delta stay pixels
    signs: list[torch.Tensor] = []
    with precision_context(images.device, "fp16"):
        assert loss_scale(images.device) == FP16_LOSS_SCALE
        list(sign_gradient_steps(tiny_shift, images, delta, EPS, 1 / 255, 1, signs))
    assert (signs[0] != 0).float().mean() > 0.5
    assert loss_scale(images.device) == 1.0


def test_attacks_keep_their_budget_under_bf16(random_classifier, images):
    labels = torch.arange(len(images)) % 10
    with precision_context(images.device, "bf16"):
        adversarial = PGD(eps=EPS, steps=3, step_size=1 / 255)(random_classifier, images, labels, rng(len(images), "a"))
    assert adversarial.dtype == torch.float32 and (adversarial - images).abs().max() <= EPS + 1e-6


def test_precision_of_each_part_is_recorded(tmp_path, random_clip_dir):
    folder = write_image_folder(tmp_path / "imgs", {"cat": 2, "dog": 2})
    base = ["eval", "--no-progress", "--workers", "0", "--model", f"local-dir:{random_clip_dir}",
            "--dataset", f"imagefolder:{folder}", "--attack-steps", "1"]
    assert main([*base, "--precision", "paper", "--out", str(tmp_path / "paper")]) == 0
    config = json.loads((tmp_path / "paper" / "results.json").read_text())["config"]
    assert config["precision"] == {"attack": "paper", "defense": "paper"}
    assert main([*base, "--defense-precision", "bf16", "--out", str(tmp_path / "mixed")]) == 0
    config = json.loads((tmp_path / "mixed" / "results.json").read_text())["config"]
    assert config["precision"] == {"attack": "fp32", "defense": "bf16"}
