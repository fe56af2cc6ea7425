"""DOC (Jiang et al., AAAI 2026): sensitivity score, soft gate, orthogonal momentum steps, final mix."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from counterattack import PGD, AdaptiveAttack, ImageRandomness, ZeroShotClassifier, count_encoder_passes
from counterattack.classifier import ImageEncoder
from counterattack.defenses.doc import DOC

from testkit import assert_equal_up_to_sign_flips, right_over_draws, threshold_between

EPS, ALPHA = 4 / 255, 3 / 255


def rng(n: int, seed: int = 0, purpose: str = "doc") -> ImageRandomness:
    return ImageRandomness.from_seed(seed, n, purpose)


def sigmoid(value: float) -> float:
    return 1 / (1 + math.exp(-value))


def paper_doc(
    encoder: ImageEncoder, image: torch.Tensor, image_rng: ImageRandomness, doc: DOC
) -> tuple[torch.Tensor, float, float]:
    """Algorithm 1 for one image, as the paper writes it (Eqs. 5-11, unsquared norm), with the
    documented order of draws: the score's M coins, delta0, then one normal per step."""
    x = image[None]
    coins = image_rng.uniform(doc.noise_copies, *x.shape[1:])[0]
    noise = torch.where(coins < 0.5, -EPS, EPS)  # eps * sign(N(0, I)): a fair coin per pixel
    with torch.no_grad():
        anchor = encoder(x)
        copies = encoder((x + noise).clamp(0, 1))
    score = 1 - F.cosine_similarity(copies.double(), anchor.double()).mean()  # float64: no cancellation
    weight = sigmoid(doc.gamma * (doc.tau_thres - float(score)))
    delta0 = image_rng.uniform_like(x, -EPS, EPS)
    delta0 = torch.max(torch.min(delta0, 1 - x), -x)
    delta, velocity = delta0.clone(), torch.zeros_like(x)
    for _ in range(doc.steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad((encoder(x + delta) - anchor).norm(), delta)
        g = grad / grad.norm()
        r = image_rng.normal_like(x)
        r_perp = r - (r * g).sum() * g
        velocity = doc.momentum * velocity + (1 - doc.momentum) * (g + doc.orthogonal_weight * r_perp / r_perp.norm())
        delta = (delta.detach() + ALPHA * velocity.sign()).clamp(-EPS, EPS)
        delta = torch.max(torch.min(delta, 1 - x), -x)
    return (x + weight * delta + (1 - weight) * delta0)[0], float(score), weight


@pytest.mark.parametrize(("tau_thres", "score_noise"), [(0.0, "sign"), (float("inf"), "sign"), (0.3, "uniform")])
def test_defended_images_stay_in_the_budget_and_the_box(random_classifier, images, tau_thres, score_noise):
    output = DOC(tau_thres=tau_thres, score_noise=score_noise)(random_classifier, images, rng(len(images)))
    assert (output.images - images).abs().max() <= EPS + 1e-6
    assert output.images.min() >= 0 and output.images.max() <= 1


def test_score_noise_is_a_fair_sign_or_a_uniform_within_eps(images):
    signs = DOC().sensitivity_noise(images, rng(len(images)))
    assert signs.shape == (len(images), 5, *images.shape[1:])
    assert signs.unique().tolist() == pytest.approx([-EPS, EPS])
    assert abs(float((signs > 0).float().mean()) - 0.5) < 0.02
    uniform = DOC(score_noise="uniform").sensitivity_noise(images, rng(len(images)))
    assert uniform.abs().max() <= EPS and uniform.unique().numel() > 1000


def test_each_image_follows_the_papers_algorithm(random_classifier, images):
    images, doc = images[:3], DOC(score="directional")
    ids = list(range(20, 20 + len(images)))
    result = doc.counterattack(random_classifier, images, ImageRandomness.for_images(0, "d", ids, "p"))
    for i, image_id in enumerate(ids):
        alone = ImageRandomness.for_images(0, "d", [image_id], "p")
        expected, score, weight = paper_doc(random_classifier.encoder, images[i], alone, doc)
        assert torch.allclose(result.images[i], expected, atol=1e-6)
        assert float(result.score[i]) == pytest.approx(score, rel=1e-3)
        assert float(result.weight[i]) == pytest.approx(weight, rel=1e-5)
    # The steps moved: the mix is not delta0.
    assert not torch.allclose(result.images - images, result.delta0, atol=1e-3)


class SquaredDistanceFromGrey(nn.Module):
    """``f(z) = [scale * mean((z - 1/2)^2), 1]``. At a uniformly grey image every +-eps noise moves the
    first coordinate to ``scale * eps^2``, so the score is known by hand, and the gradient of
    ``||f(x + delta) - f(x)||`` points along ``delta`` itself."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        spread = self.scale * (z - 0.5).pow(2).flatten(1).mean(dim=1)
        return torch.stack([spread, torch.ones_like(spread)], dim=-1)


def grey_classifier(scale: float) -> ZeroShotClassifier:
    encoder = ImageEncoder(SquaredDistanceFromGrey(scale), (8, 8), mean=[0.0] * 3, std=[1.0] * 3)
    return ZeroShotClassifier(encoder, torch.eye(2), logit_scale=10.0, class_names=["spread", "grey"])


@pytest.mark.parametrize("target_score", [0.2, 0.4])
def test_gate_and_mix_by_hand_on_a_grey_image(target_score):
    # 1 - cos([a, 1], [0, 1]) = 1 - 1 / sqrt(1 + a^2) = target_score, with a = scale * eps^2.
    spread = math.sqrt(1 / (1 - target_score) ** 2 - 1)
    classifier = grey_classifier(spread / EPS**2)
    grey = torch.full((2, 3, 8, 8), 0.5)
    doc = DOC(orthogonal_weight=0.0, score="directional")  # no exploration, so delta_T is known by hand
    output = doc(classifier, grey, rng(2))
    result = doc.counterattack(classifier, grey, rng(2))

    draws = rng(2)
    draws.uniform(doc.noise_copies, 3, 8, 8)  # the score's coins come first
    delta0 = draws.uniform_like(grey, -EPS, EPS)
    weight = sigmoid(20 * (0.3 - target_score))  # 0.88 for 0.2, 0.12 for 0.4
    # Every step moves each pixel away from grey by 3/255 (the gradient's sign is delta's sign):
    # after two steps every pixel sits at the edge of the 4/255 ball.
    final = EPS * delta0.sign()
    expected = 0.5 + weight * final + (1 - weight) * delta0

    assert output.score.tolist() == pytest.approx([target_score] * 2, rel=1e-4)
    assert result.weight.tolist() == pytest.approx([weight] * 2, rel=1e-4)
    assert output.counterattacked.tolist() == [target_score < 0.3] * 2
    assert torch.allclose(result.final_delta, final, atol=1e-7)
    assert torch.allclose(output.images, expected, atol=1e-6)
    moved = spread / EPS**2 * (expected - 0.5).pow(2).flatten(1).mean(dim=1)
    hand_logits = 10 * torch.stack([moved, torch.ones(2)], -1) / (1 + moved**2).sqrt()[:, None]
    assert torch.allclose(output.logits, hand_logits, atol=1e-4)


def test_gate_limits():
    scores = torch.tensor([0.0, 0.3, 1.0])
    assert DOC().soft_gate(scores).tolist() == pytest.approx([sigmoid(6), 0.5, sigmoid(-14)])
    assert DOC(tau_thres=float("inf")).soft_gate(scores).tolist() == [1.0, 1.0, 1.0]
    assert DOC(gamma=0.0, tau_thres=float("inf")).soft_gate(scores).tolist() == [0.5, 0.5, 0.5]


def test_seeded_determinism(random_classifier, images):
    first = DOC()(random_classifier, images, rng(len(images), seed=3))
    again = DOC()(random_classifier, images, rng(len(images), seed=3))
    other = DOC()(random_classifier, images, rng(len(images), seed=4))
    assert torch.equal(first.images, again.images) and torch.equal(first.score, again.score)
    assert not torch.equal(first.images, other.images) and not torch.equal(first.score, other.score)


def test_batch_size_invariance(random_classifier, images):
    images = images[:4]
    ids = list(range(10, 10 + len(images)))
    whole = DOC()(random_classifier, images, ImageRandomness.for_images(0, "d", ids, "p"))
    for i, image_id in enumerate(ids):
        alone = DOC()(random_classifier, images[i : i + 1], ImageRandomness.for_images(0, "d", [image_id], "p"))
        assert float(alone.score[0]) == pytest.approx(float(whole.score[i]), rel=1e-4)
        assert_equal_up_to_sign_flips(alone.images[0], whole.images[i])
        if torch.equal(alone.images[0], whole.images[i]):
            assert torch.allclose(alone.logits[0], whole.logits[i], atol=1e-4)


@pytest.mark.parametrize("tau_thres", [0.0, float("inf")])
@pytest.mark.parametrize("score, forwards", [("directional", 5 + 4 + 2), ("tau", 4 + 2)])
def test_counted_passes_match_the_specification(random_classifier, images, tau_thres, score, forwards):
    # directional: f(x), M = 5 noisy copies, T = 4 steps, the final forward; tau: f(x), f(x + delta0) (also the first
    # step's forward), the 3 other steps, the final forward. T backwards, whatever the gate decides (every image
    # takes the steps; w only mixes them).
    with count_encoder_passes() as passes:
        DOC(tau_thres=tau_thres, score=score)(random_classifier, images, rng(len(images)))
    assert (passes.forwards, passes.backwards) == (forwards * len(images), 4 * len(images))


def test_attack_view_is_the_defense_with_its_score_and_gradients(random_classifier, images):
    scores = DOC().counterattack(random_classifier, images, rng(len(images), purpose="view")).score
    # This random model's scores are ~2e-5: a threshold among them and a steep gate make w soft.
    doc = DOC(tau_thres=threshold_between(scores), gamma=2e5)
    expected = doc(random_classifier, images, rng(len(images), purpose="view"))
    assert 0 < float(expected.counterattacked.float().mean()) < 1
    labels = torch.zeros(len(images), dtype=torch.long)
    grads = {}
    for method in ("exact", "bpda"):
        x = images.clone().requires_grad_(True)
        view = doc.attack_view(random_classifier, x, rng(len(images), purpose="view"), method, with_score=True)
        assert torch.allclose(view.logits, expected.logits, atol=1e-5)
        assert torch.allclose(view.score, expected.score, rtol=1e-5)
        (grads[method],) = torch.autograd.grad(F.cross_entropy(view.logits, labels), x, retain_graph=True)
        assert grads[method].abs().sum(dim=(1, 2, 3)).gt(0).all()
        (tau_grad,) = torch.autograd.grad(view.score.sum(), x)
        assert tau_grad.abs().sum(dim=(1, 2, 3)).gt(0).all()  # the gate can be attacked
    # exact also differentiates the projections and the soft gate; bpda holds the perturbation.
    assert not torch.allclose(grads["exact"], grads["bpda"], atol=1e-6)
    assert doc.attack_view(random_classifier, images, rng(len(images)), "bpda").score is None


def test_exact_view_is_the_derivative_of_the_defense_gate_included():
    """On a grey image every step sign is known (delta's own) and delta_T sits on the ball's edge, so
    the defended image is x + w(x) delta_T + (1 - w(x)) delta0 with everything but w(x) fixed: a
    smooth function whose derivative finite differences check. The gate's term is most of it."""
    target_score = 0.3  # at tau_thres: the gate is at its steepest
    classifier = grey_classifier(math.sqrt(1 / (1 - target_score) ** 2 - 1) / EPS**2)
    doc = DOC(orthogonal_weight=0.0)
    grey = torch.full((1, 3, 8, 8), 0.5)
    draws = rng(1, purpose="fd")
    noise = doc.sensitivity_noise(grey, draws)
    delta0 = draws.uniform_like(grey, -EPS, EPS)
    # Along the score's noise (the score moves), and away from pixels where delta0 is near 0 (no sign flips).
    direction = noise.mean(dim=1) * (delta0.abs() > EPS / 4)
    direction = direction / direction.abs().max()

    def first_logit(x: torch.Tensor, method: str = "exact") -> torch.Tensor:
        return doc.attack_view(classifier, x, rng(1, purpose="fd"), method).logits[:, 0].sum()

    h = 3e-4
    with torch.no_grad():
        finite_difference = float(first_logit(grey + h * direction) - first_logit(grey - h * direction)) / (2 * h)
    slopes = {}
    for method in ("exact", "bpda"):
        x = grey.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(first_logit(x, method), x)
        slopes[method] = float((grad * direction).sum())
    assert slopes["exact"] == pytest.approx(finite_difference, rel=5e-3)
    assert abs(slopes["bpda"] - finite_difference) > 0.5 * abs(finite_difference)


def test_every_call_of_the_view_draws_anew(random_classifier, images):
    draws = rng(len(images))
    first = DOC().attack_view(random_classifier, images, draws, "bpda").logits
    second = DOC().attack_view(random_classifier, images, draws, "bpda").logits
    assert not torch.allclose(first, second)


def test_adaptive_attack_beats_the_transfer_attack_on_the_tiny_clip(tiny_classifier, cifar10_first):
    images, labels = cifar10_first(1)
    doc = DOC()
    # Two steps each keep this test short; the adaptive attack goes on from the transfer attack's images.
    budget = {"eps": 2 / 255, "steps": 2, "step_size": 1 / 255}
    transfer = PGD(**budget)(tiny_classifier, images, labels, rng(len(images), purpose="attack"))
    attack = AdaptiveAttack(doc, PGD(**budget))
    adaptive = attack(tiny_classifier, images, labels, rng(len(images), purpose="attack"), start=transfer)
    assert (adaptive - images).abs().max() <= 2 / 255 + 1e-6
    # Of 40 (10 images, 4 test-time draws), measured here: 15 right after the transfer attack, 8 after the adaptive.
    right = {name: right_over_draws(doc, tiny_classifier, adversarial, labels)
             for name, adversarial in (("transfer", transfer), ("adaptive", adaptive))}
    assert right["adaptive"] < right["transfer"], right

    x = images[:4].clone().requires_grad_(True)
    view = doc.attack_view(tiny_classifier, x, rng(4, purpose="grad"), "exact")
    (adaptive_grad,) = torch.autograd.grad(F.cross_entropy(view.logits, labels[:4]), x)
    x = images[:4].clone().requires_grad_(True)
    (transfer_grad,) = torch.autograd.grad(F.cross_entropy(tiny_classifier.logits(x), labels[:4]), x)
    assert adaptive_grad.abs().sum(dim=(1, 2, 3)).gt(0).all()
    cosine = F.cosine_similarity(adaptive_grad.flatten(1), transfer_grad.flatten(1))
    assert (cosine < 0.99).all()
