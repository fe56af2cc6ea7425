import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from counterattack import CounterattackError, ImageRandomness, count_encoder_passes
from counterattack.augment import (
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, affine, gaussian_blur,
)
from counterattack.defenses.mac import MAC

from testkit import assert_equal_up_to_sign_flips, threshold_between, transfer_and_adaptive

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 4
# Every augmentation switched off: T(x) = x, so the corruption degree is 0 whatever is drawn.
IDENTITY = dict(rotation=0.0, translate=0.0, scale_low=1.0, scale_high=1.0, jitter_p=0.0, blur_p=0.0, noise_p=0.0)


def rng(n: int, seed: int = 0) -> ImageRandomness:
    return ImageRandomness.from_seed(seed, n, "mac")


def oracle_last_step(encoder, views: torch.Tensor, delta0: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    """The spec's counterattack of each view, written out: ascend ||f(v + delta) - f(v)||^2 by signed steps."""
    with torch.no_grad():
        anchor = encoder(views)
    delta = delta0.clone()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = ((encoder(views + delta) - anchor) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + ALPHA * grad.sign()).clamp(-EPS, EPS)
        delta = torch.max(torch.min(delta, 1 - views), -views)
    return delta


def test_refuses_an_even_blur_kernel_and_a_scale_range_above_one():
    with pytest.raises(CounterattackError, match="odd"):
        MAC(blur_kernel=4)
    with pytest.raises(CounterattackError, match="low end"):
        MAC(scale_low=1.1)


def test_augmentations_equal_torchvisions_for_the_same_parameters():
    x = torch.rand(3, 3, 20, 16, generator=torch.Generator().manual_seed(0))
    angle, scale = torch.tensor([4.3, -2.0, 0.0]), torch.tensor([0.93, 1.05, 1.0])
    shift = torch.tensor([[1.0, -1.0], [0.0, 2.0], [0.0, 0.0]])
    factor, hue = torch.tensor([0.93, 1.07, 1.0]), torch.tensor([0.02, -0.015, 0.3])
    sigma = torch.tensor([0.5, 0.9, 1.2])
    mine = {"affine": affine(x, angle, shift, scale), "brightness": adjust_brightness(x, factor),
            "contrast": adjust_contrast(x, factor), "saturation": adjust_saturation(x, factor),
            "hue": adjust_hue(x, hue), "blur": gaussian_blur(x, sigma, 5)}
    for i in range(len(x)):
        theirs = {
            "affine": TF.affine(x[i], angle=float(angle[i]), translate=[int(shift[i, 0]), int(shift[i, 1])],
                                scale=float(scale[i]), shear=[0.0, 0.0], interpolation=InterpolationMode.BILINEAR,
                                fill=[0.0, 0.0, 0.0]),
            "brightness": TF.adjust_brightness(x[i], float(factor[i])),
            "contrast": TF.adjust_contrast(x[i], float(factor[i])),
            "saturation": TF.adjust_saturation(x[i], float(factor[i])),
            "hue": TF.adjust_hue(x[i], float(hue[i])),
            "blur": TF.gaussian_blur(x[i], [5, 5], [float(sigma[i])] * 2),
        }
        for name, expected in theirs.items():
            assert torch.allclose(mine[name][i], expected, atol=1e-5), name


def test_each_augmentation_is_applied_with_its_probability():
    x = torch.rand(300, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    # The blur's sigma is in pixels of a 224-px input: on 8 px it is a no-op, on 112 px a 3-px blur of 0.25-0.6 px.
    big = torch.rand(300, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    off = dict(IDENTITY)
    for switch, images in (("jitter_p", x), ("blur_p", big), ("noise_p", x)):
        mac = MAC(**{**off, switch: 0.5})
        augmented = mac.augment(images, mac.draw_augmentations(rng(len(images)), 1, images))
        changed = (augmented - images).abs().flatten(1).amax(dim=1) > 1e-4  # beyond resampling's rounding
        assert 0.4 < changed.float().mean() < 0.6, switch
        assert augmented.min() >= 0 and augmented.max() <= 1
    assert torch.equal(MAC(**off).augment(x, MAC(**off).draw_augmentations(rng(len(x)), 1, x)), x)
    noisy = MAC(**{**off, "noise_p": 1.0})
    moved = noisy.augment(x, noisy.draw_augmentations(rng(len(x)), 1, x)) - x
    assert moved.flatten(1).std(dim=1).max() < 0.025  # sigma drawn in [0, 0.02], estimated from 192 pixels
    assert moved.flatten(1).std(dim=1).mean() == pytest.approx(0.01, rel=0.1)
    rotated = MAC(**{**off, "rotation": 5.0})
    assert ((rotated.augment(x, rotated.draw_augmentations(rng(len(x)), 1, x)) - x).abs().flatten(1).amax(1) > 0).all()


def test_defended_views_stay_in_budget_and_box(random_classifier, images):
    mac = MAC(tau_thres=0.0)  # every weight about 1: the full perturbation is checked
    result = mac.counterattack(random_classifier, images, rng(len(images)))
    assert result.views.shape == (2 * len(images), *images.shape[1:])
    assert torch.equal(result.views[::2], images)  # view 0 is the image itself
    assert not torch.equal(result.views[1::2], images)
    delta = result.defended - result.views
    assert delta.abs().max() <= EPS + 1e-6
    assert delta.abs().max() > EPS / 2
    assert result.defended.min() >= -1e-6 and result.defended.max() <= 1 + 1e-6
    assert result.noise.abs().max() <= EPS


def test_seeded_determinism(random_classifier, images):
    images = images[:3]
    first = MAC()(random_classifier, images, rng(len(images), seed=3))
    again = MAC()(random_classifier, images, rng(len(images), seed=3))
    other = MAC()(random_classifier, images, rng(len(images), seed=4))
    assert torch.equal(first.logits, again.logits) and torch.equal(first.score, again.score)
    assert not torch.equal(first.logits, other.logits)


def test_batch_size_invariance(random_classifier, images):
    images = images[:4]
    mac = MAC(tau_temp=0.5)  # a wide sigmoid, so every weight lies strictly between 0 and 1
    ids = list(range(20, 20 + len(images)))
    whole = mac.counterattack(random_classifier, images, ImageRandomness.for_images(0, "d", ids, "p"))
    with torch.no_grad():
        whole_logits = random_classifier.logits(whole.defended).view(len(images), 2, -1).mean(dim=1)
    for i, image_id in enumerate(ids):
        own = ImageRandomness.for_images(0, "d", [image_id], "p")
        alone = mac.counterattack(random_classifier, images[i : i + 1], own)
        assert torch.allclose(alone.views, whole.views[2 * i : 2 * i + 2], atol=1e-6)
        assert torch.allclose(alone.degree[0], whole.degree[i], rtol=1e-4)
        assert_equal_up_to_sign_flips(alone.defended, whole.defended[2 * i : 2 * i + 2])
        with torch.no_grad():
            logits = random_classifier.logits(alone.defended).mean(dim=0)
        assert torch.allclose(logits, whole_logits[i], atol=1e-3)


def test_weight_and_mix_by_hand_when_augmentations_do_nothing(random_classifier, images):
    """T = identity, so d = 0 and w = sigmoid((0 - 0.5) / 0.25) = 1 / (1 + e^2) for every view."""
    mac = MAC(**IDENTITY, tau_thres=0.5, tau_temp=0.25)
    result = mac.counterattack(random_classifier, images, rng(len(images)))
    expected_weight = 1 / (1 + math.exp(2))
    assert result.degree.abs().max() < 1e-5
    assert torch.allclose(result.weights, torch.full_like(result.weights, expected_weight), atol=1e-5)
    views = images.repeat_interleave(2, dim=0)
    assert torch.equal(result.views, views)
    delta0 = torch.max(torch.min(result.noise, 1 - views), -views)
    last = oracle_last_step(random_classifier.encoder, views, delta0)
    assert torch.allclose(result.defended, views + expected_weight * last, atol=1e-6)
    assert not torch.allclose(last[::2], last[1::2])  # the two views drew their own delta0
    # The defended logits: the mean over the two views of each one's logits.
    output = mac(random_classifier, images, rng(len(images)))
    with torch.no_grad():
        per_view = random_classifier.logits(views + expected_weight * last).view(len(images), 2, -1)
    assert torch.allclose(output.logits, (per_view[:, 0] + per_view[:, 1]) / 2, atol=1e-4)


def test_corruption_degree_and_soft_weight_by_hand(random_classifier, images):
    mac = MAC(tau_thres=0.0)
    probe = mac.counterattack(random_classifier, images, rng(len(images)))
    threshold = threshold_between(probe.degree)  # so the gate is among this model's degrees
    mac = MAC(tau_thres=threshold, tau_temp=0.01)
    result = mac.counterattack(random_classifier, images, rng(len(images)))
    corrupted = mac.augment(result.views, result.corruption_draw)  # T'(v): checked against torchvision above
    encoder = random_classifier.encoder
    with torch.no_grad():
        anchor, moved = encoder(result.views).double(), encoder(corrupted).double()
    for row in range(len(result.views)):
        degree = float((moved[row] - anchor[row]).norm() / anchor[row].norm())
        weight = 1 / (1 + math.exp(-(degree - threshold) / 0.01))
        assert float(result.degree.flatten()[row]) == pytest.approx(degree, rel=1e-4)
        assert float(result.weights.flatten()[row]) == pytest.approx(weight, abs=1e-3)
    assert torch.equal(mac(random_classifier, images, rng(len(images))).score, result.degree)  # every view's own


def test_hard_gate_gives_each_view_all_or_nothing(random_classifier, images):
    probe = MAC(tau_thres=0.0).counterattack(random_classifier, images, rng(len(images)))
    threshold = threshold_between(probe.degree)
    result = MAC(tau_thres=threshold, tau_temp=0.0).counterattack(random_classifier, images, rng(len(images)))
    corrupted = (result.degree > threshold).flatten()
    assert 0 < int(corrupted.sum()) < len(corrupted)
    assert torch.equal(result.weights.flatten(), corrupted.float())
    assert torch.equal(result.defended[~corrupted], result.views[~corrupted])
    assert (result.defended[corrupted] - result.views[corrupted]).abs().flatten(1).amax(1).gt(EPS / 2).all()


def test_counted_passes_match_the_spec(random_classifier, images):
    """Per view: f(v), f(T'(v)), 4 forward/backward steps, 1 classification: 14 / 8 for two views."""
    for mac, expected in ((MAC(), (14, 8)), (MAC(views=1, steps=2), (5, 2))):
        with count_encoder_passes() as passes:
            mac(random_classifier, images, rng(len(images)))
        assert (passes.forwards / len(images), passes.backwards / len(images)) == expected


def test_attack_view_is_the_defense_and_passes_gradients(random_classifier, images):
    mac = MAC(tau_thres=0.1)  # near this model's degrees: weights away from 0, so the projections matter
    expected = mac(random_classifier, images, rng(len(images)))
    gradients = {}
    for method in ("exact", "bpda"):
        x = images.clone().requires_grad_(True)
        view = mac.attack_view(random_classifier, x, rng(len(images)), method, with_score=True)
        assert torch.allclose(view.logits, expected.logits, atol=1e-4)
        assert torch.allclose(view.score, expected.score, rtol=1e-4)
        loss = F.cross_entropy(view.logits, torch.zeros(len(x), dtype=torch.long))
        (gradients[method],) = torch.autograd.grad(loss, x, retain_graph=True)
        assert gradients[method].abs().sum(dim=(1, 2, 3)).gt(0).all()
        (tau_gradient,) = torch.autograd.grad(view.score.sum(), x)
        assert tau_gradient.abs().sum(dim=(1, 2, 3)).gt(0).all()
    # Only the exact method differentiates the projections of the replayed steps.
    assert not torch.allclose(gradients["exact"], gradients["bpda"])
    # EOT: every call is a fresh draw of the augmentations, the noise and delta0.
    streams = rng(len(images))
    first = mac.attack_view(random_classifier, images, streams, "exact").logits
    second = mac.attack_view(random_classifier, images, streams, "exact").logits
    assert not torch.allclose(first, second)


def test_adaptive_attack_beats_the_transfer_attack_on_the_tiny_clip(tiny_classifier, cifar10_first):
    images, labels = cifar10_first(1)
    mac = MAC()
    budget = dict(eps=2 / 255, steps=2, step_size=1 / 255)  # two steps: MAC costs 14 passes per image

    result = transfer_and_adaptive(mac, tiny_classifier, images, labels, budget, rng)
    # Of 40 (10 images, 4 test-time draws), measured here: 17 right after the transfer attack, 11 after the adaptive.
    assert result["adaptive"] < result["transfer"], (result["transfer"], result["adaptive"])
    through_mac, undefended = result["through"], result["undefended"]
    assert through_mac.abs().sum(dim=(1, 2, 3)).gt(0).all()
    cosine = F.cosine_similarity(through_mac.flatten(1), undefended.flatten(1), dim=1)
    assert cosine.mean() < 0.95 and not torch.allclose(through_mac, undefended)
