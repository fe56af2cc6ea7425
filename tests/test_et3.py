"""ET3 (energy-guided test-time transformation): the steps against a plain computation, both budgets, the cost,
batch independence, both adaptive views (the exact one against finite differences), options and registry."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from counterattack import PGD, AdaptiveAttack, CounterattackError, ImageRandomness, count_encoder_passes
from counterattack.cli import main
from counterattack.defenses.et3 import ET3, energy

from testkit import right_over_draws


def rng(n: int, seed: int = 0) -> ImageRandomness:
    return ImageRandomness.from_seed(seed, n, "et3")


def interior_images(n: int, side: int = 32, seed: int = 0) -> torch.Tensor:
    """Pixels in [0.2, 0.8]: a step of the sizes used here never meets the [0, 1] box, so ET3 is smooth there."""
    return 0.2 + 0.6 * torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


# -- the procedure, written out independently ---------------------------------------------------------------


def plain_energy_logits(classifier, z: torch.Tensor) -> torch.Tensor:
    """The authors' wrapper from the classifier's pieces: resize, normalise, encode, 100 * cosine with the classes."""
    encoder = classifier.encoder
    if tuple(z.shape[-2:]) != encoder.image_size:
        z = F.interpolate(z, size=encoder.image_size, mode="bicubic", align_corners=False, antialias=True)
    features = encoder.visual((z - encoder.mean) / encoder.std)
    return 100.0 * F.normalize(features, dim=-1) @ classifier.text_embeddings.T


def plain_et3(classifier, x: torch.Tensor, alpha: float, steps: int, bound, create_graph: bool = False):
    """``steps`` steps of ``z - alpha * g / ||g||`` down ``-logsumexp``, each followed by ``bound(x, z)``."""
    z = x if create_graph else x.detach()
    for _ in range(steps):
        if not create_graph:
            z = z.detach().requires_grad_(True)
        e = -torch.logsumexp(plain_energy_logits(classifier, z), dim=1)
        (g,) = torch.autograd.grad(e.sum(), z, create_graph=create_graph)
        z = bound(x, z - alpha * g / g.norm(p=2, dim=(1, 2, 3), keepdim=True).clamp(min=1e-8))
    return z


def linf_bound(eps: float):
    def bound(x, z):
        z = z.clamp(0, 1)
        return (x + (z - x).clamp(-eps, eps)).clamp(0, 1)
    return bound


def l2_bound(radius: float):
    def bound(x, z):
        delta = z.clamp(0, 1) - x
        length = delta.reshape(len(delta), -1).norm(dim=1).view(-1, 1, 1, 1)
        return (x + delta * torch.clamp(radius / (length + 1e-8), max=1.0)).clamp(0, 1)
    return bound


@pytest.mark.parametrize("side", [32, 48])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_two_steps_equal_a_plain_energy_descent(random_classifier, images, norm, side):
    """The default alpha and steps; an L2 radius of 1 (< alpha) so that the L2 projection binds too. 48-px images
    are resized inside the encoder, the steps act on their own grid."""
    x = images[:2] if side == 32 else F.interpolate(images[:2], size=(side, side), mode="nearest")
    et3 = ET3(norm=norm, l2_radius=1.0)
    bound = linf_bound(et3.eps) if norm == "linf" else l2_bound(1.0)

    output = et3(random_classifier, x, rng(2))
    expected = plain_et3(random_classifier, x, et3.alpha, 2, bound).detach()
    assert torch.allclose(output.images, expected, atol=1e-5)
    assert torch.allclose(output.logits, random_classifier.logits(expected), atol=1e-4)
    delta = output.images - x
    if norm == "linf":
        # a step of L2 length 2.5 over 3x32x32 pixels is ~11/255 per pixel: most pixels end on the 5/255 boundary
        assert delta.abs().max() <= et3.eps + 1e-6 and (delta.abs() > et3.eps - 1e-6).float().mean() > 0.5
    else:
        assert delta.flatten(1).norm(dim=1).tolist() == pytest.approx([1.0, 1.0], abs=1e-4)


def test_the_energy_uses_the_fixed_scale_100_not_the_models(random_classifier, images):
    assert random_classifier.logit_scale != pytest.approx(100.0)
    expected = -torch.logsumexp(plain_energy_logits(random_classifier, images), dim=1)
    with torch.no_grad():
        assert torch.allclose(energy(random_classifier, images), expected, atol=1e-4)


def test_unbounded_l2_steps_are_two_steps_of_length_alpha(random_classifier):
    """Away from the box and with a radius that cannot bind, each step moves the image by exactly alpha."""
    x = interior_images(2)
    one = ET3(alpha=0.1, steps=1, norm="l2")(random_classifier, x, rng(2)).images
    two = ET3(alpha=0.1, steps=2, norm="l2")(random_classifier, x, rng(2)).images
    assert (one - x).flatten(1).norm(dim=1).tolist() == pytest.approx([0.1, 0.1], rel=1e-4)
    assert (two - one).flatten(1).norm(dim=1).tolist() == pytest.approx([0.1, 0.1], rel=1e-4)


def test_no_steps_classify_the_image_itself(random_classifier, images):
    output = ET3(steps=0)(random_classifier, images, rng(len(images)))
    assert torch.equal(output.images, images)
    with torch.no_grad():
        assert torch.allclose(output.logits, random_classifier.logits(images))


# -- cost and batch independence ------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, forwards, backwards", [(2, 3, 2), (5, 6, 5), (0, 1, 0)])
def test_cost_is_counted_per_image(random_classifier, images, steps, forwards, backwards):
    with count_encoder_passes() as passes:
        ET3(steps=steps)(random_classifier, images, rng(len(images)))
    assert (passes.forwards, passes.backwards) == (forwards * len(images), backwards * len(images))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_an_images_result_does_not_depend_on_its_batch(random_classifier, images, norm):
    et3 = ET3(norm=norm, l2_radius=1.0)
    ids = list(range(10, 10 + len(images)))
    whole = et3(random_classifier, images, ImageRandomness.for_images(0, "d", ids, "p"))
    for start in range(0, len(images), 4):  # sub-batches of 4 and 2
        part = slice(start, start + 4)
        alone = et3(random_classifier, images[part], ImageRandomness.for_images(0, "d", ids[part], "p"))
        assert torch.allclose(alone.images, whole.images[part], atol=1e-5)
        assert torch.allclose(alone.logits, whole.logits[part], atol=1e-4)


# -- the adaptive views ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["exact", "bpda"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attack_view_equals_the_defense_and_has_gradients(random_classifier, images, method, norm):
    et3 = ET3(norm=norm, l2_radius=1.0)
    defended = et3(random_classifier, images, rng(len(images))).logits
    x = images.clone().requires_grad_(True)
    view = et3.attack_view(random_classifier, x, rng(len(images)), method)
    assert torch.allclose(view.logits, defended, atol=1e-4) and view.score is None
    labels = torch.arange(len(images)) % random_classifier.num_classes
    (grad,) = torch.autograd.grad(F.cross_entropy(view.logits, labels, reduction="sum"), x)
    assert grad.abs().sum(dim=(1, 2, 3)).gt(0).all()


def test_bpda_is_the_gradient_at_the_transformed_image(random_classifier, images):
    """Straight through: d logits(x + (z_T - x).detach()) / dx is d logits / dz at z_T."""
    et3 = ET3()
    z = et3(random_classifier, images, rng(len(images))).images.requires_grad_(True)
    weights = torch.randn(len(images), random_classifier.num_classes, generator=torch.Generator().manual_seed(2))
    (at_z,) = torch.autograd.grad((random_classifier.logits(z) * weights).sum(), z)
    x = images.clone().requires_grad_(True)
    (through,) = torch.autograd.grad((et3.attack_view(random_classifier, x, rng(6), "bpda").logits * weights).sum(), x)
    assert torch.allclose(through, at_z, atol=1e-5, rtol=1e-4)


def test_exact_view_differentiates_the_normalised_gradient_too(random_classifier):
    """On interior images with the L2 ball (which 2 x 2.5 cannot exceed) ET3 is smooth: the exact gradient must give
    the central finite difference along a random direction, the gradient of a plain unrolled computation, and differ
    from the BPDA gradient (which drops the step's dependence on the image)."""
    et3 = ET3(norm="l2")
    x = interior_images(2)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    weights = torch.arange(random_classifier.num_classes, dtype=torch.float32)

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return (logits * weights).sum()

    grads = {}
    for method in ("exact", "bpda"):
        leaf = x.clone().requires_grad_(True)
        (grads[method],) = torch.autograd.grad(loss(et3.attack_view(random_classifier, leaf, rng(2), method).logits),
                                               leaf)
    leaf = x.clone().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
        plain = plain_et3(random_classifier, leaf, et3.alpha, 2, l2_bound(et3.l2_radius), create_graph=True)
        (independent,) = torch.autograd.grad(loss(random_classifier.logits(plain)), leaf)
    assert torch.allclose(grads["exact"], independent, atol=1e-4, rtol=1e-3)

    h = 3e-3
    with torch.no_grad():
        finite = (loss(et3(random_classifier, x + h * direction, rng(2)).logits)
                  - loss(et3(random_classifier, x - h * direction, rng(2)).logits)) / (2 * h)
    exact, bpda = (float((grads[m] * direction).sum()) for m in ("exact", "bpda"))
    assert exact == pytest.approx(float(finite), rel=0.02)
    assert abs(bpda - float(finite)) > 0.2 * abs(float(finite))


def test_exact_view_under_no_grad_still_computes(random_classifier, images):
    """An adaptive attack's candidate selection evaluates the view without autograd: the steps still need theirs."""
    with torch.no_grad():
        view = ET3().attack_view(random_classifier, images, rng(len(images)), "exact")
    assert torch.allclose(view.logits, ET3()(random_classifier, images, rng(len(images))).logits, atol=1e-4)


# -- behaviour on the trained tiny CLIP -----------------------------------------------------------------------


def test_the_steps_lower_the_energy_and_the_default_step_overshoots_at_32_px(tiny_classifier, cifar10_first):
    """alpha is an L2 length over the whole image: at 32 px the default 2.5 moves each pixel ~7 times as far as at
    224 px. The step with the authors' per-pixel size (2.5 * 32 / 224) lowers every image's energy; the default
    lowers it on average but less (measured: 20 and 16 of 20 images lowered, mean -7.9 and -3.0)."""
    images, _ = cifar10_first(2)
    with torch.no_grad():
        before = energy(tiny_classifier, images)
        scaled, default = (energy(tiny_classifier, ET3(alpha=alpha)(tiny_classifier, images, rng(20)).images) - before
                           for alpha in (2.5 * 32 / 224, 2.5))
    assert (scaled < 0).all()
    assert default.mean() < 0 and scaled.mean() < default.mean()


def test_adaptive_attack_beats_the_transfer_attack_on_the_tiny_clip(tiny_classifier, cifar10_first):
    """PGD through the exact view, going on from the transfer images. ET3 has no randomness, so one test-time draw
    counts and the attack's own draws choose its best iterate as well as fresh ones would (select="eot")."""
    images, labels = cifar10_first(2)
    budget = dict(eps=1 / 255, steps=1, step_size=1 / 255)  # the TTC paper's budget, one step: an exact step is dear
    transfer = PGD(**budget)(tiny_classifier, images, labels, rng(len(images)))
    adaptive = AdaptiveAttack(ET3(), PGD(**budget), select="eot")(tiny_classifier, images, labels,
                                                                   rng(len(images)), start=transfer)
    assert (adaptive - images).abs().max() <= budget["eps"] + 1e-6
    right = {name: right_over_draws(ET3(), tiny_classifier, adv, labels, draws=1)
             for name, adv in (("transfer", transfer), ("adaptive", adaptive))}
    # Measured, of 20 images: 17 right clean, 11 with ET3 after the transfer attack, 5 after the adaptive attack
    # (6 through BPDA).
    assert right["adaptive"] < right["transfer"], right


# -- options and registry -------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    (dict(alpha=-1.0), "alpha must be >= 0"),
    (dict(eps=-1 / 255), "eps must be >= 0"),
    (dict(eps=2.0), "eps must be <= 1"),
    (dict(steps=1.5), "steps must be an integer"),
    (dict(steps=-1), "steps must be >= 0"),
    (dict(norm="l1"), "norm must be one of linf, l2"),
    (dict(l2_radius=-0.5), "l2_radius must be >= 0"),
])
def test_options_out_of_bounds_are_refused(settings, message):
    with pytest.raises(CounterattackError, match=message):
        ET3(**settings)


def test_registry_lists_et3_with_its_flags(capsys):
    assert main(["defenses", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)["et3"]
    assert listing["options"] == {"--et3-alpha": 2.5, "--et3-eps": 5.0, "--et3-steps": 2, "--et3-norm": "linf",
                                  "--et3-l2-radius": 5.0}
    assert listing["paper_precision"] == "fp32"
