import torch
import torch.nn.functional as F

from counterattack import PGD, ImageRandomness
from counterattack.attacks import project


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true - others.max(dim=1).values


def test_pgd_stays_in_budget_and_box(random_classifier, images):
    labels = torch.arange(len(images)) % 10
    eps = 2 / 255
    rng = ImageRandomness.from_seed(0, len(images))
    adv = PGD(eps=eps, steps=3, step_size=1 / 255)(random_classifier, images, labels, rng)
    assert (adv - images).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1


def test_pgd_with_zero_budget_leaves_images_unchanged(random_classifier, images):
    labels = torch.zeros(len(images), dtype=torch.long)
    adv = PGD(eps=0.0, steps=3)(random_classifier, images, labels, ImageRandomness.from_seed(0, len(images)))
    assert torch.equal(adv, images)


def test_pgd_raises_the_loss_of_a_random_model(random_classifier, images):
    labels = torch.arange(len(images)) % 10
    rng = ImageRandomness.from_seed(0, len(images))
    adv = PGD(eps=4 / 255, steps=5, step_size=1 / 255)(random_classifier, images, labels, rng)
    with torch.no_grad():
        before = F.cross_entropy(random_classifier.logits(images), labels, reduction="none")
        after = F.cross_entropy(random_classifier.logits(adv), labels, reduction="none")
    assert (after > before).all()


def test_project_clips_to_ball_and_box():
    images = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
    delta = torch.tensor([-0.3, 0.3, 0.3]).view(1, 3, 1, 1)
    assert project(images, delta, 0.1).flatten().tolist() == [0.0, 0.10000000149011612, 0.0]


def test_pgd_lowers_the_true_class_margin_of_the_tiny_clip(tiny_classifier, cifar10_first):
    images, labels = cifar10_first(1)
    adv = PGD()(tiny_classifier, images, labels, ImageRandomness.from_seed(0, len(images)))
    with torch.no_grad():
        before, after = margin(tiny_classifier.logits(images), labels), margin(tiny_classifier.logits(adv), labels)
    assert (after < before).all()
    assert (after < 0).sum() > (before < 0).sum()
