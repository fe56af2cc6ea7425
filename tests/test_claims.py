"""Claims that cannot hide: pseudo-label attacks, label-leakage warnings and gradient-masking verdicts, each shown
to fire on a toy defense built to fail that way, and not on TTC."""

import json

import pytest

import counterattack.defenses as defenses
from counterattack import DEFENSES
from counterattack.claims import leakage_warnings, masking_verdict
from counterattack.cli import main
from counterattack.records import Record
from counterattack.summary import combine_seeds

from testkit import CIFAR10_TEST_DIR, TINY_CLIP_DIR, needs_shared, one_more_file, write_image_folder

# Walks an image back along its perturbation: the feature moves past the mean of its flipped and shifted views, which
# partly undo the attack (DBD's move without its gate). Under a true-label attack that direction points to the true
# class, even for images the model gets wrong when clean.
TOY_REVERSER = '''
"""A toy defense that leaks the attack's label, for the tests."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from counterattack.defenses import option, register_defense
from counterattack.defenses.base import AttackView, DefenseOutput
from counterattack.defenses.tte import default_transforms


@register_defense
@dataclass(frozen=True)
class Reverser:
    """Move the feature past the mean of its flipped and shifted views."""

    shift: float = option(2.5, "how far past the views' mean the feature moves")

    def _logits(self, classifier, images):
        first = F.normalize(classifier.encode_image(images), dim=-1)
        views = [F.normalize(classifier.encode_image(view(images)), dim=-1)
                 for view in default_transforms(images.shape[-1])[1:]]
        return classifier.logits_from_embeddings(first + self.shift * (torch.stack(views).mean(0) - first))

    @torch.no_grad()
    def __call__(self, classifier, images, rng):
        return DefenseOutput(self._logits(classifier, images))

    def attack_view(self, classifier, images, rng, method, with_score=False):
        return AttackView(self._logits(classifier, images))
'''

# Classifies the image rounded to 8 bits: the derivative of rounding is zero, so the exact gradient through it is.
TOY_ROUNDER = '''
"""A toy defense that masks its gradient, for the tests."""

from dataclasses import dataclass

import torch

from counterattack.defenses import register_defense
from counterattack.defenses.base import AttackView, DefenseOutput, through_defense


@register_defense
@dataclass(frozen=True)
class Rounder:
    """Classify the image rounded to 8 bits."""

    @torch.no_grad()
    def __call__(self, classifier, images, rng):
        return DefenseOutput(classifier.logits(torch.round(images * 255) / 255))

    def attack_view(self, classifier, images, rng, method, with_score=False):
        rounded = torch.round(images * 255) / 255
        return AttackView(classifier.logits(through_defense(images, rounded - images, method)))
'''


@pytest.fixture
def reverser(tmp_path, monkeypatch):
    yield from one_more_file(tmp_path, monkeypatch, defenses, DEFENSES, "toy_reverser", TOY_REVERSER)


@pytest.fixture
def rounder(tmp_path, monkeypatch):
    yield from one_more_file(tmp_path, monkeypatch, defenses, DEFENSES, "toy_rounder", TOY_ROUNDER)


def tiny_eval(out, *extra) -> dict[tuple[str, str], dict]:
    """``counterattack eval`` on the tiny CLIP and the first CIFAR-10 test images; its records by (defense, attack)."""
    assert main(["eval", "--no-progress", "--workers", "0", "--model", f"local-dir:{TINY_CLIP_DIR}", "--dataset",
                 f"imagefolder:{CIFAR10_TEST_DIR}", "--out", str(out), *map(str, extra)]) == 0
    results = json.loads((out / "results.json").read_text())
    return {(r["defense"], r["attack"]): r for r in results["records"]}


# --- pseudo-label attacks and label leakage ----------------------------------------------------------------------


@needs_shared
def test_predicted_labels_attack_the_prediction(tmp_path):
    """Undefended, images wrong when clean are attacked away from their wrong class under predicted labels, so some
    become right; under true labels the attack never makes a wrong image right."""
    true = tiny_eval(tmp_path / "true", "--limit", 100, "--defense", "none", "--attack-steps", 5)
    predicted = tiny_eval(tmp_path / "predicted", "--limit", 100, "--defense", "none", "--attack-steps", 5,
                          "--attack-labels", "predicted")
    assert true[("none", "pgd")]["fixed_by_attack"] == 0.0 and true[("none", "pgd")]["attack_labels"] == "true"
    record = predicted[("none", "pgd")]
    assert record["fixed_by_attack"] > 0 and record["attack_labels"] == "predicted"
    assert record["clean_acc"] == true[("none", "pgd")]["clean_acc"]  # accuracy is the true labels' either way
    assert json.loads((tmp_path / "predicted" / "config.json").read_text())["config"]["attack_labels"] == "predicted"


def test_stored_sets_and_resumes_keep_the_label_mode(tmp_path, random_clip_dir, capsys):
    folder = write_image_folder(tmp_path / "imgs", {"cat": 2, "dog": 2})
    common = ["--no-progress", "--workers", "0", "--model", f"local-dir:{random_clip_dir}", "--dataset",
              f"imagefolder:{folder}"]

    def records(out):
        return json.loads((out / "results.json").read_text())["records"]

    assert main(["attack", *common, "--attack-steps", "1", "--out", str(tmp_path / "true-set")]) == 0
    assert main(["eval", *common, "--defense", "none", "--adversarial", str(tmp_path / "true-set"),
                 "--attack-labels", "predicted", "--out", str(tmp_path / "refused")]) == 2
    assert "crafted against the true labels; --attack-labels predicted needs" in capsys.readouterr().err
    assert main(["attack", *common, "--attack-steps", "1", "--attack-labels", "predicted", "--out",
                 str(tmp_path / "predicted-set")]) == 0
    on_set = tmp_path / "on-predicted-set"
    assert main(["eval", *common, "--defense", "none", "--adversarial", str(tmp_path / "predicted-set"), "--out",
                 str(on_set)]) == 0
    assert {r["attack_labels"] for r in records(on_set)} == {"predicted"}  # the set's mode, without the flag
    predicted = tmp_path / "predicted"
    assert main(["eval", *common, "--attack-steps", "1", "--defense", "none", "--attack-labels", "predicted",
                 "--out", str(predicted)]) == 0
    capsys.readouterr()
    # the same command under true labels, in the same folder: refused, not resumed
    assert main(["eval", *common, "--attack-steps", "1", "--defense", "none", "--out", str(predicted)]) == 2
    assert "attack_labels" in capsys.readouterr().err
    assert {r["attack_labels"] for r in records(predicted)} == {"predicted"}


@needs_shared
def test_label_leakage_is_warned_of_on_a_reversing_defense_and_not_on_ttc(tmp_path, reverser, capsys):
    common = ("--limit", 200, "--eps", 4, "--attack-step-size", 1, "--defense", "none,toy-reverser,ttc")
    true = tiny_eval(tmp_path / "true", *common)
    err = capsys.readouterr().err
    toy = true[("toy-reverser", "pgd")]
    assert toy["robust_acc"] > toy["clean_acc"] + 10 and toy["fixed_by_attack"] > 10
    assert any("label leakage?" in w and "--attack-labels predicted" in w for w in toy["warnings"])
    assert "WARNING: label leakage? toy-reverser" in err
    assert not true[("ttc", "pgd")].get("warnings")
    predicted = tiny_eval(tmp_path / "predicted", *common, "--attack-labels", "predicted")
    assert not predicted[("toy-reverser", "pgd")].get("warnings") and not predicted[("ttc", "pgd")].get("warnings")
    assert predicted[("toy-reverser", "pgd")]["robust_acc"] < toy["robust_acc"] - 10
    report = (tmp_path / "true" / "report.md").read_text()
    assert "## Warnings" in report and "label leakage? toy-reverser" in report
    assert "crafted against the true labels" in report and "### Label leakage and gradient masking" in report
    row = next(line for line in report.splitlines() if "| toy-reverser | " in line and "| pgd |" in line)
    assert f"| {toy['fixed_by_attack']:.1f} |" in row
    assert "clean predictions" in (tmp_path / "predicted" / "report.md").read_text()


def record(**fields) -> Record:
    return Record(**{"dataset": "d", "attack": "pgd", "defense": "x", "n": 200, "clean_acc": 50.0, "robust_acc": 10.0,
                     **fields})


def test_the_leakage_rule_against_chance_and_against_the_undefended_model():
    """Robust above clean must be beyond chance (a sign test on fixed and broken images); a large share of
    clean-wrong images fixed must be twice the undefended model's."""
    noisy = record(clean_acc=63.0, robust_acc=66.0, fixed_by_attack=16.0)  # 32 fixed, 26 broken: chance
    leaky = record(clean_acc=63.0, robust_acc=93.0, fixed_by_attack=31.0)  # 62 fixed, 2 broken
    shy = record(defense="y", clean_acc=60.0, robust_acc=50.0, fixed_by_attack=30.0)  # 75% of the 40% wrong, fixed
    none = record(defense="none", clean_acc=60.0, robust_acc=10.0, fixed_by_attack=4.0)
    leakage_warnings([none, noisy, leaky, shy])
    assert not noisy.warnings and not none.warnings
    assert "robust 93.0% is above clean 63.0% (62 images fixed by the attack, 2 broken)" in leaky.warnings[0]
    assert "makes 75% of the images wrong when clean right (undefended: 10%)" in shy.warnings[0]
    few = record(n=10, clean_acc=80.0, robust_acc=80.0, fixed_by_attack=20.0)  # 2 of 2 clean-wrong: too few
    leakage_warnings([few])
    assert not few.warnings
    also_undefended = record(defense="none", clean_acc=60.0, robust_acc=40.0, fixed_by_attack=18.0)
    shy.warnings = None
    leakage_warnings([also_undefended, shy])  # 45% of the undefended model's clean-wrong images are fixed too
    assert not shy.warnings


def test_over_seeds_fixed_share_is_a_mean_and_no_seeds_warning_or_masking_is_lost():
    first = record(fixed_by_attack=10.0, masking="none", robust_acc_exact=10.0, robust_acc_bpda=12.0)
    second = record(fixed_by_attack=20.0, masking="bpda beats exact by 4.0 points under pgd",
                    warnings=["masked gradients? x on d: ..."], robust_acc_exact=14.0, robust_acc_bpda=8.0)
    (merged,) = combine_seeds([[first], [second]], [0, 1])
    assert merged.fixed_by_attack == 15.0 and merged.robust_acc_exact == 12.0 and merged.robust_acc_bpda == 10.0
    assert merged.masking == "bpda beats exact by 4.0 points under pgd"
    assert merged.warnings == ["masked gradients? x on d: ..."]


# --- gradient masking -------------------------------------------------------------------------------------------


def test_the_masking_verdict_from_its_measurements():
    fine = record(robust_acc_transfer=20.0, robust_acc_exact=10.0, robust_acc_bpda=11.0)
    assert masking_verdict([fine], 0.8, 0.5, 100).masking == "none"
    masked = record(robust_acc_transfer=30.0, robust_acc_exact=30.0, robust_acc_bpda=5.0)
    verdict = masking_verdict([masked], 0.0, 3.0, 100)
    assert verdict.reasons == ["zero input gradient through the defense", "bpda beats exact by 25.0 points under pgd",
                               "not converged: twice the steps and EOT draws take 3.0 points more on 100 images"]
    assert "vanishing input gradient (2.0e-05" in masking_verdict([fine], 2e-5, None, 0).masking
    misled = record(robust_acc_transfer=5.0, robust_acc_exact=30.0, robust_acc_bpda=28.0)
    assert masking_verdict([misled], 0.9, None, 0).reasons == [
        "the transfer attack beats the adaptive ones by 23.0 points under pgd"]
    one_image = record(n=20, robust_acc_transfer=20.0, robust_acc_exact=25.0, robust_acc_bpda=25.0)  # 1 image: noise
    assert masking_verdict([one_image], 0.9, None, 0).masking == "none"


@needs_shared
def test_a_defense_that_masks_its_gradient_gets_the_verdict_and_bpda_breaks_it(tmp_path, rounder, capsys):
    # A weak transfer attack (2 half steps, within 1/255) leaves room: the adaptive attacks go on to 2/255 from it.
    found = tiny_eval(tmp_path / "out", "--limit", 40, "--eps", 2, "--attack-steps", 2, "--attack-step-size", 0.5,
                      "--threat", "adaptive", "--convergence-images", 20, "--defense", "none,toy-rounder,ttc")
    toy = found[("toy-rounder", "pgd")]
    assert "zero input gradient" in toy["masking"] and "bpda beats exact" in toy["masking"]
    assert any("masked gradients?" in w for w in toy["warnings"])
    # The exact attack stands still on the transfer images; bpda breaks what they left, as it does undefended.
    assert toy["robust_acc_exact"] == toy["robust_acc_transfer"]
    assert toy["robust_acc_bpda"] <= toy["robust_acc_exact"] - 10 and toy["robust_acc"] == toy["robust_acc_bpda"]
    assert "masked gradients? toy-rounder" in capsys.readouterr().err
    # Two half steps are not a converged attack, and the check says so of the undefended model itself (3 images of
    # 20 more fall with twice the steps); TTC's gradient is neither zero nor beaten by bpda.
    assert "not converged" in found[("none", "pgd")]["masking"]
    ttc = found[("ttc", "pgd")]["masking"]
    assert "input gradient" not in ttc and "bpda beats exact" not in ttc and "transfer attack beats" not in ttc


@needs_shared
def test_the_convergence_check_covers_every_attack_not_only_the_first(tmp_path):
    # PGD-10 at 1/255 is converged on the undefended model here; CW's two half steps within 2/255 are not.
    found = tiny_eval(tmp_path / "out", "--limit", 20, "--attack", "pgd,cw", "--cw-eps", 2, "--cw-steps", 2,
                      "--cw-step-size", 0.5, "--threat", "adaptive", "--convergence-images", 20, "--defense", "none")
    assert "not converged" in found[("none", "cw")]["masking"]
    assert found[("none", "pgd")]["masking"] == found[("none", "cw")]["masking"]  # one verdict per defense


def test_sanity_gives_the_same_verdict(tmp_path, random_clip_dir, rounder, capsys):
    folder = write_image_folder(tmp_path / "imgs", {"cat": 2, "dog": 2})
    code = main(["sanity", "--no-progress", "--workers", "0", "--model", f"local-dir:{random_clip_dir}", "--dataset",
                 f"imagefolder:{folder}", "--eps", "2", "--attack-steps", "2",
                 "--attack-step-size", "0.5", "--threat", "adaptive", "--convergence-images", "0", "--defense",
                 "toy-rounder", "--out", str(tmp_path)])
    assert code == 1
    failed = [c for c in json.loads((tmp_path / "sanity.json").read_text())["checks"] if not c["passed"]]
    assert any(c["name"].startswith("the gradient is not masked") and "zero input gradient" in c["detail"]
               for c in failed)
    assert "adaptive (exact and bpda)" in capsys.readouterr().err


@needs_shared
def test_clipure_as_shipped_gets_the_masking_verdict_at_its_papers_precision(tmp_path):
    found = tiny_eval(tmp_path / "out", "--limit", 20, "--attack-steps", 2, "--threat", "adaptive", "--precision",
                      "paper", "--convergence-images", 0, "--defense", "clipure,ttc")
    assert "input gradient" in found[("clipure", "pgd")]["masking"]
    assert found[("ttc", "pgd")]["masking"] == "none" and not found[("ttc", "pgd")].get("warnings")
