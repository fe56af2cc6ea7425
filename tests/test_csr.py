"""CSR (Contrastive Spectral Rectification): the filter, the gate, the greedy rectification, its cost, its attacks."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from counterattack import PGD, AdaptiveAttack, ImageEncoder, ImageRandomness, ZeroShotClassifier, count_encoder_passes
from counterattack.defenses.csr import CSR, REFERENCE_SIDE, apply_mask, low_pass_mask

from testkit import assert_equal_up_to_sign_flips, threshold_between

DEFAULT_RADIUS_32 = 40 * 32 / REFERENCE_SIDE  # r = 40 bins at 224 px is 5.71 bins on a 32-px model


def rng(n: int, purpose: str = "csr") -> ImageRandomness:
    return ImageRandomness.from_seed(0, n, purpose)


def checkerboard(side: int = 32) -> torch.Tensor:
    """(-1)^(i + j): the single frequency (side/2, side/2), the highest there is."""
    i = torch.arange(side)
    return ((-1.0) ** (i[:, None] + i[None, :])).expand(3, side, side)


class TwoFeatures(nn.Module):
    """A hand-built linear encoder: f(z) = (mean(z), mean(z * checkerboard)), so every quantity has a closed form."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.stack([z.mean(dim=(1, 2, 3)), (z * checkerboard(z.shape[-1])).mean(dim=(1, 2, 3))], dim=-1)


@pytest.fixture(scope="module")
def hand_classifier() -> ZeroShotClassifier:
    # Pixels reach the encoder as they are.
    encoder = ImageEncoder(TwoFeatures(), (32, 32), mean=[0.0] * 3, std=[1.0] * 3)
    return ZeroShotClassifier(encoder, torch.eye(2), logit_scale=100.0, class_names=["flat", "checkered"])


def consistency_of(defense: CSR, classifier, images) -> torch.Tensor:
    with torch.no_grad():
        return defense.consistency(classifier.encoder, images)[0]


# -- the low-pass filter ---------------------------------------------------------------------------


def test_gaussian_filter_is_the_references_shifted_mask_at_224():
    """The spec's formula, written as the reference does it: fftshift, mask centred at (112, 112), back, real part."""
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    u = torch.arange(224, dtype=torch.float64)
    mask = torch.exp(-((u[:, None] - 112) ** 2 + (u[None, :] - 112) ** 2) / (2 * 40.0**2))
    shifted = torch.fft.fftshift(torch.fft.fft2(images.double()), dim=(-2, -1))
    expected = torch.fft.ifft2(torch.fft.ifftshift(shifted * mask, dim=(-2, -1))).real
    ours = apply_mask(images, low_pass_mask(224, 224, 40.0, 40.0))
    assert torch.allclose(ours.double(), expected, atol=1e-5)


def test_radius_scales_with_the_models_input_side(random_classifier):
    """A cosine of (2, 3) cycles per image keeps exp(-(2^2 + 3^2) / (2 r^2)) of its amplitude, r = 40 * 32 / 224."""
    i = torch.arange(32, dtype=torch.float32)
    wave = torch.cos(2 * math.pi * (2 * i[:, None] + 3 * i[None, :]) / 32).expand(1, 3, 32, 32)
    x_low = CSR().low_pass(random_classifier.encoder, 0.5 + 0.25 * wave)
    gain = math.exp(-(2**2 + 3**2) / (2 * DEFAULT_RADIUS_32**2))
    assert torch.allclose(x_low, 0.5 + 0.25 * gain * wave, atol=1e-5)
    assert CSR().model_radius(random_classifier.encoder) == pytest.approx((DEFAULT_RADIUS_32, DEFAULT_RADIUS_32))


def test_filter_runs_on_the_model_grid_for_other_image_sizes(random_classifier):
    """A 64-px image is resized as the encoder resizes it, then filtered on the encoder's 32-px grid."""
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    csr = CSR()
    x_low = csr.low_pass(random_classifier.encoder, images)
    assert x_low.shape == (2, 3, 32, 32) and x_low.min() >= 0 and x_low.max() <= 1
    resized = F.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    mask = low_pass_mask(32, 32, DEFAULT_RADIUS_32, DEFAULT_RADIUS_32)
    assert torch.allclose(x_low, apply_mask(resized, mask).clamp(0, 1), atol=1e-6)
    output = csr(random_classifier, images, rng(2))  # and the defense itself takes them
    assert output.images.shape == images.shape


@pytest.mark.parametrize("kind", ["butterworth", "ideal"])
def test_other_masks_follow_their_formulas(kind):
    mask = low_pass_mask(8, 8, 2.0, 2.0, kind, order=2)
    fy, fx = torch.fft.fftfreq(8, 1 / 8)[:, None], torch.fft.rfftfreq(8, 1 / 8)[None, :]
    distance_sq = (fy**2 + fx**2) / 4
    expected = 1 / (1 + distance_sq**2) if kind == "butterworth" else (distance_sq <= 1).float()
    assert torch.allclose(mask, expected.float())


# -- the gate and the greedy rectification, by hand -------------------------------------------------


def hand_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Image 0: 0.3 + 0.2 checkerboard, f = (0.3, 0.2), filtered to f = (0.3, 0.2 h).
    Image 1: flat 0.4, f = (0.4, 0)."""
    s = checkerboard()
    return torch.stack([0.3 + 0.2 * s, torch.full((3, 32, 32), 0.4)]), s


def unit(a: float, b: float) -> torch.Tensor:
    return F.normalize(torch.tensor([a, b], dtype=torch.float64), dim=0)


def test_gate_and_greedy_choice_by_hand(hand_classifier):
    """Default lambda and threshold, steps of 1/255: every step moves by -alpha * checkerboard.

    The Nyquist gain is h = exp(-2 * 16^2 / (2 r^2)). With phi = (c, d), 0 < d < c, the score's gradient
    orthogonal to phi is t (-d, c) with t < 0, so each pixel's sign is -s: S rises at every step and the
    last candidate wins.
    """
    images, s = hand_images()
    alpha = 1 / 255
    csr = CSR(step_size=alpha)
    output = csr(hand_classifier, images, rng(2))
    result = csr.purify(hand_classifier, images)

    h = math.exp(-2 * 16**2 / (2 * DEFAULT_RADIUS_32**2))
    a, b = unit(0.3, 0.2 * h), unit(0.3, 0.2)
    assert output.score.double()[0] == pytest.approx(float(a @ b), abs=1e-6)  # C(x) = cos(f(x), f(x_low))
    assert output.score[1] == pytest.approx(1.0, abs=1e-6)  # a flat image is its own low-pass
    assert output.counterattacked.tolist() == [True, False]

    expected_scores = [float(unit(0.3, 0.2 - k * alpha) @ (a - b)) for k in range(4)]
    assert result.scores[0].double().tolist() == pytest.approx(expected_scores, abs=1e-6)
    assert result.selected.tolist() == [3]
    assert torch.allclose(output.images[0], images[0] - 3 * alpha * s, atol=1e-6)
    assert torch.equal(output.images[1], images[1])
    expected_logits = 100 * torch.stack([unit(0.3, 0.2 - 3 * alpha), unit(0.4, 0.0)]).float()
    assert torch.allclose(output.logits, expected_logits, atol=1e-4)


def test_greedy_keeps_the_best_candidate_not_the_last(hand_classifier):
    """Pure attraction (lambda = 0) and steps of 0.3 overshoot:
    f goes (0.3, 0.2) -> (0.3, -0.1) -> back to x -> (0.3, -0.1).

    S_k = cos(f(x_k), a): x_1 scores best, x_3 ties it exactly, and the earliest of a tie is kept.
    """
    images, s = hand_images()
    csr = CSR(repulsion=0.0, eps=0.3, step_size=0.3)
    result = csr.purify(hand_classifier, images)
    h = math.exp(-2 * 16**2 / (2 * DEFAULT_RADIUS_32**2))
    a = unit(0.3, 0.2 * h)
    expected = [float(unit(0.3, d) @ a) for d in (0.2, -0.1, 0.2, -0.1)]
    assert result.scores[0].double().tolist() == pytest.approx(expected, abs=1e-6)
    assert result.scores[0, 3] == result.scores[0, 1]
    assert result.selected.tolist() == [1]
    assert torch.allclose(result.images[0], images[0] - 0.3 * s, atol=1e-6)


def test_greedy_can_keep_the_input_itself(hand_classifier):
    """Already almost flat, f = (0.3, 0.001): the first step of 0.3 overshoots to (0.3, -0.299), the second comes
    back to x exactly, the third overshoots again. S(x) is the best and ties S(x_2): x itself is kept."""
    s = checkerboard()
    images = torch.stack([0.3 + 0.001 * s, torch.full((3, 32, 32), 0.4)])
    result = CSR(tau_thres=2.0, repulsion=0.0, eps=0.3, step_size=0.3).purify(hand_classifier, images)
    assert result.flagged.tolist() == [True, True]
    assert result.scores[0, 2] == result.scores[0, 0] and result.scores[0, 1] < result.scores[0, 0]
    assert result.selected[0] == 0
    assert torch.equal(result.images[0], images[0])


# -- budget, determinism, batching, cost --------------------------------------------------------------


def test_rectified_images_stay_in_the_ball_and_the_box(random_classifier, images):
    csr = CSR(tau_thres=2.0)  # C <= 1 < 2: every image is flagged
    output = csr(random_classifier, images, rng(len(images)))
    delta = output.images - images
    assert output.counterattacked.all()
    assert delta.abs().max() <= csr.eps + 1e-6
    assert output.images.min() >= 0 and output.images.max() <= 1
    assert delta.flatten(1).abs().amax(dim=1).min() > 0  # the steps moved every image


def test_deterministic_and_independent_of_batching(random_classifier, images):
    threshold = threshold_between(consistency_of(CSR(), random_classifier, images))
    csr = CSR(tau_thres=threshold)
    ids = list(range(20, 20 + len(images)))
    whole = csr(random_classifier, images, ImageRandomness.for_images(0, "d", ids, "p"))
    again = csr(random_classifier, images, ImageRandomness.for_images(0, "d", ids, "p"))
    assert torch.equal(whole.logits, again.logits) and torch.equal(whole.images, again.images)
    assert 0 < int(whole.counterattacked.sum()) < len(images)
    for i, image_id in enumerate(ids):
        alone = csr(random_classifier, images[i : i + 1], ImageRandomness.for_images(0, "d", [image_id], "p"))
        assert alone.counterattacked[0] == whole.counterattacked[i]
        assert torch.allclose(alone.score[0], whole.score[i], atol=1e-5)
        assert_equal_up_to_sign_flips(alone.images[0], whole.images[i])
        if torch.equal(alone.images[0], whole.images[i]):
            assert torch.allclose(alone.logits[0], whole.logits[i], atol=1e-3)


@pytest.mark.parametrize("tau_thres, forwards, backwards", [(-1.0, 2, 0), (2.0, 6, 3)])
def test_counted_passes_per_image(random_classifier, images, tau_thres, forwards, backwards):
    """Benign: f(x), f(x_low); its logits reuse f(x). Flagged: also 3 steps (forward and backward) and f(x_3);
    x*'s logits reuse its step's embedding. (The reference recomputes those: 3 / 0 and 8 / 3.)"""
    csr = CSR(tau_thres=tau_thres)
    with count_encoder_passes() as passes:
        output = csr(random_classifier, images, rng(len(images)))
    assert passes.forwards == forwards * len(images) and passes.backwards == backwards * len(images)
    with torch.no_grad():
        assert torch.allclose(output.logits, random_classifier.logits(output.images), atol=1e-4)


# -- on the tiny CLIP ------------------------------------------------------------------------------------


def test_default_cost_on_real_images(tiny_classifier, cifar10_first):
    images, _ = cifar10_first(1)  # one image per class: the machine is slow and shared
    with count_encoder_passes() as passes:
        output = CSR()(tiny_classifier, images, rng(len(images)))
    flagged = int(output.counterattacked.sum())
    assert 0 < flagged < len(images)  # the ViT threshold flags some clean CIFAR images on this model
    assert passes.forwards == 2 * len(images) + 4 * flagged
    assert passes.backwards == 3 * flagged


def test_attack_views_are_the_defense(tiny_classifier, cifar10_first):
    images, _ = cifar10_first(1)
    csr = CSR()
    output = csr(tiny_classifier, images, rng(len(images)))
    exact = csr.attack_view(tiny_classifier, images, rng(len(images)), "exact", with_score=True)
    bpda = csr.attack_view(tiny_classifier, images, rng(len(images)), "bpda")
    assert torch.allclose(exact.logits, output.logits, atol=1e-3)
    assert torch.allclose(bpda.logits, output.logits, atol=1e-3)
    assert torch.allclose(exact.score, output.score, atol=1e-5)


def test_adaptive_attack_beats_transfer_and_sees_the_defense(tiny_classifier, cifar10_first):
    images, labels = cifar10_first(1)
    csr = CSR()
    eps, steps = 4 / 255, 3
    transfer = PGD(eps=eps, steps=steps, step_size=1 / 255)(tiny_classifier, images, labels, rng(len(images), "attack"))
    adaptive = AdaptiveAttack(csr, PGD(eps=eps, steps=steps, step_size=1 / 255), method="exact")
    adversarial = adaptive(tiny_classifier, images, labels, rng(len(images), "attack"), start=transfer)
    assert (adversarial - images).abs().max() <= eps + 1e-6
    on_transfer = csr(tiny_classifier, transfer, rng(len(images)))
    on_adaptive = csr(tiny_classifier, adversarial, rng(len(images)))
    # CSR draws nothing: one judgement per image. Measured here: 5 of 10 right after the transfer attack, 2 after
    # the adaptive one.
    right = {"transfer": int((on_transfer.logits.argmax(-1) == labels).sum()),
             "adaptive": int((on_adaptive.logits.argmax(-1) == labels).sum())}
    assert right["adaptive"] < right["transfer"], right

    # Gradients at the transfer images: through the defense, and through CLIP alone.
    start = transfer.clone().requires_grad_(True)
    view = csr.attack_view(tiny_classifier, start, rng(len(start)), "exact", with_score=True)
    loss = F.cross_entropy(view.logits, labels, reduction="sum")
    through, gate_gradient = (torch.autograd.grad(value, start, retain_graph=True)[0]
                              for value in (loss, view.score.sum()))
    (plain,) = torch.autograd.grad(F.cross_entropy(tiny_classifier.logits(start), labels, reduction="sum"), start)
    flagged = on_transfer.counterattacked
    assert flagged.any() and through.abs().sum() > 0
    assert not torch.allclose(through[flagged], plain[flagged], atol=1e-6)
    assert gate_gradient.abs().sum() > 0  # C(x) is differentiable, through both passes and the filter
