import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from counterattack import PGD, AdaptiveAttack, CounterattackError, ImageRandomness, count_encoder_passes
from counterattack.defenses.clipure import BLANK_PROMPTS, CLIPure, blank_prompt_embedding, purify
from counterattack.precision import FP16_LOSS_SCALE, precision_context

STEPS, STEP = 10, 30.0
TURN = math.atan(STEP)  # the angle one step turns an embedding by, towards the blank prompt: 88.09 degrees
# Within this cosine of the blank prompt an embedding alternates between two points from the first step on.
ROUND_TRIP_COSINE = 1 / math.sqrt(1 + STEP**2)
CPU = torch.device("cpu")


def rng(n: int, seed: int = 0) -> ImageRandomness:
    return ImageRandomness.from_seed(seed, n, "clipure")


def code_purify_zi(z: np.ndarray, t: np.ndarray, steps: int = STEPS, step_size: float = STEP,
                   batch_norm: bool = True, gamma: float = 0.0) -> np.ndarray:
    """The authors' ``purify_zi`` (L2 mode) in NumPy, its gradient written out by hand:
    ``d/dz [-cos(z, t)] = -(t / (|z| |t|) - cos(z, t) z / |z|^2)``. ``batch_norm``: the code's step normalised by
    the Frobenius norm of the whole batch's gradients; else by each row's own norm."""
    z = z.astype(np.float64).copy()
    t_norm = np.linalg.norm(t)
    momentum = np.zeros_like(z)
    for _ in range(steps):
        r = np.linalg.norm(z, axis=1, keepdims=True)
        u = z / r
        cosine = (z @ t)[:, None] / (r * t_norm)
        grad_u = r * -(t[None] / (r * t_norm) - cosine * z / r**2)
        scale = np.linalg.norm(grad_u) if batch_norm else np.linalg.norm(grad_u, axis=1, keepdims=True)
        momentum = gamma * momentum - (1 - gamma) * grad_u / scale
        u = u + step_size * momentum
        z = r * u / np.linalg.norm(u, axis=1, keepdims=True)
    return z


def at_cosines(cosines: list[float], t: np.ndarray, seed: int) -> np.ndarray:
    """Unit vectors at the given cosines to ``t``, each with its own random direction orthogonal to t."""
    t_hat = t / np.linalg.norm(t)
    other = np.random.default_rng(seed).standard_normal((len(cosines), len(t)))
    other -= (other @ t_hat)[:, None] * t_hat[None]
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    c = np.array(cosines)[:, None]
    z = c * t_hat[None] + np.sqrt(1 - c**2) * other
    assert np.allclose(cos(z, t), cosines)  # a draw parallel to t (the same seed as t's) would miss them
    return z


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_blank_prompts_are_the_codes_80_templates_with_an_empty_class(random_classifier):
    # Entries of the code's zeroshot-templates.json ("imagenet1k"), filled as its __init__ does: format(c="").
    for template in ("a bad photo of a {c}.", "a photo of many {c}.", "itap of my {c}.", "a tattoo of the {c}."):
        assert template.format(c="") in BLANK_PROMPTS
    assert len(BLANK_PROMPTS) == len(set(BLANK_PROMPTS)) == 80
    assert BLANK_PROMPTS[0] == "a bad photo of a ." and all("{" not in p for p in BLANK_PROMPTS)

    blank = blank_prompt_embedding(random_classifier)
    model, tokenizer = random_classifier.clip.model, random_classifier.clip.tokenizer
    with torch.no_grad():
        by_hand = F.normalize(model.encode_text(tokenizer(list(BLANK_PROMPTS))), dim=-1).mean(dim=0)
    assert torch.allclose(blank, by_hand, atol=1e-6)
    assert blank.norm() < 0.99  # a mean of unit vectors, not normalised again
    assert blank_prompt_embedding(random_classifier) is blank  # once per classifier


def test_purification_is_the_codes_per_image_and_differs_from_it_at_batch_size_two():
    d = 512
    t = np.random.default_rng(0).standard_normal(d) * 0.05 + 0.02
    z0 = at_cosines([0.15, 0.25, 0.35, 0.3], t, seed=1)
    ours = purify(torch.from_numpy(z0), torch.from_numpy(t), STEPS, STEP).detach().numpy()

    assert np.allclose(ours, code_purify_zi(z0, t, batch_norm=False), atol=1e-12)
    for i in range(len(z0)):  # the code at batch size 1, image by image
        assert np.allclose(ours[i], code_purify_zi(z0[i : i + 1], t)[0], atol=1e-12)
    # The code's default batch of 2 couples the two images' step sizes: neither comes back to its start.
    coupled = np.concatenate([code_purify_zi(z0[i : i + 2], t) for i in (0, 2)])
    assert np.abs(coupled - ours).max() > 1e-3
    assert (cos(coupled, z0) < 1 - 1e-5).all()
    assert (cos(ours, z0) > 1 - 1e-12).all()  # the round trip, at any batch size here
    # The code's momentum (its runs use 0), per image as well.
    with_momentum = purify(torch.from_numpy(z0), torch.from_numpy(t), STEPS, STEP, momentum=0.9).detach().numpy()
    assert np.allclose(with_momentum, code_purify_zi(z0, t, batch_norm=False, gamma=0.9), atol=1e-12)
    assert np.abs(with_momentum - ours).max() > 1e-3


def test_ten_steps_come_back_and_nine_sit_near_the_blank_prompt():
    """The geometry of 3(g): each step turns z by arctan(30) towards t inside the plane of z0 and t."""
    d = 512
    t = np.random.default_rng(2).standard_normal(d)
    cosines = [0.15, 0.3, -0.1]  # the last lies beyond one turn of t: it walks before it alternates
    z0 = at_cosines(cosines, t, seed=3)
    blank = torch.from_numpy(t)
    nine = purify(torch.from_numpy(z0), blank, STEPS - 1, STEP).detach().numpy()
    ten = purify(torch.from_numpy(z0), blank, STEPS, STEP).detach().numpy()
    assert np.allclose(nine, code_purify_zi(z0, t, STEPS - 1, batch_norm=False), atol=1e-12)
    assert np.allclose(ten, code_purify_zi(z0, t, batch_norm=False), atol=1e-12)

    angles = np.arccos(cosines)
    for i, angle in enumerate(angles[:2]):
        assert cos(ten[i], z0[i]) == pytest.approx(1.0, abs=1e-12)
        assert cos(nine[i], t) == pytest.approx(math.cos(TURN - angle), abs=1e-9)  # just past t
        assert cos(nine[i], t) > 0.95
    # Beyond one turn: z1 lies on t's near side, and the alternation is between z1 and z2.
    assert angles[2] > TURN and cosines[2] < ROUND_TRIP_COSINE
    assert cos(ten[2], z0[2]) == pytest.approx(math.cos(2 * TURN), abs=1e-9)
    assert cos(ten[2], t) == pytest.approx(math.cos(angles[2] - 2 * TURN), abs=1e-9)


def test_predicts_as_plain_clip_within_one_turn_of_the_blank_prompt(tiny_classifier, random_classifier, images,
                                                                   cifar10_first):
    for classifier, x in ((tiny_classifier, cifar10_first(2)[0]), (random_classifier, images)):
        defended = CLIPure()(classifier, x, rng(len(x))).logits
        with torch.no_grad():
            plain = classifier.logits(x)
            start = F.normalize(classifier.encode_image(x), dim=-1)
        cosine = F.cosine_similarity(start, blank_prompt_embedding(classifier)[None], dim=1)
        near, beyond = cosine > ROUND_TRIP_COSINE + 0.01, cosine < ROUND_TRIP_COSINE
        assert torch.allclose(defended[near], plain[near], atol=1e-4 * classifier.logit_scale)
        assert torch.equal(defended[near].argmax(-1), plain[near].argmax(-1))
        # Measured: the random CLIP's 6 images at cosines 0.20-0.23; 18 of the 20 CIFAR-10 images on the trained
        # tiny CLIP, whose two trucks (cosines -0.01 and -0.07) land 176 degrees from where they started.
        if classifier is tiny_classifier:
            assert 0 < int(beyond.sum()) < len(x) // 4 and int(near.sum()) >= len(x) - 3
            assert not torch.allclose(defended[beyond], plain[beyond], atol=0.1 * classifier.logit_scale)
        else:
            assert near.all()


def test_costs_one_forward_and_no_backward(random_classifier, images):
    with count_encoder_passes() as passes:
        CLIPure()(random_classifier, images, rng(len(images)))
    assert (passes.forwards, passes.backwards) == (len(images), 0)
    x = images.clone().requires_grad_(True)
    with count_encoder_passes() as passes:  # the attack's own backward is one; the latent steps are none
        logits = CLIPure().attack_view(random_classifier, x, rng(len(x)), "exact").logits
        torch.autograd.grad(logits.sum(), x)
    assert (passes.forwards, passes.backwards) == (len(images), len(images))


def test_independent_of_the_batch(random_classifier, images):
    ids = list(range(40, 40 + len(images)))
    whole = CLIPure()(random_classifier, images, ImageRandomness.for_images(0, "d", ids, "p")).logits
    for start in range(0, len(images), 2):
        part = slice(start, start + 2)
        alone = CLIPure()(random_classifier, images[part], ImageRandomness.for_images(0, "d", ids[part], "p")).logits
        # Measured: up to 3e-5 (CLIP alone: 1e-6): the encoder's batched rounding, 1e-7 on z0, grows over ten
        # 88-degree turns. The code's batch-wide step norm moves embeddings by 1e-3 and more (the NumPy replica).
        assert torch.allclose(alone, whole[part], atol=2e-5 * random_classifier.logit_scale)


@pytest.mark.parametrize("method", ["exact", "bpda"])
def test_attack_view_is_the_defense(random_classifier, images, method):
    defended = CLIPure()(random_classifier, images, rng(len(images))).logits
    view = CLIPure().attack_view(random_classifier, images.clone().requires_grad_(True), rng(len(images)), method)
    assert torch.equal(view.logits, defended)


def test_refuses_settings_out_of_bounds():
    with pytest.raises(CounterattackError, match="steps"):
        CLIPure(steps=-1)
    with pytest.raises(CounterattackError, match="momentum"):
        CLIPure(momentum=1.5)


def input_gradients(classifier, x, labels, views=("exact", "bpda", "clip"), scale: float = 1.0) -> dict:
    """The gradient of the summed cross-entropy at ``x`` through each view of CLIPure, and through CLIP alone."""
    grads = {}
    for name in views:
        pixels = x.clone().requires_grad_(True)
        logits = (classifier.logits(pixels) if name == "clip"
                  else CLIPure().attack_view(classifier, pixels, rng(len(x)), name).logits)
        (grads[name],) = torch.autograd.grad(scale * F.cross_entropy(logits, labels, reduction="sum"), pixels)
    return grads


def norms(gradient: torch.Tensor) -> torch.Tensor:
    return gradient.flatten(1).norm(dim=1)


def test_the_purifications_own_jacobian_is_thirty_to_the_minus_ten(random_classifier):
    """In float64 on the sphere: the derivative of the 10 steps (each step's gradient a constant) is that of 10
    maps u -> normalise(u + s m), which scale every direction orthogonal to the plane of z0 and t by
    1 / sqrt(1 + s^2) and the plane's tangent by far less: (1 + 30^2)^-5 = 1.7e-15 in all."""
    d = 64
    t = np.random.default_rng(4).standard_normal(d)
    z0 = at_cosines([0.2], t, seed=5)[0]
    w = np.random.default_rng(6).standard_normal(d)
    e = torch.from_numpy(z0).requires_grad_(True)
    # A head that normalises again: the code's does not, and the rounding of its radial part would hide the signal.
    purified = purify(F.normalize(e, dim=0)[None], torch.from_numpy(t), STEPS, STEP)[0]
    (grad,) = torch.autograd.grad(F.normalize(purified, dim=0) @ torch.from_numpy(w), e)

    plane, _ = np.linalg.qr(np.stack([z0, t], axis=1))
    expected = (w - plane @ (plane.T @ w)) * (1 + STEP**2) ** -5
    assert np.allclose(grad.numpy(), expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
    assert np.linalg.norm(expected) / np.linalg.norm(w - z0 * (z0 @ w)) == pytest.approx(1.68e-15, rel=0.1)


def clear_of_the_turn(classifier, x: torch.Tensor, margin: float) -> torch.Tensor:
    """Which images' embeddings lie within one turn of t by ``margin`` in cosine: they come back to their start.
    (Right at the boundary z_1 lands next to t, where the step's direction is a quotient of tiny numbers.)"""
    with torch.no_grad():
        start = F.normalize(classifier.encode_image(x), dim=-1)
    return F.cosine_similarity(start, blank_prompt_embedding(classifier)[None], dim=1) > ROUND_TRIP_COSINE + margin


def test_exact_gradient_vanishes_and_bpda_hands_over_clips(tiny_classifier, cifar10_first):
    x, labels = (part[:6] for part in cifar10_first(1))
    grads = input_gradients(tiny_classifier, x, labels)
    assert clear_of_the_turn(tiny_classifier, x, margin=0.1).all()  # so the defended loss is CLIP's
    assert torch.allclose(grads["bpda"], grads["clip"], rtol=1e-4, atol=1e-6 * grads["clip"].abs().max())
    ratio = norms(grads["exact"]) / norms(grads["clip"])
    # Measured 4e-10 to 1e-8: not the 1.7e-15 of the steps' Jacobian but the float32 rounding left where the first
    # normalisation cancels the head gradient's radial part, which the code's differentiable r = ||z|| carries
    # through every step undamped. Its direction is mostly that of +-grad ||f(x)||, not CLIP's.
    assert (ratio > 0).all() and (ratio < 1e-6).all(), ratio


def test_under_fp16_the_exact_gradient_is_exactly_zero(tiny_classifier, cifar10_first):
    """The code's encoder runs in fp16: the tiny gradient reaching its output is cast to fp16 and flushes to 0."""
    x, labels = (part[:3] for part in cifar10_first(1))
    with precision_context(CPU, "fp16"):
        grads = input_gradients(tiny_classifier, x, labels, views=("exact", "bpda"))
        (scaled,) = input_gradients(tiny_classifier, x, labels, views=("exact",), scale=FP16_LOSS_SCALE).values()
    assert torch.equal(grads["exact"], torch.zeros_like(x))  # at unit loss scale, as AutoAttack back-propagates
    assert (norms(grads["bpda"]) > 0).all()
    # The project's fp16 loss scale (2^12) lifts some of the rounding residue back into fp16's range: signs of
    # rounding noise, a millionth of the gradient bpda sees or less.
    assert (norms(scaled) < 1e-6 * FP16_LOSS_SCALE * norms(grads["bpda"])).all()


def test_bpda_attacks_it_as_clip_and_exact_does_not(tiny_classifier, cifar10_first):
    images, labels = cifar10_first(1)
    budget = dict(eps=2 / 255, steps=2, step_size=1 / 255)
    clipure = CLIPure()
    right = {}
    for method in ("exact", "bpda"):
        adversarial = AdaptiveAttack(clipure, PGD(**budget), method=method)(
            tiny_classifier, images, labels, rng(len(images), seed=1), start=images)
        right[method] = int((clipure(tiny_classifier, adversarial, rng(len(images))).logits.argmax(-1) == labels).sum())
    on_clip = PGD(**budget)(tiny_classifier, images, labels, rng(len(images), seed=1))
    with torch.no_grad():
        right["clip"] = int((tiny_classifier.logits(on_clip).argmax(-1) == labels).sum())
    # Measured (of 10; 7 clean): exact 4, bpda 0, PGD on CLIP 0. Exact's steps follow the signs of rounding residue
    # (+-grad ||f(x)||), which still moves these fragile 32-px images; bpda is PGD on CLIP wherever z_10 = z_0.
    assert right["bpda"] < right["exact"], right
    assert right["bpda"] <= right["clip"] + 1, right
