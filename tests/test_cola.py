"""COLA: the transport, the projection, the weights and the whole defense against computations written here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

from counterattack import ImageRandomness, ZeroShotClassifier
from counterattack.classifier import count_encoder_passes
from counterattack.defenses import DEFENSES
from counterattack.defenses.cola import (
    COLA, class_prompts, description_weights, sinkhorn, subspace_basis, view_weights,
)
from counterattack.augment import crop_boxes
from counterattack.descriptions import WHERE_TO_GET, read_descriptions
from counterattack.errors import CounterattackError

from testkit import CIFAR10_CLASSES, transfer_and_adaptive

TEMPLATE = "This is a photo of a {}."  # the classifier's default template
DESCRIBED = 6  # sentences per class in the test's file


@pytest.fixture(scope="module")
def descriptions(tmp_path_factory) -> dict[str, list[str]]:
    """A descriptions file written here, in the layout CuPL and AWT publish, read as a run reads it."""
    path = tmp_path_factory.mktemp("descriptions") / "cifar10.json"
    path.write_text(json.dumps({name: [f"a {name} number {i}" for i in range(DESCRIBED)] for name in CIFAR10_CLASSES}))
    return read_descriptions(path)


@pytest.fixture(scope="module")
def described(random_classifier, descriptions) -> ZeroShotClassifier:
    """The random-weight tiny CLIP (d = 32) with the test's descriptions."""
    return ZeroShotClassifier.from_clip(random_classifier.clip, CIFAR10_CLASSES, descriptions=descriptions)


def small(**settings) -> COLA:
    """COLA with 4 prompts per class (the template and 3 descriptions) and an 8-dimensional subspace of d = 32."""
    return COLA(**{"prompts": 4, "subspace": 8, **settings})


def rng(n: int, seed: int = 0) -> ImageRandomness:
    return ImageRandomness.from_seed(seed, n, "cola")


# --- the transport ----------------------------------------------------------------------------------------------


def brute_force_plan(cost: np.ndarray, rows: np.ndarray, columns: np.ndarray, eps: float) -> np.ndarray:
    """argmin <T, C> + eps sum T log T over the 2 x 3 plans with these marginals, by a general-purpose optimiser
    over the plan's two free entries (the others follow from the marginals)."""

    def plan(free: np.ndarray) -> np.ndarray:
        first = np.array([free[0], free[1], rows[0] - free[0] - free[1]])
        return np.stack([first, columns - first])

    def objective(free: np.ndarray) -> float:
        t = plan(free)
        return float((t * cost).sum() + eps * (t * np.log(t)).sum()) if (t > 0).all() else np.inf

    start = np.outer(rows, columns)[0, :2]  # the independent coupling: feasible, inside
    found = minimize(objective, start, method="Nelder-Mead", options={"xatol": 1e-12, "fatol": 1e-16,
                                                                      "maxiter": 10_000})
    assert found.success, found.message
    return plan(found.x)


def test_sinkhorn_solves_the_entropic_transport_problem():
    cost = np.array([[0.2, 0.7, 0.4], [0.9, 0.1, 0.5]])
    rows, columns, eps = np.array([0.3, 0.7]), np.array([0.5, 0.2, 0.3]), 0.1
    kernel = torch.exp(-torch.tensor(cost) / eps)[None, None]
    plan = sinkhorn(kernel, torch.tensor(rows)[None], torch.tensor(columns)[None, None], 10_000, 1e-15)[0, 0].numpy()
    assert np.allclose(plan, brute_force_plan(cost, rows, columns, eps), atol=1e-6)
    assert np.allclose(plan.sum(1), rows, atol=1e-12) and np.allclose(plan.sum(0), columns, atol=1e-12)
    # The optimality conditions: log T + C / eps = f_i + g_j, so its mixed second differences vanish.
    potential = np.log(plan) + cost / eps
    assert np.allclose(potential - potential[:, :1] - potential[:1, :] + potential[0, 0], 0, atol=1e-9)


def awt_sinkhorn(kernel: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, int]:
    """AWT's loop for one image (kernel (K, V, M)), as its code runs it: 100 iterations at most, a break once the
    row scalings moved by less than 1e-2 on average; the plan and the iterations it took."""
    r, c = torch.ones_like(rows), torch.ones_like(columns)
    done = 0
    while done < 100:
        previous = r
        r = rows / (kernel @ c[..., None]).squeeze(-1)
        c = columns / (kernel.transpose(1, 2) @ r[..., None]).squeeze(-1)
        done += 1
        if (r - previous).abs().mean().item() < 1e-2:
            break
    return r[..., None] * c[:, None, :] * kernel, done


def test_each_image_stops_its_transport_where_awt_would_alone():
    generator = torch.Generator().manual_seed(0)
    kernel = torch.exp(-(1 - torch.rand(3, 4, 5, 6, generator=generator, dtype=torch.float64)) / 0.1)
    rows = torch.softmax(torch.randn(3, 5, generator=generator, dtype=torch.float64), -1)
    columns = torch.softmax(torch.randn(3, 4, 6, generator=generator, dtype=torch.float64), -1)
    plans = sinkhorn(kernel, rows, columns, 100, 1e-2)
    alone = [awt_sinkhorn(kernel[i], rows[i], columns[i]) for i in range(3)]
    assert len({done for _, done in alone}) > 1, "the images should need different numbers of iterations"
    for i, (expected, _) in enumerate(alone):
        assert torch.allclose(plans[i], expected, rtol=1e-12, atol=0)
        # The last update was the columns': each class's plan carries exactly b_y, so its mass is 1.
        assert torch.allclose(plans[i].sum(1), columns[i], atol=1e-12)


# --- the text side ----------------------------------------------------------------------------------------------


def test_prompts_join_the_template_and_each_description():
    assert class_prompts("A photo of a {}, a type of flower.", "rose", ["Red petals.", "A thorny stem."]) == [
        "A photo of a rose, a type of flower.", "A photo of a rose, a type of flower. Red petals.",
        "A photo of a rose, a type of flower. A thorny stem."]
    assert class_prompts("a photo of a {}, a type of flower", "rose", ["Red."]) == [  # AWT's templates have no "."
        "a photo of a rose, a type of flower.", "a photo of a rose, a type of flower. Red."]


def test_the_subspace_is_the_top_left_singular_vectors():
    generator = torch.Generator().manual_seed(0)
    embeddings = F.normalize(torch.randn(40, 16, generator=generator) + 0.5, dim=-1)
    basis = subspace_basis(embeddings, 5)
    left = np.linalg.svd(embeddings.double().numpy().T)[0][:, :5]
    assert basis.shape == (16, 5)
    assert np.allclose((basis @ basis.T).numpy(), left @ left.T, atol=1e-6)  # the projector: signs are arbitrary
    assert torch.allclose(subspace_basis(embeddings, 256) @ subspace_basis(embeddings, 256).T, torch.eye(16),
                          atol=1e-6)  # d <= C: clamped, the identity
    few = embeddings[:6]
    spanned = subspace_basis(few, 256)
    assert spanned.shape == (16, 6) and torch.allclose(spanned @ spanned.T @ few.T, few.T, atol=1e-6)


# --- the weights --------------------------------------------------------------------------------------------


def direct_entropy(logits: np.ndarray) -> float:
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return float(-(p * np.log(p)).sum())


def direct_softmax(values: np.ndarray) -> np.ndarray:
    e = np.exp(values - values.max())
    return e / e.sum()


@pytest.mark.parametrize("spread", [3.0, 60.0])  # 60: one class takes nearly all the probability
def test_view_and_prompt_weights_against_awts_construction(spread):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 3, 4, generator=generator, dtype=torch.float64) * spread  # (n, views, prompts, K)
    a = view_weights(logits.mean(2), 0.5).numpy()
    b = description_weights(logits[:, 0].mean(1), logits[:, 0].transpose(1, 2), 0.5).numpy()
    values = logits.numpy()
    for i in range(2):
        entropies = np.array([direct_entropy(values[i, v].mean(0)) for v in range(5)])
        assert np.allclose(a[i], direct_softmax(-entropies / 0.5), atol=1e-10)
        anchor = values[i, 0].mean(0)
        for y in range(4):
            replaced = []
            for m in range(3):
                distribution = anchor.copy()
                distribution[y] = values[i, 0, m, y]
                replaced.append(direct_entropy(distribution))
            assert np.allclose(b[i, y], direct_softmax(-np.array(replaced) / 0.5), atol=1e-10)


# --- the defense --------------------------------------------------------------------------------------------------


def test_views_are_the_image_and_its_random_resized_crops(images):
    x = images[:2]
    views = small().draw_views(x, rng(2))
    assert views.shape == (2, 5, 3, 32, 32) and torch.equal(views[:, 0], x)
    again = rng(2)
    crops, flips = again.uniform(4, 10, 4), again.uniform(4)
    for i in range(2):
        for v in range(4):
            top, left, h, w = crop_boxes(crops[i, v][None], 32, 32)[0].long().tolist()
            expected = F.interpolate(x[i : i + 1, :, top : top + h, left : left + w], size=(32, 32), mode="bilinear",
                                     align_corners=False)[0]
            assert torch.allclose(views[i, v + 1], expected.flip(-1) if flips[i, v] < 0.5 else expected, atol=1e-6)


def plain_cola(classifier: ZeroShotClassifier, views: torch.Tensor, prompts: int, subspace: int) -> torch.Tensor:
    """COLA written out image by image and class by class in float64, from the views and the paper's and AWT's
    steps: prompts "template(y). description", the SVD's projector, cost 1 - cos, AWT's weights and Sinkhorn."""
    names, scale = classifier.class_names, classifier.logit_scale
    texts = [f"This is a photo of a {name}." if m == 0 else f"This is a photo of a {name}. a {name} number {m - 1}"
             for name in names for m in range(prompts)]
    z = classifier.encode_texts(texts).double().view(len(names), prompts, -1)
    u = np.linalg.svd(z.flatten(0, 1).numpy().T)[0][:, :subspace]
    projector = torch.from_numpy(u @ u.T)
    results = []
    for image_views in views:
        with torch.no_grad():
            f = F.normalize(classifier.encoder(image_views).double(), dim=-1)
        logits = scale * torch.einsum("vd,kmd->vmk", f, z)
        entropies = torch.tensor([direct_entropy(logits[v].mean(0).numpy()) for v in range(len(f))])
        a = torch.softmax(-entropies / 0.5, 0)
        anchor = logits[0].mean(0)
        b = torch.zeros(len(names), prompts, dtype=torch.float64)
        for y in range(len(names)):
            replaced = [direct_entropy(torch.cat((anchor[:y], logits[0, m, y : y + 1], anchor[y + 1 :])).numpy())
                        for m in range(prompts)]
            b[y] = torch.softmax(-torch.tensor(replaced) / 0.5, 0)
        projected = F.normalize(f @ projector, dim=-1)
        cost = 1 - torch.einsum("vd,kmd->kvm", projected, z)
        plan, _ = awt_sinkhorn(torch.exp(-cost / 0.1), a, b)
        results.append(scale * (plan * (1 - cost)).sum(dim=(1, 2)))
    return torch.stack(results)


def test_the_defense_equals_its_steps_written_out(described, images):
    x = images[:2]
    defense = small()
    output = defense(described, x, rng(2))
    assert output.images is None and output.score is None and output.counterattacked is None
    expected = plain_cola(described, defense.draw_views(x, rng(2)), prompts=4, subspace=8)
    assert torch.allclose(output.logits.double(), expected, atol=1e-4)


def test_one_view_and_one_prompt_is_clip_rescaled_per_view(described, images):
    """With one view and M = 1 the plan is 1 and the 10 class prompts span the subspace (C = 256 clamps to their 10
    dimensions, as C = 10 does), so cos(Pi x, z) = cos(x, z) |x| / |Pi x|: the zero-shot logits stretched per
    image (the specification's analysis of what the projection can change), with the same prediction."""
    x = images[:3]
    with torch.no_grad():
        plain = described.logits(x)
        features = F.normalize(described.encode_image(x), dim=-1)
    for subspace in (256, 10):
        defense = COLA(views=1, prompts=1, subspace=subspace)
        basis = defense.text_support(described).basis
        assert basis.shape == (32, 10)
        stretch = 1 / (features @ basis).norm(dim=-1, keepdim=True)
        assert (stretch > 1).all()
        logits = defense(described, x, rng(3)).logits
        assert torch.allclose(logits, plain * stretch, atol=1e-4)
        assert torch.equal(logits.argmax(-1), plain.argmax(-1))


def test_five_forwards_and_no_backward_per_image(described, images):
    defense = small()
    defense.text_support(described)
    with count_encoder_passes() as passes:
        defense(described, images[:3], rng(3))
    assert (passes.forwards, passes.backwards) == (15, 0)
    x = images[:3].clone().requires_grad_(True)
    with count_encoder_passes() as passes:
        defense.attack_view(described, x, rng(3), "exact").logits.sum().backward()
    assert (passes.forwards, passes.backwards) == (15, 15)


def test_an_images_result_does_not_depend_on_its_batch(described, images):
    ids = [f"img{i}" for i in range(4)]
    defense = small()

    def streams(chosen: slice) -> ImageRandomness:
        return ImageRandomness.for_images(3, "test", ids[chosen], "cola")

    whole = defense(described, images[:4], streams(slice(0, 4))).logits
    parts = torch.cat([defense(described, images[s], streams(s)).logits for s in (slice(0, 1), slice(1, 4))])
    assert torch.allclose(whole, parts, atol=1e-5)
    assert not torch.allclose(whole, defense(described, images[:4], streams(slice(0, 4)).fork("other")).logits)


@pytest.mark.parametrize("method", ["exact", "bpda"])
def test_attack_view_is_the_defense_and_is_differentiable(described, images, method):
    defense = small()
    x = images[:2].clone().requires_grad_(True)
    view = defense.attack_view(described, x, rng(2), method)
    assert view.score is None
    assert torch.allclose(view.logits, defense(described, images[:2], rng(2)).logits, atol=1e-5)
    (gradient,) = torch.autograd.grad(F.cross_entropy(view.logits, torch.tensor([0, 1])), x)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_exact_differentiates_the_weights_and_plan_that_bpda_holds(described, images):
    defense = small()
    x = images[:2] * 0.8 + 0.1  # inside the box, so a finite difference needs no clipping
    labels = torch.tensor([0, 1])

    def loss(point: torch.Tensor, method: str = "exact") -> torch.Tensor:
        return F.cross_entropy(defense.attack_view(described, point, rng(2), method).logits.double(), labels)

    def gradient(method: str) -> torch.Tensor:
        point = x.clone().requires_grad_(True)
        return torch.autograd.grad(loss(point, method), point)[0]

    exact, held = gradient("exact"), gradient("bpda")
    assert not torch.allclose(exact, held, atol=1e-6)
    # A central difference along the exact gradient agrees with it: every step of the defense is differentiated.
    direction, step = exact / exact.norm(), 1e-2
    with torch.no_grad():
        slope = float(loss(x + step * direction) - loss(x - step * direction)) / (2 * step)
    assert slope == pytest.approx(float(exact.norm()), rel=1e-2)
    assert float((held * direction).sum()) < 0.99 * float(exact.norm())  # bpda's gradient is not the slope


def test_adaptive_attack_beats_the_transfer_attack_on_the_tiny_clip(tiny_clip, descriptions, cifar10_first):
    images, labels = cifar10_first(1)
    classifier = ZeroShotClassifier.from_clip(tiny_clip, CIFAR10_CLASSES, descriptions=descriptions)
    cola = COLA(prompts=4)  # d = 128 and 40 prompts: the subspace is theirs (C = 40)
    budget = dict(eps=2 / 255, steps=2, step_size=1 / 255)
    result = transfer_and_adaptive(cola, classifier, images, labels, budget, rng)
    assert result["adaptive"] < result["transfer"], (result["transfer"], result["adaptive"])
    through, undefended = result["through"], result["undefended"]
    assert through.abs().sum(dim=(1, 2, 3)).gt(0).all() and not torch.allclose(through, undefended)


def test_refused_in_one_line_without_enough_descriptions(random_classifier, descriptions, images):
    def refusal(classifier: ZeroShotClassifier, defense: COLA) -> str:
        with pytest.raises(CounterattackError) as caught:
            defense(classifier, images[:1], rng(1))
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert WHERE_TO_GET in refusal(ZeroShotClassifier.from_clip(random_classifier.clip, CIFAR10_CLASSES), small())
    missing = {name: sentences for name, sentences in descriptions.items() if name != "frog"}
    assert "'frog'" in refusal(ZeroShotClassifier.from_clip(random_classifier.clip, CIFAR10_CLASSES,
                                                             descriptions=missing), small())
    described = ZeroShotClassifier.from_clip(random_classifier.clip, CIFAR10_CLASSES, descriptions=descriptions)
    assert "at least 49" in refusal(described, COLA())  # M = 50: the template and 49 descriptions
    assert COLA.reads_descriptions == "required" and DEFENSES["cola"] is COLA
    with pytest.raises(CounterattackError):
        COLA(epsilon=0)
