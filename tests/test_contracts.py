"""Contracts that act: attacks declare their threat model and AdaptiveAttack runs their own update or refuses; every
scheme row says how its weights are identified; gated defenses decide through their Gate."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from counterattack import PGD, AdaptiveAttack, AutoAttack, ImageRandomness, RandomNoise, load_clip
from counterattack.adaptive import check_adaptive
from counterattack.attacks import ATTACKS, project
from counterattack.attacks.base import distance, takes_start
from counterattack.attacks.losses import cross_entropy
from counterattack.backbones import SCHEMES, Scheme, weights_identity
from counterattack.defenses import DEFENSES
from counterattack.errors import CounterattackError

from testkit import RANDOM_CLIP_CFG, fake_hub_cache, write_local_dir


def rng(n: int, seed: int = 0) -> ImageRandomness:
    return ImageRandomness.from_seed(seed, n, "contracts")


@dataclass(frozen=True)
class LossOnly:
    """eps, steps, step_size and a loss were once enough: it would have been run as L-inf PGD."""

    name: ClassVar[str] = "loss-only"
    norm: ClassVar[str] = "l2"
    eps: float = 0.5
    steps: int = 3
    step_size: float = 0.2

    def loss(self, logits, labels):
        return cross_entropy(logits, labels)


@dataclass(frozen=True)
class L2PGD(LossOnly):
    """An L2 attack written by a user: normalised gradient steps, projected onto an L2 ball."""

    name: ClassVar[str] = "l2-pgd"

    def project(self, images, delta):
        norms = delta.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
        return torch.clamp(delta * (self.eps / norms).clamp(max=1.0), min=-images, max=1 - images)

    def step(self, images, delta, grad):
        unit = grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
        return self.project(images, delta + self.step_size * unit)

    def __call__(self, classifier, images, labels, rng):
        return images + self.project(images, torch.zeros_like(images))

    def describe(self):
        return {"attack": self.name, "norm": self.norm, "eps": self.eps}


def test_an_adaptive_attack_runs_its_base_attacks_own_update_rule(random_classifier, images):
    """An L2 attack through a defense stays in its L2 ball: it was not run as L-inf sign steps."""
    labels = torch.zeros(len(images), dtype=torch.long)
    attack = AdaptiveAttack(RandomNoise(), L2PGD())
    adversarial = attack(random_classifier, images, labels, rng(len(images)))
    moved = distance("l2", adversarial - images)
    assert (moved <= 0.5 + 1e-5).all() and (moved > 0.1).all()
    # Sign steps of 0.2 from the start would have moved every pixel: an L-inf ball of 0.2 per pixel, far outside it.
    assert distance("linf", adversarial - images).max() < 0.2
    assert attack.norm == "l2" and attack.describe()["norm"] == "l2"


def test_an_attack_that_does_not_declare_its_step_is_refused_in_one_line():
    with pytest.raises(CounterattackError) as error:
        AdaptiveAttack(RandomNoise(), LossOnly())
    assert "has no step, project" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(CounterattackError, match="autoattack has no .*Attacks it can run: pgd, cw"):
        check_adaptive(AutoAttack())


def test_registered_attacks_declare_their_norm_and_whether_they_take_a_start():
    assert {name: cls.norm for name, cls in ATTACKS.items()} == dict.fromkeys(ATTACKS, "linf")
    assert PGD().describe()["norm"] == "linf"
    assert takes_start(PGD()) and takes_start(AdaptiveAttack(RandomNoise(), PGD()))
    assert not takes_start(AutoAttack())


def test_pgd_goes_on_from_a_start(random_classifier, images):
    labels = torch.zeros(len(images), dtype=torch.long)
    start = images + project(images, rng(len(images), 5).uniform_like(images, -1 / 255, 1 / 255), 1 / 255)
    assert torch.equal(PGD(steps=0)(random_classifier, images, labels, rng(len(images)), start=start), start)
    went_on = PGD(steps=2)(random_classifier, images, labels, rng(len(images)), start=start)
    assert (distance("linf", went_on - images) <= 1 / 255 + 1e-6).all() and not torch.equal(went_on, start)


def test_a_scheme_row_cannot_be_made_without_an_identity():
    assert SCHEMES and all(isinstance(row, Scheme) and callable(row.identify) for row in SCHEMES.values())
    with pytest.raises(TypeError):
        Scheme(SCHEMES[""].load)


def _as_local_dir(source: Path, where: Path) -> tuple[str, str | None, str | None]:
    return f"local-dir:{shutil.copytree(source, where)}", None, None


def _as_hub_snapshot(source: Path, where: Path) -> tuple[str, str | None, str | None]:
    snapshot = fake_hub_cache(where, "someone/tiny-clip")
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        shutil.copy(source / name, snapshot / name)
    return "hf-hub:someone/tiny-clip", None, str(where)


def _as_builtin_with_a_weights_file(source: Path, where: Path) -> tuple[str, str | None, str | None]:
    import open_clip  # a built-in name is a config open_clip knows: this one is registered for the test

    where.mkdir()
    config = json.loads((source / "open_clip_config.json").read_text())["model_cfg"]
    (where / "contract-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(where / "contract-tiny-clip.json")
    return "contract-tiny-clip", str(shutil.copy(source / "open_clip_model.safetensors", where / "w.safetensors")), None


# How each row's weights are laid out from an open_clip folder; the transformers row holds another format and is
# checked the same way in test_transformers.py. A new row without a layout here fails the test below.
LAYOUTS = {"": _as_builtin_with_a_weights_file, "local-dir:": _as_local_dir, "hf-hub:": _as_hub_snapshot}
CHECKED_ELSEWHERE = {"transformers:"}


@pytest.mark.parametrize("prefix", list(SCHEMES))
def test_every_scheme_row_identifies_weights_by_the_tensors_loaded(prefix, tmp_path):
    """The same weights laid out twice are one identity whatever the path, a file beside them changes nothing, and
    other weights are another identity."""
    if prefix in CHECKED_ELSEWHERE:
        pytest.skip(f"the {prefix} row is checked in test_transformers.py")
    assert prefix in LAYOUTS, f"the scheme row {prefix!r} has no layout in this test: add one"

    def identity(source: Path, where: Path) -> dict:
        model, pretrained, cache_dir = LAYOUTS[prefix](source, where)
        loaded = load_clip(model, pretrained, cache_dir=cache_dir)
        return weights_identity(model, pretrained, loaded)

    model = write_local_dir(tmp_path / "model", RANDOM_CLIP_CFG, seed=0)
    first = identity(model, tmp_path / "a")
    (model / "notes.json").write_text("{}")
    assert identity(model, tmp_path / "b") == first and "weights" in first
    other = write_local_dir(tmp_path / "other", RANDOM_CLIP_CFG, seed=1)
    assert identity(other, tmp_path / "c")["weights"] != first["weights"]


@pytest.mark.parametrize("name", [name for name, cls in DEFENSES.items() if cls.gate is not None])
def test_gated_defenses_decide_through_their_gate(name, random_classifier, images):
    """What a gated defense reports as counterattacked is its gate's reading of its score at its threshold."""
    defense = DEFENSES[name]()
    output = defense(random_classifier, images, rng(len(images)))
    assert output.score is not None and output.counterattacked is not None
    assert torch.equal(output.counterattacked.bool(), defense.gate.flags(defense, output.score))
